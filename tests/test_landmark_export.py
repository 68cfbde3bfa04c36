"""Export geometry: a heatmap that nnU-Net's own preprocessing resampled decodes to the true WORLD point."""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_landmark.nnunet_integration import default_resampling
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.heatmap_targets import HeatmapEncoding, render_heatmaps
from nnunet_landmark.landmark_export import decode_landmarks, reliable_sliding_window_region
from nnunet_landmark.landmark_heads import LandmarkHeads


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def plans_for(target_spacing, transpose_forward, patch_size) -> dict:
    backward = [int(i) for i in np.argsort(transpose_forward)]
    resampling = default_resampling()
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
    # exactly the voxels where nnU-Net's own weight sum reaches the minimum weight (1e-2 of a peak of 10)
    np.testing.assert_array_equal(valid, total >= 1e-2)


# ---------------------------------------------------------------------------------------------- memory-light decoding
def whole_volume_region(shape, patch_size, step_size: float = 0.5, minimum_weight: float = 1e-2) -> np.ndarray:
    """The reliable region as it was first computed: the float64 weight product over the whole volume."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    padded = [max(s, p) for s, p in zip(shape, patch_size)]
    steps = compute_steps_for_sliding_window(padded, patch_size, step_size)
    total = np.asarray(10.0)
    for axis, (n, p) in enumerate(zip(shape, patch_size)):
        x = np.arange(n, dtype=np.float64) + (padded[axis] - n) // 2
        sigma, weight = p / 8.0, np.zeros(n)
        for start in steps[axis]:
            d = x - (start + p // 2)
            inside = (x >= start) & (x < start + p) & (np.abs(d) <= 4 * sigma)
            weight += np.where(inside, np.exp(-d * d / (2 * sigma * sigma)), 0.0)
        view = [1] * len(shape)
        view[axis] = n
        total = total * weight.reshape(view)
    return total >= minimum_weight


@pytest.mark.parametrize("step_size", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("shape, patch", [((44, 60, 60), (32, 48, 48)), ((20, 70, 33), (32, 48, 48)),
                                          ((97, 61, 130), (40, 32, 48))], ids=["small", "padded", "several"])
def test_region_equals_the_whole_volume_computation(shape, patch, step_size):
    """Exactly (not within a tolerance): the same float64 products, evaluated box by box. With step size 1 the
    seams between window centres join in (weight >= 1e-4), and nothing else."""
    from nnunet_landmark.landmark_export import SlidingWindowRegion

    expected = whole_volume_region(shape, patch, step_size)
    if step_size > 0.5:
        seams = whole_volume_region(shape, patch, step_size, minimum_weight=1e-4) & ~expected
        between = np.ones(shape, dtype=bool)
        padded = [max(s, p) for s, p in zip(shape, patch)]
        for axis, steps in enumerate(SlidingWindowRegion(shape, patch, step_size).steps):
            x = np.arange(shape[axis]) + (padded[axis] - shape[axis]) // 2
            view = [1] * len(shape)
            view[axis] = shape[axis]
            between &= ((x >= steps[0] + patch[axis] // 2) & (x <= steps[-1] + patch[axis] // 2)).reshape(view)
        expected = expected | (seams & between)
    np.testing.assert_array_equal(reliable_sliding_window_region(shape, patch, step_size), expected)
    region = SlidingWindowRegion(shape, patch, step_size)
    for box in [(slice(3, 9),), (slice(None, None, 4),) * 3, (5, slice(2, 40), 7), (1, 2, 3), (slice(10, 20), 3),
                (slice(0, 1), slice(5, None, 3))]:
        np.testing.assert_array_equal(region[box], expected[box])
    assert not SlidingWindowRegion(shape, patch, step_size, use_gaussian=False)[:].size - expected.size
    assert SlidingWindowRegion(shape, patch, step_size, use_gaussian=False)[:].all()


def test_region_is_unchanged_for_step_sizes_up_to_one_half():
    """The seam rule adds nothing where windows overlap by half or more: 200 random images and patches."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        shape, patch = tuple(int(v) for v in rng.integers(8, 150, 3)), tuple(int(v) for v in rng.integers(8, 64, 3))
        step = float(rng.choice([0.25, 0.3, 0.4, 0.5]))
        np.testing.assert_array_equal(reliable_sliding_window_region(shape, patch, step),
                                      whole_volume_region(shape, patch, step), err_msg=f"{shape} {patch} {step}")


