"""Where a landmark can be, learned from the training cases: its position in the frame of a segmented structure.

A landmark network predicts a heatmap per landmark and a segmentation. On a short budget the heatmap is blunt (its
minimum lies 5-20 mm from the landmark) while the segmentation is good, and a landmark sits at a consistent place
relative to the anatomy the network segments. This module learns that place and combines it with the heatmap:

* **Frame of a structure** (one label, or all foreground labels together; its largest connected piece): its centroid,
  its principal axis (sign fixed against a reference axis learned from the training cases), the roll about that axis
  fixed by a world (LPS) axis, and its size (square root of the largest variance, mm). World axes, not array axes, so
  a scan whose direction cosines flip an axis gives the same frame.
* **Prior** (``PositionPrior.fit``, from the reference labels and landmarks of the training cases): for each landmark,
  the mean and covariance of its frame coordinates (divided by the size), for the structure whose frame predicts it
  best in leave-one-out over the training cases. Nothing is specific to a landmark or a label.
* **Estimate** (``combine_with_heatmap``): the posterior mean of the prior (a Gaussian in world mm, from the frame of
  the predicted segmentation) times the heatmap's likelihood: a Student-t around the heatmap's extremum whose width is
  the extremum's RMS error on the fold's validation cases (``LandmarkPrior.heatmap_error_mm``, recorded by the
  trainer's final validation), so a heatmap weighs what it proved on held-out cases; for a model without that
  measurement, ``exp(-d(x)^2 / (2 tau^2))``, ``d(x)`` the distance the heatmap says ``x`` is from the landmark. The
  raw heatmap extremum is kept beside it in every output.

Moments (count, mean, covariance) come from one int16 label volume, built slab by slab (no full-volume float
temporaries) at a sampling stride that keeps a full-size CT at ~8M voxels; they are computed in preprocessed voxels
and mapped to world mm through the affine of ``geometry.CaseGeometry``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from nnunet_landmark.heatmap_decoding import valid_at
from nnunet_landmark.label_landmarks import largest_component

ALL_FOREGROUND = 0  # structure key: every foreground label together (0 is never a foreground label in nnU-Net)
# added to the prior's standard deviation in every direction (squared), and the least SD of the boundary guard: a
# degenerate covariance from few training cases must not pin the estimate to one point. 3 mm was measured too: on
# phantoms the wider guard took the mitral valve from 1.63 to 1.26 mm (a 3 mm prior floor with a 1 mm guard did
# nothing); it stays 1 mm until the guard's width is settled on real anatomy (the guard exists for a real CT's apex)
PRIOR_FLOOR_MM = 1.0
# width of the heatmap likelihood for models without a validated heatmap error, the scale of a short budget's heatmap
# errors (10-20 mm at its extremum): of 5, 10, 20 and 40 mm, 20 gave the best apex and mitral valve with little loss at
# the aortic valve on one model; on six, 40 (and the prior alone) did better (benchmarks/results/ACCURACY.md)
HEATMAP_TAU_MM = 20.0
MIN_CASES = 3
MIN_HEATMAP_CASES = 2  # validation cases needed to weigh the heatmap by its measured error
HEATMAP_DOF = 3.0  # degrees of freedom of the Student-t the validated heatmap error enters as
SLAB_VOXELS = 1 << 20
SURFACE_BAND_SD = 2.0  # the boundary factor only acts beyond this many SDs of the learned distance
SURFACE_MARGIN_MM = 30.0  # a landmark's distance from a structure's boundary is measured within this reach
MOMENT_SAMPLE_VOXELS = 1 << 23  # at prediction, moments come from at most ~8M voxels (a stride along each axis)


@dataclass(frozen=True)
class Moments:
    """Voxel count, centroid and covariance (world mm) of one structure, and its volume (ml); ``total_volume_ml``
    counts every piece of it where the moments are the largest piece's."""

    count: int
    mean: np.ndarray
    cov: np.ndarray
    volume_ml: float = float("nan")
    total_volume_ml: float = float("nan")


