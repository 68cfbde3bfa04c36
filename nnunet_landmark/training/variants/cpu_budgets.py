"""CPU budgets: short schedules for tests, the demo and the accuracy study, with plain twins of the same budget."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerVanillaAdam1en3

from nnunet_landmark import nnunet_integration
from nnunet_landmark.training.seeding import SeededTraining
from nnunet_landmark.training.trainers import nnUNetTrainerLandmark
from nnunet_landmark.training.variants.heatmap import NnLandmarkRecipe, PaperRecipe
from nnunet_landmark.training.variants.optimizer import (nnUNetTrainerLandmarkGaussianVanillaAdam1en3,
                                                         nnUNetTrainerLandmarkVanillaAdam1en3)


class CPUBudget(SeededTraining):
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
        with nnunet_integration.without_validation_mirroring(self):
            super().perform_actual_validation(save_probabilities)


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
        configured = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return nnunet_integration.without_mirroring(configured)


class nnUNetTrainerLandmark_cpu_learn(CPULearningBudget, nnUNetTrainerLandmarkVanillaAdam1en3):
    """The learning test's and demo's landmark model: nnUNetTrainerLandmark's recipe, Adam, 40 x 50 iterations.

    Its heatmap localises on this budget (extremum 2-4 mm off on unseen phantoms) at no cost in Dice: the decoupled
    head sends only 0.3 of its gradient into the segmentation network (benchmarks/results/ABLATION.md). Before
    it, the heatmap shared the segmentation's output layer and did not localise with any weight the segmentation
    tolerated.
    """


class nnUNetTrainerLandmarkPaper_cpu_learn(CPULearningBudget, PaperRecipe, nnUNetTrainerLandmarkVanillaAdam1en3):
    """The paper's heatmap setting (``PaperRecipe``) on the CPU learning budget (benchmarks/results/ABLATION.md)."""


class nnUNetTrainerLandmarkNnLandmark_cpu_learn(CPULearningBudget, NnLandmarkRecipe,
                                                nnUNetTrainerLandmarkVanillaAdam1en3):
    """nnLandmark's heatmap recipe (``NnLandmarkRecipe``) on the CPU learning budget
    (benchmarks/results/ABLATION.md)."""


class nnUNetTrainerLandmarkGaussian_cpu_learn(CPULearningBudget, nnUNetTrainerLandmarkGaussianVanillaAdam1en3):
    """As nnUNetTrainerLandmark_cpu_learn with Gaussian heatmaps."""


class nnUNetTrainer_cpu_learn(CPULearningBudget, nnUNetTrainerVanillaAdam1en3):
    """Plain nnU-Net with the optimizer and budget of nnUNetTrainerLandmark_cpu_learn."""