def test_float16_extremes_without_a_copy_match_numpy():
    """The integer views give np.argmin / np.argmax's first occurrence, or hand over to the exact search."""
    from nnunet_landmark.heatmap_decoding import _first_extreme_index

    rng = np.random.default_rng(0)
    answered = 0
    for trial in range(3000):
        values = rng.normal(0, 3, size=(5, 6, 7)).astype(np.float16)
        values = [values, np.abs(values), -np.abs(values), np.round(values)][trial % 4]
        for every, special in [(5, 0.0), (7, -0.0), (11, np.nan), (13, np.inf), (17, -np.inf), (19, -np.nan)]:
            if trial % every == 0:
                values.flat[rng.integers(values.size, size=2)] = special
        for maximum in (False, True):
            index = _first_extreme_index(values, maximum)
            assert index is None or index == (np.argmax(values) if maximum else np.argmin(values)), (trial, maximum)
            answered += index is not None
    assert answered > 4000  # the fast path answers nearly always


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("kind", ["log_distance", "gaussian"])
def test_decoding_in_the_region_equals_the_whole_volume_search(kind, dtype):
    """Voxel, refined position and confidence as decoding np.where(valid, logits, worst) as one array, for clean
    logits (fast path), float16 noise in the unreliable corners (the exact slab search) and ties."""
    import warnings

    from nnunet_landmark.heatmap_decoding import decode_heatmap
    from nnunet_landmark.landmark_export import SlidingWindowRegion

    rng = np.random.default_rng(1)
    encoding = HeatmapEncoding(kind)
    worst = np.inf if kind == "log_distance" else -np.inf
    for trial in range(24):
        shape = tuple(int(n) for n in rng.integers(24, 70, 3))
        spacing = rng.uniform(0.5, 2.0, 3)
        truth = rng.uniform(0.25, 0.75, 3) * np.asarray(shape)
        h = np.clip(render_heatmaps(shape, truth[None], spacing, encoding)[0], 1e-4, 1 - 1e-4)
        logits = np.log(h / (1 - h)) + rng.normal(0, [0.01, 0.3, 2.0][trial % 3], shape)
        if trial % 4 == 0:
            logits[:3, :3] = rng.normal(0, 30, logits[:3, :3].shape)  # subnormal noise where few windows reach
        if trial % 5 == 0:
            logits = np.round(logits)
        logits = logits.astype(dtype)
        region = SlidingWindowRegion(shape, (32, 32, 32), [0.3, 0.5, 1.0][trial % 3])
        mask = np.asarray(region)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            decoded = decode_heatmap(logits, encoding, spacing, already_sigmoid=False, valid=region)
            reference = decode_heatmap(np.where(mask, logits, worst).astype(np.float64), encoding, spacing,
                                       already_sigmoid=False)
        assert decoded.voxel == reference.voxel
        assert decoded.confidence == reference.confidence
        around = tuple(slice(max(0, v - 2), v + 3) for v in decoded.voxel)
        if mask[around].all():  # the reference refines on the masked array; equal where no mask is near
            np.testing.assert_array_equal(decoded.position, reference.position)


def test_decoding_a_large_volume_makes_no_full_volume_temporaries():
    """Peak traced memory of decoding a 160 x 256 x 256 float16 heatmap (21 MB) in its reliable region stays
    below one byte per voxel; the whole-volume mask alone took 9 bytes a voxel (float64 product + boolean)."""
    import tracemalloc

    from nnunet_landmark.heatmap_decoding import decode_heatmap
    from nnunet_landmark.landmark_export import SlidingWindowRegion

    shape, spacing = (160, 256, 256), np.array([0.8, 0.8, 0.8])
    encoding = HeatmapEncoding()
    truth = np.array([70.3, 101.6, 150.2])
    grids = [(np.arange(n, dtype=np.float32) - np.float32(t)) * np.float32(s) for n, t, s in zip(shape, truth, spacing)]
    distance = np.sqrt(grids[0][:, None, None] ** 2 + grids[1][None, :, None] ** 2 + grids[2][None, None, :] ** 2)
    h = np.clip(encoding.encode(distance), 1e-4, 1 - 1e-4)
    logits = np.log(h / (1 - h)).astype(np.float16)
    del grids, distance, h
    for corner_noise in (False, True):  # the fast path, then the slab search
        if corner_noise:
            logits[:2, :2] = -20.0
        region = SlidingWindowRegion(shape, (128, 128, 128), 0.5)
        tracemalloc.start()
        decoded = decode_heatmap(logits, encoding, spacing, already_sigmoid=False, valid=region)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert np.linalg.norm(decoded.position - truth) < 0.5
        assert peak < logits.size, f"peak {peak / 2 ** 20:.1f} MiB for {logits.size / 2 ** 20:.1f} M voxels"


