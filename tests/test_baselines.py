"""Landmark baselines: geometric tip of a segmentation and the mean position, on shapes and phantoms."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_landmark.evaluation.baselines import (BaselineError, MeanPositionBaseline, apex_from_segmentation,
                                                  image_centre, mean_position_leave_one_out_errors)
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.phantoms import generate_phantom


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def cone_mask(geometry: ImageGeometry, base_centre, tip, base_radius) -> np.ndarray:
    """A solid cone (z, y, x) whose narrow end is ``tip`` (world mm)."""
    nx, ny, nz = geometry.size
    index = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij"), axis=-1)
    world = geometry.index_to_world(index.astype(float))
    axis = np.asarray(tip, float) - base_centre
    length = np.linalg.norm(axis)
    axis /= length
    t = (world - base_centre) @ axis
    radial = np.linalg.norm(world - base_centre - t[..., None] * axis, axis=-1)
    inside = (t >= 0) & (t <= length) & (radial <= base_radius * (1 - t / length))
    return inside.transpose(2, 1, 0)


@pytest.mark.parametrize("reverse", [False, True])
def test_tip_of_a_cone_is_its_narrow_end_whatever_the_direction(reverse):
    geometry = ImageGeometry((-40.0, 25.0, 100.0), (1.0, 1.0, 1.5), tuple((rotation([1, 2, 0.5], 25)
                                                                         @ np.diag([1, -1, 1])).ravel()), (70, 60, 50))
    centre = geometry.index_to_world(np.array([35.0, 30.0, 25.0]))
    direction = rotation([0, 0, 1], 30) @ np.array([1.0, 0.3, 0.4])
    direction /= np.linalg.norm(direction)
    base, tip = centre - 25 * direction, centre + 25 * direction
    if reverse:  # the same cone pointing the other way: the answer follows the taper, not the axis sign
        base, tip = tip, base
    mask = cone_mask(geometry, base, tip, 14.0)
    # a stray blob far away must not matter (largest connected component)
    mask[2:4, 2:4, 2:4] = True
    found = apex_from_segmentation(mask.astype(np.uint8), geometry, label=1)
    assert np.linalg.norm(found - tip) < 2.0
    assert np.linalg.norm(apex_from_segmentation(mask, geometry, 1, method="farthest_voxel") - tip) < 3.0


def test_tip_errors_on_empty_or_unknown_input():
    geometry = ImageGeometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), tuple(np.eye(3).ravel()), (8, 8, 8))
    with pytest.raises(BaselineError, match="no voxel of label 3"):
        apex_from_segmentation(np.zeros((8, 8, 8), np.uint8), geometry, label=3)
    with pytest.raises(ValueError, match="unknown tip method"):
        apex_from_segmentation(np.ones((8, 8, 8), np.uint8), geometry, 1, method="nearest")


def phantom_tip_errors(size: str, seeds) -> dict[str, np.ndarray]:
    errors = {"extreme_cap": [], "farthest_voxel": []}
    for seed in seeds:
        phantom = generate_phantom(seed, size)
        label = sitk.GetArrayFromImage(phantom.label)
        for method in errors:
            tip = apex_from_segmentation(label, phantom.geometry, label=500, method=method)
            errors[method].append(np.linalg.norm(tip - phantom.landmarks["apex"]))
    return {k: np.asarray(v) for k, v in errors.items()}


@pytest.mark.parametrize("size,seeds,max_mean_mm", [("tiny", range(10), 4.5), ("small", range(6), 2.5)])
def test_geometric_tip_on_true_phantom_lv(size, seeds, max_mean_mm):
    """On the true LV masks the cap is closer to the apex than the single farthest voxel (tiny phantoms,
    voxels ~4.5 x 4.5 x 6 mm: mean ~3.1 vs ~4.0 mm; small, ~2.3 x 2.3 x 3 mm: ~1.6 vs ~2.0 mm), hence the
    default ``extreme_cap``. The bounds leave room for phantom changes, not for taking the wrong end (~80 mm)."""
    errors = phantom_tip_errors(size, seeds)
    assert errors["extreme_cap"].mean() < max_mean_mm
    assert errors["extreme_cap"].max() < 2 * max_mean_mm  # never the wrong end (that would be ~70 mm)
    assert errors["extreme_cap"].mean() < errors["farthest_voxel"].mean()


def random_geometry(rng, flip) -> ImageGeometry:
    direction = rotation(rng.normal(size=3), rng.uniform(-10, 10)) @ flip
    return ImageGeometry(tuple(rng.uniform(-500, 500, size=3)), tuple(rng.uniform(0.5, 3.0, size=3)),
                         tuple(direction.ravel()), tuple(int(s) for s in rng.integers(40, 200, size=3)))


@pytest.mark.parametrize("frame", ["world", "image"])
def test_mean_position_is_exact_for_a_constant_offset(frame):
    """Origins differ by metres and axes are flipped: a landmark at a fixed offset from the image centre
    (in the baseline's frame) is predicted exactly."""
    rng = np.random.default_rng(4)
    flips = [np.eye(3), np.diag([1.0, -1.0, 1.0]), np.diag([-1.0, -1.0, 1.0])]
    offset = np.array([12.0, -30.0, 7.5])
    cases = []
    for n in range(7):
        geometry = random_geometry(rng, flips[n % 3])
        shift = offset if frame == "world" else geometry.direction_matrix @ offset
        cases.append((geometry, image_centre(geometry) + shift))
    model = MeanPositionBaseline(frame).fit(cases[:-1])
    np.testing.assert_allclose(model.mean_offset, offset, atol=1e-9)
    np.testing.assert_allclose(model.predict(cases[-1][0]), cases[-1][1], atol=1e-9)
    assert model.num_cases == 6
    np.testing.assert_allclose(mean_position_leave_one_out_errors(cases, frame), 0, atol=1e-9)


def test_mean_position_errors():
    geometry = ImageGeometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), tuple(np.eye(3).ravel()), None)
    with pytest.raises(BaselineError, match="fit"):
        MeanPositionBaseline().predict(geometry)
    with pytest.raises(BaselineError, match="image size"):
        MeanPositionBaseline().fit([(geometry, (1.0, 2.0, 3.0))])
    with pytest.raises(BaselineError, match="at least one"):
        MeanPositionBaseline().fit([])


