"""What stock ``nnUNetv2_predict`` spends around the network, landmark model against plain nnU-Net (CPU).

    python benchmarks/predict_startup.py                  # 2 repeats; tables printed, JSON in the work folder
    python benchmarks/predict_startup.py --results        # and its section "predict-startup" of results/RESULTS.md
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
and, with ``--results``, the "predict-startup" section of benchmarks/results/RESULTS.md. The set-up is in
``predict_startup_setup.py``, the measurements (and the ``--child`` processes) in ``predict_startup_measure.py``,
the tables and the section in ``predict_startup_report.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import RESULTS_MD, machine
from predict_startup_measure import (child_export_import, child_pipeline, child_startup, import_difference,
                                     parse_importtime, predict, run_child)
from predict_startup_report import findings, summarize, table, write_results
from predict_startup_setup import TRAINERS, make_case, make_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each model, each measurement (median)")
    parser.add_argument("--step-size", type=float, default=1.0, help="sliding window step (the same for both)")
    parser.add_argument("--device", default="cpu", help="-device of nnUNetv2_predict (the tables are made for cpu)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "predict_startup"),
                        help="models, the case and outputs (kept: a rerun reuses the models and the case)")
    parser.add_argument("--json", default=None, help="raw numbers (default: WORKDIR/predict_startup.json)")
    parser.add_argument("--results", nargs="?", const=str(RESULTS_MD), default=None, metavar="MARKDOWN",
                        help="write the section \"predict-startup\" there (default: benchmarks/results/RESULTS.md)")
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
