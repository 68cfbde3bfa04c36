"""Per-case metrics and their summaries: Dice per label, landmark error in world mm, summary statistics.

Conventions:

* Dice of a label whose reference AND prediction are both empty is NaN (undefined, not perfect): it is
  left out of means and counted separately as ``n_nan`` in the summary. An empty reference with a
  non-empty prediction (or the reverse) is Dice 0.
* Landmark errors are Euclidean distances between world (LPS mm) points, so they are in mm whatever
  the voxel spacing.
* SD is the sample standard deviation (``ddof=1``); NaN for fewer than two values. JSON files store
  NaN as ``null``.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

SUMMARY_KEYS = ("mean", "sd", "median", "min", "max", "n", "n_nan")


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape; NaN when both are empty."""
    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    if reference.shape != prediction.shape:
        raise ValueError(f"masks differ in shape: reference {reference.shape}, prediction {prediction.shape}")
    total = int(np.count_nonzero(reference)) + int(np.count_nonzero(prediction))
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(reference & prediction)) / total


def dice_per_label(reference_labels: np.ndarray, predicted_labels: np.ndarray,
                   labels: Mapping[str, int]) -> "dict[str, float]":
    """{label name: Dice} for integer label maps; see ``dice`` for empty labels."""
    return {name: dice(reference_labels == value, predicted_labels == value) for name, value in labels.items()}


def landmark_error_mm(predicted, reference) -> float:
    """Euclidean distance between two world points (mm)."""
    predicted = np.asarray(predicted, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if predicted.shape != (3,) or reference.shape != (3,):
        raise ValueError(f"expected two 3D points, got shapes {predicted.shape} and {reference.shape}")
    return float(np.linalg.norm(predicted - reference))


def summarize(values: Iterable[float | None]) -> "dict[str, float | int]":
    """mean, SD (sample), median, min, max over the finite values; n counts them, n_nan the NaN/None ones."""
    raw = [float("nan") if v is None else float(v) for v in values]
    finite = np.asarray([v for v in raw if math.isfinite(v)], dtype=np.float64)
    n_nan = len(raw) - len(finite)
    if len(finite) == 0:
        return {"mean": float("nan"), "sd": float("nan"), "median": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0, "n_nan": n_nan}
    return {"mean": float(finite.mean()), "sd": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
            "median": float(np.median(finite)), "min": float(finite.min()), "max": float(finite.max()),
            "n": int(len(finite)), "n_nan": n_nan}


def json_ready(obj):
    """A copy of nested dicts/lists with NaN -> None and NumPy scalars/arrays -> Python types (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def format_number(value, digits: int = 3) -> str:
    """A table cell: fixed digits, '' for None, 'NaN' for NaN."""
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    value = float(value)
    return "NaN" if math.isnan(value) else f"{value:.{digits}f}"
