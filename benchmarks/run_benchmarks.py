"""Benchmarks: nnunet-landmark against plain nnU-Net, measured in the same run on the same machine.

    python benchmarks/run_benchmarks.py            # CPU: small phantoms, a small configuration
    python benchmarks/run_benchmarks.py --gpu      # CUDA: the real ResEnc-M 3d_fullres plans

Reports ratios (landmark / plain) for: training iteration time and peak memory (same plans, batch and data),
data loader throughput (with heatmap rendering / without), end-to-end ``nnUNetv2_predict`` time (with landmark
export / plain), and the landmark decode time on a 512 x 512 x 300 volume. Writes benchmarks/results/RESULTS.md
(or --output). These are measurements, not tests: nothing here fails on a number.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import RESULTS_MD, machine, sections, timed_console_script

DATASET_ID = 899
DATASET = "Dataset899_MMWHS_LVApex"
PLANS = "nnUNetResEncUNetMPlans"


def prepare(workdir: Path, gpu: bool, cases: int) -> tuple[dict, str]:
    from nnunet_landmark.cpu_plans import add_small_configuration, patch_size_for
    from nnunet_landmark.phantom_dataset import prepare_phantom_dataset

    env = {"nnUNet_raw": str(workdir / "raw"), "nnUNet_preprocessed": str(workdir / "preprocessed"),
           "nnUNet_results": str(workdir / "results"), "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "2"),
           "nnUNet_def_n_proc": "2", "nnUNet_compile": "0"}
    plans_file = prepare_phantom_dataset(env, DATASET_ID, workdir / "mmwhs", folds=5, num_cases=cases, seed=5,
                                         size="small" if gpu else "tiny", flips=False,
                                         small_configuration=False).plans_file
    if gpu:
        return env, "3d_fullres"
    # a wider network than the tests' 3d_cpu, on a patch covering the whole (tiny) image
    median = json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["median_image_size_in_voxels"]
    add_small_configuration(plans_file, name="3d_cpu", patch_size=patch_size_for(median),
                            features_per_stage=(16, 32, 64, 128), batch_size=2)
    return env, "3d_cpu"


ITERATION_SCRIPT = r'''
import json, resource, sys, time, torch, os
from nnunetv2.run.run_training import get_trainer_from_args
def main():
    trainer_name, configuration, device, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    trainer = get_trainer_from_args("{dataset}", configuration, 0, trainer_name, "{plans}", device=torch.device(device))
    trainer.initialize()
    os.environ["nnUNet_n_proc_DA"] = "0"
    train, _ = trainer.get_dataloaders()
    batch = next(train)
    trainer.network.train()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        trainer.train_step(batch)
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({{"seconds_per_iteration": seconds, "peak_memory_mib": peak,
                      "memory_kind": "CUDA max allocated" if device == "cuda" else "process peak RSS"}}))
if __name__ == "__main__":
    main()
'''


def iteration_benchmark(env: dict, configuration: str, device: str, steps: int, workdir: Path) -> dict:
    script = workdir / "iteration.py"
    script.write_text(ITERATION_SCRIPT.format(dataset=DATASET_ID, plans=PLANS))
    results = {}
    for label, trainer in (("landmark", "nnUNetTrainerLandmark"), ("plain", "nnUNetTrainer")):
        runs = []
        for _ in range(2):  # alternate-free repeat; keep the faster (less disturbed) run
            out = subprocess.run([sys.executable, str(script), trainer, configuration, device, str(steps)],
                                 env={**os.environ, **env, "nnUNet_results": str(workdir / "iter_results")},
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[label] = min(runs, key=lambda r: r["seconds_per_iteration"])
    return results


def data_loader_benchmark(env: dict, configuration: str, batches: int) -> dict:
    """Batches per second of the training loader with the full default augmentation, single-threaded."""
    import torch
    os.environ.update(env)
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_landmark import nnunet_integration

    trainer = get_trainer_from_args(str(DATASET_ID), configuration, 0, "nnUNetTrainerLandmark", PLANS,
                                    device=torch.device("cpu"))
    trainer.initialize()
    os.environ["nnUNet_n_proc_DA"] = "0"
    landmark_loader, _ = trainer.get_dataloaders()
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    with nnunet_integration.data_loader_class(nnUNetDataLoader):
        plain_loader, _ = super(type(trainer), trainer).get_dataloaders()
    results = {}
    for repeat in range(2):
        for label, loader in (("plain", plain_loader), ("landmark", landmark_loader)):
            np.random.seed(repeat)
            torch.manual_seed(repeat)
            next(loader)
            start = time.perf_counter()
            for _ in range(batches):
                next(loader)
            rate = batches / (time.perf_counter() - start)
            results[label] = max(results.get(label, 0.0), rate)
    # where the time goes at MM-WHS size: benchmarks/loader_scale.py
    return {"landmark": {"batches_per_second": results["landmark"]},
            "plain": {"batches_per_second": results["plain"]}}


def prediction_benchmark(env: dict, configuration: str, device: str, workdir: Path, cases: int) -> dict:
    """Wall time of nnUNetv2_predict (model loading included) for a landmark and a plain model of the same size."""
    from nnunet_landmark.results_folder import results_folder

    inputs = workdir / "predict_in"
    inputs.mkdir(exist_ok=True)
    images = sorted((Path(env["nnUNet_raw"]) / DATASET / "imagesTr").glob("*_0000.nii.gz"))[:cases]
    for image in images:
        if not (inputs / image.name).exists():
            (inputs / image.name).symlink_to(image)
    results = {}
    for label, trainer in (("landmark", "nnUNetTrainerLandmark_cpu_smoke"), ("plain", "nnUNetTrainer_cpu_smoke")):
        folder = results_folder(DATASET, trainer, PLANS, configuration, 0, results=env["nnUNet_results"])
        if not (folder / "checkpoint_final.pth").exists():
            timed_console_script(["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", trainer, "-p",
                                  PLANS, "-device", device], env)
    for tta in (False, True):
        for repeat in range(2):
            for label, trainer in (("plain", "nnUNetTrainer_cpu_smoke"), ("landmark", "nnUNetTrainerLandmark_cpu_smoke")):
                out = workdir / f"predict_{label}_{tta}_{repeat}"
                seconds = timed_console_script(
                    ["nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", configuration,
                     "-f", "0", "-tr", trainer, "-p", PLANS, "-device", device, "-npp", "1", "-nps", "1"]
                    + ([] if tta else ["--disable_tta"]), env)
                key = f"{label}_{'tta' if tta else 'no_tta'}"
                results[key] = min(results.get(key, np.inf), seconds)
    return results


def decode_benchmark() -> dict:
    from nnunet_landmark.heatmap_targets import HeatmapEncoding, render_heatmaps
    from nnunet_landmark.heatmap_decoding import decode_heatmap

    shape = (300, 512, 512)
    encoding = HeatmapEncoding("log_distance", max_distance_mm=300.0, scale_mm=20.0)
    heatmap = render_heatmaps(shape, np.array([[151.3, 260.7, 240.2]]), (0.7, 0.5, 0.5), encoding)[0]
    heatmap += np.random.default_rng(0).normal(0, 0.01, shape).astype(np.float32)
    results = {}
    for method in ("extremum", "consistent"):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            decoded = decode_heatmap(heatmap, encoding, (0.7, 0.5, 0.5), method=method)
            times.append(time.perf_counter() - start)
        results[method] = {"seconds": min(times), "position": decoded.position.round(2).tolist()}
    return results


def write_results(path: Path, results: dict) -> None:
    it, dl, pr, de = results["iteration"], results["data_loader"], results["prediction"], results["decode"]
    lines = [
        "# Benchmarks: nnunet-landmark against plain nnU-Net", "",
        f"Machine: {results['machine']}  ", f"Date: {results['date']}  ",
        f"Configuration: `{results['configuration']}` of `{PLANS}` ({results['configuration_note']}), "
        f"device `{results['device']}`. Produced by `python benchmarks/run_benchmarks.py"
        f"{' --gpu' if results['device'] == 'cuda' else ''}`.", "",
        "| what | landmark | plain nnU-Net | ratio landmark/plain | target |", "|---|---|---|---|---|",
        f"| training iteration (s) | {it['landmark']['seconds_per_iteration']:.3f} | "
        f"{it['plain']['seconds_per_iteration']:.3f} | "
        f"{it['landmark']['seconds_per_iteration'] / it['plain']['seconds_per_iteration']:.3f} | <= 1.05 |",
        f"| peak memory (MiB, {it['landmark']['memory_kind']}) | {it['landmark']['peak_memory_mib']:.0f} | "
        f"{it['plain']['peak_memory_mib']:.0f} | "
        f"{it['landmark']['peak_memory_mib'] / it['plain']['peak_memory_mib']:.3f} | <= 1.05 |",
        f"| data loader (batches/s, full augmentation, 1 thread) | {dl['landmark']['batches_per_second']:.2f} | "
        f"{dl['plain']['batches_per_second']:.2f} | "
        f"{dl['plain']['batches_per_second'] / dl['landmark']['batches_per_second']:.3f} (time per batch) | <= 1.10 |",
    ]
    for tta in ("no_tta", "tta"):
        lines.append(f"| `nnUNetv2_predict` {results['prediction_cases']} cases, {tta.replace('_', ' ')} (s) | "
                     f"{pr[f'landmark_{tta}']:.1f} | {pr[f'plain_{tta}']:.1f} | "
                     f"{pr[f'landmark_{tta}'] / pr[f'plain_{tta}']:.3f} | <= 1.05 |")
    bd = dl.get("breakdown_ms_per_batch")
    if bd:
        extra = 1000 / dl["landmark"]["batches_per_second"] - 1000 / dl["plain"]["batches_per_second"]
        lines += ["", f"Where the data loader's extra {extra:.1f} ms per batch go (same samples, same random draws): "
                  f"rendering the heatmaps {bd['render']:.1f} ms; the augmentation with the heatmap as an extra "
                  f"`regression_target` {bd['augmentation_with_heatmap']:.1f} ms against "
                  f"{bd['augmentation_without_heatmap']:.1f} ms without it (+"
                  f"{bd['augmentation_with_heatmap'] - bd['augmentation_without_heatmap']:.1f} ms: the heatmap is one "
                  f"more channel through the spatial transform's interpolation). In training the loader runs in "
                  f"background workers; the training iteration ratio above is what a user waits for."]
    lines += ["", "Landmark decoding of one 512 x 512 x 300 heatmap (log-distance, noisy):", "",
              "| method | seconds | target |", "|---|---|---|"]
    for method, r in de.items():
        lines.append(f"| {method} | {r['seconds']:.3f} | < 1 |")
    lines += ["", "Raw numbers:", "", "```json", json.dumps(results, indent=1), "```", ""]
    kept = sections(path)  # e.g. the accuracy study's table, which accuracy_study.py owns
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="benchmark on CUDA with the real 3d_fullres plans")
    parser.add_argument("--workdir", default=None, help="keep data and models here (default: a temporary folder)")
    parser.add_argument("--output", default=str(RESULTS_MD))
    parser.add_argument("--steps", type=int, default=10, help="timed training iterations per trainer")
    parser.add_argument("--batches", type=int, default=20, help="timed data loader batches per loader")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nnunet_landmark_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if args.gpu else "cpu"
    env, configuration = prepare(workdir, args.gpu, cases=10)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "device": device,
               "configuration": configuration,
               "configuration_note": "real ResEnc-M plans" if args.gpu else
               "ResEnc, 16-128 features, whole-image patch, batch 2, tiny phantoms"}
    print("training iterations ...", flush=True)
    results["iteration"] = iteration_benchmark(env, configuration, device, args.steps, workdir)
    print("data loader ...", flush=True)
    results["data_loader"] = data_loader_benchmark(env, configuration, args.batches)
    print("prediction ...", flush=True)
    results["prediction_cases"] = 4
    results["prediction"] = prediction_benchmark(env, configuration, device, workdir, 4)
    print("decoding ...", flush=True)
    results["decode"] = decode_benchmark()
    write_results(Path(args.output), results)
    print(Path(args.output).read_text())


if __name__ == "__main__":
    main()
