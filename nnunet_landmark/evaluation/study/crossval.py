"""Cross-validation summary in the layout of the paper's Table 2, with two baselines per case.

For every fold ``F`` of ``RESULTS/TRAINER__PLANS__CONFIG/fold_F/validation/`` the held-out cases
(nnU-Net's "val" = the paper's test images) are evaluated against the raw dataset: Dice of the LV label
and the landmark error in mm. Per case two baselines use only what that fold could know:

* mean position: ``MeanPositionBaseline`` fitted on the fold's training cases (``splits_final.json``,
  their ``landmarksTr`` points and image headers), applied to the held-out image's header;
* geometric tip: ``apex_from_segmentation`` on the fold's own predicted segmentation.

Writes ``crossval_summary.json`` (everything), ``crossval_summary.csv`` (one row per case, then rows
``mean``, ``sd``, ``median``, ``min``, ``max`` in the fold column) and ``crossval_summary.md``.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnunet_landmark.baselines import BaselineError, MeanPositionBaseline, apex_from_segmentation
from nnunet_landmark.evaluation.evaluate import (MARKUPS_SUFFIX, EvaluationError, evaluate_folder, find_cases,
                                                 read_dataset_json)
from nnunet_landmark.evaluation.metrics import format_number, json_ready, landmark_error_mm, summarize
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.landmark_files import read_markups

PAPER = {"dice": 0.909, "error_mm": 11.28,
         "source": "paper: MONAI U-Net, 10-fold CV on 20 MM-WHS CT, 1000 epochs (Dice 0.909, apex 11.28 mm)"}
STATISTICS = ("mean", "sd", "median", "min", "max")
CASE_COLUMNS = ("fold", "case", "dice", "error_mm", "confidence", "geometric_tip_error_mm",
                "mean_position_error_mm")


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


class RawDataset:
    """The parts of a raw dataset the evaluation reads: labels, landmarks, image headers (cached)."""

    def __init__(self, folder: str | os.PathLike, landmark: str):
        self.folder = Path(folder)
        dataset_json = self.folder / "dataset.json"
        if not dataset_json.is_file():
            raise EvaluationError(f"{dataset_json}: missing; is {self.folder} an nnU-Net raw dataset folder?")
        self.dataset_json = read_dataset_json(dataset_json)
        self.file_ending = self.dataset_json.get("file_ending", ".nii.gz")
        self.landmark = landmark
        self.labels_folder = self.folder / "labelsTr"
        self.landmarks_folder = self.folder / "landmarksTr"
        if not self.landmarks_folder.is_dir():
            raise EvaluationError(f"{self.landmarks_folder}: missing; the reference landmarks (CASE.mrk.json) of the "
                                  f"raw dataset are needed (see nnUNetv2_convert_MMWHS)")
        self._geometry: dict[str, ImageGeometry] = {}
        self._point: dict[str, np.ndarray] = {}

    def label_name(self, value: int) -> str:
        for name, v in (self.dataset_json.get("labels") or {}).items():
            if not isinstance(v, (list, tuple)) and int(v) == value:
                return str(name)
        return f"label_{value}"

    def image_path(self, case: str) -> Path:
        image = self.folder / "imagesTr" / f"{case}_0000{self.file_ending}"
        return image if image.is_file() else self.labels_folder / f"{case}{self.file_ending}"

    def geometry(self, case: str) -> ImageGeometry:
        if case not in self._geometry:
            path = self.image_path(case)
            if not path.is_file():
                raise EvaluationError(f"{path}: missing; neither the image nor the label of case '{case}' exists")
            self._geometry[case] = ImageGeometry.from_file(path)
        return self._geometry[case]

    def point(self, case: str) -> np.ndarray:
        if case not in self._point:
            path = self.landmarks_folder / f"{case}{MARKUPS_SUFFIX}"
            if not path.is_file():
                raise EvaluationError(f"{path}: missing; every case needs its reference landmarks")
            points = read_markups(path)
            if self.landmark not in points:
                raise EvaluationError(f"{path}: no landmark '{self.landmark}' (has {list(points)})")
            self._point[case] = points[self.landmark]
        return self._point[case]


def evaluate_fold_cases(results_folder: str | os.PathLike, raw: RawDataset, splits: list[dict], fold: int,
                        lv_label: int = 1, with_landmarks: bool = True, output_folder: Path | None = None,
                        progress: bool = True) -> list[dict]:
    """Per-case rows (see ``CASE_COLUMNS`` plus the points and file paths) of one fold's validation folder."""
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
    mean_position = MeanPositionBaseline().fit([(raw.geometry(c), raw.point(c)) for c in splits[fold]["train"]])

    def baselines(case: str, predicted_labels: np.ndarray, geometry: ImageGeometry) -> dict:
        reference = raw.point(case)
        out = {"mean_position_point": mean_position.predict(geometry).tolist()}
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
        return out

    prefix = None if output_folder is None else output_folder / "folds" / f"fold_{fold}"
    label_name = raw.label_name(lv_label)
    results = evaluate_folder(validation, raw.labels_folder, raw.landmarks_folder if with_landmarks else None,
                              labels={label_name: lv_label}, landmark_names=[raw.landmark] if with_landmarks else None,
                              output_prefix=prefix, dataset_json=raw.dataset_json, cases=val_cases,
                              case_hook=baselines, progress=progress)
    rows = []
    for record in results["per_case"]:
        row = {"fold": fold, "case": record["case"], "dice": record["dice"][label_name],
               "error_mm": record["landmark_error_mm"][raw.landmark] if with_landmarks else None,
               "confidence": record["confidence"][raw.landmark] if with_landmarks else None,
               "predicted_point": record["predicted_landmarks"][raw.landmark] if with_landmarks else None,
               "prediction_file": record["prediction_file"], "reference_label_file": record["reference_file"],
               "image_file": str(raw.image_path(record["case"]))}
        row.update({k: v for k, v in record.items() if k.startswith(("mean_position", "geometric_tip", "reference_point"))})
        rows.append(row)
    return rows


