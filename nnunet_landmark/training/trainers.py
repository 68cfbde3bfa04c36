"""nnUNetTrainerLandmark: nnU-Net segmentation plus one heatmap channel per landmark, and its variants.

Everything nnU-Net does (plans, data pipeline and augmentation, residual encoder UNet, deep
supervision, DDP, checkpoints, ``--c``, ``--val``, ``-pretrained_weights``, final validation) is the
base class's; this class adds what is new:

* the network gets C + K output channels (``build_network_architecture``), K = len(dataset.json
  "landmarks"); the heads are recorded in the plans so inference can rebuild the network;
* the data loader maps each landmark through the augmentation and renders its heatmap on the patch;
* the loss is nnU-Net's Dice+CE on the C channels + beta * MSE on the sigmoid of the K channels;
* the log gains the heatmap loss and a per-epoch landmark error in mm (also in progress.png);
* the final validation also writes each case's landmarks and ``landmark_summary.json``.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, load_pickle
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import (nnUNetTrainerVanillaAdam,
                                                                                 nnUNetTrainerVanillaAdam1en3)
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import distributed as dist

from nnunet_landmark import nnunet_integration
from nnunet_landmark.geometry import CaseGeometry
from nnunet_landmark.heatmap import HeatmapEncoding, decode_heatmap
from nnunet_landmark.landmark_files import LandmarkFileError, read_markups
from nnunet_landmark.evaluation.metrics import landmark_errors_mm
from nnunet_landmark.landmark_heads import LandmarkHeads, landmark_names_from_dataset_json
from nnunet_landmark.layout import (LANDMARK_CACHE, LANDMARK_SUMMARY, LANDMARKS_FOLDER, SPLITS_FILE,
                                    atomic_write_text, markups_path)
from nnunet_landmark.raw_dataset import DatasetError, read_dataset_landmarks, save_json
from nnunet_landmark.training.data_loading import nnUNetLandmarkDataLoader
from nnunet_landmark.training.loss import SegmentationHeatmapLoss
from nnunet_landmark.training.progress_logging import LandmarkLocalLogger

nnunet_integration.install()


def _summary(values) -> dict:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, "sd": None, "median": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "median": float(np.median(v)), "max": float(v.max()), "n": int(v.size)}


class nnUNetTrainerLandmark(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # user errors first, before nnU-Net creates output folders and logs
        self.landmark_names = landmark_names_from_dataset_json(dataset_json)
        configuration_manager = PlansManager(plans).get_configuration(configuration)
        if configuration_manager.previous_stage_name is not None:
            raise RuntimeError(f"configuration {configuration!r} is a cascade stage (previous stage "
                               f"{configuration_manager.previous_stage_name!r}); nnUNetTrainerLandmark supports "
                               f"single-stage configurations such as 3d_fullres")
        if len(configuration_manager.patch_size) != 3:
            raise RuntimeError(f"configuration {configuration!r} is 2D; nnUNetTrainerLandmark needs a 3D configuration "
                               f"such as 3d_fullres")
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.heatmap_encoding = "log_distance"  # or "gaussian"
        self.heatmap_loss_weight = 10.0  # beta in the paper
        self.heatmap_loss = "mse"  # the paper's MSE on sigmoid outputs, or "bce" (soft-target cross-entropy)
        self.heatmap_deep_supervision = True  # heatmap MSE at every output resolution, as nnU-Net's Dice+CE
        self.heatmap_max_distance_mm = None  # log_distance: None = the patch diagonal in mm
        self.heatmap_scale_mm = 20.0  # log_distance: d0 in log(1 + d / d0), see HeatmapEncoding
        self.heatmap_sigma_mm = None  # gaussian: None = max(4 mm, 2 voxels)
        self.landmark_oversample_percent = 0.0
        self.landmark_heads: LandmarkHeads | None = None
        self.world_landmarks = None  # case -> (K, 3) LPS mm
        self.preprocessed_landmarks = None  # case -> (K, 3) preprocessed voxel index
        self.logger.local_logger = LandmarkLocalLogger(self.logger.local_logger.verbose)

    # ------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        heads = LandmarkHeads.from_plans(plans_manager.plans)
        if heads is None:
            raise RuntimeError("these plans carry no landmark heads ('nnunet_landmark' entry); a landmark network "
                               "is built by nnUNetTrainerLandmark.initialize(), or from a trained model's plans.json")
        if num_output_channels != heads.num_segmentation_heads:
            raise RuntimeError(f"the plans' landmark heads expect {heads.num_segmentation_heads} segmentation "
                               f"channels, the dataset has {num_output_channels}")
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        heads.num_output_channels, enable_deep_supervision)

    def _make_landmark_heads(self) -> LandmarkHeads:
        patch_mm = np.asarray(self.configuration_manager.patch_size) * np.asarray(self.configuration_manager.spacing)
        encoding = HeatmapEncoding(
            self.heatmap_encoding,
            max_distance_mm=self.heatmap_max_distance_mm or float(np.linalg.norm(patch_mm)),
            scale_mm=self.heatmap_scale_mm,
            sigma_mm=self.heatmap_sigma_mm or max(4.0, 2 * float(max(self.configuration_manager.spacing))))
        return LandmarkHeads(self.landmark_names, self.label_manager.num_segmentation_heads, encoding)

    def initialize(self):
        if not self.was_initialized:
            self.landmark_heads = self._make_landmark_heads()
            self.landmark_heads.write_to_plans(self.plans_manager.plans)
            self.world_landmarks, self.preprocessed_landmarks = self._load_landmarks()
            self.print_to_log_file(f"landmarks {list(self.landmark_names)}, heatmap encoding "
                                   f"{self.landmark_heads.encoding}, heatmap loss weight {self.heatmap_loss_weight}")
        super().initialize()

    # ------------------------------------------------------------------------------------------ landmarks
    def _load_world_landmarks(self, cases: list[str]) -> dict:
        """World landmarks from nnUNet_raw/<dataset>/landmarksTr, or from the copy kept beside the
        preprocessed data (so training also works where only nnUNet_preprocessed is available)."""
        cache = join(self.preprocessed_dataset_folder_base, LANDMARK_CACHE)
        raw_folder = join(nnUNet_raw.get(), self.plans_manager.dataset_name) if nnUNet_raw.is_set() else None
        if raw_folder is not None and os.path.isdir(join(raw_folder, LANDMARKS_FOLDER)):
            try:
                world = read_dataset_landmarks(raw_folder, self.landmark_names, cases)
            except DatasetError as e:
                raise RuntimeError(f"{e}\nEvery training case needs all landmarks {list(self.landmark_names)}.") from e
            if self.local_rank == 0:
                save_json({"landmarks": list(self.landmark_names), "coordinate_system": "LPS",
                           "cases": {c: p.tolist() for c, p in world.items()}}, cache)
            return world
        if isfile(cache):
            stored = load_json(cache)
            if stored["landmarks"] != list(self.landmark_names):
                raise RuntimeError(f"{cache} holds landmarks {stored['landmarks']}, dataset.json "
                                   f"{list(self.landmark_names)}; delete it and make nnUNet_raw available")
            missing = [c for c in cases if c not in stored["cases"]]
            if missing:
                raise RuntimeError(f"{cache} lacks landmarks for case(s) {missing[:10]}")
            return {c: np.asarray(stored["cases"][c], dtype=np.float64) for c in cases}
        raise RuntimeError(f"no landmarks found for {self.plans_manager.dataset_name}: expected "
                           f"{raw_folder or '$nnUNet_raw/<dataset>'}/landmarksTr/CASE.mrk.json or {cache}")

    def _load_landmarks(self) -> tuple[dict, dict]:
        dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        cases = sorted(dataset_class.get_identifiers(self.preprocessed_dataset_folder))
        world = self._load_world_landmarks(cases)
        preprocessed = {}
        for case in cases:
            properties = load_pickle(join(self.preprocessed_dataset_folder, case + ".pkl"))
            geometry = CaseGeometry.from_nnunet(properties, self.plans_manager.transpose_forward,
                                                self.configuration_manager.spacing)
            positions = geometry.world_to_preprocessed(world[case])
            shape = np.asarray(geometry.preprocessing.shape_after_resampling)
            outside = ~np.all((positions > -1) & (positions < shape), axis=1)
            if outside.any():
                names = [n for n, o in zip(self.landmark_names, outside) if o]
                raise RuntimeError(f"case {case}: landmark(s) {names} lie outside the preprocessed image (positions "
                                   f"{np.round(positions[outside], 1).tolist()}, image shape {shape.tolist()}); check "
                                   f"the annotation's coordinate system (LPS mm expected)")
            preprocessed[case] = positions
        return world, preprocessed

    # ------------------------------------------------------------------------------------------ training
    def _build_loss(self):
        return SegmentationHeatmapLoss(super()._build_loss(), self.landmark_heads.num_segmentation_heads,
                                       self.heatmap_loss_weight,
                                       deep_supervision=self.heatmap_deep_supervision and self.enable_deep_supervision,
                                       heatmap_loss=self.heatmap_loss, compile=self._do_i_compile())

    def get_dataloaders(self):
        def factory(*args, **kwargs) -> nnUNetLandmarkDataLoader:
            loader = nnUNetLandmarkDataLoader(*args, landmarks=self.preprocessed_landmarks,
                                              spacing=self.configuration_manager.spacing,
                                              encoding=self.landmark_heads.encoding,
                                              landmark_oversample_percent=self.landmark_oversample_percent, **kwargs)
            # a transform the landmarks cannot follow fails here, in the main process, not in a worker
            loader.landmark_transforms
            return loader

        with nnunet_integration.data_loader_class(factory):
            return super().get_dataloaders()

    def do_split(self):
        # the converter puts its cross-validation splits beside the raw data too; without this copy nnU-Net
        # would silently make its own 5 folds
        splits_file = join(self.preprocessed_dataset_folder_base, SPLITS_FILE)
        raw_splits = join(nnUNet_raw.get(), self.plans_manager.dataset_name, SPLITS_FILE) \
            if nnUNet_raw.is_set() else None
        if self.fold != "all" and not isfile(splits_file) and raw_splits is not None and isfile(raw_splits):
            with open(raw_splits) as f:
                atomic_write_text(splits_file, f.read())
            self.print_to_log_file(f"Copied the dataset's cross-validation splits from {raw_splits}")
        return super().do_split()

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        result["heatmap_loss"] = self.loss.last_heatmap_loss.cpu().numpy()
        return result

    def _gather(self, values: list) -> list:
        if not self.is_ddp:
            return list(values)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, list(values))
        return [v for part in gathered for v in part]

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        losses = self._gather([float(o["heatmap_loss"]) for o in train_outputs])
        self.logger.log("train_heatmap_losses", float(np.mean(losses)), self.current_epoch)

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step on the segmentation channels (the output is computed once here and
        handed to it), plus the heatmap loss and the landmark error inside each patch."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            loss = self.loss(output, target)
        heatmap_loss = self.loss.last_heatmap_loss
        c = self.landmark_heads.num_segmentation_heads
        if self.enable_deep_supervision:
            segmentation_output, segmentation_target, full = [o[:, :c] for o in output], target[:-1], output[0]
        else:
            segmentation_output, segmentation_target, full = output[:, :c], target[0], output
        network, loss_function = self.network, self.loss
        self.network, self.loss = (lambda x: segmentation_output), (lambda o, t: loss)
        try:
            result = super().validation_step({"data": data, "target": segmentation_target})
        finally:
            self.network, self.loss = network, loss_function
        result["heatmap_loss"] = heatmap_loss.cpu().numpy()
        result["landmark_errors_mm"] = self._patch_landmark_errors(full[:, c:], batch["landmarks_in_crop"])
        return result

    def _patch_landmark_errors(self, heatmap_logits: torch.Tensor, positions: np.ndarray) -> list[float]:
        """Error (mm) of the decoded heatmap per sample and landmark; NaN where the landmark is outside the patch.

        Validation patches are not spatially augmented, so the crop positions are the patch positions.
        """
        logits = heatmap_logits.detach().float().cpu().numpy()
        spacing = np.asarray(self.configuration_manager.spacing, dtype=np.float64)
        shape = np.asarray(logits.shape[2:])
        errors = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # flat heatmaps early in training
            for b in range(logits.shape[0]):
                for k in range(logits.shape[1]):
                    p = np.asarray(positions[b, k], dtype=np.float64)
                    if not np.all((p >= -0.5) & (p <= shape - 0.5)):
                        errors.append(float("nan"))
                        continue
                    decoded = decode_heatmap(logits[b, k], self.landmark_heads.encoding, spacing, already_sigmoid=False)
                    errors.append(float(np.linalg.norm((decoded.position - p) * spacing)))
        return errors

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        super().on_validation_epoch_end(val_outputs)
        losses = self._gather([float(o["heatmap_loss"]) for o in val_outputs])
        errors = np.asarray(self._gather([e for o in val_outputs for e in o["landmark_errors_mm"]]), dtype=float)
        self.logger.log("val_heatmap_losses", float(np.mean(losses)), self.current_epoch)
        finite = errors[np.isfinite(errors)]
        self.logger.log("val_landmark_errors_mm", float(finite.mean()) if finite.size else float("nan"),
                        self.current_epoch)

    def on_epoch_end(self):
        error = self.logger.get_value("val_landmark_errors_mm", step=-1)
        self.print_to_log_file("heatmap_loss (tr/val)",
                               np.round(self.logger.get_value("train_heatmap_losses", step=-1), decimals=5),
                               np.round(self.logger.get_value("val_heatmap_losses", step=-1), decimals=5))
        self.print_to_log_file("landmark error in validation patches (mm)",
                               "n/a" if not np.isfinite(error) else np.round(error, decimals=2))
        super().on_epoch_end()

    # ------------------------------------------------------------------------------------------ validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            self.write_landmark_validation_summary()

    def write_landmark_validation_summary(self) -> dict:
        """Errors (mm) of the exported validation landmarks against the references: ``landmark_summary.json``."""
        folder = join(self.output_folder, "validation")
        _, val_keys = self.do_split()
        per_case, problems = {}, []
        for case in sorted(val_keys):
            try:
                predicted = read_markups(markups_path(folder, case))
            except LandmarkFileError as e:
                problems.append(str(e))
                continue
            reference = dict(zip(self.landmark_names, self.world_landmarks[case]))
            per_case[case] = landmark_errors_mm(predicted, reference, self.landmark_names)
        if problems:
            raise RuntimeError("validation landmarks missing:\n  " + "\n  ".join(problems))
        summary = {"landmarks": list(self.landmark_names), "unit": "mm", "coordinate_system": "LPS",
                   "per_case": per_case,
                   "per_landmark": {n: _summary([e[n] for e in per_case.values()]) for n in self.landmark_names}}
        save_json(summary, join(folder, LANDMARK_SUMMARY))
        for name, stats in summary["per_landmark"].items():
            self.logger.log_summary(f"final_val/landmark_{name}_error_mm", stats["mean"])
            self.print_to_log_file(f"Mean validation error of landmark {name}: {stats['mean']:.2f} mm (median "
                                   f"{stats['median']:.2f}, max {stats['max']:.2f}, n={stats['n']})",
                                   also_print_to_console=True)
        return summary


# ---------------------------------------------------------------------------------------------- variants
class nnUNetTrainerLandmarkGaussian(nnUNetTrainerLandmark):
    """Gaussian heatmaps (decoded by argmax) instead of the paper's log-distance maps."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.heatmap_encoding = "gaussian"