def test_mean_position_leave_one_out_on_phantoms():
    """Phantoms have random axis flips: offsets in world axes are anatomy, in image axes they get mirrored.
    Measured on 12 tiny phantoms: world ~17-18 mm mean, image axes ~40-43 mm."""
    cases = []
    for seed in range(12):
        phantom = generate_phantom(seed, "tiny")
        cases.append((phantom.geometry, phantom.landmarks["apex"]))
    world = mean_position_leave_one_out_errors(cases, "world")
    image = mean_position_leave_one_out_errors(cases, "image")
    assert world.mean() < 25.0
    assert world.mean() < image.mean()


def test_fit_mean_positions_on_a_raw_dataset_three_landmarks(tmp_path):
    """One baseline per landmark from a raw dataset's headers and landmarksTr; every landmark sits at its own
    fixed world offset from the image centre, so each is recovered exactly, whatever origin and axis flips."""
    from nnunet_landmark.evaluation.baselines import fit_mean_positions
    from nnunet_landmark.landmark_files import write_markups

    rng = np.random.default_rng(7)
    flips = [np.eye(3), np.diag([1.0, -1.0, 1.0]), np.diag([-1.0, -1.0, 1.0])]
    offsets = {"apex": np.array([12.0, -30.0, 7.5]), "mitral_valve": np.array([-3.0, 4.0, 20.0]),
               "aortic_valve": np.array([0.5, 9.0, -11.0])}
    for sub in ("imagesTr", "landmarksTr"):
        (tmp_path / sub).mkdir()
    (tmp_path / "dataset.json").write_text('{"labels": {"background": 0, "LV": 1}, "file_ending": ".nii.gz", '
                                           '"landmarks": ["apex", "mitral_valve", "aortic_valve"]}')
    geometries = {}
    for n in range(5):
        drawn = random_geometry(rng, flips[n % 3])
        drawn = ImageGeometry(drawn.origin, drawn.spacing, drawn.direction, (6, 5, 4))
        path = tmp_path / "imagesTr" / f"case_{n}_0000.nii.gz"
        sitk.WriteImage(drawn.apply_to(sitk.Image(6, 5, 4, sitk.sitkInt16)), str(path))
        geometries[n] = ImageGeometry.from_file(path)  # the header as stored (float32 in NIfTI)
        write_markups(tmp_path / "landmarksTr" / f"case_{n}.mrk.json",
                      {k: image_centre(geometries[n]) + v for k, v in offsets.items()})
    models = fit_mean_positions(tmp_path, [f"case_{n}" for n in range(4)])
    assert list(models) == ["apex", "mitral_valve", "aortic_valve"]  # dataset.json's order
    for name, offset in offsets.items():
        assert models[name].num_cases == 4
        np.testing.assert_allclose(models[name].mean_offset, offset, atol=1e-9)
        np.testing.assert_allclose(models[name].predict(geometries[4]), image_centre(geometries[4]) + offset,
                                   atol=1e-9)
    assert list(fit_mean_positions(tmp_path, ["case_0"], ["aortic_valve"])) == ["aortic_valve"]
    (tmp_path / "dataset.json").write_text('{"labels": {"background": 0, "LV": 1}}')
    with pytest.raises(BaselineError, match="no 'landmarks'"):
        fit_mean_positions(tmp_path, ["case_0"])


