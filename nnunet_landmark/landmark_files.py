"""Landmark files users meet: 3D Slicer markups, CSV tables and ITK-SNAP-style sphere masks.

All positions in and out of this module are world LPS mm (see ``geometry``). A landmark set is an
ordered ``dict`` name -> ``np.ndarray`` of shape (3,).

* ``.mrk.json``: 3D Slicer markups (point list). Reads ``coordinateSystem`` LPS or RAS; writes LPS, one
  control point per landmark, the label being the landmark name.
* CSV: ``case,name,x,y,z`` in LPS mm; further columns (voxel index, confidence) are allowed and kept
  when reading with ``read_landmark_table``.
* Sphere mask: a NIfTI (any SimpleITK format) on the image grid whose nonzero voxels are one small ball;
  the landmark is its centroid in world mm. This is how the LV apex was annotated for the paper.
"""
from __future__ import annotations

import csv
import json
import os
from collections import OrderedDict
from typing import Iterable, Mapping

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_landmark.geometry import ImageGeometry, lps_to_ras
from nnunet_landmark.layout import MARKUPS_SUFFIX, atomic_write_text

SLICER_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                 "Schema/markups-schema-v1.0.3.json#")
CSV_COLUMNS = ("case", "name", "x", "y", "z")


class LandmarkFileError(ValueError):
    """A landmark file that cannot be used; the message names the file and what is wrong."""


def _finite_point(path, name: str, values) -> np.ndarray:
    try:
        p = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise LandmarkFileError(f"{path}: landmark '{name}' has a non-numeric position {values!r}") from e
    if p.shape != (3,):
        raise LandmarkFileError(f"{path}: landmark '{name}' needs 3 coordinates, got {len(p)}")
    if not np.all(np.isfinite(p)):
        raise LandmarkFileError(f"{path}: landmark '{name}' has a NaN or infinite coordinate {p.tolist()}")
    return p


# ---------------------------------------------------------------------------------------------- Slicer markups
def read_markups(path: str | os.PathLike, flagged: bool = False) -> "OrderedDict[str, np.ndarray]":
    """Read the control points of a 3D Slicer ``.mrk.json`` as LPS mm, keyed by their labels.

    A point whose ``positionStatus`` is not ``defined`` is an error, unless ``flagged``: then its position is read
    anyway (a landmark our export flagged as not credible keeps the estimate it has; ``markup_statuses`` says why).
    """
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LandmarkFileError(f"{path}: cannot read as Slicer markups JSON ({e})") from e
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not markups or not isinstance(markups, list) or not all(isinstance(m, dict) for m in markups):
        raise LandmarkFileError(f"{path}: no 'markups' list; is this a 3D Slicer .mrk.json file?")
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for markup in markups:
        if "coordinateSystem" not in markup:
            raise LandmarkFileError(
                f"{path}: the markups declare no 'coordinateSystem'; add \"coordinateSystem\": \"LPS\" (or \"RAS\") "
                f"so the positions cannot be misread with x and y flipped")
        system = markup["coordinateSystem"]
        if system not in ("LPS", "RAS"):
            raise LandmarkFileError(
                f"{path}: unknown coordinate system {system!r}; Slicer markups must declare "
                f"'coordinateSystem' as 'LPS' or 'RAS'")
        units = markup.get("coordinateUnits", "mm")
        if units != "mm":
            raise LandmarkFileError(f"{path}: coordinate units {units!r} are not supported, only 'mm'")
        for i, cp in enumerate(markup.get("controlPoints", [])):
            name = str(cp.get("label") or cp.get("id") or f"point_{i}")
            if (cp.get("positionStatus", "defined") != "defined" and not flagged) or "position" not in cp:
                raise LandmarkFileError(f"{path}: control point '{name}' has no defined position")
            p = _finite_point(path, name, cp["position"])
            if system == "RAS":
                p = lps_to_ras(p)
            if name in out:
                raise LandmarkFileError(f"{path}: landmark '{name}' appears twice")
            out[name] = p
    if not out:
        raise LandmarkFileError(f"{path}: the markups hold no control points")
    return out


