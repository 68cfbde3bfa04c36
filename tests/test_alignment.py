"""nnUNetv2_landmark_align: transform recovery, its direction on disk, surfaces, resampling, errors, the CLI."""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import meshio
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from nnunet_landmark import alignment, surfaces
from nnunet_landmark.alignment import AlignmentError
from nnunet_landmark.geometry import ImageGeometry, lps_to_ras
from nnunet_landmark.landmark_files import LandmarkFileError, format_landmark_rows, write_landmark_csv, write_markups
from nnunet_landmark.phantoms import generate_phantom
from tests.conftest import run_cli

NAMES = ("apex", "mitral_valve", "aortic_valve", "tricuspid_valve", "pulmonary_valve")


def _rigid(seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A random rotation (any angle) times ``scale`` and a translation of up to 100 mm: p_moving = A p_fixed + t."""
    rng = np.random.default_rng(seed)
    return scale * Rotation.random(random_state=seed).as_matrix(), rng.uniform(-100, 100, size=3)


def _landmarks(seed: int, n: int, center=(0.0, 0.0, 0.0)) -> "OrderedDict[str, np.ndarray]":
    rng = np.random.default_rng(1000 + seed)
    return OrderedDict((NAMES[i], np.asarray(center) + rng.uniform(-50, 50, size=3)) for i in range(n))


def _map(matrix: np.ndarray, translation: np.ndarray, landmarks: dict) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, matrix @ v + translation) for k, v in landmarks.items())


def _grid(rotation_degrees, flip, spacing, size, center) -> ImageGeometry:
    direction = Rotation.from_euler("xyz", rotation_degrees, degrees=True).as_matrix() @ np.diag(flip)
    origin = np.asarray(center) - direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    return ImageGeometry(tuple(origin), tuple(spacing), tuple(direction.ravel()), tuple(size))


def _world_grid(geometry: ImageGeometry) -> np.ndarray:
    """World position of every voxel centre, in SimpleITK array order (z, y, x, 3)."""
    nx, ny, nz = geometry.size
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return geometry.index_to_world(np.stack([i, j, k], axis=-1).astype(np.float64))


def _ellipsoid(geometry: ImageGeometry, center, axes: np.ndarray, radii, label: int = 1) -> sitk.Image:
    """A label image whose voxels with centres inside the ellipsoid (rows of ``axes`` = its axes) are ``label``."""
    d = (_world_grid(geometry) - np.asarray(center)) @ np.asarray(axes).T / np.asarray(radii)
    array = np.where(np.sum(d ** 2, axis=-1) <= 1, label, 0).astype(np.uint8)
    return geometry.apply_to(sitk.GetImageFromArray(array))


# ------------------------------------------------------------------------------------------ recovery
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [1.0, 0.8, 1.3])
def test_known_transform_is_recovered_from_exact_landmarks(seed, scale):
    matrix, translation = _rigid(seed, scale)
    fixed = np.array(list(_landmarks(seed, 3 + seed).values()))
    moving = fixed @ matrix.T + translation
    transform = alignment.fit_landmark_transform(fixed, moving, scale=scale != 1.0)
    assert transform.GetName() == ("Similarity3DTransform" if scale != 1.0 else "VersorRigid3DTransform")
    # anywhere within 150 mm, not only at the landmarks
    probes = np.random.default_rng(seed).uniform(-150, 150, size=(200, 3))
    fitted = alignment.transform_matrix(transform)
    assert np.max(np.linalg.norm(alignment.apply_matrix(fitted, probes) - (probes @ matrix.T + translation),
                                 axis=1)) < 1e-3
    assert np.max(alignment.landmark_residuals(transform, fixed, moving)) < 1e-6
    # the 4 x 4 matrix is what SimpleITK itself applies
    assert np.allclose([transform.TransformPoint(p) for p in probes[:20].tolist()],
                       alignment.apply_matrix(fitted, probes[:20]), atol=1e-9)
    if scale != 1.0:
        assert transform.GetScale() == pytest.approx(scale, abs=1e-9)


def test_rigid_fit_of_a_scaled_pair_is_not_silently_scaled():
    matrix, translation = _rigid(4, 1.1)
    fixed = np.array(list(_landmarks(4, 4).values()))
    transform = alignment.fit_landmark_transform(fixed, fixed @ matrix.T + translation, scale=False)
    rotation = alignment.transform_matrix(transform)[:3, :3]
    assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)  # rigid: no scale crept in


# ------------------------------------------------------------------------------------------ direction on disk
def test_written_tfm_maps_fixed_points_into_the_moving_space_as_reported(tmp_path):
    matrix, translation = _rigid(7)
    fixed = _landmarks(7, 4)
    moving = _map(matrix, translation, fixed)
    write_markups(tmp_path / "ours.mrk.json", moving)
    # theirs in RAS: the reader converts, positions stay LPS throughout
    _write_ras_markups(tmp_path / "theirs.mrk.json", fixed)
    report = alignment.align(tmp_path / "ours.mrk.json", tmp_path / "theirs.mrk.json", tmp_path / "t" / "transform.tfm")

    written = json.loads((tmp_path / "t" / "transform.json").read_text())
    assert written["direction"].startswith("maps points of the fixed space into the moving space")
    assert written["transform_file"] == "transform.tfm" and written["transform_type"] == "VersorRigid3DTransform"
    transform = sitk.ReadTransform(str(tmp_path / "t" / "transform.tfm"))
    fixed_points = np.array(list(fixed.values()))
    moving_points = np.array(list(moving.values()))
    # fixed -> moving, the ITK resampling direction, exactly
    assert np.max(np.abs(np.array([transform.TransformPoint(p) for p in fixed_points.tolist()]) - moving_points)) < 1e-6
    assert np.max(np.abs(np.array([transform.GetInverse().TransformPoint(p) for p in moving_points.tolist()])
                         - fixed_points)) < 1e-6
    # the JSON's matrices say the same
    to_moving = np.array(written["fixed_to_moving_matrix"])
    to_fixed = np.array(written["moving_to_fixed_matrix"])
    assert np.max(np.abs(alignment.apply_matrix(to_moving, fixed_points) - moving_points)) < 1e-6
    assert np.max(np.abs(alignment.apply_matrix(to_fixed, moving_points) - fixed_points)) < 1e-6
    assert np.allclose(to_moving[:3, :3], matrix, atol=1e-9) and np.allclose(to_moving[:3, 3], translation, atol=1e-6)
    assert [lm["name"] for lm in written["landmarks"]] == list(fixed)
    assert written["fre_rms_mm"] < 1e-6 and report["fre_rms_mm"] == written["fre_rms_mm"]
    assert written["coordinate_system"] == "LPS" and written["units"] == "mm"


def _write_ras_markups(path: Path, landmarks: dict) -> None:
    """A Slicer markups file in RAS (what some tools still write)."""
    write_markups(path, OrderedDict((k, lps_to_ras(v)) for k, v in landmarks.items()))
    doc = json.loads(path.read_text())
    doc["markups"][0]["coordinateSystem"] = "RAS"
    path.write_text(json.dumps(doc))


# ------------------------------------------------------------------------------------------ residuals, leave-one-out
def test_leave_one_out_error_of_a_displaced_landmark_is_its_displacement():
    matrix, translation = _rigid(3)
    fixed = np.array(list(_landmarks(3, 4).values()))
    moving = fixed @ matrix.T + translation
    displacement = np.array([1.2, -0.9, 0.0])  # 1.5 mm
    moving[2] += displacement
    errors, note = alignment.leave_one_out_errors(fixed, moving)
    # the other three are exact, so the transform fitted to them is the true one
    assert errors[2] == pytest.approx(1.5, abs=1e-6)
    assert np.all(errors[[0, 1, 3]] > 1e-3)
    transform = alignment.fit_landmark_transform(fixed, moving)
    residuals = alignment.landmark_residuals(transform, fixed, moving)
    assert 0 < residuals[2] < 1.5  # the fit shares the displacement among all landmarks
    assert np.all(residuals < errors)  # FRE under-estimates the error at a landmark left out


def test_leave_one_out_is_not_available_with_three_landmarks(tmp_path, capsys):
    errors, note = alignment.leave_one_out_errors(np.eye(3) * 40, np.eye(3) * 40)
    assert errors is None and "needs >= 4 landmarks" in note and "rotation about the line" in note
    matrix, translation = _rigid(5)
    fixed = _landmarks(5, 3)
    write_markups(tmp_path / "theirs.mrk.json", fixed)
    write_landmark_csv(tmp_path / "ours.csv", {"ct_1": _map(matrix, translation, fixed)})
    alignment.main(["-moving", str(tmp_path / "ours.csv"), "-fixed", str(tmp_path / "theirs.mrk.json"),
                    "-o", str(tmp_path / "transform.tfm")])
    report = json.loads((tmp_path / "transform.json").read_text())
    assert report["leave_one_out"]["available"] is False and report["leave_one_out"]["rms_mm"] is None
    assert all(lm["leave_one_out_mm"] is None for lm in report["landmarks"])
    printed = capsys.readouterr().out
    assert "leave-one-out error not available with 3 landmarks" in printed
    assert printed.count("n/a") == 4  # three landmarks and the RMS row


def test_collinear_subsets_get_nan_in_leave_one_out():
    # four points: dropping the one off the line leaves three on a line
    fixed = np.array([[0.0, 0, 0], [30, 0, 0], [60, 0, 0], [20, 40, 10]])
    errors, note = alignment.leave_one_out_errors(fixed, fixed + 5)
    assert np.isnan(errors[3]) and np.all(errors[:3] < 1e-6) and "collinear" in note


# ------------------------------------------------------------------------------------------ surfaces
GRIDS = {
    "oblique": ((10, -7, 15), (1, 1, 1)),
    "flipped": ((0, 0, 0), (-1, 1, 1)),  # determinant -1
    "oblique_flipped": ((-12, 8, 20), (1, -1, 1)),
    "oblique_rotated_180": ((5, 9, -6), (-1, -1, 1)),
}


@pytest.mark.parametrize("grid", list(GRIDS))
def test_surface_vertices_lie_on_the_label_boundary_in_world_coordinates(grid):
    rotation, flip = GRIDS[grid]
    geometry = _grid(rotation, flip, (0.9, 1.1, 1.6), (56, 48, 40), (20, -10, 35))
    center, radius = np.array([23.0, -8.0, 31.0]), 19.0
    segmentation = _ellipsoid(geometry, center, np.eye(3), (radius,) * 3, label=3)
    vertices, faces = surfaces.label_surface(segmentation, label=3)

    # each vertex sits half-way along a voxel edge whose two voxels are one inside, one outside the label
    index = geometry.world_to_array_index(vertices)
    fractional = np.abs(index - np.round(index))
    on_edge_axis = np.isclose(fractional, 0.5, atol=1e-4)
    assert np.all(on_edge_axis.sum(axis=1) == 1) and np.all(fractional[~on_edge_axis] < 1e-4)
    mask = sitk.GetArrayViewFromImage(segmentation) == 3
    low = np.floor(index + 1e-6).astype(int)
    high = low + on_edge_axis.astype(int)
    low[~on_edge_axis] = np.round(index[~on_edge_axis]).astype(int)
    high[~on_edge_axis] = low[~on_edge_axis]
    assert np.all(mask[tuple(low.T)] != mask[tuple(high.T)])
    # and within half a voxel of the analytic sphere
    distance = np.abs(np.linalg.norm(vertices - center, axis=1) - radius)
    assert distance.max() <= 0.5 * max(geometry.spacing) + 1e-6
    # closed, outward normals: the signed volume is the label's volume
    assert surfaces.mesh_volume(vertices, faces) == pytest.approx(mask.sum() * np.prod(geometry.spacing), rel=0.01)


@pytest.mark.parametrize("suffix", [".vtk", ".stl", ".ply", ".obj"])
def test_surface_files_read_back_in_lps_with_the_space_tag(tmp_path, suffix):
    geometry = _grid((10, -7, 15), (1, -1, 1), (1.0, 1.0, 1.2), (36, 36, 30), (0, 0, 0))
    segmentation = _ellipsoid(geometry, (2.0, -1.0, 1.0), Rotation.from_euler("z", 30, degrees=True).as_matrix(),
                              (14, 10, 8))
    vertices, faces = surfaces.label_surface(segmentation)
    path = tmp_path / f"lv{suffix}"
    surfaces.write_surface(path, vertices, faces)
    assert b"SPACE=LPS" in path.read_bytes()[:200]
    mesh = meshio.read(path)
    triangles = mesh.cells_dict["triangle"]
    tolerance = 1e-4 if suffix == ".stl" else 1e-9  # binary STL stores float32
    assert np.max(np.abs(mesh.points[triangles] - vertices[faces])) < tolerance
    assert surfaces.mesh_volume(mesh.points, triangles) > 0


def test_unknown_label_and_format_are_errors(tmp_path):
    geometry = _grid((0, 0, 0), (1, 1, 1), (1, 1, 1), (20, 20, 20), (0, 0, 0))
    segmentation = _ellipsoid(geometry, (0, 0, 0), np.eye(3), (5, 5, 5), label=2)
    with pytest.raises(surfaces.SurfaceError, match=r"label 1 is absent .*labels present: \[2\]"):
        surfaces.label_surface(segmentation, 1)
    with pytest.raises(surfaces.SurfaceError, match=r"lv\.vtp: unknown surface format"):
        surfaces.write_surface(tmp_path / "lv.vtp", np.zeros((3, 3)), np.array([[0, 1, 2]]))


# ------------------------------------------------------------------------------------------ resampling
def test_resampled_segmentation_overlaps_the_moved_original():
    matrix, translation = _rigid(11)  # p_moving = matrix p_fixed + translation
    moving_geometry = _grid((10, -7, 15), (1, -1, -1), (0.7, 0.7, 1.0), (100, 100, 80), (5, -3, 8))
    center = np.array([7.0, -1.0, 6.0])
    axes = Rotation.from_euler("xyz", [30, 20, -40], degrees=True).as_matrix()
    radii = (28.0, 20.0, 16.0)
    segmentation = _ellipsoid(moving_geometry, center, axes, radii)
    center_fixed = matrix.T @ (center - translation)
    fixed_geometry = _grid((-5, 12, 3), (-1, -1, 1), (0.8, 0.75, 0.9), (100, 100, 100), center_fixed)
    reference = fixed_geometry.apply_to(sitk.Image(list(fixed_geometry.size), sitk.sitkInt16))
    transform = alignment.fit_landmark_transform(
        np.array(list(_landmarks(11, 4).values())), np.array(list(_map(matrix, translation, _landmarks(11, 4)).values())))

    moved = alignment.resample_segmentation(segmentation, reference, transform)
    assert ImageGeometry.from_image(moved).same_grid_as(fixed_geometry)
    assert moved.GetPixelID() == segmentation.GetPixelID()
    # the same ellipsoid, moved into the fixed space analytically and drawn on the fixed grid
    truth = sitk.GetArrayFromImage(_ellipsoid(fixed_geometry, center_fixed, axes @ matrix, radii)).astype(bool)

    def dice(image):
        a = sitk.GetArrayViewFromImage(image).astype(bool)
        return 2 * np.sum(a & truth) / (a.sum() + truth.sum())

    assert dice(moved) > 0.98
    # the other direction lands elsewhere: the test can tell them apart
    wrong = alignment.resample_segmentation(segmentation, reference, transform.GetInverse())
    assert dice(wrong) < 0.2


# ------------------------------------------------------------------------------------------ errors
def _pair(tmp_path, fixed: dict, moving: dict) -> tuple[Path, Path]:
    write_markups(tmp_path / "ours.mrk.json", moving)
    write_markups(tmp_path / "theirs.mrk.json", fixed)
    return tmp_path / "ours.mrk.json", tmp_path / "theirs.mrk.json"


def test_fewer_than_three_common_landmarks_lists_each_files_names(tmp_path):
    fixed = _landmarks(1, 4)
    moving = OrderedDict([("apex", fixed["apex"]), ("mitral_valve", fixed["mitral_valve"]), ("LAA", np.zeros(3))])
    ours, theirs = _pair(tmp_path, fixed, moving)
    with pytest.raises(AlignmentError) as e:
        alignment.align(ours, theirs, tmp_path / "t.tfm")
    message = str(e.value)
    assert "only 2 landmark name(s) in common (apex, mitral_valve)" in message
    assert f"{ours} (moving) holds: apex, mitral_valve, LAA" in message
    assert f"{theirs} (fixed) holds: apex, mitral_valve, aortic_valve, tricuspid_valve" in message
    assert not (tmp_path / "t.tfm").exists()


def test_collinear_landmarks_are_an_error_naming_the_file(tmp_path):
    line = OrderedDict([("apex", np.array([0.0, 0, 0])), ("mitral_valve", np.array([40.0, 20, 10])),
                        ("aortic_valve", np.array([80.0, 40.0, 20.3]))])
    fine = _landmarks(2, 3)
    ours, theirs = _pair(tmp_path, fine, line)
    with pytest.raises(AlignmentError, match=rf"{ours}: the landmarks apex, mitral_valve, aortic_valve are \(nearly\) "
                                              rf"collinear: singular value ratio 0\.00\d+ < 0\.05 .*largest triangle "
                                              rf"area \d+\.\d+ mm\^2"):
        alignment.align(ours, theirs, tmp_path / "t.tfm")


def test_duplicate_names_are_an_error_naming_the_file(tmp_path):
    ours, theirs = _pair(tmp_path, _landmarks(1, 3), _landmarks(1, 3))
    doc = json.loads(theirs.read_text())
    doc["markups"][0]["controlPoints"][1]["label"] = "apex"
    theirs.write_text(json.dumps(doc))
    with pytest.raises(LandmarkFileError, match=rf"{theirs}: landmark 'apex' appears twice"):
        alignment.align(ours, theirs, tmp_path / "t.tfm")
    rows = [{"case": "c", "name": n, "x": 1.0, "y": 2.0, "z": 3.0} for n in ("apex", "mitral_valve", "apex")]
    (tmp_path / "ours.csv").write_text(format_landmark_rows(rows))
    with pytest.raises(LandmarkFileError, match=rf"{tmp_path / 'ours.csv'}: landmark 'apex' of case 'c' appears twice"):
        alignment.align(tmp_path / "ours.csv", ours, tmp_path / "t.tfm")


def test_declared_units_other_than_mm_are_an_error_naming_the_file(tmp_path):
    ours, theirs = _pair(tmp_path, _landmarks(1, 3), _landmarks(1, 3))
    doc = json.loads(theirs.read_text())
    doc["markups"][0]["coordinateUnits"] = "cm"
    theirs.write_text(json.dumps(doc))
    with pytest.raises(LandmarkFileError, match=rf"{theirs}: coordinate units 'cm' are not supported"):
        alignment.align(ours, theirs, tmp_path / "t.tfm")
    rows = [{"case": "c", "name": n, "x": float(v[0]), "y": float(v[1]), "z": float(v[2]), "units": "cm"}
            for n, v in _landmarks(1, 3).items()]
    (tmp_path / "theirs.csv").write_text(format_landmark_rows(rows, extra_columns=["units"]))
    with pytest.raises(LandmarkFileError, match=rf"{tmp_path / 'theirs.csv'}: coordinate units 'cm' \(column 'units'\)"):
        alignment.align(ours, tmp_path / "theirs.csv", tmp_path / "t.tfm")


def test_undeclared_cm_against_mm_is_caught_unless_a_scale_is_asked_for(tmp_path):
    matrix, translation = _rigid(6)
    fixed_mm = _landmarks(6, 4)
    ours, theirs = _pair(tmp_path, OrderedDict((k, v / 10) for k, v in fixed_mm.items()),
                         _map(matrix, translation, fixed_mm))
    with pytest.raises(AlignmentError, match=rf"differ in size by a factor 0\.1 .*{ours} .*{theirs} .*in mm"):
        alignment.align(ours, theirs, tmp_path / "t.tfm")
    report = alignment.align(ours, theirs, tmp_path / "t.tfm", scale=True)
    assert report["scale"] == pytest.approx(10.0, abs=1e-9) and report["fre_rms_mm"] < 1e-6


def test_csv_cases_are_chosen_or_asked_for(tmp_path):
    matrix, translation = _rigid(8)
    fixed = _landmarks(8, 3)
    write_landmark_csv(tmp_path / "ours.csv", {"ct_1": _map(matrix, translation, fixed), "ct_2": fixed})
    write_landmark_csv(tmp_path / "theirs.csv", {"ct_1": fixed, "ct_2": _map(matrix, translation, fixed)})
    with pytest.raises(AlignmentError, match=rf"{tmp_path / 'ours.csv'}: the CSV holds 2 cases \(ct_1, ct_2\); "
                                             rf"say which one with --case"):
        alignment.align(tmp_path / "ours.csv", tmp_path / "theirs.csv", tmp_path / "t.tfm")
    with pytest.raises(AlignmentError, match=rf"{tmp_path / 'ours.csv'}: no case 'ct_9'"):
        alignment.align(tmp_path / "ours.csv", tmp_path / "theirs.csv", tmp_path / "t.tfm", case="ct_9")
    # --case picks the same case in their table when it has it; --fixed-case picks another
    same = alignment.align(tmp_path / "ours.csv", tmp_path / "theirs.csv", tmp_path / "t.tfm", case="ct_1")
    other = alignment.align(tmp_path / "ours.csv", tmp_path / "theirs.csv", tmp_path / "u.tfm", case="ct_2",
                            fixed_case="ct_2")
    assert np.allclose(np.array(same["fixed_to_moving_matrix"])[:3, :3], matrix, atol=1e-9)
    assert np.allclose(np.array(other["moving_to_fixed_matrix"])[:3, :3], matrix, atol=1e-9)


def test_missing_inputs_are_errors_naming_the_file(tmp_path):
    ours, theirs = _pair(tmp_path, _landmarks(1, 3), _landmarks(1, 3))
    with pytest.raises(AlignmentError, match=rf"{tmp_path / 'nope.mrk.json'}: no such landmark file"):
        alignment.align(tmp_path / "nope.mrk.json", theirs, tmp_path / "t.tfm")
    with pytest.raises(AlignmentError, match=rf"{tmp_path / 'mri.nii.gz'}: --fixed-image resamples a segmentation"):
        alignment.align(ours, theirs, tmp_path / "t.tfm", fixed_image=tmp_path / "mri.nii.gz")
    with pytest.raises(AlignmentError, match=rf"{tmp_path / 'seg.nii.gz'}: cannot read the image"):
        alignment.align(ours, theirs, tmp_path / "t.tfm", segmentation=tmp_path / "seg.nii.gz",
                        surface=tmp_path / "lv.vtk")


def test_mirrored_landmark_sets_are_an_error_naming_both_files(tmp_path):
    matrix, translation = _rigid(9)
    fixed = _landmarks(9, 5)
    left_right = np.diag([-1.0, 1.0, 1.0])
    ours, theirs = _pair(tmp_path, OrderedDict((k, left_right @ v) for k, v in fixed.items()),
                         _map(matrix, translation, fixed))
    with pytest.raises(AlignmentError, match=rf"{theirs} looks mirrored against {ours}: the best rotation leaves an "
                                              rf"RMS residual of \d+\.\d mm, a mirror image fits to 0\.00 mm"):
        alignment.align(ours, theirs, tmp_path / "t.tfm")
    assert not (tmp_path / "t.tfm").exists()
    # an RAS file read as LPS is a rotation, not a mirror image: aligned, and the rotation absorbs it
    ours, theirs = _pair(tmp_path, OrderedDict((k, lps_to_ras(v)) for k, v in fixed.items()),
                         _map(matrix, translation, fixed))
    assert alignment.align(ours, theirs, tmp_path / "t.tfm")["fre_rms_mm"] < 1e-6


def test_nothing_is_written_when_an_input_is_wrong(tmp_path):
    matrix, translation = _rigid(10)
    fixed = _landmarks(10, 3, center=(0, 0, 0))
    ours, theirs = _pair(tmp_path, fixed, _map(matrix, translation, fixed))
    geometry = _grid((0, 0, 0), (1, 1, 1), (1, 1, 1), (20, 20, 20), (500, 500, 500))
    sitk.WriteImage(_ellipsoid(geometry, (500, 500, 500), np.eye(3), (5, 5, 5), label=2), str(tmp_path / "seg.nii.gz"))
    with pytest.raises(AlignmentError, match=rf"{ours}: none of the landmarks lies within {tmp_path / 'seg.nii.gz'}"):
        alignment.align(ours, theirs, tmp_path / "t.tfm", segmentation=tmp_path / "seg.nii.gz",
                        surface=tmp_path / "lv.vtk")
    with pytest.raises(AlignmentError, match=rf"{tmp_path / 'seg.nii.gz'}: say what to do with the segmentation"):
        alignment.align(ours, theirs, tmp_path / "t.tfm", segmentation=tmp_path / "seg.nii.gz")
    # our landmarks in the segmentation's image this time, but its label 1 is missing
    near = _grid((0, 0, 0), (1, 1, 1), (4, 4, 4), (40, 40, 40), matrix @ np.zeros(3) + translation)
    sitk.WriteImage(_ellipsoid(near, translation, np.eye(3), (20, 20, 20), label=2), str(tmp_path / "seg.nii.gz"))
    with pytest.raises(AlignmentError, match=rf"{tmp_path / 'seg.nii.gz'}: label 1 is absent"):
        alignment.align(ours, theirs, tmp_path / "t.tfm", segmentation=tmp_path / "seg.nii.gz",
                        surface=tmp_path / "lv.vtk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.mrk.json", "seg.nii.gz", "theirs.mrk.json"]


# ------------------------------------------------------------------------------------------ the command
def test_console_script_end_to_end_on_a_phantom(tmp_path):
    """Our CT phantom and its predicted-style landmarks.csv against an 'MRI' in another pose and grid."""
    phantom = generate_phantom(3, "small", flips=True)
    ct_label = tmp_path / "ct_1.nii.gz"
    sitk.WriteImage(phantom.label, str(ct_label), useCompression=True)
    ours = phantom.landmarks
    rows = [{"case": case, "name": n, "x": float(v[0]), "y": float(v[1]), "z": float(v[2]), "i": 1.0, "j": 2.0,
             "k": 3.0, "confidence": 0.9} for case in ("ct_1", "ct_2") for n, v in ours.items()]
    (tmp_path / "landmarks.csv").write_text(format_landmark_rows(rows, ["i", "j", "k", "confidence"]))

    matrix, translation = _rigid(12)  # p_ct = matrix p_mri + translation
    theirs = OrderedDict((k, matrix.T @ (v - translation)) for k, v in ours.items())
    _write_ras_markups(tmp_path / "mri.mrk.json", theirs)
    lv_center_mri = matrix.T @ (ours["mitral_valve"] + 0.5 * (ours["apex"] - ours["mitral_valve"]) - translation)
    mri_geometry = _grid((4, -6, 9), (1, -1, 1), (1.5, 1.5, 2.0), (80, 80, 70), lv_center_mri)
    sitk.WriteImage(mri_geometry.apply_to(sitk.Image(list(mri_geometry.size), sitk.sitkInt16)),
                    str(tmp_path / "mri.nii.gz"))

    out = tmp_path / "aligned"
    result = run_cli(["nnUNetv2_landmark_align", "-moving", str(tmp_path / "landmarks.csv"), "--case", "ct_1",
                      "-fixed", str(tmp_path / "mri.mrk.json"), "-o", str(out / "transform.tfm"),
                      "--segmentation", str(ct_label), "--fixed-image", str(tmp_path / "mri.nii.gz"),
                      "--surface", str(out / "lv.vtk"), "--label", "500"], timeout=120)
    assert "VersorRigid3DTransform from 3 landmarks" in result.stdout
    assert "maps points of the fixed space into the moving space" in result.stdout
    for name in ours:
        assert name in result.stdout

    report = json.loads((out / "transform.json").read_text())
    # the prediction's landmarks.csv keeps 4 decimals (0.1 micrometre): that is all the rounding there is
    assert report["fre_rms_mm"] < 1e-4 and report["leave_one_out"]["available"] is False
    transform = sitk.ReadTransform(str(out / "transform.tfm"))
    for name in ours:
        assert np.allclose(transform.TransformPoint(theirs[name].tolist()), ours[name], atol=1e-4)

    moved = sitk.ReadImage(str(out / "transform_segmentation.nii.gz"))
    assert ImageGeometry.from_image(moved).same_grid_as(mri_geometry)
    moved_lv = np.sum(sitk.GetArrayViewFromImage(moved) == 500) * np.prod(mri_geometry.spacing)
    ct_lv = np.sum(sitk.GetArrayViewFromImage(phantom.label) == 500) * np.prod(phantom.geometry.spacing)
    assert moved_lv == pytest.approx(ct_lv, rel=0.05)

    mesh = meshio.read(out / "lv.vtk")
    assert b"SPACE=LPS" in (out / "lv.vtk").read_bytes()[:100]
    # the surface is in the MRI's space: the apex there is on it (to a voxel), and its volume is the LV's
    apex_distance = np.min(np.linalg.norm(mesh.points - theirs["apex"], axis=1))
    assert apex_distance < max(phantom.geometry.spacing)
    volume = surfaces.mesh_volume(mesh.points, mesh.cells_dict["triangle"])
    assert volume == pytest.approx(ct_lv, rel=0.02) and report["surface"]["volume_mm3"] == pytest.approx(volume)

    failed = run_cli(["nnUNetv2_landmark_align", "-moving", str(tmp_path / "landmarks.csv"), "-fixed",
                      str(tmp_path / "mri.mrk.json"), "-o", str(out / "t2.tfm")], check=False, timeout=120)
    assert failed.returncode == 1
    assert f"{tmp_path / 'landmarks.csv'}: the CSV holds 2 cases" in failed.stderr and "Traceback" not in failed.stderr


def test_a_csv_in_ras_is_converted_and_an_unknown_or_mixed_system_is_refused(tmp_path):
    matrix, translation = _rigid(12)
    fixed = _landmarks(12, 4)
    write_markups(tmp_path / "ours.mrk.json", _map(matrix, translation, fixed))

    def theirs(systems: list[str]) -> Path:
        path = tmp_path / "theirs.csv"
        rows = ["case,name,x,y,z,coordinate_system"]
        for (name, p), system in zip(fixed.items(), systems):
            q = lps_to_ras(p) if system == "RAS" else p
            rows.append(f"other,{name},{float(q[0])!r},{float(q[1])!r},{float(q[2])!r},{system}")
        path.write_text("\n".join(rows) + "\n")
        return path

    # read as LPS, an RAS file would still fit (a 180-degree turn absorbs it): the column must be honoured
    report = alignment.align(tmp_path / "ours.mrk.json", theirs(["RAS"] * 4), tmp_path / "t.tfm")
    to_moving = np.array(report["fixed_to_moving_matrix"])
    assert np.allclose(to_moving[:3, :3], matrix, atol=1e-9) and np.allclose(to_moving[:3, 3], translation, atol=1e-6)
    assert np.allclose(alignment.load_landmarks(theirs(["LPS", "", "lps", "LPS"]))["apex"], fixed["apex"])
    for systems, shown in ((["RAS", "LPS", "RAS", "RAS"], "['LPS', 'RAS']"), (["IJK"] * 4, "['IJK']")):
        path = theirs(systems)
        with pytest.raises(LandmarkFileError, match=rf"{path}: coordinate system\(s\) {re.escape(shown)} in its rows"):
            alignment.load_landmarks(path)


def test_landmarks_flagged_as_not_credible_are_refused_unless_allowed(tmp_path):
    """Our export marks a landmark without a credible estimate (``status`` in landmarks.csv, ``positionStatus``
    undefined in the markups, the reason in its description): alignment refuses it, naming the case, the landmark
    and the reason, and writes nothing; ``--allow-flagged`` aligns with it anyway."""
    from nnunet_landmark.landmark_export import TABLE_EXTRA_COLUMNS
    from nnunet_landmark.landmark_files import format_landmark_rows

    matrix, translation = _rigid(9)
    fixed = _landmarks(9, 4)
    moving = _map(matrix, translation, fixed)
    write_markups(tmp_path / "theirs.mrk.json", fixed)
    statuses = {"apex": "structure_missing", "mitral_valve": "ok", "aortic_valve": "ok", "tricuspid_valve": "ok"}
    rows = [{"case": case, "name": n, "x": float(p[0]), "y": float(p[1]), "z": float(p[2]),
             "status": statuses[n] if case == "case_2" else "ok"} for case in ("case_1", "case_2")
            for n, p in moving.items()]
    (tmp_path / "landmarks.csv").write_text(format_landmark_rows(rows, TABLE_EXTRA_COLUMNS))
    alignment.align(tmp_path / "landmarks.csv", tmp_path / "theirs.mrk.json", tmp_path / "a" / "t.tfm", case="case_1")
    with pytest.raises(alignment.AlignmentError, match=r"case case_2: landmark\(s\) without a credible estimate: "
                                                       r"apex: structure_missing.*--allow-flagged"):
        alignment.align(tmp_path / "landmarks.csv", tmp_path / "theirs.mrk.json", tmp_path / "b" / "t.tfm",
                        case="case_2")
    assert not (tmp_path / "b").exists()
    report = alignment.align(tmp_path / "landmarks.csv", tmp_path / "theirs.mrk.json", tmp_path / "b" / "t.tfm",
                             case="case_2", allow_flagged=True)
    assert report["fre_rms_mm"] < 1e-3  # the CSV holds 4 decimals
    # the markups our export writes: positionStatus undefined, the reason first in the description
    write_markups(tmp_path / "ours.mrk.json", moving,
                  {"apex": "status=heatmap_flat (the heatmap claims 28.0 mm at its extremum); expected error 9.0 mm"},
                  undefined=["apex"])
    assert alignment.landmark_statuses(tmp_path / "ours.mrk.json")["apex"].startswith("heatmap_flat")
    run = run_cli(["nnUNetv2_landmark_align", "-moving", str(tmp_path / "ours.mrk.json"), "-fixed",
                   str(tmp_path / "theirs.mrk.json"), "-o", str(tmp_path / "c" / "t.tfm")], check=False)
    assert run.returncode == 1 and "apex: heatmap_flat (the heatmap claims 28.0 mm" in run.stderr, run.stderr
    run = run_cli(["nnUNetv2_landmark_align", "-moving", str(tmp_path / "ours.mrk.json"), "-fixed",
                   str(tmp_path / "theirs.mrk.json"), "-o", str(tmp_path / "c" / "t.tfm"), "--allow-flagged"])
    assert (tmp_path / "c" / "t.tfm").is_file()
