"""Evaluate a prediction folder: Dice per label and landmark error (mm) per case, with summaries.

A prediction folder is what ``nnUNetv2_predict`` (or nnU-Net's ``fold_F/validation/``) writes:
``CASE.nii.gz`` segmentations on the original image grid and, for landmark models, ``CASE.mrk.json``
(3D Slicer, LPS mm) plus ``landmarks.csv`` (``case,name,x,y,z,i,j,k,confidence``). The reference is
an nnU-Net ``labelsTr`` folder and a folder of ``CASE.mrk.json`` (e.g. ``landmarksTr``) or a
``case,name,x,y,z`` CSV.

Outputs of ``evaluate_folder`` with ``output_prefix=P``: ``P.json`` (``per_case`` list and ``summary``
per label / landmark: mean, SD, median, min, max, n, n_nan) and ``P.csv`` (one row per case).

Any labels (nnU-Net regions too) and any number of landmarks; ``RawDataset`` reads a raw nnU-Net dataset
with ``landmarksTr`` for tools that need image headers and training landmarks (baselines, the study).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_landmark.metrics import LabelOrRegion, json_ready, score_case, summarize
from nnunet_landmark.evaluation.tables import write_evaluation_csv
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.landmark_files import LandmarkFileError, read_landmark_csv, read_landmark_table, read_markups
from nnunet_landmark.layout import LANDMARK_TABLE as PREDICTED_LANDMARK_TABLE
from nnunet_landmark.layout import LANDMARKS_FOLDER, MARKUPS_SUFFIX, atomic_write_json

CaseHook = Callable[[str, np.ndarray, ImageGeometry], Mapping]


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated together; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------- inputs
def read_dataset_json(path: str | os.PathLike) -> dict:
    """A dataset.json as a dict; an EvaluationError names the file when it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"{path}: cannot read the dataset.json ({e})") from e


def foreground_labels(dataset_json: Mapping, source: str = "dataset.json") -> "OrderedDict[str, LabelOrRegion]":
    """{name: value} of every label except background (0) and nnU-Net's ``ignore`` in a dataset.json's
    ``labels``; a region-based dataset gives regions (tuples of labels), evaluated as nnU-Net does."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise EvaluationError(f"{source}: no 'labels' dict; pass the labels to evaluate explicitly")
    out: "OrderedDict[str, LabelOrRegion]" = OrderedDict()
    for name, value in labels.items():
        if name == "ignore":
            continue
        if isinstance(value, (list, tuple)):
            value = tuple(int(v) for v in value)
            if value and any(v != 0 for v in value):
                out[str(name)] = value
        elif int(value) != 0:
            out[str(name)] = int(value)
    if not out:
        raise EvaluationError(f"{source}: 'labels' holds only background")
    return out


def ignore_label(dataset_json: Mapping | None) -> int | None:
    """nnU-Net's ignore label of a dataset.json, if it has one (its voxels count for no label)."""
    value = ((dataset_json or {}).get("labels") or {}).get("ignore")
    return None if value is None else int(value)


def load_label_map(path: str | os.PathLike) -> tuple[np.ndarray, ImageGeometry]:
    """A segmentation as an integer (z, y, x) array and its geometry."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise EvaluationError(f"{path}: cannot read the segmentation ({str(e).strip().splitlines()[-1]})") from e
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise EvaluationError(f"{path}: expected a 3D single-channel label image")
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise EvaluationError(f"{path}: the label image holds non-integer values; is it a probability map?")
        array = array.astype(np.int32)
    return array, ImageGeometry.from_image(image)


def check_same_grid(prediction_path, prediction: ImageGeometry, reference_path, reference: ImageGeometry) -> None:
    """An EvaluationError naming both files when a prediction is not on its reference's grid."""
    if not prediction.same_grid_as(reference):
        raise EvaluationError(
            f"{prediction_path}: its grid differs from the reference {reference_path} (prediction size "
            f"{prediction.size}, spacing {np.round(prediction.spacing, 4).tolist()}, origin "
            f"{np.round(prediction.origin, 3).tolist()}; reference size {reference.size}, spacing "
            f"{np.round(reference.spacing, 4).tolist()}, origin {np.round(reference.origin, 3).tolist()}). "
            f"Predictions must be exported on the original image grid (nnUNetv2_predict does this); check that "
            f"the reference folder belongs to the same dataset.")