def summarize_rows(rows: Sequence[Mapping], columns: Sequence[str]) -> dict:
    return {c: summarize(r.get(c) for r in rows) for c in columns}


METRIC_COLUMNS = ("dice", "error_mm", "geometric_tip_error_mm", "mean_position_error_mm")


def summary_from_rows(rows: Sequence[Mapping], results_folder: str | os.PathLike, raw: RawDataset,
                      folds: Sequence[int], lv_label: int) -> dict:
    """The cross-validation summary (the JSON content) of per-case rows from ``evaluate_fold_cases``."""
    return {
        "results_folder": str(results_folder), "raw_dataset_folder": str(raw.folder), "lv_label": lv_label,
        "lv_label_name": raw.label_name(lv_label), "landmark": raw.landmark, "folds": list(folds),
        "per_case": list(rows),
        "per_fold": {str(f): summarize_rows([r for r in rows if r["fold"] == f], METRIC_COLUMNS) for f in folds},
        "overall": summarize_rows(rows, METRIC_COLUMNS),
        "paper": PAPER,
    }


def crossval_summary(results_folder: str | os.PathLike, raw_dataset_folder: str | os.PathLike,
                     folds: Sequence[int] | None = None, lv_label: int = 1, landmark: str = "apex",
                     output_folder: str | os.PathLike | None = None, splits_file: str | os.PathLike | None = None,
                     qc: bool = False, progress: bool = True) -> dict:
    """Evaluate every fold's validation folder; write the Table-2 layout as JSON, CSV and Markdown.

    ``folds``: default every ``fold_F`` with a ``validation/`` folder. ``output_folder``: default
    ``<results_folder>/crossval_summary``. ``qc=True`` also writes a QC figure per case under ``qc/``.
    Returns the JSON content.
    """
    results_folder = Path(results_folder)
    output = Path(output_folder) if output_folder is not None else results_folder / "crossval_summary"
    folds = list(folds) if folds is not None else find_folds(results_folder)
    raw = RawDataset(raw_dataset_folder, landmark)
    splits = read_splits(raw_dataset_folder, splits_file)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for fold in folds:
        rows += evaluate_fold_cases(results_folder, raw, splits, fold, lv_label, True, output, progress)
    summary = summary_from_rows(rows, results_folder, raw, folds, lv_label)
    if qc:
        summary["qc_pngs"] = write_qc_figures(rows, output / "qc", lv_label, landmark, progress=progress)
    write_crossval_files(summary, output)
    summary["output_folder"] = str(output)
    return summary


