"""What the scripts in ``benchmarks/`` share.

Every script: the folder its committed results go to (``RESULTS_DIR``, ``RESULTS_MD``), the named sections of
``results/RESULTS.md`` that different scripts own (``write_section``), the machine line of every results header
(``machine``) and a timed console script (``timed_console_script``).

The training studies (``heatmap_ablation.py``, ``cross_anatomy.py``, ``estimator_study.py``): phantom datasets and
test sets, training a trainer with a seed, ``nnUNetv2_predict`` on a test set, and scoring it (the demo's
``evaluate_test_set`` plus the position prior alone). Each keeps its work in one folder: ``nnUNet_raw`` /
``nnUNet_preprocessed`` shared by its runs, ``nnUNet_results_seed<N>`` per training seed, ``unseen/<test set>``
phantoms, ``predictions/<run>_<test set>``.

Only the standard library and numpy are imported here; nnU-Net, torch and nnunet_landmark inside the functions.
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = RESULTS_DIR / "RESULTS.md"

PLANS, CONFIG = "nnUNetResEncUNetMPlans", "3d_cpu"
LANDMARKS = ("apex", "mitral_valve", "aortic_valve")
DEMO_SIZE = (64, 64, 48)  # the demo's CPU phantoms (~3.4 mm)
LANDMARK_BASE, PLAIN_BASE = "nnUNetTrainerLandmark_cpu_learn", "nnUNetTrainer_cpu_learn"

TRAINER_MODULE = '''import torch
from nnunet_landmark.training.all_trainers import {bases}


def _variant(name, base, settings):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for key, value in settings.items():
            setattr(self, key, value)
    return type(name, (base,), {{"__init__": __init__}})


'''


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    try:
        return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


def machine() -> str:
    """CPU, cores, GPU, Python and torch of this machine, for the results' headers."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def timed_console_script(command: list[str], env: dict, log: Path | None = None) -> float:
    """Seconds a console script took (``run_console_script``: this environment's command, ``env`` on top of this
    process's environment, the output appended to ``log`` if given)."""
    from nnunet_landmark.phantom_dataset import run_console_script

    start = time.perf_counter()
    run_console_script(command, env, log=log)
    return time.perf_counter() - start


def _section_pattern(name: str) -> re.Pattern:
    return re.compile(rf"<!-- {re.escape(name)} -->\n.*?<!-- /{re.escape(name)} -->\n", re.S)