def markup_statuses(path: str | os.PathLike) -> "OrderedDict[str, tuple[str, str]]":
    """{label: (positionStatus, description)} of a 3D Slicer ``.mrk.json``'s control points."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LandmarkFileError(f"{path}: cannot read as Slicer markups JSON ({e})") from e
    return OrderedDict((str(cp.get("label") or cp.get("id")), (cp.get("positionStatus", "defined"),
                                                                cp.get("description", "")))
                       for markup in doc.get("markups", []) for cp in markup.get("controlPoints", []))


def write_markups(path: str | os.PathLike, landmarks: Mapping[str, Iterable[float]],
                  descriptions: Mapping[str, str] | None = None, undefined: Iterable[str] = ()) -> None:
    """Write a 3D Slicer point list (LPS), one control point per landmark labelled with its name; the landmarks in
    ``undefined`` (no credible estimate) keep their position but have ``positionStatus`` ``undefined``."""
    undefined = set(undefined)
    points = []
    for i, (name, position) in enumerate(landmarks.items()):
        p = _finite_point(path, name, position)
        points.append({
            "id": str(i + 1),
            "label": name,
            "description": (descriptions or {}).get(name, ""),
            "associatedNodeID": "",
            "position": [float(v) for v in p],  # full precision: JSON floats round-trip exactly
            "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "undefined" if name in undefined else "defined",
        })
    doc = {
        "@schema": SLICER_SCHEMA,
        "markups": [{
            "type": "Fiducial",
            "coordinateSystem": "LPS",
            "coordinateUnits": "mm",
            "locked": False,
            "fixedNumberOfControlPoints": False,
            "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": len(points),
            "controlPoints": points,
            "measurements": [],
        }],
    }
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------ CSV
def read_landmark_table(path: str | os.PathLike) -> list[dict]:
    """All rows of a landmark CSV as dicts (``x, y, z`` as floats, other extra columns as strings)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel) is not a name
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise LandmarkFileError(f"{path}: CSV lacks the column(s) {missing}; expected a header "
                                        f"'{','.join(CSV_COLUMNS)}' (LPS mm)")
            rows = []
            for line_no, row in enumerate(reader, start=2):
                name = (row["name"] or "").strip()
                case = (row["case"] or "").strip()
                if not case or not name:
                    raise LandmarkFileError(f"{path}, line {line_no}: empty case or landmark name")
                p = _finite_point(f"{path}, line {line_no}", name, (row["x"], row["y"], row["z"]))
                rows.append({**row, "case": case, "name": name, "x": p[0], "y": p[1], "z": p[2]})
    except OSError as e:
        raise LandmarkFileError(f"{path}: cannot read ({e})") from e
    return rows


def read_landmark_csv(path: str | os.PathLike) -> "OrderedDict[str, OrderedDict[str, np.ndarray]]":
    """A ``case,name,x,y,z`` CSV (LPS mm) -> {case: {name: position}}."""
    out: "OrderedDict[str, OrderedDict[str, np.ndarray]]" = OrderedDict()
    for row in read_landmark_table(path):
        case_landmarks = out.setdefault(row["case"], OrderedDict())
        if row["name"] in case_landmarks:
            raise LandmarkFileError(f"{path}: landmark '{row['name']}' of case '{row['case']}' appears twice")
        case_landmarks[row["name"]] = np.array([row["x"], row["y"], row["z"]])
    if not out:
        raise LandmarkFileError(f"{path}: the CSV holds no landmarks")
    return out


def format_landmark_rows(rows: Iterable[Mapping], extra_columns: Iterable[str] = ()) -> str:
    """CSV text for rows with ``case, name, x, y, z`` (LPS mm) and any extra columns, in that order."""
    columns = list(CSV_COLUMNS) + [c for c in extra_columns if c not in CSV_COLUMNS]
    lines = [",".join(columns)]
    for row in rows:
        values = []
        for c in columns:
            v = row.get(c, "")
            values.append(f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v))
        lines.append(",".join(values))
    return "\n".join(lines) + "\n"


def write_landmark_csv(path: str | os.PathLike, table: Mapping[str, Mapping[str, Iterable[float]]]) -> None:
    """Write {case: {name: position}} as a ``case,name,x,y,z`` CSV (LPS mm)."""
    rows = []
    for case, landmarks in table.items():
        for name, position in landmarks.items():
            p = _finite_point(path, name, position)
            # repr: the shortest text that reads back as exactly the same float
            rows.append({"case": case, "name": name, **{axis: repr(float(v)) for axis, v in zip("xyz", p)}})
    atomic_write_text(path, format_landmark_rows(rows))


