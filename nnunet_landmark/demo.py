"""nnUNetv2_landmark_demo: the whole workflow on built-in synthetic MM-WHS-like data, with the real commands.

    nnUNetv2_landmark_demo -o demo_output

1. synthetic cardiac CT phantoms written in the MM-WHS CT release layout (+ their landmark annotations CSV),
2. ``nnUNetv2_convert_MMWHS --all-structures`` -> an nnU-Net dataset with the seven MM-WHS structures as labels
   (``--lv-only``: the LV alone, as in the paper), three landmarks (apex, mitral valve, aortic valve) and
   cross-validation splits,
3. ``nnUNetv2_plan_and_preprocess`` (ResEnc-M planner); on a CPU a small configuration ``3d_cpu`` is added,
4. ``nnUNetv2_train`` of ``nnUNetTrainerLandmark`` and of a plain nnU-Net trainer with the same budget,
5. ``nnUNetv2_predict`` of both models on phantoms neither has seen,
6. evaluation: the cross-validation fold (the paper's Table 2 layout) and the unseen test set, against plain
   nnU-Net and the two apex baselines (mean position; geometric tip of the predicted LV), with every landmark's
   error on the unseen phantoms,
7. alignment, the paper's purpose: each unseen phantom's predicted landmarks are aligned rigidly
   (``nnunet_landmark.alignment``) to the same phantom under a known random rigid transform (a stand-in for
   another modality); the target registration error on the true LV surface, against the same alignment from the
   true landmarks,
8. ``report.md`` with tables, learning curves, comparison plots, QC figures and an alignment figure.

Everything lands in the output folder (``nnUNet_raw`` / ``_preprocessed`` / ``_results`` inside it), so the demo
never touches a user's nnU-Net folders.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from nnunet_landmark.phantom_dataset import PLANS

DATASET_ID = 850
DATASET = "Dataset850_MMWHSPhantoms"
LANDMARKS = ("apex", "mitral_valve", "aortic_valve")  # heatmap channel order; all three annotated on the phantoms
LV_CAVITY = 500  # MM-WHS label of the LV blood cavity
# the stand-in for another modality: the phantom moved by a random rotation and translation up to these
MAX_ROTATION_DEGREES, MAX_TRANSLATION_MM = 30.0, 50.0
PROGRESS = re.compile(r"(Epoch \d+$|Pseudo dice|landmark error in validation|Mean [Vv]alidation|Predicting |"
                      r"Wrote |Preprocessing cases|done with)")

SETUPS = {
    # device: (configuration, landmark trainer, plain trainer with the same optimizer and budget)
    "cpu": ("3d_cpu", "nnUNetTrainerLandmark_cpu_learn", "nnUNetTrainer_cpu_learn"),
    "cuda": ("3d_fullres", "nnUNetTrainerLandmark_100epochs", "nnUNetTrainer_100epochs"),
}
# --budget smoke: the same pipeline with the 2 x 5-iteration trainers, to check that it runs (it learns nothing)
SMOKE_TRAINERS = ("nnUNetTrainerLandmark_cpu_smoke", "nnUNetTrainer_cpu_smoke")


class Step:
    def __init__(self, total: int):
        self.total, self.number, self.start = total, 0, time.time()

    def __call__(self, title: str) -> None:
        self.number += 1
        print(f"\n[{self.number}/{self.total}] {title}  (elapsed {time.time() - self.start:.0f} s)", flush=True)


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
    """Per unseen case: LV Dice, the model's error per landmark (apex also as ``error_model_mm``), the heatmap
    extremum's, the rules' on the predicted segmentation (``segmentation_rules``; ``rule_names``; NaN where a
    structure a rule needs is missing) and the apex's ``mean_position`` baseline (a fitted ``MeanPositionBaseline``)
    errors (mm); and how far each written landmark, and each true one, lies outside the phantom's heart labels
    (``outside_heart_mm``, ``truth_outside_heart_mm``: signed mm, > 0 outside)."""
    import SimpleITK as sitk

    from nnunet_landmark.evaluation.baselines import BaselineError
    from nnunet_landmark.evaluation.metrics import dice, landmark_error_mm, landmark_errors_mm
    from nnunet_landmark.geometry import ImageGeometry
    from nnunet_landmark.label_landmarks import LabelRuleError
    from nnunet_landmark.landmark_files import read_landmark_table, read_markups
    from nnunet_landmark.position_prior import signed_distance

    table = prediction_folder / "landmarks.csv"
    table_rows = read_landmark_table(table) if table.exists() else []
    dataset_json = prediction_folder / "dataset.json"
    rules = segmentation_rules(json.loads(dataset_json.read_text())["labels"] if dataset_json.exists() else {})

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
        row = {"case": case, "dice": dice(reference == LV_CAVITY, predicted == 1),
               "error_mean_position_mm": landmark_error_mm(mean_position.predict(geometry), landmarks["apex"]),
               "rule_names": {name: rules[name][0] for name in LANDMARKS},
               "rule_errors_mm": {name: rule_error(name, predicted, geometry, landmarks) for name in LANDMARKS}}
        row["error_tip_mm"] = row["rule_errors_mm"]["apex"]
        markups = prediction_folder / f"{case}.mrk.json"
        if markups.exists():
            estimates = read_markups(markups)
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


def test_set_markdown(landmark_rows: list[dict], plain_rows: list[dict]) -> str:
    def stats(values) -> str:
        """"mean ± SD (median, max)" over the finite values; a tip's NaN (the model segmented no LV in that case) is
        left out and counted after a semicolon."""
        v = np.asarray(values, dtype=float)
        found = v[np.isfinite(v)]
        if len(found) == 0:
            return f"without a predicted LV: {len(v)} of {len(v)} cases"
        sd = found.std(ddof=1) if len(found) > 1 else float("nan")
        text = f"{found.mean():.2f} ± {sd:.2f} (median {np.median(found):.2f}, max {found.max():.2f})"
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


def landmark_errors_markdown(landmark_rows: list[dict]) -> str:
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


def random_rigid_matrix(rng: np.random.Generator, center: np.ndarray) -> np.ndarray:
    """4 x 4 matrix of a rotation about ``center`` (random axis, angle up to ``MAX_ROTATION_DEGREES``) followed by a
    translation (random direction, length up to ``MAX_TRANSLATION_MM``)."""
    import SimpleITK as sitk

    from nnunet_landmark.alignment import transform_matrix

    axis, direction = rng.normal(size=3), rng.normal(size=3)
    transform = sitk.VersorRigid3DTransform()
    transform.SetCenter([float(c) for c in center])
    transform.SetRotation((axis / np.linalg.norm(axis)).tolist(), float(np.deg2rad(rng.uniform(0, MAX_ROTATION_DEGREES))))
    transform.SetTranslation((direction / np.linalg.norm(direction) * rng.uniform(0, MAX_TRANSLATION_MM)).tolist())
    return transform_matrix(transform)


def align_test_set(prediction_folder: Path, test_root: Path, truth: dict, seed: int) -> tuple[list[dict], dict]:
    """Align each unseen phantom's predicted landmarks to its true ones moved by a known random rigid transform.

    Our CT is the moving space, the moved phantom the fixed one ("the other modality"). The estimated transform
    (ITK convention: fixed -> moving) brings the true LV surface into the fixed space with its inverse; the target
    registration error (TRE) is that point's distance to where the known transform puts it. The same alignment
    from the true landmarks is the sanity row (TRE ~ 0). Returns the rows and the first case's points for the figure.
    """
    import SimpleITK as sitk

    from nnunet_landmark.alignment import (apply_matrix, fit_landmark_transform, label_surface, landmark_residuals,
                                           transform_matrix)
    from nnunet_landmark.landmark_files import read_markups

    rows, figure = [], {}
    for number, (case, landmarks) in enumerate(truth.items()):
        true = np.array([landmarks[n] for n in LANDMARKS])
        predicted_points = read_markups(prediction_folder / f"{case}.mrk.json")
        predicted = np.array([predicted_points[n] for n in LANDMARKS])
        known = random_rigid_matrix(np.random.default_rng([seed, number]), true.mean(axis=0))  # moving -> fixed
        fixed = apply_matrix(known, true)
        surface, _ = label_surface(sitk.ReadImage(str(test_root / "ct_train" / f"{case}_label.nii.gz")), LV_CAVITY)
        surface_fixed = apply_matrix(known, surface)
        row = {"case": case, "surface_points": int(len(surface)),
               "rotation_degrees": float(np.degrees(np.arccos(np.clip((np.trace(known[:3, :3]) - 1) / 2, -1, 1)))),
               "translation_mm": float(np.linalg.norm(known[:3, 3] + known[:3, :3] @ true.mean(axis=0)
                                                      - true.mean(axis=0)))}
        for source, moving in (("predicted", predicted), ("true", true)):
            transform = fit_landmark_transform(fixed, moving)
            moved = apply_matrix(np.linalg.inv(transform_matrix(transform)), surface)
            tre = np.linalg.norm(moved - surface_fixed, axis=1)
            row[source] = {"fre_rms_mm": float(np.sqrt(np.mean(landmark_residuals(transform, fixed, moving) ** 2))),
                           "tre_mean_mm": float(tre.mean()), "tre_max_mm": float(tre.max())}
            if number == 0 and source == "predicted":
                figure = {"case": case, "fixed": surface_fixed, "before": surface, "after": moved}
        rows.append(row)
    return rows, figure


def alignment_markdown(rows: list[dict], figure_file: str | None) -> str:
    """Per case and overall: TRE (mean / max mm on the LV surface) from the predicted and from the true landmarks."""
    lines = ["| case | rotation (deg) | translation (mm) | FRE RMS (mm), predicted | TRE mean (mm), predicted | "
             "TRE max (mm), predicted | TRE mean (mm), true landmarks | TRE max (mm), true landmarks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, t = r["predicted"], r["true"]
        lines.append(f"| {r['case']} | {r['rotation_degrees']:.1f} | {r['translation_mm']:.1f} | {p['fre_rms_mm']:.2f} | "
                     f"{p['tre_mean_mm']:.2f} | {p['tre_max_mm']:.2f} | {t['tre_mean_mm']:.2e} | {t['tre_max_mm']:.2e} |")
    lines.append(f"| overall | | | {np.mean([r['predicted']['fre_rms_mm'] for r in rows]):.2f} | "
                 f"{np.mean([r['predicted']['tre_mean_mm'] for r in rows]):.2f} | "
                 f"{np.max([r['predicted']['tre_max_mm'] for r in rows]):.2f} | "
                 f"{np.mean([r['true']['tre_mean_mm'] for r in rows]):.2e} | "
                 f"{np.max([r['true']['tre_max_mm'] for r in rows]):.2e} |")
    text = "\n".join(lines) + "\n"
    if figure_file:
        text += f"\n![alignment of one unseen phantom, before and after]({figure_file})\n"
    return text


def main(argv: list[str] | None = None) -> None:
    """The console script: a failed nnU-Net command ends the demo with its message, not a traceback."""
    from nnunet_landmark.phantom_dataset import ConsoleScriptError

    try:
        run_demo(argv)
    except ConsoleScriptError as e:
        raise SystemExit(str(e)) from None


def run_demo(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_landmark_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default="demo_output", help="output folder (default ./demo_output)")
    parser.add_argument("-device", default="cuda" if _cuda() else "cpu", choices=("cpu", "cuda"),
                        help="cpu: small configuration and a ~5 min budget per model; cuda: the real 3d_fullres plans")
    parser.add_argument("--cases", type=int, default=20, help="training phantoms (default 20, as MM-WHS)")
    parser.add_argument("--test_cases", type=int, default=10, help="unseen phantoms for the test set (default 10)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds written by the converter")
    parser.add_argument("--fold", type=int, default=0, help="fold to train (default 0)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--budget", default="full", choices=("full", "smoke"),
                        help="full (default): the training budget above; smoke: every step the same, but both models "
                             "train 2 x 5 iterations (nnUNetTrainer*_cpu_smoke): checks that the pipeline runs, in "
                             "a few minutes, and learns nothing")
    parser.add_argument("--lv-only", "--lv_only", action="store_true",
                        help="segment the LV alone, as the paper did, instead of all seven MM-WHS structures (every "
                             "landmark is then placed in the frame of the predicted LV: the aortic valve ~4.5 mm off "
                             "instead of ~2.2, see benchmarks/ACCURACY.md)")
    args = parser.parse_args(argv)
    if args.cases < 2 * args.folds or args.test_cases < 2:
        parser.error(f"--cases must be at least twice --folds (2 held-out cases per fold for a standard deviation) "
                     f"and --test_cases at least 2; got --cases {args.cases} --folds {args.folds} "
                     f"--test_cases {args.test_cases}")

    from nnunet_landmark.evaluation.baselines import fit_mean_positions
    from nnunet_landmark.evaluation.plots import plot_alignment
    from nnunet_landmark.evaluation.study.compare import compare_to_plain
    from nnunet_landmark.evaluation.study.report import write_report
    from nnunet_landmark.landmark_files import read_landmark_csv
    from nnunet_landmark.phantom_dataset import prepare_phantom_dataset, run_console_script
    from nnunet_landmark.phantoms import write_mmwhs_phantoms
    from nnunet_landmark.results_folder import results_folder

    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo_log.txt"
    env = {"nnUNet_raw": str(out / "nnUNet_raw"), "nnUNet_preprocessed": str(out / "nnUNet_preprocessed"),
           "nnUNet_results": str(out / "nnUNet_results"),
           "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", str(min(2, os.cpu_count() or 1)) if args.device == "cpu"
                                              else os.environ.get("nnUNet_n_proc_DA", "8")),
           "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", "2")}
    configuration, landmark_trainer, plain_trainer = SETUPS[args.device]
    if args.budget == "smoke":
        landmark_trainer, plain_trainer = SMOKE_TRAINERS
    # ~3.4 mm voxels on a CPU: the resolution at which 2000 iterations localise the apex well (4.9 mm on unseen
    # phantoms in the learning test, against 12.9 mm for the mean position)
    size = (64, 64, 48) if args.device == "cpu" else "small"
    step = Step(9)
    run = partial(run_console_script, env=env, log=log, progress=PROGRESS, echo=True)

    def model(trainer: str) -> Path:
        return results_folder(DATASET, trainer, PLANS, configuration, results=env["nnUNet_results"])

    step(f"Synthetic cardiac CT phantoms in the MM-WHS layout ({args.cases} training, {args.test_cases} unseen)")
    mmwhs, unseen = out / "mmwhs_phantoms", out / "unseen_phantoms"
    if not (unseen / "landmarks.csv").exists():
        write_mmwhs_phantoms(unseen, args.test_cases, seed=args.seed + 1, size=size, flips=False, first_case=3001)
    truth = read_landmark_csv(unseen / "landmarks.csv")
    # the training phantoms, then steps 2 and 3 (on a CPU with the small configuration 3d_cpu)
    raw = prepare_phantom_dataset(env, DATASET_ID, mmwhs, name="MMWHSPhantoms", landmarks=LANDMARKS, folds=args.folds,
                                  num_cases=args.cases, seed=args.seed, size=size, flips=False,
                                  processes=int(env["nnUNet_def_n_proc"]), small_configuration=args.device == "cpu",
                                  all_structures=not args.lv_only, step=step, log=log, progress=PROGRESS,
                                  echo=True).raw

    for number, trainer in enumerate((landmark_trainer, plain_trainer)):
        step(f"nnUNetv2_train {configuration} fold {args.fold} -tr {trainer}")
        if not (model(trainer) / f"fold_{args.fold}" / "validation" / "summary.json").exists():
            run(["nnUNetv2_train", str(DATASET_ID), configuration, str(args.fold), "-tr", trainer, "-p", PLANS,
                 "-device", args.device])

    step("nnUNetv2_predict on the unseen phantoms, both models")
    inputs = out / "unseen_inputs"
    inputs.mkdir(exist_ok=True)
    for case in truth:
        link = inputs / f"{case}_0000.nii.gz"
        if not link.exists():
            link.symlink_to(unseen / "ct_train" / f"{case}_image.nii.gz")
    predictions = {}
    for trainer in (landmark_trainer, plain_trainer):
        predictions[trainer] = out / f"predictions_{trainer}"
        # the smoke trainers keep nnU-Net's test-time mirroring, the CPU learning budget has none: predict alike
        no_tta = ["--disable_tta"] if args.budget == "smoke" else []
        run(["nnUNetv2_predict", "-i", str(inputs), "-o", str(predictions[trainer]), "-d", str(DATASET_ID), "-c",
             configuration, "-f", str(args.fold), "-tr", trainer, "-p", PLANS, "-device", args.device, *no_tta])

    step("Evaluation: cross-validation fold and unseen test set, against plain nnU-Net and the baselines")
    os.environ.update(env)
    report_folder = out / "report"
    comparison = compare_to_plain(model(landmark_trainer), model(plain_trainer), raw, report_folder,
                                  folds=[args.fold], qc=True)
    splits = json.loads((raw / "splits_final.json").read_text())
    mean_position = fit_mean_positions(raw, splits[args.fold]["train"], ["apex"])["apex"]
    test_rows = {t: evaluate_test_set(predictions[t], unseen, truth, mean_position) for t in predictions}
    (report_folder / "test_set.json").write_text(json.dumps(test_rows, indent=1))

    step("Alignment of the unseen phantoms to a randomly moved copy, from the predicted and from the true landmarks")
    alignment_rows, figure = align_test_set(predictions[landmark_trainer], unseen, truth, args.seed)
    (report_folder / "alignment.json").write_text(json.dumps(alignment_rows, indent=1))
    figure_file = plot_alignment(figure, report_folder / "alignment.png")

    step("Report")
    curves = [str(model(t) / f"fold_{args.fold}" / "progress.png") for t in (landmark_trainer, plain_trainer)]
    report = write_report(report_folder, comparison["landmark_crossval"], comparison, curves,
                          comparison.get("qc_pngs", []),
                          title="nnunet-landmark demo on synthetic MM-WHS-like CT: LV segmentation, landmark "
                                "detection and alignment")
    text = report.read_text()
    intro = (f"Device `{args.device}`, configuration `{configuration}` of `{PLANS}`, landmark model `{landmark_trainer}`, "
             f"plain model `{plain_trainer}` (same optimizer and budget), fold {args.fold} of {args.folds}; "
             f"segmented: {'the LV alone (--lv-only)' if args.lv_only else 'the seven MM-WHS structures'}; "
             f"total time {time.time() - step.start:.0f} s.\n\n"
             f"## Unseen test set ({len(truth)} phantoms, `nnUNetv2_predict`)\n\n"
             + test_set_markdown(test_rows[landmark_trainer], test_rows[plain_trainer]) + "\n"
             + "Every landmark of the landmark model on the unseen phantoms: what `nnUNetv2_predict` writes (the "
               "position prior in the frame of the predicted structure that placed it best in the training cases, "
               "combined with the heatmap), the heatmap's extremum alone (kept in `landmarks.csv`), and the best "
               "rule on the model's predicted segmentation:\n\n"
             + landmark_errors_markdown(test_rows[landmark_trainer]) + "\n"
             + f"## Alignment of the unseen phantoms\n\nEach phantom's three predicted landmarks ({', '.join(LANDMARKS)}) "
               f"are aligned rigidly (`nnunet_landmark.alignment`, SimpleITK `VersorRigid3DTransform`) to the true "
               f"landmarks of the same phantom moved by a known random rigid transform (rotation up to "
               f"{MAX_ROTATION_DEGREES:.0f} degrees, translation up to {MAX_TRANSLATION_MM:.0f} mm; a stand-in for "
               f"another modality). Target registration error (TRE): distance, over the points of the true LV cavity "
               f"surface (marching cubes of label {LV_CAVITY}, world mm), between where the estimated and the known "
               f"transform put them. The same alignment from the true landmarks must give TRE ~ 0 (sanity check).\n\n"
             + alignment_markdown(alignment_rows, figure_file.name) + "\n")
    heading = text.index("## Headline")
    report.write_text(text[:heading] + intro + text[heading:].replace("## Headline", "## Cross-validation fold: headline"))
    rows = test_rows[landmark_trainer]
    tips = [r["error_tip_mm"] for r in rows if np.isfinite(r["error_tip_mm"])]  # NaN: no predicted LV
    print(f"\nDone in {time.time() - step.start:.0f} s. Unseen phantoms: LV Dice {np.mean([r['dice'] for r in rows]):.3f}, "
          f"apex error {np.mean([r['error_model_mm'] for r in rows]):.2f} mm (mean-position baseline "
          f"{np.mean([r['error_mean_position_mm'] for r in rows]):.2f} mm, geometric tip "
          f"{np.mean(tips) if tips else float('nan'):.2f} mm).\nPer landmark (mean mm): "
          + ", ".join(f"{n} {np.mean([r['landmark_errors_mm'][n] for r in rows]):.2f}" for n in LANDMARKS)
          + f". Alignment TRE on the LV surface: {np.mean([r['predicted']['tre_mean_mm'] for r in alignment_rows]):.2f} "
            f"mm mean, {np.max([r['predicted']['tre_max_mm'] for r in alignment_rows]):.2f} mm max (true landmarks: "
            f"{np.max([r['true']['tre_max_mm'] for r in alignment_rows]):.1e} mm max).\nReport: {report}")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    main()
