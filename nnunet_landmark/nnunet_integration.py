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
   ``landmark_export.export_prediction_with_landmarks`` (handed to ``install``), which exports C channels with nnU-Net's
   function and the landmarks from the other K.
3. ``nnUNetTrainer.get_dataloaders`` constructs ``nnUNetDataLoader`` by name; ``data_loader_class``
   substitutes the landmark loader while a landmark trainer builds its loaders.
4. Landmark keypoints through augmentation rely on batchgeneratorsv2's SpatialTransform and MirrorTransform
   conventions; ``training.keypoint_transforms.convention_problems`` verifies them numerically on a small index
   ramp when a landmark loader first builds its pipeline (batchgeneratorsv2 is not nnU-Net: the seam does not
   import the training code).
5. The export cannot see the predictor's sliding window (``tile_step_size``, ``use_gaussian``), which decides
   where the float16 average is reliable. The predictor hands its own ``configuration_manager`` object to
   every export (pickled into the export workers), so the wrapped ``predict_sliding_window_return_logits``
   records the settings on it (``record_sliding_window``) and the export reads them back
   (``sliding_window_settings``; nnU-Net's defaults 0.5 / Gaussian where nothing was recorded).

6. ``nnUNetTrainer.validation_step`` runs ``self.network(data)`` and ``self.loss(output, target)``; the landmark
   trainer computes both once on all C + K channels and hands nnU-Net's step the segmentation part
   (``precomputed_validation_outputs``).
7. The predictor loads ``plans.json`` in ``initialize_from_trained_model_folder`` with every fold's position prior;
   the wrapped method keeps only the priors of the folds it loaded (``-f``), so cross-validation predictions never
   use a prior fitted on the cases they predict.
8. ``nnUNetTrainer.on_train_start`` rewrites ``plans.json`` from its in-memory plans (``save_json``, no lock);
   ``plans_json_writes`` routes that write through ``landmark_heads.write_plans_keeping_priors`` while a landmark
   fold starts, so it cannot drop a prior another fold recorded meanwhile.
9. Mirroring: ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` returns the mirror axes last (the
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


def _wrap_initialize(original: Callable) -> Callable:
    @functools.wraps(original)
    def initialize_from_trained_model_folder(self, model_training_output_dir, use_folds,
                                             checkpoint_name: str = 'checkpoint_final.pth'):
        from nnunet_landmark.prior.storage import select_position_priors

        original(self, model_training_output_dir, use_folds, checkpoint_name)
        if use_folds is None:  # nnU-Net's default: every fold with the checkpoint
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        missing = select_position_priors(self.plans_manager.plans, use_folds)
        if missing and len(missing) < len([use_folds] if isinstance(use_folds, (str, int)) else use_folds):
            warnings.warn(f"{model_training_output_dir}: {', '.join(missing)} recorded no landmark position prior; "
                          f"the landmarks pool the other folds' priors (nnUNetv2_landmark_fit_prior fits them)",
                          RuntimeWarning, stacklevel=2)

    initialize_from_trained_model_folder._nnunet_landmark = True
    return initialize_from_trained_model_folder


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
    initialize = getattr(predictor.initialize_from_trained_model_folder, "__wrapped__",
                         predictor.initialize_from_trained_model_folder)
    if list(inspect.signature(initialize).parameters) != ["self", "model_training_output_dir", "use_folds",
                                                          "checkpoint_name"] or \
            "self.plans_manager = plans_manager" not in inspect.getsource(initialize):
        problems.append("nnUNetPredictor.initialize_from_trained_model_folder changed (the landmark priors follow "
                        "its use_folds and self.plans_manager)")
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
    if not hasattr(trainer_module, "save_json"):
        problems.append("nnunetv2's trainer module no longer imports save_json (plans.json is written with it)")
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
        "on_train_start": ("save_json(self.plans_manager.plans, join(self.output_folder_base, 'plans.json')",),
    }
    for method, needles in trainer_sources.items():
        source = inspect.getsource(getattr(trainer_module.nnUNetTrainer, method))
        for needle in needles:
            if needle not in source:
                problems.append(f"nnUNetTrainer.{method} no longer contains {needle!r}")
    problems += _small_reach_problems()
    if problems:
        raise RuntimeError("nnunet-landmark was checked against nnunetv2 " + NNUNET_VERSION_CHECKED +
                           " and these internals it adapts have changed:\n  " + "\n  ".join(problems) +
                           "\nInstall nnunetv2==" + NNUNET_VERSION_CHECKED + " or update nnunet_landmark/"
                           "nnunet_integration.py.")


def _small_reach_problems() -> list[str]:
    """The logger's keys and swap, ``_do_i_compile``, the planner's resampling methods, the properties' keys."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.logging.nnunet_logger import LocalLogger, MetaLogger
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    problems = []
    keys = set(getattr(LocalLogger(), "my_fantastic_logging", {}))
    if not set(NNUNET_LOG_KEYS) <= keys:
        problems.append(f"nnU-Net's LocalLogger.my_fantastic_logging lacks {sorted(set(NNUNET_LOG_KEYS) - keys)}")
    if "self.local_logger = LocalLogger(verbose)" not in inspect.getsource(MetaLogger.__init__):
        problems.append("MetaLogger no longer keeps a LocalLogger as self.local_logger")
    if not callable(getattr(nnUNetTrainer, "_do_i_compile", None)):
        problems.append("nnUNetTrainer._do_i_compile is gone")
    for method in ("determine_resampling", "determine_segmentation_softmax_export_fn"):
        source = inspect.getsource(getattr(ExperimentPlanner, method))
        if "self." in source.split(":", 1)[1]:
            problems.append(f"ExperimentPlanner.{method} now uses the planner's state (default_resampling calls it "
                            f"without one)")
    preprocessing = inspect.getsource(DefaultPreprocessor.run_case_npy)
    for key in PROPERTIES_KEYS[2:]:
        if f"'{key}'" not in preprocessing:
            problems.append(f"DefaultPreprocessor.run_case_npy no longer records properties['{key}']")
    return problems


def install(export_function: Callable) -> None:
    """Apply the adaptations (idempotent), exporting with ``export_function`` (``landmark_export``'s
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
    if not getattr(predictor.initialize_from_trained_model_folder, "_nnunet_landmark", False):
        predictor.initialize_from_trained_model_folder = _wrap_initialize(
            predictor.initialize_from_trained_model_folder)
    predict_from_raw_data.export_prediction_from_logits = export_function
    trainer_module.export_prediction_from_logits = export_function
    _installed = True


# ------------------------------------------------------------------------------ small reaches, each checked above
NNUNET_LOG_KEYS = ("mean_fg_dice", "ema_fg_dice", "train_losses", "val_losses", "lrs", "epoch_start_timestamps",
                   "epoch_end_timestamps")
PROPERTIES_KEYS = ("sitk_stuff", "spacing", "bbox_used_for_cropping", "shape_after_cropping_and_before_resampling",
                   "shape_before_cropping")


def logged_values(local_logger) -> dict:
    """The per-epoch lists of nnU-Net's ``LocalLogger`` (its ``my_fantastic_logging``; ``NNUNET_LOG_KEYS`` and ours)."""
    return local_logger.my_fantastic_logging


def use_local_logger(trainer, logger_class) -> None:
    """Give ``trainer``'s ``MetaLogger`` a ``logger_class`` (a ``LocalLogger`` subclass) as its local logger."""
    trainer.logger.local_logger = logger_class(trainer.logger.local_logger.verbose)


def compiles(trainer) -> bool:
    """Whether nnU-Net compiles this trainer's network (its private ``_do_i_compile``): the loss then compiles too."""
    return bool(trainer._do_i_compile())


def case_properties(properties: dict, keys=PROPERTIES_KEYS, source: str = "the case's properties") -> dict:
    """The entries ``keys`` (of ``PROPERTIES_KEYS``) of a case's properties (nnU-Net's ``.pkl``, or what its
    preprocessor returns), which say where its voxels are."""
    missing = [k for k in keys if k not in properties]
    if missing:
        raise KeyError(f"{source} lack {missing}: not the properties nnunetv2 {NNUNET_VERSION_CHECKED}'s preprocessing "
                       f"writes")
    return {k: properties[k] for k in keys}


def default_resampling() -> dict:
    """The resampling entries of a configuration as nnU-Net's default planner writes them into plans.json (function
    names and keyword arguments, for data, segmentations and probabilities), for plans built by hand."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    # both methods ignore the planner's state (nnunetv2 2.8.1, checked in check_internals)
    data, data_kwargs, seg, seg_kwargs = ExperimentPlanner.determine_resampling(None)
    probabilities, probabilities_kwargs = ExperimentPlanner.determine_segmentation_softmax_export_fn(None)
    return {"resampling_fn_data": data.__name__, "resampling_fn_data_kwargs": data_kwargs,
            "resampling_fn_seg": seg.__name__, "resampling_fn_seg_kwargs": seg_kwargs,
            "resampling_fn_probabilities": probabilities.__name__,
            "resampling_fn_probabilities_kwargs": probabilities_kwargs}


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
def plans_json_writes(write: Callable[[dict, str], None]):
    """While active, ``nnUNetTrainer.on_train_start``'s write of ``plans.json`` (its module's ``save_json``) goes
    through ``write(plans, path)``; every other file it saves is saved by nnU-Net's function."""
    import os

    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    original = trainer_module.save_json

    def save_json(obj, file, *args, **kwargs):
        if os.path.basename(file) == "plans.json":
            write(obj, file)
        else:
            original(obj, file, *args, **kwargs)

    trainer_module.save_json = save_json
    try:
        yield
    finally:
        trainer_module.save_json = original


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
