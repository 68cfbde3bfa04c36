"""Landmark baselines a landmark network has to beat.

* **Geometric tip** (``apex_from_segmentation``): segment, then take the tapered end of the LV. The
  largest connected component of the LV label, its long axis by PCA of the voxel centres in world mm,
  the tapered end (the end whose last quarter of the length holds fewer voxels: the LV base is cut
  flat by the valve plane, the apex narrows), and there the extreme point of the mask along the axis.
* **Base centre** (``base_from_segmentation``): the same on the other, wide end (for the LV: the valve plane).
* **Tube end** (``tube_end_from_segmentation``): the centre of the end of a tube-like label (the ascending aorta)
  that faces another label (the LV): where the aortic valve is when the aorta is segmented. The valves' other
  rule, the centre of the interface between two labels (the LV cavity and the LA for the mitral valve), is
  ``label_landmarks.interface_centre``.
* **Mean position** (``MeanPositionBaseline``): the landmark's mean offset from the image centre over
  training cases. World origins differ arbitrarily between scans, so raw world coordinates are never
  averaged; offsets from the image centre are. ``fit_mean_positions`` fits one per landmark on a raw
  dataset's training cases (the one place that reads them for this).

All points are world LPS mm (see ``geometry``).
"""
from __future__ import annotations

import os

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.label_landmarks import ALL_NEIGHBOURS, largest_component

if TYPE_CHECKING:
    from nnunet_landmark.evaluation.folder import RawDataset

TipMethod = Literal["extreme_cap", "farthest_voxel"]
OffsetFrame = Literal["world", "image"]


class BaselineError(ValueError):
    """A baseline that cannot be computed from its input (e.g. an empty segmentation)."""