# ---------------------------------------------------------------------------------------------- images
def read_image_3d(path: str | os.PathLike, what: str = "image", error: type[Exception] = LandmarkFileError) -> sitk.Image:
    """A 3D image read with SimpleITK, or ``error`` naming the file and ``what`` it should have been."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise error(f"{path}: cannot read the {what} ({str(e).strip().splitlines()[-1]})") from e
    if image.GetDimension() != 3:
        raise error(f"{path}: the {what} is {image.GetDimension()}D, expected 3D")
    return image


# ---------------------------------------------------------------------------------------------- sphere masks
def read_sphere_mask(path: str | os.PathLike, reference: ImageGeometry | None = None) -> np.ndarray:
    """Centroid (LPS mm) of the single ball of nonzero voxels in a mask on the image grid.

    ``reference`` is the geometry of the image the mask annotates; a mask on another grid is an error.
    """
    mask = read_image_3d(path, "mask")
    geometry = ImageGeometry.from_image(mask)
    if reference is not None and not geometry.same_grid_as(reference):
        raise LandmarkFileError(
            f"{path}: the mask's grid differs from its image (mask size {geometry.size}, spacing "
            f"{np.round(geometry.spacing, 4).tolist()}, origin {np.round(geometry.origin, 3).tolist()}; image size "
            f"{reference.size}, spacing {np.round(reference.spacing, 4).tolist()}, origin "
            f"{np.round(reference.origin, 3).tolist()}). Annotate on the image grid or resample the mask.")
    array = sitk.GetArrayViewFromImage(mask)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise LandmarkFileError(f"{path}: the mask holds NaN or infinite values")
    foreground = array != 0
    if not foreground.any():
        raise LandmarkFileError(f"{path}: the mask is empty (no nonzero voxel), so it marks no landmark")
    _, n_blobs = ndimage.label(foreground, structure=np.ones((3, 3, 3), dtype=bool))
    if n_blobs > 1:
        raise LandmarkFileError(f"{path}: the mask holds {n_blobs} separate blobs; one landmark needs exactly one")
    centroid_zyx = np.argwhere(foreground).mean(axis=0)
    return geometry.array_index_to_world(centroid_zyx)


def render_sphere_mask(geometry: ImageGeometry, center_world, radius_mm: float, label: int = 1) -> sitk.Image:
    """A uint8 mask on ``geometry`` (which needs a size) with a ball of ``label`` around a world point.

    The ball holds every voxel whose centre lies within ``radius_mm`` of the point; its voxel centroid
    is then the point up to the grid's discretisation (exactly, for a point on a voxel centre).
    """
    if geometry.size is None:
        raise ValueError("render_sphere_mask needs a geometry with a size")
    center_index = geometry.world_to_index(center_world)
    reach = np.ceil(radius_mm / np.asarray(geometry.spacing)).astype(int) + 1
    lo = np.maximum(np.floor(center_index).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(center_index).astype(int) + reach + 1, np.asarray(geometry.size))
    array = np.zeros(tuple(int(s) for s in geometry.size[::-1]), dtype=np.uint8)
    if np.all(hi > lo):
        grid = np.stack(np.meshgrid(*[np.arange(l, h) for l, h in zip(lo, hi)], indexing="ij"), axis=-1)
        distance = np.linalg.norm(geometry.index_to_world(grid) - np.asarray(center_world, dtype=float), axis=-1)
        # the tolerance keeps voxels exactly on the sphere on both sides (radius 3 mm on a 1 mm grid): rounding
        # must not make the ball lopsided and shift its centroid
        ball = distance <= radius_mm + 1e-6
        # grid is (x, y, z); the array is (z, y, x)
        array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]][ball.transpose(2, 1, 0)] = label
    image = sitk.GetImageFromArray(array)
    return geometry.apply_to(image)


def write_sphere_mask(path: str | os.PathLike, geometry: ImageGeometry, center_world, radius_mm: float = 3.0) -> None:
    """Write an ITK-SNAP-style sphere mask (label 1) for one landmark on the image grid."""
    # a centre outside the image would leave a clipped ball whose centroid is not the landmark
    if geometry.size is not None and not geometry.contains_world_point(center_world):
        raise ValueError(f"{path}: the landmark at {np.round(center_world, 2).tolist()} lies outside the image")
    image = render_sphere_mask(geometry, center_world, radius_mm)
    if sitk.GetArrayViewFromImage(image).max() == 0:
        raise ValueError(f"{path}: the sphere of radius {radius_mm} mm around {np.round(center_world, 2).tolist()} "
                         f"holds no voxel centre")
    sitk.WriteImage(image, str(path), useCompression=True)


# ---------------------------------------------------------------------------------------------- dispatch
def read_landmark_file(path: str | os.PathLike, name: str | None = None,
                       reference: ImageGeometry | None = None) -> "OrderedDict[str, np.ndarray]":
    """One case's landmarks from a ``.mrk.json`` or a sphere mask (which holds one landmark, ``name``)."""
    p = str(path)
    if p.endswith(MARKUPS_SUFFIX) or p.endswith(".json"):
        return read_markups(p)
    if p.endswith((".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")):
        if name is None:
            raise ValueError(f"{p}: a sphere mask holds one unnamed landmark; say which landmark it is")
        return OrderedDict([(name, read_sphere_mask(p, reference))])
    raise LandmarkFileError(f"{p}: unknown landmark file type; use .mrk.json, a CSV or a sphere mask (.nii.gz)")
