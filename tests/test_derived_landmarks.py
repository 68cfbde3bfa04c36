"""Landmarks derived from label maps: the rules against independent references on real MM-WHS labels, the
phantoms' own landmarks, and nnUNetv2_convert_MMWHS --derive on a three-landmark dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_data
from nnunet_landmark.dataset_conversion.convert_mmwhs import DERIVATION_RULES, derive_mmwhs_landmarks, main
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.label_landmarks import InterfaceCentre, LabelRuleError, derive_landmarks, interface_centre
from nnunet_landmark.landmark_files import read_markups
from nnunet_landmark.phantom_families import write_mmwhs_phantoms
from nnunet_landmark.phantoms import generate_phantom
from nnunet_landmark.raw_dataset import DatasetError

THREE = ["apex", "mitral_valve", "aortic_valve"]
VALVES = {"mitral_valve": (500, 420), "aortic_valve": (500, 820)}


def reference_interface_centre(image: sitk.Image, a: int, b: int) -> np.ndarray:
    """Mean of the midpoints of all face-adjacent (a, b) voxel pairs, each mapped by SimpleITK itself.

    A different method from the rule (which averages the voxels of ``a`` touching ``b``, in its largest piece):
    pairs, not voxels, so a voxel touching the other label on two faces counts twice, and midpoints lie half a
    voxel across the interface.
    """
    array = sitk.GetArrayViewFromImage(image)
    midpoints = []
    for axis in range(3):
        low = [slice(None)] * 3
        high = [slice(None)] * 3
        low[axis], high[axis] = slice(0, -1), slice(1, None)
        lo, hi = array[tuple(low)], array[tuple(high)]
        pairs = np.argwhere(((lo == a) & (hi == b)) | ((lo == b) & (hi == a))).astype(np.float64)
        pairs[:, axis] += 0.5
        midpoints.append(pairs)
    zyx = np.concatenate(midpoints)
    world = [image.TransformContinuousIndexToPhysicalPoint([float(v) for v in p[::-1]]) for p in zyx]
    return np.mean(world, axis=0)


def reference_apex(image: sitk.Image, mitral: np.ndarray) -> np.ndarray:
    """The voxel of the largest LV-cavity piece (SimpleITK's connected components) farthest from ``mitral``."""
    cavity = sitk.RelabelComponent(sitk.ConnectedComponent(image == 500, False), sortByObjectSize=True) == 1
    zyx = np.argwhere(sitk.GetArrayViewFromImage(cavity))
    # the farthest voxel is a corner of the convex hull; SimpleITK maps the candidates near the far end
    direction = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    rough = zyx[:, ::-1] @ direction.T + np.asarray(image.GetOrigin())
    candidates = zyx[np.argsort(np.linalg.norm(rough - mitral, axis=1))[-200:]]
    world = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in p[::-1]]) for p in candidates])
    return world[np.argmax(np.linalg.norm(world - mitral, axis=1))]


@pytest.fixture(scope="module")
def real_labels():
    """The two real label maps, cropped to the heart (+3 voxels) by SimpleITK, which keeps the world positions."""
    out = {}
    for case in ("ct_train_1002", "ct_train_1005"):
        image = sitk.ReadImage(str(shared_data("mmwhs_ct_labels", f"{case}_label.nii.gz")))
        nonzero = np.argwhere(sitk.GetArrayViewFromImage(image))
        lo = np.maximum(nonzero.min(axis=0) - 3, 0)[::-1]
        hi = (nonzero.max(axis=0) + 4)[::-1]
        image = image[int(lo[0]):int(hi[0]), int(lo[1]):int(hi[1]), int(lo[2]):int(hi[2])]
        out[case] = (image, sitk.GetArrayFromImage(image), ImageGeometry.from_image(image))
    return out


