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
they are enforced on a GPU only (a dry run reports them).
"""
from __future__ import annotations

import argparse
import json
import logging
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

DATASET_ID = 897
DATASET = "Dataset897_MMWHS_LVApex"
PLANS = "nnUNetResEncUNetMPlans"
TRAINERS = (("plain", "nnUNetTrainer"), ("landmark", "nnUNetTrainerLandmark"))
TARGETS = {"iteration": 1.03, "memory": 1.02, "prediction": 1.05}


def run(command: list[str], env: dict, log: Path) -> float:
    """Run a console script, its output appended to ``log``; seconds taken (``run_console_script``)."""
    from nnunet_landmark.phantom_dataset import run_console_script

    start = time.perf_counter()
    run_console_script(command, env, log=log)
    return time.perf_counter() - start


def machine() -> str:
    import torch
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import nnunetv2  # noqa: F401
    from importlib.metadata import version
    return (f"{gpu}; {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"nnunetv2 {version('nnunetv2')}")


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


# ------------------------------------------------------------------------------------------ training
def train_worker(trainer_name: str, configuration: str, device_name: str, warmup: int, timed: int) -> dict:
    """In a fresh process: nnU-Net's own start of training, then ``warmup + timed`` iterations as run_training
    runs them (next batch from the augmentation workers, train_step); the model is saved for prediction."""
    import torch
    import torch._dynamo.utils as dynamo_utils
    from nnunetv2.run.run_training import get_trainer_from_args

    recompiles = []

    class _Count(logging.Handler):
        def emit(self, record):
            recompiles.append(record.getMessage().splitlines()[0])

    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(_Count())

    device = torch.device(device_name)
    trainer = get_trainer_from_args(str(DATASET_ID), configuration, 0, trainer_name, PLANS, device=device)
    trainer.on_train_start()  # initialize (compile), nnU-Net's data loaders and augmentation workers
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    scale = (lambda: float(trainer.grad_scaler.get_scale())) if trainer.grad_scaler is not None else (lambda: None)
    waits, steps, losses, skipped = [], [], [], {"warmup": 0, "timed": 0}
    frames_after_warmup = None
    first_step_seconds = None
    for i in range(warmup + timed):
        if i == warmup:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            frames_after_warmup = dict(dynamo_utils.counters["frames"])
        before = scale()
        start = time.perf_counter()
        batch = next(trainer.dataloader_train)
        got = time.perf_counter()
        output = trainer.train_step(batch)
        sync()
        done = time.perf_counter()
        after = scale()
        if before is not None and after < before:  # GradScaler lowers its scale exactly when it skips a step
            skipped["warmup" if i < warmup else "timed"] += 1
        losses.append(float(np.asarray(output["loss"])))
        if i == 0:
            first_step_seconds = done - got
        if i >= warmup:
            waits.append(got - start)
            steps.append(done - got)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else float("nan")
    frames = dict(dynamo_utils.counters["frames"])
    graphs = int(dynamo_utils.counters["stats"].get("unique_graphs", 0))
    trainer.on_train_end()  # saves checkpoint_final.pth for prediction, stops the workers
    total = np.asarray(waits) + np.asarray(steps)
    return {"seconds_per_iteration": float(np.median(total)), "mean_seconds_per_iteration": float(total.mean()),
            "seconds_waiting_for_data": float(np.mean(waits)), "seconds_in_train_step": float(np.median(steps)),
            "first_iteration_seconds": first_step_seconds, "peak_cuda_memory_mib": peak,
            "compiled": bool(trainer._do_i_compile()), "dynamo_frames_compiled": int(frames.get("ok", 0)),
            "dynamo_unique_graphs": graphs,
            "dynamo_frames_compiled_after_warmup": int(frames.get("ok", 0)) - int((frames_after_warmup or {}).get("ok", 0)),
            "recompiles": len(recompiles), "recompile_reasons": recompiles[:5], "skipped_gradscaler_steps": skipped,
            "losses": losses, "augmentation_workers": int(os.environ.get("nnUNet_n_proc_DA", -1)),
            "patch_size": list(trainer.configuration_manager.patch_size),
            "batch_size": int(trainer.configuration_manager.batch_size),
            "output_folder": trainer.output_folder}


# -------------------------------------------------------------------------------------------- agreement
def agreement_worker(configuration: str, case_image: str, crop_center: list, devices: list[str]) -> dict:
    """The landmark model's heatmaps for one case cropped to about one patch, on two devices (GPU and CPU on a
    GPU machine): largest difference of the sigmoid heatmaps where the sliding window is reliable, and distance
    between the landmarks decoded from each."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    from nnunet_landmark.metrics import landmark_error_mm
    from nnunet_landmark.landmark_export import decode_landmarks, reliable_sliding_window_region
    from nnunet_landmark.predictor import nnUNetLandmarkPredictor
    from nnunet_landmark.results_folder import results_folder

    folder = str(results_folder(DATASET, "nnUNetTrainerLandmark", PLANS, configuration))
    predictors = {}
    for name in devices:
        predictor = nnUNetLandmarkPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                            device=torch.device(name), verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(folder, (0,), "checkpoint_final.pth")
        predictors[name] = predictor
    reference = predictors[devices[0]]
    patch = np.asarray(reference.configuration_manager.patch_size, dtype=float)  # preprocessed (z, y, x) order
    spacing = np.asarray(reference.configuration_manager.spacing, dtype=float)
    image = sitk.ReadImage(case_image)
    # a cube no larger than the patch along any axis (at the model's target spacing) keeps the CPU side to one
    # sliding window
    extent_mm = 0.9 * float(np.min(patch * spacing))
    centre = image.TransformPhysicalPointToContinuousIndex([float(c) for c in crop_center])
    half = np.ceil(extent_mm / np.asarray(image.GetSpacing()) / 2).astype(int)
    lower = np.clip(np.round(centre).astype(int) - half, 0, np.asarray(image.GetSize()) - 1)
    upper = np.clip(lower + 2 * half, 1, np.asarray(image.GetSize()))
    crop = sitk.RegionOfInterest(image, [int(u - l) for l, u in zip(lower, upper)], [int(v) for v in lower])
    path = Path(tempfile.mkdtemp()) / "crop_0000.nii.gz"
    sitk.WriteImage(crop, str(path))
    data, properties = SimpleITKIO().read_images([str(path)])
    adapter = PreprocessAdapterFromNpy([data], [None], [properties], [None], reference.plans_manager,
                                       reference.dataset_json, reference.configuration_manager, 1, verbose=False)
    item = next(adapter)
    heads = reference.landmark_heads
    c = heads.num_segmentation_heads
    logits, landmarks = {}, {}
    for name, predictor in predictors.items():
        with torch.no_grad():
            logits[name] = predictor.predict_logits_from_preprocessed_data(item["data"]).float().cpu()
        landmarks[name] = decode_landmarks(logits[name][c:], item["data_properties"], predictor.plans_manager,
                                           predictor.configuration_manager, heads)
    a, b = (torch.sigmoid(logits[d][c:]).numpy() for d in devices)
    valid = np.broadcast_to(reliable_sliding_window_region(a.shape[1:], reference.configuration_manager.patch_size),
                            a.shape[1:])
    difference = np.abs(a - b)[:, valid]
    distances = {n: landmark_error_mm(landmarks[devices[0]][n]["world"], landmarks[devices[1]][n]["world"])
                 for n in heads.names}
    return {"devices": devices, "preprocessed_shape": list(a.shape[1:]), "reliable_fraction": float(valid.mean()),
            "max_sigmoid_difference": float(difference.max()), "mean_sigmoid_difference": float(difference.mean()),
            "landmark_distance_mm": distances,
            "segmentation_agreement": float((logits[devices[0]][:c].argmax(0) == logits[devices[1]][:c].argmax(0))
                                            .float().mean())}


