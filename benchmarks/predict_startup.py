"""What stock ``nnUNetv2_predict`` spends around the network, landmark model against plain nnU-Net (CPU).

    python benchmarks/predict_startup.py                  # 2 repeats; tables printed, JSON in the work folder
    python benchmarks/predict_startup.py --results        # and the section "predict-startup" of benchmarks/RESULTS.md
    python benchmarks/predict_startup.py --repeats 3 --json /tmp/p.json
    python benchmarks/predict_startup.py --workdir /dev/shm/ps    # inputs, models and outputs in memory

On an NVIDIA H200 ``benchmarks/gpu_check.sh`` found the whole ``nnUNetv2_predict`` of one 512 x 512 x 200 CT 10 s
slower for the landmark model, before the sliding window. This script repeats that prediction on the CPU with the
network made tiny, so that what is not the network can be timed phase by phase and attributed to a named step.

Set-up (made by the script in ``--workdir``, kept for reruns):

* two model folders of one dataset, ``nnUNetTrainer`` (plain) and ``nnUNetTrainerLandmark`` (C = 2 segmentation +
  K = 3 heatmap channels), plans ``nnUNetResEncUNetMPlans`` / ``3d_fullres`` with MM-WHS ResEnc-M's spacing
  (0.6287 x 0.4557 x 0.4557 mm) and patch (96 x 160 x 160) but a 4-stage ResidualEncoderUNet with 4-32 features
  (CPU tiles ~0.8 s). ``fold_0/checkpoint_final.pth`` holds untrained weights built the way the trainer builds its
  network (``build_network_architecture``) and the keys nnU-Net's predictor reads. The landmark plans carry the
  ``nnunet_landmark`` entry and a position prior for fold 0, fitted (``PositionPrior.fit``) to synthetic structure
  moments, so prediction runs the prior's code path;
* one CT-like case, 512 x 512 x 200 at 0.4557 x 0.4557 x 0.6287 mm (a phantom of ``nnunet_landmark.phantoms`` with
  that spacing), the plans' target spacing: preprocessing crops and normalises, it does not resample.

Measurements:

1. stock ``nnUNetv2_predict ... -device cpu --disable_tta -step_size 1`` for plain and landmark, alternating, each a
   fresh process; its merged output is read as it comes and the lines that mark nnU-Net's phases are timestamped
   (``PYTHONUNBUFFERED=1``; tqdm's carriage returns split lines). CPU seconds of the process tree beside wall time;
2. the same steps one after the other in one fresh process per model and repeat, without nnU-Net's worker
   processes: import of nnU-Net's predictor module, ``initialize_from_trained_model_folder`` with its trainer lookup
   split into nnU-Net's own folder and ``nnUNet_extTrainer`` (our ``check_internals`` apart), ``torch.load``,
   ``DefaultPreprocessor.run_case``, the sliding window with the network's forward passes timed apart, the pickle
   round trip that hands the logits to an export worker, the export; the import an export worker makes for its
   first task; ``python -X importtime`` of start-up and model loading, summed over the modules only the landmark
   model imports, by package.

These are measurements, not tests: nothing here fails on a number. Prints markdown tables, writes JSON (``--json``)
and, with ``--results``, the "predict-startup" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SECTION = "predict-startup"
DATASET_ID = 897
DATASET = f"Dataset{DATASET_ID}_PredictStartup"
PLANS = "nnUNetResEncUNetMPlans"
CONFIGURATION = "3d_fullres"
TRAINERS = {"plain": "nnUNetTrainer", "landmark": "nnUNetTrainerLandmark"}
LABELS = {"background": 0, "LV_blood_cavity": 1}
LANDMARKS = ("apex", "mitral_valve", "aortic_valve")
SPACING_ZYX = (0.6287, 0.4557, 0.4557)  # MM-WHS, nnUNetPlannerResEncM 3d_fullres
PATCH = (96, 160, 160)
SIZE_XYZ = (512, 512, 200)
FEATURES = (4, 8, 16, 32)
CASE = "CASE"

# lines of nnUNetv2_predict's output (nnunetv2 2.8.1, predict_from_raw_data.py) that end its phases, in order
MARKERS = {
    "predictor_created": re.compile(r"^perform_everything_on_device=True is only supported"),  # CPU only
    "ext_lookup_start": re.compile(r"^Trainer '.*' not found in nnunetv2\.training\.nnUNetTrainer"),
    "ext_lookup_done": re.compile(r"^Using trainer '.*' from:"),
    "model_loaded": re.compile(r"^There are \d+ cases in the source folder"),
    "preprocessed": re.compile(r"^Predicting .*:$"),
    "sliding_window_done": re.compile(r"^sending off prediction"),
    "exports_done": re.compile(r"^Segmentation export complete"),
}
# (label, from marker, to marker); "start" and "end" are the process's
PHASES = [
    ("start-up: interpreter, imports, argument parsing", "start", "predictor_created"),
    ("model loading: `initialize_from_trained_model_folder`", "predictor_created", "model_loaded"),
    ("&nbsp;&nbsp;of which the `nnUNet_extTrainer` search", "ext_lookup_start", "ext_lookup_done"),
    ("start-up and model loading", "start", "model_loaded"),
    ("preprocessing: workers, reading, cropping, normalising", "model_loaded", "preprocessed"),
    ("sliding window", "preprocessed", "sliding_window_done"),
    ("export and shutdown", "sliding_window_done", "end"),
    ("&nbsp;&nbsp;of which waiting for the export", "sliding_window_done", "exports_done"),
    ("before the sliding window", "start", "preprocessed"),
    ("**whole `nnUNetv2_predict`**", "start", "end"),
]


# ----------------------------------------------------------------------------------------------- set-up
def plans() -> dict:
    """Plain nnU-Net plans: one 3d_fullres configuration at MM-WHS ResEnc-M spacing and patch, a tiny network."""
    from nnunet_landmark.nnunet_integration import default_resampling

    n = len(FEATURES)
    resampling = default_resampling()
    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "arch_kwargs": {"n_stages": n, "features_per_stage": list(FEATURES), "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                        "n_blocks_per_stage": [1] * n, "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    shape_zyx = [SIZE_XYZ[2], SIZE_XYZ[1], SIZE_XYZ[0]]
    return {"dataset_name": DATASET, "plans_name": PLANS, "original_median_spacing_after_transp": list(SPACING_ZYX),
            "original_median_shape_after_transp": shape_zyx, "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "nnUNetPlannerResEncM", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {
                "max": 1200.0, "mean": 380.0, "median": 400.0, "min": -200.0, "percentile_00_5": 20.0,
                "percentile_99_5": 700.0, "std": 110.0}},
            "configurations": {CONFIGURATION: {
                "data_identifier": f"{PLANS}_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2, "patch_size": list(PATCH), "median_image_size_in_voxels": shape_zyx,
                "spacing": list(SPACING_ZYX), "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False], **resampling, "architecture": architecture, "batch_dice": False}}}


def synthetic_position_prior(cases: int = 6, seed: int = 0):
    """A ``PositionPrior`` fitted to ``cases`` synthetic LV-like structures (moments) and landmarks, world mm."""
    from nnunet_landmark.prior.model import ALL_FOREGROUND, Moments, PositionPrior

    rng = np.random.default_rng(seed)
    in_frame = np.array([[-45.0, 0.0, 0.0], [25.0, 3.0, 0.0], [20.0, -15.0, 10.0]])  # along the long axis first
    fitted = []
    for _ in range(cases):
        q, _ = np.linalg.qr(np.eye(3) + rng.normal(0, 0.1, (3, 3)))  # a rotation near a fixed pose
        rotation = q * np.sign(np.diag(q))
        mean = rng.normal(0, 10, 3)
        cov = rotation @ np.diag(np.array([35.0, 22.0, 18.0]) ** 2 * rng.uniform(0.9, 1.1, 3)) @ rotation.T
        moments = Moments(200_000, mean, cov)
        points = mean + in_frame @ rotation.T + rng.normal(0, 2.0, in_frame.shape)
        fitted.append(({ALL_FOREGROUND: moments, 1: moments}, points))
    prior = PositionPrior.fit(fitted, LANDMARKS)
    if prior is None or set(prior.landmarks) != set(LANDMARKS):
        raise RuntimeError("the synthetic position prior did not fit every landmark")
    return prior


def make_models(results: Path) -> dict[str, Path]:
    """Both model folders (dataset.json, plans.json, fold_0/checkpoint_final.pth); existing ones are kept."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_landmark.heatmap_targets import HeatmapEncoding
    from nnunet_landmark.landmark_heads import LandmarkHeads
    from nnunet_landmark.prior.storage import set_position_prior
    from nnunet_landmark.layout import atomic_write_json
    from nnunet_landmark.training.trainers import nnUNetTrainerLandmark

    folders = {}
    for model, trainer_name in TRAINERS.items():
        folder = results / DATASET / f"{trainer_name}__{PLANS}__{CONFIGURATION}"
        folders[model] = folder
        if (folder / "fold_0" / "checkpoint_final.pth").is_file():
            continue
        (folder / "fold_0").mkdir(parents=True, exist_ok=True)
        dataset_json = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 20, "file_ending": ".nii.gz"}
        model_plans = plans()
        trainer_class = nnUNetTrainer
        if model == "landmark":
            trainer_class = nnUNetTrainerLandmark
            dataset_json["landmarks"] = list(LANDMARKS)
            # as nnUNetTrainerLandmark._make_landmark_heads: log-distance up to the patch diagonal, d0 = 20 mm
            patch_mm = float(np.linalg.norm(np.asarray(PATCH) * np.asarray(SPACING_ZYX)))
            encoding = HeatmapEncoding("log_distance", max_distance_mm=patch_mm, scale_mm=20.0,
                                       sigma_mm=max(4.0, 2 * max(SPACING_ZYX)))
            LandmarkHeads(LANDMARKS, len(LABELS), encoding).write_to_plans(model_plans)
            set_position_prior(model_plans, "fold_0", synthetic_position_prior())
        manager = PlansManager(model_plans)
        torch.manual_seed(0)
        network = trainer_class.build_network_architecture(manager, manager.get_configuration(CONFIGURATION), 1,
                                                           len(LABELS), True)
        checkpoint = {"network_weights": network.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                      "logging": {}, "_best_ema": None, "current_epoch": 1,
                      "init_args": {"plans": model_plans, "configuration": CONFIGURATION, "fold": 0,
                                    "dataset_json": dataset_json, "device": "cpu"},
                      "trainer_name": trainer_name, "inference_allowed_mirroring_axes": (0, 1, 2)}
        torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
        atomic_write_json(dataset_json, folder / "dataset.json")
        atomic_write_json(model_plans, folder / "plans.json")
    return folders


