"""Landmarks that a label map defines: the centre of the interface between two structures, and the point of a
structure farthest from another landmark. Positions are world LPS mm; every index <-> world step goes through
``geometry.ImageGeometry``. Label arrays are SimpleITK/NumPy order (z, y, x).

A rule is data (``InterfaceCentre``, ``FarthestPoint``); ``derive_landmarks`` applies a dict of named rules, so a
converter states its dataset's anatomy in a few lines (see ``dataset_conversion/convert_mmwhs.py``).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
from scipy import ndimage

from nnunet_landmark.geometry import ImageGeometry

FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)
ALL_NEIGHBOURS = ndimage.generate_binary_structure(3, 3)


class LabelRuleError(ValueError):
    """A label map that does not define a landmark (a structure missing, two structures that do not touch)."""


def _named(value: int, label_names: Mapping[int, str] | None) -> str:
    return f"{label_names[value]} (label {value})" if label_names and value in label_names else f"label {value}"


@dataclass(frozen=True)
class InterfaceCentre:
    """Centroid of the voxels of ``structure`` (its largest piece) that share a face with ``neighbour`` (a valve).

    Where no voxel pair shares a face, pairs sharing an edge or a corner count: on a coarse grid two structures
    that touch meet only there (the aorta and LV cavity of a few 5 mm phantoms).
    """

    structure: int
    neighbour: int

    def describe(self) -> str:
        return f"centre of the interface between labels {self.structure} and {self.neighbour}"


@dataclass(frozen=True)
class FarthestPoint:
    """The ``structure`` voxel centre farthest from another derived landmark (e.g. the LV apex from the mitral valve)."""

    structure: int
    from_landmark: str

    def describe(self) -> str:
        return f"label {self.structure} voxel farthest from the derived {self.from_landmark}"


Rule = Union[InterfaceCentre, FarthestPoint]


def _box_around(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, ``margin`` voxels wider (clipped at the array's edge)."""
    box = ndimage.find_objects(mask.view(np.uint8))[0]
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, mask.shape))


def largest_component(mask: np.ndarray, structure: np.ndarray = FACE_NEIGHBOURS) -> np.ndarray:
    """The largest connected piece of a mask, face-connected unless ``structure`` says otherwise (real MM-WHS labels
    hold stray single voxels, predicted segmentations a few stray specks); an empty mask stays empty."""
    components, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return components > 0
    return components == (np.argmax(np.bincount(components.ravel())[1:]) + 1)


def structure_voxels(label: np.ndarray, value: int, label_names: Mapping[int, str] | None = None) -> np.ndarray:
    """Array indices (N, 3) of the largest piece of ``value``; raises if absent."""
    mask = label == value
    if not mask.any():
        raise LabelRuleError(f"the label map has no {_named(value, label_names)}")
    box = _box_around(mask, 0)
    return np.argwhere(largest_component(mask[box])) + np.array([s.start for s in box])


def interface_voxels(label: np.ndarray, structure: int, neighbour: int,
                     label_names: Mapping[int, str] | None = None) -> np.ndarray:
    """Array indices (N, 3) of the voxels of the largest piece of ``structure`` next to ``neighbour``.

    Next to: sharing a face, or where no voxel does, an edge or a corner (see ``InterfaceCentre``).
    """
    mask = label == structure
    if not mask.any():
        raise LabelRuleError(f"the label map has no {_named(structure, label_names)}")
    if not (label == neighbour).any():
        raise LabelRuleError(f"the label map has no {_named(neighbour, label_names)}")
    # inside the structure's box, one voxel wider for the neighbour next to it (10-50x fewer voxels)
    box = _box_around(mask, 1)
    offset = np.array([s.start for s in box])
    piece, other = largest_component(mask[box]), label[box] == neighbour
    touching = piece & ndimage.binary_dilation(other, structure=FACE_NEIGHBOURS)
    if not touching.any():
        touching = piece & ndimage.binary_dilation(other, structure=ALL_NEIGHBOURS)
    if not touching.any():
        raise LabelRuleError(f"{_named(structure, label_names)} and {_named(neighbour, label_names)} do not touch")
    return np.argwhere(touching) + offset