def test_tracemalloc_sees_numpy_allocations():
    """The memory test above relies on numpy reporting its buffers to tracemalloc."""
    import tracemalloc

    tracemalloc.start()
    block = np.ones(10 ** 7, dtype=np.uint8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak >= block.nbytes


# ---------------------------------------------------------------------------------------------- step size
def tiny_landmark_predictor(tile_step_size: float, patch=(16, 24, 24)):
    """An nnUNetLandmarkPredictor around a 1x1x1 convolution (C = 2, K = 1), as the trainer's validation sets one up."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_landmark.predictor import nnUNetLandmarkPredictor

    plans = plans_for((1.0, 1.0, 1.0), (0, 1, 2), patch)
    LandmarkHeads(("apex",), 2, HeatmapEncoding()).write_to_plans(plans)
    plans_manager = PlansManager(plans)
    predictor = nnUNetLandmarkPredictor(tile_step_size=tile_step_size, use_mirroring=False,
                                        device=torch.device("cpu"), allow_tqdm=False)
    network = torch.nn.Conv3d(1, 3, 1)
    predictor.manual_initialization(network, plans_manager, plans_manager.get_configuration("3d_fullres"),
                                    [network.state_dict()], {"labels": {"background": 0, "lv": 1}, "file_ending": ".nii.gz"},
                                    "nnUNetTrainerLandmark", None)
    return predictor


def nnunet_weight_sum(predictor, shape) -> np.ndarray:
    """nnU-Net's own float16 weight sum for the windows its predictor places (the n_predictions it divides by)."""
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch = tuple(predictor.configuration_manager.patch_size)
    gaussian = compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, device=torch.device("cpu"))
    total = torch.zeros(shape, dtype=torch.half)
    for slicer in predictor._internal_get_sliding_window_slicers(shape):
        total[slicer[1:]] += gaussian
    return total.float().numpy()


