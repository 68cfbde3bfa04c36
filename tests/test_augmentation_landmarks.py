"""Landmarks through nnU-Net's augmentation as keypoints: the heatmap drawn on the augmented patch is where the
augmented image has the landmark, and what the keypoint mapping cannot follow is an error."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_landmark.heatmap_targets import HeatmapEncoding, render_heatmaps, render_heatmaps_mapped
from nnunet_landmark.training.data_loading import nnUNetLandmarkDataLoader
from nnunet_landmark.training.keypoint_transforms import UnsupportedTransformError, with_landmarks

ENCODINGS = [HeatmapEncoding("log_distance", max_distance_mm=60.0, scale_mm=5.0),
             HeatmapEncoding("gaussian", sigma_mm=3.0)]
SPACING = (1.4, 1.0, 0.8)  # anisotropic: distances are measured in mm of the preprocessed image
RADIUS = 4.0


class BrightSphereDataset:
    """Duck-typed nnU-Net dataset: a bright smooth ball centred on the (first) landmark, zero elsewhere."""

    def __init__(self, landmarks: dict, shape=(48, 52, 44)):
        self.identifiers = list(landmarks)
        self.cases = {}
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
        for case, positions in landmarks.items():
            distance = np.linalg.norm(grid - positions[0], axis=-1)
            image = (1000.0 / (1.0 + np.exp((distance - RADIUS) / 0.7)))[None].astype(np.float32)
            seg = (distance <= RADIUS)[None].astype(np.int16)
            self.cases[case] = (image, seg, {"class_locations": {1: np.argwhere(seg > 0)}})

    def load_case(self, identifier):
        image, seg, properties = self.cases[identifier]
        return image, seg, None, properties


def trainer_pipeline(patch_size, dummy_2d: bool, force_spatial: bool):
    """The trainer's own training transforms (nnU-Net's get_training_transforms, deep supervision on)."""
    rotation = (-np.pi, np.pi) if dummy_2d else (-30. / 360 * 2. * np.pi, 30. / 360 * 2. * np.pi)
    transforms = nnUNetTrainer.get_training_transforms(
        patch_size, rotation, [[1, 1, 1], [0.5, 0.5, 0.5]], (0, 1, 2), dummy_2d, use_mask_for_norm=[False],
        is_cascaded=False, foreground_labels=[1], regions=None, ignore_label=None)
    spatial = transforms.transforms[1 if dummy_2d else 0]
    if force_spatial:
        spatial.p_rotation, spatial.p_scaling = 1.0, 1.0
    initial = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
    if dummy_2d:
        initial[0] = patch_size[0]
    return transforms, tuple(int(i) for i in initial)


def heatmap_extremum(heatmap: np.ndarray, encoding: HeatmapEncoding) -> np.ndarray:
    """Sub-voxel position of the heatmap's minimum (log-distance) or maximum (Gaussian).

    Both encodings are monotone in the squared distance, which is a quadratic form in the position whatever the
    patch's rotation, scaling and voxel size: fit a general quadric to the decoded squared distances around the
    extreme voxel and take its vertex. (``decode_heatmap``'s refinement assumes axis-aligned voxels of known size,
    which an augmented patch does not have.)
    """
    flat = np.argmin(heatmap) if encoding.kind == "log_distance" else np.argmax(heatmap)
    voxel = np.array(np.unravel_index(flat, heatmap.shape))
    lo = np.maximum(voxel - 2, 0)
    hi = np.minimum(voxel + 3, heatmap.shape)
    window = heatmap[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.float64)
    x = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3) - voxel
    squared = encoding.decode_distance(window).ravel() ** 2
    i, j = np.triu_indices(3)
    design = np.hstack([x[:, i] * x[:, j], x, np.ones((len(x), 1))])
    coefficients = np.linalg.lstsq(design, squared, rcond=None)[0]
    quadratic = np.zeros((3, 3))
    quadratic[i, j] = coefficients[:6]
    quadratic = (quadratic + quadratic.T) / 2  # off-diagonal terms were fitted once, as 2 * A_ij
    return voxel + np.linalg.solve(quadratic, -coefficients[6:9] / 2)


def centroid(image: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid of the bright ball (background and noise below half the peak left out)."""
    weights = np.clip(image - 0.5 * image.max(), 0, None)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape], indexing="ij"), -1)
    return (grid * weights[..., None]).reshape(-1, 3).sum(0) / weights.sum()


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.kind)
@pytest.mark.parametrize("dummy_2d,force_spatial", [(False, True), (False, False), (True, True)],
                         ids=["rotation+scaling always", "nnU-Net's probabilities", "pseudo-2D"])
def test_heatmap_extremum_is_the_augmented_sphere_centre(encoding, dummy_2d, force_spatial):
    torch.manual_seed(0)
    np.random.seed(1)
    rng = np.random.default_rng(7)
    landmarks = {f"case_{i}": np.vstack([rng.uniform(16, 28, size=3), rng.uniform(5, 36, size=3)]) for i in range(6)}
    patch = (30, 32, 28)
    transforms, initial = trainer_pipeline(patch, dummy_2d, force_spatial)
    loader = nnUNetLandmarkDataLoader(BrightSphereDataset(landmarks), 4, initial, patch,
                                      LabelManager({"background": 0, "thing": 1}, None),
                                      oversample_foreground_percent=0.0, transforms=transforms, landmarks=landmarks,
                                      spacing=SPACING, encoding=encoding, landmark_oversample_percent=1.0)
    errors = []
    for _ in range(12):
        batch = loader.generate_train_batch()
        heatmaps = batch["target"][-1]
        assert heatmaps.shape == (4, 2, *patch) and heatmaps.dtype == torch.float32
        assert len(batch["target"]) == 3  # two deep-supervision segmentations + the heatmaps
        for b in range(4):
            position = batch["landmarks_in_patch"][b, 0]
            if np.any(position < RADIUS + 3) or np.any(position > np.asarray(patch) - RADIUS - 4):
                continue  # the ball is (partly) outside the patch: no reliable centroid
            image = batch["data"][b, 0].numpy()
            errors.append(np.linalg.norm(heatmap_extremum(heatmaps[b, 0].numpy(), encoding) - centroid(image)))
    assert len(errors) >= 16, errors
    print(f"{len(errors)} draws, max {max(errors):.3f} voxel")
    assert max(errors) < 0.5, errors


