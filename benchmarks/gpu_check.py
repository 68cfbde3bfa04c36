"""GPU check: nnUNetTrainerLandmark against plain nnU-Net at MM-WHS size, with nnU-Net's CUDA defaults.

    bash benchmarks/gpu_check.sh             # install into .venv-gpu-check, then this script (one NVIDIA GPU)
    python benchmarks/gpu_check.py           # the same, in the current environment
    python benchmarks/gpu_check.py --dry-run # CPU: tiny phantoms and a small configuration (what the tests run)

Steps, all in one work folder: MM-WHS-size phantoms (512 x 512 x ~200 CT, random spacing and pose) ->
``nnUNetv2_convert_MMWHS`` -> ``nnUNetv2_plan_and_preprocess -pl nnUNetPlannerResEncM -c 3d_fullres`` ->
training iterations of both trainers, each in a fresh process, with nnU-Net's defaults (torch.compile on,
mixed precision, augmentation workers = nnU-Net's default capped to the cores): seconds per iteration after
warm-up, peak CUDA memory, time waiting for the data loader, dynamo compiles and recompiles, skipped GradScaler
steps, finite losses -> stock ``nnUNetv2_predict`` on the GPU for both (time ratio; landmark files for the
landmark model, none for plain) -> agreement of GPU and CPU heatmaps inside the region where nnU-Net's
sliding window is reliable, and of the landmarks decoded from them.

Prints one table (and writes it, with the raw numbers, to WORKDIR/gpu_check.json and .md); exits 1 when any
check fails. Performance targets (landmark / plain): iteration <= 1.03, peak memory <= 1.02, prediction <= 1.05;
they are enforced on a GPU only (a dry run reports them). The measurements that run in fresh processes are in
``gpu_check_workers.py``, the checks and the table in ``gpu_check_report.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from common import cpu_name, timed_console_script
from gpu_check_report import find_failures, ratio, render_table
from gpu_check_workers import DATASET, DATASET_ID, PLANS, worker_main

TRAINERS = (("plain", "nnUNetTrainer"), ("landmark", "nnUNetTrainerLandmark"))


def machine() -> str:
    """GPU first, then CPU, cores, Python, torch and nnunetv2: the header of the table."""
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import nnunetv2  # noqa: F401
    from importlib.metadata import version
    return (f"{gpu}; {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}, nnunetv2 {version('nnunetv2')}")


# ----------------------------------------------------------------------------------------------- data
def _one_phantom(args: tuple) -> list[str]:
    """Write phantom ``n`` into its own folder (processes run in parallel); its CSV rows."""
    folder, n, seed, size = args
    from nnunet_landmark.phantom_families import write_mmwhs_phantoms
    part = Path(folder) / f"part{n}"
    write_mmwhs_phantoms(part, 1, seed=seed + n, size=size, first_case=1001 + n, progress=False)
    for f in (part / "ct_train").iterdir():
        f.rename(Path(folder) / "ct_train" / f.name)
    rows = (part / "landmarks.csv").read_text().splitlines()
    shutil.rmtree(part)
    return rows


def write_phantoms(folder: Path, cases: int, size: str) -> None:
    """``cases`` phantoms written in parallel, one process each, into one MM-WHS-like folder."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "ct_train").mkdir(parents=True)
    jobs = [(str(folder), n, 11, size) for n in range(cases)]
    with ProcessPoolExecutor(max_workers=max(1, min(cases, os.cpu_count() or 1))) as pool:
        parts = list(pool.map(_one_phantom, jobs))
    header = parts[0][0]
    (folder / "landmarks.csv").write_text("\n".join([header] + [r for p in parts for r in p[1:]]) + "\n")