@pytest.mark.parametrize("step_size", [0.3, 0.5, 1.0])
def test_the_export_uses_the_sliding_window_the_predictor_used(step_size):
    """The wrapped sliding window records the predictor's step size on the configuration manager that nnU-Net
    pickles into its export workers; decoding builds the reliable region of exactly those windows."""
    import pickle

    import torch

    from nnunet_landmark import landmark_export, nnunet_integration

    shape = (40, 70, 58)
    predictor = tiny_landmark_predictor(step_size)
    assert nnunet_integration.sliding_window_settings(predictor.configuration_manager) == (0.5, True)  # default
    logits = predictor.predict_logits_from_preprocessed_data(torch.rand((1, *shape)))
    assert logits.shape == (3, *shape)
    received = pickle.loads(pickle.dumps(predictor.configuration_manager))  # what an export worker receives
    assert nnunet_integration.sliding_window_settings(received) == (step_size, True)
    built = []

    class Recorded(landmark_export.SlidingWindowRegion):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    properties = {"spacing": [1.0, 1.0, 1.0], "shape_before_cropping": shape,
                  "bbox_used_for_cropping": [[0, n] for n in shape], "shape_after_cropping_and_before_resampling": shape,
                  "sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                                 "direction": tuple(np.eye(3).ravel())}}
    original = landmark_export.SlidingWindowRegion
    landmark_export.SlidingWindowRegion = Recorded
    try:
        landmark_export.decode_landmarks(logits[2:].numpy(), properties, predictor.plans_manager, received,
                                   predictor.landmark_heads)
    finally:
        landmark_export.SlidingWindowRegion = original
    assert [(r.shape, r.step_size) for r in built] == [(shape, step_size)]
    # the region follows nnU-Net's float16 weight sum for these windows: normal floats inside, tails outside
    weights = nnunet_weight_sum(predictor, shape)
    valid = np.asarray(built[0])
    # step size 1: the seams where two windows' tails meet are in, their sums normal float16 numbers (>= 2^-14)
    assert weights[valid].min() >= (0.5e-2 if step_size <= 0.5 else 2.0 ** -14) and weights[~valid].max() < 0.05
    for other in {0.3, 0.5, 1.0} - {step_size}:  # another step size's region would misjudge these windows
        assert not np.array_equal(reliable_sliding_window_region(shape, (16, 24, 24), other), valid)


@pytest.mark.parametrize("truth", [(17.3, 40.6, 21.8), (17.3, 23.5, 21.8), (15.6, 46.5, 30.0)],
                         ids=["inside", "on_a_seam_of_step_1", "on_another_seam"])
@pytest.mark.parametrize("kind", ["log_distance", "gaussian"])
def test_landmarks_agree_across_step_sizes(kind, truth):
    """A network that passes a heatmap through (its logits are the input): whatever the step size, nnU-Net's
    float16 sliding-window average gives the same heatmap back, and the export decodes the same landmark, the
    true one, also where the windows of step size 1 meet (a 1e-2 weight threshold put it 1.3-2.4 mm off)."""
    import torch

    shape, spacing = (40, 70, 58), np.array([1.0, 1.0, 1.0])
    truth = np.asarray(truth)
    encoding = HeatmapEncoding(kind)
    h = np.clip(render_heatmaps(shape, truth[None], spacing, encoding)[0], 1e-4, 1 - 1e-4)
    heatmap_logits = torch.from_numpy(np.log(h / (1 - h)).astype(np.float32))
    properties = {"spacing": [1.0, 1.0, 1.0], "shape_before_cropping": shape,
                  "bbox_used_for_cropping": [[0, n] for n in shape], "shape_after_cropping_and_before_resampling": shape,
                  "sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                                 "direction": tuple(np.eye(3).ravel())}}
    decoded = {}
    for step in (0.3, 0.5, 1.0):
        predictor = tiny_landmark_predictor(step)
        predictor.plans_manager.plans["nnunet_landmark"]["heatmap_encoding"] = encoding.to_dict()
        with torch.no_grad():
            predictor.network.weight.zero_()
            predictor.network.bias.zero_()
            predictor.network.weight[2, 0] = 1.0  # heatmap channel = input
        predictor.list_of_parameters = [predictor.network.state_dict()]
        logits = predictor.predict_logits_from_preprocessed_data(heatmap_logits[None]).numpy()
        assert logits.dtype == np.float16
        decoded[step] = decode_landmarks(logits[2:], properties, predictor.plans_manager,
                                         predictor.configuration_manager, predictor.landmark_heads)["apex"]
        # world = index (x, y, z) of this identity geometry; the array is (z, y, x)
        assert np.linalg.norm(decoded[step]["world"] - truth[::-1]) < 0.05, (step, decoded[step]["world"])
    for step in (0.3, 1.0):
        assert np.linalg.norm(decoded[step]["world"] - decoded[0.5]["world"]) < 0.02
        assert abs(decoded[step]["confidence"] - decoded[0.5]["confidence"]) < 0.02


# ---------------------------------------------------------------------------------------------- table locking
def _write_cases(folder: str, worker: int, cases: int, no_flock: bool) -> None:
    import errno
    import fcntl
    from collections import OrderedDict

    from nnunet_landmark.landmark_export import update_landmark_table

    if no_flock:
        def flock(fd, operation):
            raise OSError(errno.ENOSYS, "Function not implemented")
        fcntl.flock = flock
    for case in range(cases):
        landmarks = OrderedDict((name, {"world": (worker, case, k), "index": (k, k, k), "confidence": 0.5})
                                for k, name in enumerate(("apex", "mitral_valve")))
        update_landmark_table(folder, f"case_{worker:02d}_{case:03d}", landmarks)


@pytest.mark.parametrize("no_flock", [True, False], ids=["file_system_without_flock", "flock"])
def test_concurrent_table_updates_keep_every_row(tmp_path, no_flock):
    """Six processes (as nnU-Net's export workers) add 25 cases each to one landmarks.csv at the same time."""
    import multiprocessing

    from nnunet_landmark.layout import LOCK_FILE
    from nnunet_landmark.landmark_files import read_landmark_table

    context = multiprocessing.get_context("fork")  # the package is imported already: quick to start
    workers = [context.Process(target=_write_cases, args=(str(tmp_path), w, 25, no_flock)) for w in range(6)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(300)
        assert p.exitcode == 0
    rows = read_landmark_table(tmp_path / "landmarks.csv")
    expected = sorted((f"case_{w:02d}_{c:03d}", n) for w in range(6) for c in range(25) for n in ("apex", "mitral_valve"))
    assert sorted((r["case"], r["name"]) for r in rows) == expected
    for r in rows:
        worker, case = int(r["case"][5:7]), int(r["case"][8:])
        assert (float(r["x"]), float(r["y"])) == (worker, case)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landmarks.csv"]  # no lock or temporary file left
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_file_breaks_a_stale_lock_and_times_out_on_a_live_one(tmp_path, monkeypatch):
    import errno
    import fcntl
    import os
    import time

    from nnunet_landmark import layout

    def flock(fd, operation):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = tmp_path / layout.LOCK_FILE
    lock.write_text("node17 4242\n")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # left by a process that died an hour ago
    with layout.locked_folder(str(tmp_path)):
        assert lock.read_text().split()[1] == str(os.getpid())
    assert not lock.exists()
    lock.write_text("node17 4242\n")  # held right now by someone else
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="delete the file"):
        with layout.locked_folder(str(tmp_path), timeout=0.5):
            pass
    assert 0.5 <= time.monotonic() - start < 5
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EBADF, "bad")))
    with pytest.raises(OSError, match="bad"):  # other flock errors are not taken for "no locking here"
        with layout.locked_folder(str(tmp_path)):
            pass