def test_mapped_rendering_is_the_same_function_of_distance():
    """With the identity it is ``render_heatmaps``; with a rotation/scaling it is the distance measured in the source."""
    encoding = ENCODINGS[0]
    shape, positions = (17, 19, 15), np.array([[8.3, 4.1, 9.9], [np.nan, 0, 0], [-3.0, 25.0, 7.0]])
    np.testing.assert_allclose(render_heatmaps_mapped(shape, positions, SPACING, encoding),
                               render_heatmaps(shape, positions, SPACING, encoding), atol=1e-6)
    angle = 0.4
    to_source = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1]]) @ \
        np.diag([1.2, 0.9, 1.1])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    for kind in ENCODINGS:
        got = render_heatmaps_mapped(shape, positions[:1], SPACING, kind, to_source)[0]
        distance = np.linalg.norm(((grid - positions[0]) @ to_source.T) * np.asarray(SPACING), axis=-1)
        np.testing.assert_allclose(got, kind.encode(distance), atol=2e-6)


def test_elastic_deformation_is_refused():
    transforms, _ = trainer_pipeline((24, 24, 24), False, False)
    transforms.transforms[0].p_elastic_deform = 0.2
    with pytest.raises(UnsupportedTransformError, match="p_elastic_deform"):
        with_landmarks(transforms)


def test_an_unknown_spatial_transform_is_refused_before_any_batch():
    transforms, initial = trainer_pipeline((24, 24, 24), False, False)
    transforms.transforms.insert(1, Rot90Transform(num_axis_combinations=1, allowed_axes={0, 1, 2}))
    landmarks = {"a": np.array([[12.0, 12.0, 12.0]])}
    loader = nnUNetLandmarkDataLoader(BrightSphereDataset(landmarks), 1, initial, (24, 24, 24),
                                      LabelManager({"background": 0, "thing": 1}, None), transforms=transforms,
                                      landmarks=landmarks, spacing=SPACING, encoding=ENCODINGS[0])
    with pytest.raises(UnsupportedTransformError, match="Rot90Transform"):
        loader.landmark_transforms
    with pytest.raises(UnsupportedTransformError, match="Rot90Transform"):
        loader.generate_train_batch()


def test_the_pipeline_is_copied_not_changed():
    transforms, _ = trainer_pipeline((24, 24, 24), False, False)
    before = [type(t) for t in transforms.transforms]
    adapted = with_landmarks(transforms)
    assert [type(t) for t in transforms.transforms] == before
    assert isinstance(adapted, ComposeTransforms) and adapted is not transforms
    assert type(adapted.transforms[0]).__name__ == "LandmarkSpatialTransform"
    assert adapted.transforms[0].p_rotation == transforms.transforms[0].p_rotation


def test_same_samples_and_random_draws_as_plain_nnunet():
    """Seeded alike, the landmark loader yields exactly plain nnU-Net's images and segmentations (it augments inside
    nnU-Net's own loop), so landmark and plain models train on the same data."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    rng = np.random.default_rng(2)
    landmarks = {f"case_{i}": rng.uniform(10, 30, size=(2, 3)) for i in range(4)}
    patch = (24, 24, 24)
    transforms, initial = trainer_pipeline(patch, False, True)
    common = (BrightSphereDataset(landmarks), 2, initial, patch, LabelManager({"background": 0, "thing": 1}, None))
    landmark = nnUNetLandmarkDataLoader(*common, oversample_foreground_percent=0.33, transforms=transforms,
                                        landmarks=landmarks, spacing=SPACING, encoding=ENCODINGS[0])
    plain = nnUNetDataLoader(*common, oversample_foreground_percent=0.33, transforms=transforms)
    for seed in range(4):
        batches = []
        for loader in (landmark, plain):
            np.random.seed(seed)
            torch.manual_seed(seed)
            batches.append(loader.generate_train_batch())
        ours, theirs = batches
        assert list(ours["keys"]) == list(theirs["keys"])
        assert torch.equal(ours["data"], theirs["data"])
        assert len(ours["target"]) == len(theirs["target"]) + 1
        assert all(torch.equal(a, b) for a, b in zip(ours["target"], theirs["target"]))


def test_keypoint_conventions_are_checked_numerically(monkeypatch):
    """batchgeneratorsv2 samples and mirrors as the keypoints assume (``convention_problems`` is empty); a
    MirrorTransform that flipped differently is named, and ``check_conventions`` refuses to build a pipeline."""
    import torch
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform

    from nnunet_landmark.training import keypoint_transforms

    assert keypoint_transforms.convention_problems() == []
    monkeypatch.setattr(MirrorTransform, "_apply_to_image",
                        lambda self, img, **params: torch.roll(img, 1, dims=params["axes"][0] + 1))
    assert any("MirrorTransform" in p for p in keypoint_transforms.convention_problems())
    monkeypatch.setattr(keypoint_transforms, "_CONVENTIONS_CHECKED", False)
    with pytest.raises(RuntimeError, match="MirrorTransform no longer flips"):
        keypoint_transforms.check_conventions()
