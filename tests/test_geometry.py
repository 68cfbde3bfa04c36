"""World <-> image index <-> preprocessed index: round trips, SimpleITK agreement, real nnU-Net preprocessing."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from nnunet_landmark.geometry import CaseGeometry, ImageGeometry, PreprocessedGeometry, lps_to_ras


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


DIRECTIONS = {
    "identity": np.eye(3),
    "mmwhs_flip_y": np.diag([1.0, -1.0, 1.0]),
    "flip_xy": np.diag([-1.0, -1.0, 1.0]),
    "oblique": rotation([1, 2, 3], 23.0),
    "oblique_flipped": rotation([-2, 1, 0.5], 37.0) @ np.diag([1.0, -1.0, 1.0]),
}


def make_geometry(direction: np.ndarray, spacing=(0.4883, 0.4883, 0.625), origin=(-123.4, 87.6, -310.2),
                  size=(40, 30, 20)) -> ImageGeometry:
    return ImageGeometry(tuple(origin), tuple(spacing), tuple(np.asarray(direction).ravel()), tuple(size))


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_world_index_round_trip_and_sitk_agreement(name):
    geometry = make_geometry(DIRECTIONS[name], spacing=(0.7, 1.3, 2.9))
    image = geometry.apply_to(sitk.Image(40, 30, 20, sitk.sitkUInt8))
    rng = np.random.default_rng(1)
    index = rng.uniform(-5, 45, size=(50, 3))
    world = geometry.index_to_world(index)
    np.testing.assert_allclose(geometry.world_to_index(world), index, atol=1e-9)
    for i, w in zip(index[:10], world[:10]):
        np.testing.assert_allclose(image.TransformContinuousIndexToPhysicalPoint(i.tolist()), w, atol=1e-9)
        np.testing.assert_allclose(geometry.world_to_index(w), image.TransformPhysicalPointToContinuousIndex(w.tolist()),
                                   atol=1e-9)
    # world -> index -> world, error < 1e-4 mm; array order is the reversed ITK index
    points = rng.uniform(-300, 300, size=(100, 3))
    assert np.abs(geometry.index_to_world(geometry.world_to_index(points)) - points).max() < 1e-4
    np.testing.assert_allclose(geometry.world_to_array_index(points), geometry.world_to_index(points)[:, ::-1])
    assert np.abs(geometry.array_index_to_world(geometry.world_to_array_index(points)) - points).max() < 1e-4


def test_ras_nifti_reads_as_lps(tmp_path):
    """A NIfTI written by nibabel with a RAS affine: SimpleITK's (and our) world points are its LPS points."""
    affine = np.eye(4)
    affine[:3, :3] = rotation([0, 0, 1], 10) @ np.diag([0.8, 0.9, 2.0])
    affine[:3, 3] = [12.0, -40.0, 7.5]
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 8), np.int16), affine), tmp_path / "ras.nii.gz")
    geometry = ImageGeometry.from_file(tmp_path / "ras.nii.gz")
    ijk = np.array([[1.0, 2.0, 3.0], [9.5, 0.0, 7.25]])
    ras = (affine @ np.c_[ijk, np.ones(2)].T).T[:, :3]
    np.testing.assert_allclose(geometry.index_to_world(ijk), lps_to_ras(ras), atol=1e-4)


def test_mmwhs_header_facts():
    from conftest import shared_data
    geometry = ImageGeometry.from_file(shared_data("mmwhs_ct_labels", "ct_train_1002_label.nii.gz"))
    assert geometry.size == (512, 512, 239)
    np.testing.assert_allclose(geometry.spacing, (0.4883, 0.4883, 0.625), atol=1e-4)
    np.testing.assert_allclose(geometry.direction_matrix, np.diag([1, -1, 1]), atol=1e-6)
    # moving +1 along the second index axis goes to -y (anterior) in LPS
    step = geometry.index_to_world([0, 1, 0]) - geometry.index_to_world([0, 0, 0])
    np.testing.assert_allclose(step, [0, -geometry.spacing[1], 0], atol=1e-6)


