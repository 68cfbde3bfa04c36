"""Every Markdown and CSV table of the evaluation: cell formatting, the per-case CSV of a prediction folder,
the cross-validation table in the layout of the paper's Table 2, and the comparison with plain nnU-Net.

The study's tables take the JSON content that ``study.crossval`` / ``study.compare`` build; column names
for several labels / landmarks are defined here (``crossval_columns``) so the CSV, Markdown and summaries
agree.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnunet_landmark.layout import atomic_write_text

STATISTICS = ("mean", "sd", "median", "min", "max")
CROSSVAL_CASE_COLUMNS = ("fold", "case", "dice", "error_mm", "confidence", "geometric_tip_error_mm",
                         "mean_position_error_mm")
CROSSVAL_METRIC_COLUMNS = ("dice", "error_mm", "geometric_tip_error_mm", "mean_position_error_mm")
TABLE2_HEADER = ["Fold", "Image", "Dice", "L2 (mm)", "Geometric tip (mm)", "Mean position (mm)"]


# ---------------------------------------------------------------------------------------------- cells
def format_number(value, digits: int = 3) -> str:
    """A table cell: fixed digits, '' for None, 'NaN' for NaN."""
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    value = float(value)
    return "NaN" if math.isnan(value) else f"{value:.{digits}f}"


def csv_cell(value) -> str:
    """A CSV cell: full precision (``repr``), '' for None and NaN."""
    if value is None:
        return ""
    value = float(value)
    return "" if np.isnan(value) else repr(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], bold_from: int | None = None) -> str:
    """A Markdown table; rows from ``bold_from`` on (e.g. the statistics) in bold."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for n, row in enumerate(rows):
        if bold_from is not None and n >= bold_from:
            row = [f"**{c}**" if c else c for c in row]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def wilcoxon_text(test: Mapping) -> str:
    """'Wilcoxon p = ...' of a ``paired_wilcoxon`` result, flagged when too few pairs can reach p < 0.05."""
    if test["p_value"] is None:
        return "Wilcoxon: n/a"
    text = f"Wilcoxon p = {test['p_value']:.3g}"
    return text + " (n < 6)" if test["underpowered"] and test["n_nonzero"] > 0 else text


# ---------------------------------------------------------------------------------------------- prediction folder
def write_evaluation_csv(results: Mapping, path: str | os.PathLike) -> Path:
    """One row per case of ``evaluate_folder`` results: Dice per label, error and confidence per landmark."""
    labels, landmarks = list(results["labels"]), list(results["landmarks"])
    header = (["case"] + [f"dice_{n}" for n in labels] + [f"error_mm_{n}" for n in landmarks]
              + [f"confidence_{n}" for n in landmarks])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in results["per_case"]:
            row = [r["case"]] + [csv_cell(r["dice"][n]) for n in labels]
            row += [csv_cell(r["landmark_error_mm"][n]) for n in landmarks]
            row += [csv_cell(r["confidence"][n]) for n in landmarks]
            writer.writerow(row)
    return Path(path)


