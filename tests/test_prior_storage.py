"""Where a model keeps its folds' priors: ``-f`` keeps exactly the folds predicted with, and a fold starting beside
another cannot drop the prior that one records (two processes)."""
from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np

from nnunet_landmark.heatmap_targets import HeatmapEncoding
from nnunet_landmark.landmark_heads import LandmarkHeads
from nnunet_landmark.layout import PLANS_KEY
from nnunet_landmark.prior.model import LandmarkPrior, PositionPrior
from nnunet_landmark.prior.storage import (PRIORS_KEY, fold_key, record_position_prior, recorded_position_priors,
                                           select_position_priors)


def prior(offset: float) -> PositionPrior:
    return PositionPrior({"apex": LandmarkPrior(1, np.array([1.0, 0, 0]), np.array([0, 1.0, 0]),
                                                np.array([offset, 0.0, 0.0]), np.eye(3) * 0.01, 1.5, 8, 0.5, 1.0,
                                                4.0)})


def test_selecting_the_folds_predicted_with_keeps_only_their_priors():
    plans = {PLANS_KEY: {PRIORS_KEY: {f"fold_{k}": prior(k).to_dict() for k in range(3)}}}
    assert fold_key(2) == fold_key("2") == "fold_2" and fold_key("all") == "fold_all"
    assert select_position_priors(plans, (2, "0", 4)) == ["fold_4"]
    assert list(plans[PLANS_KEY][PRIORS_KEY]) == ["fold_2", "fold_0"]  # in the order of -f
    heads_plans = {**plans, PLANS_KEY: {**plans[PLANS_KEY], "landmarks": ["apex"], "num_segmentation_heads": 2,
                                         "heatmap_encoding": HeatmapEncoding().to_dict()}}
    pooled = LandmarkHeads.from_plans(heads_plans).position_priors
    assert [p.landmarks["apex"].mean[0] for p in pooled] == [0.0, 2.0]  # from_plans sorts by key
    assert select_position_priors({"configurations": {}}, (0,)) == []  # a plain model: nothing to select
    assert select_position_priors({PLANS_KEY: {}}, "all") == ["fold_all"]


def _start_fold_0(folder: str, started) -> None:
    """Fold 0's trainer starting: nnUNetTrainerLandmark.on_train_start over a stand-in for nnU-Net's, which takes a
    while (data loaders, unpacking) and then rewrites plans.json from the in-memory plans, as nnunetv2 2.8.1 does."""
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_landmark.training.trainers import nnUNetTrainerLandmark

    def nnunet_on_train_start(self):
        started.set()
        time.sleep(1.5)
        trainer_module.save_json(self.plans_manager.plans, join(self.output_folder_base, 'plans.json'),
                                 sort_keys=False)

    trainer_module.nnUNetTrainer.on_train_start = nnunet_on_train_start
    trainer = object.__new__(nnUNetTrainerLandmark)
    trainer.plans_manager = PlansManager({"configurations": {}, PLANS_KEY: {PRIORS_KEY: {"fold_0": prior(0).to_dict()}}})
    trainer.output_folder_base, trainer.fold, trainer.local_rank = folder, 0, 0
    trainer.position_prior = prior(0)
    trainer.on_train_start()


def _finish_fold_1(folder: str, started) -> None:
    """Fold 1's final validation recording its prior while fold 0 is starting."""
    started.wait(60)
    time.sleep(0.3)
    record_position_prior(str(Path(folder) / "plans.json"), "fold_1", prior(1))


def test_a_fold_starting_beside_another_keeps_the_prior_that_fold_records():
    """Two processes: fold 0 starts (nnU-Net rewrites plans.json from its in-memory plans, which hold fold 0's prior
    only) while fold 1 records its prior. Both priors must survive. Before, the trainer read the other folds' priors,
    let nnU-Net rewrite the file unlocked and added them back: fold 1's prior, recorded in between, was lost."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        plans_file = Path(folder) / "plans.json"
        plans_file.write_text(json.dumps({"configurations": {}, PLANS_KEY: {PRIORS_KEY: {}}}))
        context = multiprocessing.get_context("fork")
        started = context.Event()
        processes = [context.Process(target=_start_fold_0, args=(folder, started)),
                     context.Process(target=_finish_fold_1, args=(folder, started))]
        for p in processes:
            p.start()
        for p in processes:
            p.join(120)
        assert [p.exitcode for p in processes] == [0, 0]
        recorded = recorded_position_priors(str(plans_file))
        assert sorted(recorded) == ["fold_0", "fold_1"], recorded
        assert recorded["fold_1"] == prior(1).to_dict()