@pytest.mark.parametrize("transpose_forward", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_preprocessed_round_trip(transpose_forward):
    properties = {"shape_after_cropping_and_before_resampling": (37, 51, 23),
                  "bbox_used_for_cropping": [[3, 40], [5, 56], [0, 23]], "spacing": (2.5, 0.7, 0.9)}
    spacing_t = [properties["spacing"][i] for i in transpose_forward]
    pre = PreprocessedGeometry.from_nnunet(properties, transpose_forward, properties["spacing"],
                                           [s * 1.37 for s in spacing_t])
    rng = np.random.default_rng(0)
    array_index = rng.uniform(0, 40, size=(200, 3))
    back = pre.preprocessed_to_array_index(pre.array_index_to_preprocessed(array_index))
    assert np.abs(back - array_index).max() < 1e-9
    # a voxel centre of the cropped array maps to the matching centre of the resampled array
    corner = np.array([lo for lo, _ in properties["bbox_used_for_cropping"]], float)
    first_centre = np.empty(3)
    first_centre[list(transpose_forward)] = corner
    q = pre.array_index_to_preprocessed(first_centre)
    expected = 0.5 * np.asarray(pre.shape_after_resampling) / np.asarray(pre.shape_after_cropping) - 0.5
    np.testing.assert_allclose(q, expected, atol=1e-12)


def _write_sphere_case(folder: Path, case: str, geometry: ImageGeometry, center_world, radius_mm: float,
                       rng) -> None:
    size_zyx = geometry.size[::-1]
    index = np.stack(np.meshgrid(*[np.arange(s) for s in geometry.size], indexing="ij"), -1)  # x, y, z
    world = geometry.index_to_world(index.reshape(-1, 3)).reshape(*geometry.size, 3)
    distance = np.linalg.norm(world - np.asarray(center_world), axis=-1).transpose(2, 1, 0)
    label = (distance <= radius_mm).astype(np.uint8)
    image = np.zeros(size_zyx, np.float32)
    # nonzero only inside a box that leaves a zero border: nnU-Net crops to it
    image[2:-3, 4:-2, 3:-4] = rng.normal(100, 10, size=image[2:-3, 4:-2, 3:-4].shape) + 200 * label[2:-3, 4:-2, 3:-4]
    for array, path in ((image, folder / "imagesTr" / f"{case}_0000.nii.gz"), (label, folder / "labelsTr" / f"{case}.nii.gz")):
        sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(array)), str(path))


@pytest.mark.slow
def test_against_real_nnunet_preprocessing(nnunet_dirs):
    """A sphere's centre mapped by our geometry lands < 0.5 voxel from the sphere nnU-Net preprocessed.

    Cases with oblique/flipped directions, anisotropic spacing with the coarsest axis along x (so nnU-Net
    transposes), a zero border (so it crops) and different spacings (so it resamples).
    """
    raw = Path(nnunet_dirs["nnUNet_raw"]) / "Dataset990_GeometrySpheres"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.default_rng(7)
    centers = {}
    cases = [("oblique", (2.2, 1.0, 1.1)), ("mmwhs_flip_y", (2.6, 1.1, 0.9)), ("oblique_flipped", (2.0, 0.9, 1.2))]
    for n, (direction, spacing) in enumerate(cases):
        geometry = make_geometry(DIRECTIONS[direction], spacing=spacing, origin=(-50.0 + 7 * n, 30.0, -100.0),
                                 size=(28, 52, 46))
        center = geometry.index_to_world(np.array([13.3, 27.6, 21.2]) + rng.uniform(-2, 2, 3))
        centers[f"case_{n}"] = center
        _write_sphere_case(raw, f"case_{n}", geometry, center, 9.0, rng)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "sphere": 1}, "numTraining": len(cases),
        "file_ending": ".nii.gz"}))
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", "990", "-c", "3d_fullres", "-np", "1",
             "--verify_dataset_integrity"], nnunet_dirs, timeout=600)

    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    pre_root = Path(nnunet_dirs["nnUNet_preprocessed"]) / "Dataset990_GeometrySpheres"
    plans = json.loads((pre_root / "nnUNetPlans.json").read_text())
    target_spacing = plans["configurations"]["3d_fullres"]["spacing"]
    assert list(plans["transpose_forward"]) != [0, 1, 2], "the test needs a dataset that nnU-Net transposes"
    dataset = nnUNetDatasetBlosc2(str(pre_root / "nnUNetPlans_3d_fullres"))
    resampled = 0
    for case, center in centers.items():
        data, seg, _, properties = dataset.load_case(case)
        with open(pre_root / "nnUNetPlans_3d_fullres" / f"{case}.pkl", "rb") as f:
            assert pickle.load(f)["bbox_used_for_cropping"] == properties["bbox_used_for_cropping"]
        geometry = CaseGeometry.from_nnunet(properties, plans["transpose_forward"], target_spacing)
        assert tuple(seg.shape[1:]) == geometry.preprocessing.shape_after_resampling
        resampled += geometry.preprocessing.shape_after_resampling != geometry.preprocessing.shape_after_cropping
        sphere = np.argwhere(np.asarray(seg[0]) == 1).mean(axis=0)
        mapped = geometry.world_to_preprocessed(center)
        assert np.abs(mapped - sphere).max() < 0.5, (case, mapped, sphere)
        # and back: the preprocessed sphere centre lands < 0.5 preprocessed voxel from the true world point
        back = geometry.preprocessed_to_world(sphere)
        assert np.linalg.norm(back - center) < 0.5 * min(geometry.preprocessed_spacing), (case, back, center)
        np.testing.assert_allclose(geometry.preprocessed_spacing, target_spacing, rtol=0.06)
    assert resampled == 2, "two of the three cases should have been resampled to the median spacing"