# ---------------------------------------------------------------------------------------------- cross-validation
def crossval_columns(label_names: Sequence[str], landmark_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(per-case CSV columns, summarised columns) of a cross-validation summary.

    The first label and landmark keep the paper's columns (``dice``, ``error_mm``, ...); with several labels
    every label also gets ``dice_<name>``, with several landmarks every landmark ``error_mm_<name>``,
    ``mean_position_error_mm_<name>`` and ``confidence_<name>``.
    """
    case_columns, metric_columns = list(CROSSVAL_CASE_COLUMNS), list(CROSSVAL_METRIC_COLUMNS)
    if len(label_names) > 1:
        case_columns += [f"dice_{n}" for n in label_names]
        metric_columns += [f"dice_{n}" for n in label_names]
    if len(landmark_names) > 1:
        errors = [f"{c}_{n}" for n in landmark_names for c in ("error_mm", "mean_position_error_mm")]
        case_columns += errors + [f"confidence_{n}" for n in landmark_names]
        metric_columns += errors
    return case_columns, metric_columns


def _summary_columns(summary: Mapping) -> tuple[list[str], list[str]]:
    return crossval_columns(list(summary.get("labels") or {}), list(summary.get("landmarks") or []))


def _extra_table2_columns(summary: Mapping) -> list[tuple[str, str, int]]:
    """(column key, header, digits) beyond the paper's Table 2 when several labels / landmarks are reported."""
    labels, landmarks = list(summary.get("labels") or {}), list(summary.get("landmarks") or [])
    extra = [(f"dice_{n}", f"Dice {n}", 3) for n in labels[1:]] if len(labels) > 1 else []
    if len(landmarks) > 1:
        for n in landmarks[1:]:
            extra += [(f"error_mm_{n}", f"L2 {n} (mm)", 2),
                      (f"mean_position_error_mm_{n}", f"Mean position {n} (mm)", 2)]
    return extra


def table2_rows(summary: Mapping) -> list[list[str]]:
    """The Table-2 layout as text cells: one row per held-out image, then mean, SD, median, min, max."""
    extra = _extra_table2_columns(summary)
    cells = []
    for r in summary["per_case"]:
        cells.append([str(r["fold"]), r["case"], format_number(r["dice"], 3), format_number(r["error_mm"], 2),
                      format_number(r["geometric_tip_error_mm"], 2), format_number(r["mean_position_error_mm"], 2)]
                     + [format_number(r.get(key), digits) for key, _, digits in extra])
    overall = summary["overall"]
    for statistic in STATISTICS:
        cells.append([statistic.upper() if statistic == "sd" else statistic.capitalize(), "",
                      format_number(overall["dice"][statistic], 3), format_number(overall["error_mm"][statistic], 2),
                      format_number(overall["geometric_tip_error_mm"][statistic], 2),
                      format_number(overall["mean_position_error_mm"][statistic], 2)]
                     + [format_number(overall[key][statistic], digits) for key, _, digits in extra])
    return cells


def table2_markdown(summary: Mapping) -> str:
    """The Table-2 layout in Markdown with notes on what each column means."""
    landmark, paper = summary["landmark"], summary["paper"]
    header = [h.replace("L2", f"L2 {landmark}") for h in TABLE2_HEADER] + [h for _, h, _ in
                                                                         _extra_table2_columns(summary)]
    table = markdown_table(header, table2_rows(summary), bold_from=len(summary["per_case"]))
    overall = summary["overall"]
    n_tip_missing = overall["geometric_tip_error_mm"]["n_nan"]
    notes = [f"Dice: label {summary['lv_label']} ({summary['lv_label_name']}); L2: Euclidean distance between the "
             f"predicted and reference {landmark} in world mm. SD is the sample SD over all held-out images.",
             "Baselines per case, from information available to its fold only: geometric tip = tapered end of the "
             "fold's predicted LV; mean position = mean offset from the image centre over the fold's training cases.",
             f"Paper (Table 2): mean Dice {paper['dice']}, mean apex error {paper['error_mm']} mm."]
    if n_tip_missing:
        notes.append(f"{n_tip_missing} case(s) without a geometric tip (empty predicted LV) are left out of its "
                     f"statistics.")
    return table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def write_crossval_tables(summary: Mapping, output: Path) -> None:
    """``crossval_summary.csv`` (one row per case, then the statistics) and ``crossval_summary.md``."""
    case_columns, _ = _summary_columns(summary)
    with open(output / "crossval_summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(case_columns)
        for r in summary["per_case"]:
            writer.writerow([r["fold"], r["case"]] + [csv_cell(r.get(c)) for c in case_columns[2:]])
        for statistic in STATISTICS:
            writer.writerow([statistic, ""] + [csv_cell(summary["overall"][c][statistic])
                                               if c in summary["overall"] else "" for c in case_columns[2:]])
    text = (f"# Cross-validation: {summary['results_folder']}\n\n"
            f"{len(summary['per_case'])} held-out images in {len(summary['folds'])} fold(s) "
            f"({', '.join(str(f) for f in summary['folds'])}).\n\n" + table2_markdown(summary))
    atomic_write_text(output / "crossval_summary.md", text)


# ---------------------------------------------------------------------------------------------- comparison
_STATS_HEADER = ["mean", "SD", "median", "min", "max", "n"]
_STATS_KEYS = ("mean", "sd", "median", "min", "max", "n")


def _dice_section(title: str, dice: Mapping) -> list[str]:
    rows = [[name] + [format_number(dice[k][s], 4) for s in _STATS_KEYS]
            for name, k in (("landmark model", "landmark"), ("plain nnU-Net", "plain"),
                            ("difference (landmark - plain)", "difference"))]
    test = dice["wilcoxon"]
    return [title, "", markdown_table(["", *_STATS_HEADER], rows), "",
            f"Paired test on the Dice differences (landmark - plain): {wilcoxon_text(test)} (signed-rank), "
            f"{test['n_nonzero']} non-zero of {test['n']} pairs. {test['note']}".rstrip(), ""]


def _error_section(title: str, methods: Mapping[str, str], errors: Mapping, tests: Mapping) -> list[str]:
    rows = []
    for key, name in methods.items():
        t = tests.get(key)
        p = "" if t is None else (format_number(t["p_value"], 4) if t["p_value"] is not None else "n/a")
        rows.append([name] + [format_number(errors[key][k], 2) for k in _STATS_KEYS] + [p])
    return [title, "", markdown_table(["method", *_STATS_HEADER, "Wilcoxon p vs model"], rows), ""]


def comparison_tables(comparison: Mapping) -> str:
    """Markdown: the Dice comparison and the landmark-error comparison with their paired tests."""
    paper, landmark, methods = comparison["paper"], comparison["landmark"], comparison["methods"]
    lines = _dice_section("### LV Dice: landmark model vs plain nnU-Net", comparison["dice"])
    lines += _error_section(f"### {landmark} error (mm): landmark model vs baselines", methods,
                            comparison["landmark_error_mm"], comparison["landmark_error_wilcoxon_vs_model"])
    lines += ["Geometric tip: tapered end of the predicted LV (largest component, PCA long axis). Mean position: "
              "mean offset from the image centre over the fold's training cases. "
              f"Paper: {paper['error_mm']} mm mean apex error, Dice {paper['dice']}.", ""]
    for name, dice in (comparison.get("dice_per_label") or {}).items():
        lines += _dice_section(f"### Dice {name}: landmark model vs plain nnU-Net", dice)
    for name, entry in (comparison.get("landmark_error_mm_per_landmark") or {}).items():
        lines += _error_section(f"### {name} error (mm): landmark model vs mean position",
                                {"error_landmark_model": "landmark model", "error_mean_position": "mean position"},
                                entry["errors"], entry["wilcoxon_vs_model"])
    return "\n".join(lines)


def comparison_markdown(comparison: Mapping, output: Path) -> str:
    """``comparison.md``: the folders, the comparison tables, the plots and one row per case."""
    methods = comparison["methods"]
    lines = ["# Landmark model vs plain nnU-Net", "",
             f"- landmark model: `{comparison['landmark_results_folder']}`",
             f"- plain nnU-Net: `{comparison['plain_results_folder']}`",
             f"- {len(comparison['per_case'])} held-out images, folds {', '.join(map(str, comparison['folds']))}", "",
             comparison_tables(comparison)]
    for name, path in comparison["plots"].items():
        lines += [f"![{name}]({os.path.relpath(path, output)})", ""]
    header = ["Fold", "Image", "Dice landmark", "Dice plain", "Δ Dice"] + list(methods.values())
    rows = [[str(r["fold"]), r["case"], format_number(r["dice_landmark"], 3), format_number(r["dice_plain"], 3),
             format_number(r["dice_difference"], 4)] + [format_number(r[k], 2) for k in methods]
            for r in comparison["per_case"]]
    lines += ["### Per case", "", markdown_table(header, rows), ""]
    return "\n".join(lines)
