"""Decoding a predicted heatmap: the landmark's position with sub-voxel refinement, and how confident it is.

Decoding finds the extreme voxel, then refines it below the voxel size: for ``log_distance`` by inverting the
encoding to distances around the extremum and solving the least-squares multilateration
``argmin_p sum_i (|x_i - p| - d_i)^2``; for the peak encodings by a per-axis parabola through the log values
(exact for a Gaussian). Coordinates are voxel indices of the array that is decoded; ``spacing`` gives mm per voxel
along each array axis. The search makes no full-volume copy (float16 logits from nnU-Net are searched in place).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from nnunet_landmark.heatmap_targets import HeatmapEncoding


@dataclass(frozen=True)
class DecodedLandmark:
    position: np.ndarray  # refined voxel index (float, array axes)
    voxel: tuple[int, ...]  # the extreme voxel
    value: float  # heatmap value at the extreme voxel
    confidence: float  # in [0, 1]: 1 for a sharp heatmap whose extremum says "here"; 0 for a flat one


def _extreme_voxel(heatmap: np.ndarray, kind: str) -> tuple[int, ...]:
    flat = np.argmin(heatmap) if kind == "log_distance" else np.argmax(heatmap)
    return tuple(int(i) for i in np.unravel_index(flat, heatmap.shape))


def _neighbourhood(shape, center, radius):
    lo = [max(0, c - radius) for c in center]
    hi = [min(s, c + radius + 1) for s, c in zip(shape, center)]
    return tuple(slice(a, b) for a, b in zip(lo, hi)), np.asarray(lo)


def _refine_multilateration(values: np.ndarray, origin: np.ndarray, start: np.ndarray, spacing: np.ndarray,
                            encoding: HeatmapEncoding, iterations: int = 20) -> np.ndarray:
    """Least-squares point whose distances to the voxels of ``values`` match the decoded distances."""
    distances = encoding.decode_distance(values).ravel()
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij"), axis=-1).reshape(-1, values.ndim)
    points_mm = (grid + origin) * spacing
    # trust the near voxels most: the log encoding is steep (informative) near the landmark, flat far away
    weights = 1.0 / (1.0 + distances / max(float(spacing.max()), 1e-6)) ** 2
    p = start * spacing
    for _ in range(iterations):
        diff = p - points_mm
        norm = np.linalg.norm(diff, axis=1)
        valid = norm > 1e-9
        if valid.sum() < values.ndim + 1:
            break
        jac = diff[valid] / norm[valid, None]
        residual = norm[valid] - distances[valid]
        w = weights[valid]
        step, *_ = np.linalg.lstsq(jac * np.sqrt(w)[:, None], -residual * np.sqrt(w), rcond=None)
        p = p + step
        if np.linalg.norm(step) < 1e-7:
            break
    return p / spacing


def _block_reduce(array: np.ndarray, factor: int, reduce) -> np.ndarray:
    """``reduce`` ("min"/"max") over non-overlapping factor^3 blocks; the edge remainder forms smaller blocks."""
    if factor == 1:
        return array
    padded_shape = [int(np.ceil(s / factor)) * factor for s in array.shape]
    fill = np.inf if reduce == "min" else -np.inf
    padded = np.full(padded_shape, fill, dtype=np.float32)
    padded[tuple(slice(0, s) for s in array.shape)] = array
    view = padded.reshape([v for s in padded_shape for v in (s // factor, factor)])
    axes = tuple(range(1, view.ndim, 2))
    return view.min(axis=axes) if reduce == "min" else view.max(axis=axes)


def _candidate_voxels(search: np.ndarray, kind: str, count: int) -> list[tuple[int, ...]]:
    """The ``count`` most extreme local extrema, each as the extreme voxel of its block (~1M blocks at most)."""
    from scipy import ndimage

    factor = max(1, int(np.ceil((search.size / 1e6) ** (1 / search.ndim))))
    reduce = "min" if kind == "log_distance" else "max"
    pooled = _block_reduce(np.asarray(search, dtype=np.float32), factor, reduce)
    filtered = (ndimage.minimum_filter if reduce == "min" else ndimage.maximum_filter)(pooled, size=3, mode="nearest")
    peaks = np.argwhere((pooled == filtered) & np.isfinite(pooled))
    order = np.argsort(pooled[tuple(peaks.T)])
    if reduce == "max":
        order = order[::-1]
    candidates = []
    for block in peaks[order[:count]]:
        lo = block * factor
        window = tuple(slice(l, min(s, l + factor)) for l, s in zip(lo, search.shape))
        local = search[window]
        inner = np.argmin(local) if reduce == "min" else np.argmax(local)
        candidates.append(tuple(int(v) for v in np.unravel_index(inner, local.shape) + lo))
    return candidates


def _distance_consistency(search: np.ndarray, candidates: list, spacing: np.ndarray, encoding: HeatmapEncoding,
                          already_sigmoid: bool, samples: int = 40_000) -> np.ndarray:
    """How badly each candidate explains the whole heatmap as a distance map (weighted mean |residual|, mm)."""
    stride = max(1, int(np.ceil((search.size / samples) ** (1 / search.ndim))))
    sub = np.asarray(search[tuple(slice(None, None, stride) for _ in search.shape)], dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(0, n, stride) for n in search.shape], indexing="ij"), -1)
    keep = np.isfinite(sub)
    values = sub[keep]
    if not already_sigmoid:
        values = 1.0 / (1.0 + np.exp(-values))
    distances = encoding.decode_distance(values)
    points = grid[keep] * spacing
    weights = 1.0 / (1.0 + distances / 10.0)
    costs = []
    for c in candidates:
        residual = np.abs(np.linalg.norm(points - np.asarray(c) * spacing, axis=1) - distances)
        costs.append(float(np.sum(weights * residual) / np.sum(weights)))
    return np.asarray(costs)


def _refine_parabola(heatmap: np.ndarray, voxel: tuple[int, ...], take_log: bool = True,
                     maximum: bool = True) -> np.ndarray:
    """Per-axis vertex of the parabola through the values at voxel-1, voxel, voxel+1.

    On log values of a maximum it is exact for a Gaussian; on plain values of a minimum it refines a
    distance map whose tip the network has rounded off (where multilateration has nothing to fit).
    """
    position = np.asarray(voxel, dtype=np.float64)
    sign = 1.0 if maximum else -1.0
    for axis, v in enumerate(voxel):
        if v == 0 or v == heatmap.shape[axis] - 1:
            continue
        idx = list(voxel)
        samples = []
        for offset in (-1, 0, 1):
            idx[axis] = v + offset
            value = float(heatmap[tuple(idx)])
            samples.append(sign * (math.log(max(value, 1e-12)) if take_log else value))
        denominator = samples[0] - 2 * samples[1] + samples[2]
        if denominator < -1e-12:
            position[axis] += float(np.clip(0.5 * (samples[0] - samples[2]) / denominator, -0.5, 0.5))
    return position


SEARCH_SLAB_VOXELS = 1 << 18  # voxels per slab when a heatmap is searched slab by slab (memory-light)
_HALF_INF = 0x7C00  # float16 bit patterns: +inf; +NaN lie above it (as int16), -NaN above 0xFC00 (as uint16)
_HALF_MINUS_ZERO = 0x8000


def valid_at(valid, shape: tuple[int, ...], index: tuple) -> np.ndarray:
    """``valid`` (an array broadcastable to ``shape``, or an object indexable like the full mask) at ``index``."""
    if isinstance(valid, (np.ndarray, list, tuple, bool)):
        return np.broadcast_to(np.asarray(valid, dtype=bool), shape)[index]
    return np.asarray(valid[index], dtype=bool)


def _first_extreme_index(heatmap: np.ndarray, maximum: bool) -> int | None:
    """Flat index ``np.argmax`` / ``np.argmin`` returns, without copying the heatmap; None for the cases only an
    exact slow search settles (NaN present, or an extremum of zero that -0.0 might tie).

    float16 has no fast reductions in numpy, so its bit patterns are searched as integers: non-negative floats
    order like their int16 patterns, negative ones like their uint16 patterns, both without a copy.
    """
    if heatmap.dtype != np.float16:
        index = int(np.argmax(heatmap) if maximum else np.argmin(heatmap))
        value = heatmap.flat[index]
        return None if (heatmap.dtype.kind == "f" and np.isnan(value)) else index
    signed, unsigned = heatmap.view(np.int16), heatmap.view(np.uint16)
    largest = int(np.argmax(signed))  # the largest non-negative float, if any
    most_negative = int(np.argmax(unsigned))  # the most negative float, if any
    top, bottom = int(signed.flat[largest]), int(unsigned.flat[most_negative])
    if top > _HALF_INF or bottom > 0xFC00:  # NaN: numpy would return the first NaN
        return None
    if maximum:
        if top > 0:
            return largest
        if top < 0:  # all negative: the maximum is the negative closest to zero
            return int(np.argmin(unsigned))
        return None
    if bottom > _HALF_MINUS_ZERO:
        return most_negative
    if bottom < _HALF_MINUS_ZERO:  # no negative value: the minimum is the smallest non-negative
        return int(np.argmin(signed))
    return None


def _masked_search(heatmap: np.ndarray, valid, kind: str, slab_voxels: int = SEARCH_SLAB_VOXELS):
    """(extreme voxel, far value) of ``np.where(valid, heatmap, worst)`` exactly as a whole-volume search finds
    them (first occurrence, NaN first), slab by slab along the first axis so that no full-volume copy is made."""
    minimum = kind == "log_distance"
    worst = np.inf if minimum else -np.inf
    work_dtype = np.result_type(heatmap.dtype, np.float32)  # float16 -> float32 is exact
    rows = max(1, slab_voxels // max(1, int(np.prod(heatmap.shape[1:]))))
    best_index, best_value, far = 0, None, -np.inf if minimum else np.inf
    for start in range(0, heatmap.shape[0], rows):
        box = (slice(start, start + rows),)
        values = np.array(heatmap[box], dtype=work_dtype)
        if valid is not None:
            np.copyto(values, worst, where=~valid_at(valid, heatmap.shape, box))
        index = int(np.argmin(values) if minimum else np.argmax(values))
        value = values.flat[index]
        if best_value is None or (not np.isnan(best_value) and
                                  (np.isnan(value) or (value < best_value if minimum else value > best_value))):
            best_index, best_value = start * values[0].size + index, value
        finite = np.isfinite(values)
        far = max(far, np.max(values, initial=-np.inf, where=finite)) if minimum else \
            min(far, np.min(values, initial=np.inf, where=finite))
    voxel = tuple(int(i) for i in np.unravel_index(best_index, heatmap.shape))
    return voxel, float(far)


def _search_extremum(heatmap: np.ndarray, valid, kind: str, already_sigmoid: bool, sufficient_contrast: float):
    """(extreme voxel, far value) for ``decode_heatmap``'s extremum method without full-volume temporaries.

    The voxel is exactly the whole-volume search's. ``far`` (the opposite extreme) only enters the contrast,
    which is used as ``min(1, contrast / 0.5)`` and against ``flat_threshold``: when a lower bound of the
    contrast already reaches ``sufficient_contrast`` (the larger of both), the bound gives identical results.
    """
    minimum = kind == "log_distance"
    shape = heatmap.shape
    flat = _first_extreme_index(heatmap, maximum=not minimum)
    voxel = None if flat is None else tuple(int(i) for i in np.unravel_index(flat, shape))
    if voxel is None or (valid is not None and not bool(valid_at(valid, shape, voxel))):
        return _masked_search(heatmap, valid, kind)
    flat = _first_extreme_index(heatmap, maximum=minimum)
    if flat is not None and np.isfinite(heatmap.flat[flat]):
        far_voxel = tuple(int(i) for i in np.unravel_index(flat, shape))
        if valid is None or bool(valid_at(valid, shape, far_voxel)):
            return voxel, float(heatmap.flat[flat])
    # a bound from every 4th voxel per axis: the true far value is at least as far from the extreme
    box = tuple(slice(None, None, 4) for _ in shape)
    sample = np.array(heatmap[box], dtype=np.result_type(heatmap.dtype, np.float32))
    keep = np.isfinite(sample) if valid is None else np.isfinite(sample) & valid_at(valid, shape, box)
    if keep.any():
        bound = float(np.max(sample, where=keep, initial=-np.inf) if minimum else
                      np.min(sample, where=keep, initial=np.inf))
        extreme = float(heatmap[voxel])
        squash = (lambda x: x) if already_sigmoid else (lambda x: 1.0 / (1.0 + math.exp(-x)))
        if abs(squash(bound) - squash(extreme)) >= sufficient_contrast:
            return voxel, bound
    return _masked_search(heatmap, valid, kind)


def decode_heatmap(heatmap: np.ndarray, encoding: HeatmapEncoding, spacing: Sequence[float] | None = None,
                   refine: bool = True, name: str = "landmark", already_sigmoid: bool = True,
                   flat_threshold: float = 0.05, valid: np.ndarray | None = None, method: str = "extremum",
                   candidates_to_check: int = 8) -> DecodedLandmark:
    """Landmark position (voxel index, sub-voxel when ``refine``) from one heatmap.

    ``method``: ``"extremum"`` takes the global argmin (log_distance) / argmax (gaussian), as the paper;
    ``"consistent"`` (log_distance only) takes, among the deepest local minima, the one whose distance map
    best explains the whole heatmap, which guards against a spurious dip far from the landmark.

    ``heatmap`` holds values in [0, 1], or logits with ``already_sigmoid=False`` (the extremum is found on
    the logits, which is monotone in the value, and only the neighbourhood is passed through the sigmoid).
    ``valid`` (boolean, broadcastable to the heatmap, or an object that gives the mask of any box of the heatmap
    by indexing, like ``landmark_export.SlidingWindowRegion``) excludes voxels whose values cannot be trusted. The
    extremum method makes no full-volume copy (float16 logits from nnU-Net are searched in place).
    A flat heatmap still yields a landmark (the extreme voxel), with confidence 0 and a warning.
    """
    heatmap = np.asarray(heatmap)
    spacing = np.ones(heatmap.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if method not in ("extremum", "consistent"):
        raise ValueError(f"unknown decoding method {method!r}; use 'extremum' or 'consistent'")
    if method == "consistent" and encoding.kind == "log_distance":
        search = heatmap
        if valid is not None:
            search = np.where(np.asarray(valid, dtype=bool), heatmap,
                              np.asarray(np.inf, dtype=heatmap.dtype if heatmap.dtype.kind == "f" else float))
        voxel = _extreme_voxel(search, encoding.kind)
        # the deepest dip is not always the right one: among the deepest local minima, take the one the whole
        # distance map agrees with best
        candidates = _candidate_voxels(search, encoding.kind, candidates_to_check)
        if voxel not in candidates:
            candidates.append(voxel)
        costs = _distance_consistency(search, candidates, spacing, encoding, already_sigmoid)
        voxel = candidates[int(np.argmin(costs))]
        far = float(np.max(search, initial=-np.inf, where=np.isfinite(search)))
    else:
        voxel, far = _search_extremum(heatmap, valid, encoding.kind, already_sigmoid, max(0.5, flat_threshold))
    extreme = float(heatmap[voxel])
    if not already_sigmoid:
        extreme, far = (1.0 / (1.0 + math.exp(-x)) for x in (extreme, far))
    contrast = abs(far - extreme)
    # the heatmap's own estimate of how far the best voxel is from the landmark, beyond what the grid explains
    # (half a voxel diagonal), turns into a confidence; a low-contrast heatmap lowers it further
    excess_mm = max(0.0, float(encoding.decode_distance(extreme)) - 0.5 * float(np.linalg.norm(spacing)))
    confidence = math.exp(-excess_mm / (2.0 * float(spacing.max()))) * min(1.0, contrast / 0.5)
    if contrast < flat_threshold:
        warnings.warn(f"{name}: the heatmap is flat (range {contrast:.3f}); the landmark position is a guess "
                      f"(confidence 0)", RuntimeWarning, stacklevel=2)
        return DecodedLandmark(np.asarray(voxel, dtype=np.float64), voxel, extreme, 0.0)
    position = np.asarray(voxel, dtype=np.float64)
    if refine:
        radius = 2 if encoding.kind == "log_distance" else 1
        window, lo = _neighbourhood(heatmap.shape, voxel, radius)
        local = np.asarray(heatmap[window], dtype=np.float64)
        if not already_sigmoid:
            local = 1.0 / (1.0 + np.exp(-local))
        local_voxel = tuple(int(v - l) for v, l in zip(voxel, lo))
        if encoding.kind == "log_distance":
            position = _refine_multilateration(local, lo.astype(np.float64), np.asarray(voxel, dtype=np.float64),
                                               spacing, encoding)
            # a fit that wanders off means the network rounded the tip of the distance map off: fall back to
            # the vertex of a parabola through the values around the minimum
            if np.any(np.abs(position - np.asarray(voxel)) > 1.0):
                position = _refine_parabola(local, local_voxel, take_log=False, maximum=False) + lo
        else:
            position = _refine_parabola(local, local_voxel) + lo
    return DecodedLandmark(position, voxel, extreme, float(np.clip(confidence, 0.0, 1.0)))
