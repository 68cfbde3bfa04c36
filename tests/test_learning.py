"""Proof that it learns: a few minutes of CPU training on phantoms, judged on phantoms it never saw.

The session's ``learning_dataset`` (conftest.py: 20 phantoms of 64 x 64 x 48 voxels, ~3.4 mm, the apex) trains
``nnUNetTrainerLandmark_cpu_learn`` (40 x 50 iterations, Adam, beta 100, 32^3 patches) with the real
``nnUNetv2_train``; ``nnUNetv2_predict`` then segments and localises 16 new phantoms. The apex error must be well below what predicting
the mean position gives (fitted on the training cases) and the LV Dice above 0.8.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CONFIG, PLANS, run_cli
from nnunet_landmark.baselines import MeanPositionBaseline
from nnunet_landmark.evaluation.metrics import dice
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.landmark_files import read_markups

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerLandmark_cpu_learn"


def test_landmark_model_learns_on_cpu(learning_dataset, tmp_path):
    from nnunet_landmark.phantoms import write_mmwhs_phantoms

    env, DATASET_ID, DATASET = learning_dataset["env"], learning_dataset["dataset_id"], learning_dataset["dataset"]
    LANDMARKS = learning_dataset["landmarks"]
    run_cli(["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"], env,
            timeout=1200)
    # held-out phantoms: same generator, seeds the training set never used
    test_root = tmp_path / "unseen"
    truth = write_mmwhs_phantoms(test_root, num_cases=16, seed=77, size=(64, 64, 48), flips=False, first_case=2001,
                                 progress=False)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for case in truth:
        (inputs / f"{case}_0000.nii.gz").symlink_to(test_root / "ct_train" / f"{case}_image.nii.gz")
    out = tmp_path / "predicted"
    run_cli(["nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG, "-f", "0",
             "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "--disable_tta"], env)

    # the mean-position baseline, fitted on the training cases of fold 0 (positions relative to the image centre)
    raw = Path(env["nnUNet_raw"]) / DATASET
    train_cases = json.loads((raw / "splits_final.json").read_text())[0]["train"]
    errors, baseline_errors, dices = {n: [] for n in LANDMARKS}, {n: [] for n in LANDMARKS}, []
    for name in LANDMARKS:
        baseline = MeanPositionBaseline().fit([
            (ImageGeometry.from_file(raw / "imagesTr" / f"{c}_0000.nii.gz"),
             read_markups(raw / "landmarksTr" / f"{c}.mrk.json")[name]) for c in train_cases])
        for case, landmarks in truth.items():
            geometry = ImageGeometry.from_file(inputs / f"{case}_0000.nii.gz")
            predicted = read_markups(out / f"{case}.mrk.json")[name]
            errors[name].append(np.linalg.norm(predicted - landmarks[name]))
            baseline_errors[name].append(np.linalg.norm(baseline.predict(geometry) - landmarks[name]))
    for case in truth:
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(test_root / "ct_train" / f"{case}_label.nii.gz"))) == 500
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz"))) == 1
        dices.append(dice(reference, prediction))
    report = {n: {"model_mm": np.round(errors[n], 1).tolist(), "mean_position_mm": np.round(baseline_errors[n], 1).tolist()}
              for n in LANDMARKS}
    print(json.dumps({"landmark_errors": report, "lv_dice": np.round(dices, 3).tolist()}, indent=1))
    assert np.mean(dices) > 0.8, dices
    for name in LANDMARKS:
        assert np.mean(errors[name]) < 0.6 * np.mean(baseline_errors[name]), (name, report[name])
