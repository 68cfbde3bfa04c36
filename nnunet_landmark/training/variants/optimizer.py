"""Adam variants (nnU-Net's ``nnUNetTrainerVanillaAdam1en3`` optimizer) for short budgets."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerVanillaAdam

from nnunet_landmark.training.trainers import nnUNetTrainerLandmark


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
