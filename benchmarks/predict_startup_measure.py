"""The measurements of ``predict_startup.py``: stock ``nnUNetv2_predict`` timed phase by phase from the lines it prints
(``predict``), and the children that run the same steps one by one in a fresh process (``predict_startup.py --child
KIND ...``, started by ``run_child``), with ``python -X importtime`` of start-up and model loading parsed
(``parse_importtime``, ``import_difference``)."""
from __future__ import annotations

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

from predict_startup_setup import CASE, CONFIGURATION, DATASET_ID, PLANS, TRAINERS, environment

DRIVER = Path(__file__).resolve().with_name("predict_startup.py")  # runs the children (``--child``)

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
    command = [sys.executable, *python_flags, str(DRIVER), "--child", kind, model, str(folder), device,
               *map(str, extra)]
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