@pytest.mark.parametrize("resample", [False, True], ids=["no_resampling", "resampling"])
@pytest.mark.parametrize("head", ["shared", "decoupled"])
def test_heatmap_files_hold_what_the_decoder_searched_where_it_lies(tmp_path, resample, head):
    """Each heatmap file holds the sigmoid of the heatmap logits on the preprocessed grid (every stride-th voxel of
    the decoupled head, every voxel of the shared one) at float16 precision, the unreliable corners at the background
    value, and its ITK geometry puts every voxel where the case's geometry maps that preprocessed index."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_landmark.geometry import CaseGeometry
    from nnunet_landmark.landmark_export import write_heatmaps
    from nnunet_landmark.landmark_network import HeatmapHeadConfig

    rng = np.random.default_rng(3)
    transpose_forward, spacing = [2, 0, 1], [0.9, 0.9, 1.6]  # array (x, y, z)-like: the coarse axis goes first
    shape_t = (20, 30, 28)
    bbox = [[1, 19], [2, 30], [0, 25]]
    cropped = tuple(hi - lo for lo, hi in bbox)
    target = [1.2, 1.2, 1.2] if resample else [spacing[i] for i in transpose_forward]
    preprocessed = tuple(int(round(n * s / t)) for n, s, t in
                         zip(cropped, [spacing[i] for i in transpose_forward], target))
    plans_manager = PlansManager(plans_for(target, transpose_forward, (16, 16, 16)))
    configuration = plans_manager.get_configuration("3d_fullres")
    stride = 2 if head == "decoupled" else 1
    heads = LandmarkHeads(("apex", "mitral_valve"), 2, HeatmapEncoding(),
                          head=HeatmapHeadConfig(head, stride=stride))
    logits = rng.normal(0, 4, (2, *preprocessed)).astype(np.float16)
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # rotated and flipped axes
    properties = {"spacing": spacing, "shape_before_cropping": shape_t, "bbox_used_for_cropping": bbox,
                  "shape_after_cropping_and_before_resampling": cropped,
                  "sitk_stuff": {"spacing": tuple(spacing[::-1]), "origin": (1.0, 2.0, 3.0),
                                 "direction": tuple(direction.ravel())}}
    written = write_heatmaps(logits, properties, plans_manager, configuration, heads, str(tmp_path / "case"))
    assert [os.path.basename(p) for p in written] == ["case_apex.nii.gz", "case_mitral_valve.nii.gz"]
    every = (slice(None, None, stride),) * 3
    unreliable = ~reliable_sliding_window_region(preprocessed, configuration.patch_size)[every]
    assert 0 < unreliable.mean() < 0.5
    geometry = CaseGeometry.from_nnunet(properties, transpose_forward, configuration.spacing)
    for path, channel in zip(written, logits):
        image = sitk.ReadImage(path)
        expected = 1.0 / (1.0 + np.exp(-channel[every].astype(np.float64)))
        expected[unreliable] = heads.encoding.background
        values = sitk.GetArrayFromImage(image)
        assert values.dtype == np.float32 and values.shape == expected.shape
        np.testing.assert_allclose(values, expected, rtol=0, atol=2.0 ** -11)
        assert np.abs(values - expected).max() > 0  # rounded indeed
        # geometry: ITK index (i, j, k) of the file is preprocessed index stride * (k, j, i)
        file_grid = ImageGeometry.from_image(image)
        index = np.stack(np.meshgrid(*[np.arange(n) for n in values.shape[::-1]], indexing="ij"), -1).reshape(-1, 3)
        np.testing.assert_allclose(geometry.world_to_preprocessed(file_grid.index_to_world(index)),
                                   stride * index[:, ::-1], atol=1e-6)

    # a heatmap with a peak: the file's extremum is the decoded heatmap extremum, to within one of the file's voxels
    truth = np.asarray(preprocessed, dtype=float) * [0.45, 0.55, 0.5]
    target = render_heatmaps(preprocessed, truth, configuration.spacing, heads.encoding)[0].astype(np.float64)
    peaked = np.log(np.clip(target, 1e-3, 1 - 1e-3) / (1 - np.clip(target, 1e-3, 1 - 1e-3))).astype(np.float16)
    decoded = decode_landmarks(np.stack([peaked, peaked]), properties, plans_manager, configuration, heads)
    path = write_heatmaps(np.stack([peaked, peaked]), properties, plans_manager, configuration, heads,
                          str(tmp_path / "peaked"))[0]
    image = sitk.ReadImage(path)
    values = sitk.GetArrayFromImage(image)
    extremum = np.unravel_index(np.argmin(values), values.shape)  # log-distance: the landmark is the minimum
    at = ImageGeometry.from_image(image).index_to_world(np.asarray(extremum[::-1], dtype=float))
    assert np.linalg.norm(at - decoded["apex"]["heatmap_world"]) <= stride * max(configuration.spacing)
    assert np.linalg.norm(decoded["apex"]["heatmap_world"] - geometry.preprocessed_to_world(truth)) < 0.5


def _elongated_structure_case(prior_mm=(30.0, 0.0, 0.0)):
    """Synthetic logits of a known answer: a 2 mm grid (preprocessed = original), an elongated structure (label 1,
    28 mm from its centre to its tips), and a prior at ``prior_mm`` in its frame (principal axis first; 3 mm SD).
    Returns what ``decode_landmarks`` needs."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_landmark.prior.model import LandmarkPrior, affine_of, structure_frame, structure_moments

    shape, spacing = (40, 48, 44), (2.0, 2.0, 2.0)  # preprocessed = original: identity transpose, no crop
    properties = {"spacing": list(spacing), "shape_before_cropping": list(shape),
                  "bbox_used_for_cropping": [[0, s] for s in shape],
                  "shape_after_cropping_and_before_resampling": list(shape),
                  "sitk_stuff": {"spacing": spacing[::-1], "origin": (0.0, 0.0, 0.0),
                                 "direction": tuple(np.eye(3).ravel())}}
    plans_manager = PlansManager(plans_for(list(spacing), [0, 1, 2], (48, 48, 48)))
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    labels = (((z - 20) / 14.0) ** 2 + ((y - 24) / 7.0) ** 2 + ((x - 22) / 6.0) ** 2 <= 1).astype(int)
    world = lambda index: np.asarray(index, float)[..., ::-1] * 2.0  # noqa: E731 (identity direction, origin 0)
    moments = structure_moments(labels, affine_of(world))
    axis, roll = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])
    _, rotation, size = structure_frame(moments[1], axis, roll)
    prior = LandmarkPrior(1, axis, roll, np.asarray(prior_mm) / size, np.eye(3) * (3.0 / size) ** 2, 1.0, 8)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return dict(properties=properties, plans_manager=plans_manager,
                configuration=plans_manager.get_configuration("3d_fullres"), labels=labels, world=world,
                world_of_voxels=world(index), prior=prior, p=moments[1].mean + rotation @ np.asarray(prior_mm),
                segmentation_logits=np.stack([(labels == c).astype(np.float16) * 10 for c in range(2)]))


