"""Landmark model vs plain nnU-Net on the same cross-validation folds, plus the landmark baselines.

Both results folders are evaluated fold by fold on the same held-out cases (an error if the fold/case
sets differ). Reported:

* Dice of the LV label, per case for both models; paired differences (landmark - plain) and the
  Wilcoxon signed-rank test (``metrics.paired_wilcoxon``);
* landmark error (mm) of: the landmark model; the geometric tip of the plain model's predicted LV; the
  geometric tip of the landmark model's own predicted LV; the mean-position baseline (fitted per fold on
  its training cases). Each baseline is tested against the landmark model with the same paired test.
* with further ``labels`` / ``landmarks``: the same Dice comparison per label (``dice_per_label``) and the
  model against the mean position per landmark (``landmark_error_mm_per_landmark``).

Files in ``output_folder``: ``comparison.json`` (all numbers), ``comparison.md``, ``dice_boxplot.png``,
``landmark_error_boxplot.png``, ``per_fold.png``, per-fold evaluations of both models under
``landmark/`` and ``plain/``, the landmark model's Table 2 under ``landmark/crossval_summary.*`` and,
with ``qc=True``, one QC figure per case under ``qc/``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from nnunet_landmark.evaluation.folder import EvaluationError
from nnunet_landmark.metrics import json_ready, paired_wilcoxon, summarize
from nnunet_landmark.evaluation.study import PAPER
from nnunet_landmark.evaluation.study.crossval import (RawDataset, evaluate_fold_cases, find_folds, read_splits,
                                                       reported, summary_from_rows, write_crossval_files,
                                                       write_qc_figures)
from nnunet_landmark.evaluation.tables import comparison_markdown
from nnunet_landmark.layout import atomic_write_json, atomic_write_text

# landmark-error methods: key in the per-case rows -> name shown in tables and plots
ERROR_METHODS = {
    "error_landmark_model": "landmark model",
    "error_tip_plain": "tip of plain nnU-Net LV",
    "error_tip_landmark": "tip of landmark model's LV",
    "error_mean_position": "mean position",
}


def _dice_comparison(landmark_values: Sequence[float], plain_values: Sequence[float]) -> dict:
    differences = [a - b for a, b in zip(landmark_values, plain_values)]
    return {"landmark": summarize(landmark_values), "plain": summarize(plain_values),
            "difference": summarize(differences), "wilcoxon": paired_wilcoxon(landmark_values, plain_values)}


def comparison_qc_points(plain_by_key: Mapping):
    """The QC figure's extra points of a landmark-model row: the tips of both models' LVs, the mean position."""
    def points(row: Mapping) -> dict:
        plain = plain_by_key[(row["fold"], row["case"])]
        extra = {}
        if plain["geometric_tip_point"] is not None:
            extra["tip of plain nnU-Net LV"] = plain["geometric_tip_point"]
        if row["geometric_tip_point"] is not None:
            extra["tip of own LV"] = row["geometric_tip_point"]
        extra["mean position"] = row["mean_position_point"]
        return extra
    return points


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
                     splits_file: str | os.PathLike | None = None, qc: bool = False, progress: bool = True,
                     labels: Sequence[int] | None = None, landmarks: Sequence[str] | None = None) -> dict:
    """Evaluate both models per fold, compare them and the baselines; write JSON, Markdown and plots.

    ``labels`` / ``landmarks``: further labels / landmarks to compare beside ``lv_label`` / ``landmark``.
    """
    from nnunet_landmark.evaluation.plots import comparison_plots

    landmark_folder, plain_folder = Path(landmark_results_folder), Path(plain_results_folder)
    output = Path(output_folder)
    output.mkdir(parents=True, exist_ok=True)
    folds = _check_same_folds(landmark_folder, plain_folder, folds)
    labels, landmarks = reported(lv_label, labels), reported(landmark, landmarks)
    raw = RawDataset(raw_dataset_folder)
    label_names = [raw.label_name(v) for v in labels]
    splits = read_splits(raw_dataset_folder, splits_file)
    landmark_rows, plain_rows = [], []
    for fold in folds:
        landmark_rows += evaluate_fold_cases(landmark_folder, raw, splits, fold, landmarks, labels, True,
                                             output / "landmark", progress)
        plain_rows += evaluate_fold_cases(plain_folder, raw, splits, fold, landmarks, labels, False, output / "plain",
                                          progress)
    plain_by_key = {(r["fold"], r["case"]): r for r in plain_rows}
    landmark_keys = [(r["fold"], r["case"]) for r in landmark_rows]
    if set(landmark_keys) != set(plain_by_key):
        raise EvaluationError(f"the models' validation folders hold different cases: only in {landmark_folder}: "
                              f"{sorted(set(landmark_keys) - set(plain_by_key))}; only in {plain_folder}: "
                              f"{sorted(set(plain_by_key) - set(landmark_keys))}")

    per_case = []
    for row in landmark_rows:
        plain = plain_by_key[(row["fold"], row["case"])]
        record = {
            "fold": row["fold"], "case": row["case"],
            "dice_landmark": row["dice"], "dice_plain": plain["dice"], "dice_difference": row["dice"] - plain["dice"],
            "error_landmark_model": row["error_mm"], "error_tip_plain": plain["geometric_tip_error_mm"],
            "error_tip_landmark": row["geometric_tip_error_mm"], "error_mean_position": row["mean_position_error_mm"],
            "confidence": row["confidence"],
        }
        if len(labels) > 1:
            for n in label_names:
                record.update({f"dice_landmark_{n}": row[f"dice_{n}"], f"dice_plain_{n}": plain[f"dice_{n}"],
                               f"dice_difference_{n}": row[f"dice_{n}"] - plain[f"dice_{n}"]})
        if len(landmarks) > 1:
            for n in landmarks:
                record.update({f"error_landmark_model_{n}": row[f"error_mm_{n}"],
                               f"error_mean_position_{n}": row[f"mean_position_error_mm_{n}"]})
        per_case.append(record)
    column = lambda key, rows=per_case: [r[key] for r in rows]  # noqa: E731
    comparison = {
        "landmark_results_folder": str(landmark_folder), "plain_results_folder": str(plain_folder),
        "raw_dataset_folder": str(raw.folder), "lv_label": lv_label, "lv_label_name": label_names[0],
        "landmark": landmark, "folds": folds, "per_case": per_case,
        "dice": _dice_comparison(column("dice_landmark"), column("dice_plain")),
        "landmark_error_mm": {key: summarize(column(key)) for key in ERROR_METHODS},
        "landmark_error_wilcoxon_vs_model": {
            key: paired_wilcoxon(column("error_landmark_model"), column(key))
            for key in ERROR_METHODS if key != "error_landmark_model"},
        "per_fold": {str(f): {key: summarize(column(key, [r for r in per_case if r["fold"] == f]))["mean"]
                              for key in ("dice_landmark", "dice_plain", *ERROR_METHODS)} for f in folds},
        "methods": ERROR_METHODS, "paper": PAPER,
    }
    if len(labels) > 1:
        comparison["labels"] = dict(zip(label_names, labels))
        comparison["dice_per_label"] = {n: _dice_comparison(column(f"dice_landmark_{n}"), column(f"dice_plain_{n}"))
                                        for n in label_names}
    if len(landmarks) > 1:
        comparison["landmarks"] = list(landmarks)
        comparison["landmark_error_mm_per_landmark"] = {n: {
            "errors": {"error_landmark_model": summarize(column(f"error_landmark_model_{n}")),
                       "error_mean_position": summarize(column(f"error_mean_position_{n}"))},
            "wilcoxon_vs_model": {"error_mean_position": paired_wilcoxon(column(f"error_landmark_model_{n}"),
                                                                         column(f"error_mean_position_{n}"))}}
            for n in landmarks}
    landmark_crossval = summary_from_rows(landmark_rows, landmark_folder, raw, folds, labels, landmarks)
    write_crossval_files(landmark_crossval, output / "landmark")
    comparison["plots"] = comparison_plots(comparison, output)
    if qc:
        comparison["qc_pngs"] = write_qc_figures(landmark_rows, output / "qc", lv_label, landmark, "landmark model",
                                                 progress, comparison_qc_points(plain_by_key))
    atomic_write_json(json_ready(comparison), output / "comparison.json")
    atomic_write_text(output / "comparison.md", comparison_markdown(comparison, output))
    comparison["landmark_crossval"] = landmark_crossval
    comparison["output_folder"] = str(output)
    return comparison