class ReferenceLandmarks:
    """Reference landmarks from a folder of ``CASE.mrk.json`` or a ``case,name,x,y,z`` CSV (LPS mm)."""

    def __init__(self, source: str | os.PathLike):
        self.source = Path(source)
        self._table = None
        if self.source.is_file():
            self._table = read_landmark_csv(self.source)
        elif not self.source.is_dir():
            raise EvaluationError(f"{self.source}: neither a folder of CASE.mrk.json files nor a landmark CSV")

    def names(self, cases: Sequence[str]) -> list[str]:
        """Landmark names in first-seen order over the cases (used when no names are requested)."""
        names: list[str] = []
        for case in cases:
            for name in self.get(case):
                if name not in names:
                    names.append(name)
        return names

    def get(self, case: str) -> "OrderedDict[str, np.ndarray]":
        if self._table is not None:
            if case not in self._table:
                raise EvaluationError(f"{self.source}: no reference landmarks for case '{case}'")
            return self._table[case]
        path = self.source / f"{case}{MARKUPS_SUFFIX}"
        if not path.is_file():
            raise EvaluationError(f"{path}: missing; every evaluated case needs its reference landmarks")
        return read_markups(path)


def read_predicted_landmarks(prediction_folder: Path, case: str, table: Mapping | None
                             ) -> tuple["OrderedDict[str, np.ndarray]", dict[str, float]]:
    """A case's predicted landmarks (``CASE.mrk.json``, else its ``landmarks.csv`` rows) and confidences."""
    confidences: dict[str, float] = {}
    rows = (table or {}).get(case, [])
    for row in rows:
        try:
            confidences[row["name"]] = float(row.get("confidence", "nan"))
        except (TypeError, ValueError):
            confidences[row["name"]] = float("nan")
    path = prediction_folder / f"{case}{MARKUPS_SUFFIX}"
    if path.is_file():
        return read_markups(path, flagged=True), confidences
    if rows:
        return OrderedDict((r["name"], np.array([r["x"], r["y"], r["z"]])) for r in rows), confidences
    raise EvaluationError(f"{path}: missing (and no rows for '{case}' in {prediction_folder / PREDICTED_LANDMARK_TABLE}). "
                          f"Predict with a landmark model (-tr nnUNetTrainerLandmark), or evaluate the segmentation "
                          f"only by not passing reference landmarks.")


def find_cases(prediction_folder: Path, reference_labels_folder: Path, file_ending: str) -> list[str]:
    """Predicted cases: segmentation files with a reference beside them.

    A file without a reference is an error unless its name extends another case's name (``CASE_...``,
    e.g. an exported heatmap), which is then skipped.
    """
    stems = sorted(p.name[:-len(file_ending)] for p in prediction_folder.iterdir()
                   if p.is_file() and p.name.endswith(file_ending))
    cases = [s for s in stems if (reference_labels_folder / f"{s}{file_ending}").is_file()]
    orphans = [s for s in stems if s not in cases and not any(s.startswith(c + "_") for c in cases)]
    if orphans:
        raise EvaluationError(f"{prediction_folder}: no reference segmentation in {reference_labels_folder} for "
                              f"{[o + file_ending for o in orphans]}; is this the right reference folder?")
    if not cases:
        raise EvaluationError(f"{prediction_folder}: no predicted segmentation (*{file_ending}) with a reference "
                              f"in {reference_labels_folder}")
    return cases


