"""The report of ``predict_startup.py``: medians per phase and per step, the markdown tables, the bullets naming where
the landmark model's extra seconds go, and the section "predict-startup" of ``results/RESULTS.md``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import write_section
from predict_startup_measure import (PHASES, STEP_CHECK, STEP_EXPORT, STEP_EXPORT_IMPORT, STEP_EXT, STEP_IMPORT,
                                     STEP_INIT, STEP_LOAD, STEP_LOOKUP, STEP_NETWORK, STEP_OWN, STEP_PICKLE,
                                     STEP_REST, STEP_RUN_CASE, STEP_SLIDING)
from predict_startup_setup import CONFIGURATION, DATASET_ID, FEATURES, LANDMARKS, PLANS, TRAINERS

SECTION = "predict-startup"


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


def write_results(path: Path, results: dict, bullets: list[str]) -> None:
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
