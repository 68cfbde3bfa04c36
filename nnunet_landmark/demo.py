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

import numpy as np

from nnunet_landmark.mmwhs import LANDMARKS
from nnunet_landmark.phantom_dataset import PLANS

DATASET_ID = 850
DATASET = "Dataset850_MMWHSPhantoms"
# the training and unseen phantoms: real MM-WHS hearts deformed, and the analytic heart (phantom_families); where the
# real label maps are not found, the analytic family alone (said in the report)
DEFAULT_FAMILY = "analytic+real"
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
    parser.add_argument("--test_cases", type=int, default=12, help="unseen phantoms for the test set (default 12)")
    parser.add_argument("--family", default=None,
                        help=f"phantom family of the training and unseen phantoms (default {DEFAULT_FAMILY}: cases "
                             f"alternate between the analytic heart and real MM-WHS hearts, deformed; analytic where "
                             f"the real label maps are not found). See nnUNetv2_generate_landmark_phantoms --help")
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
                             "instead of ~2.2, see benchmarks/results/ACCURACY.md)")
    args = parser.parse_args(argv)
    if args.cases < 2 * args.folds or args.test_cases < 2:
        parser.error(f"--cases must be at least twice --folds (2 held-out cases per fold for a standard deviation) "
                     f"and --test_cases at least 2; got --cases {args.cases} --folds {args.folds} "
                     f"--test_cases {args.test_cases}")

    from nnunet_landmark.anatomy_phantoms import template_folder
    from nnunet_landmark.evaluation.baselines import fit_mean_positions
    from nnunet_landmark.evaluation.plots import plot_alignment
    from nnunet_landmark.evaluation.study.alignment_study import align_test_set, alignment_section
    from nnunet_landmark.evaluation.study.compare import compare_to_plain
    from nnunet_landmark.evaluation.study.report import write_report
    from nnunet_landmark.evaluation.study.test_set import evaluate_test_set, test_set_section
    from nnunet_landmark.landmark_files import read_landmark_csv
    from nnunet_landmark.layout import atomic_write_json, atomic_write_text
    from nnunet_landmark.phantom_dataset import prepare_phantom_dataset, run_console_script
    from nnunet_landmark.phantom_families import write_mmwhs_phantoms
    from nnunet_landmark.results_folder import results_folder

    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo_log.txt"
    env = {"nnUNet_raw": str(out / "nnUNet_raw"), "nnUNet_preprocessed": str(out / "nnUNet_preprocessed"),
           "nnUNet_results": str(out / "nnUNet_results"),
           "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", str(min(2, os.cpu_count() or 1)) if args.device == "cpu"
                                              else os.environ.get("nnUNet_n_proc_DA", "8")),
           "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", "2")}
    family = args.family or (DEFAULT_FAMILY if template_folder() is not None else "analytic")
    if args.family is None and family != DEFAULT_FAMILY:
        print(f"Real MM-WHS label maps not found (see nnunet_landmark/anatomy_phantoms.py): the demo uses the analytic "
              f"phantoms alone instead of {DEFAULT_FAMILY}", flush=True)
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

    step(f"Synthetic cardiac CT phantoms ({family}) in the MM-WHS layout ({args.cases} training, {args.test_cases} "
         f"unseen)")
    mmwhs, unseen = out / "mmwhs_phantoms", out / "unseen_phantoms"
    if not (unseen / "landmarks.csv").exists():
        write_mmwhs_phantoms(unseen, args.test_cases, seed=args.seed + 1, size=size, flips=False, first_case=3001,
                             family=family)
    truth = read_landmark_csv(unseen / "landmarks.csv")
    # the training phantoms, then steps 2 and 3 (on a CPU with the small configuration 3d_cpu)
    raw = prepare_phantom_dataset(env, DATASET_ID, mmwhs, name="MMWHSPhantoms", landmarks=LANDMARKS, folds=args.folds,
                                  num_cases=args.cases, seed=args.seed, size=size, flips=False,
                                  processes=int(env["nnUNet_def_n_proc"]), small_configuration=args.device == "cpu",
                                  all_structures=not args.lv_only, family=family, step=step, log=log, progress=PROGRESS,
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
    atomic_write_json(test_rows, report_folder / "test_set.json")

    step("Alignment of the unseen phantoms to a randomly moved copy, from the predicted and from the true landmarks")
    alignment_rows, figure = align_test_set(predictions[landmark_trainer], unseen, truth, args.seed)
    atomic_write_json(alignment_rows, report_folder / "alignment.json")
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
             f"phantoms: `{family}`; total time {time.time() - step.start:.0f} s.\n\n"
             + test_set_section(test_rows[landmark_trainer], test_rows[plain_trainer])
             + alignment_section(alignment_rows, figure_file.name))
    heading = text.index("## Headline")
    atomic_write_text(report, text[:heading] + intro + text[heading:].replace("## Headline",
                                                                              "## Cross-validation fold: headline"))
    rows = test_rows[landmark_trainer]
    print(f"\nDone in {time.time() - step.start:.0f} s. Unseen phantoms ({family}): LV Dice "
          f"{np.mean([r['dice'] for r in rows]):.3f} (plain nnU-Net {np.mean([r['dice'] for r in test_rows[plain_trainer]]):.3f})."
          f"\nPer landmark (mean mm, what nnUNetv2_predict writes / the heatmap alone): "
          + ", ".join(f"{n} {np.mean([r['landmark_errors_mm'][n] for r in rows]):.2f} / "
                      f"{np.mean([r['heatmap_extremum_errors_mm'][n] for r in rows]):.2f}" for n in LANDMARKS)
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

