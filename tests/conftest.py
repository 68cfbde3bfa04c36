"""Shared fixtures: nnU-Net folders in a temporary place, CLI runner, the real-data folder."""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
import sys
from pathlib import Path

import pytest

from nnunet_landmark.phantom_dataset import PLANS, SMALL_CONFIGURATION, prepare_phantom_dataset, run_console_script
from nnunet_landmark.results_folder import results_folder

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BIN = Path(sys.executable).parent


def shared_data(*parts: str) -> Path:
    """A file of ../shared/data; the test is skipped (with the reason) only where that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-anatomy data folder {SHARED_DATA} is absent")
    assert path.exists(), f"{path} missing although {SHARED_DATA} exists"
    return path


def nnunet_environment(root: Path) -> dict[str, str]:
    env = {
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        "nnUNet_n_proc_DA": "2",
        "nnUNet_compile": "0",
    }
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch) -> dict[str, str]:
    """Empty nnUNet_raw / _preprocessed / _results folders, set in this process's environment."""
    env = nnunet_environment(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@contextmanager
def environment(env: dict[str, str]):
    """Set environment variables for the duration of a block (in-process nnU-Net calls read them)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_cli(command: list[str], env: dict[str, str] | None = None, timeout: float = 900,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run an installed console script (nnUNetv2_*) from this interpreter's bin folder (``run_console_script``)."""
    return run_console_script(command, env, timeout=timeout, check=check)


# ---------------------------------------------------------------------------------------------- session datasets
# PLANS (nnUNetResEncUNetMPlans) and the small configuration (3d_cpu): prepare_phantom_dataset's
CONFIG = SMALL_CONFIGURATION["name"]


def prepare_dataset(root: Path, dataset_id: int, name: str, landmarks: list[str], num_cases: int, size, flips: bool,
                    folds: int, seed: int) -> dict:
    """Phantoms in the MM-WHS layout -> nnUNetv2_convert_MMWHS -> nnUNetv2_plan_and_preprocess (ResEnc-M planner),
    plus a small CPU configuration ``3d_cpu`` (32^3 patch, 8-64 features, batch 2) added to the plans
    (``prepare_phantom_dataset``, as the demo and the benchmarks)."""
    env = nnunet_environment(root)
    env["nnUNet_def_n_proc"] = "2"
    dataset = prepare_phantom_dataset(env, dataset_id, root / "mmwhs", name=name, landmarks=landmarks, folds=folds,
                                      num_cases=num_cases, seed=seed, size=size, flips=flips, phantom_progress=False)
    return {"root": root, "env": env, "dataset": dataset.name, "dataset_id": dataset_id, "landmarks": landmarks}


@pytest.fixture(scope="session")
def smoke_dataset(tmp_path_factory):
    """10 tiny phantoms with random axis flips and oblique axes, two landmarks (apex, mitral valve), 5 folds: for
    proving that training and prediction run, with several landmarks, on awkward image geometry."""
    return prepare_dataset(tmp_path_factory.mktemp("smoke_dataset"), 811, "SmokePhantoms", ["apex", "mitral_valve"],
                           10, "tiny", True, 5, 3)


@pytest.fixture(scope="session")
def learning_dataset(tmp_path_factory):
    """20 phantoms of 64 x 64 x 48 voxels (~3.4 mm), axes oriented alike as in a real release, the apex, 10 folds:
    for proving that the landmark model learns."""
    return prepare_dataset(tmp_path_factory.mktemp("learning_dataset"), 812, "LearningPhantoms", ["apex"],
                           20, (64, 64, 48), False, 10, 4)


@pytest.fixture(scope="session")
def learned_model(learning_dataset):
    """``nnUNetTrainerLandmark_cpu_learn`` (the default recipe, 40 x 50 iterations, Adam) trained on fold 0 of the
    ``learning_dataset`` with the real ``nnUNetv2_train``, seeded (``nnUNet_landmark_seed=1``; ~6-8 minutes on 2
    cores): a model that has learned something, for the tests that judge what it predicts."""
    env, trainer = {**learning_dataset["env"], "nnUNet_landmark_seed": "1"}, "nnUNetTrainerLandmark_cpu_learn"
    run_cli(["nnUNetv2_train", str(learning_dataset["dataset_id"]), CONFIG, "0", "-tr", trainer, "-p", PLANS,
             "-device", "cpu"], env, timeout=1800)
    folder = results_folder(learning_dataset["dataset"], trainer, PLANS, CONFIG, results=env["nnUNet_results"])
    return {**learning_dataset, "trainer": trainer, "folder": folder}
