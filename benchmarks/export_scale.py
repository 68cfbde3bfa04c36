"""Prediction export of one full-size CT (512 x 512 x 300): landmark export against plain nnU-Net's export.

    python benchmarks/export_scale.py --workdir /dev/shm    # both scenarios, with and without probabilities
    python benchmarks/export_scale.py --scenarios native --no-results
    git archive <commit> nnunet_landmark | tar -x -C /tmp/old && \
        python benchmarks/export_scale.py --workdir /dev/shm --baseline-source /tmp/old   # against an older export

On a shared machine, ``--workdir /dev/shm`` (inputs and outputs in memory, ~3 GB) keeps other users' disk
traffic out of the wall times; CPU times are reported beside them.

What is measured is what one nnU-Net export worker does with one case: the logits as ``nnUNetv2_predict``
hands them over (nnunetv2 2.8.1: a float16 numpy array in preprocessed space, C + K channels for a landmark
model, C for a plain one; the landmark plans carry ``nnUNetTrainerLandmark``'s default target and head) go through ``export_prediction_with_landmarks`` or nnU-Net's own
``export_prediction_from_logits``. Every measurement runs in a fresh process that loads its input from a
``.npy`` file (as the worker unpickles it) and reports its wall time for the export and its peak RSS
(``VmHWM``). Scenarios:

* ``native``: a case at the plans' target spacing (ResEnc-M 3d_fullres on MM-WHS plans the median spacing,
  0.6 x 0.43 x 0.43 mm), so preprocessing only crops: the heatmaps are 300 x 512 x 492 voxels;
* ``resampled``: an array stored (x, y, z) (nnU-Net transposes the coarse axis first), cropped, and
  resampled from 0.43 x 0.43 x 0.6 mm to 0.8 mm; the export resamples back.

These are measurements, not tests: nothing here fails on a number. Writes JSON (``--json``) and the
"Real size: prediction export" section of benchmarks/results/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import RESULTS_DIR, RESULTS_MD, machine, write_section

HERE = Path(__file__).resolve().parent
DATASET_ID = 896  # only named in the synthetic plans: no nnU-Net dataset is made
LANDMARKS = ("apex", "mitral_valve", "aortic_valve")
SEGMENTATION_LABELS = {"background": 0, "LV_blood_cavity": 1}
SECTION = "export-scale"


def scenario(name: str) -> dict:
    """Plans (landmark and plain), properties and the preprocessed shape of one synthetic full-size case."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    from nnunet_landmark.nnunet_integration import default_resampling

    if name == "native":
        shape, spacing, transpose_forward = (300, 512, 512), (0.6, 0.43, 0.43), [0, 1, 2]
        bbox = [[0, 300], [6, 506], [10, 502]]  # in transposed axes
        target = list(spacing)
    elif name == "resampled":
        shape, spacing, transpose_forward = (512, 512, 300), (0.43, 0.43, 0.6), [2, 0, 1]
        bbox = [[0, 300], [10, 502], [6, 506]]  # in transposed axes
        target = [0.8, 0.8, 0.8]
    else:
        raise ValueError(f"unknown scenario {name!r}")
    # nnU-Net transposes first, then crops: shape_before_cropping and the bbox are in transposed axes
    shape_t = [shape[i] for i in transpose_forward]
    cropped_t = [hi - lo for lo, hi in bbox]
    spacing_t = [spacing[i] for i in transpose_forward]
    preprocessed = [int(i) for i in compute_new_shape(cropped_t, spacing_t, target)]
    backward = [int(i) for i in np.argsort(transpose_forward)]
    resampling = default_resampling()
    plain = {"dataset_name": f"Dataset{DATASET_ID}_ExportScale", "plans_name": "nnUNetResEncUNetMPlans",
             "transpose_forward": transpose_forward, "transpose_backward": backward,
             "image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {
                 "0": {"mean": 100.0, "std": 50.0, "percentile_00_5": -200.0, "percentile_99_5": 600.0}},
             "configurations": {"3d_fullres": {
                 "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                 "patch_size": [160, 160, 160] if name == "native" else [128, 160, 160], "spacing": target,
                 "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False], **resampling,
                 "architecture": {}}}}
    landmark = json.loads(json.dumps(plain))
    landmark["nnunet_landmark"] = {"landmarks": list(LANDMARKS), "num_segmentation_heads": len(SEGMENTATION_LABELS),
                                   # nnUNetTrainerLandmark's defaults: the compact target, the decoupled head
                                   "heatmap_encoding": {"kind": "log_distance", "max_distance_mm": 30.0,
                                                        "scale_mm": 10.0, "sigma_mm": 4.0},
                                   "heatmap_head": {"kind": "decoupled", "channels": 16, "trunk_gradient_scale": 0.3,
                                                    "reads_segmentation": False,
                                                    "segmentation_nonlinearity": "softmax", "stride": 2}}
    sitk_spacing = tuple(float(s) for s in spacing[::-1])
    properties = {"spacing": list(spacing), "shape_before_cropping": tuple(shape_t), "bbox_used_for_cropping": bbox,
                  "shape_after_cropping_and_before_resampling": tuple(cropped_t),
                  "sitk_stuff": {"spacing": sitk_spacing, "origin": (-110.0, -120.0, 40.0),
                                 "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)}}
    return {"plans": {"landmark": landmark, "plain": plain}, "properties": properties,
            "preprocessed_shape": preprocessed, "target_spacing": target,
            "dataset_json": {"labels": SEGMENTATION_LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "CT"},
                             "numTraining": 1}}


def write_inputs(name: str, folder: Path, seed: int = 0) -> dict:
    """The logits of one case as .npy files: C + K channels (landmark model) and the same C alone (plain)."""
    from nnunet_landmark.heatmap_targets import HeatmapEncoding

    case = scenario(name)
    shape, spacing = case["preprocessed_shape"], np.asarray(case["target_spacing"])
    c, k = len(SEGMENTATION_LABELS), len(LANDMARKS)
    full = np.lib.format.open_memmap(folder / f"{name}_landmark.npy", "w+", np.float16, (c + k, *shape))
    rng = np.random.default_rng(seed)
    centre = np.asarray(shape) * 0.5
    grids = [(np.arange(n, dtype=np.float32) - np.float32(ct)) * np.float32(sp) for n, ct, sp in
             zip(shape, centre, spacing)]
    # the LV: an ellipsoid of ~35 mm semi-axes; logits +-8 away from its surface, as a trained network gives
    r2 = grids[0][:, None, None] ** 2 / 40 ** 2 + grids[1][None, :, None] ** 2 / 35 ** 2 + \
        grids[2][None, None, :] ** 2 / 30 ** 2
    lv = np.clip((1.0 - np.sqrt(r2)) * 40.0, -8.0, 8.0)
    full[0] = -lv
    full[1] = lv + rng.normal(0, 0.1, lv.shape).astype(np.float32)
    del r2, lv
    encoding = HeatmapEncoding()
    points = [(-20.0, 25.0, 18.0), (22.0, -8.0, -5.0), (15.0, 10.0, -12.0)]
    for j, p in enumerate(points):
        d = np.sqrt((grids[0][:, None, None] - p[0]) ** 2 + (grids[1][None, :, None] - p[1]) ** 2 +
                    (grids[2][None, None, :] - p[2]) ** 2)
        h = np.clip(encoding.encode(d), 1e-4, 1 - 1e-4)
        full[c + j] = np.log(h / (1 - h)) + rng.normal(0, 0.05, h.shape).astype(np.float32)
        del d, h
    full.flush()
    plain = np.lib.format.open_memmap(folder / f"{name}_plain.npy", "w+", np.float16, (c, *shape))
    plain[:] = full[:c]
    plain.flush()
    truth = [list(centre + np.asarray(p) / spacing) for p in points]
    return {"preprocessed_shape": shape, "true_preprocessed_index": truth}


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(name: str, mode: str, probabilities: bool, folder: Path) -> dict:
    """One export in this (fresh) process: seconds, peak RSS, and what was written."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_landmark import nnunet_integration
    from nnunet_landmark.landmark_export import export_prediction_with_landmarks, export_segmentation_from_logits

    from nnunet_landmark import landmark_export

    nnunet_integration.install(export_prediction_with_landmarks)
    landmark_seconds = []
    export_landmarks = landmark_export.export_landmarks

    def timed_export_landmarks(*args, **kwargs):  # the landmark part alone: less exposed to load from elsewhere
        start = time.perf_counter()
        try:
            return export_landmarks(*args, **kwargs)
        finally:
            landmark_seconds.append(time.perf_counter() - start)

    landmark_export.export_landmarks = timed_export_landmarks
    case = scenario(name)
    plans_manager = PlansManager(case["plans"][mode])
    configuration = plans_manager.get_configuration("3d_fullres")
    logits = np.load(folder / f"{name}_{mode}.npy")
    out = folder / f"out_{name}_{mode}_{int(probabilities)}"
    out.mkdir()
    rss_loaded = current_rss_mib()
    export = export_prediction_with_landmarks if mode == "landmark" else export_segmentation_from_logits
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    export(logits, case["properties"], configuration, plans_manager, case["dataset_json"], str(out / "case"),
           probabilities)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    written = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    import nnunet_landmark
    result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mib": peak_rss_mib(),
              "rss_after_loading_mib": rss_loaded, "input_mib": logits.nbytes / 2 ** 20,
              "landmark_part_seconds": sum(landmark_seconds), "package": nnunet_landmark.__file__,
              "written_bytes": written}
    if mode == "landmark":
        result["landmarks_csv"] = (out / "landmarks.csv").read_text()
    return result


def run_child(name: str, mode: str, probabilities: bool, folder: Path, source: str) -> dict:
    command = [sys.executable, __file__, "--child", name, mode, str(int(probabilities)), str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": source})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The first run with the median times and peak, and every run's numbers."""
    out = dict(runs[0])
    for key in ("seconds", "cpu_seconds", "peak_rss_mib", "landmark_part_seconds"):
        out[key] = float(np.median([r[key] for r in runs]))
        out[f"all_{key}"] = [r[key] for r in runs]
    return out


def table(results: dict) -> str:
    """Markdown: per scenario and probabilities, landmark (and baseline) against plain."""
    variants = [v for v in ("landmark", "landmark_baseline") if any(
        v in run for entry in results["scenarios"].values() for run in entry["runs"].values())]
    label = {"landmark": "landmark", "landmark_baseline": "landmark before"}
    lines = ["| scenario (preprocessed shape) | probabilities | export | wall s | CPU s | peak RSS MiB | wall ratio "
             "| CPU ratio | RSS ratio | RSS ratio less inputs | landmark part, wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["scenarios"].items():
        for key, run in entry["runs"].items():
            plain = run["plain"]
            rows = [("plain nnU-Net", plain, False)] + [(label[v], run[v], True) for v in variants]
            for i, (what, r, ratio) in enumerate(rows):
                cells = [f"{name} {' x '.join(map(str, entry['preprocessed_shape']))}" if i == 0 else "",
                         key if i == 0 else "", what, f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.1f}",
                         f"{r['peak_rss_mib']:.0f}"]
                if ratio:
                    less = (r["peak_rss_mib"] - r["input_mib"]) / (plain["peak_rss_mib"] - plain["input_mib"])
                    cells += [f"{r['seconds'] / plain['seconds']:.2f}", f"{r['cpu_seconds'] / plain['cpu_seconds']:.2f}",
                              f"{r['peak_rss_mib'] / plain['peak_rss_mib']:.2f}", f"{less:.2f}",
                              f"{r['landmark_part_seconds']:.2f}"]
                else:
                    cells += [""] * 5
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--scenarios", nargs="+", default=["native", "resampled"], choices=["native", "resampled"])
    parser.add_argument("--probabilities", nargs="+", default=["without", "with"], choices=["without", "with"])
    parser.add_argument("--json", default=str(RESULTS_DIR / "export_scale.json"))
    parser.add_argument("--results", default=str(RESULTS_MD))
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each export without probabilities (median)")
    parser.add_argument("--repeats-with-probabilities", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temporary folder)")
    parser.add_argument("--source", default=str(HERE.parent),
                        help="folder holding the nnunet_landmark package to measure (default: this checkout)")
    parser.add_argument("--baseline-source", default=None,
                        help="another nnunet_landmark (e.g. an older commit's, from git archive) measured alike")
    args = parser.parse_args()
    if args.child:
        name, mode, probabilities, folder = args.child
        print(json.dumps(child(name, mode, probabilities == "1", Path(folder))))
        return
    variants = {"landmark": ("landmark", args.source), "plain": ("plain", args.source)}
    if args.baseline_source:
        variants["landmark_baseline"] = ("landmark", args.baseline_source)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "source": args.source, "baseline_source": args.baseline_source,
               "input": "float16 numpy logits in preprocessed space (what nnunetv2 2.8.1 hands its export workers); "
                        f"C = {len(SEGMENTATION_LABELS)} segmentation + K = {len(LANDMARKS)} heatmap channels",
               "load_average_at_start": os.getloadavg(), "scenarios": {}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        for name in args.scenarios:
            # -c has no script folder on sys.path: it is put there; PYTHONPATH picks the nnunet_landmark measured
            subprocess.run([sys.executable, "-c", f"import sys, json; sys.path.insert(0, {str(HERE)!r}); "
                            f"import export_scale as e; from pathlib import Path; json.dump(e.write_inputs("
                            f"{name!r}, Path({tmp!r})), open(Path({tmp!r}) / '{name}.json', 'w'))"],
                           check=True, env={**os.environ, "PYTHONPATH": args.source})
            entry = json.loads((folder / f"{name}.json").read_text())
            entry["runs"] = {}
            for key in args.probabilities:
                repeats = args.repeats if key == "without" else args.repeats_with_probabilities
                runs = {variant: [] for variant in variants}
                for _ in range(repeats):  # interleaved, so that load from elsewhere hits every variant alike
                    for variant, (mode, source) in variants.items():
                        runs[variant].append(run_child(name, mode, key == "with", folder, source))
                        shutil.rmtree(folder / f"out_{name}_{mode}_{int(key == 'with')}")
                        print(name, key, variant, {k: v for k, v in runs[variant][-1].items()
                                                   if k not in ("written_bytes", "landmarks_csv")}, flush=True)
                entry["runs"][key] = {variant: median_run(r) for variant, r in runs.items()}
                if args.baseline_source:
                    entry["runs"][key]["same_landmarks_as_baseline"] = \
                        runs["landmark"][0]["landmarks_csv"] == runs["landmark_baseline"][0]["landmarks_csv"]
            for suffix in ("landmark", "plain"):
                (folder / f"{name}_{suffix}.npy").unlink()
            results["scenarios"][name] = entry
    results["load_average_at_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))
    if not args.no_results:
        write_results(Path(args.results), results)


def write_results(path: Path, results: dict) -> None:
    same = [run.get("same_landmarks_as_baseline") for entry in results["scenarios"].values()
            for run in entry["runs"].values()]
    load = results.get("load_note") or (f"load average {results['load_average_at_start'][0]:.1f} at the start, "
                                        f"{results['load_average_at_end'][0]:.1f} at the end"
                                        if "load_average_at_end" in results else "")
    text = (f"## Real size: prediction export\n\n"
            f"Machine: {results['machine']}{'; ' + load if load else ''}  \nDate: {results['date']}  \n"
            f"One 512 x 512 x 300 CT case through one export worker; input: {results['input']}. Every number is a "
            f"fresh process (median of the repeats): wall and CPU time of the export call, peak RSS (`VmHWM`). "
            f"The peaks include the input array, and the landmark input holds K more channels than plain "
            f"nnU-Net's; \"RSS ratio less inputs\" divides the peaks less each input. \"landmark part\" is the time "
            f"inside the export spent on landmarks (decoding, markups, table, heatmaps), the rest being nnU-Net's "
            f"own export of the C channels. \"landmark before\" is the export "
            f"before this work, measured in the same run. Produced by `python benchmarks/export_scale.py"
            f"{' --baseline-source ...' if results.get('baseline_source') else ''}`; raw numbers in "
            f"`benchmarks/results/export_scale.json`.\n\n{table(results)}\n")
    if any(s is not None for s in same):
        text += f"\nlandmarks.csv identical to the export before, in every run: {all(same)}.\n"
    text += (
        "\nWhere the differences come from:\n\n"
        "* Peak RSS: the input. nnU-Net hands an export worker the C + K channels in one float16 array, so a "
        "landmark worker holds K x 2 bytes a voxel more from the start; less the inputs, the peaks are equal. "
        "Decoding makes no full-volume temporaries (the reliable region is evaluated box by box, float16 logits "
        "are searched in place) and heatmap files are written one at a time, below nnU-Net's own peak.\n"
        "* Time without probabilities: the landmark part (decoding K landmarks, markups, table) is a small "
        "fraction of nnU-Net's own export. In these fresh processes nnU-Net's own export of the C channels took "
        "longer inside the landmark export than alone (its float16 argmax dominates both); in one process, "
        "alternating the plain input and the C-channel view of the landmark input, the same call took 1.2-2.8 s "
        "either way, so that gap was not attributed to anything the landmark export does.\n"
        "* Time with probabilities: the K heatmap files are what plain nnU-Net does not write (it writes C "
        "probability channels). They are written where they were decoded, on the preprocessed grid at the "
        "decoupled head's stride (every second voxel: 1/8 of the voxels), not resampled to the image grid: "
        "before, K resamplings and K full-size gzip streams cost ~12 s here.\n"
        "* On a shared machine wall times mostly measure waiting for a CPU (see the load average above); "
        "CPU times are the ones to compare.\n")
    write_section(path, SECTION, text)


if __name__ == "__main__":
    main()
