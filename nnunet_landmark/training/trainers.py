"""nnUNetTrainerLandmark: nnU-Net segmentation plus one heatmap channel per landmark (variants: ``variants/``).

Everything nnU-Net does (plans, data pipeline and augmentation, residual encoder UNet, deep
supervision, DDP, checkpoints, ``--c``, ``--val``, ``-pretrained_weights``, final validation) is the
base class's; this class adds what is new:

* the network gets C + K output channels (``build_network_architecture``), K = len(dataset.json
  "landmarks"); the heads are recorded in the plans so inference can rebuild the network;
* the data loader maps each landmark through the augmentation and renders its heatmap on the patch;
* the loss is nnU-Net's Dice+CE on the C channels + beta * MSE on the sigmoid of the K channels;
* the log gains the heatmap loss and a per-epoch landmark error in mm (also in progress.png);
* a landmark position prior is learned from the fold's training cases (``position_prior``; recorded per fold in the
  plans), which prediction combines with the heatmap;
* the final validation also writes each case's landmarks and ``landmark_summary.json``, and records in the prior how
  far the heatmap's extremum was off there, which decides how much prediction trusts the heatmap.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import distributed as dist

from nnunet_landmark import nnunet_integration
from nnunet_landmark.metrics import landmark_errors_mm, summarize
from nnunet_landmark.heatmap_targets import HeatmapEncoding
from nnunet_landmark.heatmap_decoding import decode_heatmap
from nnunet_landmark.landmark_export import export_prediction_with_landmarks
from nnunet_landmark.landmark_files import LandmarkFileError, read_markups
from nnunet_landmark.landmark_heads import LandmarkHeads, landmark_names_from_dataset_json
from nnunet_landmark.prior.storage import record_position_prior, set_position_prior, write_plans_keeping_priors
from nnunet_landmark.landmark_network import HeatmapHeadConfig, LandmarkNetwork
from nnunet_landmark.layout import LANDMARK_SUMMARY, LANDMARK_TABLE, markups_path
from nnunet_landmark.raw_dataset import save_json
from nnunet_landmark.training.data_loading import nnUNetLandmarkDataLoader
from nnunet_landmark.training.landmark_targets import copy_raw_splits, load_landmark_targets
from nnunet_landmark.prior.fitting import fit_position_prior, validation_measurements
from nnunet_landmark.training.loss import SegmentationHeatmapLoss
from nnunet_landmark.training.progress_logging import LandmarkLocalLogger
from nnunet_landmark.training.seeding import SeededTraining

nnunet_integration.install(export_prediction_with_landmarks)


def _summary(values) -> dict:
    """``metrics.summarize`` in landmark_summary.json's format (None when empty, SD 0 for one value)."""
    s = summarize(values)
    if s["n"] == 0:
        return {"mean": None, "sd": None, "median": None, "max": None, "n": 0}
    return {"mean": s["mean"], "sd": s["sd"] if s["n"] > 1 else 0.0, "median": s["median"], "max": s["max"],
            "n": s["n"]}


