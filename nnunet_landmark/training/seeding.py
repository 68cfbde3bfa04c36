"""Seeded training runs: ``nnUNet_landmark_seed=N nnUNetv2_train ...`` seeds Python, numpy and torch when a trainer is
constructed (so the network starts from the same weights) and each augmentation worker from (N, worker), so that a
run's random draws repeat. nnU-Net itself has no seed; its background workers still interleave batches in the order
they finish, so runs with workers are repeatable in their draws, not bit for bit (``nnUNet_n_proc_DA=0`` is)."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

SEED_VARIABLE = "nnUNet_landmark_seed"


def training_seed() -> int | None:
    """The seed in ``nnUNet_landmark_seed``, or None where it is unset or empty."""
    value = os.environ.get(SEED_VARIABLE, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"{SEED_VARIABLE} must be an integer, got {value!r}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class SeededDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader; with ``seed``, each augmentation worker seeds numpy and torch from (seed, worker)."""

    def __init__(self, *args, seed: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def set_thread_id(self, thread_id):
        super().set_thread_id(thread_id)
        if self.seed is not None:  # the worker has just seeded itself randomly (nnU-Net passes no seeds)
            worker_seed = int(np.random.SeedSequence([self.seed, int(thread_id) + 1]).generate_state(1)[0])
            np.random.seed(worker_seed)
            torch.manual_seed(worker_seed)


class SeededTraining:
    """Trainer mixin: seeds the run from ``nnUNet_landmark_seed`` (see the module docstring), and builds nnU-Net's data
    loaders with ``make_data_loader`` (``SeededDataLoader`` here; the landmark trainer's own loader there)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.seed = training_seed()
        if self.seed is not None:
            seed_everything(self.seed)

    def make_data_loader(self, *args, **kwargs) -> nnUNetDataLoader:
        """One of nnU-Net's data loaders (its arguments as ``get_dataloaders`` passes them)."""
        return SeededDataLoader(*args, seed=self.seed, **kwargs)

    def get_dataloaders(self):
        from nnunet_landmark import nnunet_integration

        if self.seed is not None:
            self.print_to_log_file(f"seeded run: {SEED_VARIABLE}={self.seed}")
        with nnunet_integration.data_loader_class(self.make_data_loader):
            return super().get_dataloaders()