def interface_centre(label: np.ndarray, geometry: ImageGeometry, structure: int, neighbour: int,
                     label_names: Mapping[int, str] | None = None) -> np.ndarray:
    """World centre (LPS mm) of the interface between two labels (see ``InterfaceCentre``)."""
    return geometry.array_index_to_world(interface_voxels(label, structure, neighbour, label_names).mean(axis=0))


def farthest_point(label: np.ndarray, geometry: ImageGeometry, structure: int, from_point,
                   label_names: Mapping[int, str] | None = None) -> np.ndarray:
    """World centre (LPS mm) of the voxel of the largest piece of ``structure`` farthest from ``from_point``."""
    indices = structure_voxels(label, structure, label_names)
    world = geometry.array_index_to_world(indices.astype(np.float64))
    return world[np.argmax(np.linalg.norm(world - np.asarray(from_point, dtype=np.float64), axis=1))]


def derive_landmarks(label: np.ndarray, geometry: ImageGeometry, rules: Mapping[str, Rule], names: Iterable[str],
                     label_names: Mapping[int, str] | None = None) -> "OrderedDict[str, np.ndarray]":
    """The landmarks ``names`` (in that order) by their ``rules``; a ``FarthestPoint`` derives what it starts from.

    ``label_names`` (value -> structure name) only makes error messages readable.
    """
    derived: "OrderedDict[str, np.ndarray]" = OrderedDict()

    def get(name: str, chain: Sequence[str] = ()) -> np.ndarray:
        if name in derived:
            return derived[name]
        if name not in rules:
            raise LabelRuleError(f"no rule derives '{name}' (derivable: {sorted(rules)})")
        if name in chain:
            raise LabelRuleError(f"the rules for {list(chain)} refer to each other")
        rule = rules[name]
        try:
            if isinstance(rule, InterfaceCentre):
                point = interface_centre(label, geometry, rule.structure, rule.neighbour, label_names)
            else:
                point = farthest_point(label, geometry, rule.structure, get(rule.from_landmark, (*chain, name)),
                                       label_names)
        except LabelRuleError as e:
            raise LabelRuleError(f"cannot derive '{name}' ({rule.describe()}): {e}") from e
        derived[name] = point
        return point

    names = list(names)
    for n in names:
        get(n)
    return OrderedDict((n, derived[n]) for n in names)


def distance_to_points_mm(point, world_points: np.ndarray) -> float:
    """Distance (mm) from a world point to the nearest of ``world_points`` (N, 3)."""
    return float(np.min(np.linalg.norm(np.asarray(world_points) - np.asarray(point, dtype=np.float64), axis=1)))


def distance_to_labels_mm(point, label: np.ndarray, geometry: ImageGeometry, values: Iterable[int] | None = None,
                          search_mm: float = 50.0) -> float:
    """Distance (mm) from a world point to the nearest voxel centre whose label is in ``values`` (any nonzero: None).

    Looks in a box of +-``search_mm`` around the point first (a whole real label map holds millions of heart
    voxels) and searches everywhere only when the box holds none; ``inf`` when no such voxel exists.
    """
    def select(a: np.ndarray) -> np.ndarray:
        return a != 0 if values is None else np.isin(a, list(values))

    centre = geometry.world_to_array_index(point)
    # direction cosines are orthonormal: a world offset of r mm is at most r / spacing voxels along each axis
    reach = np.ceil(search_mm / np.asarray(geometry.spacing[::-1])).astype(int) + 1
    lo = np.clip(np.floor(centre).astype(int) - reach, 0, label.shape)
    hi = np.clip(np.ceil(centre).astype(int) + reach + 1, 0, label.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    near = np.argwhere(select(label[box])) + lo
    if len(near):
        d = distance_to_points_mm(point, geometry.array_index_to_world(near.astype(np.float64)))
        if d <= search_mm:
            return d
    everywhere = np.argwhere(select(label))
    if not len(everywhere):
        return float("inf")
    return distance_to_points_mm(point, geometry.array_index_to_world(everywhere.astype(np.float64)))