def make_case(folder: Path) -> Path:
    """The 512 x 512 x 200 CT-like case (a phantom given MM-WHS ResEnc-M's spacing) as CASE_0000.nii.gz."""
    import SimpleITK as sitk

    from nnunet_landmark.phantoms import generate_phantom

    path = folder / f"{CASE}_0000.nii.gz"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    image = generate_phantom(0, SIZE_XYZ, oblique_degrees=0.0, flips=False).image
    image.SetSpacing(tuple(float(s) for s in SPACING_ZYX[::-1]))
    sitk.WriteImage(image, str(path.with_suffix(".tmp.nii.gz")), useCompression=True)
    path.with_suffix(".tmp.nii.gz").rename(path)
    return path


def environment(workdir: Path) -> dict:
    return {**os.environ, "nnUNet_raw": str(workdir / "nnUNet_raw"),
            "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
            "nnUNet_results": str(workdir / "nnUNet_results"), "PYTHONUNBUFFERED": "1",
            "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "2")}


# ----------------------------------------------------------------------------------------------- nnUNetv2_predict
def timed_lines(command: list[str], env: dict, log: Path) -> tuple[float, float, list[tuple[float, str]], int]:
    """Run ``command`` with stdout and stderr merged; (wall s, CPU s of the process tree, [(s since start, line)],
    exit code). Lines split at carriage returns too (tqdm), each stamped when it arrives."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, buffer = [], b""
    with open(log, "ab") as f:
        while True:
            chunk = os.read(process.stdout.fileno(), 65536)
            now = time.perf_counter() - start
            if not chunk:
                break
            f.write(chunk)
            buffer += chunk
            *complete, buffer = re.split(rb"[\r\n]", buffer)
            lines += [(now, part.decode(errors="replace")) for part in complete if part.strip()]
        code = process.wait()
    wall = time.perf_counter() - start
    if buffer.strip():
        lines.append((wall, buffer.decode(errors="replace")))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    return wall, cpu, lines, code


def predict(model: str, workdir: Path, inputs: Path, repeat: int, step_size: float, device: str) -> dict:
    """One stock ``nnUNetv2_predict`` in a fresh process: its phase times and the files it wrote."""
    from nnunet_landmark.phantom_dataset import console_script

    out = workdir / f"predicted_{model}_{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    command = [console_script("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID),
               "-c", CONFIGURATION, "-f", "0", "-tr", TRAINERS[model], "-p", PLANS, "-chk", "checkpoint_final.pth",
               "-device", device, "--disable_tta", "-step_size", str(step_size)]
    wall, cpu, lines, code = timed_lines(command, environment(workdir), workdir / "predict.log")
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}):\n" + "\n".join(l for _, l in lines[-40:]))
    marks = {"start": 0.0, "end": wall}
    for seconds, line in lines:
        for name, pattern in MARKERS.items():
            if name not in marks and pattern.search(line.strip()):
                marks[name] = seconds
    written = sorted(p.name for p in out.iterdir())
    shutil.rmtree(out)
    return {"seconds": wall, "cpu_seconds": cpu, "marks": marks, "written": written,
            "phases": {label: marks[b] - marks[a] for label, a, b in PHASES if a in marks and b in marks}}


# ----------------------------------------------------------------------------------------------- attribution children
STEP_IMPORT = "import `nnunetv2.inference.predict_from_raw_data`"
STEP_INIT = "`initialize_from_trained_model_folder`"
STEP_LOOKUP = "&nbsp;&nbsp;trainer lookup (`recursive_find_trainer_class_by_name`)"
STEP_OWN = "&nbsp;&nbsp;&nbsp;&nbsp;search of `nnunetv2.training.nnUNetTrainer`"
STEP_EXT = "&nbsp;&nbsp;&nbsp;&nbsp;search of `nnUNet_extTrainer`"
STEP_CHECK = "&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;of which our `check_internals`"
STEP_LOAD = "&nbsp;&nbsp;`torch.load` of the checkpoint"
STEP_RUN_CASE = "`DefaultPreprocessor.run_case` on the case"
STEP_SLIDING = "sliding window (`predict_logits_from_preprocessed_data`)"
STEP_NETWORK = "&nbsp;&nbsp;network forward passes"
STEP_REST = "&nbsp;&nbsp;the rest: nnU-Net's float16 accumulation of every output channel, division, inf check"
STEP_PICKLE = "logits handed to an export worker: pickle dumps + loads"
STEP_EXPORT_IMPORT = "export worker: importing the export function (first task)"
STEP_EXPORT = "export (the function `nnUNetv2_predict` calls)"


def startup(model: str, folder: str, device: str) -> tuple[dict, dict, object]:
    """In this fresh process: import nnU-Net's predictor module, then ``initialize_from_trained_model_folder``, its
    trainer lookup timed per searched folder, our ``check_internals`` and ``torch.load`` timed apart.
    ({step: s}, {step: modules imported}, the predictor)."""
    import contextlib
    import io

    seconds: dict = {}
    modules_imported: dict = {}
    start = time.perf_counter()
    from nnunetv2.inference import predict_from_raw_data
    seconds[STEP_IMPORT] = time.perf_counter() - start
    import torch
    from nnunetv2.utilities import find_objects

    def timed(name, function):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            modules = len(sys.modules)
            try:
                return function(*args, **kwargs)
            finally:
                key = name(*args) if callable(name) else name
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t
                modules_imported[key] = modules_imported.get(key, 0) + len(sys.modules) - modules
        return wrapper

    nnunet_folder = os.path.abspath(os.path.join(os.path.dirname(find_objects.nnunetv2.__file__), "training",
                                                 "nnUNetTrainer"))
    find_objects.recursive_find_python_class = timed(
        lambda searched, *_: STEP_OWN if os.path.abspath(searched) == nnunet_folder else STEP_EXT,
        find_objects.recursive_find_python_class)
    predict_from_raw_data.recursive_find_trainer_class_by_name = timed(
        STEP_LOOKUP, predict_from_raw_data.recursive_find_trainer_class_by_name)
    torch_load = torch.load
    torch.load = timed(STEP_LOAD, torch_load)
    if model == "landmark":  # install() runs it when the lookup imports our trainer module; importing this is ~1 ms
        from nnunet_landmark import nnunet_integration
        nnunet_integration.check_internals = timed(STEP_CHECK, nnunet_integration.check_internals)
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # as nnUNetv2_predict -device cpu
    predictor = predict_from_raw_data.nnUNetPredictor(tile_step_size=1.0, use_mirroring=False,
                                                      device=torch.device(device))
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        predictor.initialize_from_trained_model_folder(folder, (0,), "checkpoint_final.pth")
    seconds[STEP_INIT] = time.perf_counter() - t
    torch.load = torch_load
    return seconds, modules_imported, predictor


def child_startup(model: str, folder: str, device: str) -> dict:
    """Start-up and model loading only (what ``-X importtime`` looks at)."""
    seconds, modules_imported, _ = startup(model, folder, device)
    return {"seconds": seconds, "modules_imported": modules_imported}


def child_pipeline(model: str, folder: str, device: str, image: str, out: str, step_size: str) -> dict:
    """In this fresh process, what ``nnUNetv2_predict`` does for one case, step by step and without its worker
    processes: start-up and model loading (``startup``), preprocessing, sliding window (network forward passes
    timed apart), the pickle round trip that hands the logits to an export worker, the export."""
    import contextlib
    import io
    import pickle

    import torch

    seconds, modules_imported, predictor = startup(model, folder, device)
    from nnunetv2.inference import predict_from_raw_data

    predictor.tile_step_size = float(step_size)
    manager, configuration = predictor.plans_manager, predictor.configuration_manager
    t = time.perf_counter()
    data, _, properties = configuration.preprocessor_class(verbose=False).run_case(
        [image], None, manager, configuration, predictor.dataset_json)
    data = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format)  # as the worker
    seconds[STEP_RUN_CASE] = time.perf_counter() - t

    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    forward = {"seconds": 0.0, "start": 0.0}

    def before(*_):
        synchronize()
        forward["start"] = time.perf_counter()

    def after(*_):
        synchronize()
        forward["seconds"] += time.perf_counter() - forward["start"]

    predictor.network.register_forward_pre_hook(before)
    predictor.network.register_forward_hook(after)
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        logits = predictor.predict_logits_from_preprocessed_data(data).cpu().detach().numpy()
    seconds[STEP_SLIDING] = time.perf_counter() - t
    seconds[STEP_NETWORK] = forward["seconds"]
    seconds[STEP_REST] = seconds[STEP_SLIDING] - forward["seconds"]
    del data

    t = time.perf_counter()
    copy = pickle.loads(pickle.dumps(logits, protocol=pickle.HIGHEST_PROTOCOL))
    seconds[STEP_PICKLE] = time.perf_counter() - t
    del copy
    os.makedirs(out, exist_ok=True)
    t = time.perf_counter()  # predict_from_raw_data's name: ours for a landmark model (install), nnU-Net's for plain
    predict_from_raw_data.export_prediction_from_logits(logits, properties, configuration, manager,
                                                        predictor.dataset_json, os.path.join(out, CASE), False)
    seconds[STEP_EXPORT] = time.perf_counter() - t
    return {"seconds": seconds, "modules_imported": modules_imported,
            "logits": {"channels": int(logits.shape[0]), "shape": list(logits.shape[1:]),
                       "mib": logits.nbytes / 2 ** 20}, "written": sorted(os.listdir(out))}


def child_export_import(model: str) -> dict:
    """In this fresh process, as a spawned export worker of ``nnUNetv2_predict``: nnU-Net's predictor module imported
    (its ``__mp_main__``), then the import that unpickling the export function triggers on the first task."""
    import importlib

    from nnunetv2.inference import predict_from_raw_data  # noqa: F401

    module = "nnunet_landmark.landmark_export" if model == "landmark" else "nnunetv2.inference.export_prediction"
    t = time.perf_counter()
    importlib.import_module(module)
    return {"seconds": {STEP_EXPORT_IMPORT: time.perf_counter() - t}}


def run_child(kind: str, model: str, folder: Path, device: str, workdir: Path, extra: tuple = (),
              python_flags: tuple = ()) -> tuple[dict, str]:
    """A fresh interpreter running one child; (its JSON result, its stderr)."""
    command = [sys.executable, *python_flags, str(Path(__file__).resolve()), "--child", kind, model, str(folder),
               device, *map(str, extra)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment(workdir),
                            cwd=tempfile.gettempdir())
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def parse_importtime(stderr: str) -> dict[str, tuple[float, str]]:
    """{module: (self import s, the top-level import it came with)} from ``python -X importtime`` output (a module
    is printed after its own imports, indented one level deeper: its top-level import is the next unindented line)."""
    lines = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|( +)(\S+)", line)
        if m:
            lines.append((len(m.group(2)) == 1, m.group(3), int(m.group(1)) / 1e6))
    modules, root = {}, None
    for top_level, name, seconds in reversed(lines):
        root = name if top_level else root
        previous = modules.get(name, (0.0, None))
        modules[name] = (previous[0] + seconds, root)  # listed twice (a package, then again for a submodule): the first
    return modules


def import_difference(plain: dict, landmark: dict, top: int = 6) -> dict:
    """Self import time of the modules only the landmark model's start-up imports, in total and by package (with
    the top-level import that brought most of each package's time)."""
    only = {name: v for name, v in landmark.items() if name not in plain}
    groups: dict[str, dict] = {}
    for name, (seconds, root) in only.items():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("nnunet_landmark", "nnunetv2", "torch") else parts[0]
        group = groups.setdefault(key, {"seconds": 0.0, "modules": 0, "via": {}})
        group["seconds"] += seconds
        group["modules"] += 1
        group["via"][root] = group["via"].get(root, 0.0) + seconds
    ranked = sorted(groups.items(), key=lambda kv: -kv[1]["seconds"])
    return {"modules": len(only), "self_seconds": sum(s for s, _ in only.values()),
            "plain_total_self_seconds": sum(s for s, _ in plain.values()),
            "landmark_total_self_seconds": sum(s for s, _ in landmark.values()),
            "by_package": [[k, g["seconds"], g["modules"], max(g["via"], key=g["via"].get)] for k, g in ranked[:top]]}


# ----------------------------------------------------------------------------------------------- report
def median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def summarize(results: dict) -> None:
    """Medians per phase and per step, in place."""
    runs = results["predict"]
    results["phases"] = {label: {m: median([r["phases"][label] for r in runs[m] if label in r["phases"]])
                                 for m in TRAINERS} for label, _, _ in PHASES}
    results["cpu_seconds"] = {m: median([r["cpu_seconds"] for r in runs[m]]) for m in TRAINERS}
    steps = {m: results["pipeline"][m] + results["export_import"][m] for m in TRAINERS}
    order = [STEP_IMPORT, STEP_INIT, STEP_LOOKUP, STEP_OWN, STEP_EXT, STEP_CHECK, STEP_LOAD, STEP_RUN_CASE,
             STEP_SLIDING, STEP_NETWORK, STEP_REST, STEP_PICKLE, STEP_EXPORT_IMPORT, STEP_EXPORT]
    results["steps"] = {k: {m: median([r["seconds"][k] for r in steps[m] if k in r["seconds"]]) for m in TRAINERS}
                        for k in order}
    results["modules_imported"] = {m: results["pipeline"][m][0]["modules_imported"] for m in TRAINERS}
    results["logits_mib"] = {m: results["pipeline"][m][0]["logits"]["mib"] for m in TRAINERS}


def cell(value: float) -> str:
    return "" if value != value else f"{value:.2f}"


def difference(plain: float, landmark: float) -> str:
    """landmark - plain, a missing value (a step plain does not run) counting as 0."""
    if plain != plain and landmark != landmark:
        return ""
    return f"{(landmark if landmark == landmark else 0.0) - (plain if plain == plain else 0.0):+.2f}"


def table(results: dict) -> str:
    """Markdown: medians per phase of nnUNetv2_predict, then the steps timed alone."""
    lines = ["| phase of `nnUNetv2_predict` (median) | plain s | landmark s | landmark - plain s | ratio |",
             "|---|---|---|---|---|"]
    for label, values in results["phases"].items():
        plain, landmark = values["plain"], values["landmark"]
        ratio = f"{landmark / plain:.3f}" if plain == plain and landmark == landmark and plain > 0 else ""
        lines.append(f"| {label} | {cell(plain)} | {cell(landmark)} | {difference(plain, landmark)} | {ratio} |")
    cpu = results["cpu_seconds"]
    lines.append(f"| CPU s of the process tree (all workers) | {cpu['plain']:.1f} | {cpu['landmark']:.1f} | "
                 f"{cpu['landmark'] - cpu['plain']:+.1f} | {cpu['landmark'] / cpu['plain']:.3f} |")
    lines += ["", "| step, timed in a fresh process without nnU-Net's workers (median) | plain s | landmark s "
                  "| landmark - plain s |", "|---|---|---|---|"]
    mib = results["logits_mib"]
    for key, values in results["steps"].items():
        label = key
        counts = [results["modules_imported"][m].get(key) for m in TRAINERS]
        if any(c is not None for c in counts):
            label += f" (modules imported: {' / '.join('-' if c is None else str(c) for c in counts)})"
        if key == STEP_PICKLE:
            label += f" ({mib['plain']:.0f} / {mib['landmark']:.0f} MiB float16)"
        lines.append(f"| {label} | {cell(values['plain'])} | {cell(values['landmark'])} | "
                     f"{difference(values['plain'], values['landmark'])} |")
    diff = results["importtime"]
    lines.append(f"| `-X importtime`, start-up and model loading: self time of every import "
                 f"| {diff['plain_total_self_seconds']:.2f} | {diff['landmark_total_self_seconds']:.2f} | "
                 f"{diff['landmark_total_self_seconds'] - diff['plain_total_self_seconds']:+.2f} |")
    lines.append(f"| &nbsp;&nbsp;of the {diff['modules']} modules only the landmark model imports | | "
                 f"{diff['self_seconds']:.2f} | |")
    for name, seconds, count, via in diff["by_package"]:
        lines.append(f"| &nbsp;&nbsp;&nbsp;&nbsp;{name} ({count} modules, first imported by `{via}`) | | "
                     f"{seconds:.2f} | |")
    return "\n".join(lines)


def machine() -> str:
    from run_benchmarks import machine as describe
    return describe()


def write_results(path: Path, results: dict, bullets: list[str]) -> None:
    from results_sections import write_section

    load = (f"1-minute load average {results['load_average_at_start'][0]:.1f} at the start, "
            f"{results['load_average_at_end'][0]:.1f} at the end")
    text = (f"## Real size: what `nnUNetv2_predict` does before and after the network (CPU)\n\n"
            f"Machine: {results['machine']}; {load}  \nDate: {results['date']}  \n"
            f"Why: on the H200 (section \"gpu-check\") the landmark model's `nnUNetv2_predict` took 10 s longer before "
            f"the sliding window. Here the same stock command, `nnUNetv2_predict -d {DATASET_ID} -c {CONFIGURATION} "
            f"-f 0 -tr TRAINER -p {PLANS} -device {results['device']} --disable_tta "
            f"-step_size {results['step_size']}`, predicts one "
            f"512 x 512 x 200 CT-like case (0.4557 x 0.4557 x 0.6287 mm, the plans' target spacing: no resampling) "
            f"with `nnUNetTrainer` and `nnUNetTrainerLandmark` models that differ only in what the landmark model "
            f"adds: C = 2 + K = 3 output channels, the `nnunet_landmark` plans entry with a fold-0 position prior, "
            f"the trainer found through `nnUNet_extTrainer`. Plans: MM-WHS ResEnc-M spacing and patch "
            f"(96 x 160 x 160), a 4-stage ResidualEncoderUNet with {FEATURES[0]}-{FEATURES[-1]} features (untrained "
            f"weights, saved as the trainer would) so that the network is cheap on a CPU. {results['repeats']} runs "
            f"of each, alternating, every run a fresh process; phases end at the lines nnU-Net prints, timestamped "
            f"as they arrive (median of the runs), CPU time of the whole process tree beside them. Below, the same "
            f"steps in one fresh process per model and run, one after the other without nnU-Net's worker processes "
            f"(import, model loading with the trainer lookup split by searched folder, `run_case`, sliding window "
            f"with the network's forward passes timed apart, the logits' pickle round trip, the export), and "
            f"`python -X importtime` of start-up and model loading. Produced by `python "
            f"benchmarks/predict_startup.py --results`; raw numbers in the JSON it writes.\n\n{table(results)}\n\n"
            f"Where the difference is:\n\n" + "".join(f"* {b}\n" for b in bullets))
    write_section(path, SECTION, text)


def findings(results: dict) -> list[str]:
    """Bullets naming where the landmark model's extra seconds go, from the measured numbers."""
    phases, steps = results["phases"], results["steps"]

    def d(values: dict) -> float:
        return (values["landmark"] if values["landmark"] == values["landmark"] else 0.0) - \
            (values["plain"] if values["plain"] == values["plain"] else 0.0)

    whole, before = phases["**whole `nnUNetv2_predict`**"], phases["before the sliding window"]
    loading = phases["model loading: `initialize_from_trained_model_folder`"]
    preprocessing = phases["preprocessing: workers, reading, cropping, normalising"]
    sliding, export = phases["sliding window"], phases["export and shutdown"]
    imports = results["importtime"]
    packages = ", ".join(f"{name} {seconds:.2f} s" for name, seconds, _, _ in imports["by_package"][:3])
    mib = results["logits_mib"]
    return [
        f"Whole command: {whole['landmark']:.1f} s against {whole['plain']:.1f} s "
        f"({whole['landmark'] / whole['plain']:.3f},"
        f" {d(whole):+.1f} s). Before the sliding window {d(before):+.1f} s ({before['landmark']:.1f} against "
        f"{before['plain']:.1f} s): model loading {d(loading):+.2f} s, preprocessing {d(preprocessing):+.2f} s "
        f"(the same code on the same configuration; `run_case` alone {d(steps[STEP_RUN_CASE]):+.2f} s).",
        f"Model loading: the trainer lookup, {d(steps[STEP_LOOKUP]):+.2f} s. For `nnUNetTrainer` nnU-Net's search "
        f"stops "
        f"at its first module; for `nnUNetTrainerLandmark` it imports every module under "
        f"`nnunetv2.training.nnUNetTrainer` first ({steps[STEP_OWN]['landmark']:.2f} s; by `-X importtime`: "
        f"{packages}, pulled in by nnU-Net's own Primus trainers), then searches `nnUNet_extTrainer` "
        f"({steps[STEP_EXT]['landmark']:.2f} s: our package, `check_internals` {steps[STEP_CHECK]['landmark']:.2f} s).",
        f"Sliding window {d(sliding):+.1f} s on this CPU ({d(steps[STEP_SLIDING]):+.2f} s timed alone): the network "
        f"forward passes {d(steps[STEP_NETWORK]):+.2f} s, the rest {d(steps[STEP_REST]):+.2f} s: nnU-Net's predictor "
        f"weights, "
        f"accumulates (float16) and divides every output channel of every tile on the results device, "
        f"{2 + len(LANDMARKS)} channels instead of 2. With `perform_everything_on_device` (CUDA) that runs on the GPU.",
        f"Export and shutdown {d(export):+.1f} s: the landmark export itself {d(steps[STEP_EXPORT]):+.2f} s "
        f"(decoding, prior, markups, table), handing {mib['landmark']:.0f} instead of {mib['plain']:.0f} MiB of "
        f"logits to the export worker (pickle round trip {d(steps[STEP_PICKLE]):+.2f} s, plus the pipe), the worker's "
        f"import of our export module {d(steps[STEP_EXPORT_IMPORT]):+.2f} s.",
    ]


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each model, each measurement (median)")
    parser.add_argument("--step-size", type=float, default=1.0, help="sliding window step (the same for both)")
    parser.add_argument("--device", default="cpu", help="-device of nnUNetv2_predict (the tables are made for cpu)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "predict_startup"),
                        help="models, the case and outputs (kept: a rerun reuses the models and the case)")
    parser.add_argument("--json", default=None, help="raw numbers (default: WORKDIR/predict_startup.json)")
    parser.add_argument("--results", nargs="?", const=str(HERE / "RESULTS.md"), default=None, metavar="MARKDOWN",
                        help="write the section \"predict-startup\" there (default file: benchmarks/RESULTS.md)")
    parser.add_argument("--from-json", default=None, help=argparse.SUPPRESS)  # re-render a finished run's JSON
    args = parser.parse_args()
    if args.child:
        kind, model, folder, device, *rest = args.child
        result = {"startup": lambda: child_startup(model, folder, device),
                  "pipeline": lambda: child_pipeline(model, folder, device, *rest),
                  "export_import": lambda: child_export_import(model)}[kind]()
        print(json.dumps(result))
        return

    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        summarize(results)
        print(table(results))
        if args.results:
            write_results(Path(args.results), results, findings(results))
        return
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "predict.log").unlink(missing_ok=True)
    t = time.perf_counter()
    folders = make_models(workdir / "nnUNet_results")
    image = make_case(workdir / "input")
    print(f"models and case ready in {workdir} ({time.perf_counter() - t:.0f} s)", flush=True)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "repeats": args.repeats, "step_size": args.step_size, "device": args.device,
               "load_average_at_start": os.getloadavg(), "models": {m: str(f) for m, f in folders.items()},
               "case": str(image), "predict": {m: [] for m in TRAINERS}, "pipeline": {m: [] for m in TRAINERS},
               "export_import": {m: [] for m in TRAINERS}}
    for repeat in range(args.repeats):  # interleaved, so that load from elsewhere hits both alike
        for model in TRAINERS:
            run = predict(model, workdir, image.parent, repeat, args.step_size, args.device)
            results["predict"][model].append(run)
            print(f"nnUNetv2_predict {model} #{repeat}: {run['seconds']:.1f} s wall, {run['cpu_seconds']:.1f} s CPU, "
                  + ", ".join(f"{k} {v:.1f}" for k, v in run["marks"].items()), flush=True)
    for repeat in range(args.repeats):
        for model in TRAINERS:
            out = workdir / f"pipeline_{model}"
            shutil.rmtree(out, ignore_errors=True)
            result, _ = run_child("pipeline", model, folders[model], args.device, workdir,
                                  (image, out, args.step_size))
            shutil.rmtree(out, ignore_errors=True)
            results["pipeline"][model].append(result)
            print(f"steps {model} #{repeat}: " + ", ".join(f"{k} {v:.2f}" for k, v in result["seconds"].items())
                  + f"; modules imported {result['modules_imported']}", flush=True)
            result, _ = run_child("export_import", model, folders[model], args.device, workdir)
            results["export_import"][model].append(result)
    imports = {}
    for model in TRAINERS:
        _, stderr = run_child("startup", model, folders[model], args.device, workdir,
                              python_flags=("-X", "importtime"))
        imports[model] = parse_importtime(stderr)
    results["importtime"] = import_difference(imports["plain"], imports["landmark"])
    results["load_average_at_end"] = os.getloadavg()
    summarize(results)
    bullets = findings(results)
    Path(args.json or workdir / "predict_startup.json").write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    print("\n".join("* " + b for b in bullets))
    if args.results:
        write_results(Path(args.results), results, bullets)


if __name__ == "__main__":
    main()