class nnUNetTrainerLandmark(SeededTraining, nnUNetTrainer):
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
        # the recipe (benchmarks/results/ABLATION.md): the paper's sigmoid heatmap with MSE and beta 10, on a compact
        # target (log-distance clipped at 30 mm), summed per landmark, from a decoupled head that sends 0.3 of its
        # gradient into the segmentation network, with a third of the patches centred near a landmark.
        # nnUNetTrainerLandmarkPaper keeps the paper's exact setting.
        self.heatmap_encoding = "log_distance"  # or "gaussian", "cone" (heatmap_targets.ENCODINGS)
        self.heatmap_loss_weight = 10.0  # beta in the paper
        self.heatmap_loss = "mse"  # the paper's MSE on sigmoid outputs, or "bce" (soft-target cross-entropy)
        self.heatmap_loss_reduction = "landmark"  # per landmark, or the paper's "mean" over the patch, "topk" (loss.py)
        self.heatmap_topk_fraction = 0.2  # "topk": the hardest fraction of voxels per sample and landmark
        self.heatmap_deep_supervision = True  # heatmap loss at every output resolution, as nnU-Net's Dice+CE
        self.heatmap_max_distance_mm = 30.0  # log_distance: None = the patch diagonal in mm; cone: its radius
        self.heatmap_scale_mm = 10.0  # log_distance: d0 in log(1 + d / d0), see HeatmapEncoding
        self.heatmap_sigma_mm = None  # gaussian: None = max(4 mm, 2 voxels)
        self.heatmap_head = "decoupled"  # or "shared": K more channels of the segmentation's output layer (the paper's)
        self.heatmap_head_channels = 16  # decoupled head: its width
        self.heatmap_head_stride = 2  # decoupled head: works at 1 / stride of the output's resolution
        self.heatmap_head_reads_segmentation = False  # decoupled head: also reads the segmentation's probabilities
        self.heatmap_trunk_gradient_scale = 0.3  # decoupled head: its gradient into the segmentation network
        self.landmark_oversample_percent = 0.33  # patches centred near a landmark (nnU-Net's foreground sampling)
        self.landmark_heads: LandmarkHeads | None = None
        self.world_landmarks = None  # case -> (K, 3) LPS mm
        self.preprocessed_landmarks = None  # case -> (K, 3) preprocessed voxel index
        self.position_prior = None  # position_prior.PositionPrior of this fold's training cases
        nnunet_integration.use_local_logger(self, LandmarkLocalLogger)

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
        if heads.head.kind == "shared":
            return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                            heads.num_output_channels, enable_deep_supervision)
        segmentation = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager,
                                                                num_input_channels, heads.num_segmentation_heads,
                                                                enable_deep_supervision)
        return LandmarkNetwork(segmentation, heads.num_landmarks, heads.head, heads.encoding.background)

    def _make_landmark_heads(self) -> LandmarkHeads:
        patch_mm = np.asarray(self.configuration_manager.patch_size) * np.asarray(self.configuration_manager.spacing)
        default_distance = float(np.linalg.norm(patch_mm)) if self.heatmap_encoding == "log_distance" else \
            15 * float(max(self.configuration_manager.spacing))  # cone: nnLandmark's 15 voxels
        encoding = HeatmapEncoding(
            self.heatmap_encoding,
            max_distance_mm=self.heatmap_max_distance_mm or default_distance,
            scale_mm=self.heatmap_scale_mm,
            sigma_mm=self.heatmap_sigma_mm or max(4.0, 2 * float(max(self.configuration_manager.spacing))))
        head = HeatmapHeadConfig(self.heatmap_head, self.heatmap_head_channels, self.heatmap_trunk_gradient_scale,
                                 self.heatmap_head_reads_segmentation,
                                 "sigmoid" if self.label_manager.has_regions else "softmax", self.heatmap_head_stride)
        return LandmarkHeads(self.landmark_names, self.label_manager.num_segmentation_heads, encoding, head=head)

    def _support_fraction(self) -> float:
        """The heatmap target's support ball as a fraction of the patch (at most 1): the ``"landmark"`` loss
        reduction divides the patch mean by it."""
        patch_mm3 = float(np.prod(np.asarray(self.configuration_manager.patch_size, dtype=float) *
                                  np.asarray(self.configuration_manager.spacing, dtype=float)))
        ball_mm3 = 4.0 / 3.0 * np.pi * self.landmark_heads.encoding.support_mm ** 3
        return float(min(1.0, ball_mm3 / patch_mm3))

    def initialize(self):
        if not self.was_initialized:
            self.landmark_heads = self._make_landmark_heads()
            self.landmark_heads.write_to_plans(self.plans_manager.plans)
            self.world_landmarks, self.preprocessed_landmarks = self._load_landmarks()
            self.print_to_log_file(f"landmarks {list(self.landmark_names)}, heatmap encoding "
                                   f"{self.landmark_heads.encoding}, head {self.landmark_heads.head}, heatmap loss "
                                   f"{self.heatmap_loss} ({self.heatmap_loss_reduction}), weight "
                                   f"{self.heatmap_loss_weight}, landmark oversampling "
                                   f"{self.landmark_oversample_percent}")
        super().initialize()
        self._fit_position_prior()

    @property
    def _fold_key(self) -> str:
        return f"fold_{self.fold}"

    def _fit_position_prior(self) -> None:
        """Learn where each landmark sits in the frame of the reference segmentation of this fold's training cases
        (never its validation cases) and put it in the in-memory plans, which the final validation exports with."""
        train_keys, _ = self.do_split()
        prior = fit_position_prior(self.preprocessed_dataset_folder, train_keys, self.world_landmarks,
                                   self.plans_manager, self.configuration_manager, self.landmark_names)
        self.position_prior = prior
        set_position_prior(self.plans_manager.plans, self._fold_key, prior)
        if prior is None:
            self.print_to_log_file("fewer than 3 training cases: no landmark position prior; landmarks are the heatmap "
                                   "extrema")
            return
        for name, p in prior.landmarks.items():
            self.print_to_log_file(f"position prior of {name}: structure {p.structure} (0 = all foreground), "
                                   f"leave-one-out error on the training references {p.loo_rms_mm:.2f} mm RMS")

    def _record_position_prior(self) -> None:
        """Add this fold's prior to the model folder's plans.json next to the other folds'."""
        plans_file = join(self.output_folder_base, "plans.json")
        if self.local_rank == 0 and isfile(plans_file):
            record_position_prior(plans_file, self._fold_key, self.position_prior)

    def on_train_start(self):
        # nnU-Net rewrites plans.json from the in-memory plans (this fold's prior only) here: merged with the priors
        # other folds recorded, under the folder's lock, so folds started side by side keep each other's
        with nnunet_integration.plans_json_writes(write_plans_keeping_priors):
            super().on_train_start()

    # ------------------------------------------------------------------------------------------ landmarks
    def _load_landmarks(self) -> tuple[dict, dict]:
        """(world, preprocessed) landmark positions of every preprocessed case (``landmark_targets``)."""
        return load_landmark_targets(self.preprocessed_dataset_folder, self.preprocessed_dataset_folder_base,
                                     self.plans_manager, self.configuration_manager, self.landmark_names,
                                     write_cache=self.local_rank == 0)

    # ------------------------------------------------------------------------------------------ training
    def _build_loss(self):
        return SegmentationHeatmapLoss(super()._build_loss(), self.landmark_heads.num_segmentation_heads,
                                       self.heatmap_loss_weight,
                                       deep_supervision=self.heatmap_deep_supervision and self.enable_deep_supervision,
                                       heatmap_loss=self.heatmap_loss, compile=nnunet_integration.compiles(self),
                                       reduction=self.heatmap_loss_reduction,
                                       reference_fraction=self._support_fraction(),
                                       topk_fraction=self.heatmap_topk_fraction)

    def make_data_loader(self, *args, **kwargs) -> nnUNetLandmarkDataLoader:
        loader = nnUNetLandmarkDataLoader(*args, landmarks=self.preprocessed_landmarks,
                                          spacing=self.configuration_manager.spacing,
                                          encoding=self.landmark_heads.encoding,
                                          landmark_oversample_percent=self.landmark_oversample_percent,
                                          seed=self.seed, **kwargs)
        # a transform the landmarks cannot follow fails here, in the main process, not in a worker
        loader.landmark_transforms
        return loader

    def do_split(self):
        if self.fold != "all":
            copied = copy_raw_splits(self.preprocessed_dataset_folder_base, self.plans_manager.dataset_name)
            if copied:
                self.print_to_log_file(f"Copied the dataset's cross-validation splits from {copied}")
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
        with nnunet_integration.precomputed_validation_outputs(self, segmentation_output, loss):
            result = super().validation_step({"data": data, "target": segmentation_target})
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
        self._record_position_prior()
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
                predicted = read_markups(markups_path(folder, case), flagged=True)
            except LandmarkFileError as e:
                problems.append(str(e))
                continue
            reference = dict(zip(self.landmark_names, self.world_landmarks[case]))
            per_case[case] = landmark_errors_mm(predicted, reference, self.landmark_names)
        if problems:
            raise RuntimeError("validation landmarks missing:\n  " + "\n  ".join(problems))
        # the heatmap's own extremum and the prior alone, which the table keeps beside the estimate
        measured = validation_measurements(join(folder, LANDMARK_TABLE), self.world_landmarks, self.landmark_names,
                                           list(per_case))
        extremum = measured["heatmap"]
        summary = {"landmarks": list(self.landmark_names), "unit": "mm", "coordinate_system": "LPS",
                   "per_case": per_case,
                   "per_landmark": {n: _summary([e[n] for e in per_case.values()]) for n in self.landmark_names},
                   "per_landmark_heatmap_extremum": {n: _summary(extremum.get(n, [])) for n in self.landmark_names},
                   "per_landmark_prior_alone": {n: _summary(measured["prior"].get(n, [])) for n in self.landmark_names}}
        save_json(summary, join(folder, LANDMARK_SUMMARY))
        for name, stats in summary["per_landmark"].items():
            self.logger.log_summary(f"final_val/landmark_{name}_error_mm", stats["mean"])
            raw = summary["per_landmark_heatmap_extremum"][name]
            self.print_to_log_file(f"Mean validation error of landmark {name}: {stats['mean']:.2f} mm (median "
                                   f"{stats['median']:.2f}, max {stats['max']:.2f}, n={stats['n']}); heatmap "
                                   f"extremum alone: " + (f"{raw['mean']:.2f} mm" if raw["n"] else "n/a"),
                                   also_print_to_console=True)
        self._record_validation(measured)
        return summary

    def _record_validation(self, measured: dict) -> None:
        """Record in the prior what this fold's validation cases measured: how far the heatmap extremum and the prior
        alone were off (prediction weighs the heatmap by its error, ``position_prior.combine_with_heatmap``, and both
        set the expected error, ``credibility``), and the distances the heatmap claimed (``heatmap_flat``)."""
        if self.position_prior is None:
            return
        self.position_prior = self.position_prior.with_validation(measured["heatmap"], measured["prior"],
                                                                  measured["claims"])
        set_position_prior(self.plans_manager.plans, self._fold_key, self.position_prior)
        self._record_position_prior()
        for name, p in self.position_prior.landmarks.items():
            if p.heatmap_error_mm is not None:
                self.print_to_log_file(f"{name}: the heatmap is weighed by its validation error, "
                                       f"{p.heatmap_error_mm:.2f} mm RMS")


__all__ = [name for name, value in list(globals().items())
           if isinstance(value, type) and issubclass(value, nnUNetTrainer) and value.__module__ == __name__]