def _heatmap_logits(encoding: HeatmapEncoding, world_of_voxels: np.ndarray, h: np.ndarray) -> np.ndarray:
    values = np.clip(encoding.encode(np.linalg.norm(world_of_voxels - h, axis=-1)), 1e-4, 1 - 1e-4)
    return np.log(values / (1 - values)).astype(np.float16)[None]


def test_decode_combines_the_prior_with_the_heatmap_by_its_validated_error():
    """Synthetic logits with a known answer, through ``decode_landmarks`` as the export calls it: a segmentation
    with an elongated structure (label 1) whose frame puts the prior at P, and a heatmap whose minimum is at H, 6 mm
    away. With the heatmap's validated error at 1 mm the written point is H; at 1e6 mm it is P (the posterior mean of
    the prior, its box symmetric about P); without a validated error the tau likelihood of the heatmap's distance
    values puts it in between. The heatmap's own extremum is kept beside it, whatever the weight."""
    import dataclasses

    from nnunet_landmark.prior.model import PositionPrior

    case = _elongated_structure_case()
    p = case["p"]
    h = p + np.array([6.0, 0.0, 0.0])  # 6 mm off along world x
    encoding = HeatmapEncoding("log_distance", max_distance_mm=30.0, scale_mm=10.0)
    heatmap_logits = _heatmap_logits(encoding, case["world_of_voxels"], h)
    written = {}
    for error in (1.0, 1e6, None):
        heads = LandmarkHeads(("apex",), 2, encoding,
                              (PositionPrior({"apex": dataclasses.replace(case["prior"], heatmap_error_mm=error)}),))
        decoded = decode_landmarks(heatmap_logits, case["properties"], case["plans_manager"], case["configuration"],
                                   heads, segmentation_logits=case["segmentation_logits"])["apex"]
        assert decoded["estimator"] == "prior+heatmap"
        assert np.linalg.norm(decoded["heatmap_world"] - h) < 0.2, decoded["heatmap_world"]
        written[error] = decoded["world"]
    assert np.linalg.norm(written[1.0] - h) < 1.0, (written[1.0], h)  # the prior (3 mm SD) still pulls a little
    assert np.linalg.norm(written[1e6] - p) < 0.1, (written[1e6], p)
    # without a validated error the weak tau likelihood (20 mm) leaves the prior nearly in charge: a decoder that
    # dropped the validated error would write this for the 1 mm heatmap too
    assert np.linalg.norm(written[None] - p) < 1.0 and np.linalg.norm(written[None] - written[1.0]) > 4.0


