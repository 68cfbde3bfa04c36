"""Heatmap ablation: which training choices make the apex heatmap learn within a short (CPU) budget.

    python benchmarks/heatmap_ablation.py --workdir /tmp/ablation                    # all variants, ~8 min each
    python benchmarks/heatmap_ablation.py --variants paper deep_supervision beta100

The learning test's setting: 20 phantoms of 64 x 64 x 48 voxels (~3.4 mm), fold 0 of 10 (18 training cases),
``nnUNetTrainerLandmark_cpu_learn``'s budget (40 x 50 iterations, Adam 1e-3, 32^3 patches, no mirroring; each
variant sets its own loss weight and options on top), one
training run per variant. Each model predicts 20 phantoms no model has seen (no TTA) and is decoded exactly as
``nnUNetv2_predict`` decodes (``decode_landmarks``). Also reported: the heatmap value at the true apex and the
smallest predicted value (how blunt the learned distance map is). Writes ABLATION.md (or --output) and JSON.
Training runs vary from run to run (random augmentation, worker timing): treat differences under ~1 mm as noise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DATASET_ID, NAME, PLANS, CONFIG = 870, "AblationPhantoms", "nnUNetResEncUNetMPlans", "3d_cpu"

# name -> (description, attributes set on top of nnUNetTrainerLandmark_cpu_learn)
VARIANTS = {
    "paper": ("paper's loss: MSE on the full-resolution output only, beta 10",
              dict(heatmap_deep_supervision=False, heatmap_loss_weight=10.0)),
    "deep_supervision": ("+ heatmap deep supervision (nnU-Net's weights), beta 10",
                         dict(heatmap_deep_supervision=True, heatmap_loss_weight=10.0)),
    "beta100": ("+ deep supervision, beta 100", dict(heatmap_deep_supervision=True, heatmap_loss_weight=100.0)),
    "beta300": ("+ deep supervision, beta 300", dict(heatmap_deep_supervision=True, heatmap_loss_weight=300.0)),
    "landmark_oversampling": ("deep supervision, beta 10, 33% of patches centred near the apex",
                              dict(heatmap_deep_supervision=True, heatmap_loss_weight=10.0,
                                   landmark_oversample_percent=0.33)),
    "bce": ("deep supervision, beta 10, soft-target cross-entropy instead of MSE",
            dict(heatmap_deep_supervision=True, heatmap_loss_weight=10.0, heatmap_loss="bce")),
}

TRAINER_MODULE = '''import torch
from nnunet_landmark.training.variants.cpu_budgets import nnUNetTrainerLandmark_cpu_learn


def _variant(name, settings):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        nnUNetTrainerLandmark_cpu_learn.__init__(self, plans, configuration, fold, dataset_json, device)
        for key, value in settings.items():
            setattr(self, key, value)
    return type(name, (nnUNetTrainerLandmark_cpu_learn,), {"__init__": __init__})


'''


def trainer_name(variant: str) -> str:
    return f"nnUNetTrainerLandmarkAblation_{variant}"


def prepare(workdir: Path, env: dict) -> Path:
    from nnunet_landmark.phantom_dataset import prepare_phantom_dataset

    return prepare_phantom_dataset(env, DATASET_ID, workdir / "mmwhs", name=NAME, landmarks=["apex"], folds=10,
                                   num_cases=20, seed=4, size=(64, 64, 48), flips=False, phantom_progress=False,
                                   small_configuration={"name": CONFIG}).raw


def evaluate(model_folder: Path, test_root: Path, truth: dict) -> dict:
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    from nnunet_landmark.evaluation.metrics import landmark_error_mm
    from nnunet_landmark.geometry import CaseGeometry
    from nnunet_landmark.inference import decode_landmarks
    from nnunet_landmark.predictor import nnUNetLandmarkPredictor

    predictor = nnUNetLandmarkPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                                        allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), (0,), "checkpoint_final.pth")
    heads = predictor.landmark_heads
    errors, at_truth, minimum = [], [], []
    for case, landmarks in truth.items():
        image, properties = SimpleITKIO().read_images([str(test_root / "ct_train" / f"{case}_image.nii.gz")])
        item = next(PreprocessAdapterFromNpy([image], [None], [properties], [None], predictor.plans_manager,
                                             predictor.dataset_json, predictor.configuration_manager, 1))
        logits = predictor.predict_logits_from_preprocessed_data(item["data"]).float().numpy()
        heatmap_logits = logits[heads.num_segmentation_heads:]
        decoded = decode_landmarks(heatmap_logits, item["data_properties"], predictor.plans_manager,
                                   predictor.configuration_manager, heads, case)
        errors.append(landmark_error_mm(decoded["apex"]["world"], landmarks["apex"]))
        geometry = CaseGeometry.from_nnunet(item["data_properties"], predictor.plans_manager.transpose_forward,
                                            predictor.configuration_manager.spacing)
        heatmap = 1 / (1 + np.exp(-heatmap_logits[0].astype(np.float64)))
        voxel = np.clip(np.round(geometry.world_to_preprocessed(landmarks["apex"])).astype(int), 0,
                        np.asarray(heatmap.shape) - 1)
        at_truth.append(float(heatmap[tuple(voxel)]))
        minimum.append(float(heatmap.min()))
    return {"errors_mm": errors, "heatmap_at_truth": at_truth, "heatmap_minimum": minimum}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--unseen", type=int, default=20, help="number of unseen test phantoms")
    parser.add_argument("--output", type=Path, default=HERE / "ABLATION.md")
    args = parser.parse_args(argv)

    from nnunet_landmark.phantoms import write_mmwhs_phantoms

    workdir = args.workdir.resolve()
    trainers = workdir / "trainers"
    trainers.mkdir(parents=True, exist_ok=True)
    (trainers / "ablation_trainers.py").write_text(TRAINER_MODULE + "".join(
        f"{trainer_name(v)} = _variant({trainer_name(v)!r}, {VARIANTS[v][1]!r})\n" for v in VARIANTS))
    env = {"nnUNet_raw": str(workdir / "nnUNet_raw"), "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
           "nnUNet_results": str(workdir / "nnUNet_results"), "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "2"),
           "nnUNet_def_n_proc": "2", "nnUNet_extTrainer": str(trainers)}
    os.environ.update(env)
    raw = prepare(workdir, env)
    truth = write_mmwhs_phantoms(workdir / "unseen", num_cases=args.unseen, seed=91, size=(64, 64, 48), flips=False,
                                 first_case=3001, progress=False)

    from nnunet_landmark.evaluation.baselines import fit_mean_positions
    from nnunet_landmark.evaluation.metrics import landmark_error_mm
    from nnunet_landmark.geometry import ImageGeometry
    from nnunet_landmark.phantom_dataset import run_console_script
    from nnunet_landmark.results_folder import results_folder
    train_cases = json.loads((raw / "splits_final.json").read_text())[0]["train"]
    baseline = fit_mean_positions(raw, train_cases, ["apex"])["apex"]
    baseline_errors = [landmark_error_mm(baseline.predict(ImageGeometry.from_file(
        workdir / "unseen" / "ct_train" / f"{case}_image.nii.gz")), lm["apex"]) for case, lm in truth.items()]

    results = {}
    for variant in args.variants:
        trainer = trainer_name(variant)
        model = results_folder(raw.name, trainer, PLANS, CONFIG)
        start = time.perf_counter()
        if not (model / "fold_0" / "checkpoint_final.pth").exists():
            run_console_script(["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", trainer, "-p", PLANS, "-device",
                                "cpu"], env)
        results[variant] = {"description": VARIANTS[variant][0], "train_seconds": time.perf_counter() - start,
                            **evaluate(model, workdir / "unseen", truth)}
        print(variant, f"{np.mean(results[variant]['errors_mm']):.2f} mm", flush=True)

    lines = ["# Heatmap ablation on phantoms", "", f"Produced by `python benchmarks/heatmap_ablation.py`. "
             f"{args.unseen} unseen phantoms, one training run per variant (run-to-run spread ~1-2 mm).", "",
             "| variant | what | apex error mean (mm) | median | max | heatmap at true apex | heatmap minimum |",
             "|---|---|---|---|---|---|---|"]
    for variant, r in results.items():
        e = np.asarray(r["errors_mm"])
        lines.append(f"| {variant} | {r['description']} | {e.mean():.2f} | {np.median(e):.2f} | {e.max():.2f} | "
                     f"{np.mean(r['heatmap_at_truth']):.3f} | {np.mean(r['heatmap_minimum']):.3f} |")
    b = np.asarray(baseline_errors)
    lines.append(f"| mean position | the training cases' mean apex, relative to the image centre | {b.mean():.2f} | "
                 f"{np.median(b):.2f} | {b.max():.2f} | | |")
    args.output.write_text("\n".join(lines) + "\n")
    args.output.with_suffix(".json").write_text(json.dumps({"variants": results, "mean_position_mm": baseline_errors},
                                                           indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
