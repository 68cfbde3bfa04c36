"""Export geometry: a heatmap that nnU-Net's own preprocessing resampled decodes to the true WORLD point."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.heatmap import HeatmapEncoding, render_heatmaps
from nnunet_landmark.inference import decode_landmarks, reliable_sliding_window_region
from nnunet_landmark.landmark_heads import LandmarkHeads


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def plans_for(target_spacing, transpose_forward, patch_size) -> dict:
    backward = [int(i) for i in np.argsort(transpose_forward)]
    resampling = {"resampling_fn_data": "resample_data_or_seg_to_shape",
                  "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_seg": "resample_data_or_seg_to_shape",
                  "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                  "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                         "force_separate_z": None}}
    return {"dataset_name": "Dataset999_Export", "plans_name": "p", "transpose_forward": list(transpose_forward),
            "transpose_backward": backward, "image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {
                str(c): {"mean": 100.0, "std": 50.0, "percentile_00_5": -200.0, "percentile_99_5": 600.0}
                for c in range(4)},
            "configurations": {"3d_fullres": {
                "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                "patch_size": list(patch_size), "spacing": list(target_spacing),
                "normalization_schemes": ["CTNormalization", "NoNormalization"], "use_mask_for_norm": [False, False],
                **resampling, "architecture": {}}}}


@pytest.mark.parametrize("resample", [False, True], ids=["transpose+crop", "transpose+crop+resample"])
@pytest.mark.parametrize("direction, spacing", [
    (rotation([1, 2, 3], 25) @ np.diag([1.0, -1.0, 1.0]), (0.9, 1.3, 2.4)),
    (np.diag([-1.0, -1.0, 1.0]), (2.1, 0.8, 1.1)),
], ids=["oblique_flipped", "flipped_xy"])
def test_decoded_world_point_is_the_true_world_point(direction, spacing, resample):
    """The world coordinates of every original voxel go through nnU-Net's real preprocessing (transpose, crop,
    resample) as three extra image channels; a linear field is resampled exactly, so they tell, independently
    of our geometry module, which world point each preprocessed voxel is. Our mapping must agree, and an
    ideal prediction (a Gaussian around the true point on that grid) must decode to the true WORLD point."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_landmark.geometry import CaseGeometry

    size = (44, 36, 30)
    geometry = ImageGeometry((-40.0, 25.0, 110.0), tuple(spacing), tuple(np.ravel(direction)), size)
    truth = geometry.index_to_world([20.37, 17.61, 13.22])
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), -1)[..., ::-1]
    world = geometry.index_to_world(index.reshape(-1, 3)).reshape(*size[::-1], 3)
    ct = np.full(size[::-1], 300.0, np.float32)
    ct[:2], ct[-3:], ct[:, :1] = 0, 0, 0  # a zero border: nnU-Net crops it away
    data = np.concatenate([ct[None], np.moveaxis(world, -1, 0).astype(np.float64) * (ct > 0)])
    properties = {"spacing": list(spacing[::-1]),
                  "sitk_stuff": {"spacing": tuple(spacing), "origin": geometry.origin, "direction": geometry.direction}}
    transpose_forward = [int(i) for i in np.argsort(spacing[::-1])[::-1]]  # coarsest axis first, as nnU-Net plans
    target = [1.5 * min(spacing)] * 3 if resample else [spacing[::-1][i] for i in transpose_forward]
    plans = plans_for(target, transpose_forward, (32, 32, 32))
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["CTNormalization"] + ["NoNormalization"] * 3
    plans["configurations"]["3d_fullres"]["use_mask_for_norm"] = [False] * 4
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration("3d_fullres")
    preprocessed, _, properties = DefaultPreprocessor(verbose=False).run_case_npy(
        data.astype(np.float32), None, properties, plans_manager, configuration, {"labels": {"background": 0, "x": 1}})
    assert properties["bbox_used_for_cropping"] != [[0, s] for s in ct.shape]
    nnunet_world = np.moveaxis(preprocessed[1:], 0, -1).astype(np.float64)
    case = CaseGeometry.from_nnunet(properties, transpose_forward, target)
    shape = preprocessed.shape[1:]
    # compare away from the crop borders, where the cubic spline's edge handling bends even a linear field
    q = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    source = case.preprocessing.preprocessed_to_array_index(q)[:, case.preprocessing.transpose_forward]
    low = np.asarray([lo for lo, _ in case.preprocessing.bbox]) + 6
    high = np.asarray([hi for _, hi in case.preprocessing.bbox]) - 7
    interior = np.all((source >= low) & (source <= high), axis=1)
    assert interior.sum() > 1000
    ours = case.preprocessed_to_world(q[interior])
    assert np.abs(ours - nnunet_world.reshape(-1, 3)[interior]).max() < 2e-3
    # an ideal prediction on nnU-Net's grid (world points from nnU-Net's resampling) decodes to the true point
    encoding = HeatmapEncoding("gaussian", sigma_mm=4.0)
    ideal = encoding.encode(np.linalg.norm(nnunet_world.reshape(-1, 3) - truth, axis=1))
    h = np.clip(ideal.reshape(shape), 1e-7, 1 - 1e-7)
    decoded = decode_landmarks(np.log(h / (1 - h))[None], properties, plans_manager, configuration,
                               LandmarkHeads(("apex",), 2, encoding))["apex"]
    assert np.linalg.norm(decoded["world"] - truth) < 0.01 * min(target), (decoded["world"], truth)
    np.testing.assert_allclose(geometry.index_to_world(decoded["index"]), decoded["world"], atol=1e-6)
    assert decoded["confidence"] > 0.9


def test_reliable_region_excludes_the_float16_corners():
    """Where only the far Gaussian tails of the outermost windows reach, nnU-Net's float16 average is noise."""
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    shape, patch = (44, 60, 60), (32, 48, 48)
    valid = np.broadcast_to(reliable_sliding_window_region(shape, patch), shape)
    # nnU-Net's own weight sum, in float32, for comparison
    gaussian = compute_gaussian(tuple(patch), sigma_scale=1. / 8, value_scaling_factor=10, dtype=torch.float32,
                                device=torch.device("cpu")).numpy()
    total = np.zeros(shape, np.float32)
    for sx in compute_steps_for_sliding_window(shape, patch, 0.5)[0]:
        for sy in compute_steps_for_sliding_window(shape, patch, 0.5)[1]:
            for sz in compute_steps_for_sliding_window(shape, patch, 0.5)[2]:
                total[sx:sx + patch[0], sy:sy + patch[1], sz:sz + patch[2]] += gaussian
    assert valid[22, 30, 30] and not valid[0, 0, 0] and not valid[43, 0, 59]
    assert np.all(total[valid] >= 1e-2 * 0.5)  # agrees with nnU-Net's weights up to Gaussian truncation
    assert total[~valid].max() < 0.05
    assert math.isclose(valid.mean(), 0.59, abs_tol=0.05)
