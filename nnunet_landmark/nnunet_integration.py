"""Every place where nnunet-landmark reaches into nnU-Net internals: checked against nnunetv2 2.8.1.

nnU-Net has no hooks for extra output channels, so this module adapts exactly these things, and only
for landmark models (plans with a ``nnunet_landmark`` entry, see ``landmark_heads``); plain nnU-Net
models run nnU-Net's code unchanged:

1. ``nnUNetPredictor`` preallocates ``label_manager.num_segmentation_heads`` channels for the sliding
   window. For a landmark model its label manager is swapped for ``LandmarkLabelManager`` (C + K channels;
   segmentation from the first C) the first time the predictor predicts.
2. Segmentation export argmaxes every channel. The name ``export_prediction_from_logits`` that
   ``nnunetv2.inference.predict_from_raw_data`` (``nnUNetv2_predict``, ``..._from_modelfolder``) and
   ``nnunetv2.training.nnUNetTrainer.nnUNetTrainer`` (final validation) call is pointed to
   ``inference.export_prediction_with_landmarks`` (handed to ``install``), which exports C channels with nnU-Net's
   function and the landmarks from the other K.
3. ``nnUNetTrainer.get_dataloaders`` constructs ``nnUNetDataLoader`` by name; ``data_loader_class``
   substitutes the landmark loader while a landmark trainer builds its loaders.
4. Landmark keypoints through augmentation (``training.keypoint_transforms``) rely on batchgeneratorsv2's
   SpatialTransform parameter dict (``SPATIAL_TRANSFORM_PARAMETERS``), its sampling conventions (affine grid
   about the patch centre, grid_sample with align_corners=False; crop_tensor's ``floor(centre) - patch // 2``)
   and MirrorTransform's ``axes``; ``check_internals`` verifies them numerically on a small index ramp.
5. The export cannot see the predictor's sliding window (``tile_step_size``, ``use_gaussian``), which decides
   where the float16 average is reliable. The predictor hands its own ``configuration_manager`` object to
   every export (pickled into the export workers), so the wrapped ``predict_sliding_window_return_logits``
   records the settings on it (``record_sliding_window``) and the export reads them back
   (``sliding_window_settings``; nnU-Net's defaults 0.5 / Gaussian where nothing was recorded).

6. ``nnUNetTrainer.validation_step`` runs ``self.network(data)`` and ``self.loss(output, target)``; the landmark
   trainer computes both once on all C + K channels and hands nnU-Net's step the segmentation part
   (``precomputed_validation_outputs``).
7. Mirroring: ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` returns the mirror axes last (the
   training augmentation) and sets ``inference_allowed_mirroring_axes`` (test-time mirroring of the final
   validation's predictor); the CPU budgets turn them off there (``without_validation_mirroring``).

``install()`` runs when the landmark trainer module is imported, which nnU-Net does itself when it
resolves ``-tr nnUNetTrainerLandmark`` (for training and for prediction) before any of the patched
code runs. ``check_internals()`` fails loudly, naming what moved, if nnU-Net changed underneath us.
"""
from __future__ import annotations

import functools
import importlib.metadata
import inspect
import warnings
from contextlib import contextmanager
from typing import Callable

from nnunet_landmark import NNUNET_VERSION_CHECKED

_installed = False

EXPECTED_EXPORT_PARAMETERS = ["predicted_array_or_file", "properties_dict", "configuration_manager",
                              "plans_manager", "dataset_json_dict_or_file", "output_file_truncated",
                              "save_probabilities", "num_threads_torch"]