class nnUNetTrainerLandmark_beta1(nnUNetTrainerLandmark):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.heatmap_loss_weight = 1.0


class nnUNetTrainerLandmark_beta100(nnUNetTrainerLandmark):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.heatmap_loss_weight = 100.0


class nnUNetTrainerLandmark_1epoch(nnUNetTrainerLandmark):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1


class nnUNetTrainerLandmark_5epochs(nnUNetTrainerLandmark):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class nnUNetTrainerLandmark_10epochs(nnUNetTrainerLandmark):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 10


class nnUNetTrainerLandmark_20epochs(nnUNetTrainerLandmark):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 20


class nnUNetTrainerLandmark_50epochs(nnUNetTrainerLandmark):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 50


class nnUNetTrainerLandmark_100epochs(nnUNetTrainerLandmark):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100


class nnUNetTrainerLandmark_250epochs(nnUNetTrainerLandmark):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 250


class nnUNetTrainerLandmark_500epochs(nnUNetTrainerLandmark):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 500


class nnUNetTrainerLandmarkVanillaAdam1en3(nnUNetTrainerLandmark):
    """Adam, lr 1e-3 (nnU-Net's nnUNetTrainerVanillaAdam1en3 optimizer): learns heatmaps in far fewer iterations
    than nnU-Net's SGD (momentum 0.99, lr 1e-2), which is what short (CPU) budgets need."""

    configure_optimizers = nnUNetTrainerVanillaAdam.configure_optimizers

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3