def affine_of(to_world: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with ``to_world(q) == A @ q + b`` for an affine map given as a function of (N, 3) points."""
    basis = np.vstack([np.zeros(3), np.eye(3)])
    mapped = np.asarray(to_world(basis), dtype=np.float64)
    return (mapped[1:] - mapped[0]).T, mapped[0]


def sampling_stride(shape: Sequence[int], max_voxels: int = MOMENT_SAMPLE_VOXELS) -> int:
    """The stride along every axis that keeps a moments sample of ``shape`` at or under ``max_voxels``."""
    voxels = int(np.prod(shape))
    return 1 if voxels <= max_voxels else int(np.ceil((voxels / max_voxels) ** (1 / len(shape))))


def structure_moments(labels, affine: tuple[np.ndarray, np.ndarray], slab_voxels: int = SLAB_VOXELS,
                      to_labels: Callable[[np.ndarray], np.ndarray] | None = None,
                      stride: int = 1, largest_piece: bool = True) -> dict[int, Moments]:
    """Moments of every foreground label (> 0) and of all of them together (``ALL_FOREGROUND``), world mm.

    ``labels``: a (Z, Y, X) or (1, Z, Y, X) label array in preprocessed voxels (numpy, or anything sliced like one,
    e.g. nnU-Net's blosc2 arrays), or (C, Z, Y, X) that ``to_labels`` turns into labels slab by slab (segmentation
    logits). ``affine``: (A, b), preprocessed index -> world mm. ``stride`` > 1 samples every stride-th voxel along
    each axis (a full-size CT's structures keep their moments to a fraction of a voxel at a fraction of the cost).
    ``largest_piece``: each structure's moments come from its largest face-connected piece. A few stray voxels far
    from a structure move its second moments, so its axis and size, by millimetres (3 + 1 + 1 voxels beside a
    1281-voxel predicted LV put a prior 4.0 mm off, 2.8 mm without them).
    """
    volume = _label_volume(labels, slab_voxels, to_labels, stride)
    boxes = ndimage.find_objects(np.maximum(volume, 0))
    structures = [(value + 1, box) for value, box in enumerate(boxes) if box is not None]
    if structures:
        union = tuple(slice(min(b[i].start for _, b in structures), max(b[i].stop for _, b in structures))
                      for i in range(3))
        structures.append((ALL_FOREGROUND, union))
    a, b = affine
    voxel_ml = abs(float(np.linalg.det(a))) * stride ** 3 / 1000.0
    out = {}
    for key, box in structures:
        crop = volume[box]
        mask = crop > 0 if key == ALL_FOREGROUND else crop == key
        total = int(np.count_nonzero(mask))
        if largest_piece:
            mask = largest_component(mask)
        n, mean, cov = _index_moments(mask, np.array([s.start for s in box], dtype=np.float64), slab_voxels)
        mean, cov = mean * stride, cov * stride * stride
        out[key] = Moments(n, a @ mean + b, a @ cov @ a.T, n * voxel_ml, total * voxel_ml)
    return out


def _label_volume(labels, slab_voxels: int, to_labels, stride: int) -> np.ndarray:
    """(Z, Y, X) labels at every ``stride``-th voxel (int16), converted slab by slab (no full-volume float copy)."""
    shape = labels.shape[-3:]
    out = np.empty(tuple(len(range(0, n, stride)) for n in shape), dtype=np.int16)
    rows = max(1, slab_voxels * stride * stride // max(1, int(np.prod(shape[1:]))))
    rows = max(stride, rows - rows % stride)
    step = slice(None, None, stride)
    for start in range(0, shape[0], rows):
        box = slice(start, min(start + rows, shape[0]), stride)
        if len(labels.shape) == 4:
            slab = labels[:, box, step, step] if stride > 1 else labels[:, box]
            slab = to_labels(slab) if to_labels is not None else slab[0]
        else:
            slab = labels[box, step, step] if stride > 1 else labels[box]
        out[start // stride:start // stride + len(range(box.start, box.stop, stride))] = np.asarray(slab)
    return out


def _index_moments(mask: np.ndarray, offset: np.ndarray, slab_voxels: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, covariance) of a mask's voxel indices plus ``offset``, accumulated a slab of rows at a time."""
    count, total, outer = 0, np.zeros(3), np.zeros((3, 3))
    rows = max(1, slab_voxels // max(1, int(np.prod(mask.shape[1:]))))
    for start in range(0, mask.shape[0], rows):
        points = np.argwhere(mask[start:start + rows]).astype(np.float64)
        points += offset + np.array([start, 0.0, 0.0])
        count += len(points)
        total += points.sum(axis=0)
        outer += points.T @ points
    mean = total / count
    return count, mean, outer / count - np.outer(mean, mean)


def _principal(cov: np.ndarray) -> tuple[np.ndarray, float]:
    values, vectors = np.linalg.eigh(cov)
    return vectors[:, -1], float(np.sqrt(max(values[-1], 0.0)))


def structure_frame(moments: Moments, reference_axis: np.ndarray, roll_axis: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """(centre, rotation R (columns: frame axes in world), size mm) of a structure."""
    e1, size = _principal(moments.cov)
    if e1 @ reference_axis < 0:
        e1 = -e1
    e2 = roll_axis - (roll_axis @ e1) * e1
    e2 /= np.linalg.norm(e2)
    return moments.mean, np.stack([e1, e2, np.cross(e1, e2)], axis=1), max(size, 1e-6)


@dataclass(frozen=True)
class LandmarkPrior:
    """One landmark's position in the frame of one structure (frame coordinates / size)."""

    structure: int
    reference_axis: np.ndarray
    roll_axis: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    loo_rms_mm: float
    cases: int
    surface_mean: float | None = None  # signed distance (mm, > 0 outside) from the structure's boundary
    surface_sd: float | None = None
    heatmap_error_mm: float | None = None  # RMS error of the heatmap extremum on the fold's validation cases
    prior_error_mm: float | None = None  # RMS error of the prior alone (on predicted segmentations) there
    heatmap_claim_mm: float | None = None  # the largest distance the heatmap claimed at its extremum there
    validation_cases: int | None = None  # how many validation cases measured the prior's error

    def predict(self, moments: Mapping[int, Moments]) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean, covariance) in world mm, or None when the structure is absent."""
        m = moments.get(self.structure)
        if m is None or m.count < 4:
            return None
        centre, rotation, size = structure_frame(m, self.reference_axis, self.roll_axis)
        return centre + size * rotation @ self.mean, size * size * rotation @ self.cov @ rotation.T

    def to_dict(self) -> dict:
        return {"structure": self.structure, "reference_axis": self.reference_axis.tolist(),
                "roll_axis": self.roll_axis.tolist(), "mean": self.mean.tolist(), "cov": self.cov.tolist(),
                "loo_rms_mm": self.loo_rms_mm, "cases": self.cases, "surface_mean": self.surface_mean,
                "surface_sd": self.surface_sd, "heatmap_error_mm": self.heatmap_error_mm,
                "prior_error_mm": self.prior_error_mm, "heatmap_claim_mm": self.heatmap_claim_mm,
                "validation_cases": self.validation_cases}

    @classmethod
    def from_dict(cls, d: dict) -> "LandmarkPrior":
        optional = [None if d.get(k) is None else float(d[k])
                    for k in ("surface_mean", "surface_sd", "heatmap_error_mm", "prior_error_mm", "heatmap_claim_mm")]
        return cls(int(d["structure"]), np.asarray(d["reference_axis"], float), np.asarray(d["roll_axis"], float),
                   np.asarray(d["mean"], float), np.asarray(d["cov"], float), float(d["loo_rms_mm"]), int(d["cases"]),
                   *optional, None if d.get("validation_cases") is None else int(d["validation_cases"]))


def signed_distance(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) of every voxel centre to the other side of ``mask``'s boundary: > 0 outside, < 0 inside."""
    mask = np.asarray(mask, dtype=bool)
    if mask.all() or not mask.any():  # no boundary in view: only the side is known
        return np.full(mask.shape, -np.inf if mask.all() else np.inf)
    return ndimage.distance_transform_edt(~mask, sampling=spacing) - ndimage.distance_transform_edt(mask, sampling=spacing)


def structure_mask(labels: np.ndarray, structure: int) -> np.ndarray:
    """Voxels of ``structure`` (a label, or ``ALL_FOREGROUND``) in a label array."""
    return labels > 0 if structure == ALL_FOREGROUND else labels == structure


def _fit_structure(frames: list, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, cov, leave-one-out RMS mm) of frame coordinates for one landmark and one structure."""
    q = np.stack([rotation.T @ (p - centre) / size for (centre, rotation, size), p in zip(frames, points)])
    n = len(q)
    errors = []
    for i, (centre, rotation, size) in enumerate(frames):
        others = (q.sum(axis=0) - q[i]) / (n - 1)
        errors.append(np.linalg.norm(centre + size * rotation @ others - points[i]))
    return q.mean(axis=0), np.cov(q.T), float(np.sqrt(np.mean(np.square(errors))))


def _reference_axes(moments: Sequence[Moments]) -> tuple[np.ndarray, np.ndarray]:
    axes = [_principal(m.cov)[0] for m in moments]
    aligned = [a if a @ axes[0] >= 0 else -a for a in axes]
    reference = np.mean(aligned, axis=0)
    reference /= np.linalg.norm(reference)
    return reference, np.eye(3)[int(np.argmin(np.abs(reference)))]


@dataclass(frozen=True)
class PositionPrior:
    landmarks: dict  # name -> LandmarkPrior
    # structure -> (smallest, largest) volume (ml, largest piece) over the training references, for every structure
    # that each of them holds: what a credible segmentation of a new case looks like (``credibility``)
    structure_volumes_ml: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, cases: Sequence[tuple[Mapping[int, Moments], np.ndarray]], names: Sequence[str],
            surface_distance: Callable[[int, int, np.ndarray], float] | None = None) -> "PositionPrior | None":
        """From training cases given as (structure moments, (K, 3) world landmarks); None with fewer than
        ``MIN_CASES`` cases. Per landmark, the structure with the smallest leave-one-out error is kept, and with
        ``surface_distance(case index, structure, world point)`` (signed distance in mm from the structure's boundary)
        the mean and SD of the landmark's distance from that structure's boundary."""
        if len(cases) < MIN_CASES:
            return None
        structures = sorted(set.intersection(*[set(k for k, m in c.items() if m.count >= 4) for c, _ in cases]))
        volumes = {s: (float(min(c[s].volume_ml for c, _ in cases)), float(max(c[s].volume_ml for c, _ in cases)))
                   for s in structures if s != ALL_FOREGROUND}
        landmarks = {}
        for k, name in enumerate(names):
            points = np.stack([np.asarray(p, dtype=np.float64)[k] for _, p in cases])
            known = np.all(np.isfinite(points), axis=1)  # a case may lack a landmark
            if known.sum() < MIN_CASES:
                continue
            points = points[known]
            best = None
            for s in structures:
                moments = [c[s] for (c, _), ok in zip(cases, known) if ok]
                reference, roll = _reference_axes(moments)
                frames = [structure_frame(m, reference, roll) for m in moments]
                mean, cov, loo = _fit_structure(frames, points)
                if best is None or loo < best.loo_rms_mm:
                    best = LandmarkPrior(s, reference, roll, mean, cov, loo, int(known.sum()))
            if best is not None and surface_distance is not None:
                indices = [i for i, ok in enumerate(known) if ok]
                distances = np.asarray([surface_distance(i, best.structure, p) for i, p in zip(indices, points)])
                distances = distances[np.isfinite(distances)]
                if len(distances) >= MIN_CASES:
                    best = replace(best, surface_mean=float(distances.mean()),
                                   surface_sd=float(distances.std(ddof=1)))
            if best is not None:
                landmarks[name] = best
        return cls(landmarks, volumes) if landmarks else None

    def with_validation(self, heatmap_errors: Mapping[str, Sequence[float]],
                        prior_errors: Mapping[str, Sequence[float]] | None = None,
                        heatmap_claims: Mapping[str, Sequence[float]] | None = None) -> "PositionPrior":
        """This prior with what the fold's validation cases measured per landmark (name -> values, mm): the heatmap
        extremum's errors and the prior-alone errors (each kept as an RMS), and the distances the heatmap claimed at
        its extremum (their largest); a landmark with fewer than ``MIN_HEATMAP_CASES`` values keeps none."""
        def finite(values) -> np.ndarray:
            return np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)

        def rms(values) -> float | None:
            e = finite(values)
            return float(np.sqrt(np.mean(e * e))) if len(e) >= MIN_HEATMAP_CASES else None

        landmarks = {}
        for name, prior in self.landmarks.items():
            claims = finite((heatmap_claims or {}).get(name, []))
            prior_values = finite((prior_errors or {}).get(name, []))
            landmarks[name] = replace(prior, heatmap_error_mm=rms(heatmap_errors.get(name, [])),
                                      prior_error_mm=rms(prior_values),
                                      heatmap_claim_mm=float(claims.max()) if len(claims) >= MIN_HEATMAP_CASES
                                      else None,
                                      validation_cases=len(prior_values) if len(prior_values) >= MIN_HEATMAP_CASES
                                      else None)
        return PositionPrior(landmarks, self.structure_volumes_ml)

    def to_dict(self) -> dict:
        return {"landmarks": {name: p.to_dict() for name, p in self.landmarks.items()},
                "structure_volumes_ml": {str(s): list(v) for s, v in self.structure_volumes_ml.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "PositionPrior":
        if "landmarks" not in d:  # written before structure volumes were recorded: {name: landmark prior}
            return cls({name: LandmarkPrior.from_dict(p) for name, p in d.items()})
        return cls({name: LandmarkPrior.from_dict(p) for name, p in d["landmarks"].items()},
                   {int(s): (float(v[0]), float(v[1])) for s, v in d.get("structure_volumes_ml", {}).items()})


def pooled_prediction(priors: Sequence[PositionPrior], name: str, moments: Mapping[int, Moments]
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """The folds' priors for ``name`` (e.g. one per fold of ``nnUNetv2_predict -f``) pooled as an equal mixture of
    their world-space Gaussians, whichever structure each fold placed it in: the mean of the means, and the mean of
    the covariances plus the spread of the means (folds that disagree widen the prior). None if none applies."""
    predictions = [p.landmarks[name].predict(moments) for p in priors if name in p.landmarks]
    predictions = [p for p in predictions if p is not None]
    if not predictions:
        return None
    means = np.stack([m for m, _ in predictions])
    mean = means.mean(axis=0)
    spread = (means - mean).T @ (means - mean) / len(means)
    return mean, np.mean([c for _, c in predictions], axis=0) + spread


def pooled_surface_bands(priors: Sequence[PositionPrior], name: str) -> list[tuple[int, float, float, float]]:
    """[(structure, mean, SD, weight)]: the learned distance of ``name`` from a structure's boundary, one entry per
    structure the folds chose (mean and SD averaged over the folds that chose it, weight = their share of the folds
    that learned one)."""
    learned = [p.landmarks[name] for p in priors if name in p.landmarks and p.landmarks[name].surface_mean is not None]
    bands = []
    for structure in sorted({p.structure for p in learned}):
        group = [p for p in learned if p.structure == structure]
        bands.append((structure, float(np.mean([p.surface_mean for p in group])),
                      float(np.mean([p.surface_sd for p in group])), len(group) / len(learned)))
    return bands


def pooled_heatmap_error(priors: Sequence[PositionPrior], name: str) -> float | None:
    """RMS over folds of the heatmap's validated error (mm) for ``name``; None where no fold measured one."""
    errors = [p.landmarks[name].heatmap_error_mm for p in priors if name in p.landmarks]
    errors = [e for e in errors if e is not None]
    return float(np.sqrt(np.mean(np.square(errors)))) if errors else None


def combine_with_heatmap(heatmap, encoding, valid, affine: tuple[np.ndarray, np.ndarray], prior_mean: np.ndarray,
                         prior_cov: np.ndarray, already_sigmoid: bool = False, tau_mm: float = HEATMAP_TAU_MM,
                         extent_sd: float = 4.0, surface: Sequence[tuple[Callable, float, float, float]] = (),
                         heatmap_point: tuple[np.ndarray, float] | None = None) -> np.ndarray | None:
    """Posterior mean (preprocessed voxel index) of prior x heatmap likelihood over the box that holds the prior's
    ``extent_sd`` ellipsoid; None when that box misses the image or holds no reliable voxel.

    ``heatmap``: (Z, Y, X) values or logits in preprocessed voxels; ``valid``: the reliable region (as for
    ``heatmap.decode_heatmap``); ``affine``: preprocessed index -> world mm. ``surface``: [(``distances(box)`` giving
    the signed distance (mm) from a predicted structure's boundary over a box of slices, mean, SD, weight)], one per
    structure (``pooled_surface_bands``): the landmark's learned distance from that boundary enters as one more factor
    (to the power ``weight``), which keeps the estimate on the anatomy where the frame of a differently shaped
    structure would carry it off. ``heatmap_point``: (the heatmap
    extremum in world mm, its validated RMS error in mm): the heatmap enters as a Student-t (``HEATMAP_DOF``) of that
    width around its extremum instead of through ``tau_mm`` and its distance values, so it weighs what it proved on
    held-out cases.
    """
    a, b = affine
    cov = prior_cov + PRIOR_FLOOR_MM ** 2 * np.eye(3)
    a_inv = np.linalg.inv(a)
    centre = a_inv @ (prior_mean - b)
    # half-extent of the ellipsoid along each preprocessed axis: sqrt of the diagonal of the index-space covariance
    half = extent_sd * np.sqrt(np.diag(a_inv @ cov @ a_inv.T))
    shape = np.asarray(heatmap.shape)
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    box = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))
    values = np.asarray(heatmap[box], dtype=np.float64)
    if not already_sigmoid:
        values = 1.0 / (1.0 + np.exp(-values))
    keep = np.isfinite(values) if valid is None else np.isfinite(values) & valid_at(valid, heatmap.shape, box)
    if not keep.any():
        return None
    index = np.stack(np.meshgrid(*[np.arange(l, h, dtype=np.float64) for l, h in zip(lo, hi)], indexing="ij"), -1)
    index = index[keep]
    world = index @ a.T + b
    diff = world - prior_mean
    cost = np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff)
    if heatmap_point is not None:
        point, error_mm = heatmap_point
        r2 = np.sum((world - np.asarray(point)) ** 2, axis=1) / max(error_mm, PRIOR_FLOOR_MM) ** 2
        # Student-t, not Gaussian: validation shows heavy tails (an extremum 3-45 mm off in one model), and one far-off
        # extremum must not drag the estimate (6 CPU-budget models: apex max 3.97 mm, 4.40 with a Gaussian)
        cost = cost + (HEATMAP_DOF + 3) * np.log1p(r2 / HEATMAP_DOF)
    else:
        distance = encoding.decode_distance(values[keep])
        if encoding.kind != "log_distance":  # a peak heatmap says little far from its peak: its tail is flat
            distance = np.minimum(distance, encoding.support_mm)
        cost = cost + (distance / tau_mm) ** 2
    for distances_of, surface_mean, surface_sd, weight in surface:
        to_boundary = np.asarray(distances_of(box), dtype=np.float64)[keep]
        sd = max(surface_sd, PRIOR_FLOOR_MM)
        # a guard, not a second estimate: only a distance outside the training cases' band (mean +- 2 SD) costs
        excess = np.maximum(np.abs(to_boundary - surface_mean) - SURFACE_BAND_SD * sd, 0.0)
        cost = cost + weight * np.minimum((excess / sd) ** 2, 1e6)  # inf where no boundary is in view
    weights = np.exp(-0.5 * (cost - cost.min()))
    return (index * weights[:, None]).sum(axis=0) / weights.sum()
