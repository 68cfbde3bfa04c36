"""Evaluation package on fake nnU-Net folders built from phantoms with known perturbations.

Layout built once per module: a raw dataset (8 tiny phantoms, 4 folds of 2 held-out cases), a landmark
model's results (LV eroded by one voxel on even cases, identical on odd ones; apex shifted by exactly
``n + 1`` mm, mitral valve by exactly 2 mm) and a plain model's results (LV dilated by one voxel into
the myocardium, no landmarks).
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage, stats

from nnunet_landmark.evaluation.baselines import apex_from_segmentation
from nnunet_landmark.evaluation.cli import compare_entry_point, crossval_entry_point, evaluate_entry_point
from nnunet_landmark.evaluation.folder import EvaluationError, evaluate_folder
from nnunet_landmark.metrics import dice, dice_per_label, paired_wilcoxon, score_case, summarize
from nnunet_landmark.evaluation.plots import qc_figure
from nnunet_landmark.evaluation.study.compare import compare_to_plain
from nnunet_landmark.evaluation.study.crossval import crossval_summary
from nnunet_landmark.evaluation.study.report import write_report
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.landmark_files import format_landmark_rows, write_landmark_csv, write_markups
from nnunet_landmark.phantoms import generate_phantom

DATASET = "Dataset987_FakeLV"
LABELS = {"background": 0, "LV_blood_cavity": 1, "LV_myocardium": 2}
LANDMARKS = ["apex", "mitral_valve"]
CASES = [f"lv_{n:03d}" for n in range(8)]
SPLITS = [{"train": [c for c in CASES if c not in CASES[2 * f:2 * f + 2]], "val": CASES[2 * f:2 * f + 2]}
          for f in range(4)]
APEX_DIRECTION = np.array([0.6, 0.0, 0.8])  # unit vector: case n's apex is off by exactly n + 1 mm
MITRAL_SHIFT = np.array([0.0, 2.0, 0.0])
LANDMARK_TRAINER = "nnUNetTrainerLandmark__nnUNetPlans__3d_fullres"
PLAIN_TRAINER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def write_labels(path: Path, array: np.ndarray, reference: sitk.Image) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path), useCompression=True)


def fake_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, np.random.default_rng(0).random((20, 30, 3)))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    raw = root / "nnUNet_raw" / DATASET
    landmark_results = root / "nnUNet_results" / DATASET / LANDMARK_TRAINER
    plain_results = root / "nnUNet_results" / DATASET / PLAIN_TRAINER
    for sub in ("imagesTr", "labelsTr", "landmarksTr"):
        (raw / sub).mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(CASES), "file_ending": ".nii.gz",
        "landmarks": LANDMARKS}))
    (raw / "splits_final.json").write_text(json.dumps(SPLITS))
    truth = {}
    for n, case in enumerate(CASES):
        fold = n // 2
        phantom = generate_phantom(100 + n, "tiny")
        mmwhs = sitk.GetArrayFromImage(phantom.label)
        reference = np.where(mmwhs == 500, 1, np.where(mmwhs == 205, 2, 0)).astype(np.uint8)
        sitk.WriteImage(phantom.image, str(raw / "imagesTr" / f"{case}_0000.nii.gz"), useCompression=True)
        write_labels(raw / "labelsTr" / f"{case}.nii.gz", reference, phantom.label)
        points = {name: phantom.landmarks[name] for name in LANDMARKS}
        write_markups(raw / "landmarksTr" / f"{case}.mrk.json", points)

        lv = reference == 1
        landmark_lv = ndimage.binary_erosion(lv) if n % 2 == 0 else lv
        landmark_seg = np.where(landmark_lv, 1, np.where(reference == 2, 2, 0))
        plain_lv = ndimage.binary_dilation(lv) & ((reference == 1) | (reference == 2))
        plain_seg = np.where(plain_lv, 1, np.where(reference == 2, 2, 0))
        predicted = {"apex": points["apex"] + (n + 1) * APEX_DIRECTION, "mitral_valve": points["mitral_valve"] + MITRAL_SHIFT}
        validation = landmark_results / f"fold_{fold}" / "validation"
        validation.mkdir(parents=True, exist_ok=True)
        write_labels(validation / f"{case}.nii.gz", landmark_seg, phantom.label)
        write_markups(validation / f"{case}.mrk.json", predicted, {k: "confidence=0.9" for k in predicted})
        plain_validation = plain_results / f"fold_{fold}" / "validation"
        plain_validation.mkdir(parents=True, exist_ok=True)
        write_labels(plain_validation / f"{case}.nii.gz", plain_seg, phantom.label)
        truth[case] = dict(fold=fold, reference=reference, landmark_seg=landmark_seg, plain_seg=plain_seg,
                           points=points, predicted=predicted,
                           # the header as stored (NIfTI keeps float32): what every reader of the files sees
                           geometry=ImageGeometry.from_file(raw / "labelsTr" / f"{case}.nii.gz"))
    for fold in range(4):
        rows = [{"case": c, "name": name, **{axis: repr(float(v)) for axis, v in zip("xyz", p)},
                 "confidence": 0.5 + 0.1 * i}
                for c in SPLITS[fold]["val"] for i, (name, p) in enumerate(truth[c]["predicted"].items())]
        validation = landmark_results / f"fold_{fold}" / "validation"
        (validation / "landmarks.csv").write_text(format_landmark_rows(rows, ["confidence"]))
        (validation / "summary.json").write_text("{}")
        fake_png(landmark_results / f"fold_{fold}" / "progress.png")
    return dict(root=root, raw=raw, landmark_results=landmark_results, plain_results=plain_results, truth=truth)


def independent_dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = set(map(tuple, np.argwhere(a))), set(map(tuple, np.argwhere(b)))
    return 2 * len(a & b) / (len(a) + len(b))


# ---------------------------------------------------------------------------------------------- metrics
def test_dice_and_summary_conventions():
    empty, full = np.zeros((3, 3), bool), np.ones((3, 3), bool)
    assert np.isnan(dice(empty, empty))
    assert dice(empty, full) == 0.0 and dice(full, empty) == 0.0
    assert dice(full, full) == 1.0
    s = summarize([1.0, 2.0, float("nan"), None, 6.0])
    assert s["n"] == 3 and s["n_nan"] == 2
    assert s["mean"] == pytest.approx(3.0) and s["median"] == 2.0 and s["max"] == 6.0 and s["min"] == 1.0
    assert s["sd"] == pytest.approx(np.std([1, 2, 6], ddof=1))
    assert np.isnan(summarize([4.0])["sd"]) and summarize([])["n"] == 0


def synthetic_label_maps() -> tuple[np.ndarray, np.ndarray]:
    """(reference, prediction) 4 x 4 x 4 (z, y, x) with two labels, counts chosen by hand:
    label 1: reference 4 voxels, prediction 3 (2 shared) -> Dice 2*2 / (4 + 3) = 4/7;
    label 2: reference 16 voxels, prediction 8 (all shared) -> Dice 2*8 / (16 + 8) = 2/3;
    region (1, 2): reference 20, prediction 11, 10 shared -> Dice 20/31."""
    reference, prediction = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)
    reference[0, 0, :] = 1
    prediction[0, 0, :2] = 1
    prediction[0, 1, 0] = 1
    reference[1] = 2
    prediction[1, :2] = 2
    return reference, prediction


THREE_REFERENCE = {"apex": [0.0, 0.0, 0.0], "mitral_valve": [10.0, 0.0, 0.0], "aortic_valve": [0.0, -5.0, 1.0]}
THREE_PREDICTED = {"apex": [3.0, 4.0, 0.0], "mitral_valve": [11.0, 2.0, 2.0], "aortic_valve": [6.0, -5.0, 9.0]}
THREE_ERRORS = {"apex": 5.0, "mitral_valve": 3.0, "aortic_valve": 10.0}


def test_score_case_two_labels_three_landmarks_exact():
    reference, prediction = synthetic_label_maps()
    scores = score_case(reference, prediction, {"A": 1, "B": 2, "A+B": (1, 2)}, THREE_PREDICTED, THREE_REFERENCE)
    assert scores["dice"] == {"A": pytest.approx(4 / 7, abs=1e-15), "B": pytest.approx(2 / 3, abs=1e-15),
                              "A+B": pytest.approx(20 / 31, abs=1e-15)}
    assert scores["landmark_error_mm"] == {k: pytest.approx(v, abs=1e-12) for k, v in THREE_ERRORS.items()}
    assert list(score_case(reference, prediction, {"B": 2}, THREE_PREDICTED, THREE_REFERENCE,
                           ["aortic_valve"])["landmark_error_mm"]) == ["aortic_valve"]
    assert "landmark_error_mm" not in score_case(reference, prediction, {"A": 1})
    with pytest.raises(ValueError, match=r"no predicted landmark\(s\) \['apex'\]"):
        score_case(reference, prediction, {"A": 1}, {"mitral_valve": [0, 0, 0]}, THREE_REFERENCE, ["apex"])
    # an ignore label, as nnU-Net's: a predicted label-1 voxel where the reference says "ignore" is no FP
    reference[3, 0, 0] = 3
    prediction[3, 0, 0] = 1
    assert dice_per_label(reference, prediction, {"A": 1})["A"] == pytest.approx(2 * 2 / (4 + 4))
    assert dice_per_label(reference, prediction, {"A": 1}, ignore_label=3)["A"] == pytest.approx(4 / 7)


def test_dice_per_label_matches_nnunet_compute_metrics(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    reference, prediction = synthetic_label_maps()
    reference[3, 2:, 2:] = 3  # ignore label
    prediction[3, 3, :] = 1
    for name, array in (("reference", reference), ("prediction", prediction)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"{name}.nii.gz"))
    nnunet = compute_metrics(str(tmp_path / "reference.nii.gz"), str(tmp_path / "prediction.nii.gz"), SimpleITKIO(),
                             [1, 2, (1, 2)], ignore_label=3)["metrics"]
    ours = dice_per_label(reference, prediction, {"A": 1, "B": 2, "A+B": (1, 2)}, ignore_label=3)
    assert ours == {"A": nnunet[1]["Dice"], "B": nnunet[2]["Dice"], "A+B": nnunet[(1, 2)]["Dice"]}


def write_synthetic_case(folder: Path, case: str, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 1.0, 1.5))
    image.SetOrigin((-10.0, 4.0, 30.0))
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{case}.nii.gz"))


def test_evaluate_folder_two_labels_three_landmarks(tmp_path):
    """The general evaluation knows nothing of the LV or the apex: two labels, three landmarks, exact numbers.
    Case b is case a with every point moved by the same vector (errors unchanged) and label 2 predicted
    perfectly."""
    reference, prediction = synthetic_label_maps()
    perfect_b = np.where(reference == 2, 2, prediction)
    shift = np.array([100.0, -20.0, 7.0])
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "first": 1, "second": 2}, "file_ending": ".nii.gz",
        "landmarks": ["mitral_valve", "apex", "aortic_valve"]}))
    (tmp_path / "landmarksTr").mkdir()
    for case, predicted, move in (("a", prediction, 0.0), ("b", perfect_b, shift)):
        write_synthetic_case(tmp_path / "labelsTr", case, reference)
        write_synthetic_case(tmp_path / "predicted", case, predicted)
        write_markups(tmp_path / "landmarksTr" / f"{case}.mrk.json",
                      {k: np.add(v, move) for k, v in THREE_REFERENCE.items()})
        write_markups(tmp_path / "predicted" / f"{case}.mrk.json",
                      {k: np.add(v, move) for k, v in THREE_PREDICTED.items()})
    results = evaluate_folder(tmp_path / "predicted", tmp_path / "labelsTr", tmp_path / "landmarksTr",
                              output_prefix=tmp_path / "out", progress=False)
    assert results["labels"] == {"first": 1, "second": 2}
    assert results["landmarks"] == ["mitral_valve", "apex", "aortic_valve"]  # dataset.json's order
    a, b = results["per_case"]
    assert a["dice"] == {"first": pytest.approx(4 / 7), "second": pytest.approx(2 / 3)}
    assert b["dice"] == {"first": pytest.approx(4 / 7), "second": 1.0}
    for record in (a, b):
        assert record["landmark_error_mm"] == {k: pytest.approx(v, abs=1e-9) for k, v in THREE_ERRORS.items()}
    summary = results["summary"]
    assert summary["dice"]["second"]["mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert summary["dice"]["second"]["sd"] == pytest.approx(np.std([2 / 3, 1], ddof=1))
    for name, error in THREE_ERRORS.items():
        assert summary["landmark_error_mm"][name]["mean"] == pytest.approx(error, abs=1e-9)
        assert summary["landmark_error_mm"][name]["sd"] == pytest.approx(0, abs=1e-9)
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "dice_first", "dice_second", "error_mm_mitral_valve", "error_mm_apex",
                             "error_mm_aortic_valve", "confidence_mitral_valve", "confidence_apex",
                             "confidence_aortic_valve"]
    assert float(rows[1]["dice_second"]) == 1.0 and float(rows[0]["error_mm_aortic_valve"]) == pytest.approx(10.0)
    # a region-based dataset.json is evaluated with nnU-Net's regions; the ignore label is no label
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "first": 1, "both": [1, 2], "ignore": 3}, "regions_class_order": [1, 2],
        "file_ending": ".nii.gz"}))
    regions = evaluate_folder(tmp_path / "predicted", tmp_path / "labelsTr", None, progress=False)
    assert regions["labels"] == {"first": 1, "both": (1, 2)}
    assert regions["per_case"][0]["dice"]["both"] == pytest.approx(20 / 31)
    assert regions["per_case"][1]["dice"]["both"] == pytest.approx(2 * 18 / (20 + 19))


# ---------------------------------------------------------------------------------------------- evaluate_folder
def test_evaluate_folder_exact_errors_dice_and_files(study, tmp_path):
    validation = study["landmark_results"] / "fold_1" / "validation"
    raw = study["raw"]
    results = evaluate_folder(validation, raw / "labelsTr", raw / "landmarksTr", output_prefix=tmp_path / "ev",
                              dataset_json=raw / "dataset.json", progress=False)
    assert [r["case"] for r in results["per_case"]] == ["lv_002", "lv_003"]
    assert results["labels"] == {"LV_blood_cavity": 1, "LV_myocardium": 2}
    assert results["landmarks"] == LANDMARKS
    for record in results["per_case"]:
        t = study["truth"][record["case"]]
        n = CASES.index(record["case"])
        assert record["landmark_error_mm"]["apex"] == pytest.approx(n + 1, abs=1e-9)
        assert record["landmark_error_mm"]["mitral_valve"] == pytest.approx(2.0, abs=1e-9)
        for name, value in (("LV_blood_cavity", 1), ("LV_myocardium", 2)):
            assert record["dice"][name] == pytest.approx(
                independent_dice(t["reference"] == value, t["landmark_seg"] == value), abs=1e-12)
        assert record["confidence"] == {"apex": pytest.approx(0.5), "mitral_valve": pytest.approx(0.6)}
    assert results["per_case"][1]["dice"]["LV_blood_cavity"] == 1.0  # odd case: unchanged LV
    assert results["per_case"][0]["dice"]["LV_blood_cavity"] < 0.9  # even case: eroded LV
    apex = results["summary"]["landmark_error_mm"]["apex"]
    assert apex["mean"] == pytest.approx(3.5) and apex["max"] == pytest.approx(4.0)
    assert apex["sd"] == pytest.approx(np.std([3, 4], ddof=1)) and apex["n"] == 2

    on_disk = json.loads((tmp_path / "ev.json").read_text())
    assert on_disk["summary"]["landmark_error_mm"]["apex"]["median"] == pytest.approx(3.5)
    assert len(on_disk["per_case"]) == 2
    with open(tmp_path / "ev.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "dice_LV_blood_cavity", "dice_LV_myocardium", "error_mm_apex",
                             "error_mm_mitral_valve", "confidence_apex", "confidence_mitral_valve"]
    assert float(rows[1]["error_mm_apex"]) == pytest.approx(4.0, abs=1e-9)


def test_evaluate_folder_reference_csv_labels_and_fallbacks(study, tmp_path):
    raw = study["raw"]
    write_landmark_csv(tmp_path / "reference.csv", {c: study["truth"][c]["points"] for c in CASES})
    validation = tmp_path / "validation"
    shutil.copytree(study["landmark_results"] / "fold_0" / "validation", validation)
    (validation / "lv_000.mrk.json").unlink()  # landmarks.csv of the folder still holds this case
    results = evaluate_folder(validation, raw / "labelsTr", tmp_path / "reference.csv", labels={"LV": 1},
                              landmark_names=["apex"], progress=False)
    assert [r["landmark_error_mm"]["apex"] for r in results["per_case"]] == [pytest.approx(1.0), pytest.approx(2.0)]
    assert list(results["per_case"][0]["dice"]) == ["LV"]
    # the dataset.json beside labelsTr is found by itself
    assert evaluate_folder(validation, raw / "labelsTr", None, progress=False)["labels"] == {
        "LV_blood_cavity": 1, "LV_myocardium": 2}

    (validation / "landmarks.csv").unlink()
    with pytest.raises(EvaluationError, match=r"lv_000\.mrk\.json: missing"):
        evaluate_folder(validation, raw / "labelsTr", raw / "landmarksTr", labels={"LV": 1}, progress=False)
    # landmarks not requested: the segmentation alone is fine
    assert "landmark_error_mm" not in evaluate_folder(validation, raw / "labelsTr", None, labels={"LV": 1},
                                                      progress=False)["per_case"][0]


def test_evaluate_folder_grid_mismatch_and_unknown_cases(study, tmp_path):
    raw = study["raw"]
    validation = tmp_path / "validation"
    shutil.copytree(study["landmark_results"] / "fold_0" / "validation", validation)
    image = sitk.ReadImage(str(validation / "lv_001.nii.gz"))
    image.SetOrigin(tuple(np.asarray(image.GetOrigin()) + 5.0))
    sitk.WriteImage(image, str(validation / "lv_001.nii.gz"))
    with pytest.raises(EvaluationError, match=r"lv_001\.nii\.gz: its grid differs from the reference"):
        evaluate_folder(validation, raw / "labelsTr", None, labels={"LV": 1}, progress=False)
    shutil.copy(validation / "lv_000.nii.gz", validation / "stranger.nii.gz")
    with pytest.raises(EvaluationError, match="stranger.nii.gz"):
        evaluate_folder(validation, raw / "labelsTr", None, labels={"LV": 1}, progress=False)


# ---------------------------------------------------------------------------------------------- crossval
def expected_mean_position(study, fold: int, case: str, landmark: str = "apex") -> np.ndarray:
    """Independent of the baseline class: mean world offset from the image centre over training cases."""
    def centre(g):
        return np.asarray(g.origin) + g.direction_matrix @ (np.asarray(g.spacing) * (np.asarray(g.size) - 1) / 2)
    truth = study["truth"]
    offsets = [truth[c]["points"][landmark] - centre(truth[c]["geometry"]) for c in SPLITS[fold]["train"]]
    return centre(truth[case]["geometry"]) + np.mean(offsets, axis=0)


def test_crossval_summary_table2(study, tmp_path):
    summary = crossval_summary(study["landmark_results"], study["raw"], output_folder=tmp_path, qc=True,
                               progress=False)
    assert summary["folds"] == [0, 1, 2, 3]
    assert [r["case"] for r in summary["per_case"]] == CASES
    truth = study["truth"]
    for n, row in enumerate(summary["per_case"]):
        t = truth[row["case"]]
        assert row["fold"] == n // 2
        assert row["error_mm"] == pytest.approx(n + 1, abs=1e-9)
        assert row["dice"] == pytest.approx(independent_dice(t["reference"] == 1, t["landmark_seg"] == 1), abs=1e-12)
        expected = expected_mean_position(study, row["fold"], row["case"])
        assert row["mean_position_error_mm"] == pytest.approx(np.linalg.norm(expected - t["points"]["apex"]), abs=1e-6)
        tip = apex_from_segmentation(t["landmark_seg"], t["geometry"], 1)
        assert row["geometric_tip_error_mm"] == pytest.approx(np.linalg.norm(tip - t["points"]["apex"]), abs=1e-9)
    errors = np.arange(1, 9, dtype=float)
    overall = summary["overall"]["error_mm"]
    assert overall["mean"] == pytest.approx(4.5) and overall["median"] == pytest.approx(4.5)
    assert overall["max"] == pytest.approx(8.0) and overall["sd"] == pytest.approx(np.std(errors, ddof=1))
    assert summary["per_fold"]["3"]["error_mm"]["mean"] == pytest.approx(7.5)

    with open(tmp_path / "crossval_summary.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["fold", "case", "dice", "error_mm", "confidence", "geometric_tip_error_mm",
                       "mean_position_error_mm"]
    assert [r[0] for r in rows[9:]] == ["mean", "sd", "median", "min", "max"]
    assert float(rows[8][3]) == pytest.approx(8.0) and rows[8][:2] == ["3", "lv_007"]
    assert float(rows[9][3]) == pytest.approx(4.5)
    markdown = (tmp_path / "crossval_summary.md").read_text()
    assert "| Fold | Image | Dice | L2 apex (mm) | Geometric tip (mm) | Mean position (mm) |" in markdown
    assert "| 3 | lv_007 | 1.000 | 8.00 |" in markdown
    assert "| **Mean** |  | " in markdown and "| **Max** |" in markdown
    on_disk = json.loads((tmp_path / "crossval_summary.json").read_text())
    assert on_disk["overall"]["error_mm"]["mean"] == pytest.approx(4.5)
    assert (tmp_path / "folds" / "fold_2.json").is_file()
    assert len(summary["qc_pngs"]) == 8  # what they show is test_qc_figure's
    assert all(Path(png).is_file() for png in summary["qc_pngs"])


def test_crossval_rejects_splits_that_do_not_match(study, tmp_path):
    wrong = [{"train": s["train"], "val": list(reversed(SPLITS))[i]["val"]} for i, s in enumerate(SPLITS)]
    (tmp_path / "splits.json").write_text(json.dumps(wrong))
    with pytest.raises(EvaluationError, match="the splits say fold 0 holds out"):
        crossval_summary(study["landmark_results"], study["raw"], folds=[0], output_folder=tmp_path,
                         splits_file=tmp_path / "splits.json", progress=False)


def test_crossval_and_compare_report_further_labels_and_landmarks(study, tmp_path, monkeypatch):
    """--labels 2 --landmarks mitral_valve: the paper's columns stay as they are, each label and landmark
    gains its own (Dice of the untouched myocardium is 1, the mitral valve is off by exactly 2 mm)."""
    monkeypatch.setenv("nnUNet_raw", str(study["root"] / "nnUNet_raw"))
    monkeypatch.setenv("nnUNet_results", str(study["root"] / "nnUNet_results"))
    crossval_entry_point(["-d", "987", "-f", "0", "1", "-o", str(tmp_path / "cv"), "--no_progress",
                          "--labels", "2", "--landmarks", "mitral_valve"])
    summary = json.loads((tmp_path / "cv" / "crossval_summary.json").read_text())
    assert summary["labels"] == {"LV_blood_cavity": 1, "LV_myocardium": 2}
    assert summary["landmarks"] == ["apex", "mitral_valve"]
    truth = study["truth"]
    for n, row in enumerate(summary["per_case"]):
        t = truth[row["case"]]
        assert row["error_mm"] == row["error_mm_apex"] == pytest.approx(n + 1, abs=1e-9)
        assert row["error_mm_mitral_valve"] == pytest.approx(2.0, abs=1e-9)
        assert row["dice"] == row["dice_LV_blood_cavity"]
        assert row["dice_LV_myocardium"] == 1.0
        expected = expected_mean_position(study, row["fold"], row["case"], "mitral_valve")
        assert row["mean_position_error_mm_mitral_valve"] == pytest.approx(
            np.linalg.norm(expected - t["points"]["mitral_valve"]), abs=1e-6)
        assert row["mean_position_error_mm_apex"] == row["mean_position_error_mm"]
    assert summary["overall"]["error_mm_mitral_valve"]["mean"] == pytest.approx(2.0)
    assert summary["overall"]["error_mm"]["mean"] == pytest.approx(2.5)
    with open(tmp_path / "cv" / "crossval_summary.csv") as f:
        header = next(csv.reader(f))
    assert header[:7] == ["fold", "case", "dice", "error_mm", "confidence", "geometric_tip_error_mm",
                          "mean_position_error_mm"]
    assert {"dice_LV_myocardium", "error_mm_mitral_valve", "mean_position_error_mm_mitral_valve",
            "confidence_mitral_valve"} <= set(header)
    markdown = (tmp_path / "cv" / "crossval_summary.md").read_text()
    assert "| Dice LV_myocardium | L2 mitral_valve (mm) | Mean position mitral_valve (mm) |" in markdown
    assert "| mitral_valve error (mm) | 2.00 ± 0.00 | 2.00 | |" in (tmp_path / "cv" / "report.md").read_text()

    comparison = compare_to_plain(study["landmark_results"], study["plain_results"], study["raw"], tmp_path / "cmp",
                                  folds=[0, 1], labels=[2], landmarks=["mitral_valve"], progress=False)
    myocardium = comparison["dice_per_label"]["LV_myocardium"]
    plain_myocardium = [independent_dice(truth[c]["reference"] == 2, truth[c]["plain_seg"] == 2) for c in CASES[:4]]
    assert myocardium["landmark"]["mean"] == 1.0
    assert myocardium["plain"]["mean"] == pytest.approx(np.mean(plain_myocardium), abs=1e-12)
    assert comparison["dice_per_label"]["LV_blood_cavity"]["difference"] == comparison["dice"]["difference"]
    mitral = comparison["landmark_error_mm_per_landmark"]["mitral_valve"]
    assert mitral["errors"]["error_landmark_model"]["mean"] == pytest.approx(2.0)
    assert [r["error_landmark_model_apex"] for r in comparison["per_case"]] == [
        r["error_landmark_model"] for r in comparison["per_case"]]
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "### Dice LV_myocardium: landmark model vs plain nnU-Net" in text
    assert "### mitral_valve error (mm): landmark model vs mean position" in text


# ---------------------------------------------------------------------------------------------- compare
def test_paired_wilcoxon_edge_cases():
    same = paired_wilcoxon([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert same["p_value"] == 1.0 and same["n_nonzero"] == 0 and "all paired differences are zero" in same["note"]
    few = paired_wilcoxon([1.0, 2.0, 3.0, 4.5], [0.5, 2.5, 1.0, 1.0])
    assert few["underpowered"] and few["p_value"] == pytest.approx(stats.wilcoxon([0.5, -0.5, 2.0, 3.5]).pvalue)
    assert "cannot show a difference" in few["note"]
    with_nan = paired_wilcoxon([1.0, float("nan"), 3.0], [0.0, 1.0, None])
    assert with_nan["n"] == 1 and with_nan["n_dropped_nan"] == 2
    assert paired_wilcoxon([], [])["p_value"] is None
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=12), rng.normal(size=12)
    full = paired_wilcoxon(a, b)
    assert not full["underpowered"] and full["p_value"] == pytest.approx(stats.wilcoxon(a - b).pvalue)


def plotted_data(monkeypatch) -> dict:
    """What each figure saved from now on shows, read from its artists just before saving: per axes the
    y values of the scatter points, the bar heights, and the medians of the box plots."""
    from matplotlib.collections import PathCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    shown, save = {}, Figure.savefig

    def recording_savefig(figure, path, *args, **kwargs):
        shown[Path(path).stem] = [
            {"points": [np.asarray(c.get_offsets(), dtype=float)[:, 1] for c in ax.collections
                        if isinstance(c, PathCollection)],
             "bars": [float(p.get_height()) for p in ax.patches if type(p) is Rectangle],
             "medians": [float(np.mean(line.get_ydata())) for line in ax.lines
                         if line.get_color() == "black" and len(line.get_xdata()) == 2 and
                         line.get_linewidth() == 1.5]}
            for ax in figure.axes]
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    return shown


def test_compare_to_plain(study, tmp_path, monkeypatch):
    shown = plotted_data(monkeypatch)
    comparison = compare_to_plain(study["landmark_results"], study["plain_results"], study["raw"], tmp_path,
                                  progress=False)
    truth = study["truth"]
    landmark_dice = [independent_dice(truth[c]["reference"] == 1, truth[c]["landmark_seg"] == 1) for c in CASES]
    plain_dice = [independent_dice(truth[c]["reference"] == 1, truth[c]["plain_seg"] == 1) for c in CASES]
    differences = np.asarray(landmark_dice) - np.asarray(plain_dice)
    np.testing.assert_allclose([r["dice_difference"] for r in comparison["per_case"]], differences, atol=1e-12)
    assert comparison["dice"]["wilcoxon"]["p_value"] == pytest.approx(stats.wilcoxon(differences).pvalue)
    assert comparison["dice"]["wilcoxon"]["n"] == 8
    np.testing.assert_allclose([r["error_landmark_model"] for r in comparison["per_case"]], np.arange(1, 9), atol=1e-9)
    for row in comparison["per_case"]:
        t = truth[row["case"]]
        tip = apex_from_segmentation(t["plain_seg"], t["geometry"], 1)
        assert row["error_tip_plain"] == pytest.approx(np.linalg.norm(tip - t["points"]["apex"]), abs=1e-9)
        expected = expected_mean_position(study, row["fold"], row["case"])
        assert row["error_mean_position"] == pytest.approx(np.linalg.norm(expected - t["points"]["apex"]), abs=1e-6)
    test = comparison["landmark_error_wilcoxon_vs_model"]["error_mean_position"]
    model = np.arange(1, 9, dtype=float)
    assert test["p_value"] == pytest.approx(
        stats.wilcoxon(model - np.asarray([r["error_mean_position"] for r in comparison["per_case"]])).pvalue)

    on_disk = json.loads((tmp_path / "comparison.json").read_text())
    assert on_disk["dice"]["wilcoxon"]["p_value"] == pytest.approx(stats.wilcoxon(differences).pvalue)
    assert "Wilcoxon" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "landmark" / "crossval_summary.md").is_file()
    for name, (min_height, min_width) in {"dice_boxplot": (400, 450), "landmark_error_boxplot": (400, 700),
                                          "per_fold": (400, 900)}.items():
        image = matplotlib.image.imread(tmp_path / f"{name}.png")
        assert image.shape[0] >= min_height and image.shape[1] >= min_width
    # the figures show these numbers: every image's Dice (both models), every method's error per image with its
    # median as the box, and the per-fold means as bars
    (dice_axes,) = shown["dice_boxplot"]
    np.testing.assert_allclose(dice_axes["points"][0], landmark_dice, atol=1e-12)
    np.testing.assert_allclose(dice_axes["points"][1], plain_dice, atol=1e-12)
    np.testing.assert_allclose(dice_axes["medians"], [np.median(landmark_dice), np.median(plain_dice)], atol=1e-12)
    (error_axes,) = shown["landmark_error_boxplot"]
    methods = list(comparison["methods"])
    assert methods[0] == "error_landmark_model"
    assert len(error_axes["points"]) == len(error_axes["medians"]) == len(methods)
    for key, points, median in zip(methods, error_axes["points"], error_axes["medians"]):
        errors = [r[key] for r in comparison["per_case"]]
        np.testing.assert_allclose(points, errors, atol=1e-9, err_msg=key)
        assert median == pytest.approx(np.median(errors)), key
    np.testing.assert_allclose(error_axes["points"][0], np.arange(1, 9), atol=1e-9)
    dice_bars, error_bars = (axes["bars"] for axes in shown["per_fold"])
    per_fold_dice = [np.mean(d[2 * f:2 * f + 2]) for d in (landmark_dice, plain_dice) for f in range(4)]
    np.testing.assert_allclose(dice_bars, per_fold_dice, atol=1e-12)
    np.testing.assert_allclose(error_bars[:4], [1.5, 3.5, 5.5, 7.5], atol=1e-9)  # the model's errors n + 1 per fold

    report = write_report(tmp_path / "report", comparison["landmark_crossval"], comparison,
                          learning_curve_pngs=[study["landmark_results"] / "fold_0" / "progress.png"],
                          qc_pngs=[])
    text = report.read_text()
    assert "| Fold | Image | Dice | L2 apex (mm)" in text and "Comparison with plain nnU-Net" in text
    for link in [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]:
        assert (report.parent / link).is_file(), link


def test_compare_rejects_different_case_sets(study, tmp_path):
    plain = tmp_path / PLAIN_TRAINER
    shutil.copytree(study["plain_results"], plain)
    shutil.rmtree(plain / "fold_3")
    with pytest.raises(EvaluationError, match="different folds"):
        compare_to_plain(study["landmark_results"], plain, study["raw"], tmp_path / "out", progress=False)
    shutil.copytree(study["plain_results"] / "fold_3", plain / "fold_3")
    (plain / "fold_3" / "validation" / "lv_007.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="lv_007"):
        compare_to_plain(study["landmark_results"], plain, study["raw"], tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------------- qc + cli
def test_qc_figure(study, tmp_path, monkeypatch):
    """The figure shows what it says: both outlines in every panel, each point where its voxel index puts it, the
    Dice and error in the title."""
    import matplotlib.figure
    from matplotlib.colors import to_rgba

    from nnunet_landmark.evaluation import plots

    drawn = {}
    save = matplotlib.figure.Figure.savefig

    def keep(figure, *args, **kwargs):
        drawn["figure"] = figure
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    raw, t = study["raw"], study["truth"]["lv_000"]
    png = tmp_path / "qc.png"
    image_file = raw / "imagesTr" / "lv_000_0000.nii.gz"
    mean_position = t["points"]["apex"] + 10
    out = qc_figure(image_file, raw / "labelsTr" / "lv_000.nii.gz",
                    study["landmark_results"] / "fold_0" / "validation" / "lv_000.nii.gz", t["points"]["apex"],
                    t["predicted"]["apex"], png, extra_points={"mean position": mean_position})
    assert out["error_mm"] == pytest.approx(1.0)
    assert out["dice"] == pytest.approx(independent_dice(t["reference"] == 1, t["landmark_seg"] == 1))
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 400 and image.shape[1] > 1000
    figure = drawn["figure"]
    assert f"Dice {out['dice']:.3f}" in figure._suptitle.get_text() and "apex error 1.0 mm" in figure._suptitle.get_text()
    geometry = ImageGeometry.from_image(sitk.DICOMOrient(sitk.ReadImage(str(image_file)), "LPS"))
    expected = {marker: geometry.world_to_index(np.asarray(p, dtype=float)) for marker, p in
                (("P", t["points"]["apex"]), ("X", t["predicted"]["apex"]), ("^", mean_position))}
    centre = np.round(expected["P"]).astype(int)  # the slices go through the reference point
    masks = {plots.REFERENCE_COLOUR: sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(
                 str(raw / "labelsTr" / "lv_000.nii.gz")), "LPS")) == 1,
             plots.PREDICTION_COLOUR: sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(
                 str(study["landmark_results"] / "fold_0" / "validation" / "lv_000.nii.gz")), "LPS")) == 1}
    panels = figure.axes[:3]
    assert [ax.get_title() for ax in panels] == [f"axial (slice {centre[2]})", f"coronal (slice {centre[1]})",
                                                 f"sagittal (slice {centre[0]})"]
    outlined_somewhere = set()
    # image axes (x, y, z) shown across and down each panel, and the slice of the (z, y, x) array it shows
    for ax, (column, row), cut in zip(panels, [(0, 1), (0, 2), (1, 2)],
                                      [np.s_[centre[2]], np.s_[:, centre[1]], np.s_[:, :, centre[0]]]):
        markers = {line.get_marker(): (line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines}
        for marker, index in expected.items():
            assert markers[marker] == pytest.approx((index[column], index[row]), abs=1e-6), (ax.get_title(), marker)
        outline_colours = {tuple(np.round(c.get_edgecolor()[0], 3)) for c in ax.collections
                           if len(c.get_edgecolor())}
        for colour, mask in masks.items():  # an outline exactly where the mask meets the slice
            shown = tuple(np.round(to_rgba(colour), 3)) in outline_colours
            assert shown == bool(mask[cut].any()), (ax.get_title(), colour)
            outlined_somewhere |= {colour} if shown else set()
    assert outlined_somewhere == set(masks)


def test_entry_points_in_process(study, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(study["root"] / "nnUNet_raw"))
    monkeypatch.setenv("nnUNet_results", str(study["root"] / "nnUNet_results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    raw = study["raw"]
    evaluate_entry_point(["-pred", str(study["landmark_results"] / "fold_0" / "validation"), "-ref_labels",
                          str(raw / "labelsTr"), "-ref_landmarks", str(raw / "landmarksTr"), "-landmarks", "apex",
                          "-o", str(tmp_path / "eval"), "--no_progress"])
    assert json.loads((tmp_path / "eval.json").read_text())["landmarks"] == ["apex"]
    crossval_entry_point(["-d", "987", "-f", "0", "1", "-o", str(tmp_path / "cv"), "--no_progress"])
    summary = json.loads((tmp_path / "cv" / "crossval_summary.json").read_text())
    assert summary["folds"] == [0, 1] and summary["overall"]["error_mm"]["mean"] == pytest.approx(2.5)
    assert "fold_0:" in (tmp_path / "cv" / "report.md").read_text()  # the learning curve is linked
    compare_entry_point(["-d", DATASET, "-f", "0", "1", "-o", str(tmp_path / "cmp"), "--no_progress"])
    assert (tmp_path / "cmp" / "report.md").is_file() and (tmp_path / "cmp" / "dice_boxplot.png").is_file()
    assert "Dice landmark" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        crossval_entry_point(["-d", "987", "-tr", "nnUNetTrainerMissing", "--no_progress"])
    assert exit_info.value.code == 1
    assert "nnUNetTrainerMissing__nnUNetPlans__3d_fullres: no trained model" in capsys.readouterr().err
