"""nnUNetv2_landmark_demo: the whole workflow on built-in synthetic MM-WHS-like data, with the real commands.

    nnUNetv2_landmark_demo -o demo_output

1. synthetic cardiac CT phantoms written in the MM-WHS CT release layout (+ apex sphere masks),
2. ``nnUNetv2_convert_MMWHS`` -> an nnU-Net dataset with landmarks and cross-validation splits,
3. ``nnUNetv2_plan_and_preprocess`` (ResEnc-M planner); on a CPU a small configuration ``3d_cpu`` is added,
4. ``nnUNetv2_train`` of ``nnUNetTrainerLandmark`` and of a plain nnU-Net trainer with the same budget,
5. ``nnUNetv2_predict`` of both models on phantoms neither has seen,
6. evaluation: the cross-validation fold (the paper's Table 2 layout) and the unseen test set, against plain
   nnU-Net and the two baselines (mean position; geometric tip of the predicted LV),
7. ``report.md`` with tables, learning curves, comparison plots and QC figures.

Everything lands in the output folder (``nnUNet_raw`` / ``_preprocessed`` / ``_results`` inside it), so the demo
never touches a user's nnU-Net folders.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATASET_ID = 850
DATASET = "Dataset850_MMWHSPhantoms"
PLANS = "nnUNetResEncUNetMPlans"
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


def run(command: list[str], env: dict, log: Path) -> None:
    """Run a console script of this environment, keep its full output in ``log``, show its progress lines."""
    exe = Path(sys.executable).parent / command[0]
    command = [str(exe) if exe.exists() else command[0], *command[1:]]
    print("  $ " + " ".join(command), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            f.write(line)
            line = line.rstrip()
            if PROGRESS.search(line):
                print("    " + line[-150:], flush=True)
        if process.wait() != 0:
            raise SystemExit(f"{command[0]} failed (exit {process.returncode}); see {log}")


def evaluate_test_set(prediction_folder: Path, test_root: Path, truth: dict, train_geometries: list) -> list[dict]:
    """Per unseen case: LV Dice, the model's apex error, and both baselines' errors (mm)."""
    import SimpleITK as sitk

    from nnunet_landmark.baselines import MeanPositionBaseline, apex_from_segmentation
    from nnunet_landmark.evaluation.metrics import dice
    from nnunet_landmark.geometry import ImageGeometry
    from nnunet_landmark.landmark_files import read_markups

    mean_position = MeanPositionBaseline().fit(train_geometries)
    rows = []
    for case, landmarks in truth.items():
        geometry = ImageGeometry.from_file(test_root / "ct_train" / f"{case}_image.nii.gz")
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(test_root / "ct_train" / f"{case}_label.nii.gz")))
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_folder / f"{case}.nii.gz")))
        row = {"case": case, "dice": dice(reference == 500, predicted == 1),
               "error_tip_mm": float(np.linalg.norm(apex_from_segmentation(predicted, geometry, 1) - landmarks["apex"])),
               "error_mean_position_mm": float(np.linalg.norm(mean_position.predict(geometry) - landmarks["apex"]))}
        markups = prediction_folder / f"{case}.mrk.json"
        if markups.exists():
            row["error_model_mm"] = float(np.linalg.norm(read_markups(markups)["apex"] - landmarks["apex"]))
        rows.append(row)
    return rows


def test_set_markdown(landmark_rows: list[dict], plain_rows: list[dict]) -> str:
    def stats(values):
        v = np.asarray(values, dtype=float)
        return f"{v.mean():.2f} ± {v.std(ddof=1):.2f} (median {np.median(v):.2f}, max {v.max():.2f})"

    lines = ["| | mean ± SD (median, max) |", "|---|---|",
             f"| LV Dice, landmark model | {stats([r['dice'] for r in landmark_rows])} |",
             f"| LV Dice, plain nnU-Net | {stats([r['dice'] for r in plain_rows])} |",
             f"| apex error (mm), landmark model heatmap | {stats([r['error_model_mm'] for r in landmark_rows])} |",
             f"| apex error (mm), geometric tip of the landmark model's LV | "
             f"{stats([r['error_tip_mm'] for r in landmark_rows])} |",
             f"| apex error (mm), geometric tip of plain nnU-Net's LV | {stats([r['error_tip_mm'] for r in plain_rows])} |",
             f"| apex error (mm), mean position of the training apices | "
             f"{stats([r['error_mean_position_mm'] for r in landmark_rows])} |", "",
             "| case | Dice landmark | Dice plain | apex error model (mm) | tip (landmark LV) | tip (plain LV) | "
             "mean position |", "|---|---|---|---|---|---|---|"]
    for a, b in zip(landmark_rows, plain_rows):
        lines.append(f"| {a['case']} | {a['dice']:.3f} | {b['dice']:.3f} | {a['error_model_mm']:.2f} | "
                     f"{a['error_tip_mm']:.2f} | {b['error_tip_mm']:.2f} | {a['error_mean_position_mm']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)
    if args.cases < 2 * args.folds or args.test_cases < 2:
        parser.error(f"--cases must be at least twice --folds (2 held-out cases per fold for a standard deviation) "
                     f"and --test_cases at least 2; got --cases {args.cases} --folds {args.folds} "
                     f"--test_cases {args.test_cases}")

    from nnunet_landmark.cpu_plans import add_small_configuration
    from nnunet_landmark.evaluation.compare import compare_to_plain
    from nnunet_landmark.evaluation.report import write_report
    from nnunet_landmark.geometry import ImageGeometry
    from nnunet_landmark.landmark_files import read_markups
    from nnunet_landmark.phantoms import write_mmwhs_phantoms

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
    step = Step(8)

    step(f"Synthetic cardiac CT phantoms in the MM-WHS layout ({args.cases} training, {args.test_cases} unseen)")
    mmwhs, unseen = out / "mmwhs_phantoms", out / "unseen_phantoms"
    if not (mmwhs / "landmarks.csv").exists():
        write_mmwhs_phantoms(mmwhs, args.cases, seed=args.seed, size=size, flips=False)
    if not (unseen / "landmarks.csv").exists():
        write_mmwhs_phantoms(unseen, args.test_cases, seed=args.seed + 1, size=size, flips=False, first_case=3001)
    from nnunet_landmark.landmark_files import read_landmark_csv
    truth = read_landmark_csv(unseen / "landmarks.csv")

    step("nnUNetv2_convert_MMWHS")
    raw = Path(env["nnUNet_raw"]) / DATASET
    if not raw.exists():
        run(["nnUNetv2_convert_MMWHS", "-i", str(mmwhs / "ct_train"), "-a", str(mmwhs / "apex"), "-d", str(DATASET_ID),
             "--name", "MMWHSPhantoms", "--folds", str(args.folds)], env, log)

    step("nnUNetv2_plan_and_preprocess (ResEnc-M planner)")
    plans_file = Path(env["nnUNet_preprocessed"]) / DATASET / f"{PLANS}.json"
    if not plans_file.exists() or configuration not in json.loads(plans_file.read_text())["configurations"]:
        run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-pl", "nnUNetPlannerResEncM", "-c", "3d_fullres",
             "-np", env["nnUNet_def_n_proc"]], env, log)
        if args.device == "cpu":
            add_small_configuration(plans_file, name=configuration, patch_size=(32, 32, 32),
                                    features_per_stage=(8, 16, 32, 64), batch_size=2)

    results = Path(env["nnUNet_results"]) / DATASET
    for number, trainer in enumerate((landmark_trainer, plain_trainer)):
        step(f"nnUNetv2_train {configuration} fold {args.fold} -tr {trainer}")
        if not (results / f"{trainer}__{PLANS}__{configuration}" / f"fold_{args.fold}" / "validation" /
                "summary.json").exists():
            run(["nnUNetv2_train", str(DATASET_ID), configuration, str(args.fold), "-tr", trainer, "-p", PLANS,
                 "-device", args.device], env, log)

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
             configuration, "-f", str(args.fold), "-tr", trainer, "-p", PLANS, "-device", args.device, *no_tta],
            env, log)

    step("Evaluation: cross-validation fold and unseen test set, against plain nnU-Net and the baselines")
    os.environ.update(env)
    report_folder = out / "report"
    comparison = compare_to_plain(results / f"{landmark_trainer}__{PLANS}__{configuration}",
                                  results / f"{plain_trainer}__{PLANS}__{configuration}", raw, report_folder,
                                  folds=[args.fold], qc=True)
    splits = json.loads((raw / "splits_final.json").read_text())
    train_geometries = [(ImageGeometry.from_file(raw / "imagesTr" / f"{c}_0000.nii.gz"),
                         read_markups(raw / "landmarksTr" / f"{c}.mrk.json")["apex"]) for c in splits[args.fold]["train"]]
    test_rows = {t: evaluate_test_set(predictions[t], unseen, truth, train_geometries) for t in predictions}
    (report_folder / "test_set.json").write_text(json.dumps(test_rows, indent=1))

    step("Report")
    curves = [str(results / f"{t}__{PLANS}__{configuration}" / f"fold_{args.fold}" / "progress.png")
              for t in (landmark_trainer, plain_trainer)]
    report = write_report(report_folder, comparison["landmark_crossval"], comparison, curves,
                          comparison.get("qc_pngs", []),
                          title="nnunet-landmark demo on synthetic MM-WHS-like CT: LV segmentation and apex detection")
    text = report.read_text()
    intro = (f"Device `{args.device}`, configuration `{configuration}` of `{PLANS}`, landmark model `{landmark_trainer}`, "
             f"plain model `{plain_trainer}` (same optimizer and budget), fold {args.fold} of {args.folds}; "
             f"total time {time.time() - step.start:.0f} s.\n\n"
             f"## Unseen test set ({len(truth)} phantoms, `nnUNetv2_predict`)\n\n"
             + test_set_markdown(test_rows[landmark_trainer], test_rows[plain_trainer]) + "\n")
    heading = text.index("## Headline")
    report.write_text(text[:heading] + intro + text[heading:].replace("## Headline", "## Cross-validation fold: headline"))
    rows = test_rows[landmark_trainer]
    print(f"\nDone in {time.time() - step.start:.0f} s. Unseen phantoms: LV Dice {np.mean([r['dice'] for r in rows]):.3f}, "
          f"apex error {np.mean([r['error_model_mm'] for r in rows]):.2f} mm (mean-position baseline "
          f"{np.mean([r['error_mean_position_mm'] for r in rows]):.2f} mm, geometric tip "
          f"{np.mean([r['error_tip_mm'] for r in rows]):.2f} mm).\nReport: {report}")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    main()