# ----------------------------------------------------------------------------------------------- main
def worker_main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "train":
        result = train_worker(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
    else:
        result = agreement_worker(argv[1], argv[2], json.loads(argv[3]), json.loads(argv[4]))
    print("RESULT " + json.dumps(result), flush=True)


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


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


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
        prediction[label] = {"seconds": run(
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
    table = render_table(results, configuration, warmup, timed)
    save_partial(workdir, results)
    (workdir / "gpu_check.md").write_text(table)
    print("\n" + table, flush=True)
    return 1 if failures else 0


def find_failures(results: dict) -> list[str]:
    """Every check that failed, in words. Performance targets count on a GPU only."""
    failures: list[str] = []
    train, prediction, agreement = results["training"], results["prediction"], results["agreement"]
    dry = results["dry_run"]
    for label, r in train.items():
        if not np.all(np.isfinite(r["losses"])):
            failures.append(f"{label}: non-finite training loss {r['losses']}")
        if r["skipped_gradscaler_steps"]["timed"]:
            failures.append(f"{label}: GradScaler skipped {r['skipped_gradscaler_steps']['timed']} steps after warm-up")
        if r["dynamo_frames_compiled_after_warmup"]:
            failures.append(f"{label}: torch.compile compiled {r['dynamo_frames_compiled_after_warmup']} frames "
                            f"after warm-up (recompiles: {r['recompile_reasons']})")
        if not dry and not r["compiled"]:
            failures.append(f"{label}: nnU-Net did not use torch.compile")
    if train["landmark"]["recompiles"] > train["plain"]["recompiles"]:
        failures.append(f"landmark: {train['landmark']['recompiles']} recompiles against plain's "
                        f"{train['plain']['recompiles']}: {train['landmark']['recompile_reasons']}")
    n = results["prediction_cases"]
    if prediction["landmark"]["segmentations"] != n or prediction["plain"]["segmentations"] != n:
        failures.append(f"segmentations written: landmark {prediction['landmark']['segmentations']}, plain "
                        f"{prediction['plain']['segmentations']} of {n}")
    if prediction["landmark"]["markups"] != n or not prediction["landmark"]["landmark_table"]:
        failures.append(f"landmark model wrote {prediction['landmark']['markups']} of {n} markups, "
                        f"landmarks.csv {'present' if prediction['landmark']['landmark_table'] else 'missing'}")
    if prediction["plain"]["markups"] or prediction["plain"]["landmark_table"]:
        failures.append("plain nnU-Net wrote landmark files")
    if not agreement["max_sigmoid_difference"] <= 0.02:
        failures.append(f"{agreement['devices'][0]} and {agreement['devices'][1]} heatmaps differ by up to "
                        f"{agreement['max_sigmoid_difference']:.4f} (> 0.02) in the reliable region")
    if not max(agreement["landmark_distance_mm"].values()) <= 1.0:
        failures.append(f"{agreement['devices'][0]} and {agreement['devices'][1]} landmarks differ by "
                        f"{agreement['landmark_distance_mm']} mm (> 1 mm)")
    for key, limit in TARGETS.items():
        if not dry and not results["ratios"][key] <= limit:
            failures.append(f"{key} ratio {results['ratios'][key]:.3f} above the target {limit}")
    return failures


def render_table(results: dict, configuration: str, warmup: int, timed: int) -> str:
    tr, pr, ag, ra = results["training"], results["prediction"], results["agreement"], results["ratios"]
    pl, lm = tr["plain"], tr["landmark"]
    dry = results["dry_run"]

    def target(key: str) -> str:
        return f"<= {TARGETS[key]}" + (" (GPU only)" if dry else "")

    lines = [
        f"Machine: {results['machine']}  ",
        f"Configuration `{configuration}` of `{PLANS}`: patch {lm['patch_size']}, batch {lm['batch_size']}; "
        f"{lm['augmentation_workers']} augmentation workers; torch.compile {'on' if lm['compiled'] else 'off'}; "
        f"{warmup} warm-up + {timed} timed iterations; total {results['seconds']['total']:.0f} s"
        f"{' (dry run on CPU)' if dry else ''}.", "",
        "| what | plain nnU-Net | landmark | ratio | target |", "|---|---|---|---|---|",
        f"| training iteration, median (s) | {pl['seconds_per_iteration']:.3f} | {lm['seconds_per_iteration']:.3f} | "
        f"{ra['iteration']:.3f} | {target('iteration')} |",
        f"| of which waiting for the data loader, mean (s) | {pl['seconds_waiting_for_data']:.3f} | "
        f"{lm['seconds_waiting_for_data']:.3f} | | |",
        f"| peak CUDA memory after warm-up (MiB) | {pl['peak_cuda_memory_mib']:.0f} | {lm['peak_cuda_memory_mib']:.0f} "
        f"| {ra['memory']:.3f} | {target('memory')} |",
        f"| first iteration, with compile (s) | {pl['first_iteration_seconds']:.1f} | "
        f"{lm['first_iteration_seconds']:.1f} | | |",
        f"| dynamo frames compiled / unique graphs / recompiles | {pl['dynamo_frames_compiled']} / "
        f"{pl['dynamo_unique_graphs']} / {pl['recompiles']} | {lm['dynamo_frames_compiled']} / "
        f"{lm['dynamo_unique_graphs']} / {lm['recompiles']} | | no recompiles after warm-up |",
        f"| skipped GradScaler steps (warm-up / timed) | {pl['skipped_gradscaler_steps']['warmup']} / "
        f"{pl['skipped_gradscaler_steps']['timed']} | {lm['skipped_gradscaler_steps']['warmup']} / "
        f"{lm['skipped_gradscaler_steps']['timed']} | | 0 timed |",
        f"| losses finite (last) | {np.all(np.isfinite(pl['losses']))} ({pl['losses'][-1]:.3f}) | "
        f"{np.all(np.isfinite(lm['losses']))} ({lm['losses'][-1]:.3f}) | | all |",
        f"| `nnUNetv2_predict`, {results['prediction_cases']} case(s), TTA {'on' if results.get('prediction_tta') else 'off'}"
        f" (s) | {pr['plain']['seconds']:.1f} | "
        f"{pr['landmark']['seconds']:.1f} | {ra['prediction']:.3f} | {target('prediction')} |",
        f"| landmark files (markups / landmarks.csv) | {pr['plain']['markups']} / {pr['plain']['landmark_table']} | "
        f"{pr['landmark']['markups']} / {pr['landmark']['landmark_table']} | | none for plain |",
        f"| heatmaps {ag['devices'][0]} vs {ag['devices'][1]}: max / mean sigmoid difference in the reliable region "
        f"({100 * ag['reliable_fraction']:.0f}% of {ag['preprocessed_shape']}) | | {ag['max_sigmoid_difference']:.4f} /"
        f" {ag['mean_sigmoid_difference']:.5f} | | <= 0.02 |",
        f"| landmarks {ag['devices'][0]} vs {ag['devices'][1]} (mm) | | "
        f"{', '.join(f'{k} {v:.3f}' for k, v in ag['landmark_distance_mm'].items())} | | <= 1 |",
        f"| segmentation voxels agreeing {ag['devices'][0]} vs {ag['devices'][1]} | | "
        f"{100 * ag['segmentation_agreement']:.2f}% | | |",
        "",
        ("PASSED: every check" if not results["failures"] else
         "FAILED:\n" + "\n".join(f"- {f}" for f in results["failures"])),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