def write_qc_figures(rows: Sequence[Mapping], folder: Path, lv_label: int, landmark: str,
                     model_name: str = "", progress: bool = True) -> list[str]:
    """One QC figure per case row (needs ``predicted_point`` or shows the baselines only)."""
    from tqdm import tqdm

    from nnunet_landmark.evaluation.qc import qc_figure

    pngs = []
    for row in tqdm(rows, desc="QC figures", disable=not progress):
        extra = OrderedDict()
        if row.get("geometric_tip_point") is not None:
            extra["geometric tip"] = row["geometric_tip_point"]
        extra["mean position"] = row["mean_position_point"]
        png = folder / f"fold_{row['fold']}_{row['case']}.png"
        qc_figure(row["image_file"], row["reference_label_file"], row["prediction_file"], row["reference_point"],
                  row.get("predicted_point"), png, lv_label=lv_label, extra_points=extra, landmark_name=landmark,
                  title=f"{model_name + ': ' if model_name else ''}{row['case']} (fold {row['fold']})")
        pngs.append(str(png))
    return pngs


def table2_rows(summary: Mapping) -> list[list[str]]:
    """The Table-2 layout as text cells: one row per held-out image, then mean, SD, median, min, max."""
    cells = []
    for r in summary["per_case"]:
        cells.append([str(r["fold"]), r["case"], format_number(r["dice"], 3), format_number(r["error_mm"], 2),
                      format_number(r["geometric_tip_error_mm"], 2), format_number(r["mean_position_error_mm"], 2)])
    overall = summary["overall"]
    for statistic in STATISTICS:
        cells.append([statistic.upper() if statistic == "sd" else statistic.capitalize(), "",
                      format_number(overall["dice"][statistic], 3), format_number(overall["error_mm"][statistic], 2),
                      format_number(overall["geometric_tip_error_mm"][statistic], 2),
                      format_number(overall["mean_position_error_mm"][statistic], 2)])
    return cells


TABLE2_HEADER = ["Fold", "Image", "Dice", "L2 (mm)", "Geometric tip (mm)", "Mean position (mm)"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], bold_from: int | None = None) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for n, row in enumerate(rows):
        if bold_from is not None and n >= bold_from:
            row = [f"**{c}**" if c else c for c in row]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def table2_markdown(summary: Mapping) -> str:
    landmark = summary["landmark"]
    header = [h.replace("L2", f"L2 {landmark}") for h in TABLE2_HEADER]
    table = markdown_table(header, table2_rows(summary), bold_from=len(summary["per_case"]))
    overall = summary["overall"]
    n_tip_missing = overall["geometric_tip_error_mm"]["n_nan"]
    notes = [f"Dice: label {summary['lv_label']} ({summary['lv_label_name']}); L2: Euclidean distance between the "
             f"predicted and reference {landmark} in world mm. SD is the sample SD over all held-out images.",
             "Baselines per case, from information available to its fold only: geometric tip = tapered end of the "
             "fold's predicted LV; mean position = mean offset from the image centre over the fold's training cases.",
             f"Paper (Table 2): mean Dice {PAPER['dice']}, mean apex error {PAPER['error_mm']} mm."]
    if n_tip_missing:
        notes.append(f"{n_tip_missing} case(s) without a geometric tip (empty predicted LV) are left out of its "
                     f"statistics.")
    return table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def write_crossval_files(summary: Mapping, output: Path) -> None:
    (output / "crossval_summary.json").write_text(json.dumps(json_ready(summary), indent=2) + "\n")
    with open(output / "crossval_summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CASE_COLUMNS)
        for r in summary["per_case"]:
            writer.writerow([r["fold"], r["case"]] + [_cell(r[c]) for c in CASE_COLUMNS[2:]])
        for statistic in STATISTICS:
            writer.writerow([statistic, ""] + [_cell(summary["overall"][c][statistic]) if c != "confidence" else ""
                                               for c in CASE_COLUMNS[2:]])
    text = (f"# Cross-validation: {summary['results_folder']}\n\n"
            f"{len(summary['per_case'])} held-out images in {len(summary['folds'])} fold(s) "
            f"({', '.join(str(f) for f in summary['folds'])}).\n\n" + table2_markdown(summary))
    (output / "crossval_summary.md").write_text(text)


def _cell(value) -> str:
    if value is None:
        return ""
    value = float(value)
    return "" if np.isnan(value) else repr(value)
