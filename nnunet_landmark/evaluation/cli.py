"""Console scripts of the evaluation (registered in pyproject.toml):

* ``nnUNetv2_evaluate_landmarks``: one prediction folder against reference labels and landmarks;
* ``nnUNetv2_landmark_crossval_summary``: every fold of a trained configuration, the paper's Table 2;
* ``nnUNetv2_landmark_compare``: landmark model vs plain nnU-Net on the same folds, plots and report.

Every entry point takes an optional ``argv`` list (tests call them in-process). User errors end the
program with exit code 1 and a message that names the file and the fix.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from nnunet_landmark.evaluation.baselines import BaselineError
from nnunet_landmark.evaluation.folder import EvaluationError
from nnunet_landmark.landmark_files import LandmarkFileError

USER_ERRORS = (EvaluationError, LandmarkFileError, BaselineError, FileNotFoundError)


def _nnunet_folder(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        raise EvaluationError(f"${variable} is not set; point it at your nnU-Net {variable[7:]} folder "
                              f"(see nnU-Net's documentation/setting_up_paths.md)")
    return Path(value)


def _dataset_name(dataset: str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return str(maybe_convert_to_dataset_name(dataset))
    except (RuntimeError, ValueError) as e:
        raise EvaluationError(str(e)) from e


def _results_folder(dataset_name: str, trainer: str, plans: str, configuration: str) -> Path:
    from nnunet_landmark.results_folder import results_folder

    folder = results_folder(dataset_name, trainer, plans, configuration, results=_nnunet_folder("nnUNet_results"))
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: no trained model; check -tr/-p/-c (train with nnUNetv2_train "
                              f"{dataset_name} {configuration} FOLD -tr {trainer} -p {plans})")
    return folder


def _splits_file(raw_folder: Path, dataset_name: str, given: str | None) -> Path | None:
    if given:
        return Path(given)
    if (raw_folder / "splits_final.json").is_file():
        return None  # the default: the raw dataset's copy
    preprocessed = os.environ.get("nnUNet_preprocessed")
    if preprocessed and (Path(preprocessed) / dataset_name / "splits_final.json").is_file():
        return Path(preprocessed) / dataset_name / "splits_final.json"
    return None


def _learning_curves(results_folder: Path, folds: Sequence[int]) -> list[str]:
    return [str(results_folder / f"fold_{f}" / "progress.png") for f in folds
            if (results_folder / f"fold_{f}" / "progress.png").is_file()]


def _run(parser: argparse.ArgumentParser, function, args) -> None:
    try:
        function(args)
    except USER_ERRORS as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate_entry_point(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_evaluate_landmarks",
        description="Dice per label and landmark error (mm) per case of a prediction folder; writes PREFIX.json "
                    "(per case + summary: mean, SD, median, max) and PREFIX.csv (one row per case).")
    parser.add_argument("-pred", required=True, help="prediction folder (CASE.nii.gz, CASE.mrk.json, landmarks.csv)")
    parser.add_argument("-ref_labels", required=True, help="reference segmentations (e.g. the raw labelsTr folder)")
    parser.add_argument("-ref_landmarks", default=None,
                        help="reference landmarks: folder of CASE.mrk.json (e.g. landmarksTr) or a case,name,x,y,z "
                             "CSV (LPS mm); leave out to evaluate segmentations only")
    parser.add_argument("-dataset_json", default=None,
                        help="dataset.json giving labels, file ending and landmark names (default: the one in -pred "
                             "or beside -ref_labels)")
    parser.add_argument("-landmarks", nargs="+", default=None, help="landmark names (default: dataset.json's)")
    parser.add_argument("-labels", nargs="+", default=None, metavar="NAME=VALUE",
                        help="labels to evaluate, e.g. LV=1 (default: every foreground label of dataset.json)")
    parser.add_argument("-o", default=None, help="output prefix (default: PRED/landmark_evaluation)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def run(args):
        from nnunet_landmark.evaluation.folder import evaluate_folder

        labels = None
        if args.labels:
            try:
                labels = {k: int(v) for k, v in (item.split("=", 1) for item in args.labels)}
            except ValueError:
                parser.error(f"-labels expects NAME=VALUE pairs such as LV=1, got {args.labels}")
        prefix = args.o or str(Path(args.pred) / "landmark_evaluation")
        results = evaluate_folder(args.pred, args.ref_labels, args.ref_landmarks, labels, args.landmarks, prefix,
                                  args.dataset_json, progress=not args.no_progress)
        _print_summary(results)
        print(f"wrote {prefix}.json and {prefix}.csv")

    _run(parser, run, args)


def _print_summary(results) -> None:
    n = len(results["per_case"])
    for name, s in results["summary"]["dice"].items():
        print(f"Dice {name}: mean {s['mean']:.4f} SD {s['sd']:.4f} median {s['median']:.4f} (n={s['n']} of {n})")
    for name, s in results["summary"]["landmark_error_mm"].items():
        print(f"{name} error: mean {s['mean']:.2f} mm SD {s['sd']:.2f} median {s['median']:.2f} max {s['max']:.2f}")


# ---------------------------------------------------------------------------------------------- crossval
def _add_common(parser: argparse.ArgumentParser, trainer_default: str) -> None:
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-tr", default=trainer_default, help=f"trainer (default {trainer_default})")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-f", nargs="+", type=int, default=None,
                        help="folds (default: every fold_F with a validation folder)")
    parser.add_argument("--lv_label", type=int, default=1, help="nnU-Net label of the LV blood cavity (default 1)")
    parser.add_argument("--landmark", default="apex", help="landmark to report (default apex)")
    parser.add_argument("--labels", nargs="+", type=int, default=None, metavar="VALUE",
                        help="further labels to report beside --lv_label (Dice per label; default none)")
    parser.add_argument("--landmarks", nargs="+", default=None, metavar="NAME",
                        help="further landmarks to report beside --landmark (error and mean-position baseline per "
                             "landmark; default none)")
    parser.add_argument("--splits", default=None,
                        help="splits_final.json the models were trained with (default: the raw dataset's, else "
                             "$nnUNet_preprocessed/DATASET/splits_final.json)")
    parser.add_argument("--qc", action="store_true", help="also write a QC figure per case")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")


def crossval_entry_point(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_landmark_crossval_summary",
        description="Evaluate every fold's validation folder of a trained configuration against the raw dataset: "
                    "Dice and landmark error per held-out image (the paper's Table 2) with the geometric-tip and "
                    "mean-position baselines; writes JSON, CSV, Markdown and report.md.")
    _add_common(parser, "nnUNetTrainerLandmark")
    parser.add_argument("-o", default=None, help="output folder (default RESULTS/TRAINER__PLANS__CONFIG/crossval_summary)")
    args = parser.parse_args(argv)

    def run(args):
        from nnunet_landmark.evaluation.study.crossval import crossval_summary
        from nnunet_landmark.evaluation.study.report import write_report

        dataset_name = _dataset_name(args.d)
        raw = _nnunet_folder("nnUNet_raw") / dataset_name
        results_folder = _results_folder(dataset_name, args.tr, args.p, args.c)
        summary = crossval_summary(results_folder, raw, args.f, args.lv_label, args.landmark, args.o,
                                   _splits_file(raw, dataset_name, args.splits), args.qc, not args.no_progress,
                                   args.labels, args.landmarks)
        output = Path(summary["output_folder"])
        report = write_report(output, summary, None, _learning_curves(results_folder, summary["folds"]),
                              summary.get("qc_pngs", []))
        overall = summary["overall"]
        print(f"Dice mean {overall['dice']['mean']:.4f}, {args.landmark} error mean {overall['error_mm']['mean']:.2f} mm "
              f"(n={len(summary['per_case'])}); wrote {output / 'crossval_summary.md'} and {report}")

    _run(parser, run, args)


# ---------------------------------------------------------------------------------------------- compare
def compare_entry_point(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_landmark_compare",
        description="Compare the landmark model with plain nnU-Net trained on the same folds: paired Dice "
                    "differences with a Wilcoxon signed-rank test, landmark error of the model vs the geometric-tip "
                    "and mean-position baselines, plots, comparison.md and report.md.")
    _add_common(parser, "nnUNetTrainerLandmark")
    parser.add_argument("-tr_plain", default="nnUNetTrainer", help="plain trainer (default nnUNetTrainer)")
    parser.add_argument("-p_plain", default=None, help="plans of the plain model (default: same as -p)")
    parser.add_argument("-o", default=None,
                        help="output folder (default RESULTS/DATASET/comparison_TRAINER_vs_TRAINER_PLAIN__PLANS__CONFIG)")
    args = parser.parse_args(argv)

    def run(args):
        from nnunet_landmark.evaluation.study.compare import compare_to_plain
        from nnunet_landmark.evaluation.study.report import write_report

        dataset_name = _dataset_name(args.d)
        raw = _nnunet_folder("nnUNet_raw") / dataset_name
        landmark_folder = _results_folder(dataset_name, args.tr, args.p, args.c)
        plain_folder = _results_folder(dataset_name, args.tr_plain, args.p_plain or args.p, args.c)
        output = Path(args.o) if args.o else (landmark_folder.parent /
                                              f"comparison_{args.tr}_vs_{args.tr_plain}__{args.p}__{args.c}")
        comparison = compare_to_plain(landmark_folder, plain_folder, raw, output, args.f, args.lv_label,
                                      args.landmark, _splits_file(raw, dataset_name, args.splits), args.qc,
                                      not args.no_progress, args.labels, args.landmarks)
        report = write_report(output, comparison["landmark_crossval"], comparison,
                              _learning_curves(landmark_folder, comparison["folds"]), comparison.get("qc_pngs", []))
        dice = comparison["dice"]
        print(f"Dice landmark {dice['landmark']['mean']:.4f} vs plain {dice['plain']['mean']:.4f} "
              f"(Wilcoxon p={dice['wilcoxon']['p_value']}); wrote {output / 'comparison.md'} and {report}")

    _run(parser, run, args)