class LandmarkLabelManager:
    """A segmentation ``LabelManager`` that also accounts for K heatmap channels after its C channels.

    ``num_segmentation_heads`` is C + K (what the predictor preallocates); conversions to segmentations
    and probabilities use the first C channels and delegate to the wrapped manager; everything else is
    the wrapped manager's.
    """

    def __init__(self, segmentation_label_manager, num_landmarks: int):
        self.segmentation_label_manager = segmentation_label_manager
        self.num_landmarks = int(num_landmarks)

    def __getattr__(self, name):
        if name.startswith("__") or name == "segmentation_label_manager":
            raise AttributeError(name)
        return getattr(self.segmentation_label_manager, name)

    @property
    def num_segmentation_channels(self) -> int:
        return self.segmentation_label_manager.num_segmentation_heads

    @property
    def num_segmentation_heads(self) -> int:
        return self.num_segmentation_channels + self.num_landmarks

    def _segmentation_part(self, array):
        return array[:self.num_segmentation_channels] if array.shape[0] == self.num_segmentation_heads else array

    def apply_inference_nonlin(self, logits):
        return self.segmentation_label_manager.apply_inference_nonlin(self._segmentation_part(logits))

    def convert_probabilities_to_segmentation(self, predicted_probabilities):
        return self.segmentation_label_manager.convert_probabilities_to_segmentation(
            self._segmentation_part(predicted_probabilities))

    def convert_logits_to_segmentation(self, predicted_logits):
        return self.segmentation_label_manager.convert_logits_to_segmentation(self._segmentation_part(predicted_logits))


def adapt_predictor(predictor) -> None:
    """Give a predictor holding a landmark model the C + K channel label manager (idempotent)."""
    from nnunet_landmark.landmark_heads import LandmarkHeads

    if predictor.plans_manager is None or isinstance(predictor.label_manager, LandmarkLabelManager):
        return
    heads = LandmarkHeads.from_plans(predictor.plans_manager.plans)
    if heads is None:
        return
    if predictor.label_manager.num_segmentation_heads != heads.num_segmentation_heads:
        raise RuntimeError(f"the model's plans say {heads.num_segmentation_heads} segmentation channels but its "
                           f"dataset.json gives {predictor.label_manager.num_segmentation_heads}")
    predictor.label_manager = LandmarkLabelManager(predictor.label_manager, heads.num_landmarks)


SLIDING_WINDOW_ATTRIBUTE = "nnunet_landmark_sliding_window"
DEFAULT_SLIDING_WINDOW = (0.5, True)  # nnUNetPredictor's defaults, which the trainer's final validation uses


def record_sliding_window(predictor) -> None:
    """Note the predictor's step size and weighting on the configuration manager it hands to the export."""
    setattr(predictor.configuration_manager, SLIDING_WINDOW_ATTRIBUTE,
            (float(predictor.tile_step_size), bool(predictor.use_gaussian)))


def sliding_window_settings(configuration_manager) -> tuple[float, bool]:
    """(tile_step_size, use_gaussian) of the sliding window that predicted with this configuration manager."""
    return tuple(getattr(configuration_manager, SLIDING_WINDOW_ATTRIBUTE, DEFAULT_SLIDING_WINDOW))