def test_rules_match_independent_references_on_real_mmwhs_labels(real_labels):
    for case, (image, array, geometry) in real_labels.items():
        derived = derive_mmwhs_landmarks(array, geometry, THREE)
        assert list(derived) == THREE
        reference = {name: reference_interface_centre(image, *labels) for name, labels in VALVES.items()}
        reference["apex"] = reference_apex(image, reference["mitral_valve"])
        # measured: mitral / aortic / apex 1.21 / 0.79 / 0.00 mm (1002), 0.65 / 0.30 / 0.00 mm (1005): the valves' two
        # definitions of an interface's centre differ by up to a voxel, the apex's agree
        for name, bound in {"apex": 0.5, "mitral_valve": 2.0, "aortic_valve": 2.0}.items():
            error = np.linalg.norm(derived[name] - reference[name])
            assert error < bound, f"{case} {name}: rule {derived[name]} vs reference {reference[name]}: {error:.2f} mm"
        # anatomy: the apex lies left (+x), anterior (-y) and inferior (-z) of the mitral valve, 70-100 mm away
        d = derived["apex"] - derived["mitral_valve"]
        assert d[0] > 0 and d[1] < 0 and d[2] < 0, f"{case}: apex - mitral valve = {d}"
        assert 70.0 <= np.linalg.norm(d) <= 100.0, f"{case}: apex-mitral {np.linalg.norm(d):.1f} mm"
        valves = np.linalg.norm(derived["aortic_valve"] - derived["mitral_valve"])
        assert 15.0 <= valves <= 40.0, f"{case}: aortic-mitral {valves:.1f} mm"
        # three landmarks span a plane (rigid alignment needs them non-collinear): >= 10 mm off the line
        u = d / np.linalg.norm(d)
        off_line = derived["aortic_valve"] - derived["mitral_valve"]
        assert np.linalg.norm(off_line - (off_line @ u) * u) > 10.0
        # each valve centre lies between its two structures: both labels within 8 mm
        for name, (a, b) in VALVES.items():
            voxel = np.round(geometry.world_to_array_index(derived[name])).astype(int)
            window = array[tuple(slice(i - 8, i + 9) for i in voxel)]
            assert (window == a).any() and (window == b).any(), f"{case} {name}"


def test_interface_centre_on_an_oblique_grid():
    """Two blocks meeting in a plane: the rule gives the centre of the touching face layer of the first label."""
    label = np.zeros((10, 12, 14), dtype=np.int16)
    label[2:5, 3:9, 4:12] = 7  # z 2..4
    label[5:8, 3:7, 4:12] = 9  # touches the top layer (z = 4) of 7 where y is 3..6
    label[0, 0, 0] = 7  # a stray voxel of 7 away from 9: not in the largest piece, ignored
    rotation = sitk.VersorTransform([0.3, -0.2, 0.9], 0.4).GetMatrix()
    image = sitk.GetImageFromArray(label)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-30.0, 12.0, 101.0))
    image.SetDirection(rotation)
    geometry = ImageGeometry.from_image(image)
    # the voxels of 7 touching 9: z = 4, y = 3..6, x = 4..11 -> centre (x, y, z) = (7.5, 4.5, 4)
    expected = image.TransformContinuousIndexToPhysicalPoint((7.5, 4.5, 4.0))
    np.testing.assert_allclose(interface_centre(label, geometry, 7, 9), expected, atol=1e-9)
    # touching only along an edge (a coarse grid): the voxels of 7 next to 9 across that edge
    edge = np.where(label == 7, 7, 0)
    edge[5, 9, 4:12] = 9  # above z = 4 and beside y = 8: shares only an edge with the 7 voxels at (4, 8, x)
    np.testing.assert_allclose(interface_centre(edge, geometry, 7, 9),
                               image.TransformContinuousIndexToPhysicalPoint((7.5, 8.0, 4.0)), atol=1e-9)
    apart = np.where(label == 7, 7, 0)
    apart[6:10, 3:7, 4:12] = 9  # a gap of one slice between them
    with pytest.raises(LabelRuleError, match=r"^label 7 and label 9 do not touch$"):
        interface_centre(apart, geometry, 7, 9)
    with pytest.raises(LabelRuleError, match="no LA \\(label 420\\)"):
        derive_landmarks(label, geometry, {"mitral_valve": InterfaceCentre(7, 420)}, ["mitral_valve"], {420: "LA"})


