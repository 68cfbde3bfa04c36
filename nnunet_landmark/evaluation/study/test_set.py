"""The unseen test set of a demo or study: per case LV Dice, every landmark's error (what ``nnUNetv2_predict`` wrote,
the heatmap extremum alone, the best rule on the predicted segmentation), how far each landmark lies outside the
heart, and the tables of them (per phantom family where the cases come from several).

``evaluate_test_set`` reads a prediction folder and a phantom folder in the MM-WHS release layout; the demo, the tests
and the benchmarks share it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from nnunet_landmark.metrics import format_summary
from nnunet_landmark.mmwhs import LANDMARKS, LV_CAVITY


def segmentation_rules(label_values: Mapping[str, int]) -> dict[str, tuple[str, Callable]]:
    """Per demo landmark, the best rule we could write on a predicted segmentation whose dataset.json ``labels``
    are ``label_values``: (description, ``rule(labels zyx, geometry) -> world LPS mm``). The apex is the LV's
    geometric tip; a valve comes from the structure next to it where that is segmented (the mitral valve from the
    LV/LA interface, the aortic valve from the aorta's end toward the LV), else from the centre of the LV's base."""
    from nnunet_landmark.evaluation.baselines import (apex_from_segmentation, base_from_segmentation,
                                                      tube_end_from_segmentation)
    from nnunet_landmark.label_landmarks import interface_centre

    lv, la, aorta = 1, label_values.get("LA"), label_values.get("ascending_aorta")
    base = ("centre of the LV's base", lambda s, g: base_from_segmentation(s, g, lv))
    return {"apex": ("geometric tip of the LV", lambda s, g: apex_from_segmentation(s, g, lv)),
            "mitral_valve": base if la is None else
            ("centre of the LV/LA interface", lambda s, g: interface_centre(s, g, lv, la)),
            "aortic_valve": base if aorta is None else
            ("centre of the aorta's end toward the LV", lambda s, g: tube_end_from_segmentation(s, g, aorta, lv))}


def evaluate_test_set(prediction_folder: Path, test_root: Path, truth: dict, mean_position) -> list[dict]:
    """Per unseen case: its phantom ``family`` (``phantom_families``), LV Dice and the mean Dice of every segmented
    structure (``foreground_dice``, MM-WHS values mapped through dataset.json), the model's error per landmark (apex also as ``error_model_mm``), the heatmap
    extremum's, the rules' on the predicted segmentation (``segmentation_rules``; ``rule_names``; NaN where a
    structure a rule needs is missing) and the apex's ``mean_position`` baseline (a fitted ``MeanPositionBaseline``)
    errors (mm); and how far each written landmark, and each true one, lies outside the phantom's heart labels
    (``outside_heart_mm``, ``truth_outside_heart_mm``: signed mm, > 0 outside)."""
    import SimpleITK as sitk

    from nnunet_landmark.evaluation.baselines import BaselineError
    from nnunet_landmark.metrics import dice, landmark_error_mm, landmark_errors_mm
    from nnunet_landmark.geometry import ImageGeometry
    from nnunet_landmark.label_landmarks import LabelRuleError
    from nnunet_landmark.landmark_files import read_landmark_table, read_markups
    from nnunet_landmark.mmwhs import STRUCTURES
    from nnunet_landmark.phantom_families import ANALYTIC, read_families
    from nnunet_landmark.prior.model import signed_distance

    families = read_families(test_root)
    table = prediction_folder / "landmarks.csv"
    table_rows = read_landmark_table(table) if table.exists() else []
    dataset_json = prediction_folder / "dataset.json"
    labels = json.loads(dataset_json.read_text())["labels"] if dataset_json.exists() else {"LV_blood_cavity": 1}
    rules = segmentation_rules(labels)

    def rule_error(name: str, predicted: np.ndarray, geometry, landmarks: dict) -> float:
        try:
            return landmark_error_mm(rules[name][1](predicted, geometry), landmarks[name])
        except (BaselineError, LabelRuleError):
            return float("nan")

    rows = []
    for case, landmarks in truth.items():
        geometry = ImageGeometry.from_file(test_root / "ct_train" / f"{case}_image.nii.gz")
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(test_root / "ct_train" / f"{case}_label.nii.gz")))
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_folder / f"{case}.nii.gz")))
        row = {"case": case, "family": families.get(case, ANALYTIC), "dice": dice(reference == LV_CAVITY, predicted == 1),
               "foreground_dice": float(np.mean([dice(reference == STRUCTURES[name], predicted == value)
                                                 for name, value in labels.items() if name in STRUCTURES])),
               "error_mean_position_mm": landmark_error_mm(mean_position.predict(geometry), landmarks["apex"]),
               "rule_names": {name: rules[name][0] for name in LANDMARKS},
               "rule_errors_mm": {name: rule_error(name, predicted, geometry, landmarks) for name in LANDMARKS}}
        row["error_tip_mm"] = row["rule_errors_mm"]["apex"]
        markups = prediction_folder / f"{case}.mrk.json"
        if markups.exists():
            estimates = read_markups(markups, flagged=True)
            row["landmark_errors_mm"] = landmark_errors_mm(estimates, landmarks, LANDMARKS)
            heart = signed_distance(reference > 0, geometry.spacing[::-1])
            row["outside_heart_mm"] = {name: _distance_at(heart, geometry, estimates[name]) for name in LANDMARKS}
            row["truth_outside_heart_mm"] = {name: _distance_at(heart, geometry, landmarks[name])
                                             for name in LANDMARKS}
            row["error_model_mm"] = row["landmark_errors_mm"]["apex"]
            extrema = {r["name"]: [float(r[f"heatmap_{a}"]) for a in "xyz"]
                       for r in table_rows if r["case"] == case}
            row["heatmap_extremum_errors_mm"] = landmark_errors_mm(extrema, landmarks, LANDMARKS)
        rows.append(row)
    return rows


def _distance_at(distance: np.ndarray, geometry, world) -> float:
    """A (z, y, x) signed-distance map (mm, > 0 outside) linearly interpolated at a world point."""
    from scipy import ndimage

    index = geometry.world_to_array_index(np.asarray(world, dtype=np.float64)[None])[0]
    return float(ndimage.map_coordinates(distance, index[:, None], order=1, mode="nearest")[0])


def by_family(rows: list[dict]) -> "dict[str, list[dict]]":
    """The rows of each phantom family, in the order the families first appear."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("family", "analytic"), []).append(row)
    return groups


def dice_and_apex_table(landmark_rows: list[dict], plain_rows: list[dict]) -> str:
    """LV Dice of both models and the apex against its baselines (mean ± SD, median, max), then a row per case."""
    def stats(values) -> str:
        """"mean ± SD (median, max)" over the finite values; a tip's NaN (the model segmented no LV in that case) is
        left out and counted after a semicolon."""
        v = np.asarray(values, dtype=float)
        found = v[np.isfinite(v)]
        if len(found) == 0:
            return f"without a predicted LV: {len(v)} of {len(v)} cases"
        text = format_summary(found)
        missing = len(v) - len(found)
        return text + (f"; without a predicted LV: {missing} of {len(v)} cases" if missing else "")

    lines = ["| | mean ± SD (median, max) |", "|---|---|",
             f"| LV Dice, landmark model | {stats([r['dice'] for r in landmark_rows])} |",
             f"| LV Dice, plain nnU-Net | {stats([r['dice'] for r in plain_rows])} |",
             f"| apex error (mm), landmark model (what nnUNetv2_predict writes) | "
             f"{stats([r['error_model_mm'] for r in landmark_rows])} |",
             f"| apex error (mm), landmark model's heatmap extremum alone | "
             f"{stats([r['heatmap_extremum_errors_mm']['apex'] for r in landmark_rows])} |",
             f"| apex error (mm), geometric tip of the landmark model's LV | "
             f"{stats([r['error_tip_mm'] for r in landmark_rows])} |",
             f"| apex error (mm), geometric tip of plain nnU-Net's LV | {stats([r['error_tip_mm'] for r in plain_rows])} |",
             f"| apex error (mm), mean position of the training apices | "
             f"{stats([r['error_mean_position_mm'] for r in landmark_rows])} |", "",
             "| case | Dice landmark | Dice plain | apex error model (mm) | heatmap extremum | tip (landmark LV) | "
             "tip (plain LV) | mean position |", "|---|---|---|---|---|---|---|---|"]
    for a, b in zip(landmark_rows, plain_rows):
        lines.append(f"| {a['case']} | {a['dice']:.3f} | {b['dice']:.3f} | {a['error_model_mm']:.2f} | "
                     f"{a['heatmap_extremum_errors_mm']['apex']:.2f} | {a['error_tip_mm']:.2f} | "
                     f"{b['error_tip_mm']:.2f} | {a['error_mean_position_mm']:.2f} |")
    return "\n".join(lines) + "\n"


def landmark_error_table(landmark_rows: list[dict]) -> str:
    """The landmark model's error per landmark on the unseen phantoms (mean / median / max, mm), beside its heatmap
    extremum alone and the best rule on its predicted segmentation (``segmentation_rules``, named per row)."""
    lines = ["| landmark | error (mm) mean | median | max | heatmap extremum mean | max | rule | rule mean | max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in LANDMARKS:
        errors = np.asarray([r["landmark_errors_mm"][name] for r in landmark_rows], dtype=float)
        extremum = np.asarray([r["heatmap_extremum_errors_mm"][name] for r in landmark_rows], dtype=float)
        rule = np.asarray([r["rule_errors_mm"][name] for r in landmark_rows], dtype=float)
        lines.append(f"| {name} | {errors.mean():.2f} | {np.median(errors):.2f} | {errors.max():.2f} | "
                     f"{extremum.mean():.2f} | {extremum.max():.2f} | {landmark_rows[0]['rule_names'][name]} | "
                     f"{np.nanmean(rule):.2f} | {np.nanmax(rule):.2f} |")
    return "\n".join(lines) + "\n"


def test_set_section(landmark_rows: list[dict], plain_rows: list[dict]) -> str:
    """The report's unseen-test-set section: per phantom family, LV Dice and foreground Dice of both models, the apex
    against its baselines, and every landmark (what ``nnUNetv2_predict`` writes, the heatmap alone, the best rule)."""
    plain_of = {r["case"]: r for r in plain_rows}
    text = ""
    for family, rows in by_family(landmark_rows).items():
        plain = [plain_of[r["case"]] for r in rows]
        foreground = (np.mean([r["foreground_dice"] for r in rows]), np.mean([r["foreground_dice"] for r in plain]))
        text += (f"## Unseen test set: {family} phantoms ({len(rows)}, `nnUNetv2_predict`)\n\n"
                 f"Mean Dice of every segmented structure: landmark model {foreground[0]:.3f}, plain nnU-Net "
                 f"{foreground[1]:.3f}.\n\n"
                 + dice_and_apex_table(rows, plain) + "\n"
                 + "Every landmark of the landmark model: what `nnUNetv2_predict` writes (the heatmap combined with the "
                   "position prior in the frame of the predicted structure that placed it best in the training "
                   "cases), the heatmap's extremum alone (kept in `landmarks.csv`), and the best rule on the model's "
                   "predicted segmentation:\n\n"
                 + landmark_error_table(rows) + "\n")
    return text
