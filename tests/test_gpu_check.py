"""benchmarks/gpu_check.sh: its CPU dry run end to end, and the checks that decide its exit status."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_gpu_check():
    """The checks of benchmarks/gpu_check.py (its module ``gpu_check_report.py``, loaded alone)."""
    spec = importlib.util.spec_from_file_location("gpu_check_report", REPO / "benchmarks" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _passing_results(dry_run: bool) -> dict:
    train = {"losses": [1.2, 1.1], "skipped_gradscaler_steps": {"warmup": 1, "timed": 0},
             "dynamo_frames_compiled_after_warmup": 0, "compiled": True, "recompiles": 0, "recompile_reasons": []}
    return {"dry_run": dry_run, "prediction_cases": 2,
            "training": {"plain": copy.deepcopy(train), "landmark": copy.deepcopy(train)},
            "prediction": {"plain": {"segmentations": 2, "markups": 0, "landmark_table": False, "seconds": 10.0},
                           "landmark": {"segmentations": 2, "markups": 2, "landmark_table": True, "seconds": 10.4}},
            "agreement": {"devices": ["cuda", "cpu"], "max_sigmoid_difference": 0.004,
                          "landmark_distance_mm": {"apex": 0.2}},
            "ratios": {"iteration": 1.01, "memory": 1.0, "prediction": 1.04}}


@pytest.mark.parametrize("change, expected", [
    (lambda r: r["training"]["landmark"]["losses"].append(float("nan")), "non-finite training loss"),
    (lambda r: r["training"]["plain"]["skipped_gradscaler_steps"].update(timed=2), "GradScaler skipped 2"),
    (lambda r: r["training"]["landmark"].update(dynamo_frames_compiled_after_warmup=1), "after warm-up"),
    (lambda r: r["training"]["landmark"].update(recompiles=3), "3 recompiles"),
    (lambda r: r["training"]["plain"].update(compiled=False), "did not use torch.compile"),
    (lambda r: r["prediction"]["plain"].update(markups=1), "plain nnU-Net wrote landmark files"),
    (lambda r: r["prediction"]["landmark"].update(markups=1), "wrote 1 of 2 markups"),
    (lambda r: r["prediction"]["landmark"].update(segmentations=1), "segmentations written"),
    (lambda r: r["agreement"].update(max_sigmoid_difference=0.05), "heatmaps differ"),
    (lambda r: r["agreement"].update(landmark_distance_mm={"apex": 2.5}), "landmarks differ"),
    (lambda r: r["ratios"].update(iteration=1.031), "iteration ratio 1.031"),
    (lambda r: r["ratios"].update(memory=1.05), "memory ratio"),
    (lambda r: r["ratios"].update(prediction=1.2), "prediction ratio"),
])
def test_each_failed_check_is_reported(change, expected):
    gpu_check = _load_gpu_check()
    assert gpu_check.find_failures(_passing_results(dry_run=False)) == []
    results = _passing_results(dry_run=False)
    change(results)
    failures = gpu_check.find_failures(results)
    assert len(failures) == 1 and expected in failures[0], failures


def test_performance_targets_are_not_enforced_in_a_dry_run():
    gpu_check = _load_gpu_check()
    results = _passing_results(dry_run=True)
    results["ratios"] = {"iteration": 0.3, "memory": float("nan"), "prediction": 2.0}
    results["training"]["plain"]["compiled"] = results["training"]["landmark"]["compiled"] = False
    assert gpu_check.find_failures(results) == []
    broken = copy.deepcopy(results)
    broken["prediction"]["plain"]["landmark_table"] = True
    assert gpu_check.find_failures(broken) == ["plain nnU-Net wrote landmark files"]


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """The script a GPU user runs, on the CPU with tiny phantoms: it trains both models, predicts with the stock
    command, compares two predictors, prints the table and exits 0."""
    workdir = tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "nnUNet_n_proc_DA": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--no-install", "--dry-run",
                           "--workdir", str(workdir)], capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "PASSED: every check" in done.stdout
    results = json.loads((workdir / "gpu_check.json").read_text())
    assert results["failures"] == [] and results["dry_run"]
    assert (workdir / "gpu_check.md").read_text().splitlines()[3] == \
        "| what | plain nnU-Net | landmark | ratio | target |"
    for label in ("plain", "landmark"):
        r = results["training"][label]
        assert len(r["losses"]) == 3 and all(0 < loss < 10 for loss in r["losses"]), r["losses"]
        assert r["augmentation_workers"] == 1 and r["patch_size"] == [32, 32, 32] and not r["compiled"]
        assert Path(r["output_folder"], "checkpoint_final.pth").is_file()
    assert results["prediction"]["landmark"]["markups"] == 1 and results["prediction"]["landmark"]["landmark_table"]
    assert results["prediction"]["plain"]["markups"] == 0 and not results["prediction"]["plain"]["landmark_table"]
    # the same model on the same device twice: identical heatmaps and landmarks
    agreement = results["agreement"]
    assert agreement["max_sigmoid_difference"] == 0.0 and agreement["landmark_distance_mm"] == {"apex": 0.0}
    assert 0.2 < agreement["reliable_fraction"] <= 1.0