def _resolve_dataset_json(dataset_json, prediction_folder: Path, reference_labels_folder: Path):
    if isinstance(dataset_json, Mapping):
        return dict(dataset_json), "the given dataset.json"
    if dataset_json is not None:
        return read_dataset_json(dataset_json), str(dataset_json)
    for candidate in (prediction_folder / "dataset.json", reference_labels_folder.parent / "dataset.json"):
        if candidate.is_file():
            return read_dataset_json(candidate), str(candidate)
    return None, None


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_folder(prediction_folder: str | os.PathLike, reference_labels_folder: str | os.PathLike,
                    reference_landmarks: str | os.PathLike | None = None,
                    labels: Mapping[str, int] | None = None, landmark_names: Sequence[str] | None = None,
                    output_prefix: str | os.PathLike | None = None, dataset_json: str | os.PathLike | Mapping | None = None,
                    cases: Sequence[str] | None = None, case_hook: CaseHook | None = None,
                    progress: bool = True) -> dict:
    """Dice per label and landmark error per landmark for every case of a prediction folder.

    ``labels``: {name: label or region}; default all foreground labels of ``dataset_json`` (a path or dict; when not
    given, ``dataset.json`` in the prediction folder or beside the reference labels folder is used).
    ``reference_landmarks``: folder of ``CASE.mrk.json`` or a CSV; ``None`` evaluates segmentations only.
    ``landmark_names``: default the dataset.json's ``"landmarks"``, else every name in the references.
    ``cases``: evaluate exactly these (each must have a prediction); default every predicted case.
    ``case_hook(case, predicted_labels_zyx, geometry)`` may add entries to each case's record (used for
    baselines that need the predicted segmentation). Writes ``<output_prefix>.json``/``.csv`` when given.
    Returns the JSON content (NaN kept as float NaN in memory).
    """
    prediction_folder = Path(prediction_folder)
    reference_labels_folder = Path(reference_labels_folder)
    for folder, what in ((prediction_folder, "prediction"), (reference_labels_folder, "reference labels")):
        if not folder.is_dir():
            raise EvaluationError(f"{folder}: the {what} folder does not exist")
    dataset, dataset_source = _resolve_dataset_json(dataset_json, prediction_folder, reference_labels_folder)
    if labels is None:
        if dataset is None:
            raise EvaluationError(f"which labels to evaluate? No dataset.json in {prediction_folder} or "
                                  f"{reference_labels_folder.parent}; pass labels (or -dataset_json FILE)")
        labels = foreground_labels(dataset, dataset_source)
    labels = OrderedDict((str(k), v if np.isscalar(v) else tuple(int(i) for i in v)) for k, v in labels.items())
    file_ending = (dataset or {}).get("file_ending", ".nii.gz")
    ignore = ignore_label(dataset)

    if cases is None:
        cases = find_cases(prediction_folder, reference_labels_folder, file_ending)
    else:
        missing = [c for c in cases if not (prediction_folder / f"{c}{file_ending}").is_file()]
        if missing:
            raise EvaluationError(f"{prediction_folder}: no prediction for case(s) {missing} "
                                  f"(expected {missing[0]}{file_ending})")
        cases = list(cases)

    references = ReferenceLandmarks(reference_landmarks) if reference_landmarks is not None else None
    if references is not None:
        if landmark_names is None:
            landmark_names = (dataset or {}).get("landmarks") or references.names(cases)
        landmark_names = list(landmark_names)
    else:
        landmark_names = []
    table_path = prediction_folder / PREDICTED_LANDMARK_TABLE
    predicted_table = None
    if landmark_names and table_path.is_file():
        predicted_table = {}
        for row in read_landmark_table(table_path):
            predicted_table.setdefault(row["case"], []).append(row)

    per_case = []
    for case in tqdm(cases, desc="Evaluating", disable=not progress):
        prediction_path = prediction_folder / f"{case}{file_ending}"
        reference_path = reference_labels_folder / f"{case}{file_ending}"
        if not reference_path.is_file():
            raise EvaluationError(f"{reference_path}: missing; the reference segmentation of case '{case}'")
        predicted, predicted_geometry = load_label_map(prediction_path)
        reference, reference_geometry = load_label_map(reference_path)
        check_same_grid(prediction_path, predicted_geometry, reference_path, reference_geometry)
        record = {"case": case, "prediction_file": str(prediction_path), "reference_file": str(reference_path)}
        if not landmark_names:
            record.update(score_case(reference, predicted, labels, ignore_label=ignore))
        else:
            reference_points = references.get(case)
            absent = [n for n in landmark_names if n not in reference_points]
            if absent:
                raise EvaluationError(f"{references.source}: case '{case}' lacks reference landmark(s) {absent} "
                                      f"(has {list(reference_points)})")
            try:
                predicted_points, confidences = read_predicted_landmarks(prediction_folder, case, predicted_table)
            except LandmarkFileError as e:
                raise EvaluationError(str(e)) from e
            absent = [n for n in landmark_names if n not in predicted_points]
            if absent:
                raise EvaluationError(f"{prediction_folder / (case + MARKUPS_SUFFIX)}: lacks predicted landmark(s) "
                                      f"{absent} (has {list(predicted_points)})")
            record.update(score_case(reference, predicted, labels, predicted_points, reference_points,
                                     landmark_names, ignore))
            record["predicted_landmarks"] = {n: predicted_points[n].tolist() for n in landmark_names}
            record["reference_landmarks"] = {n: np.asarray(reference_points[n]).tolist() for n in landmark_names}
            record["confidence"] = {n: confidences.get(n, float("nan")) for n in landmark_names}
        if case_hook is not None:
            record.update(case_hook(case, predicted, predicted_geometry))
        per_case.append(record)

    results = {
        "prediction_folder": str(prediction_folder),
        "reference_labels_folder": str(reference_labels_folder),
        "reference_landmarks": None if reference_landmarks is None else str(reference_landmarks),
        "labels": dict(labels),
        "landmarks": landmark_names,
        "per_case": per_case,
        "summary": {
            "dice": {name: summarize(r["dice"][name] for r in per_case) for name in labels},
            "landmark_error_mm": {n: summarize(r["landmark_error_mm"][n] for r in per_case) for n in landmark_names},
        },
    }
    if output_prefix is not None:
        write_evaluation(results, output_prefix)
    return results


