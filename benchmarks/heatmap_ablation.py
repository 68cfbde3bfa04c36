"""Heatmap arms side by side: which target, loss and head make the heatmap localise on the demo's CPU budget.

    python benchmarks/heatmap_ablation.py --workdir /tmp/arms --arms plain decoupled paper --seeds 1 2 3
    python benchmarks/heatmap_ablation.py --workdir /tmp/arms --report        # tables from every finished run

The demo's setting: its dataset recipe (20 phantoms of 64 x 64 x 48 voxels, ~3.4 mm, seed 2026, the seven MM-WHS
structures, apex, mitral and aortic valve, fold 0 of 5) and its CPU budget (``nnUNetTrainerLandmark_cpu_learn``: 40 x 50
iterations, Adam 1e-3, 32^3 patches, no mirroring; each arm sets its heatmap options on top, see ``ARMS``). Each arm is
trained once per seed (``nnUNet_landmark_seed``) with ``nnUNetv2_train``, then predicts with ``nnUNetv2_predict`` (no
TTA) the demo's 10 unseen phantoms (seed 2027) and 20 more of another seed (555). Per case: LV Dice and the mean Dice
of the seven structures; per landmark the error (mm) of what ``nnUNetv2_predict`` writes, of the heatmap extremum
alone, of the position prior alone (the same model decoded with the heatmap left out) and of the best rule on the
predicted segmentation; from the training log, the iterations until the validation patches' heatmap error first
reaches 10 and 5 mm. Results go to ``<workdir>/runs/<arm>_seed<N>.json``; ``--report`` writes ``--output`` (markdown)
with the JSON beside it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import (CONFIG, LANDMARK_BASE, LANDMARKS, PLAIN_BASE, PLANS, RESULTS_DIR, fold_validation, learning_curve,
                    make_test_set, mean_max, predict, prepare_dataset, score, train, write_trainer_variants)

DATASET_ID, NAME = 871, "HeatmapArms"
DATASET = f"Dataset{DATASET_ID}_{NAME}"
TEST_SETS = {"demo": (2027, 10, 3001), "extra": (555, 20, 4001)}  # name: (phantom seed, cases, first case number)
COMPACT = dict(heatmap_max_distance_mm=30.0, heatmap_scale_mm=10.0, heatmap_loss_reduction="landmark")

# name -> (description, base trainer, attributes set on top of it)
ARMS = {
    "plain": ("plain nnU-Net, same optimizer and budget", PLAIN_BASE, {}),
    "cpu_beta1": ("the CPU budget before this work: dense log-distance, patch-mean MSE, shared layer, beta 1",
                  LANDMARK_BASE, {}),
    "paper": ("the paper: dense log-distance, patch-mean MSE at full resolution only, shared layer, beta 10",
              LANDMARK_BASE, dict(heatmap_deep_supervision=False, heatmap_loss_weight=10.0)),
    "compact_shared": ("log-distance clipped at 30 mm, MSE per landmark (sum / ball), shared layer, beta 10",
                       LANDMARK_BASE, dict(COMPACT, heatmap_loss_weight=10.0)),
    "compact_shared_oversample": ("compact_shared + 33% of patches centred near a landmark", LANDMARK_BASE,
                                  dict(COMPACT, heatmap_loss_weight=10.0, landmark_oversample_percent=0.33)),
    "decoupled": ("compact_shared_oversample through a decoupled head at full resolution, no gradient into the trunk",
                  LANDMARK_BASE, dict(COMPACT, heatmap_loss_weight=10.0, landmark_oversample_percent=0.33,
                                      heatmap_head="decoupled", heatmap_trunk_gradient_scale=0.0, heatmap_head_stride=1,
                                      heatmap_head_reads_segmentation=True)),
    "decoupled_g01": ("decoupled at half resolution, 0.1 of its gradient into the trunk", LANDMARK_BASE,
                      dict(COMPACT, heatmap_loss_weight=10.0, landmark_oversample_percent=0.33,
                           heatmap_head="decoupled", heatmap_trunk_gradient_scale=0.1, heatmap_head_stride=2)),
    "decoupled_s2": ("decoupled at half resolution, no gradient into the trunk", LANDMARK_BASE,
                     dict(COMPACT, heatmap_loss_weight=10.0, landmark_oversample_percent=0.33,
                          heatmap_head="decoupled", heatmap_trunk_gradient_scale=0.0, heatmap_head_stride=2)),
    "decoupled_g03": ("decoupled at half resolution, 0.3 of its gradient into the trunk", LANDMARK_BASE,
                      dict(COMPACT, heatmap_loss_weight=10.0, landmark_oversample_percent=0.33,
                           heatmap_head="decoupled", heatmap_trunk_gradient_scale=0.3, heatmap_head_stride=2)),
    "decoupled_g1": ("decoupled at half resolution, all of its gradient into the trunk", LANDMARK_BASE,
                     dict(COMPACT, heatmap_loss_weight=10.0, landmark_oversample_percent=0.33,
                          heatmap_head="decoupled", heatmap_trunk_gradient_scale=1.0, heatmap_head_stride=2)),
    "decoupled_g01_seg": ("decoupled_g01, the head also reading the segmentation's probabilities", LANDMARK_BASE,
                          dict(COMPACT, heatmap_loss_weight=10.0, landmark_oversample_percent=0.33,
                               heatmap_head="decoupled", heatmap_trunk_gradient_scale=0.1, heatmap_head_stride=2,
                               heatmap_head_reads_segmentation=True)),
    "nnlandmark": ("nnLandmark's recipe: cone of 15 voxels, BCE over the hardest 20% of voxels, 33% landmark "
                   "patches, shared layer, beta 1", LANDMARK_BASE,
                   dict(heatmap_encoding="cone", heatmap_loss="bce", heatmap_loss_reduction="topk",
                        heatmap_topk_fraction=0.2, landmark_oversample_percent=0.33, heatmap_loss_weight=1.0)),
}



def trainer_name(arm: str) -> str:
    return f"nnUNetTrainerHeatmapArm_{arm}"


def run_arm(workdir: Path, arm: str, seed: int) -> dict:
    """Train one arm with one seed, predict both test sets, score them."""
    import time

    start = time.perf_counter()
    model = train(workdir, DATASET, trainer_name(arm), seed)
    result = {"arm": arm, "seed": seed, "description": ARMS[arm][0], "trainer": trainer_name(arm),
              "head": json.loads((model / "plans.json").read_text()).get("nnunet_landmark", {}).get("heatmap_head"),
              "train_seconds": time.perf_counter() - start, "test_sets": {}}
    if arm != "plain":
        result.update(learning_curve(model))
    for test_set in TEST_SETS:
        predictions = predict(workdir, DATASET, trainer_name(arm), seed, test_set, f"{arm}_seed{seed}")
        result["test_sets"][test_set] = score(workdir, workdir / "nnUNet_raw" / DATASET, model, predictions, test_set,
                                              arm != "plain")
    return result


def _final(run: dict) -> str:
    errors = run["val_landmark_errors_mm"]
    return f"{errors[-1]:.1f}" if errors else "n/a"


def validation_table(workdir: Path, by_arm: dict) -> list[str]:
    """Fold 0's validation cases (what the choices are made on): Dice paired against plain, the heatmap alone."""
    from nnunet_landmark.results_folder import results_folder

    raw = workdir / "nnUNet_raw" / DATASET
    measured = {(arm, r["seed"]): fold_validation(results_folder(DATASET, trainer_name(arm), PLANS, CONFIG,
                                                                 results=workdir / f"nnUNet_results_seed{r['seed']}"),
                                                  raw)
                for arm, rs in by_arm.items() for r in rs}
    lines = ["#### Fold 0's validation cases (the choice is made here; mean / max over every case of every seed)", "",
             "| arm | seeds | LV Dice (landmark - plain, paired) | foreground Dice (landmark - plain) | "
             + " | ".join(f"{n}: heatmap alone" for n in LANDMARKS) + " |", "|---|---|---|---|" + "---|" * len(LANDMARKS)]
    for arm in ARMS:
        seeds = sorted(seed for a, seed in measured if a == arm and measured[(a, seed)] is not None)
        if not seeds:
            continue
        paired = {k: [v - p for seed in seeds if measured.get(("plain", seed))
                      for v, p in zip(measured[(arm, seed)][k], measured[("plain", seed)][k])]
                  for k in ("lv_dice", "foreground_dice")}
        cells = [arm, ", ".join(map(str, seeds))]
        for k in ("lv_dice", "foreground_dice"):
            values = [v for seed in seeds for v in measured[(arm, seed)][k]]
            cells.append(f"{np.mean(values):.3f} ({np.mean(paired[k]) if paired[k] else float('nan'):+.4f})")
        cells += [mean_max([e for seed in seeds for e in measured[(arm, seed)].get("heatmap", {}).get(n, [])])
                  if arm != "plain" else "" for n in LANDMARKS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def report(workdir: Path, output: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((workdir / "runs").glob("*.json"))]
    by_arm: dict[str, list] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    plain = {r["seed"]: r for r in by_arm.get("plain", [])}
    lines = validation_table(workdir, by_arm)
    for test_set in TEST_SETS:
        lines += [f"#### Unseen phantoms `{test_set}` (mean / max over every case of every seed)", "",
                  "| arm | seeds | LV Dice (landmark - plain, paired) | foreground Dice (landmark - plain) | "
                  + " | ".join(f"{n}: heatmap alone | {n}: prior alone | {n}: written | {n}: best rule"
                               for n in LANDMARKS) + " |",
                  "|---|---|---|---|" + "---|" * (4 * len(LANDMARKS))]
        for arm in ARMS:
            if arm not in by_arm:
                continue
            rows = [(r["seed"], row) for r in by_arm[arm] for row in r["test_sets"][test_set]]
            paired = [(row["dice"] - p["dice"], row["foreground_dice"] - p["foreground_dice"])
                      for seed, row in rows if seed in plain
                      for p in plain[seed]["test_sets"][test_set] if p["case"] == row["case"]]
            lv = np.mean([row["dice"] for _, row in rows])
            fg = np.mean([row["foreground_dice"] for _, row in rows])
            d = np.asarray(paired) if paired else np.full((1, 2), np.nan)
            cells = [f"{arm}", ", ".join(str(s) for s in sorted({s for s, _ in rows})),
                     f"{lv:.3f} ({np.mean(d[:, 0]):+.4f})", f"{fg:.3f} ({np.mean(d[:, 1]):+.4f})"]
            for n in LANDMARKS:
                if arm == "plain":
                    cells += ["", "", "", mean_max([row["rule_errors_mm"][n] for _, row in rows])]
                    continue
                cells += [mean_max([row["heatmap_extremum_errors_mm"][n] for _, row in rows]),
                          mean_max([row["prior_alone_errors_mm"][n] for _, row in rows]),
                          mean_max([row["landmark_errors_mm"][n] for _, row in rows]),
                          mean_max([row["rule_errors_mm"][n] for _, row in rows])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["#### Learning: iterations until the validation patches' heatmap error first reaches 10 / 5 mm, per "
              "seed; final validation-patch error (mm); training seconds per epoch (median)", "",
              "| arm | what | to 10 mm | to 5 mm | final (mm) | s / epoch |", "|---|---|---|---|---|---|"]
    for arm, (description, _, _) in ARMS.items():
        if arm not in by_arm or arm == "plain":
            continue
        rs = sorted(by_arm[arm], key=lambda r: r["seed"])
        lines.append(f"| {arm} | {description} | {', '.join(str(r['iterations_to_10mm']) for r in rs)} | "
                     f"{', '.join(str(r['iterations_to_5mm']) for r in rs)} | "
                     f"{', '.join(_final(r) for r in rs)} | "
                     f"{np.median([r['seconds_per_epoch_median'] for r in rs]):.1f} |")
    text = "\n".join(lines) + "\n"
    output.write_text(text)
    output.with_suffix(".json").write_text(json.dumps(runs, indent=1, default=float))
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--arms", nargs="+", default=[], choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--report", action="store_true", help="write the tables from every finished run")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "heatmap_arms.md")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    write_trainer_variants(workdir / "trainers", {trainer_name(a): (base, settings)
                                                  for a, (_, base, settings) in ARMS.items()})
    prepare_dataset(workdir, DATASET_ID, NAME, "analytic", seed=2026)
    for name, (seed, cases, first) in TEST_SETS.items():
        make_test_set(workdir, name, "analytic", seed, cases, first)
    (workdir / "runs").mkdir(exist_ok=True)
    for seed in args.seeds:
        for arm in args.arms:
            out = workdir / "runs" / f"{arm}_seed{seed}.json"
            if out.exists():
                continue
            result = run_arm(workdir, arm, seed)
            out.write_text(json.dumps(result, indent=1, default=float))
            print(arm, seed, {n: mean_max([r["heatmap_extremum_errors_mm"][n] for r in result["test_sets"]["demo"]])
                              for n in LANDMARKS} if arm != "plain" else "", flush=True)
    if args.report:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        print(report(workdir, args.output))


if __name__ == "__main__":
    main()