def long_axis(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and unit principal axis (largest variance) of an (N, 3) point cloud."""
    centroid = points.mean(axis=0)
    centred = points - centroid
    _, vectors = np.linalg.eigh(centred.T @ centred)
    return centroid, vectors[:, -1]


def voxel_extent_along(geometry: ImageGeometry, axis: np.ndarray) -> float:
    """Length (mm) of one voxel's projection onto a world direction."""
    return float(np.sum(np.abs(axis @ geometry.index_to_world_matrix)))


def apex_from_segmentation(label_array_zyx: np.ndarray, geometry: ImageGeometry, label: int = 1,
                           method: TipMethod = "extreme_cap", end_fraction: float = 0.25,
                           end: Literal["tapered", "wide"] = "tapered") -> np.ndarray:
    """The tapered end of a label's largest component (e.g. the LV apex), world LPS mm; with ``end="wide"``
    the other end instead (``base_from_segmentation``).

    ``method``:

    * ``"extreme_cap"`` (default): the voxels within one voxel extent of the extreme projection on the
      long axis form a small cap; the result is the cap's mean position moved along the axis onto the mask
      boundary (the extreme voxel centre plus half a voxel). Less sensitive to a single stray voxel
      and to which voxel of a flat cap happens to be farthest.
    * ``"farthest_voxel"``: the centre of the single voxel farthest along the axis.

    On the synthetic phantoms (true LV masks) ``extreme_cap`` was the better of the two; see the tests.
    ``end_fraction`` is the fraction of the mask's length compared at each end to decide which end tapers.
    """
    mask = np.asarray(label_array_zyx) == label
    if mask.ndim != 3:
        raise BaselineError(f"expected a 3D label array (z, y, x), got shape {mask.shape}")
    if not mask.any():
        raise BaselineError(f"the segmentation holds no voxel of label {label}: no tip to find")
    mask = largest_component(mask, ALL_NEIGHBOURS)
    points = geometry.array_index_to_world(np.argwhere(mask).astype(np.float64))
    if len(points) < 2:
        return points[0]
    centroid, axis = long_axis(points)
    t = (points - centroid) @ axis
    length = t.max() - t.min()
    near_low = np.count_nonzero(t <= t.min() + end_fraction * length)
    near_high = np.count_nonzero(t >= t.max() - end_fraction * length)
    if near_low < near_high:  # the low end tapers: flip so that the tapered end is at +t
        axis, t = -axis, -t
    if end == "wide":
        axis, t = -axis, -t
    half_voxel = 0.5 * voxel_extent_along(geometry, axis)
    if method == "farthest_voxel":
        return points[int(np.argmax(t))]
    if method != "extreme_cap":
        raise ValueError(f"unknown tip method {method!r}; use 'extreme_cap' or 'farthest_voxel'")
    cap = t >= t.max() - 2 * half_voxel
    cap_centre = points[cap].mean(axis=0)
    along = (cap_centre - centroid) @ axis
    return cap_centre + (t.max() + half_voxel - along) * axis


def base_from_segmentation(label_array_zyx: np.ndarray, geometry: ImageGeometry, label: int = 1) -> np.ndarray:
    """The centre of the wide, flat end of a label's largest component (for the LV: the centre of its base, where
    the valves are), world LPS mm: the rule a valve estimate from an LV-only segmentation has to beat."""
    return apex_from_segmentation(label_array_zyx, geometry, label, end="wide")


def tube_end_from_segmentation(label_array_zyx: np.ndarray, geometry: ImageGeometry, label: int, toward: int,
                               depth_mm: float = 6.0) -> np.ndarray:
    """The centre of the end of a label's largest component that faces the centroid of label ``toward`` (the aortic
    valve: the ascending aorta's end toward the LV), world LPS mm: the mean of the voxels within ``depth_mm`` of
    that end along the component's long axis, moved along the axis to the end's last voxel centre.

    ``depth_mm`` = 6 was the best of 2 / 4 / 6 mm on the demo's training phantoms (aortic valve 0.85 mm from their
    true labels; the interface of the aorta and the LV cavity is 6-8 mm from it there).
    """
    labels = np.asarray(label_array_zyx)
    tube, other = labels == label, labels == toward
    for value, mask in ((label, tube), (toward, other)):
        if not mask.any():
            raise BaselineError(f"the segmentation holds no voxel of label {value}: no tube end to find")
    points = geometry.array_index_to_world(np.argwhere(largest_component(tube, ALL_NEIGHBOURS)).astype(np.float64))
    target = geometry.array_index_to_world(np.argwhere(other).astype(np.float64)).mean(axis=0)
    if len(points) < 2:
        return points[0]
    centroid, axis = long_axis(points)
    if (target - centroid) @ axis < 0:
        axis = -axis
    t = (points - centroid) @ axis
    end = t >= t.max() - depth_mm
    return points[end].mean(axis=0) + (t.max() - t[end].mean()) * axis


def image_centre(geometry: ImageGeometry) -> np.ndarray:
    """World position of the image centre (the middle of the voxel-centre grid)."""
    if geometry.size is None:
        raise BaselineError("the image centre needs the image size; build the geometry with "
                            "ImageGeometry.from_file or from_image")
    return geometry.index_to_world((np.asarray(geometry.size, dtype=np.float64) - 1) / 2)


@dataclass
class MeanPositionBaseline:
    """Predicts a landmark at the training cases' mean offset from the image centre.

    ``frame`` says in which axes the offset ``p - centre`` is averaged:

    * ``"world"`` (default): LPS patient axes. The direction matrix already maps image axes onto the
      patient, so this offset is the same anatomy whatever axis order or flips a scan was stored with.
    * ``"image"``: the image's own axes, ``D^T (p - centre)``; equivalent for scans stored alike, but a
      scan stored with flipped axes then contributes a mirrored offset.

    On phantoms with random axis flips ``"world"`` is clearly better (see the tests).
    """

    frame: OffsetFrame = "world"
    mean_offset: np.ndarray | None = field(default=None, repr=False)
    num_cases: int = 0

    def _offset(self, geometry: ImageGeometry, point) -> np.ndarray:
        offset = np.asarray(point, dtype=np.float64) - image_centre(geometry)
        return geometry.direction_matrix.T @ offset if self.frame == "image" else offset

    def fit(self, cases: Sequence[tuple[ImageGeometry, Sequence[float]]]) -> "MeanPositionBaseline":
        """``cases``: (image geometry, landmark world point) per training case."""
        if self.frame not in ("world", "image"):
            raise ValueError(f"unknown frame {self.frame!r}; use 'world' or 'image'")
        if len(cases) == 0:
            raise BaselineError("the mean-position baseline needs at least one training case")
        self.mean_offset = np.mean([self._offset(g, p) for g, p in cases], axis=0)
        self.num_cases = len(cases)
        return self

    def predict(self, geometry: ImageGeometry) -> np.ndarray:
        """The landmark's predicted world position in an image with this geometry."""
        if self.mean_offset is None:
            raise BaselineError("call fit() before predict()")
        offset = geometry.direction_matrix @ self.mean_offset if self.frame == "image" else self.mean_offset
        return image_centre(geometry) + offset


def mean_position_leave_one_out_errors(cases: Sequence[tuple[ImageGeometry, Sequence[float]]],
                         frame: OffsetFrame = "world") -> np.ndarray:
    """Error (mm) of the mean-position baseline on each case when fitted on all the others."""
    errors = []
    for i, (geometry, point) in enumerate(cases):
        model = MeanPositionBaseline(frame).fit([c for j, c in enumerate(cases) if j != i])
        errors.append(float(np.linalg.norm(model.predict(geometry) - np.asarray(point, dtype=np.float64))))
    return np.asarray(errors)


def fit_mean_positions(raw_dataset: "RawDataset | str | os.PathLike", train_cases: Sequence[str],
                       landmark_names: Sequence[str] | None = None, frame: OffsetFrame = "world"
                       ) -> "dict[str, MeanPositionBaseline]":
    """{landmark: MeanPositionBaseline} fitted on ``train_cases`` of a raw nnU-Net dataset (their image
    headers and ``landmarksTr`` points). ``landmark_names``: default the dataset.json's ``"landmarks"``."""
    from nnunet_landmark.evaluation.folder import RawDataset

    raw = raw_dataset if isinstance(raw_dataset, RawDataset) else RawDataset(raw_dataset)
    names = list(landmark_names if landmark_names is not None else raw.dataset_json.get("landmarks") or [])
    if not names:
        raise BaselineError(f"{raw.folder / 'dataset.json'}: no 'landmarks'; pass the landmark names")
    return {name: MeanPositionBaseline(frame).fit([(raw.geometry(c), raw.point(c, name)) for c in train_cases])
            for name in names}
