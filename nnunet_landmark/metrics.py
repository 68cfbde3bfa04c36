"""Per-case scores for any labels and any landmarks, their summaries and the paired test between two methods.

Dice comes from nnU-Net's own evaluation code (``region_or_label_to_mask``, ``compute_tp_fp_fn_tn``), so
a label may also be an nnU-Net region (a tuple of labels) and an ignore label is left out as nnU-Net does.

Conventions:

* Dice of a label whose reference AND prediction are both empty is NaN (undefined, not perfect; nnU-Net
  agrees): it is left out of means and counted separately as ``n_nan`` in the summary. An empty reference
  with a non-empty prediction (or the reverse) is Dice 0.
* Landmark errors are Euclidean distances between world (LPS mm) points, so they are in mm whatever
  the voxel spacing.
* SD is the sample standard deviation (``ddof=1``); NaN for fewer than two values. JSON files store
  NaN as ``null``.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence, Tuple, Union

import numpy as np

MIN_NONZERO_FOR_SIGNIFICANCE = 6  # the smallest two-sided signed-rank p-value is 2 / 2**n: below 0.05 from n = 6
LabelOrRegion = Union[int, Tuple[int, ...]]


def _nnunet_metrics():
    # imported on first use: nnU-Net's evaluation module imports torch (via its plans handler), which the
    # console scripts' --help and this package's import should not wait for
    from nnunetv2.evaluation import evaluate_predictions

    return evaluate_predictions


def _dice_from_counts(tp, fp, fn) -> float:
    return float("nan") if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))


def dice(reference: np.ndarray, prediction: np.ndarray, ignore_mask: np.ndarray | None = None) -> float:
    """Dice of two boolean masks of the same shape; NaN when both are empty."""
    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    if reference.shape != prediction.shape:
        raise ValueError(f"masks differ in shape: reference {reference.shape}, prediction {prediction.shape}")
    tp, fp, fn, _ = _nnunet_metrics().compute_tp_fp_fn_tn(reference, prediction, ignore_mask)
    return _dice_from_counts(tp, fp, fn)


def dice_per_label(reference_labels: np.ndarray, predicted_labels: np.ndarray,
                   labels: Mapping[str, LabelOrRegion], ignore_label: int | None = None) -> "dict[str, float]":
    """{label name: Dice} for integer label maps; a value may be a label or a region (tuple of labels).

    Voxels whose reference is ``ignore_label`` count for no label (nnU-Net's ignore label).
    """
    reference_labels, predicted_labels = np.asarray(reference_labels), np.asarray(predicted_labels)
    if reference_labels.shape != predicted_labels.shape:
        raise ValueError(f"label maps differ in shape: reference {reference_labels.shape}, "
                         f"prediction {predicted_labels.shape}")
    nnunet = _nnunet_metrics()
    ignore_mask = None if ignore_label is None else reference_labels == ignore_label
    out = {}
    for name, value in labels.items():
        value = value if np.isscalar(value) else tuple(value)
        tp, fp, fn, _ = nnunet.compute_tp_fp_fn_tn(nnunet.region_or_label_to_mask(reference_labels, value),
                                                   nnunet.region_or_label_to_mask(predicted_labels, value), ignore_mask)
        out[name] = _dice_from_counts(tp, fp, fn)
    return out


def landmark_error_mm(predicted, reference) -> float:
    """Euclidean distance between two world points (mm)."""
    predicted = np.asarray(predicted, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if predicted.shape != (3,) or reference.shape != (3,):
        raise ValueError(f"expected two 3D points, got shapes {predicted.shape} and {reference.shape}")
    return float(np.linalg.norm(predicted - reference))


def landmark_errors_mm(predicted: Mapping[str, Sequence[float]], reference: Mapping[str, Sequence[float]],
                       names: Sequence[str] | None = None) -> "dict[str, float]":
    """{name: error in mm} for the named landmarks (default: every reference landmark)."""
    names = list(reference) if names is None else list(names)
    for points, what in ((reference, "reference"), (predicted, "predicted")):
        absent = [n for n in names if n not in points]
        if absent:
            raise ValueError(f"no {what} landmark(s) {absent} (has {list(points)})")
    return {n: landmark_error_mm(predicted[n], reference[n]) for n in names}


def score_case(reference_labels: np.ndarray, predicted_labels: np.ndarray, labels: Mapping[str, LabelOrRegion],
               predicted_points: Mapping[str, Sequence[float]] | None = None,
               reference_points: Mapping[str, Sequence[float]] | None = None,
               landmark_names: Sequence[str] | None = None, ignore_label: int | None = None) -> dict:
    """One case's scores: ``{"dice": {label: Dice}, "landmark_error_mm": {landmark: mm}}``.

    Landmark errors only when both point sets are given (``landmark_names`` default: every reference one).
    """
    scores = {"dice": dice_per_label(reference_labels, predicted_labels, labels, ignore_label)}
    if predicted_points is not None and reference_points is not None:
        scores["landmark_error_mm"] = landmark_errors_mm(predicted_points, reference_points, landmark_names)
    return scores


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


SUMMARY_FORMS = {
    "full": "{mean} ± {sd} (median {median}, max {max})",
    "mean_sd": "{mean} ± {sd}",
    "mean_median_max": "{mean} / {median} / {max}",
    "mean_max": "{mean} / {max}",
}


def format_summary(values: Iterable[float | None], form: str = "full", digits: int = 2) -> str:
    """The summary (``summarize``) of the finite values as text in one of ``SUMMARY_FORMS``; "n/a" without any. NaN
    values are left out (callers say how many: ``summarize(...)["n_nan"]``)."""
    s = summarize(values)
    if s["n"] == 0:
        return "n/a"
    return SUMMARY_FORMS[form].format(**{k: f"{s[k]:.{digits}f}" for k in ("mean", "sd", "median", "max")})


def summarize_columns(rows: Sequence[Mapping], columns: Sequence[str]) -> dict:
    """{column: summarize(that column over the rows)}; a row without the column counts as NaN."""
    return {c: summarize(r.get(c) for r in rows) for c in columns}


def paired_wilcoxon(first: Sequence[float], second: Sequence[float]) -> dict:
    """Wilcoxon signed-rank test of ``first - second`` (two-sided, scipy's defaults).

    Pairs with a NaN on either side are dropped. Zero differences are dropped by the test
    (``zero_method="wilcox"``). Special cases, noted in ``note``:

    * no pairs: ``p_value`` None;
    * all differences zero: ``p_value`` 1.0 without calling scipy (nothing to test);
    * fewer than 6 non-zero differences: scipy's exact p-value is reported, but ``underpowered`` is True:
      the smallest possible two-sided p-value is 2 / 2**n (0.0625 for n = 5), so p < 0.05 is impossible.
    """
    from scipy import stats

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
