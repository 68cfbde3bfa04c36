"""The stock nnU-Net commands with the plugin installed: train, resume, validate, pretrain, predict.

The session's ``smoke_dataset`` (conftest.py: 10 tiny phantoms with flipped and oblique axes, landmarks apex
and mitral valve, 5 folds) is converted, planned and preprocessed once with the real commands. Models use the ``nnUNetTrainer*_cpu_smoke``
budget (2 epochs of 5 iterations): these tests prove the machinery, not the learning (see
test_learning.py for that).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, CONFIG, PLANS, environment, run_cli
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.landmark_files import read_landmark_table, read_markups
from nnunet_landmark.results_folder import results_folder as nnunet_results_folder

pytestmark = pytest.mark.slow

DATASET_ID = 811
DATASET = "Dataset811_SmokePhantoms"
LANDMARKS = ["apex", "mitral_valve"]
LANDMARK_TRAINER = "nnUNetTrainerLandmark_cpu_smoke"
PLAIN_TRAINER = "nnUNetTrainer_cpu_smoke"


def results_folder(env, trainer: str) -> Path:
    return nnunet_results_folder(DATASET, trainer, PLANS, CONFIG, results=env["nnUNet_results"])


def train(env, trainer: str, fold: int = 0, *extra: str):
    return run_cli(["nnUNetv2_train", str(DATASET_ID), CONFIG, str(fold), "-tr", trainer, "-p", PLANS, "-device", "cpu",
                    *extra], env)


@pytest.fixture(scope="session")
def landmark_model(smoke_dataset):
    env = smoke_dataset["env"]
    result = train(env, LANDMARK_TRAINER, 0)
    return {**smoke_dataset, "folder": results_folder(env, LANDMARK_TRAINER), "log": result.stdout}


@pytest.fixture(scope="session")
def plain_model(smoke_dataset):
    env = smoke_dataset["env"]
    train(env, PLAIN_TRAINER, 0)
    return {**smoke_dataset, "folder": results_folder(env, PLAIN_TRAINER)}


@pytest.fixture(scope="session")
def pretrained_fold(landmark_model, plain_model):
    """Fold 1 of the landmark model, started from the plain model's fold-0 weights (``-pretrained_weights``): the
    second fold of the two-fold prediction test, whichever test asks for it first."""
    env = landmark_model["env"]
    result = train(env, LANDMARK_TRAINER, 1, "-pretrained_weights",
                   str(plain_model["folder"] / "fold_0" / "checkpoint_final.pth"))
    return {**landmark_model, "pretrained_log": result.stdout}


def reference_landmarks(env, case: str) -> dict:
    return read_markups(Path(env["nnUNet_raw"]) / DATASET / "landmarksTr" / f"{case}.mrk.json")


def test_nnunetv2_train_runs_the_landmark_trainer(landmark_model):
    folder, env = landmark_model["folder"], landmark_model["env"]
    fold = folder / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "progress.png").is_file()
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["nnunet_landmark"]["landmarks"] == LANDMARKS
    assert plans["nnunet_landmark"]["heatmap_encoding"]["kind"] == "log_distance"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == LANDMARK_TRAINER
    assert checkpoint["current_epoch"] == 2
    weights = checkpoint["network_weights"]
    # the default decoupled head: nnU-Net's output layers make the C segmentation channels, the head's the K heatmaps
    assert plans["nnunet_landmark"]["heatmap_head"]["kind"] == "decoupled"
    last = [k for k in weights if k.startswith("decoder.seg_layers.") and k.endswith("weight")]
    assert last and all(weights[k].shape[0] == 2 for k in last)
    assert weights["heatmap_head.seg_layers.output.weight"].shape[0] == len(LANDMARKS)
    logging = checkpoint["logging"]
    assert len(logging["train_heatmap_losses"]) == 2 and len(logging["val_landmark_errors_mm"]) == 2
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "landmark error in validation patches (mm)" in log and "heatmap_loss (tr/val)" in log
    # final validation: nnU-Net's summary plus our landmarks beside it
    validation = fold / "validation"
    splits = json.loads((Path(env["nnUNet_preprocessed"]) / DATASET / "splits_final.json").read_text())
    # the converter's folds, installed where nnU-Net reads them
    assert splits == json.loads((Path(env["nnUNet_raw"]) / DATASET / "splits_final.json").read_text())
    assert len(splits) == 5 and len(splits[0]["val"]) == 2
    val_cases = sorted(splits[0]["val"])
    assert (validation / "summary.json").is_file()
    summary = json.loads((validation / "landmark_summary.json").read_text())
    assert sorted(summary["per_case"]) == val_cases
    table = read_landmark_table(validation / "landmarks.csv")
    assert sorted({(r["case"], r["name"]) for r in table}) == sorted((c, n) for c in val_cases for n in LANDMARKS)
    for case in val_cases:
        predicted = read_markups(validation / f"{case}.mrk.json", flagged=True)
        assert list(predicted) == LANDMARKS
        reference = reference_landmarks(env, case)
        for name in LANDMARKS:
            error = float(np.linalg.norm(predicted[name] - reference[name]))
            assert summary["per_case"][case][name] == pytest.approx(error, abs=1e-6)
    stats = summary["per_landmark"]["apex"]
    errors = [summary["per_case"][c]["apex"] for c in val_cases]
    assert stats["mean"] == pytest.approx(np.mean(errors)) and stats["max"] == pytest.approx(max(errors))
    assert not list(validation.glob("*_0000.nii.gz"))


def test_resume_with_c_continues_the_run(landmark_model):
    """--c after an interrupted run: the checkpoint's epoch is kept and the log goes on."""
    env = landmark_model["env"]
    fold = landmark_model["folder"] / "fold_2"
    if fold.exists():
        shutil.rmtree(fold)
    # an interrupted run: train one epoch in-process, keep only checkpoint_latest
    from nnunetv2.run.run_training import get_trainer_from_args
    with environment(env):
        trainer = get_trainer_from_args(str(DATASET_ID), CONFIG, 2, LANDMARK_TRAINER, PLANS, device=torch.device("cpu"))
        trainer.num_epochs = 1
        trainer.run_training()
    os.replace(fold / "checkpoint_final.pth", fold / "checkpoint_latest.pth")
    result = train(env, LANDMARK_TRAINER, 2, "--c")
    assert "Epoch 1" in result.stdout and "Epoch 0\n" not in result.stdout
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2
    assert len(checkpoint["logging"]["val_landmark_errors_mm"]) == 2
    assert (fold / "validation" / "landmark_summary.json").is_file()


