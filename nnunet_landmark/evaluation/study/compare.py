"""Landmark model vs plain nnU-Net on the same cross-validation folds, plus the landmark baselines.

Both results folders are evaluated fold by fold on the same held-out cases (an error if the fold/case
sets differ). Reported:

* Dice of the LV label, per case for both models; paired differences (landmark - plain) and the
  Wilcoxon signed-rank test (``paired_wilcoxon``);
* landmark error (mm) of: the landmark model; the geometric tip of the plain model's predicted LV; the
  geometric tip of the landmark model's own predicted LV; the mean-position baseline (fitted per fold on
  its training cases). Each baseline is tested against the landmark model with the same paired test.

Files in ``output_folder``: ``comparison.json`` (all numbers), ``comparison.md``, ``dice_boxplot.png``,
``landmark_error_boxplot.png``, ``per_fold.png``, per-fold evaluations of both models under
``landmark/`` and ``plain/``, the landmark model's Table 2 under ``landmark/crossval_summary.*`` and,
with ``qc=True``, one QC figure per case under ``qc/``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from nnunet_landmark.evaluation.crossval import (PAPER, RawDataset, evaluate_fold_cases, find_folds,  # noqa: E402
                                                 markdown_table, read_splits, summary_from_rows,
                                                 write_crossval_files)
from nnunet_landmark.evaluation.evaluate import EvaluationError  # noqa: E402
from nnunet_landmark.evaluation.metrics import format_number, json_ready, summarize  # noqa: E402

# landmark-error methods: key in the per-case rows -> name shown in tables and plots
ERROR_METHODS = {
    "error_landmark_model": "landmark model",
    "error_tip_plain": "tip of plain nnU-Net LV",
    "error_tip_landmark": "tip of landmark model's LV",
    "error_mean_position": "mean position",
}
MIN_NONZERO_FOR_SIGNIFICANCE = 6
MODEL_COLOURS = {"landmark": "#1f77b4", "plain": "#ff7f0e"}
METHOD_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f"]


def paired_wilcoxon(first: Sequence[float], second: Sequence[float]) -> dict:
    """Wilcoxon signed-rank test of ``first - second`` (two-sided, scipy's defaults).

    Pairs with a NaN on either side are dropped. Zero differences are dropped by the test
    (``zero_method="wilcox"``). Special cases, noted in ``note``:

    * no pairs: ``p_value`` None;
    * all differences zero: ``p_value`` 1.0 without calling scipy (nothing to test);
    * fewer than 6 non-zero differences: scipy's exact p-value is reported, but ``underpowered`` is True:
      the smallest possible two-sided p-value is 2 / 2**n (0.0625 for n = 5), so p < 0.05 is impossible.
    """
    a = np.asarray([np.nan if v is None else v for v in first], dtype=np.float64)
    b = np.asarray([np.nan if v is None else v for v in second], dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    differences = a[keep] - b[keep]
    n_nonzero = int(np.count_nonzero(differences))
    out = {"n": int(len(differences)), "n_dropped_nan": int(np.count_nonzero(~keep)), "n_nonzero": n_nonzero,
           "mean_difference": float(differences.mean()) if len(differences) else float("nan"),
           "median_difference": float(np.median(differences)) if len(differences) else float("nan"),
           "statistic": None, "p_value": None, "underpowered": True, "note": ""}
    if len(differences) == 0:
        out["note"] = "no complete pairs: nothing to test"
        return out
    if n_nonzero == 0:
        out.update(p_value=1.0, note="all paired differences are zero: no difference to test (p reported as 1)")
        return out
    result = stats.wilcoxon(differences)
    out.update(statistic=float(result.statistic), p_value=float(result.pvalue),
               underpowered=n_nonzero < MIN_NONZERO_FOR_SIGNIFICANCE)
    if out["underpowered"]:
        out["note"] = (f"only {n_nonzero} non-zero paired difference(s): the smallest possible two-sided p-value is "
                       f"{2 / 2 ** n_nonzero:.4g}, so the test cannot show a difference at 0.05")
    return out


def _check_same_folds(landmark_folder: Path, plain_folder: Path, folds: Sequence[int] | None) -> list[int]:
    if folds is not None:
        return list(folds)
    landmark_folds, plain_folds = find_folds(landmark_folder), find_folds(plain_folder)
    if landmark_folds != plain_folds:
        raise EvaluationError(f"the models were validated on different folds: {landmark_folder} has "
                              f"{landmark_folds}, {plain_folder} has {plain_folds}; pass the common folds explicitly")
    return landmark_folds


def compare_to_plain(landmark_results_folder: str | os.PathLike, plain_results_folder: str | os.PathLike,
                     raw_dataset_folder: str | os.PathLike, output_folder: str | os.PathLike,
                     folds: Sequence[int] | None = None, lv_label: int = 1, landmark: str = "apex",
                     splits_file: str | os.PathLike | None = None, qc: bool = False, progress: bool = True) -> dict:
    """Evaluate both models per fold, compare them and the baselines; write JSON, Markdown and plots."""
    landmark_folder, plain_folder = Path(landmark_results_folder), Path(plain_results_folder)
    output = Path(output_folder)
    output.mkdir(parents=True, exist_ok=True)
    folds = _check_same_folds(landmark_folder, plain_folder, folds)
    raw = RawDataset(raw_dataset_folder, landmark)
    splits = read_splits(raw_dataset_folder, splits_file)
    landmark_rows, plain_rows = [], []
    for fold in folds:
        landmark_rows += evaluate_fold_cases(landmark_folder, raw, splits, fold, lv_label, True, output / "landmark",
                                             progress)
        plain_rows += evaluate_fold_cases(plain_folder, raw, splits, fold, lv_label, False, output / "plain", progress)
    plain_by_key = {(r["fold"], r["case"]): r for r in plain_rows}
    landmark_keys = [(r["fold"], r["case"]) for r in landmark_rows]
    if set(landmark_keys) != set(plain_by_key):
        raise EvaluationError(f"the models' validation folders hold different cases: only in {landmark_folder}: "
                              f"{sorted(set(landmark_keys) - set(plain_by_key))}; only in {plain_folder}: "
                              f"{sorted(set(plain_by_key) - set(landmark_keys))}")

    per_case = []
    for row in landmark_rows:
        plain = plain_by_key[(row["fold"], row["case"])]
        per_case.append({
            "fold": row["fold"], "case": row["case"],
            "dice_landmark": row["dice"], "dice_plain": plain["dice"], "dice_difference": row["dice"] - plain["dice"],
            "error_landmark_model": row["error_mm"], "error_tip_plain": plain["geometric_tip_error_mm"],
            "error_tip_landmark": row["geometric_tip_error_mm"], "error_mean_position": row["mean_position_error_mm"],
            "confidence": row["confidence"],
        })
    column = lambda key, rows=per_case: [r[key] for r in rows]  # noqa: E731
    comparison = {
        "landmark_results_folder": str(landmark_folder), "plain_results_folder": str(plain_folder),
        "raw_dataset_folder": str(raw.folder), "lv_label": lv_label, "lv_label_name": raw.label_name(lv_label),
        "landmark": landmark, "folds": folds, "per_case": per_case,
        "dice": {"landmark": summarize(column("dice_landmark")), "plain": summarize(column("dice_plain")),
                 "difference": summarize(column("dice_difference")),
                 "wilcoxon": paired_wilcoxon(column("dice_landmark"), column("dice_plain"))},
        "landmark_error_mm": {key: summarize(column(key)) for key in ERROR_METHODS},
        "landmark_error_wilcoxon_vs_model": {
            key: paired_wilcoxon(column("error_landmark_model"), column(key))
            for key in ERROR_METHODS if key != "error_landmark_model"},
        "per_fold": {str(f): {key: summarize(column(key, [r for r in per_case if r["fold"] == f]))["mean"]
                              for key in ("dice_landmark", "dice_plain", *ERROR_METHODS)} for f in folds},
        "methods": ERROR_METHODS, "paper": PAPER,
    }
    landmark_crossval = summary_from_rows(landmark_rows, landmark_folder, raw, folds, lv_label)
    write_crossval_files(landmark_crossval, output / "landmark")
    comparison["plots"] = write_plots(comparison, output)
    if qc:
        comparison["qc_pngs"] = write_comparison_qc(landmark_rows, plain_by_key, output / "qc", lv_label, landmark,
                                                    progress)
    (output / "comparison.json").write_text(json.dumps(json_ready(comparison), indent=2) + "\n")
    (output / "comparison.md").write_text(comparison_markdown(comparison, output))
    comparison["landmark_crossval"] = landmark_crossval
    comparison["output_folder"] = str(output)
    return comparison


def write_comparison_qc(landmark_rows: Sequence[Mapping], plain_by_key: Mapping, folder: Path, lv_label: int,
                        landmark: str, progress: bool) -> list[str]:
    """QC figures of the landmark model's cases, with the tips of both models' LVs and the mean position."""
    from tqdm import tqdm

    from nnunet_landmark.evaluation.qc import qc_figure

    pngs = []
    for row in tqdm(landmark_rows, desc="QC figures", disable=not progress):
        plain = plain_by_key[(row["fold"], row["case"])]
        extra = {}
        if plain["geometric_tip_point"] is not None:
            extra["tip of plain nnU-Net LV"] = plain["geometric_tip_point"]
        if row["geometric_tip_point"] is not None:
            extra["tip of own LV"] = row["geometric_tip_point"]
        extra["mean position"] = row["mean_position_point"]
        png = folder / f"fold_{row['fold']}_{row['case']}.png"
        qc_figure(row["image_file"], row["reference_label_file"], row["prediction_file"], row["reference_point"],
                  row["predicted_point"], png, lv_label=lv_label, extra_points=extra, landmark_name=landmark,
                  title=f"landmark model: {row['case']} (fold {row['fold']})")
        pngs.append(str(png))
    return pngs


# ---------------------------------------------------------------------------------------------- plots
def _box_with_points(ax, samples: Sequence[Sequence[float]], names: Sequence[str], colours: Sequence[str],
                     paired: bool = False) -> None:
    clean = [[v for v in s if v is not None and math.isfinite(v)] for s in samples]
    box = ax.boxplot(clean, tick_labels=list(names), widths=0.5, patch_artist=True, showfliers=False,
                     medianprops=dict(color="black", linewidth=1.5), showmeans=True,
                     meanprops=dict(marker="D", markerfacecolor="white", markeredgecolor="black", markersize=7))
    for patch, colour in zip(box["boxes"], colours):
        patch.set_facecolor(colour)
        patch.set_alpha(0.35)
    rng = np.random.default_rng(0)
    offsets = rng.uniform(-0.08, 0.08, size=max(len(s) for s in samples))
    if paired:
        for n in range(len(samples[0])):
            ys = [s[n] for s in samples]
            if all(y is not None and math.isfinite(y) for y in ys):
                ax.plot([i + 1 + offsets[n] for i in range(len(samples))], ys, color="#999999", linewidth=0.7,
                        zorder=1)
    for i, (s, colour) in enumerate(zip(samples, colours)):
        ys = np.asarray([np.nan if v is None else v for v in s], dtype=float)
        ax.scatter(i + 1 + offsets[:len(ys)], ys, s=22, color=colour, edgecolor="black", linewidth=0.5, zorder=3)


def _p_text(test: Mapping) -> str:
    if test["p_value"] is None:
        return "Wilcoxon: n/a"
    text = f"Wilcoxon p = {test['p_value']:.3g}"
    return text + " (n < 6)" if test["underpowered"] and test["n_nonzero"] > 0 else text


def write_plots(comparison: Mapping, output: Path) -> dict:
    """Dice box plot, landmark-error box plot and per-fold bars; returns {name: png path}."""
    per_case, landmark = comparison["per_case"], comparison["landmark"]
    n = len(per_case)
    paths = {}

    figure, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
    _box_with_points(ax, [[r["dice_landmark"] for r in per_case], [r["dice_plain"] for r in per_case]],
                     ["landmark model", "plain nnU-Net"], [MODEL_COLOURS["landmark"], MODEL_COLOURS["plain"]],
                     paired=True)
    ax.set_ylabel(f"Dice, {comparison['lv_label_name']}")
    ax.set_title(f"LV Dice per held-out image (n = {n}), lines pair the same image\n"
                 f"{_p_text(comparison['dice']['wilcoxon'])}, mean difference "
                 f"{comparison['dice']['difference']['mean']:+.4f}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    paths["dice_boxplot"] = str(output / "dice_boxplot.png")
    figure.savefig(paths["dice_boxplot"], facecolor="white")
    plt.close(figure)

    figure, ax = plt.subplots(figsize=(8, 5), dpi=110)
    wrapped = {"error_tip_plain": "tip of plain\nnnU-Net LV", "error_tip_landmark": "tip of landmark\nmodel's LV"}
    names = [wrapped.get(k, ERROR_METHODS[k]) + f"\nmean {format_number(comparison['landmark_error_mm'][k]['mean'], 1)} mm" for k in ERROR_METHODS]
    _box_with_points(ax, [[r[k] for r in per_case] for k in ERROR_METHODS], names, METHOD_COLOURS)
    ax.axhline(PAPER["error_mm"], color="#d62728", linestyle="--", linewidth=1)
    ax.text(0.55, PAPER["error_mm"], f"paper: {PAPER['error_mm']} mm mean", color="#d62728", va="bottom",
            ha="left", fontsize=8)
    ax.set_ylabel(f"{landmark} error (mm)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{landmark} error per held-out image (n = {n}): model vs baselines\n"
                 f"box: median and quartiles; white diamond: mean", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    paths["landmark_error_boxplot"] = str(output / "landmark_error_boxplot.png")
    figure.savefig(paths["landmark_error_boxplot"], facecolor="white")
    plt.close(figure)

    folds = [str(f) for f in comparison["folds"]]
    per_fold = comparison["per_fold"]
    x = np.arange(len(folds))
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(9, 1.1 * len(folds) + 6), 4.5), dpi=110)
    for i, (key, name) in enumerate((("dice_landmark", "landmark model"), ("dice_plain", "plain nnU-Net"))):
        left.bar(x + (i - 0.5) * 0.38, [_nan(per_fold[f][key]) for f in folds], width=0.38, label=name,
                 color=list(MODEL_COLOURS.values())[i])
    dice_values = [v for f in folds for v in (per_fold[f]["dice_landmark"], per_fold[f]["dice_plain"])
                   if v is not None and math.isfinite(v)]
    left.set_ylim(max(0.0, min(dice_values, default=0.0) - 0.05), 1.0)
    left.set_title("mean LV Dice per fold", fontsize=10)
    width = 0.8 / len(ERROR_METHODS)
    for i, (key, name) in enumerate(ERROR_METHODS.items()):
        right.bar(x + (i - (len(ERROR_METHODS) - 1) / 2) * width, [_nan(per_fold[f][key]) for f in folds],
                  width=width, label=name, color=METHOD_COLOURS[i])
    right.set_title(f"mean {landmark} error per fold (mm)", fontsize=10)
    for ax in (left, right):
        ax.set_xticks(x, [f"fold {f}" for f in folds])
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    paths["per_fold"] = str(output / "per_fold.png")
    figure.savefig(paths["per_fold"], facecolor="white")
    plt.close(figure)
    return paths


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------------------------------------- markdown
def comparison_tables(comparison: Mapping) -> str:
    """Markdown: the Dice comparison and the landmark-error comparison with their paired tests."""
    stats_header = ["mean", "SD", "median", "min", "max", "n"]
    keys = ("mean", "sd", "median", "min", "max", "n")
    dice = comparison["dice"]
    dice_rows = [[name] + [format_number(dice[k][s], 4) for s in keys]
                 for name, k in (("landmark model", "landmark"), ("plain nnU-Net", "plain"),
                                 ("difference (landmark - plain)", "difference"))]
    test = dice["wilcoxon"]
    lines = ["### LV Dice: landmark model vs plain nnU-Net", "",
             markdown_table(["", *stats_header], dice_rows), "",
             f"Paired test on the Dice differences (landmark - plain): {_p_text(test)} (signed-rank), "
             f"{test['n_nonzero']} non-zero of {test['n']} pairs. {test['note']}".rstrip(), ""]
    landmark = comparison["landmark"]
    error_rows = []
    for key, name in ERROR_METHODS.items():
        s = comparison["landmark_error_mm"][key]
        t = comparison["landmark_error_wilcoxon_vs_model"].get(key)
        p = "" if t is None else (format_number(t["p_value"], 4) if t["p_value"] is not None else "n/a")
        error_rows.append([name] + [format_number(s[k], 2) for k in keys] + [p])
    lines += [f"### {landmark} error (mm): landmark model vs baselines", "",
              markdown_table(["method", *stats_header, "Wilcoxon p vs model"], error_rows), "",
              "Geometric tip: tapered end of the predicted LV (largest component, PCA long axis). Mean position: "
              "mean offset from the image centre over the fold's training cases. "
              f"Paper: {PAPER['error_mm']} mm mean apex error, Dice {PAPER['dice']}.", ""]
    return "\n".join(lines)


def comparison_markdown(comparison: Mapping, output: Path) -> str:
    lines = ["# Landmark model vs plain nnU-Net", "",
             f"- landmark model: `{comparison['landmark_results_folder']}`",
             f"- plain nnU-Net: `{comparison['plain_results_folder']}`",
             f"- {len(comparison['per_case'])} held-out images, folds {', '.join(map(str, comparison['folds']))}", "",
             comparison_tables(comparison)]
    for name, path in comparison["plots"].items():
        lines += [f"![{name}]({os.path.relpath(path, output)})", ""]
    header = ["Fold", "Image", "Dice landmark", "Dice plain", "Δ Dice"] + list(ERROR_METHODS.values())
    rows = [[str(r["fold"]), r["case"], format_number(r["dice_landmark"], 3), format_number(r["dice_plain"], 3),
             format_number(r["dice_difference"], 4)] + [format_number(r[k], 2) for k in ERROR_METHODS]
            for r in comparison["per_case"]]
    lines += ["### Per case", "", markdown_table(header, rows), ""]
    return "\n".join(lines)
