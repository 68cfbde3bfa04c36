"""Accuracy study: the paper's protocol (k-fold cross-validation, LV Dice + apex error) on synthetic phantoms.

    python benchmarks/accuracy_study.py --folds 0 1            # CPU, ~15 minutes per fold
    python benchmarks/accuracy_study.py --folds 0 1 2 3 4 5 6 7 8 9 --device cuda

20 phantoms in the MM-WHS layout -> nnUNetv2_convert_MMWHS (10 folds, 18 train / 2 held out) -> plans -> per fold,
with the same budget and optimizer: the landmark model with the paper's log-distance heatmaps, the same with Gaussian
heatmaps, and plain nnU-Net. For every held-out case it reports the LV Dice and the apex error of:

* the log-distance heatmap, decoded by argmin with and without sub-voxel refinement, and by the "consistent"
  decoder (the local minimum the whole distance map agrees with best),
* the Gaussian heatmap, decoded by argmax with and without sub-voxel refinement,
* the geometric tip of the predicted LV (largest component, long axis, tapered end) of plain nnU-Net and of the
  landmark model,
* the mean apex position of the fold's training cases.

Writes benchmarks/results/ACCURACY_crossval.md (tables; ``--output``) with accuracy_errors.png (box plot) and
accuracy_rows.json (the raw numbers) beside it, and the section "accuracy-study" of benchmarks/results/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from common import RESULTS_DIR, RESULTS_MD, write_section

DATASET_ID = 860
DATASET = "Dataset860_MMWHSStudy"
PLANS = "nnUNetResEncUNetMPlans"
MODELS = {  # name: (cpu trainer, cuda trainer)
    "log_distance": ("nnUNetTrainerLandmark_cpu_learn", "nnUNetTrainerLandmark_250epochs"),
    "gaussian": ("nnUNetTrainerLandmarkGaussian_cpu_learn", "nnUNetTrainerLandmarkGaussian"),
    "plain": ("nnUNetTrainer_cpu_learn", "nnUNetTrainer_250epochs"),
}


def decode_variants(predictor, case_data, properties, heads) -> dict:
    """World apex positions of one case for every decoder variant of the model's encoding."""
    from nnunet_landmark.geometry import CaseGeometry
    from nnunet_landmark.heatmap_decoding import decode_heatmap
    from nnunet_landmark.landmark_export import reliable_sliding_window_region

    import torch
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(case_data)).float().numpy()
    heatmap = logits[heads.num_segmentation_heads]
    geometry = CaseGeometry.from_nnunet(properties, predictor.plans_manager.transpose_forward,
                                        predictor.configuration_manager.spacing)
    valid = reliable_sliding_window_region(heatmap.shape, predictor.configuration_manager.patch_size)
    variants = {"refined": dict(refine=True), "voxel": dict(refine=False)}
    if heads.encoding.kind == "log_distance":
        variants["consistent"] = dict(refine=True, method="consistent")
    out = {}
    for name, kwargs in variants.items():
        decoded = decode_heatmap(heatmap, heads.encoding, geometry.preprocessed_spacing, already_sigmoid=False,
                                 valid=valid, **kwargs)
        out[name] = geometry.preprocessed_to_world(decoded.position)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=str(RESULTS_DIR / "ACCURACY_crossval.md"))
    args = parser.parse_args()

    import torch
    from nnunet_landmark.demo import PROGRESS
    from nnunet_landmark.evaluation.baselines import apex_from_segmentation, fit_mean_positions
    from nnunet_landmark.metrics import dice, landmark_error_mm
    from nnunet_landmark.geometry import ImageGeometry
    from nnunet_landmark.landmark_files import read_markups
    from nnunet_landmark.phantom_dataset import prepare_phantom_dataset, run_console_script
    from nnunet_landmark.results_folder import results_folder

    work = Path(args.workdir or tempfile.mkdtemp(prefix="nnunet_landmark_study_"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "study_log.txt"
    env = {"nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results"), "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "2"),
           "nnUNet_def_n_proc": "2"}
    os.environ.update(env)
    configuration = "3d_cpu" if args.device == "cpu" else "3d_fullres"
    trainer_index = 0 if args.device == "cpu" else 1
    start = time.time()
    run = partial(run_console_script, env=env, log=log, progress=PROGRESS, echo=True)
    # the apex annotated by its sphere masks (MM-WHS-style), 10 folds
    raw = prepare_phantom_dataset(env, DATASET_ID, work / "mmwhs", name="MMWHSStudy", num_cases=20, seed=860,
                                  size=(64, 64, 48) if args.device == "cpu" else "small", flips=False,
                                  annotations=[str(work / "mmwhs" / "apex")], small_configuration=args.device == "cpu",
                                  log=log, progress=PROGRESS, echo=True).raw
    splits = json.loads((raw / "splits_final.json").read_text())

    def model(name: str) -> Path:
        return results_folder(DATASET, MODELS[name][trainer_index], PLANS, configuration)

    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_landmark.predictor import nnUNetLandmarkPredictor

    rows = []
    for fold in args.folds:
        for name, trainers in MODELS.items():
            trainer = trainers[trainer_index]
            if not (model(name) / f"fold_{fold}" / "validation" / "summary.json").exists():
                print(f"fold {fold}: training {trainer} ({time.time() - start:.0f} s)", flush=True)
                run(["nnUNetv2_train", str(DATASET_ID), configuration, str(fold), "-tr", trainer, "-p", PLANS,
                     "-device", args.device])
        train_cases, val_cases = splits[fold]["train"], splits[fold]["val"]
        baseline = fit_mean_positions(raw, train_cases, ["apex"])["apex"]
        decoded = {}
        for name in ("log_distance", "gaussian"):
            folder = model(name)
            predictor = nnUNetLandmarkPredictor(use_mirroring=False, device=torch.device(args.device),
                                                allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(folder), (fold,), "checkpoint_final.pth")
            data_folder = Path(env["nnUNet_preprocessed"]) / DATASET / predictor.configuration_manager.data_identifier
            dataset = infer_dataset_class(str(data_folder))(str(data_folder), val_cases)
            for case in val_cases:
                data, _, _, properties = dataset.load_case(case)
                decoded[(name, case)] = decode_variants(predictor, np.asarray(data[:]), properties,
                                                        predictor.landmark_heads)
        for case in val_cases:
            import SimpleITK as sitk
            truth = read_markups(raw / "landmarksTr" / f"{case}.mrk.json")["apex"]
            geometry = ImageGeometry.from_file(raw / "imagesTr" / f"{case}_0000.nii.gz")
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz"))) == 1
            row = {"fold": fold, "case": case, "mean_position": landmark_error_mm(baseline.predict(geometry), truth)}
            for name in MODELS:
                folder = model(name) / f"fold_{fold}"
                segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "validation" / f"{case}.nii.gz")))
                row[f"dice_{name}"] = dice(reference, segmentation == 1)
                row[f"tip_{name}"] = landmark_error_mm(apex_from_segmentation(segmentation, geometry, 1), truth)
            for (name, c), variants in decoded.items():
                if c == case:
                    for variant, point in variants.items():
                        row[f"{name}_{variant}"] = landmark_error_mm(point, truth)
            rows.append(row)
            print(json.dumps(row), flush=True)

    columns = [("log_distance_refined", "log-distance heatmap, argmin + sub-voxel refinement (default)"),
               ("log_distance_voxel", "log-distance heatmap, argmin voxel (no refinement)"),
               ("log_distance_consistent", "log-distance heatmap, consistent decoder + refinement"),
               ("gaussian_refined", "Gaussian heatmap, argmax + sub-voxel refinement"),
               ("gaussian_voxel", "Gaussian heatmap, argmax voxel (no refinement)"),
               ("tip_plain", "geometric tip of plain nnU-Net's predicted LV"),
               ("tip_log_distance", "geometric tip of the landmark model's predicted LV"),
               ("mean_position", "mean apex position of the training cases")]
    from nnunet_landmark.metrics import format_summary

    lines = ["# Accuracy study on synthetic phantoms (the paper's protocol)", "",
             f"{len(rows)} held-out phantoms in folds {args.folds} of 10 (18 training / 2 held out each), "
             f"device `{args.device}`, configuration `{configuration}`, trainers "
             f"{', '.join(f'`{t[trainer_index]}`' for t in MODELS.values())} (same optimizer and budget). "
             f"Total time {time.time() - start:.0f} s. Produced by `python benchmarks/accuracy_study.py "
             f"--folds {' '.join(map(str, args.folds))}`.", "",
             "| apex localisation | mean ± SD (mm) | median | max |", "|---|---|---|---|"]
    for key, label in columns:
        v = np.asarray([r[key] for r in rows])
        lines.append(f"| {label} | {format_summary(v, 'mean_sd')} | {np.median(v):.2f} | {v.max():.2f} |")
    lines += ["", "| LV Dice | mean ± SD | min |", "|---|---|---|"]
    for name in MODELS:
        v = np.asarray([r[f"dice_{name}"] for r in rows])
        lines.append(f"| {name} | {format_summary(v, 'mean_sd', 3)} | {v.min():.3f} |")
    lines += ["", "Per held-out case (mm unless Dice):", "", "| fold | case | " + " | ".join(k for k, _ in columns) +
              " | Dice log | Dice gauss | Dice plain |", "|" + "---|" * (len(columns) + 5)]
    for r in rows:
        lines.append(f"| {r['fold']} | {r['case']} | " + " | ".join(f"{r[k]:.2f}" for k, _ in columns) +
                     f" | {r['dice_log_distance']:.3f} | {r['dice_gaussian']:.3f} | {r['dice_plain']:.3f} |")
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 5))
    ax.boxplot([[r[k] for r in rows] for k, _ in columns], showmeans=True)
    ax.set_xticks(range(1, len(columns) + 1), [k.replace("_", "\n") for k, _ in columns], fontsize=8)
    ax.set_ylabel("apex error (mm)")
    ax.set_title(f"Apex error on {len(rows)} held-out phantoms (folds {args.folds})")
    png = Path(args.output).with_name("accuracy_errors.png")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    lines += ["", f"![apex errors]({png.name})", ""]
    Path(args.output).write_text("\n".join(lines))
    # the summary tables also go into RESULTS.md, beside the speed benchmarks
    summary = lines[:lines.index("Per held-out case (mm unless Dice):")]
    write_section(RESULTS_MD, "accuracy-study",
                  "\n".join(["## " + summary[0].lstrip("# "), *summary[1:],
                             f"Per-case rows and the box plot: [{Path(args.output).name}]({Path(args.output).name})."]))
    Path(args.output).with_name("accuracy_rows.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