def test_phantom_landmarks_against_the_rules():
    """The phantoms' mitral valve and apex are what the rules give on their labels, up to the voxel grid.

    The phantom's aortic valve is the start of the aortic root's axis, which the LV cavity only partly covers, so
    the LV-cavity/aorta interface centre lies 4-12 mm from it on tiny phantoms (7.5 mm on average on 'small'
    phantoms too: a difference of definition, not of resolution). It is bounded here so that it cannot grow.
    """
    distances = {name: [] for name in THREE}
    for seed in range(6):
        phantom = generate_phantom(seed, "tiny")
        derived = derive_mmwhs_landmarks(sitk.GetArrayFromImage(phantom.label), phantom.geometry, THREE)
        half_diagonal = 0.5 * np.linalg.norm(phantom.geometry.spacing)  # 4-5 mm on tiny phantoms
        for name in THREE:
            distances[name].append(np.linalg.norm(derived[name] - phantom.landmarks[name]))
        assert distances["mitral_valve"][-1] < 1.1 * half_diagonal, (seed, distances["mitral_valve"][-1])
        assert distances["apex"][-1] < 1.5 * half_diagonal, (seed, distances["apex"][-1])
        assert 2.0 < distances["aortic_valve"][-1] < 13.0, (seed, distances["aortic_valve"][-1])
    assert np.mean(distances["mitral_valve"]) < 3.5 and np.mean(distances["apex"]) < 4.5, distances
    # seed 51: the LV cavity and the aorta meet only along voxel edges (6 voxels of 5 x 5 x 6.4 mm); the rule
    # still gives the valve, within about one voxel diagonal more than above
    phantom = generate_phantom(51, "tiny")
    derived = derive_mmwhs_landmarks(sitk.GetArrayFromImage(phantom.label), phantom.geometry, ["aortic_valve"])
    assert np.linalg.norm(derived["aortic_valve"] - phantom.landmarks["aortic_valve"]) < 15.0


def test_rules_that_cannot_apply_are_errors_naming_the_structure(real_labels):
    image, array, geometry = real_labels["ct_train_1005"]
    with pytest.raises(DatasetError, match=r"cannot derive 'aortic_valve'.*no ascending_aorta \(label 820\)"):
        derive_mmwhs_landmarks(np.where(array == 820, 0, array), geometry, ["aortic_valve"])
    # the mitral valve still derives without the aorta
    assert derive_mmwhs_landmarks(np.where(array == 820, 0, array), geometry, ["mitral_valve"])
    assert set(DERIVATION_RULES) == set(THREE)


# ------------------------------------------------------------------------------------------ the converter
@pytest.fixture(scope="module")
def four_phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    truth = write_mmwhs_phantoms(root, num_cases=4, seed=3, progress=False)
    return root, truth


def test_three_landmarks_with_annotated_apex_and_derived_valves(four_phantoms, nnunet_dirs):
    root, truth = four_phantoms
    main(["-i", str(root / "ct_train"), "-a", str(root / "apex"), "-d", "802", "--folds", "2",
          "--landmarks", *THREE, "--derive", "mitral_valve", "aortic_valve"])
    folder = Path(nnunet_dirs["nnUNet_raw"]) / "Dataset802_MMWHS_LVApex"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["landmarks"] == THREE
    assert dataset["landmarks_derived"] == {case: ["mitral_valve", "aortic_valve"] for case in truth}
    assert set(dataset["landmarks_derivation_rules"]) == {"mitral_valve", "aortic_valve"}
    for case in truth:
        markups = json.loads((folder / "landmarksTr" / f"{case}.mrk.json").read_text())
        points = {p["label"]: p for p in markups["markups"][0]["controlPoints"]}
        assert list(points) == THREE
        assert points["apex"]["description"] == ""
        assert points["mitral_valve"]["description"] == points["aortic_valve"]["description"] == "derived from labels"
        label = sitk.ReadImage(str(root / "ct_train" / f"{case}_label.nii.gz"))
        geometry = ImageGeometry.from_image(label)
        derived = derive_mmwhs_landmarks(sitk.GetArrayFromImage(label), geometry, ["mitral_valve", "aortic_valve"])
        for name in ("mitral_valve", "aortic_valve"):
            np.testing.assert_allclose(points[name]["position"], derived[name], atol=1e-9)
        # the annotated apex is the sphere mask's centre, not a derived one
        assert np.linalg.norm(geometry.world_to_index(points["apex"]["position"])
                              - geometry.world_to_index(truth[case]["apex"])) < 0.5