def test_decode_flags_a_prior_and_a_heatmap_that_contradict_each_other():
    """Both estimators validated at 1 mm, the heatmap's extremum ~30 mm from where the prior puts the landmark: one of
    them failed and the written point would be a confident guess, so the landmark is ``estimates_disagree`` with no
    expected error (on an unseen heart shape a mitral valve prior was 160 mm off, written ``ok``). 3 mm apart it is
    ``ok``, its expected error widened by the distance; with a heatmap that proved useless (1e6 mm) it is ``ok``."""
    import dataclasses

    from nnunet_landmark import credibility
    from nnunet_landmark.prior.model import PositionPrior

    case = _elongated_structure_case()
    encoding = HeatmapEncoding("log_distance", max_distance_mm=30.0, scale_mm=10.0)

    def decode(offset_mm, heatmap_error):
        logits = _heatmap_logits(encoding, case["world_of_voxels"], case["p"] + np.asarray(offset_mm))
        prior = dataclasses.replace(case["prior"], heatmap_error_mm=heatmap_error, prior_error_mm=1.0)
        heads = LandmarkHeads(("apex",), 2, encoding, (PositionPrior({"apex": prior}),))
        return decode_landmarks(logits, case["properties"], case["plans_manager"], case["configuration"], heads,
                                segmentation_logits=case["segmentation_logits"])["apex"]

    far, near, useless = decode((0.0, -30.0, 0.0), 1.0), decode((3.0, 0.0, 0.0), 1.0), decode((0.0, -30.0, 0.0), 1e6)
    assert np.linalg.norm(far["heatmap_world"] - far["prior_world"]) > credibility.DISAGREEMENT_LIMIT * np.sqrt(2)
    assert far["status"] == "estimates_disagree" and np.isnan(far["expected_error_mm"]), far
    assert "mm apart" in far["status_detail"]
    assert near["status"] == useless["status"] == "ok"
    apart = float(np.linalg.norm(near["heatmap_world"] - near["prior_world"]))
    assert 2.0 < apart < 4.0
    assert near["expected_error_mm"] == pytest.approx(credibility.expected_error(1.0, 1.0, apart))
    assert near["expected_error_mm"] > credibility.expected_error(1.0, 1.0)


