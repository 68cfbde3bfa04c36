"""nnUNetv2_landmark_demo, the README's first command, end to end on a smoke budget.

Every step is the demo's own (phantoms, nnUNetv2_convert_MMWHS, plan and preprocess, nnUNetv2_train of both
models, nnUNetv2_predict, evaluation, report); ``--budget smoke`` only swaps in the 2 x 5-iteration trainers and
``--cases`` / ``--test_cases`` / ``--folds`` make the data small. The models learn nothing here, so the test checks
that the report's numbers are there, finite, and the ones the prediction files give, not that they are good
(test_learning.py does that).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from nnunet_landmark.demo import DATASET
from nnunet_landmark.evaluation.study.alignment_study import MAX_ROTATION_DEGREES, MAX_TRANSLATION_MM
from nnunet_landmark.mmwhs import LANDMARKS
from nnunet_landmark.evaluation.baselines import BaselineError, apex_from_segmentation, tube_end_from_segmentation
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.label_landmarks import LabelRuleError, interface_centre
from nnunet_landmark.evaluation.plots import FIXED_COLOUR, MOVED_COLOUR
from nnunet_landmark.metrics import dice
from nnunet_landmark.landmark_files import read_landmark_csv, read_landmark_table, read_markups
from nnunet_landmark.phantom_families import read_families
from nnunet_landmark.results_folder import results_folder

pytestmark = pytest.mark.slow


def plt_imread(path: Path) -> np.ndarray:
    """A PNG as a float (H, W, 3 or 4) array in [0, 1]."""
    from matplotlib.image import imread
    return imread(str(path))

NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+|\d+|nan|inf)"
SCIENTIFIC = r"[-+]?(?:(?:\d+\.\d*|\.\d+|\d+)(?:e[-+]?\d+)?|nan|inf)"
LANDMARK_TRAINER, PLAIN_TRAINER = "nnUNetTrainerLandmark_cpu_smoke", "nnUNetTrainer_cpu_smoke"


def test_demo_runs_the_whole_workflow_and_reports_finite_numbers(tmp_path):
    out = tmp_path / "demo_output"
    env = {"nnUNet_n_proc_DA": "2", "nnUNet_def_n_proc": "2", "nnUNet_compile": "0"}
    result = run_cli(["nnUNetv2_landmark_demo", "-o", str(out), "-device", "cpu", "--budget", "smoke",
                      "--cases", "6", "--folds", "3", "--test_cases", "2"], env, timeout=1500)

    # the closing lines: LV Dice of both models, every landmark (written / heatmap alone), on the default family
    done = re.search(rf"Unseen phantoms \(analytic\+real\): LV Dice ({NUMBER}) \(plain nnU-Net ({NUMBER})\)\.\n"
                     rf"Per landmark \(mean mm, what nnUNetv2_predict writes / the heatmap alone\): apex ({NUMBER}) / "
                     rf"({NUMBER}), mitral_valve ({NUMBER}) / ({NUMBER}), aortic_valve ({NUMBER}) / ({NUMBER})\.",
                     result.stdout)
    assert done, result.stdout[-3000:]
    closing = [float(v) for v in done.groups()]
    assert all(math.isfinite(v) for v in closing), done.group(0)

    # the per-case numbers behind it are those of the prediction files against the unseen phantoms' truth
    truth = read_landmark_csv(out / "unseen_phantoms" / "landmarks.csv")
    assert len(truth) == 2
    # the default family alternates the analytic heart and the real MM-WHS hearts, in training and unseen cases
    families = read_families(out / "unseen_phantoms")
    assert list(families.values()) == ["analytic", "ct_train_1002"]
    assert list(read_families(out / "mmwhs_phantoms").values()) == ["analytic", "ct_train_1002", "ct_train_1005"] * 2
    rows = json.loads((out / "report" / "test_set.json").read_text())
    assert set(rows) == {LANDMARK_TRAINER, PLAIN_TRAINER}
    for trainer, trainer_rows in rows.items():
        assert [r["case"] for r in trainer_rows] == list(truth)
        for row in trainer_rows:
            predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"predictions_{trainer}" / f"{row['case']}.nii.gz")))
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "unseen_phantoms" / "ct_train" /
                                                              f"{row['case']}_label.nii.gz")))
            assert row["family"] == families[row["case"]]
            assert row["dice"] == pytest.approx(dice(label == 500, predicted == 1), abs=1e-9)
            assert row["foreground_dice"] == pytest.approx(np.mean([dice(label == value, predicted == index)
                                                                    for index, value in enumerate(
                                                                        (500, 205, 420, 550, 600, 820, 850), 1)]),
                                                           abs=1e-9)
            assert math.isfinite(row["error_mean_position_mm"]) and row["error_mean_position_mm"] >= 0, (trainer, row)
            # the tip needs a predicted LV (a smoke model may segment none): NaN exactly where it has none
            assert math.isfinite(row["error_tip_mm"]) == bool((predicted == 1).any()), (trainer, row)
            assert not row["error_tip_mm"] < 0
    for row in rows[LANDMARK_TRAINER]:
        markups = read_markups(out / f"predictions_{LANDMARK_TRAINER}" / f"{row['case']}.mrk.json", flagged=True)
        assert row["error_model_mm"] == pytest.approx(
            float(np.linalg.norm(markups["apex"] - truth[row["case"]]["apex"])), abs=1e-9)
        assert list(row["landmark_errors_mm"]) == list(LANDMARKS) == ["apex", "mitral_valve", "aortic_valve"]
        for name in LANDMARKS:
            assert row["landmark_errors_mm"][name] == pytest.approx(
                float(np.linalg.norm(markups[name] - truth[row["case"]][name])), abs=1e-9), (row, name)
    assert all("error_model_mm" not in row for row in rows[PLAIN_TRAINER])  # the plain model has no landmarks
    # by default both models segment the seven MM-WHS structures, and the rules use the structure next to each valve
    labels = json.loads((out / "nnUNet_raw" / DATASET / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, "LV_blood_cavity": 1, "LV_myocardium": 2, "LA": 3, "RA": 4, "RV": 5,
                      "ascending_aorta": 6, "pulmonary_artery": 7}
    expected_rules = {"apex": lambda s, g: apex_from_segmentation(s, g, 1),
                      "mitral_valve": lambda s, g: interface_centre(s, g, 1, 3),
                      "aortic_valve": lambda s, g: tube_end_from_segmentation(s, g, 6, 1)}
    for trainer, trainer_rows in rows.items():
        for row in trainer_rows:
            case = row["case"]
            predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"predictions_{trainer}" / f"{case}.nii.gz")))
            geometry = ImageGeometry.from_file(out / "unseen_phantoms" / "ct_train" / f"{case}_image.nii.gz")
            assert row["rule_names"] == {"apex": "geometric tip of the LV",
                                         "mitral_valve": "centre of the LV/LA interface",
                                         "aortic_valve": "centre of the aorta's end toward the LV"}
            for name, rule in expected_rules.items():
                try:
                    expected = float(np.linalg.norm(rule(predicted, geometry) - truth[case][name]))
                except (BaselineError, LabelRuleError):  # the smoke model may not segment a structure at all
                    expected = float("nan")
                assert row["rule_errors_mm"][name] == pytest.approx(expected, abs=1e-9, nan_ok=True), (row, name)
    landmark_rows = rows[LANDMARK_TRAINER]
    assert closing[0] == pytest.approx(np.mean([r["dice"] for r in landmark_rows]), abs=6e-4)
    assert closing[1] == pytest.approx(np.mean([r["dice"] for r in rows[PLAIN_TRAINER]]), abs=6e-4)
    for number, name in enumerate(LANDMARKS):
        assert closing[2 + 2 * number] == pytest.approx(np.mean([r["landmark_errors_mm"][name] for r in landmark_rows]),
                                                        abs=6e-3)
        assert closing[3 + 2 * number] == pytest.approx(
            np.mean([r["heatmap_extremum_errors_mm"][name] for r in landmark_rows]), abs=6e-3)

    # report.md: per phantom family, the unseen test set's tables; the cross-validation fold's headline; every figure
    report = out / "report" / "report.md"
    text = report.read_text()
    assert "## Cross-validation fold: headline" in text
    # every landmark's error from the prediction files, and the heatmap extremum alone from the table's heatmap_x/y/z
    errors = {name: {case: float(np.linalg.norm(read_markups(out / f"predictions_{LANDMARK_TRAINER}" / f"{case}.mrk.json",
                                                             flagged=True)[name] - truth[case][name]))
                     for case in truth} for name in LANDMARKS}
    table_rows = read_landmark_table(out / f"predictions_{LANDMARK_TRAINER}" / "landmarks.csv")
    extremum = {name: {r["case"]: float(np.linalg.norm(np.array([float(r[f"heatmap_{a}"]) for a in "xyz"]) -
                                                       truth[r["case"]][name]))
                       for r in table_rows if r["name"] == name} for name in LANDMARKS}
    plain_rows = {r["case"]: r for r in rows[PLAIN_TRAINER]}
    for family in dict.fromkeys(families.values()):
        cases = [c for c in truth if families[c] == family]
        heading = f"## Unseen test set: {family} phantoms ({len(cases)}, `nnUNetv2_predict`)"
        assert heading in text, text[:3000]
        table = text[text.index(heading):]
        table = table[:table.index("\n## ", 3)]
        mine = [r for r in landmark_rows if r["case"] in cases]
        plain = [plain_rows[c] for c in cases]
        foreground = re.search(rf"landmark model ({NUMBER}), plain nnU-Net ({NUMBER})", table)
        assert [float(v) for v in foreground.groups()] == pytest.approx(
            [np.mean([r["foreground_dice"] for r in mine]), np.mean([r["foreground_dice"] for r in plain])], abs=6e-4)
        summary_rows = [line for line in table.splitlines()
                        if line.startswith("| LV Dice") or line.startswith("| apex error")]
        assert len(summary_rows) == 7, table
        summary_values = [[r["dice"] for r in mine], [r["dice"] for r in plain], [r["error_model_mm"] for r in mine],
                          [r["heatmap_extremum_errors_mm"]["apex"] for r in mine], [r["error_tip_mm"] for r in mine],
                          [r["error_tip_mm"] for r in plain], [r["error_mean_position_mm"] for r in mine]]
        for line, expected in zip(summary_rows, summary_values):
            expected = np.asarray(expected, dtype=float)
            found = expected[np.isfinite(expected)]
            cell = line.split("|")[2]
            if len(found) < len(expected):  # cases without a predicted LV are left out, and counted
                assert f"without a predicted LV: {len(expected) - len(found)} of {len(expected)} cases" in cell, line
                if not len(found):
                    continue
            values = [float(v) for v in re.findall(NUMBER, cell.split(";")[0])]
            assert len(values) == 4, line  # mean, SD, median, max
            assert values[0] == pytest.approx(found.mean(), abs=6e-3)
            assert values[3] == pytest.approx(found.max(), abs=6e-3)
            assert all(math.isfinite(v) for v in values) or len(found) == 1, line  # one case has no SD
        case_rows = [line for line in table.splitlines() if line.startswith("| ct_train_")]
        assert [line.split("|")[1].strip() for line in case_rows] == cases
        for line, a, b in zip(case_rows, mine, plain):
            values = [float(v) for cell in line.split("|")[2:-1] for v in re.findall(NUMBER, cell)]
            assert values == pytest.approx([a["dice"], b["dice"], a["error_model_mm"],
                                            a["heatmap_extremum_errors_mm"]["apex"], a["error_tip_mm"],
                                            b["error_tip_mm"], a["error_mean_position_mm"]], abs=6e-3, nan_ok=True)
            assert all(math.isfinite(v) for v in values[:4] + values[6:]), line
        for name in LANDMARKS:
            landmark_rows_md = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
            assert len(landmark_rows_md) == 1, table
            values = [float(v) for cell in landmark_rows_md[0].split("|")[2:-1] for v in re.findall(NUMBER, cell)]
            mine_errors = [errors[name][c] for c in cases]
            mine_extremum = [extremum[name][c] for c in cases]
            assert values[:3] == pytest.approx([np.mean(mine_errors), np.median(mine_errors), np.max(mine_errors)],
                                               abs=6e-3), (name, landmark_rows_md[0])
            assert values[3:5] == pytest.approx([np.mean(mine_extremum), np.max(mine_extremum)], abs=6e-3)
            rule = np.asarray([r["rule_errors_mm"][name] for r in mine], dtype=float)
            rule = rule[np.isfinite(rule)]  # NaN where the smoke model segmented no structure the rule needs
            assert len(values) == 7 and values[5:] == pytest.approx(
                [rule.mean(), rule.max()] if len(rule) else [float("nan")] * 2, abs=6e-3, nan_ok=True)

    # alignment: per case and overall, TRE from the predicted landmarks finite, from the true ones ~0
    alignment = json.loads((out / "report" / "alignment.json").read_text())
    assert [r["case"] for r in alignment] == list(truth)
    for r in alignment:
        assert 0 <= r["rotation_degrees"] <= MAX_ROTATION_DEGREES + 1e-6 and 0 <= r["translation_mm"] <= MAX_TRANSLATION_MM
        assert r["surface_points"] > 100, r
        assert all(math.isfinite(v) and v >= 0 for v in r["predicted"].values()), r
        assert r["predicted"]["tre_mean_mm"] <= r["predicted"]["tre_max_mm"]
        assert r["true"]["tre_max_mm"] < 1e-3 and r["true"]["fre_rms_mm"] < 1e-3, r
    section = text[text.index("## Alignment of the unseen phantoms"):text.index("## Cross-validation fold: headline")]
    align_rows = {line.split("|")[1].strip(): [float(v) for cell in line.split("|")[2:-1]
                                               for v in re.findall(SCIENTIFIC, cell)]
                  for line in section.splitlines() if line.startswith("| ct_train_") or line.startswith("| overall")}
    assert list(align_rows) == [*truth, "overall"], section
    for r in alignment:
        expected = [r["rotation_degrees"], r["translation_mm"], r["predicted"]["fre_rms_mm"],
                    r["predicted"]["tre_mean_mm"], r["predicted"]["tre_max_mm"], r["true"]["tre_mean_mm"],
                    r["true"]["tre_max_mm"]]
        assert align_rows[r["case"]] == pytest.approx(expected, rel=1e-2, abs=0.06), (r, align_rows[r["case"]])
    overall = align_rows["overall"]
    assert len(overall) == 5 and all(math.isfinite(v) for v in overall), overall
    assert overall[1] == pytest.approx(np.mean([r["predicted"]["tre_mean_mm"] for r in alignment]), abs=6e-3)
    assert overall[2] == pytest.approx(np.max([r["predicted"]["tre_max_mm"] for r in alignment]), abs=6e-3)
    assert overall[4] < 1e-3  # the sanity row: the true landmarks align exactly

    # the alignment figure: 2 rows (before, after) x 3 projections, each with both point sets in its own colour
    assert "](alignment.png)" in section
    image = plt_imread(out / "report" / "alignment.png")
    assert image.shape[:2] == (800, 1200), image.shape
    height, width = image.shape[:2]
    for colour in (FIXED_COLOUR, MOVED_COLOUR):
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
        mask = np.all(np.abs(image[..., :3] - rgb) < 1e-3, axis=-1)
        counts = [int(mask[row * height // 2:(row + 1) * height // 2, column * width // 3:(column + 1) * width // 3].sum())
                  for row in range(2) for column in range(3)]
        assert min(counts) > 100, (colour, counts)

    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert links and all((report.parent / link).is_file() for link in links), links
    # the cross-validation fold: both held-out cases with a finite Dice and landmark error
    validation = results_folder("Dataset850_MMWHSPhantoms", LANDMARK_TRAINER, "nnUNetResEncUNetMPlans", "3d_cpu", 0,
                                results=out / "nnUNet_results") / "validation"
    summary = json.loads((validation / "landmark_summary.json").read_text())
    assert len(summary["per_case"]) == 2
    assert all(math.isfinite(v) for case in summary["per_case"].values() for v in case.values())