def write_evaluation(results: Mapping, output_prefix: str | os.PathLike) -> tuple[Path, Path]:
    """``<prefix>.json`` (everything, NaN as null) and ``<prefix>.csv`` (one row per case)."""
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_name(prefix.name + ".json")
    csv_path = prefix.with_name(prefix.name + ".csv")
    atomic_write_json(json_ready(results), json_path)
    write_evaluation_csv(results, csv_path)
    return json_path, csv_path


# ---------------------------------------------------------------------------------------------- raw dataset
class RawDataset:
    """The parts of a raw nnU-Net dataset with ``landmarksTr`` that evaluation reads: labels, every case's
    landmarks and image header (both cached)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        dataset_json = self.folder / "dataset.json"
        if not dataset_json.is_file():
            raise EvaluationError(f"{dataset_json}: missing; is {self.folder} an nnU-Net raw dataset folder?")
        self.dataset_json = read_dataset_json(dataset_json)
        self.file_ending = self.dataset_json.get("file_ending", ".nii.gz")
        self.labels_folder = self.folder / "labelsTr"
        self.landmarks_folder = self.folder / LANDMARKS_FOLDER
        if not self.landmarks_folder.is_dir():
            raise EvaluationError(f"{self.landmarks_folder}: missing; the reference landmarks (CASE.mrk.json) of the "
                                  f"raw dataset are needed (see nnUNetv2_convert_MMWHS)")
        self.references = ReferenceLandmarks(self.landmarks_folder)
        self._geometry: dict[str, ImageGeometry] = {}
        self._landmarks: dict[str, OrderedDict] = {}

    def label_name(self, value: int) -> str:
        """The dataset.json name of a label value (``label_V`` when it has none)."""
        for name, v in (self.dataset_json.get("labels") or {}).items():
            if not isinstance(v, (list, tuple)) and int(v) == value:
                return str(name)
        return f"label_{value}"

    def image_path(self, case: str) -> Path:
        """The case's first image channel, else its label file (same header)."""
        image = self.folder / "imagesTr" / f"{case}_0000{self.file_ending}"
        return image if image.is_file() else self.labels_folder / f"{case}{self.file_ending}"

    def geometry(self, case: str) -> ImageGeometry:
        """The case's image header."""
        if case not in self._geometry:
            path = self.image_path(case)
            if not path.is_file():
                raise EvaluationError(f"{path}: missing; neither the image nor the label of case '{case}' exists")
            self._geometry[case] = ImageGeometry.from_file(path)
        return self._geometry[case]

    def landmarks(self, case: str) -> "OrderedDict[str, np.ndarray]":
        """Every reference landmark of a case (world LPS mm)."""
        if case not in self._landmarks:
            self._landmarks[case] = self.references.get(case)
        return self._landmarks[case]

    def point(self, case: str, name: str) -> np.ndarray:
        """One reference landmark of a case (world LPS mm)."""
        points = self.landmarks(case)
        if name not in points:
            raise EvaluationError(f"{self.landmarks_folder / (case + MARKUPS_SUFFIX)}: no landmark '{name}' "
                                  f"(has {list(points)})")
        return points[name]