def test_base_centre_is_the_middle_of_the_flat_end_and_the_apex_the_other_end():
    """A half-ellipsoid cut flat at x = 0 (semi-axes 30, 12, 10 mm, 1 mm voxels): the base rule returns the centre of
    the cut disc, the tip rule the far end, each within a voxel."""
    from nnunet_landmark.evaluation.baselines import apex_from_segmentation, base_from_segmentation

    shape = (40, 40, 50)  # z, y, x
    geometry = ImageGeometry(origin=(-5.0, -20.0, -20.0), spacing=(1.0, 1.0, 1.0), direction=tuple(np.eye(3).ravel()),
                             size=shape[::-1])
    index = np.argwhere(np.ones(shape, bool)).astype(float)
    world = geometry.array_index_to_world(index)
    x, y, z = world.T
    mask = ((x / 30) ** 2 + (y / 12) ** 2 + (z / 10) ** 2 <= 1) & (x >= 0)
    labels = mask.reshape(shape).astype(np.uint8)
    base = base_from_segmentation(labels, geometry, 1)
    apex = apex_from_segmentation(labels, geometry, 1)
    assert np.linalg.norm(base - [-0.5, 0, 0]) < 1.0, base  # the flat face's boundary is half a voxel before x = 0
    assert np.linalg.norm(apex - [30.0, 0, 0]) < 1.0, apex


@pytest.mark.parametrize("toward_start", [True, False])
def test_tube_end_is_the_centre_of_the_end_facing_the_other_label(toward_start):
    """A tilted cylinder (radius 6 mm, 40 mm long, 1 mm voxels) with a ball beyond one of its ends: the rule returns
    the centre of that end's last voxel layer, within a voxel of the true end centre, and not the other end."""
    from nnunet_landmark.evaluation.baselines import tube_end_from_segmentation

    shape = (50, 50, 70)  # z, y, x
    geometry = ImageGeometry(origin=(-35.0, -25.0, -25.0), spacing=(1.0, 1.0, 1.0),
                             direction=tuple(rotation([0, 0, 1], 20).ravel()), size=shape[::-1])
    world = geometry.array_index_to_world(np.argwhere(np.ones(shape, bool)).astype(float)).reshape(*shape, 3)
    axis = np.array([1.0, 0.3, 0.2]) / np.linalg.norm([1.0, 0.3, 0.2])
    start, end = -20 * axis, 20 * axis
    t = (world - start) @ axis
    radial = np.linalg.norm(world - start - t[..., None] * axis, axis=-1)
    labels = ((t >= 0) & (t <= 40) & (radial <= 6)).astype(np.uint8)
    facing = start if toward_start else end
    ball = np.linalg.norm(world - (facing + (-9 if toward_start else 9) * axis), axis=-1) <= 5
    labels[ball] = 2
    point = tube_end_from_segmentation(labels, geometry, label=1, toward=2)
    assert np.linalg.norm(point - facing) < 1.0, (point, facing)
    with pytest.raises(BaselineError, match="no voxel of label 3"):
        tube_end_from_segmentation(labels, geometry, label=1, toward=3)


def test_valve_rules_on_true_phantom_labels():
    """The demo's valve rules on the phantoms' own labels (small preset, ~2.3 x 2.3 x 3 mm voxels): the mitral valve
    from the LV/LA interface, the aortic valve from the aorta's end toward the LV, both within a few mm (the
    interface of the aorta and the LV cavity would be 6-8 mm off, the LV's base centre ~25 mm)."""
    from nnunet_landmark.evaluation.study.test_set import segmentation_rules
    from nnunet_landmark.mmwhs import STRUCTURES

    rules = segmentation_rules(STRUCTURES)
    assert rules["mitral_valve"][0] == "centre of the LV/LA interface"
    assert rules["aortic_valve"][0] == "centre of the aorta's end toward the LV"
    errors = {"mitral_valve": [], "aortic_valve": []}
    for seed in range(4):
        phantom = generate_phantom(seed, "small")
        label = sitk.GetArrayFromImage(phantom.label)
        label = np.where(label == 500, 1, np.where(label == 1, 500, label))  # the rules take the LV as label 1
        for name in errors:
            errors[name].append(np.linalg.norm(rules[name][1](label, phantom.geometry) - phantom.landmarks[name]))
    assert np.mean(errors["mitral_valve"]) < 2.0 and np.max(errors["mitral_valve"]) < 3.0, errors
    assert np.mean(errors["aortic_valve"]) < 2.0 and np.max(errors["aortic_valve"]) < 3.0, errors


def test_valve_rules_fall_back_to_the_lv_base_without_the_neighbouring_structures():
    """An LV-only segmentation (``nnUNetv2_landmark_demo --lv-only``) has no LA or aorta: both valves come from the
    centre of the LV's base, the same point."""
    from nnunet_landmark.evaluation.study.test_set import segmentation_rules
    from nnunet_landmark.evaluation.baselines import base_from_segmentation

    rules = segmentation_rules({"background": 0, "LV_blood_cavity": 1})
    assert [rules[n][0] for n in ("apex", "mitral_valve", "aortic_valve")] == [
        "geometric tip of the LV", "centre of the LV's base", "centre of the LV's base"]
    phantom = generate_phantom(0, "tiny")
    label = (sitk.GetArrayFromImage(phantom.label) == 500).astype(np.uint8)
    expected = base_from_segmentation(label, phantom.geometry, 1)
    for name in ("mitral_valve", "aortic_valve"):
        assert np.array_equal(rules[name][1](label, phantom.geometry), expected)
    assert np.array_equal(rules["apex"][1](label, phantom.geometry), apex_from_segmentation(label, phantom.geometry, 1))