def sections(path: Path) -> str:
    """Every named section (``<!-- name -->`` ... ``<!-- /name -->``) of a results file, in order, as text ('' if
    none or no file): the parts of ``results/RESULTS.md`` that other scripts own, kept when one rewrites it."""
    if not path.exists():
        return ""
    return "".join(m.group(0) for m in re.finditer(r"<!-- ([\w-]+) -->\n.*?<!-- /\1 -->\n", path.read_text(), re.S))


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` into the section ``name`` of the file, replacing that section or appending it."""
    block = f"<!-- {name} -->\n{text.rstrip()}\n<!-- /{name} -->\n"
    current = path.read_text() if path.exists() else ""
    if _section_pattern(name).search(current):
        current = _section_pattern(name).sub(lambda _: block, current)
    else:
        current = current.rstrip("\n") + ("\n\n" if current else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(current)


def write_trainer_variants(folder: Path, variants: dict[str, tuple[str, dict]]) -> None:
    """Trainer classes ``{name: (base trainer, attributes set after its __init__)}`` in a module that nnU-Net's
    ``nnUNet_extTrainer`` lookup finds (``environment`` points it there)."""
    folder.mkdir(parents=True, exist_ok=True)
    bases = sorted({base for base, _ in variants.values()}) or ["nnUNetTrainerLandmark"]  # none: a valid module
    (folder / "study_trainers.py").write_text(TRAINER_MODULE.format(bases=", ".join(bases)) + "".join(
        f"{name} = _variant({name!r}, {base}, {settings!r})\n" for name, (base, settings) in variants.items()))


def environment(workdir: Path, seed: int) -> dict:
    """nnU-Net's folders of a study (results per training seed), its trainers, and the seed."""
    extra = os.environ.get("nnUNet_extTrainer")
    return {"nnUNet_raw": str(workdir / "nnUNet_raw"), "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
            "nnUNet_results": str(workdir / f"nnUNet_results_seed{seed}"),
            "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "2"), "nnUNet_def_n_proc": "2",
            "nnUNet_extTrainer": os.pathsep.join(p for p in (str(workdir / "trainers"), extra) if p),
            "nnUNet_landmark_seed": str(seed)}


def prepare_dataset(workdir: Path, dataset_id: int, name: str, family: str, seed: int, cases: int = 20) -> Path:
    """The demo's dataset recipe (seven structures, three landmarks, 5 folds, the CPU configuration) on ``family``
    phantoms; the raw dataset folder."""
    from nnunet_landmark.phantom_dataset import prepare_phantom_dataset

    return prepare_phantom_dataset(environment(workdir, 0), dataset_id, workdir / f"phantoms_{name}", name=name,
                                   landmarks=LANDMARKS, folds=5, num_cases=cases, seed=seed, size=DEMO_SIZE,
                                   flips=False, phantom_progress=False, all_structures=True, family=family).raw


def make_test_set(workdir: Path, name: str, family: str, seed: int, cases: int, first_case: int) -> Path:
    """Unseen phantoms ``unseen/<name>`` (and ``unseen/<name>_inputs`` for ``nnUNetv2_predict``)."""
    from nnunet_landmark.phantom_families import write_mmwhs_phantoms

    root = workdir / "unseen" / name
    if not (root / "landmarks.csv").exists():
        write_mmwhs_phantoms(root, cases, seed=seed, size=DEMO_SIZE, flips=False, first_case=first_case,
                             progress=False, family=family)
    inputs = workdir / "unseen" / f"{name}_inputs"
    inputs.mkdir(exist_ok=True)
    for image in sorted((root / "ct_train").glob("*_image.nii.gz")):
        link = inputs / image.name.replace("_image.nii.gz", "_0000.nii.gz")
        if not link.exists():
            link.symlink_to(image)
    return root


def train(workdir: Path, dataset: str, trainer: str, seed: int) -> Path:
    """``nnUNetv2_train`` fold 0 (skipped where it finished); the model folder."""
    from nnunet_landmark.phantom_dataset import run_console_script
    from nnunet_landmark.results_folder import results_folder

    env = environment(workdir, seed)
    model = results_folder(dataset, trainer, PLANS, CONFIG, results=env["nnUNet_results"])
    if not (model / "fold_0" / "checkpoint_final.pth").exists():
        run_console_script(["nnUNetv2_train", dataset.split("_")[0][len("Dataset"):], CONFIG, "0", "-tr", trainer,
                            "-p", PLANS, "-device", "cpu"], env)
    return model


def predict(workdir: Path, dataset: str, trainer: str, seed: int, test_set: str, run: str) -> Path:
    """``nnUNetv2_predict`` (fold 0, no TTA) of a test set (skipped where it finished); the prediction folder."""
    from nnunet_landmark.phantom_dataset import run_console_script

    out = workdir / "predictions" / f"{run}_{test_set}"
    cases = sorted((workdir / "unseen" / f"{test_set}_inputs").glob("*_0000.nii.gz"))
    if not (out / "dataset.json").exists() or not all((out / c.name.replace("_0000", "")).exists() for c in cases):
        run_console_script(["nnUNetv2_predict", "-i", str(workdir / "unseen" / f"{test_set}_inputs"), "-o", str(out),
                            "-d", dataset.split("_")[0][len("Dataset"):], "-c", CONFIG, "-f", "0", "-tr", trainer,
                            "-p", PLANS, "-device", "cpu", "--disable_tta"], environment(workdir, seed))
    return out


def prior_alone_errors(model: Path, test_root: Path, truth: dict) -> dict:
    """{case: {landmark: error mm}} of the position prior alone: the model's logits decoded with its priors' heatmap
    error set so wide that the heatmap carries no weight (the boundary guard still acts)."""
    import dataclasses

    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    from nnunet_landmark.metrics import landmark_error_mm
    from nnunet_landmark.landmark_export import decode_landmarks
    from nnunet_landmark.prior.model import PositionPrior
    from nnunet_landmark.predictor import nnUNetLandmarkPredictor

    predictor = nnUNetLandmarkPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                                        allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
    heads = predictor.landmark_heads
    flat = tuple(PositionPrior({n: dataclasses.replace(p, heatmap_error_mm=1e9) for n, p in prior.landmarks.items()})
                 for prior in heads.position_priors)
    heads = dataclasses.replace(heads, position_priors=flat)
    label_manager = predictor.plans_manager.get_label_manager(predictor.dataset_json)
    c = heads.num_segmentation_heads
    out = {}
    for case, landmarks in truth.items():
        image, properties = SimpleITKIO().read_images([str(test_root / "ct_train" / f"{case}_image.nii.gz")])
        item = next(PreprocessAdapterFromNpy([image], [None], [properties], [None], predictor.plans_manager,
                                             predictor.dataset_json, predictor.configuration_manager, 1))
        logits = predictor.predict_logits_from_preprocessed_data(item["data"]).float().numpy()
        decoded = decode_landmarks(logits[c:], item["data_properties"], predictor.plans_manager,
                                   predictor.configuration_manager, heads, case, segmentation_logits=logits[:c],
                                   label_manager=label_manager)
        out[case] = {n: landmark_error_mm(decoded[n]["world"], landmarks[n]) if decoded[n]["estimator"] != "heatmap"
                     else float("nan") for n in LANDMARKS}
    return out


def score(workdir: Path, raw: Path, model: Path, predictions: Path, test_set: str, landmark_model: bool) -> list[dict]:
    """The demo's per-case rows of a prediction folder (``evaluate_test_set``), with the prior alone for a landmark
    model."""
    from nnunet_landmark.evaluation.baselines import fit_mean_positions
    from nnunet_landmark.evaluation.study.test_set import evaluate_test_set
    from nnunet_landmark.landmark_files import read_landmark_csv

    test_root = workdir / "unseen" / test_set
    truth = read_landmark_csv(test_root / "landmarks.csv")
    splits = json.loads((raw / "splits_final.json").read_text())
    mean_position = fit_mean_positions(raw, splits[0]["train"], ["apex"])["apex"]
    rows = evaluate_test_set(predictions, test_root, truth, mean_position)
    if landmark_model:
        # the in-process predictor looks the trainer up by name: the study's own trainers too
        os.environ["nnUNet_extTrainer"] = environment(workdir, 0)["nnUNet_extTrainer"]
        prior = prior_alone_errors(model, test_root, truth)
        for row in rows:
            row["prior_alone_errors_mm"] = prior[row["case"]]
    return rows


def learning_curve(model: Path, iterations_per_epoch: int = 50) -> dict:
    """Per epoch validation-patch heatmap error (mm), the iterations until it first reaches 10 and 5 mm, and the median
    epoch time (s)."""
    import torch

    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = checkpoint["logging"]
    errors = [float(e) for e in logging.get("val_landmark_errors_mm", [])]
    reach = {f"iterations_to_{t}mm": next(((i + 1) * iterations_per_epoch for i, e in enumerate(errors) if e <= t),
                                          None) for t in (10, 5)}
    times = np.asarray(logging["epoch_end_timestamps"]) - np.asarray(logging["epoch_start_timestamps"])
    return {"val_landmark_errors_mm": errors, **reach, "seconds_per_epoch_median": float(np.median(times))}


def fold_validation(model: Path, raw: Path) -> dict | None:
    """What nnU-Net's final validation of fold 0 measured (the data the choices are made on): LV and foreground-mean
    Dice, and per landmark the errors (mm) of the heatmap's extremum alone and of the written estimate (which, at the
    final validation, cannot yet weigh the heatmap by its validated error). None before the fold finished."""
    from nnunet_landmark.landmark_files import read_landmark_table, read_markups

    validation = model / "fold_0" / "validation"
    if not (validation / "summary.json").exists():
        return None
    summary = json.loads((validation / "summary.json").read_text())
    out = {"lv_dice": [c["metrics"]["1"]["Dice"] for c in summary["metric_per_case"]],
           "foreground_dice": [np.mean([m["Dice"] for m in c["metrics"].values()])
                               for c in summary["metric_per_case"]]}
    if (validation / "landmarks.csv").exists():
        rows = read_landmark_table(validation / "landmarks.csv")
        truth = {r["case"]: read_markups(raw / "landmarksTr" / f"{r['case']}.mrk.json") for r in rows}
        for key, columns in (("heatmap", ("heatmap_x", "heatmap_y", "heatmap_z")), ("written", ("x", "y", "z"))):
            out[key] = {n: [float(np.linalg.norm(np.array([float(r[c]) for c in columns]) - truth[r["case"]][n]))
                            for r in rows if r["name"] == n] for n in LANDMARKS}
    return out


def mean_max(values) -> str:
    """"mean / max" of the finite values, "n/a" without any."""
    from nnunet_landmark.metrics import format_summary

    return format_summary(values, "mean_max")
