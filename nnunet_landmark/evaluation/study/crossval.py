"""Cross-validation summary in the layout of the paper's Table 2, with two baselines per case.

For every fold ``F`` of ``RESULTS/TRAINER__PLANS__CONFIG/fold_F/validation/`` the held-out cases
(nnU-Net's "val" = the paper's test images) are evaluated against the raw dataset with ``evaluate_folder``:
Dice of the LV label and the landmark error in mm (further labels and landmarks on request). Per case two
baselines use only what that fold could know:

* mean position: ``fit_mean_positions`` on the fold's training cases (``splits_final.json``, their
  ``landmarksTr`` points and image headers), applied to the held-out image's header;
* geometric tip: ``apex_from_segmentation`` on the fold's own predicted LV (first landmark only).

Writes ``crossval_summary.json`` (everything), ``crossval_summary.csv`` (one row per case, then rows
``mean``, ``sd``, ``median``, ``min``, ``max`` in the fold column) and ``crossval_summary.md``; the columns
are ``tables.crossval_columns``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from nnunet_landmark.evaluation.baselines import BaselineError, apex_from_segmentation, fit_mean_positions
from nnunet_landmark.evaluation.folder import EvaluationError, RawDataset, evaluate_folder, find_cases
from nnunet_landmark.metrics import json_ready, landmark_error_mm, summarize_columns
from nnunet_landmark.evaluation.study import PAPER
from nnunet_landmark.evaluation.tables import crossval_columns, write_crossval_tables
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.layout import atomic_write_json


def find_folds(results_folder: str | os.PathLike) -> list[int]:
    """Folds ``F`` with a ``fold_F/validation/`` folder, sorted."""
    folder = Path(results_folder)
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: the results folder does not exist (expected "
                              f"$nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIG)")
    folds = sorted(int(m.group(1)) for p in folder.iterdir()
                   if (m := re.fullmatch(r"fold_(\d+)", p.name)) and (p / "validation").is_dir())
    if not folds:
        raise EvaluationError(f"{folder}: no fold_F/validation/ folder; train with nnUNetv2_train (validation runs "
                              f"at the end of training) or run nnUNetv2_train ... --val")
    return folds


def read_splits(raw_dataset_folder: str | os.PathLike, splits_file: str | os.PathLike | None = None) -> list[dict]:
    """nnU-Net's ``splits_final.json`` (default: the raw dataset's copy)."""
    path = Path(splits_file) if splits_file is not None else Path(raw_dataset_folder) / "splits_final.json"
    if not path.is_file():
        raise EvaluationError(f"{path}: missing; the baselines need each fold's training cases. Pass the "
                              f"splits_final.json the models were trained with ($nnUNet_preprocessed/DatasetXXX_Name/)")
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(splits, list) or not all(isinstance(s, dict) and "train" in s and "val" in s for s in splits):
        raise EvaluationError(f"{path}: expected nnU-Net's format, a list of {{'train': [...], 'val': [...]}}")
    return splits


def reported(first, further: Sequence | None) -> list:
    """``first`` followed by the other requested items, without repeats."""
    return [first] + [x for x in dict.fromkeys(further or []) if x != first]


def evaluate_fold_cases(results_folder: str | os.PathLike, raw: RawDataset, splits: list[dict], fold: int,
                        landmarks: Sequence[str] = ("apex",), labels: Sequence[int] = (1,), with_landmarks: bool = True,
                        output_folder: Path | None = None, progress: bool = True) -> list[dict]:
    """Per-case rows (see ``tables.crossval_columns`` plus the points and file paths) of one fold's validation
    folder. ``labels[0]`` is the LV (its Dice is ``dice``, its tip a baseline), ``landmarks[0]`` the landmark
    of ``error_mm`` and the baselines."""
    validation = Path(results_folder) / f"fold_{fold}" / "validation"
    if fold >= len(splits):
        raise EvaluationError(f"fold {fold}: the splits file has only {len(splits)} folds; is it the one these "
                              f"models were trained with?")
    val_cases = sorted(splits[fold]["val"])
    predicted = set(find_cases(validation, raw.labels_folder, raw.file_ending))
    if predicted != set(val_cases):
        raise EvaluationError(
            f"{validation}: holds predictions for {sorted(predicted)} but the splits say fold {fold} holds out "
            f"{val_cases}; pass the splits_final.json these models were trained with")
    landmark, lv_label = landmarks[0], labels[0]
    mean_positions = fit_mean_positions(raw, splits[fold]["train"], landmarks)

    def baselines(case: str, predicted_labels: np.ndarray, geometry: ImageGeometry) -> dict:
        reference = raw.point(case, landmark)
        out = {"mean_position_point": mean_positions[landmark].predict(geometry).tolist()}
        out["mean_position_error_mm"] = landmark_error_mm(out["mean_position_point"], reference)
        try:
            tip = apex_from_segmentation(predicted_labels, geometry, lv_label)
            out["geometric_tip_point"] = tip.tolist()
            out["geometric_tip_error_mm"] = landmark_error_mm(tip, reference)
        except BaselineError as e:  # e.g. an empty predicted LV: no tip, counted as NaN
            out["geometric_tip_point"] = None
            out["geometric_tip_error_mm"] = float("nan")
            out["geometric_tip_note"] = str(e)
        out["reference_point"] = reference.tolist()
        if len(landmarks) > 1:
            out.update({f"mean_position_error_mm_{n}": landmark_error_mm(mean_positions[n].predict(geometry),
                                                                         raw.point(case, n)) for n in landmarks})
        return out

    prefix = None if output_folder is None else output_folder / "folds" / f"fold_{fold}"
    label_names = [raw.label_name(v) for v in labels]
    results = evaluate_folder(validation, raw.labels_folder, raw.landmarks_folder if with_landmarks else None,
                              labels=dict(zip(label_names, labels)),
                              landmark_names=list(landmarks) if with_landmarks else None,
                              output_prefix=prefix, dataset_json=raw.dataset_json, cases=val_cases,
                              case_hook=baselines, progress=progress)
    rows = []
    for record in results["per_case"]:
        row = {"fold": fold, "case": record["case"], "dice": record["dice"][label_names[0]],
               "error_mm": record["landmark_error_mm"][landmark] if with_landmarks else None,
               "confidence": record["confidence"][landmark] if with_landmarks else None,
               "predicted_point": record["predicted_landmarks"][landmark] if with_landmarks else None,
               "prediction_file": record["prediction_file"], "reference_label_file": record["reference_file"],
               "image_file": str(raw.image_path(record["case"]))}
        if len(labels) > 1:
            row.update({f"dice_{n}": record["dice"][n] for n in label_names})
        if len(landmarks) > 1:
            for n in landmarks:
                row[f"error_mm_{n}"] = record["landmark_error_mm"][n] if with_landmarks else None
                row[f"confidence_{n}"] = record["confidence"][n] if with_landmarks else None
        row.update({k: v for k, v in record.items() if k.startswith(("mean_position", "geometric_tip", "reference_point"))})
        rows.append(row)
    return rows


def summary_from_rows(rows: Sequence[Mapping], results_folder: str | os.PathLike, raw: RawDataset,
                      folds: Sequence[int], labels: Sequence[int], landmarks: Sequence[str]) -> dict:
    """The cross-validation summary (the JSON content) of per-case rows from ``evaluate_fold_cases``."""
    label_names = [raw.label_name(v) for v in labels]
    _, metric_columns = crossval_columns(label_names, landmarks)
    return {
        "results_folder": str(results_folder), "raw_dataset_folder": str(raw.folder), "lv_label": labels[0],
        "lv_label_name": label_names[0], "landmark": landmarks[0], "folds": list(folds),
        "labels": dict(zip(label_names, labels)), "landmarks": list(landmarks),
        "per_case": list(rows),
        "per_fold": {str(f): summarize_columns([r for r in rows if r["fold"] == f], metric_columns) for f in folds},
        "overall": summarize_columns(rows, metric_columns),
        "paper": PAPER,
    }


def crossval_summary(results_folder: str | os.PathLike, raw_dataset_folder: str | os.PathLike,
                     folds: Sequence[int] | None = None, lv_label: int = 1, landmark: str = "apex",
                     output_folder: str | os.PathLike | None = None, splits_file: str | os.PathLike | None = None,
                     qc: bool = False, progress: bool = True, labels: Sequence[int] | None = None,
                     landmarks: Sequence[str] | None = None) -> dict:
    """Evaluate every fold's validation folder; write the Table-2 layout as JSON, CSV and Markdown.

    ``folds``: default every ``fold_F`` with a ``validation/`` folder. ``output_folder``: default
    ``<results_folder>/crossval_summary``. ``qc=True`` also writes a QC figure per case under ``qc/``.
    ``labels`` / ``landmarks``: further labels / landmarks to report beside ``lv_label`` / ``landmark``.
    Returns the JSON content.
    """
    results_folder = Path(results_folder)
    output = Path(output_folder) if output_folder is not None else results_folder / "crossval_summary"
    folds = list(folds) if folds is not None else find_folds(results_folder)
    labels, landmarks = reported(lv_label, labels), reported(landmark, landmarks)
    raw = RawDataset(raw_dataset_folder)
    splits = read_splits(raw_dataset_folder, splits_file)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for fold in folds:
        rows += evaluate_fold_cases(results_folder, raw, splits, fold, landmarks, labels, True, output, progress)
    summary = summary_from_rows(rows, results_folder, raw, folds, labels, landmarks)
    if qc:
        summary["qc_pngs"] = write_qc_figures(rows, output / "qc", lv_label, landmark, progress=progress)
    write_crossval_files(summary, output)
    summary["output_folder"] = str(output)
    return summary


def write_crossval_files(summary: Mapping, output: Path) -> None:
    """``crossval_summary.json`` and the tables (``.csv``, ``.md``)."""
    atomic_write_json(json_ready(summary), output / "crossval_summary.json")
    write_crossval_tables(summary, output)


def baseline_points(row: Mapping) -> dict:
    """The QC figure's extra points of a crossval row: geometric tip (if any) and mean position."""
    extra = {}
    if row.get("geometric_tip_point") is not None:
        extra["geometric tip"] = row["geometric_tip_point"]
    extra["mean position"] = row["mean_position_point"]
    return extra


def write_qc_figures(rows: Sequence[Mapping], folder: Path, lv_label: int, landmark: str,
                     model_name: str = "", progress: bool = True,
                     extra_points: Callable[[Mapping], Mapping] = baseline_points) -> list[str]:
    """One QC figure per case row (needs ``predicted_point`` or shows the baselines only).

    ``extra_points(row)``: the further named points of a row's figure (default: its baselines).
    """
    from tqdm import tqdm

    from nnunet_landmark.evaluation.plots import qc_figure

    pngs = []
    for row in tqdm(rows, desc="QC figures", disable=not progress):
        png = folder / f"fold_{row['fold']}_{row['case']}.png"
        qc_figure(row["image_file"], row["reference_label_file"], row["prediction_file"], row["reference_point"],
                  row.get("predicted_point"), png, lv_label=lv_label, extra_points=extra_points(row),
                  landmark_name=landmark,
                  title=f"{model_name + ': ' if model_name else ''}{row['case']} (fold {row['fold']})")
        pngs.append(str(png))
    return pngs