class nnUNetTrainerLandmarkGaussianVanillaAdam1en3(nnUNetTrainerLandmarkVanillaAdam1en3):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.heatmap_encoding = "gaussian"


# ---------------------------------------------------------------------------------------------- CPU budgets
class CPUBudget:
    """Mixin: a short schedule for CPU runs, and no mirroring at the final validation (8x faster on a CPU).

    Mirroring stays on in the augmentation and in the checkpoint's allowed TTA axes, so ``nnUNetv2_predict``
    still mirrors unless told ``--disable_tta``. Plain and landmark variants share each budget, so
    comparisons train both with the same number of iterations.
    """

    budget_epochs = 2
    budget_iterations = 5
    budget_val_iterations = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.budget_epochs
        self.num_iterations_per_epoch = self.budget_iterations
        self.num_val_iterations_per_epoch = self.budget_val_iterations
        self.save_every = max(1, self.budget_epochs // 2)

    def perform_actual_validation(self, save_probabilities: bool = False):
        axes, self.inference_allowed_mirroring_axes = self.inference_allowed_mirroring_axes, None
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = axes


class nnUNetTrainerLandmark_cpu_smoke(CPUBudget, nnUNetTrainerLandmark):
    """2 epochs of 5 iterations: proves the machinery runs (tests), learns nothing."""


class nnUNetTrainer_cpu_smoke(CPUBudget, nnUNetTrainer):
    """Plain nnU-Net with the budget of nnUNetTrainerLandmark_cpu_smoke."""


class CPULearningBudget(CPUBudget):
    """2000 iterations (~5 minutes on 2 CPU cores for a 32^3 patch, 8-64 features; see cpu_plans), no mirroring.

    Mirroring (augmentation and test-time) is off: on such a budget it costs most of the heatmap's learning
    (measured on phantoms: 31 mm apex error with it, see the closing notes), and a heart has a handedness
    that mirrored training images contradict. Rotation, scaling and intensity augmentation stay on.
    """

    budget_epochs = 40
    budget_iterations = 50
    budget_val_iterations = 4

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class nnUNetTrainerLandmark_cpu_learn(CPULearningBudget, nnUNetTrainerLandmarkVanillaAdam1en3):
    """The learning test's and demo's landmark model: log-distance heatmaps, Adam, 40 x 50 iterations, beta 100.

    On this budget the heatmap lags the segmentation; beta 100 (with heatmap deep supervision) cut the apex error
    on 20 unseen phantoms from 5.5 to 4.5 mm, beta 300 gave 4.4 (benchmarks/ABLATION.md).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.heatmap_loss_weight = 100.0


class nnUNetTrainerLandmarkGaussian_cpu_learn(CPULearningBudget, nnUNetTrainerLandmarkGaussianVanillaAdam1en3):
    """As nnUNetTrainerLandmark_cpu_learn with Gaussian heatmaps (accuracy study)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.heatmap_loss_weight = 100.0


class nnUNetTrainer_cpu_learn(CPULearningBudget, nnUNetTrainerVanillaAdam1en3):
    """Plain nnU-Net with the optimizer and budget of nnUNetTrainerLandmark_cpu_learn."""


__all__ = [name for name, value in list(globals().items())
           if isinstance(value, type) and issubclass(value, nnUNetTrainer) and value.__module__ == __name__]