def test_resume_after_a_hard_kill_in_the_middle_of_an_epoch(landmark_model):
    """SIGKILL (no clean-up of any kind) once the second epoch has started, then ``--c``: training goes on from the
    first epoch's checkpoint and ends with the landmark validation files."""
    env = landmark_model["env"]
    fold = landmark_model["folder"] / "fold_3"
    if fold.exists():
        shutil.rmtree(fold)
    command = [str(BIN / "nnUNetv2_train"), str(DATASET_ID), CONFIG, "3", "-tr", LANDMARK_TRAINER, "-p", PLANS,
               "-device", "cpu"]
    process = subprocess.Popen(command, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.rstrip().endswith("Epoch 1"):  # epoch 0's checkpoint is written; epoch 1's iterations start
                break
    finally:  # the trainer and its data augmentation workers, all in the new session's process group
        os.killpg(process.pid, signal.SIGKILL)
        process.stdout.close()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert not (fold / "checkpoint_final.pth").exists(), "the run finished before the kill: nothing was tested"
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1
    assert not (fold / "validation").exists()

    result = train(env, LANDMARK_TRAINER, 3, "--c")
    assert "Epoch 1" in result.stdout and "Epoch 0\n" not in result.stdout
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2
    assert len(checkpoint["logging"]["val_landmark_errors_mm"]) == 2
    assert checkpoint["logging"]["train_heatmap_losses"][0] == latest["logging"]["train_heatmap_losses"][0]
    val_cases = sorted(json.loads((Path(env["nnUNet_preprocessed"]) / DATASET / "splits_final.json").read_text())[3]["val"])
    summary = json.loads((fold / "validation" / "landmark_summary.json").read_text())
    assert sorted(summary["per_case"]) == val_cases
    assert all(np.isfinite(e) for case in summary["per_case"].values() for e in case.values())
    table = read_landmark_table(fold / "validation" / "landmarks.csv")
    assert sorted((r["case"], r["name"]) for r in table) == sorted((c, n) for c in val_cases for n in LANDMARKS)
    for case in val_cases:
        assert list(read_markups(fold / "validation" / f"{case}.mrk.json", flagged=True)) == LANDMARKS


def test_val_reruns_the_final_validation(landmark_model, tmp_path):
    """--val on the finished fold: the same checkpoint validated again gives the same landmarks and errors."""
    env, fold = landmark_model["env"], landmark_model["folder"] / "fold_0"
    before = (fold / "checkpoint_final.pth").stat().st_mtime
    first = json.loads((fold / "validation" / "landmark_summary.json").read_text())
    first_table = read_landmark_table(fold / "validation" / "landmarks.csv")
    shutil.move(fold / "validation", tmp_path / "first_validation")
    try:
        train(env, LANDMARK_TRAINER, 0, "--val")
        again = json.loads((fold / "validation" / "landmark_summary.json").read_text())
        assert again == first
        assert len(again["per_case"]) == 2
        assert sorted(map(str, read_landmark_table(fold / "validation" / "landmarks.csv"))) == \
            sorted(map(str, first_table))
        assert (fold / "checkpoint_final.pth").stat().st_mtime == before
    finally:  # the first validation stays for the tests that read it, whatever happened
        if (fold / "validation").exists():
            shutil.rmtree(fold / "validation")
        shutil.move(tmp_path / "first_validation", fold / "validation")


def test_plain_trainer_is_unchanged_and_its_weights_pretrain_a_landmark_model(plain_model, pretrained_fold):
    env, folder = plain_model["env"], plain_model["folder"]
    plans = json.loads((folder / "plans.json").read_text())
    assert "nnunet_landmark" not in plans
    weights = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    seg_layers = [v for k, v in weights["network_weights"].items() if ".seg_layers." in k and k.endswith("weight")]
    assert all(w.shape[0] == 2 for w in seg_layers)
    validation = folder / "fold_0" / "validation"
    assert (validation / "summary.json").is_file()
    assert not list(validation.glob("*.mrk.json")) and not (validation / "landmarks.csv").exists()
    # -pretrained_weights from the plain checkpoint (same plans): everything but the output layers transfers
    assert "Loading pretrained weights" in pretrained_fold["pretrained_log"]
    assert (results_folder(env, LANDMARK_TRAINER) / "fold_1" / "checkpoint_final.pth").is_file()


def test_trainer_refuses_bad_setups_at_initialisation(smoke_dataset, tmp_path, monkeypatch):
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_landmark.training.trainers import nnUNetTrainerLandmark

    env = smoke_dataset["env"]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    pre = Path(env["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    no_landmarks = {k: v for k, v in dataset_json.items() if k != "landmarks"}
    with pytest.raises(RuntimeError, match="no \"landmarks\" list"):
        nnUNetTrainerLandmark({**plans, "continue_training": False}, CONFIG, 0, no_landmarks, torch.device("cpu"))
    cascade = json.loads(json.dumps(plans))
    cascade["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    with pytest.raises(RuntimeError, match="cascade"):
        nnUNetTrainerLandmark({**cascade, "continue_training": False}, "3d_cascade_fullres", 0, dataset_json,
                              torch.device("cpu"))
    # a training case without its landmark file: one clear error naming it, at initialize()
    raw = tmp_path / "raw"
    shutil.copytree(Path(env["nnUNet_raw"]), raw)
    missing = sorted((raw / DATASET / "landmarksTr").glob("*.mrk.json"))[3]
    missing.unlink()
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    trainer = get_trainer_from_args(str(DATASET_ID), CONFIG, 0, "nnUNetTrainerLandmark", PLANS,
                                    device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match=missing.name.replace(".", r"\.")):
        trainer.initialize()


# ---------------------------------------------------------------------------------------------- prediction
@pytest.fixture(scope="session")
def prediction_inputs(landmark_model):
    """Three raw images (one per fold-0 validation case and one training case) as an nnU-Net input folder."""
    env, root = landmark_model["env"], landmark_model["root"]
    folder = root / "predict_in"
    folder.mkdir(exist_ok=True)
    images = sorted((Path(env["nnUNet_raw"]) / DATASET / "imagesTr").glob("*_0000.nii.gz"))[:3]
    for image in images:
        shutil.copyfile(image, folder / image.name)
    return folder, [i.name[:-len("_0000.nii.gz")] for i in images]


@pytest.fixture(scope="session")
def single_input(prediction_inputs):
    """The first of the prediction inputs alone (for the slower prediction variants)."""
    inputs, cases = prediction_inputs
    folder = inputs.parent / "predict_in_single"
    folder.mkdir(exist_ok=True)
    if not (folder / f"{cases[0]}_0000.nii.gz").exists():
        shutil.copyfile(inputs / f"{cases[0]}_0000.nii.gz", folder / f"{cases[0]}_0000.nii.gz")
    return folder, cases[:1]


def predict(env, inputs: Path, output: Path, trainer: str = LANDMARK_TRAINER, folds=("0",), *extra: str):
    return run_cli(["nnUNetv2_predict", "-i", str(inputs), "-o", str(output), "-d", str(DATASET_ID), "-c", CONFIG,
                    "-f", *folds, "-tr", trainer, "-p", PLANS, "-device", "cpu", *extra], env)


def in_process_logits(env, model_folder: Path, folds, image: Path, use_mirroring: bool):
    """The logits nnU-Net's predictor makes for one image, and the preprocessed properties."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    from nnunet_landmark.predictor import nnUNetLandmarkPredictor
    with environment(env):
        predictor = nnUNetLandmarkPredictor(use_mirroring=use_mirroring, device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), folds, "checkpoint_final.pth")
        data, properties = SimpleITKIO().read_images([str(image)])
        item = next(PreprocessAdapterFromNpy([data], [None], [properties], [None], predictor.plans_manager,
                                             predictor.dataset_json, predictor.configuration_manager, 1))
        # as nnUNetv2_predict hands them to the export: float16 numpy (float32 would flip ties in the argmax)
        logits = predictor.predict_logits_from_preprocessed_data(item["data"]).cpu().numpy()
        return predictor, logits, item["data_properties"], data, properties


def test_predict_writes_segmentation_and_landmarks(landmark_model, prediction_inputs, tmp_path):
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from nnunet_landmark.landmark_export import decode_landmarks

    env, (inputs, cases) = landmark_model["env"], prediction_inputs
    out = tmp_path / "pred"
    predict(env, inputs, out, LANDMARK_TRAINER, ("0",), "--disable_tta", "-npp", "0", "-nps", "0")
    table = read_landmark_table(out / "landmarks.csv")
    assert [(r["case"], r["name"]) for r in table] == [(c, n) for c in cases for n in LANDMARKS]
    with open(out / "landmarks.csv") as f:
        assert f.readline().strip() == ("case,name,x,y,z,i,j,k,confidence,heatmap_x,heatmap_y,heatmap_z,estimator,"
                                        "prior_x,prior_y,prior_z,heatmap_claim_mm,expected_error_mm,status")
    for case in cases:
        image = inputs / f"{case}_0000.nii.gz"
        seg = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert ImageGeometry.from_image(seg).same_grid_as(ImageGeometry.from_file(image))
        markups = read_markups(out / f"{case}.mrk.json", flagged=True)
        # the same numbers in the markups and the table; the voxel index is the world point on the image grid
        geometry = ImageGeometry.from_file(image)
        for row in (r for r in table if r["case"] == case):
            np.testing.assert_allclose([row["x"], row["y"], row["z"]], markups[row["name"]], atol=1e-3)
            np.testing.assert_allclose(geometry.index_to_world([float(row[k]) for k in "ijk"]), markups[row["name"]],
                                       atol=1e-3)
        # the segmentation is exactly nnU-Net's export of the C segmentation channels
        predictor, logits, pre_properties, _, _ = in_process_logits(env, landmark_model["folder"], (0,), image, False)
        expected = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits[:2], predictor.plans_manager, predictor.configuration_manager,
            predictor.plans_manager.get_label_manager(predictor.dataset_json), pre_properties)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), expected)
        decoded = decode_landmarks(logits[2:], pre_properties, predictor.plans_manager,
                                   predictor.configuration_manager, predictor.landmark_heads,
                                   segmentation_logits=logits[:2],
                                   label_manager=predictor.plans_manager.get_label_manager(predictor.dataset_json))
        for name in LANDMARKS:
            np.testing.assert_allclose(markups[name], decoded[name]["world"], atol=1e-3)
        # the confidence, the heatmap's own extremum and the estimator in the table are the decoder's for these
        # logits (the smoke model's segmentation may hold no LV at all, then there is no frame for the prior)
        for row in (r for r in table if r["case"] == case):
            assert float(row["confidence"]) == pytest.approx(decoded[row["name"]]["confidence"], abs=1e-4)
            np.testing.assert_allclose([float(row[f"heatmap_{a}"]) for a in "xyz"],
                                       decoded[row["name"]]["heatmap_world"], atol=1e-3)
            assert row["estimator"] == decoded[row["name"]]["estimator"]
            assert row["status"] == decoded[row["name"]]["status"]
            assert float(row["heatmap_claim_mm"]) == pytest.approx(decoded[row["name"]]["heatmap_claim_mm"], abs=1e-4)
            assert float(row["expected_error_mm"]) == pytest.approx(decoded[row["name"]]["expected_error_mm"],
                                                                    abs=1e-4, nan_ok=True)


def test_predict_with_tta_two_folds_probabilities_and_continue(pretrained_fold, prediction_inputs, tmp_path):
    from nnunet_landmark.geometry import CaseGeometry
    from nnunet_landmark.landmark_export import decode_landmarks, heatmap_stride, write_heatmaps

    landmark_model = pretrained_fold  # folds 0 and 1 (the latter pretrained), whatever order the tests run in
    env, (inputs, cases) = landmark_model["env"], prediction_inputs
    single = tmp_path / "single"
    single.mkdir()
    shutil.copyfile(inputs / f"{cases[0]}_0000.nii.gz", single / f"{cases[0]}_0000.nii.gz")
    out = tmp_path / "pred_tta"
    predict(env, single, out, LANDMARK_TRAINER, ("0", "1"), "--save_probabilities", "-npp", "1", "-nps", "1")
    case = cases[0]
    image = inputs / f"{case}_0000.nii.gz"
    # folds averaged like segmentation logits (with mirroring): the landmarks decode the averaged heatmaps
    predictor, logits, pre_properties, _, _ = in_process_logits(env, landmark_model["folder"], (0, 1), image, True)
    decoded = decode_landmarks(logits[2:], pre_properties, predictor.plans_manager, predictor.configuration_manager,
                               predictor.landmark_heads, segmentation_logits=logits[:2],
                               label_manager=predictor.plans_manager.get_label_manager(predictor.dataset_json))
    # every trained fold recorded its position prior (other tests of this session train further folds of this
    # model), and prediction pools exactly the folds it was asked for (-f 0 1), never another fold's
    folds = {p.name for p in landmark_model["folder"].glob("fold_*")}
    recorded = json.loads((landmark_model["folder"] / "plans.json").read_text())["nnunet_landmark"]["position_priors"]
    assert {"fold_0", "fold_1"} <= folds and set(recorded) == folds
    assert [p.to_dict() for p in predictor.landmark_heads.position_priors] == [recorded["fold_0"], recorded["fold_1"]]
    markups = read_markups(out / f"{case}.mrk.json", flagged=True)
    for name in LANDMARKS:
        np.testing.assert_allclose(markups[name], decoded[name]["world"], atol=1e-2)
    # probabilities: nnU-Net's npz holds the C segmentation channels; heatmaps are NIfTIs on the grid they were
    # decoded on (the preprocessed grid at the head's stride), made from the heatmaps the landmarks were decoded from
    # (both folds, mirrored), exactly as the export function makes them of the in-process logits (whose content and
    # geometry, and where a heatmap has a peak its extremum, test_landmark_export checks)
    assert np.load(out / f"{case}.npz")["probabilities"].shape[0] == 2
    heads = predictor.landmark_heads
    expected = write_heatmaps(logits[2:], pre_properties, predictor.plans_manager, predictor.configuration_manager,
                              heads, str(tmp_path / "expected" / case))
    grid = CaseGeometry.from_nnunet(pre_properties, predictor.plans_manager.transpose_forward,
                                    predictor.configuration_manager.spacing)
    stride = heatmap_stride(heads)
    for name, expected_file in zip(LANDMARKS, expected):
        heatmap = sitk.ReadImage(str(out / "heatmaps" / f"{case}_{name}.nii.gz"))
        assert ImageGeometry.from_image(heatmap).same_grid_as(
            grid.preprocessed_image_geometry(logits.shape[1:], stride))
        values = sitk.GetArrayFromImage(heatmap)
        np.testing.assert_allclose(values, sitk.GetArrayFromImage(sitk.ReadImage(expected_file)), rtol=0, atol=2e-3)
    # --continue_prediction on the full input folder leaves the finished case alone and completes the table
    stamps = {p.name: p.stat().st_mtime for p in out.iterdir() if p.is_file()}
    predict(env, inputs, out, LANDMARK_TRAINER, ("0", "1"), "--save_probabilities", "--continue_prediction",
            "--disable_tta")
    assert (out / f"{case}.mrk.json").stat().st_mtime == stamps[f"{case}.mrk.json"]
    assert all((out / f"{c}.nii.gz").exists() and (out / f"{c}.mrk.json").exists() for c in cases)
    table = read_landmark_table(out / "landmarks.csv")
    assert sorted((r["case"], r["name"]) for r in table) == sorted((c, n) for c in cases for n in LANDMARKS)


def test_priors_follow_the_folds_predicted_with(pretrained_fold, single_input, tmp_path):
    """``nnUNetv2_predict -f 1`` places the landmarks with fold 1's prior alone: fold 0's (fitted on cases that are
    fold 1's validation cases, and the other way round) never enters. Before, every recorded fold's prior was
    pooled whatever -f said: cross-validation predictions met priors fitted on the very cases they predicted."""
    from nnunet_landmark.landmark_export import decode_landmarks
    from nnunet_landmark.landmark_heads import LandmarkHeads

    env, (inputs, cases) = pretrained_fold["env"], single_input
    folder = pretrained_fold["folder"]
    out = tmp_path / "fold1"
    predict(env, inputs, out, LANDMARK_TRAINER, ("1",), "--disable_tta", "-npp", "0", "-nps", "0")
    recorded = json.loads((folder / "plans.json").read_text())["nnunet_landmark"]["position_priors"]
    predictor, logits, pre_properties, _, _ = in_process_logits(env, folder, (1,), inputs / f"{cases[0]}_0000.nii.gz",
                                                                False)
    assert [p.to_dict() for p in predictor.landmark_heads.position_priors] == [recorded["fold_1"]]
    label_manager = predictor.plans_manager.get_label_manager(predictor.dataset_json)
    markups = read_markups(out / f"{cases[0]}.mrk.json", flagged=True)
    own = decode_landmarks(logits[2:], pre_properties, predictor.plans_manager, predictor.configuration_manager,
                           predictor.landmark_heads, segmentation_logits=logits[:2], label_manager=label_manager)
    for name in LANDMARKS:
        np.testing.assert_allclose(markups[name], own[name]["world"], atol=1e-3)
    assert len(LandmarkHeads.from_plans(json.loads((folder / "plans.json").read_text())).position_priors) >= 2


def test_exported_model_installs_into_an_empty_results_folder_and_predicts(landmark_model, single_input, tmp_path):
    """Sharing a model the nnU-Net way: nnUNetv2_export_model_to_zip, then nnUNetv2_install_pretrained_model_from_zip
    where nnU-Net's folders are empty; nnUNetv2_predict there gives the landmarks the original folder gives."""
    import zipfile

    env, (inputs, cases) = landmark_model["env"], single_input
    archive = tmp_path / "model.zip"
    run_cli(["nnUNetv2_export_model_to_zip", "-d", str(DATASET_ID), "-o", str(archive), "-c", CONFIG,
             "-tr", LANDMARK_TRAINER, "-p", PLANS, "-f", "0"], env)
    model = results_folder(env, LANDMARK_TRAINER).relative_to(env["nnUNet_results"]).as_posix()
    assert {f"{model}/plans.json", f"{model}/fold_0/checkpoint_final.pth"} <= set(zipfile.ZipFile(archive).namelist())
    elsewhere = {key: str(tmp_path / "elsewhere" / key) for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in elsewhere.values():
        Path(folder).mkdir(parents=True)
    run_cli(["nnUNetv2_install_pretrained_model_from_zip", str(archive)], elsewhere)
    assert (Path(elsewhere["nnUNet_results"]) / model / "fold_0" / "checkpoint_final.pth").is_file()
    installed, original = tmp_path / "pred_installed", tmp_path / "pred_original"
    predict(elsewhere, inputs, installed, LANDMARK_TRAINER, ("0",), "--disable_tta")
    predict(env, inputs, original, LANDMARK_TRAINER, ("0",), "--disable_tta")
    for case in cases:
        got = read_markups(installed / f"{case}.mrk.json", flagged=True)
        expected = read_markups(original / f"{case}.mrk.json", flagged=True)
        assert list(got) == LANDMARKS
        for name in LANDMARKS:
            np.testing.assert_array_equal(got[name], expected[name])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(installed / f"{case}.nii.gz"))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(original / f"{case}.nii.gz"))))
    assert read_landmark_table(installed / "landmarks.csv") == read_landmark_table(original / "landmarks.csv")


def test_predict_from_modelfolder(landmark_model, prediction_inputs, tmp_path):
    env, (inputs, cases) = landmark_model["env"], prediction_inputs
    out = tmp_path / "pred_mf"
    run_cli(["nnUNetv2_predict_from_modelfolder", "-i", str(inputs), "-o", str(out), "-m",
             str(landmark_model["folder"]), "-f", "0", "-device", "cpu", "--disable_tta"], env)
    assert all((out / f"{c}.mrk.json").is_file() and (out / f"{c}.nii.gz").is_file() for c in cases)
    assert len(read_landmark_table(out / "landmarks.csv")) == len(cases) * len(LANDMARKS)


def test_plain_models_predict_exactly_as_before(plain_model, single_input, tmp_path):
    """A plain model predicted by the stock command (our code never loaded) and in a process where our
    adaptations of nnU-Net are installed give identical files."""
    env, (inputs, cases) = plain_model["env"], single_input
    # the smoke model under nnU-Net's own trainer name (same network and plans): its lookup never touches our code
    stock = results_folder(env, "nnUNetTrainer")
    if not stock.exists():
        shutil.copytree(plain_model["folder"], stock)
        checkpoint_file = stock / "fold_0" / "checkpoint_final.pth"
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
        checkpoint["trainer_name"] = "nnUNetTrainer"
        torch.save(checkpoint, checkpoint_file)
    out = tmp_path / "plain_cli"
    result = predict(env, inputs, out, "nnUNetTrainer", ("0",), "--disable_tta", "--save_probabilities")
    assert "nnunet_landmark" not in result.stdout + result.stderr
    script = (f"import nnunet_landmark.training.trainers\n"  # installs the adaptations
              f"from nnunetv2.inference.predict_from_raw_data import predict_entry_point\n"
              f"import sys\nsys.argv = ['nnUNetv2_predict', '-i', {str(inputs)!r}, '-o', {str(tmp_path / 'plain_patched')!r}, "
              f"'-d', '{DATASET_ID}', '-c', '{CONFIG}', '-f', '0', '-tr', 'nnUNetTrainer', '-p', '{PLANS}', "
              f"'-device', 'cpu', '--disable_tta', '--save_probabilities']\n"
              f"if __name__ == '__main__':\n    predict_entry_point()\n")
    (tmp_path / "patched_predict.py").write_text(script)
    import sys
    run_cli([sys.executable, str(tmp_path / "patched_predict.py")], env)
    for case in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain_patched" / f"{case}.nii.gz")))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.load(out / f"{case}.npz")["probabilities"],
                                      np.load(tmp_path / "plain_patched" / f"{case}.npz")["probabilities"])
    for folder in (out, tmp_path / "plain_patched"):
        assert not list(folder.glob("*.mrk.json")) and not (folder / "landmarks.csv").exists()


def test_python_predictor_returns_segmentation_and_landmarks(landmark_model, single_input, tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_landmark.predictor import nnUNetLandmarkPredictor

    env, (inputs, cases) = landmark_model["env"], single_input
    out = tmp_path / "pred_ref"
    predict(env, inputs, out, LANDMARK_TRAINER, ("0",), "--disable_tta")
    predictor = nnUNetLandmarkPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(landmark_model["folder"]), (0,), "checkpoint_final.pth")
    image, properties = SimpleITKIO().read_images([str(inputs / f"{cases[0]}_0000.nii.gz")])
    segmentation, landmarks = predictor.predict_single_npy_array_with_landmarks(image, properties)
    np.testing.assert_array_equal(segmentation, sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{cases[0]}.nii.gz"))))
    markups = read_markups(out / f"{cases[0]}.mrk.json", flagged=True)
    assert list(landmarks) == LANDMARKS
    for name in LANDMARKS:
        np.testing.assert_allclose(landmarks[name]["world"], markups[name], atol=1e-3)


def test_training_records_the_position_prior_and_fit_prior_reproduces_it(landmark_model, tmp_path):
    """The trainer learns each landmark's position prior from its fold's training cases (reference segmentations
    and landmarks): the frame, the boundary guard (the landmark's distance from its structure's boundary: learned,
    plausible) and the structures' volumes; then, from its validation cases, the heatmap's and the prior's errors and
    the heatmap's claims; and records it in the model's plans.json. ``nnUNetv2_landmark_fit_prior`` (for models
    trained before priors existed) fits exactly the same from the same cases and the fold's validation table."""
    plans = json.loads((landmark_model["folder"] / "plans.json").read_text())
    entry = plans["nnunet_landmark"]["position_priors"]["fold_0"]
    recorded = entry["landmarks"]
    assert sorted(recorded) == sorted(LANDMARKS)
    splits = json.loads((Path(landmark_model["env"]["nnUNet_preprocessed"]) / DATASET / "splits_final.json").read_text())
    for name, prior in recorded.items():
        assert prior["cases"] == len(splits[0]["train"]) == 8
        assert prior["loo_rms_mm"] > 0
        # the guard: apex and mitral valve sit on the LV's boundary in these phantoms (within a few mm)
        assert prior["surface_mean"] is not None and abs(prior["surface_mean"]) < 6.0, (name, prior)
        assert prior["surface_sd"] is not None and 0 < prior["surface_sd"] < 6.0, (name, prior)
    # the LV's volume range over the training references (tiny phantoms: tens of ml)
    assert list(entry["structure_volumes_ml"]) == ["1"]
    smallest, largest = entry["structure_volumes_ml"]["1"]
    assert 10 < smallest <= largest < 400, (smallest, largest)
    # after the final validation the prior holds the heatmap extremum's and the prior alone's RMS errors on the fold's
    # validation cases, and the largest distance the heatmap claimed there
    summary = json.loads((landmark_model["folder"] / "fold_0" / "validation" / "landmark_summary.json").read_text())
    table = read_landmark_table(landmark_model["folder"] / "fold_0" / "validation" / "landmarks.csv")
    # (the smoke model learns nothing: where its segmentation gives the prior no frame, a row has no prior estimate,
    # and a landmark with none on any validation case records no prior error; test_learning checks a learned one)
    for name in LANDMARKS:
        rows = [r for r in table if r["name"] == name]
        for key, column, counted in (("per_landmark_heatmap_extremum", "heatmap_error_mm", len(splits[0]["val"])),
                                     ("per_landmark_prior_alone", "prior_error_mm",
                                      sum(1 for r in rows if r["prior_x"]))):
            raw = summary[key][name]
            assert raw["n"] == counted, key
            if counted == 0:
                assert recorded[name][column] is None, key
                continue
            rms = np.sqrt(raw["mean"] ** 2 + raw["sd"] ** 2 * (raw["n"] - 1) / raw["n"])
            np.testing.assert_allclose(recorded[name][column], rms, rtol=1e-9, err_msg=key)
        assert len(rows) == len(splits[0]["val"]) >= 2
        claims = [float(r["heatmap_claim_mm"]) for r in rows]
        assert recorded[name]["heatmap_claim_mm"] == pytest.approx(max(claims), abs=1e-4)
    assert any(r["prior_x"] for r in table)  # the prior's branch ran (it did for the mitral valve, measured)
    # a copy of the model without priors, as an older version trained it
    env = {**landmark_model["env"], "nnUNet_results": str(tmp_path / "results")}
    copy = tmp_path / "results" / DATASET / landmark_model["folder"].name
    shutil.copytree(landmark_model["folder"], copy)
    del plans["nnunet_landmark"]["position_priors"]
    (copy / "plans.json").write_text(json.dumps(plans))
    result = run_cli(["nnUNetv2_landmark_fit_prior", "-d", str(DATASET_ID), "-tr", LANDMARK_TRAINER, "-p", PLANS,
                      "-c", CONFIG, "-f", "0"], env)
    assert "fold_0: apex (structure" in result.stdout
    refitted = json.loads((copy / "plans.json").read_text())["nnunet_landmark"]["position_priors"]
    assert list(refitted) == ["fold_0"]
    assert list(refitted["fold_0"]["structure_volumes_ml"]) == list(entry["structure_volumes_ml"])
    for structure, volumes in entry["structure_volumes_ml"].items():
        np.testing.assert_allclose(refitted["fold_0"]["structure_volumes_ml"][structure], volumes, rtol=1e-9)
    for name in LANDMARKS:
        again = refitted["fold_0"]["landmarks"][name]
        assert set(again) == set(recorded[name])
        for key, value in recorded[name].items():
            if value is None:  # not measured (see above): the refit measures nothing either
                assert again[key] is None, key
                continue
            np.testing.assert_allclose(again[key], value, rtol=1e-9, atol=1e-4 if key == "heatmap_claim_mm" else 1e-12,
                                       err_msg=key)
