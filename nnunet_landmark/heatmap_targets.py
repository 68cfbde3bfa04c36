"""Heatmap targets for landmarks: how a distance to the landmark becomes a target value, and its rendering on a patch.

Three encodings of "where is the landmark", all functions of the Euclidean distance ``d`` in mm, so every patch sees
the same function of distance whatever its crop (the scaling does not depend on the crop):

* ``log_distance`` (the paper's): ``h = min(1, log(1 + d / d0) / log(1 + d_max / d0))``, 0 at the landmark and 1 far
  away; decoded by argmin. With ``d_max`` the patch diagonal (the paper's) it is defined everywhere, so a patch that
  does not contain the landmark still says where it is; with ``d_max`` a few centimetres (the default recipe's) it is
  compact: 1 everywhere but in a ball around the landmark.
* ``gaussian``: ``h = exp(-d^2 / (2 sigma^2))``, 1 at the landmark; decoded by argmax.
* ``cone``: ``h = max(0, 1 - d / r)``, 1 at the landmark and 0 beyond the radius ``r`` (``max_distance_mm``);
  decoded by argmax (nnLandmark's target, Ertl et al. 2025).

Decoding a predicted heatmap is ``heatmap_decoding``'s.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

ENCODINGS = ("log_distance", "gaussian", "cone")


@dataclass(frozen=True)
class HeatmapEncoding:
    """How a distance to the landmark (mm) becomes a target value in [0, 1]."""

    kind: str = "log_distance"
    max_distance_mm: float = 100.0  # log_distance: distance that maps to 1; cone: its radius (maps to 0)
    scale_mm: float = 1.0  # log_distance: d0, the distance where the log starts to bend
    sigma_mm: float = 4.0  # gaussian: standard deviation

    def __post_init__(self):
        if self.kind not in ENCODINGS:
            raise ValueError(f"unknown heatmap encoding {self.kind!r}; use one of {ENCODINGS}")
        if self.max_distance_mm <= 0 or self.scale_mm <= 0 or self.sigma_mm <= 0:
            raise ValueError(f"heatmap encoding parameters must be positive: {self}")

    @property
    def background(self) -> float:
        """Target value far from the landmark (what padding outside the image must mean)."""
        return 1.0 if self.kind == "log_distance" else 0.0

    @property
    def support_mm(self) -> float:
        """Radius (mm) of the ball where the target differs from its background value (Gaussian: 3 sigma)."""
        return 3.0 * self.sigma_mm if self.kind == "gaussian" else self.max_distance_mm

    def encode(self, distance_mm: np.ndarray) -> np.ndarray:
        d = np.asarray(distance_mm, dtype=np.float32)
        if self.kind == "log_distance":
            out = np.log1p(d / np.float32(self.scale_mm)) / np.float32(math.log1p(self.max_distance_mm / self.scale_mm))
            return np.minimum(out, np.float32(1.0), out=out) if isinstance(out, np.ndarray) else min(out, 1.0)
        if self.kind == "cone":
            return np.maximum(np.float32(1.0) - d / np.float32(self.max_distance_mm), np.float32(0.0))
        return np.exp(-(d * d) / np.float32(2 * self.sigma_mm ** 2))

    def decode_distance(self, value: np.ndarray) -> np.ndarray:
        """Inverse of ``encode`` (distances in mm; saturated values map to the largest distance)."""
        v = np.clip(np.asarray(value, dtype=np.float64), 1e-6, 1.0)
        if self.kind == "log_distance":
            return self.scale_mm * np.expm1(v * math.log1p(self.max_distance_mm / self.scale_mm))
        if self.kind == "cone":
            return self.max_distance_mm * (1.0 - v)
        return np.sqrt(-2 * self.sigma_mm ** 2 * np.log(v))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeatmapEncoding":
        return cls(**{k: d[k] for k in ("kind", "max_distance_mm", "scale_mm", "sigma_mm") if k in d})


def render_heatmaps(shape: Sequence[int], positions: np.ndarray, spacing: Sequence[float],
                    encoding: HeatmapEncoding) -> np.ndarray:
    """Target heatmaps (K, *shape) float32 for K landmark positions (K, ndim) given as voxel indices.

    A NaN position (landmark unknown) gives a channel filled with the background value.
    """
    positions = np.atleast_2d(np.asarray(positions, dtype=np.float64))
    ndim = len(shape)
    if positions.shape[1] != ndim or len(spacing) != ndim:
        raise ValueError(f"positions {positions.shape} and spacing {len(spacing)} must match the {ndim}D shape")
    out = np.empty((positions.shape[0], *shape), dtype=np.float32)
    for k, p in enumerate(positions):
        if not np.all(np.isfinite(p)):
            out[k] = encoding.background
            continue
        squared = np.zeros(shape, dtype=np.float32)
        for axis in range(ndim):
            coordinate = (np.arange(shape[axis], dtype=np.float32) - np.float32(p[axis])) * np.float32(spacing[axis])
            view = [1] * ndim
            view[axis] = shape[axis]
            squared += (coordinate * coordinate).reshape(view)
        out[k] = encoding.encode(np.sqrt(squared, out=squared))
    return out


def render_heatmaps_mapped(shape: Sequence[int], positions: np.ndarray, spacing: Sequence[float],
                           encoding: HeatmapEncoding, to_source: np.ndarray | None = None) -> np.ndarray:
    """``render_heatmaps`` on an array that is an affine view of a source grid with voxel size ``spacing``.

    ``to_source`` (ndim, ndim): a one-voxel step along each array axis (columns) in source voxels, e.g. an augmented
    patch's rotation/scaling/mirroring back to the crop it was sampled from; None is the identity (then this equals
    ``render_heatmaps``). Distances are measured in the source, in mm: ``|diag(spacing) @ to_source @ (x - p)|``, so
    the target is the same function of distance as a heatmap drawn on the source and resampled, without the
    resampling. Works slice by slice in place (no full-size float temporaries).
    """
    positions = np.atleast_2d(np.asarray(positions, dtype=np.float64))
    ndim = len(shape)
    if ndim != 3 or positions.shape[1] != 3 or len(spacing) != 3:
        raise ValueError(f"positions {positions.shape} and spacing {len(spacing)} must match a 3D shape, got {shape}")
    linear = np.diag(np.asarray(spacing, dtype=np.float64))
    if to_source is not None:
        linear = linear @ np.asarray(to_source, dtype=np.float64)
    metric = linear.T @ linear  # squared mm of a step along array axes i and j
    out = np.empty((positions.shape[0], *shape), dtype=np.float32)
    scratch = np.empty(shape[1:], dtype=np.float32)
    cross = bool(metric[0, 1] != 0 or metric[0, 2] != 0)
    for k, p in enumerate(positions):
        if not np.all(np.isfinite(p)):
            out[k] = encoding.background
            continue
        d0, d1, d2 = (np.arange(n, dtype=np.float64) - p[a] for a, n in enumerate(shape))
        in_plane = (metric[1, 1] * d1 * d1)[:, None] + (2 * metric[1, 2] * d1)[:, None] * d2[None, :] + \
            (metric[2, 2] * d2 * d2)[None, :]
        in_plane = in_plane.astype(np.float32)
        along = (metric[0, 0] * d0 * d0).astype(np.float32)
        slope = (2 * (metric[0, 1] * d1[:, None] + metric[0, 2] * d2[None, :])).astype(np.float32) if cross else None
        for i in range(shape[0]):
            squared = out[k, i]
            np.add(in_plane, along[i], out=squared)
            if cross:
                np.multiply(slope, np.float32(d0[i]), out=scratch)
                squared += scratch
        _encode_squared_in_place(out[k], encoding)
    return out


def _encode_squared_in_place(squared: np.ndarray, encoding: HeatmapEncoding) -> None:
    """``encoding.encode(sqrt(squared))`` in place, float32 (the same operations as ``encode``)."""
    np.maximum(squared, np.float32(0), out=squared)  # rounding of a rotated quadratic form near the landmark
    if encoding.kind == "log_distance":
        np.sqrt(squared, out=squared)
        np.divide(squared, np.float32(encoding.scale_mm), out=squared)
        np.log1p(squared, out=squared)
        np.divide(squared, np.float32(math.log1p(encoding.max_distance_mm / encoding.scale_mm)), out=squared)
        np.minimum(squared, np.float32(1.0), out=squared)
    elif encoding.kind == "cone":
        np.sqrt(squared, out=squared)
        np.divide(squared, np.float32(-encoding.max_distance_mm), out=squared)
        np.add(squared, np.float32(1.0), out=squared)
        np.maximum(squared, np.float32(0.0), out=squared)
    else:
        np.divide(squared, np.float32(-2 * encoding.sigma_mm ** 2), out=squared)
        np.exp(squared, out=squared)
