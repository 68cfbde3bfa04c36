"""Landmark files: 3D Slicer markups (LPS/RAS in, LPS out), CSV tables, ITK-SNAP-style sphere masks, errors."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_landmark.metrics import landmark_error_mm
from nnunet_landmark.geometry import ImageGeometry, lps_to_ras
from nnunet_landmark.landmark_files import (LandmarkFileError, format_landmark_rows, read_landmark_csv,
                                            read_landmark_file, read_landmark_table, read_markups, read_sphere_mask,
                                            render_sphere_mask, write_landmark_csv, write_markups, write_sphere_mask)


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


GRIDS = {
    # name: (direction, spacing, size)
    "identity_isotropic": (np.eye(3), (1.0, 1.0, 1.0), (40, 36, 32)),
    "mmwhs_flip_y_anisotropic": (np.diag([1.0, -1.0, 1.0]), (0.4883, 0.4883, 0.625), (60, 60, 50)),
    "oblique_anisotropic": (rotation([1, 2, 3], 27.0), (0.9, 1.4, 2.5), (48, 40, 24)),
    "oblique_flipped_anisotropic": (rotation([-2, 1, 0.5], 41.0) @ np.diag([-1.0, -1.0, 1.0]), (1.7, 0.8, 3.1),
                                    (30, 60, 22)),
}


def grid(name: str, origin=(-61.3, 102.7, -233.9)) -> ImageGeometry:
    direction, spacing, size = GRIDS[name]
    return ImageGeometry(tuple(origin), tuple(spacing), tuple(np.asarray(direction).ravel()), tuple(size))


def voxel_distance(geometry: ImageGeometry, a, b) -> float:
    """Distance between two world points in voxel units of ``geometry`` (the 0.5-voxel criterion)."""
    return float(np.linalg.norm(geometry.world_to_index(a) - geometry.world_to_index(b)))


# ---------------------------------------------------------------------------------------------- Slicer markups
def test_markups_round_trip_is_exact_and_keeps_order(tmp_path):
    rng = np.random.default_rng(7)
    names = ["apex", "mitral_valve", "aortic_valve", "x-1 (odd name)"]
    landmarks = {n: rng.uniform(-400, 400, size=3) * 10.0 ** rng.integers(-3, 2) for n in names}
    landmarks["mitral_valve"] = np.array([1e-9, -123456.78901234567, 0.1 + 0.2])
    path = tmp_path / "case.mrk.json"
    write_markups(path, landmarks)
    back = read_markups(path)
    assert list(back) == names
    for n in names:
        assert back[n].dtype == np.float64 and back[n].shape == (3,)
        np.testing.assert_array_equal(back[n], landmarks[n])  # exact, not approximately
    assert not list(tmp_path.glob("*.tmp*")), "the atomic write left a temporary file"


def test_written_markups_have_the_structure_slicer_expects(tmp_path):
    path = tmp_path / "p.mrk.json"
    write_markups(path, {"apex": [10.0, -20.5, 30.25], "mitral_valve": [1, 2, 3]},
                  descriptions={"apex": "derived from labels"})
    doc = json.loads(path.read_text())
    assert doc["@schema"].startswith("https://raw.githubusercontent.com/slicer/slicer/")
    assert re.search(r"markups-schema-v1\.0\.\d+\.json#$", doc["@schema"])
    assert isinstance(doc["markups"], list) and len(doc["markups"]) == 1
    markup = doc["markups"][0]
    assert markup["type"] == "Fiducial"
    assert markup["coordinateSystem"] == "LPS"
    assert markup["coordinateUnits"] == "mm"
    points = markup["controlPoints"]
    assert [cp["label"] for cp in points] == ["apex", "mitral_valve"]
    assert len({cp["id"] for cp in points}) == 2
    for cp in points:
        assert len(cp["position"]) == 3 and all(isinstance(v, float) for v in cp["position"])
        assert len(cp["orientation"]) == 9
        # the orientation is a rotation matrix (Slicer rejects anything else)
        o = np.asarray(cp["orientation"]).reshape(3, 3)
        np.testing.assert_allclose(o @ o.T, np.eye(3), atol=1e-12)
        assert cp["positionStatus"] == "defined"
    assert points[0]["position"] == [10.0, -20.5, 30.25]
    assert points[0]["description"] == "derived from labels" and points[1]["description"] == ""
    assert markup["lastUsedControlPointNumber"] == 2


def _slicer_doc(system, points, units="mm"):
    markup = {"type": "Fiducial", "coordinateUnits": units,
              "controlPoints": [{"id": str(i + 1), "label": name, "position": list(p), "positionStatus": "defined",
                                 "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0]}
                                for i, (name, p) in enumerate(points.items())]}
    if system is not None:
        markup["coordinateSystem"] = system
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                       "Schema/markups-schema-v1.0.0.json#", "markups": [markup]}


def test_ras_markups_read_as_lps_with_x_and_y_negated(tmp_path):
    """A hand-written file as Slicer before 4.11 saved it: RAS. Our reader must hand back LPS."""
    path = tmp_path / "old_slicer.mrk.json"
    path.write_text(json.dumps(_slicer_doc("RAS", {"apex": [12.5, -40.25, 7.0], "base": [-3.0, 0.0, -100.5]})))
    back = read_markups(path)
    np.testing.assert_array_equal(back["apex"], [-12.5, 40.25, 7.0])
    np.testing.assert_array_equal(back["base"], [3.0, -0.0, -100.5])
    # the geometry module is the reference for the flip
    np.testing.assert_array_equal(lps_to_ras(back["apex"]), [12.5, -40.25, 7.0])
    # the same numbers declared LPS are taken as they are
    lps = tmp_path / "lps.mrk.json"
    lps.write_text(json.dumps(_slicer_doc("LPS", {"apex": [12.5, -40.25, 7.0]})))
    np.testing.assert_array_equal(read_markups(lps)["apex"], [12.5, -40.25, 7.0])
    # RAS in, LPS out: writing what we read gives an LPS file at the flipped position
    out = tmp_path / "rewritten.mrk.json"
    write_markups(out, back)
    doc = json.loads(out.read_text())
    assert doc["markups"][0]["coordinateSystem"] == "LPS"
    assert doc["markups"][0]["controlPoints"][0]["position"] == [-12.5, 40.25, 7.0]


@pytest.mark.parametrize("bad, message", [
    ("nan_position", r"NaN"),
    ("unknown_system", r"unknown coordinate system 'IJK'"),
    ("missing_system", r"no 'coordinateSystem'"),
    ("not_markups", r"no 'markups' list"),
    ("broken_json", r"cannot read"),
    ("undefined_point", r"no defined position"),
    ("duplicate_label", r"appears twice"),
    ("no_points", r"no control points"),
    ("micrometres", r"units"),
])
def test_bad_markups_name_the_file(tmp_path, bad, message):
    path = tmp_path / f"{bad}.mrk.json"
    doc = _slicer_doc("LPS", {"apex": [1.0, 2.0, 3.0]})
    cp = doc["markups"][0]["controlPoints"]
    if bad == "nan_position":
        cp[0]["position"] = [1.0, float("nan"), 3.0]
    elif bad == "unknown_system":
        doc["markups"][0]["coordinateSystem"] = "IJK"
    elif bad == "missing_system":
        doc = _slicer_doc(None, {"apex": [1.0, 2.0, 3.0]})
    elif bad == "not_markups":
        doc = {"points": []}
    elif bad == "undefined_point":
        cp[0]["positionStatus"] = "undefined"
    elif bad == "duplicate_label":
        cp.append(dict(cp[0], id="2"))
    elif bad == "no_points":
        doc["markups"][0]["controlPoints"] = []
    elif bad == "micrometres":
        doc["markups"][0]["coordinateUnits"] = "um"
    path.write_text("{ not json" if bad == "broken_json" else json.dumps(doc))
    with pytest.raises(LandmarkFileError, match=message) as info:
        read_markups(path)
    assert str(path) in str(info.value)


def test_writing_nan_or_wrong_length_refuses_and_names_the_file(tmp_path):
    path = tmp_path / "out.mrk.json"
    with pytest.raises(LandmarkFileError, match=re.escape(str(path)) + ".*'apex'.*NaN"):
        write_markups(path, {"apex": [1.0, np.nan, 2.0]})
    with pytest.raises(LandmarkFileError, match=re.escape(str(path)) + ".*3 coordinates"):
        write_markups(path, {"apex": [1.0, 2.0]})
    assert not path.exists()
    csv_path = tmp_path / "out.csv"
    with pytest.raises(LandmarkFileError, match=re.escape(str(csv_path)) + ".*infinite"):
        write_landmark_csv(csv_path, {"c1": {"apex": [1.0, np.inf, 2.0]}})
    assert not csv_path.exists()


# ------------------------------------------------------------------------------------------------------ CSV
def test_csv_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    table = {f"ct_train_{1001 + i}": {n: rng.uniform(-300, 300, size=3) for n in ("apex", "mitral_valve")}
             for i in range(4)}
    table["ct_train_1002"]["apex"] = np.array([0.1 + 0.2, -1e-7, 98765.4321012345])
    path = tmp_path / "landmarks.csv"
    write_landmark_csv(path, table)
    lines = path.read_text().splitlines()
    assert lines[0] == "case,name,x,y,z"
    assert len(lines) == 1 + 8
    back = read_landmark_csv(path)
    assert list(back) == list(table)
    for case, landmarks in table.items():
        assert list(back[case]) == list(landmarks)
        for name, p in landmarks.items():
            np.testing.assert_array_equal(back[case][name], p)


def test_csv_with_extra_columns_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "predicted.csv"
    # what a spreadsheet program saves: a UTF-8 byte-order mark, extra columns, other column order
    path.write_bytes("\ufeffname,case,x,y,z,i,j,k,confidence\n"
                     "apex,ct_train_1001,-12.5,40.25,7,10,20,30,0.93\n"
                     "mitral_valve,ct_train_1001,1,2,3,4,5,6,0.5\n"
                     "apex,ct_train_1002, 5.5 ,-6,1e2,1,2,3,0.1\n".encode("utf-8"))
    table = read_landmark_csv(path)
    assert list(table) == ["ct_train_1001", "ct_train_1002"]
    np.testing.assert_array_equal(table["ct_train_1001"]["apex"], [-12.5, 40.25, 7.0])
    np.testing.assert_array_equal(table["ct_train_1001"]["mitral_valve"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(table["ct_train_1002"]["apex"], [5.5, -6.0, 100.0])
    rows = read_landmark_table(path)
    assert len(rows) == 3
    assert rows[0]["confidence"] == "0.93" and rows[2]["k"] == "3"
    assert rows[0]["x"] == -12.5 and isinstance(rows[0]["x"], float)
    # format_landmark_rows writes such tables back, extra columns in the given order
    text = format_landmark_rows(rows, extra_columns=["confidence", "i"])
    assert text.splitlines()[0] == "case,name,x,y,z,confidence,i"
    assert text.splitlines()[1] == "ct_train_1001,apex,-12.5000,40.2500,7.0000,0.93,10"


@pytest.mark.parametrize("body, message", [
    ("case,name,x,y,z\nc1,apex,1,nan,3\n", r"line 2.*NaN"),
    ("case,name,x,y,z\nc1,apex,1,2,3\nc1,mitral,1,2,NaN\n", r"line 3.*NaN"),
    ("case,name,x,y,z\nc1,apex,1,two,3\n", r"non-numeric"),
    ("case,name,x,y\nc1,apex,1,2\n", r"lacks the column.*'z'"),
    ("case,name,x,y,z\nc1,apex,1,2,3\nc1,apex,4,5,6\n", r"appears twice"),
    ("case,name,x,y,z\n", r"no landmarks"),
    ("case,name,x,y,z\n,apex,1,2,3\n", r"empty case"),
])
def test_bad_csv_names_the_file(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(LandmarkFileError, match=message) as info:
        read_landmark_csv(path)
    assert str(path) in str(info.value)


def test_missing_csv_names_the_file(tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(LandmarkFileError, match=re.escape(str(path))):
        read_landmark_csv(path)


# ---------------------------------------------------------------------------------------------- sphere masks
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_sphere_mask_round_trip_within_half_a_voxel(tmp_path, name):
    geometry = grid(name)
    rng = np.random.default_rng(sorted(GRIDS).index(name))
    size = np.asarray(geometry.size)
    worst = 0.0
    for n in range(6):
        # off-grid centres well inside the image
        center = geometry.index_to_world(rng.uniform(0.3 * size, 0.7 * size))
        radius = [3.0, 1.5 * max(geometry.spacing), 5.0][n % 3]
        path = tmp_path / f"{name}_{n}.nii.gz"
        write_sphere_mask(path, geometry, center, radius)
        mask = sitk.ReadImage(str(path))
        assert ImageGeometry.from_image(mask).same_grid_as(geometry)
        array = sitk.GetArrayFromImage(mask)
        assert set(np.unique(array).tolist()) == {0, 1}
        # every marked voxel centre lies within the radius, and the ball is a ball (volume within 35 %)
        marked = geometry.array_index_to_world(np.argwhere(array > 0).astype(float))
        assert np.linalg.norm(marked - center, axis=1).max() <= radius + 1e-6
        expected_voxels = 4 / 3 * math.pi * radius ** 3 / np.prod(geometry.spacing)
        assert abs(len(marked) - expected_voxels) < 0.35 * expected_voxels + 2
        found = read_sphere_mask(path, reference=geometry)
        assert found.shape == (3,)
        worst = max(worst, voxel_distance(geometry, found, center))
        # the landmark file dispatcher agrees
        by_name = read_landmark_file(path, name="apex", reference=geometry)
        np.testing.assert_array_equal(by_name["apex"], found)
    assert worst < 0.5, f"sphere-mask centroid off by {worst:.3f} voxel"


def test_sphere_mask_on_a_voxel_centre_is_exact(tmp_path):
    geometry = grid("oblique_flipped_anisotropic")
    center = geometry.index_to_world([12, 33, 9])
    path = tmp_path / "m.nii.gz"
    write_sphere_mask(path, geometry, center, 4.0)
    np.testing.assert_allclose(read_sphere_mask(path, geometry), center, atol=1e-9)


def test_sphere_mask_written_by_another_tool_any_label_value_and_type(tmp_path):
    """ITK-SNAP saves its label number (here 7) in whatever pixel type; the centroid is what counts."""
    geometry = grid("mmwhs_flip_y_anisotropic")
    center = geometry.index_to_world([20.0, 31.0, 14.0])
    ball = sitk.GetArrayFromImage(render_sphere_mask(geometry, center, 2.5, label=7))
    assert set(np.unique(ball).tolist()) == {0, 7}
    for dtype in (np.int16, np.float32):
        path = tmp_path / f"itksnap_{np.dtype(dtype).name}.nii.gz"
        sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(ball.astype(dtype))), str(path))
        np.testing.assert_allclose(read_sphere_mask(path, geometry), center, atol=1e-6)


def _mask_path(tmp_path, geometry, array, name="mask.nii.gz"):
    path = tmp_path / name
    sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(array)), str(path))
    return path


def test_sphere_mask_errors_name_the_file(tmp_path):
    geometry = grid("oblique_anisotropic")
    shape = geometry.size[::-1]
    # empty
    empty = _mask_path(tmp_path, geometry, np.zeros(shape, np.uint8), "empty.nii.gz")
    with pytest.raises(LandmarkFileError, match=re.escape(str(empty)) + ".*empty"):
        read_sphere_mask(empty)
    # two separate blobs (diagonal neighbours count as one blob; a one-voxel gap does not)
    two = np.zeros(shape, np.uint8)
    two[5:8, 5:8, 5:8] = 1
    two[5:8, 5:8, 9:12] = 1
    two_blobs = _mask_path(tmp_path, geometry, two, "two_blobs.nii.gz")
    with pytest.raises(LandmarkFileError, match=re.escape(str(two_blobs)) + ".*2 separate blobs"):
        read_sphere_mask(two_blobs)
    touching = np.zeros(shape, np.uint8)
    touching[5, 5, 5] = touching[6, 6, 6] = 1
    np.testing.assert_allclose(read_sphere_mask(_mask_path(tmp_path, geometry, touching, "diag.nii.gz")),
                               geometry.array_index_to_world([5.5, 5.5, 5.5]), atol=1e-9)
    # NaN in a float mask
    nan = np.zeros(shape, np.float32)
    nan[3, 3, 3] = 1
    nan[10, 10, 10] = np.nan
    nan_path = _mask_path(tmp_path, geometry, nan, "nan.mha")  # NIfTI writing turns NaN into 0
    with pytest.raises(LandmarkFileError, match=re.escape(str(nan_path)) + ".*NaN"):
        read_sphere_mask(nan_path)
    # unreadable
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file at all" * 20)
    with pytest.raises(LandmarkFileError, match=re.escape(str(broken)) + ".*cannot read"):
        read_sphere_mask(broken)


@pytest.mark.parametrize("change", ["origin", "spacing", "size", "direction"])
def test_sphere_mask_on_another_grid_than_its_image_is_refused(tmp_path, change):
    image = grid("mmwhs_flip_y_anisotropic")
    other = {
        "origin": ImageGeometry((image.origin[0] + 2.0, image.origin[1], image.origin[2]), image.spacing,
                                image.direction, image.size),
        "spacing": ImageGeometry(image.origin, (0.5, 0.5, 0.625), image.direction, image.size),
        "size": ImageGeometry(image.origin, image.spacing, image.direction, (60, 60, 51)),
        "direction": ImageGeometry(image.origin, image.spacing, tuple(np.eye(3).ravel()), image.size),
    }[change]
    path = tmp_path / f"mask_{change}.nii.gz"
    write_sphere_mask(path, other, other.index_to_world([30, 30, 25]), 3.0)
    with pytest.raises(LandmarkFileError, match=re.escape(str(path)) + ".*grid differs from its image"):
        read_sphere_mask(path, reference=image)
    read_sphere_mask(path)  # without a reference it is a valid mask


def test_write_sphere_mask_refuses_a_centre_outside_the_image(tmp_path):
    geometry = grid("identity_isotropic")
    path = tmp_path / "outside.nii.gz"
    # 2 mm beyond the last voxel: a clipped ball would still have voxels but a wrong centroid
    with pytest.raises(ValueError, match="outside the image"):
        write_sphere_mask(path, geometry, geometry.index_to_world([41.0, 10, 10]), 5.0)
    assert not path.exists()


def test_dispatch_and_distance(tmp_path):
    geometry = grid("identity_isotropic")
    mask = tmp_path / "c.nii.gz"
    write_sphere_mask(mask, geometry, geometry.index_to_world([10, 11, 12]), 3.0)
    with pytest.raises(ValueError, match=re.escape(str(mask)) + ".*say which landmark"):
        read_landmark_file(mask)
    markups = tmp_path / "c.mrk.json"
    write_markups(markups, {"apex": [1.0, 2.0, 3.0]})
    np.testing.assert_array_equal(read_landmark_file(markups)["apex"], [1.0, 2.0, 3.0])
    other = tmp_path / "c.txt"
    other.write_text("1,2,3")
    with pytest.raises(LandmarkFileError, match=re.escape(str(other)) + ".*unknown landmark file type"):
        read_landmark_file(other)
    assert landmark_error_mm([0, 0, 0], [3, 4, 12]) == 13.0
