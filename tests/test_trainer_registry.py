"""Every trainer the package defines is found by nnU-Net's lookup and builds on a real (tiny) dataset.

The trainers are enumerated from the modules of ``nnunet_landmark.training`` (every nnUNetTrainer subclass defined
in any of them, core and variants), so a trainer or variants module added later is covered without touching this
file, and one that ``all_trainers`` (what nnU-Net's lookup imports) forgets fails. Each is looked up by name as
``nnUNetv2_train -tr NAME`` does, constructed on the session's ``smoke_dataset`` (conftest.py) and initialised
(network, optimizer, loss, landmarks); what its name promises (epochs, beta, Gaussian, Adam, CPU budget) is
checked against what it built.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import CONFIG, PLANS

pytestmark = pytest.mark.slow


def defined_trainers() -> dict[str, type]:
    """Every nnUNetTrainer subclass defined in a module of ``nnunet_landmark.training`` (walked, not listed)."""
    import importlib
    import pkgutil

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import nnunet_landmark.training as package
    found = {}
    for module_info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, nnUNetTrainer) and value.__module__ == module.__name__:
                assert found.setdefault(name, value) is value, f"two trainers named {name}: checkpoints store names"
    return found


def test_every_trainer_is_exported_for_the_lookup():
    from nnunet_landmark.training import all_trainers
    found = defined_trainers()
    assert "nnUNetTrainerLandmark" in found and len(found) >= 15
    assert sorted(all_trainers.__all__) == sorted(found)  # what the lookup's ``import *`` re-exports


def test_every_trainer_is_found_by_nnunet_and_builds(smoke_dataset, tmp_path, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_landmark.training.trainers import nnUNetTrainerLandmark

    env = smoke_dataset["env"]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))  # the session's trained models stay untouched
    pre = Path(env["nnUNet_preprocessed"]) / smoke_dataset["dataset"]
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    num_landmarks = len(smoke_dataset["landmarks"])
    trainers = defined_trainers()
    optimizers = {}
    for name, cls in sorted(trainers.items()):
        found = recursive_find_trainer_class_by_name(name)
        assert found is cls, f"nnU-Net's lookup of {name} gave {found}"
        trainer = found({**json.loads(json.dumps(plans)), "continue_training": False}, CONFIG, 0, dataset_json,
                        torch.device("cpu"))
        trainer.initialize()
        optimizers[name] = (type(trainer.optimizer), trainer.initial_lr)
        is_landmark = isinstance(trainer, nnUNetTrainerLandmark)
        output = trainer.network(torch.zeros(1, 1, *trainer.configuration_manager.patch_size))[0]
        assert output.shape[1] == 2 + (num_landmarks if is_landmark else 0), name
        if is_landmark:
            assert list(trainer.landmark_heads.names) == smoke_dataset["landmarks"], name
            expected_encoding = "gaussian" if "Gaussian" in name else "cone" if "NnLandmark" in name else "log_distance"
            assert trainer.landmark_heads.encoding.kind == expected_encoding, name
            # the recipes (benchmarks/results/ABLATION.md): the paper's exact setting, nnLandmark's, and ours by default
            head, loss = trainer.landmark_heads.head, trainer.loss
            if "Paper" in name:
                assert (head.kind, loss.reduction, loss.deep_supervision, loss.heatmap_loss_weight) == \
                    ("shared", "mean", False, 10.0), name
                assert trainer.landmark_heads.encoding.max_distance_mm > 100, name  # the patch diagonal
            elif "NnLandmark" in name:
                assert (head.kind, loss.heatmap_loss, loss.reduction, loss.topk_fraction) == \
                    ("shared", "bce", "topk", 0.2), name
                assert trainer.landmark_heads.encoding.max_distance_mm == pytest.approx(
                    15 * max(trainer.configuration_manager.spacing)), name
            else:
                assert (head.kind, head.stride, head.trunk_gradient_scale, loss.reduction) == \
                    ("decoupled", 2, 0.3, "landmark"), name
                assert trainer.landmark_heads.encoding.max_distance_mm == 30.0, name
            assert trainer.landmark_oversample_percent == (0.0 if "Paper" in name else 0.33), name
            assert trainer.loss.heatmap_loss_weight == trainer.heatmap_loss_weight, name
            beta = re.search(r"_beta(\d+)", name)
            if beta:
                assert trainer.heatmap_loss_weight == float(beta.group(1)), name
        epochs = re.search(r"_(\d+)epochs?$", name)
        if epochs:
            assert trainer.num_epochs == int(epochs.group(1)), name
        if "Adam" in name:
            assert isinstance(trainer.optimizer, torch.optim.Adam), name
        if "1en3" in name:
            assert trainer.initial_lr == pytest.approx(1e-3), name
        budget = re.search(r"_cpu_(smoke|learn)$", name)
        if budget:
            total = trainer.num_epochs * trainer.num_iterations_per_epoch
            assert total == {"smoke": 10, "learn": 2000}[budget.group(1)], (name, total)  # README's trainer table
            plain = trainers[f"nnUNetTrainer_cpu_{budget.group(1)}"]
            # landmark and plain variants of a budget train alike (comparisons are fair)
            assert (plain.budget_epochs, plain.budget_iterations) == (cls.budget_epochs, cls.budget_iterations)
            mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3]
            if budget.group(1) == "learn":
                assert mirror_axes is None and trainer.inference_allowed_mirroring_axes is None, name
            else:
                assert mirror_axes is not None, name
    # each CPU budget's landmark and plain models also use the same optimizer and learning rate
    for budget in ("smoke", "learn"):
        assert optimizers[f"nnUNetTrainerLandmark_cpu_{budget}"] == optimizers[f"nnUNetTrainer_cpu_{budget}"], budget


def test_landmark_trainers_refuse_a_2d_configuration(smoke_dataset, tmp_path, monkeypatch):
    from nnunet_landmark.training.trainers import nnUNetTrainerLandmark

    env = smoke_dataset["env"]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    pre = Path(env["nnUNet_preprocessed"]) / smoke_dataset["dataset"]
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    assert len(plans["configurations"]["2d"]["patch_size"]) == 2  # the planner's own 2d configuration
    for name, cls in sorted(defined_trainers().items()):
        if not issubclass(cls, nnUNetTrainerLandmark):
            continue
        with pytest.raises(RuntimeError, match=r"configuration '2d' is 2D; nnUNetTrainerLandmark needs a 3D "
                                               r"configuration such as 3d_fullres"):
            cls({**json.loads(json.dumps(plans)), "continue_training": False}, "2d", 0, dataset_json,
                torch.device("cpu"))
    assert not (tmp_path / "results").exists()  # refused before nnU-Net creates output folders
