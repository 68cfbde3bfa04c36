"""Heatmap recipe variants of nnUNetTrainerLandmark: the paper's exact setting, nnLandmark's recipe, other encodings
and loss weights (benchmarks/results/ABLATION.md compares them)."""
from __future__ import annotations

import torch

from nnunet_landmark.training.trainers import nnUNetTrainerLandmark


class PaperRecipe:
    """Mixin: Mandas et al.'s setting: the log-distance map over the whole patch (0 at the landmark, 1 at the patch
    diagonal), MSE on the sigmoid averaged over the patch at full resolution only, beta 10, the heatmaps as K more
    channels of the segmentation's output layer, nnU-Net's sampling."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.heatmap_max_distance_mm, self.heatmap_scale_mm = None, 20.0
        self.heatmap_loss_reduction, self.heatmap_deep_supervision = "mean", False
        self.heatmap_head, self.heatmap_trunk_gradient_scale = "shared", 1.0
        self.landmark_oversample_percent = 0.0


class NnLandmarkRecipe:
    """Mixin: nnLandmark's recipe (Ertl et al. 2025), written from its description: a cone of 15 voxels (1 at the
    landmark), BCE over the hardest 20% of voxels per image and landmark, a third of the patches on a landmark; the
    heatmaps as more channels of the output layer, beside the segmentation (weight 1)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.heatmap_encoding, self.heatmap_max_distance_mm = "cone", None  # None: 15 voxels
        self.heatmap_loss, self.heatmap_loss_reduction, self.heatmap_topk_fraction = "bce", "topk", 0.2
        self.heatmap_loss_weight = 1.0
        self.heatmap_head, self.heatmap_trunk_gradient_scale = "shared", 1.0
        self.landmark_oversample_percent = 0.33


class nnUNetTrainerLandmarkPaper(PaperRecipe, nnUNetTrainerLandmark):
    """The paper's exact heatmap setting (``PaperRecipe``) on nnU-Net's schedule."""


class nnUNetTrainerLandmarkNnLandmark(NnLandmarkRecipe, nnUNetTrainerLandmark):
    """nnLandmark's heatmap recipe (``NnLandmarkRecipe``) on nnU-Net's schedule."""


class nnUNetTrainerLandmarkGaussian(nnUNetTrainerLandmark):
    """Gaussian heatmaps (decoded by argmax) instead of the compact log-distance map."""

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