def test_everything_derived_needs_no_annotations(four_phantoms, nnunet_dirs):
    root, truth = four_phantoms
    main(["-i", str(root / "ct_train"), "-d", "803", "--folds", "2", "--landmarks", *THREE,
          "--derive-apex", "--derive", "mitral_valve", "aortic_valve"])
    folder = Path(nnunet_dirs["nnUNet_raw"]) / "Dataset803_MMWHS_LVApex"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["landmarks_derived"] == {case: THREE for case in truth}
    for case in truth:
        label = sitk.ReadImage(str(root / "ct_train" / f"{case}_label.nii.gz"))
        derived = derive_mmwhs_landmarks(sitk.GetArrayFromImage(label), ImageGeometry.from_image(label), THREE)
        points = read_markups(folder / "landmarksTr" / f"{case}.mrk.json")
        for name in THREE:
            np.testing.assert_allclose(points[name], derived[name], atol=1e-9)
    # --derive-apex alone, no -a: the default landmark list is the apex
    main(["-i", str(root / "ct_train"), "-d", "804", "--folds", "2", "--derive-apex"])
    assert read_markups(Path(nnunet_dirs["nnUNet_raw"]) / "Dataset804_MMWHS_LVApex" / "landmarksTr"
                        / f"{next(iter(truth))}.mrk.json").keys() == {"apex"}


@pytest.mark.parametrize("argv, message", [
    (["--landmarks", "apex", "mitral_valve", "--derive", "mitral_valve"], r"no annotations given \(-a\).*\['apex'\]"),
    (["--landmarks", "apex", "pulmonary_valve", "--derive", "apex", "pulmonary_valve"],
     r"cannot derive \['pulmonary_valve'\].*derivable: \['mitral_valve', 'aortic_valve', 'apex'\]"),
    (["--landmarks", "apex", "--derive", "apex", "aortic_valve"], r"--derive aortic_valve: not among --landmarks"),
])
def test_derive_option_errors(four_phantoms, nnunet_dirs, argv, message):
    root, _ = four_phantoms
    with pytest.raises(SystemExit, match=message):
        main(["-i", str(root / "ct_train"), "-d", "805", "--folds", "2", *argv])
    assert not list(Path(nnunet_dirs["nnUNet_raw"]).iterdir())


def test_an_empty_csv_is_like_an_empty_folder(four_phantoms, nnunet_dirs, tmp_path):
    root, truth = four_phantoms
    empty = tmp_path / "empty.csv"
    empty.write_text("case,name,x,y,z\n")
    with pytest.raises(SystemExit, match=rf"no annotation for landmark\(s\) \['apex'\] in \['{empty}'\]; {empty} "
                                         r"holds 0 case\(s\) \[\]"):
        main(["-i", str(root / "ct_train"), "-a", str(empty), "-d", "806", "--folds", "2"])
    main(["-i", str(root / "ct_train"), "-a", str(empty), "-d", "806", "--folds", "2", "--derive-apex"])
    dataset = json.loads((Path(nnunet_dirs["nnUNet_raw"]) / "Dataset806_MMWHS_LVApex" / "dataset.json").read_text())
    assert dataset["landmarks_derived"] == {case: ["apex"] for case in truth}