def prepare(workdir: Path, dry_run: bool, cases: int, env: dict, log: Path) -> str:
    """Phantoms -> converter -> ResEnc-M plans and preprocessing; the configuration to use."""
    from nnunet_landmark.phantom_dataset import prepare_phantom_dataset

    processes = max(1, min(8, os.cpu_count() or 1))
    dataset = prepare_phantom_dataset(
        env, DATASET_ID, workdir / "mmwhs", folds=cases, processes=processes, fingerprint_processes=processes,
        overwrite=True, small_configuration=dry_run, log=log,
        write_phantoms=lambda folder: write_phantoms(folder, cases, "tiny" if dry_run else "realistic"))
    return dataset.configuration or "3d_fullres"


def call_worker(args: list[str], env: dict, log: Path, timeout: float) -> dict:
    with open(log, "a") as f:
        f.write(f"\n$ worker {' '.join(args)}\n")
        f.flush()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *args],
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout)
        f.write(done.stdout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker {args[:2]} failed (exit {done.returncode}); the end of {log}:\n"
                           + log.read_text()[-4000:])
    return json.loads(lines[-1][len("RESULT "):])


def save_partial(workdir: Path, results: dict) -> None:
    """What is measured so far, so that a run stopped by a time limit still leaves its numbers."""
    (workdir / "gpu_check.json").write_text(json.dumps(results, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny phantoms, small configuration")
    parser.add_argument("--workdir", default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--cases", type=int, default=3, help="phantoms (default 3: fold 0 trains on 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 10; dry run 1)")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations (default 20; dry run 2)")
    parser.add_argument("--predict-cases", type=int, default=1, help="cases given to nnUNetv2_predict")
    parser.add_argument("--tta", action="store_true",
                        help="predict with test-time mirroring (8x the network time, the same for both models)")
    parser.add_argument("--resume", "--reuse-training", dest="resume", action="store_true",
                        help="keep the training measurements, models and finished predictions of an earlier "
                             "run in the same --workdir (--reuse-training: the older name)")
    parser.add_argument("--training-only", action="store_true",
                        help="stop after the training measurements (a later --resume measures the rest)")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return 0

    import torch
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; use --dry-run for the CPU check", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    cases = args.cases
    warmup = args.warmup if args.warmup is not None else (1 if dry else 10)
    timed = args.iterations or (2 if dry else 20)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nnunet_landmark_gpu_check_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "gpu_check.log"
    cores = os.cpu_count() or 1
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    workers = os.environ.get("nnUNet_n_proc_DA") or str(max(1, min(get_allowed_n_proc_DA(), cores - 1)))
    env = {"nnUNet_raw": str(workdir / "raw"), "nnUNet_preprocessed": str(workdir / "preprocessed"),
           "nnUNet_results": str(workdir / "results"), "nnUNet_n_proc_DA": workers}
    started = time.perf_counter()
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "device": device,
                     "dry_run": dry, "workdir": str(workdir)}
    seconds: dict = {}

    print(f"gpu_check: {results['machine']}\n  work folder {workdir}, log {log}", flush=True)
    t = time.perf_counter()
    configuration = prepare(workdir, dry, cases, env, log)
    seconds["data"] = time.perf_counter() - t
    print(f"  data ready ({seconds['data']:.0f} s): {cases} phantoms, configuration {configuration}", flush=True)

    train: dict = {}
    previous = workdir / "gpu_check.json"
    earlier = json.loads(previous.read_text()) if args.resume and previous.exists() else {}
    train.update(earlier.get("training", {}))  # a run stopped by a time limit: measure the rest
    results["training"] = train
    for label, trainer in TRAINERS:
        if label in train and Path(train[label]["output_folder"], "checkpoint_final.pth").is_file():
            print(f"  {label}: reusing {train[label]['seconds_per_iteration']:.3f} s/iteration from {previous}")
            continue
        t = time.perf_counter()
        save_partial(workdir, results)
        train[label] = call_worker(["train", trainer, configuration, device, str(warmup), str(timed)], env, log,
                                   timeout=1800)
        seconds[f"train_{label}"] = time.perf_counter() - t
        print(f"  {label}: {train[label]['seconds_per_iteration']:.3f} s/iteration "
              f"({seconds[f'train_{label}']:.0f} s with start-up and compile)", flush=True)

    if args.training_only:
        save_partial(workdir, results)
        print(f"  training measured; the rest with --resume --workdir {workdir}", flush=True)
        return 0

    inputs = workdir / "predict_in"
    inputs.mkdir(exist_ok=True)
    images = sorted((workdir / "raw" / DATASET / "imagesTr").glob("*_0000.nii.gz"))[-args.predict_cases:]
    for image in images:
        if not (inputs / image.name).exists():
            (inputs / image.name).symlink_to(image)
    prediction = {}
    results["prediction"] = prediction
    save_partial(workdir, results)
    for label, trainer in TRAINERS:
        out = workdir / f"predicted_{label}"
        done = earlier.get("prediction", {}).get(label)
        if done and earlier.get("prediction_tta") == bool(args.tta) and earlier.get("prediction_cases") == len(images):
            prediction[label] = done
            print(f"  nnUNetv2_predict {label}: reusing {done['seconds']:.1f} s from {previous}", flush=True)
            continue
        shutil.rmtree(out, ignore_errors=True)
        prediction[label] = {"seconds": timed_console_script(
            ["nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c",
             configuration, "-f", "0", "-tr", trainer, "-p", PLANS, "-chk", "checkpoint_final.pth", "-device",
             device] + (["-npp", "1", "-nps", "1"] if dry else []) + ([] if args.tta else ["--disable_tta"]), env,
            log)}
        cases_out = [p.name[:-len("_0000.nii.gz")] for p in images]
        prediction[label]["segmentations"] = sum((out / f"{c}.nii.gz").is_file() for c in cases_out)
        prediction[label]["markups"] = sum((out / f"{c}.mrk.json").is_file() for c in cases_out)
        prediction[label]["landmark_table"] = (out / "landmarks.csv").is_file()
        print(f"  nnUNetv2_predict {label}: {prediction[label]['seconds']:.1f} s", flush=True)
        results["prediction_cases"] = len(images)
        results["prediction_tta"] = bool(args.tta)
        save_partial(workdir, results)
    results["prediction"] = prediction
    results["prediction_cases"] = len(images)
    results["prediction_tta"] = bool(args.tta)

    csv_rows = (workdir / "mmwhs" / "landmarks.csv").read_text().splitlines()[1:]
    case = images[0].name[:-len("_0000.nii.gz")]
    apex = next(r.split(",") for r in csv_rows if r.startswith(case + ",apex,"))
    mitral = next(r.split(",") for r in csv_rows if r.startswith(case + ",mitral_valve,"))
    centre = ((np.asarray(apex[2:5], float) + np.asarray(mitral[2:5], float)) / 2).tolist()
    save_partial(workdir, results)
    t = time.perf_counter()
    devices = ["cuda", "cpu"] if not dry else ["cpu", "cpu"]
    results["agreement"] = call_worker(["agreement", configuration, str(images[0]), json.dumps(centre),
                                        json.dumps(devices)], env, log, timeout=900)
    seconds["agreement"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    results["seconds"] = seconds

    results["ratios"] = {
        "iteration": ratio(train["landmark"]["seconds_per_iteration"], train["plain"]["seconds_per_iteration"]),
        "memory": ratio(train["landmark"]["peak_cuda_memory_mib"], train["plain"]["peak_cuda_memory_mib"]),
        "prediction": ratio(prediction["landmark"]["seconds"], prediction["plain"]["seconds"]),
    }
    failures = find_failures(results)
    results["failures"] = failures
    table = render_table(results, configuration, PLANS, warmup, timed)
    save_partial(workdir, results)
    (workdir / "gpu_check.md").write_text(table)
    print("\n" + table, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
