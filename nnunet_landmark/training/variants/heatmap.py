"""Heatmap encoding and loss weight variants of nnUNetTrainerLandmark."""
from __future__ import annotations

import torch

from nnunet_landmark.training.trainers import nnUNetTrainerLandmark


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
