"""Accuracy on the demo's protocol: the landmark model against plain nnU-Net and the rules, over several demo runs.

    nnUNetv2_landmark_demo -o runs/new_1 && nnUNetv2_landmark_demo -o runs/new_2     # two training runs
    python benchmarks/accuracy_demo.py --notes benchmarks/results/accuracy_notes.md \\
        --run "new defaults:runs/new_1" --run "new defaults:runs/new_2" --run "old defaults:old/run_1" ...

Each run is a finished ``nnUNetv2_landmark_demo`` output folder (20 training phantoms, fold 0, 10 unseen phantoms,
the landmark model and plain nnU-Net trained with the same budget). Runs with the same label are pooled (each run
is one training seed). Every number is recomputed here from the prediction files with the demo's own evaluation
(``nnunet_landmark.demo.evaluate_test_set``): LV Dice of both models (and the paired difference), and per landmark
the error of what ``nnUNetv2_predict`` wrote, of the heatmap's extremum alone (``landmarks.csv``), and of the best
rule on the model's own predicted segmentation (``demo.segmentation_rules``: the LV's tip for the apex; for a valve
the structure next to it where the dataset segments it, else the centre of the LV's base), the same rule on plain
nnU-Net's segmentation, and the mean training position. Writes ``--output`` (default
benchmarks/results/ACCURACY.md), the rows as JSON beside it and a box plot per landmark (``<output>_groups.png``).
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from common import RESULTS_DIR


def evaluate_run(folder: Path) -> dict:
    """Rows of one demo output folder: {"landmark": [...], "plain": [...]} per unseen case."""
    from nnunet_landmark.demo import DATASET
    from nnunet_landmark.evaluation.study.test_set import evaluate_test_set
    from nnunet_landmark.mmwhs import LANDMARKS
    from nnunet_landmark.evaluation.baselines import fit_mean_positions
    from nnunet_landmark.landmark_files import read_landmark_csv, read_landmark_table

    raw = folder / "nnUNet_raw" / DATASET
    truth = read_landmark_csv(folder / "unseen_phantoms" / "landmarks.csv")
    splits = json.loads((raw / "splits_final.json").read_text())
    mean_position = fit_mean_positions(raw, splits[0]["train"], ["apex"])["apex"]
    predictions = sorted(folder.glob("predictions_*"))
    landmark = [p for p in predictions if "Landmark" in p.name]
    plain = [p for p in predictions if "Landmark" not in p.name]
    if len(landmark) != 1 or len(plain) != 1:
        raise SystemExit(f"{folder}: expected one predictions_<landmark trainer> and one predictions_<plain trainer>")
    rows = {"landmark": evaluate_test_set(landmark[0], folder / "unseen_phantoms", truth, mean_position),
            "plain": evaluate_test_set(plain[0], folder / "unseen_phantoms", truth, mean_position),
            "trainers": [landmark[0].name[len("predictions_"):], plain[0].name[len("predictions_"):]],
            "landmarks": list(LANDMARKS)}
    rows["estimators"] = sorted({r.get("estimator") or "heatmap"
                                 for r in read_landmark_table(landmark[0] / "landmarks.csv")})
    return rows


def stats(values, digits: int = 2) -> str:
    """mean / median / max; a rule that found no structure (NaN) is left out and counted."""
    from nnunet_landmark.metrics import format_summary

    missing = int(np.isnan(np.asarray(values, dtype=float)).sum())
    return format_summary(values, "mean_median_max", digits) + (f" ({missing} without the structure)" if missing
                                                                  else "")


def group_markdown(label: str, runs: list[tuple[str, dict]]) -> str:
    landmark = [r for _, run in runs for r in run["landmark"]]
    plain = [r for _, run in runs for r in run["plain"]]
    names = runs[0][1]["landmarks"]
    diff = np.array([a["dice"] - b["dice"] for a, b in zip(landmark, plain)])
    lines = [f"### {label}: {len(runs)} training runs x {len(landmark) // len(runs)} unseen phantoms "
             f"(trainers `{runs[0][1]['trainers'][0]}` / `{runs[0][1]['trainers'][1]}`, estimator "
             f"{', '.join(sorted({e for _, run in runs for e in run['estimators']}))})", "",
             "| | mean / median / max | per run (mean) |", "|---|---|---|"]

    def per_run(key):
        return ", ".join(f"{np.nanmean([key(r) for r in run['landmark']]):.3f}" for _, run in runs)

    lines.append(f"| LV Dice, landmark model | {stats([r['dice'] for r in landmark], 3)} | "
                 f"{per_run(lambda r: r['dice'])} |")
    lines.append(f"| LV Dice, plain nnU-Net | {stats([r['dice'] for r in plain], 3)} | "
                 + ", ".join(f"{np.mean([r['dice'] for r in run['plain']]):.3f}" for _, run in runs) + " |")
    lines.append(f"| LV Dice, landmark - plain (paired) | {diff.mean():+.4f} (SD {diff.std(ddof=1):.4f}, "
                 f"min {diff.min():+.4f}) | " + ", ".join(
                     f"{np.mean([a['dice'] - b['dice'] for a, b in zip(run['landmark'], run['plain'])]):+.4f}"
                     for _, run in runs) + " |")
    for name in names:
        lines.append(f"| {name} (mm), what nnUNetv2_predict writes | "
                     f"{stats([r['landmark_errors_mm'][name] for r in landmark])} | "
                     f"{per_run(lambda r: r['landmark_errors_mm'][name])} |")
        lines.append(f"| {name} (mm), heatmap extremum alone | "
                     f"{stats([r['heatmap_extremum_errors_mm'][name] for r in landmark])} | "
                     f"{per_run(lambda r: r['heatmap_extremum_errors_mm'][name])} |")
        rule = landmark[0].get("rule_names", {}).get(name) or ("geometric tip of the LV" if name == "apex"
                                                               else "centre of the LV's base")
        lines.append(f"| {name} (mm), {rule}, landmark model's segmentation | "
                     f"{stats([r['rule_errors_mm'][name] for r in landmark])} | "
                     f"{per_run(lambda r: r['rule_errors_mm'][name])} |")
        lines.append(f"| {name} (mm), {rule}, plain nnU-Net's segmentation | "
                     f"{stats([r['rule_errors_mm'][name] for r in plain])} | " + ", ".join(
                         f"{np.nanmean([r['rule_errors_mm'][name] for r in run['plain']]):.2f}"
                         for _, run in runs) + " |")
    for name in names:
        lines.append(f"| {name}: distance outside the heart labels (mm, < 0 inside), what nnUNetv2_predict writes "
                     f"/ the true landmark | {stats([r['outside_heart_mm'][name] for r in landmark])} / "
                     f"{stats([r['truth_outside_heart_mm'][name] for r in landmark])} | "
                     f"{per_run(lambda r: r['outside_heart_mm'][name])} |")
    lines.append(f"| apex (mm), mean position of the training apices | "
                 f"{stats([r['error_mean_position_mm'] for r in landmark])} | |")
    return "\n".join(lines) + "\n"


def plot_groups(groups: "OrderedDict[str, list]", png: Path) -> None:
    """Box plots per landmark: what nnUNetv2_predict writes, the heatmap extremum and the rule on the model's LV, for
    every group (log scale: the extremum is tens of mm off where the estimate is one or two)."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    names = next(iter(groups.values()))[0][1]["landmarks"]
    series = (("landmark_errors_mm", "written"), ("heatmap_extremum_errors_mm", "heatmap extremum"),
              ("rule_errors_mm", "rule on own segmentation"))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 5), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        data, labels = [], []
        for label, runs in groups.items():
            rows = [r for _, run in runs for r in run["landmark"]]
            for key, short in series:
                data.append([v for v in (r[key][name] for r in rows) if np.isfinite(v)])
                labels.append(f"{label[:24]}\n{short}")
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=90, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("error (mm), unseen phantoms")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="LABEL:DEMO_OUTPUT_FOLDER (repeat)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "ACCURACY.md"))
    parser.add_argument("--notes", default=None, help="a markdown file whose text goes under the title (what the "
                                                          "runs were, what to read from them)")
    args = parser.parse_args()
    groups: "OrderedDict[str, list]" = OrderedDict()
    for item in args.run:
        label, _, folder = item.rpartition(":")
        groups.setdefault(label, []).append((folder, evaluate_run(Path(folder))))
    text = ["# Accuracy on the demo's protocol", "",
            "Produced by `python benchmarks/accuracy_demo.py` from finished `nnUNetv2_landmark_demo` folders: 20 "
            "training phantoms (fold 0: 16 train, 4 validation), 10 unseen phantoms, the landmark model and plain "
            "nnU-Net with the same CPU budget (2000 iterations, Adam). Each run is one training seed; errors in mm as "
            "mean / median / max over every case of every run of the group, and the mean of each run. \"What "
            "nnUNetv2_predict writes\" is the `x,y,z` of `landmarks.csv`, the heatmap extremum its `heatmap_x,y,z`; "
            "the rules work on the predicted segmentation: the LV's geometric tip for the apex; for the valves the "
            "centre of the LV/LA interface (mitral) and of the aorta's end toward the LV (aortic) where the dataset "
            "segments those structures, else the centre of the LV's wide end (the best we could write on an LV-only "
            "segmentation).", ""]
    if args.notes:
        text += [Path(args.notes).read_text().strip(), ""]
    png = Path(args.output).with_name(Path(args.output).stem + "_groups.png")  # not *_errors.png: accuracy_errors.png exists
    plot_groups(groups, png)
    text += [f"![errors per landmark and group]({png.name})", ""]
    for label, runs in groups.items():
        text.append(group_markdown(label, runs))
    Path(args.output).write_text("\n".join(text))
    Path(args.output).with_suffix(".json").write_text(json.dumps(
        {label: {folder: run for folder, run in runs} for label, runs in groups.items()}, indent=1, default=float))
    print("\n".join(text))


if __name__ == "__main__":
    main()