def test_decode_applies_the_learned_boundary_guard_and_flags_what_it_cannot_bring_back():
    """The prior places the landmark 26 mm from the structure's centre across its long axis, ~13 mm outside it; the heatmap says
    nothing (its validated error 1e6 mm). Learned on the boundary (0 +- 1 mm), the guard pulls the written point
    back onto the structure; learned 14 mm outside (where it is), it leaves it. Learned 20 mm deep inside (deeper
    than this structure reaches), the estimate cannot get there and is flagged ``outside_anatomy``, with no expected
    error.
    Injected regression it catches: ``decode_landmarks`` calling ``combine_with_heatmap`` without ``surface``."""
    import dataclasses

    from nnunet_landmark.prior.model import PositionPrior

    case = _elongated_structure_case(prior_mm=(0.0, 26.0, 0.0))
    encoding = HeatmapEncoding("log_distance", max_distance_mm=30.0, scale_mm=10.0)
    heatmap_logits = _heatmap_logits(encoding, case["world_of_voxels"], case["p"] + np.array([6.0, 0.0, 0.0]))
    labels = case["labels"]
    tip_distance = float(np.linalg.norm(case["p"] - case["world"](np.argwhere(labels == 1)), axis=-1).min())
    assert 12 < tip_distance < 20, tip_distance

    def decode(surface_mean, surface_sd):
        prior = dataclasses.replace(case["prior"], heatmap_error_mm=1e6, surface_mean=surface_mean,
                                    surface_sd=surface_sd)
        heads = LandmarkHeads(("apex",), 2, encoding, (PositionPrior({"apex": prior}),))
        return decode_landmarks(heatmap_logits, case["properties"], case["plans_manager"], case["configuration"],
                                heads, segmentation_logits=case["segmentation_logits"])["apex"]

    unguarded, learned_there, on_boundary = decode(None, None), decode(tip_distance, 1.0), decode(0.0, 1.0)
    unreachable = decode(-20.0, 0.5)
    assert np.linalg.norm(unguarded["world"] - case["p"]) < 0.1
    assert np.linalg.norm(learned_there["world"] - case["p"]) < 0.5  # where the training cases had it: untouched
    pulled = np.linalg.norm(on_boundary["world"] - case["p"])
    assert pulled > 8.0, on_boundary["world"]  # pulled onto the structure
    nearest_voxel = np.linalg.norm(on_boundary["world"] - case["world"](np.argwhere(labels == 1)), axis=-1).min()
    assert nearest_voxel < 3.0, nearest_voxel  # within a voxel diagonal (2 mm grid) of the structure
    assert unguarded["status"] == learned_there["status"] == on_boundary["status"] == "ok"
    assert np.isfinite(on_boundary["expected_error_mm"])
    assert unreachable["status"] == "outside_anatomy" and np.isnan(unreachable["expected_error_mm"])
