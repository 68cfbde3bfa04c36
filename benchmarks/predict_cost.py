"""The whole ``nnUNetv2_predict`` command, a landmark model against a plain nnU-Net model, on the same images.

    python benchmarks/predict_cost.py --landmark-model L --plain-model P --inputs IMAGES --workdir W --repeats 3
    python benchmarks/predict_cost.py ... --reference OLD/landmarks.csv     # and how far the landmarks moved
    python benchmarks/predict_cost.py ... --results                         # section "predict-cost" of RESULTS.md

Both model folders (fold 0) predict every image of ``--inputs`` with the stock command
``nnUNetv2_predict_from_modelfolder -f 0 -device cpu --disable_tta``, without and with ``--save_probabilities``.
Runs are interleaved (plain, landmark, landmark, plain, ...: the order alternates per repeat), every run a fresh
process tree writing to an empty folder; reported: the median wall seconds and CPU seconds of the process tree (its
workers included) per model, and their ratios. ``--reference``: the landmarks.csv of an earlier prediction of the same
images by the same landmark model; the largest distance (mm) between its rows and this run's. Where
``nnUNet_extTrainer`` must name a folder of study trainers (``heatmap_ablation.py``'s models), pass ``--ext-trainer``.
A measurement, not a test: nothing fails on a number.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from common import RESULTS_MD, machine, write_section


def run_prediction(model: Path, inputs: Path, output: Path, probabilities: bool, env: dict) -> dict:
    """Wall and CPU seconds of one ``nnUNetv2_predict_from_modelfolder`` (a fresh output folder)."""
    from nnunet_landmark.phantom_dataset import console_script

    shutil.rmtree(output, ignore_errors=True)
    command = [console_script("nnUNetv2_predict_from_modelfolder"), "-i", str(inputs), "-o", str(output),
               "-m", str(model), "-f", "0", "-device", "cpu", "--disable_tta"]
    if probabilities:
        command.append("--save_probabilities")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def landmark_shift_mm(reference: Path, table: Path) -> float:
    """Largest distance (mm) between the rows of two landmarks.csv of the same cases and landmarks."""
    import numpy as np

    from nnunet_landmark.landmark_files import read_landmark_csv

    old, new = read_landmark_csv(reference), read_landmark_csv(table)
    if set(old) != set(new):
        raise RuntimeError(f"{reference} and {table} hold different cases")
    return max(float(np.linalg.norm(np.asarray(old[c][n]) - np.asarray(new[c][n]))) for c in old for n in old[c])


def measure(args) -> dict:
    env = {"nnUNet_def_n_proc": str(args.processes)}
    if args.ext_trainer:
        env["nnUNet_extTrainer"] = os.pathsep.join(p for p in (str(args.ext_trainer),
                                                               os.environ.get("nnUNet_extTrainer")) if p)
    models = {"plain": args.plain_model, "landmark": args.landmark_model}
    modes = {"without": False, "with": True}
    runs = {mode: {m: [] for m in models} for mode in modes}
    shifts = []
    for repeat in range(args.repeats):
        order = list(models) if repeat % 2 == 0 else list(models)[::-1]
        for mode, probabilities in modes.items():
            for name in order:
                output = args.workdir / f"{name}_{mode}"
                runs[mode][name].append(run_prediction(models[name], args.inputs, output, probabilities, env))
                print(f"repeat {repeat} {mode} probabilities {name}: {runs[mode][name][-1]}", flush=True)
                if name == "landmark" and args.reference:
                    shifts.append(landmark_shift_mm(args.reference, output / "landmarks.csv"))
    cases = len(list(args.inputs.glob("*_0000.nii.gz")))
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_end": os.getloadavg()[0], "inputs": str(args.inputs), "cases": cases,
            "landmark_model": str(args.landmark_model), "plain_model": str(args.plain_model),
            "repeats": args.repeats, "processes": args.processes, "runs": runs,
            "largest_landmark_shift_mm": max(shifts) if shifts else None}


def table(result: dict) -> str:
    lines = [f"Machine: {result['machine']}; 1-minute load average {result['load_average_end']:.1f} at the end  ",
             f"Date: {result['date']}  ",
             f"{result['cases']} cases of `{result['inputs']}`; `nnUNetv2_predict_from_modelfolder -f 0 -device cpu "
             f"--disable_tta` with `nnUNet_def_n_proc={result['processes']}`; {result['repeats']} interleaved repeats "
             f"(median). Produced by `python benchmarks/predict_cost.py`.", "",
             "| `--save_probabilities` | plain wall s | landmark wall s | wall ratio | plain CPU s | landmark CPU s | "
             "CPU ratio | target |", "|---|---|---|---|---|---|---|---|"]
    for mode, target in (("without", "<= 1.05"), ("with", "<= 1.10")):
        med = {m: {k: statistics.median(r[k] for r in result["runs"][mode][m]) for k in ("wall_s", "cpu_s")}
               for m in ("plain", "landmark")}
        lines.append(f"| {mode} | {med['plain']['wall_s']:.1f} | {med['landmark']['wall_s']:.1f} | "
                     f"{med['landmark']['wall_s'] / med['plain']['wall_s']:.3f} | {med['plain']['cpu_s']:.1f} | "
                     f"{med['landmark']['cpu_s']:.1f} | {med['landmark']['cpu_s'] / med['plain']['cpu_s']:.3f} | "
                     f"{target} |")
    if result["largest_landmark_shift_mm"] is not None:
        lines += ["", f"Largest landmark shift against the reference table, over every run: "
                      f"{result['largest_landmark_shift_mm']:.4f} mm."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--landmark-model", type=Path, required=True)
    parser.add_argument("--plain-model", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True, help="a folder of CASE_0000.nii.gz images")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="nnUNet_def_n_proc (nnU-Net's worker processes)")
    parser.add_argument("--ext-trainer", type=Path, default=None, help="a folder for nnUNet_extTrainer")
    parser.add_argument("--reference", type=Path, default=None, help="an earlier landmarks.csv of the same images")
    parser.add_argument("--results", action="store_true", help="write section 'predict-cost' of results/RESULTS.md")
    parser.add_argument("--title", default="Demo scale: the whole `nnUNetv2_predict`")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    (args.workdir / "predict_cost.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    print(text)
    if args.results:
        write_section(RESULTS_MD, "predict-cost", f"## {args.title}\n\n{text}")


if __name__ == "__main__":
    main()