def sliding_window_steps(image_size, patch_size, step_size: float) -> list[list[int]]:
    """Window start positions per axis, as nnU-Net's predictor places them."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    return compute_steps_for_sliding_window(tuple(image_size), tuple(patch_size), step_size)


def _wrap_sliding_window(original: Callable) -> Callable:
    @functools.wraps(original)
    def predict_sliding_window_return_logits(self, input_image):
        adapt_predictor(self)
        if isinstance(self.label_manager, LandmarkLabelManager):
            record_sliding_window(self)
        return original(self, input_image)

    predict_sliding_window_return_logits._nnunet_landmark = True
    return predict_sliding_window_return_logits


def check_internals() -> None:
    """Raise if the nnU-Net internals this module adapts are not as in nnunetv2 2.8.1."""
    from nnunetv2.inference import export_prediction, predict_from_raw_data
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    problems = []
    for module in (predict_from_raw_data, trainer_module):
        if not hasattr(module, "export_prediction_from_logits"):
            problems.append(f"{module.__name__} no longer imports export_prediction_from_logits")
    parameters = list(inspect.signature(export_prediction.export_prediction_from_logits).parameters)
    if parameters != EXPECTED_EXPORT_PARAMETERS:
        problems.append(f"export_prediction_from_logits parameters changed: {parameters}")
    predictor = predict_from_raw_data.nnUNetPredictor
    if not hasattr(predictor, "predict_sliding_window_return_logits"):
        problems.append("nnUNetPredictor.predict_sliding_window_return_logits is gone")
    source = inspect.getsource(predictor._internal_predict_sliding_window_return_logits)
    if "self.label_manager.num_segmentation_heads" not in source:
        problems.append("nnUNetPredictor no longer sizes its logits by self.label_manager.num_segmentation_heads")
    sliding_window_sources = {
        "_internal_get_sliding_window_slicers": ("compute_steps_for_sliding_window", "self.tile_step_size"),
        "_internal_predict_sliding_window_return_logits": (
            "self.use_gaussian", "sigma_scale=1. / 8", "value_scaling_factor=10", "dtype=torch.half"),
        "predict_from_data_iterator": ("self.configuration_manager, self.plans_manager",),
    }
    for method, needles in sliding_window_sources.items():
        source = inspect.getsource(getattr(predictor, method))
        for needle in needles:
            if needle not in source:
                problems.append(f"nnUNetPredictor.{method} no longer contains {needle!r} (the sliding window "
                                f"the landmark export assumes)")
    from nnunetv2.inference import sliding_window_prediction
    if list(inspect.signature(sliding_window_prediction.compute_steps_for_sliding_window).parameters) != \
            ["image_size", "tile_size", "tile_step_size"]:
        problems.append("compute_steps_for_sliding_window's parameters changed")
    if not hasattr(trainer_module, "nnUNetDataLoader") or \
            "nnUNetDataLoader(" not in inspect.getsource(trainer_module.nnUNetTrainer.get_dataloaders):
        problems.append("nnUNetTrainer.get_dataloaders no longer constructs nnUNetDataLoader by name")
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    loop = inspect.getsource(nnUNetDataLoader.generate_train_batch)
    transforms_call = "self.transforms(**{'image': data_cropped, 'segmentation': seg_cropped})"
    if not (0 <= loop.find("self.get_bbox(") < loop.find(transforms_call)):
        problems.append("nnUNetDataLoader.generate_train_batch no longer calls get_bbox and then "
                        "self.transforms(image=..., segmentation=...) per sample (the landmark loader hooks both)")
    trainer_sources = {
        "validation_step": ("self.network(data)", "self.loss(output, target)"),
        "configure_rotation_dummyDA_mirroring_and_inital_patch_size": (
            "self.inference_allowed_mirroring_axes = mirror_axes",
            "return rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes"),
        "perform_actual_validation": ("self.inference_allowed_mirroring_axes",),
    }
    for method, needles in trainer_sources.items():
        source = inspect.getsource(getattr(trainer_module.nnUNetTrainer, method))
        for needle in needles:
            if needle not in source:
                problems.append(f"nnUNetTrainer.{method} no longer contains {needle!r}")
    problems += _keypoint_convention_problems()
    if problems:
        raise RuntimeError("nnunet-landmark was checked against nnunetv2 " + NNUNET_VERSION_CHECKED +
                           " and these internals it adapts have changed:\n  " + "\n  ".join(problems) +
                           "\nInstall nnunetv2==" + NNUNET_VERSION_CHECKED + " or update nnunet_landmark/"
                           "nnunet_integration.py.")


SPATIAL_TRANSFORM_PARAMETERS = {"center_location_in_pixels", "grid", "affine", "elastic_offsets"}


def _keypoint_convention_problems() -> list[str]:
    """Every voxel of an index ramp holds its own index: after SpatialTransform (affine and crop-only paths) and
    MirrorTransform, mapping the sampled indices as keypoints must give back the output voxels that hold them."""
    import numpy as np
    import torch
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    from nnunet_landmark.training.keypoint_transforms import (LandmarkKeypoints, LandmarkMirrorTransform,
                                                              LandmarkSpatialTransform)

    shape, patch = (13, 12, 11), (7, 6, 5)
    ramp = torch.from_numpy(np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")))
    inner = np.array([[3, 2, 2], [3, 3, 2], [2, 3, 3], [4, 2, 1]])  # output voxels that sample inside the ramp
    problems = []
    state = np.random.get_state()  # the check must not change the caller's random draws
    with torch.no_grad():
        try:
            np.random.seed(0)
            for p_affine in (1, 0):
                stock = SpatialTransform(patch, 0, False, p_rotation=p_affine, rotation=(0.2, 0.4), p_scaling=p_affine,
                                         scaling=(1.1, 1.1))
                params = stock.get_parameters(image=ramp)
                if set(params) != SPATIAL_TRANSFORM_PARAMETERS:
                    problems.append(f"SpatialTransform.get_parameters returns {sorted(params)}, expected "
                                    f"{sorted(SPATIAL_TRANSFORM_PARAMETERS)}")
                    break
                sampled = stock._apply_to_image(ramp, **params).numpy()
                sources = sampled[(slice(None), *inner.T)].T
                mapped = LandmarkSpatialTransform.from_transform(stock)._apply_to_keypoints(
                    LandmarkKeypoints.in_crop(sources), **params).positions
                if not np.allclose(mapped, inner, atol=1e-3):
                    problems.append(f"SpatialTransform ({'affine grid' if p_affine else 'crop only'}) no longer samples "
                                    f"where nnunet-landmark maps landmarks: {mapped.tolist()} vs {inner.tolist()}")
            mirror = MirrorTransform((0, 1, 2))
            params = {"axes": [0, 2]}
            flipped = mirror._apply_to_image(ramp, **params).numpy()
            sources = flipped[(slice(None), *inner.T)].T
            mapped = LandmarkMirrorTransform.from_transform(mirror)._apply_to_keypoints(
                LandmarkKeypoints.in_crop(sources), **params, spatial_shape=shape).positions
            if not np.allclose(mapped, inner):
                problems.append("MirrorTransform no longer flips the way nnunet-landmark mirrors landmarks")
        finally:
            np.random.set_state(state)
    return problems


def install(export_function: Callable) -> None:
    """Apply the adaptations (idempotent), exporting with ``export_function`` (``inference``'s
    ``export_prediction_with_landmarks``; passed in so that this module imports nothing of ours that imports it).
    Plain nnU-Net models are unaffected by them."""
    global _installed
    if _installed:
        return
    version = importlib.metadata.version("nnunetv2")
    if not version.startswith(NNUNET_VERSION_CHECKED.rsplit(".", 1)[0] + "."):
        warnings.warn(f"nnunet-landmark was checked against nnunetv2 {NNUNET_VERSION_CHECKED}; you have {version}",
                      RuntimeWarning, stacklevel=2)
    check_internals()
    from nnunetv2.inference import predict_from_raw_data
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    predictor = predict_from_raw_data.nnUNetPredictor
    if not getattr(predictor.predict_sliding_window_return_logits, "_nnunet_landmark", False):
        predictor.predict_sliding_window_return_logits = _wrap_sliding_window(
            predictor.predict_sliding_window_return_logits)
    predict_from_raw_data.export_prediction_from_logits = export_function
    trainer_module.export_prediction_from_logits = export_function
    _installed = True


@contextmanager
def precomputed_validation_outputs(trainer, output, loss):
    """While active, ``nnUNetTrainer.validation_step`` takes ``output`` for the network's output and ``loss`` for
    the loss (it calls ``self.network(data)`` and ``self.loss(output, target)``), so the landmark trainer runs the
    network once for all C + K channels and nnU-Net's step scores the C segmentation channels."""
    network, loss_function = trainer.network, trainer.loss
    trainer.network, trainer.loss = (lambda data: output), (lambda _output, _target: loss)
    try:
        yield
    finally:
        trainer.network, trainer.loss = network, loss_function


@contextmanager
def without_validation_mirroring(trainer):
    """While active, the final validation's predictor does not mirror (nnU-Net reads
    ``trainer.inference_allowed_mirroring_axes`` when it builds it in ``perform_actual_validation``)."""
    axes, trainer.inference_allowed_mirroring_axes = trainer.inference_allowed_mirroring_axes, None
    try:
        yield
    finally:
        trainer.inference_allowed_mirroring_axes = axes


def without_mirroring(configured: tuple) -> tuple:
    """The result of ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` with no mirror axes (no
    mirroring in the training augmentation)."""
    rotation, dummy_2d, initial_patch_size, _ = configured
    return rotation, dummy_2d, initial_patch_size, None


@contextmanager
def data_loader_class(factory: Callable):
    """While active, ``nnUNetTrainer.get_dataloaders`` constructs its loaders with ``factory``."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    original = trainer_module.nnUNetDataLoader
    trainer_module.nnUNetDataLoader = factory
    try:
        yield
    finally:
        trainer_module.nnUNetDataLoader = original
