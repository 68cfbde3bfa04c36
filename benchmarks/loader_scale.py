"""Data loader cost at real scale: landmark loader / plain nnU-Net loader on MM-WHS-size CT.

    python benchmarks/loader_scale.py                    # prepare (cached), measure, print, write JSON and RESULTS.md
    python benchmarks/loader_scale.py --results-md ''    # the same, without touching RESULTS.md

MM-WHS CT is 512 x 512 x 177-363 voxels at 0.43 mm in-plane and 0.45-0.625 mm slices. Phantoms of that size
(``phantoms.py``, preset ``realistic``) are converted with 1 landmark (apex) and with 3 (apex, mitral and
aortic valve), planned with ``nnUNetPlannerResEncM`` (3d_fullres) and preprocessed once; everything is cached
under benchmarks/output/loader_scale/ (git ignores it).

Measured: seconds per training batch of the trainer's own training loader (its ``get_training_transforms``,
full nnU-Net augmentation, single-threaded, at the planned 3d_fullres patch and batch size) for
``nnUNetTrainerLandmark`` and for plain nnU-Net's loader built by the same trainer, with the same samples and
the same random draws (both seeded identically before every batch). A benchmark, not a test: it prints a
table, writes benchmarks/output/loader_scale/results.json and the section "loader-scale" of
benchmarks/results/RESULTS.md; nothing fails on a number.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from common import RESULTS_MD, machine, write_section

HERE = Path(__file__).resolve().parent
WORKDIR = HERE / "output" / "loader_scale"
PLANS = "nnUNetResEncUNetMPlans"
DATASETS = {1: (951, "MMWHSScale_1landmark", ["apex"]),
            3: (953, "MMWHSScale_3landmarks", ["apex", "mitral_valve", "aortic_valve"])}


def environment() -> dict:
    return {"nnUNet_raw": str(WORKDIR / "raw"), "nnUNet_preprocessed": str(WORKDIR / "preprocessed"),
            "nnUNet_results": str(WORKDIR / "results"), "nnUNet_compile": "0"}


def prepare(cases: int) -> None:
    """MM-WHS-size phantoms, converted with 1 and 3 landmarks, planned and preprocessed (cached)."""
    from nnunet_landmark.phantom_dataset import prepare_phantom_dataset
    from nnunet_landmark.mmwhs import LANDMARKS

    phantoms = WORKDIR / "mmwhs"
    # the landmarks' sphere masks, one folder each
    annotations = [f"{n}={phantoms / n}" if n != "apex" else str(phantoms / "apex") for n in LANDMARKS]
    for dataset_id, name, landmarks in DATASETS.values():
        # one process: a 512 x 512 x 300 case needs several GiB while it is resampled
        prepare_phantom_dataset(environment(), dataset_id, phantoms, name=name, landmarks=landmarks, folds=2,
                                num_cases=cases, seed=11, size="realistic", annotations=annotations, processes=1,
                                fingerprint_processes=1, overwrite=True, small_configuration=False, echo=True)


def loaders(k: int):
    """(landmark loader, plain loader) of nnUNetTrainerLandmark for the dataset with ``k`` landmarks, fold 'all'.

    Both are built by the trainer's own ``get_dataloaders`` (so with its ``get_training_transforms`` and planned
    patch/batch size); the plain one with nnU-Net's own ``nnUNetDataLoader`` in place of the landmark loader.
    """
    os.environ.update(environment())  # before nnunetv2.paths is imported
    os.environ["nnUNet_n_proc_DA"] = "0"  # SingleThreadedAugmenter: we call the loaders ourselves
    import torch
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_landmark import nnunet_integration
    from nnunet_landmark.training.trainers import nnUNetTrainerLandmark

    folder = WORKDIR / "preprocessed" / f"Dataset{DATASETS[k][0]:03d}_{DATASETS[k][1]}"
    plans = {**json.loads((folder / f"{PLANS}.json").read_text()), "continue_training": False}  # as run_training
    trainer = nnUNetTrainerLandmark(plans, "3d_fullres", "all", json.loads((folder / "dataset.json").read_text()),
                                    device=torch.device("cpu"))
    # what initialize() prepares for the loaders, without building the network
    trainer._set_batch_size_and_oversample()
    trainer.landmark_heads = trainer._make_landmark_heads()
    trainer.world_landmarks, trainer.preprocessed_landmarks = trainer._load_landmarks()
    landmark, _ = trainer.get_dataloaders()
    with nnunet_integration.data_loader_class(nnUNetDataLoader):
        plain, _ = nnUNetTrainer.get_dataloaders(trainer)
    landmark, plain = landmark.data_loader, plain.data_loader
    # one instance of the (identical) pipeline for both: GaussianBlurTransform(benchmark=True) times FFT against
    # direct convolution the first time it meets a shape and kernel size and keeps the faster; shared, every
    # loader uses the same choices and none is charged for the timing runs
    plain.transforms = landmark.transforms
    return landmark, plain


def legacy_generate_train_batch(loader, valid_mask: bool = False) -> dict:
    """The landmark batch as made before keypoints (up to commit 97afd2e): each heatmap drawn on the enlarged crop
    and carried through nnU-Net's own pipeline as ``regression_target``.

    Run inside nnU-Net's loop, as the keypoint loader does, so that it draws the same random numbers as plain
    nnU-Net (the old loader cropped all samples first and then augmented them, in another random order, and
    also copied the crops once more: its cost is if anything underestimated here). ``valid_mask`` adds a channel
    of ones (not timed) that tells where the patch sampled inside the crop.
    """
    import torch

    from nnunet_landmark.heatmap_targets import render_heatmaps

    background = np.float32(loader.encoding.background)
    pipeline, heatmaps = loader.transforms, []

    def transforms_with_heatmaps(**sample) -> dict:
        j = len(loader._batch_crops) - 1
        positions = loader.landmarks[loader._batch_keys[j]] - loader._batch_crops[j]
        shape = tuple(sample["image"].shape[1:])
        heatmap = torch.from_numpy(render_heatmaps(shape, positions, loader.spacing, loader.encoding) - background)
        if valid_mask:
            heatmap = torch.cat([heatmap, torch.ones((1, *shape))])
        out = pipeline(**sample, regression_target=heatmap)
        heatmaps.append(out.pop("regression_target"))
        return out

    loader.transforms = transforms_with_heatmaps
    try:
        batch = super(type(loader), loader).generate_train_batch()
    finally:
        loader.transforms = pipeline
    target = list(batch["target"]) if isinstance(batch["target"], list) else [batch["target"]]
    target.append(torch.stack(heatmaps).add_(background).float())
    return {"data": batch["data"], "target": target, "keys": batch["keys"]}


def seeded(seed: int) -> None:
    import torch
    np.random.seed(seed)
    torch.manual_seed(seed)


def measure(k: int, batches: int) -> dict:
    """Per batch: plain nnU-Net, the landmark loader before (legacy) and now; same seed per batch for all three.

    CPU time of this process is the primary measure (the loader is single-threaded, and on a machine shared with
    other jobs CPU time is what the loader itself costs); wall time is recorded too.
    """
    import torch

    from nnunet_landmark.heatmap_targets import render_heatmaps_mapped

    torch.set_num_threads(1)  # one worker, one thread: grid_sample would otherwise use both cores
    landmark, plain = loaders(k)
    variants = {"plain": plain.generate_train_batch, "landmark_before": lambda: legacy_generate_train_batch(landmark),
                "landmark_after": landmark.generate_train_batch}
    for seed in range(10_000, 10_004):  # warm-up: allocator, blur benchmarks, first touch of the preprocessed files
        for make in variants.values():
            seeded(seed)
            make()
    cpu = {name: [] for name in variants}
    wall = {name: [] for name in variants}
    render = []
    same_draws = 0  # batches whose images and segmentations are identical in all three loaders
    angle = 0.3
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    for i in range(batches):
        # untimed first: whatever is done once per draw (the blur's FFT-or-not timing runs for a kernel size not seen
        # yet, the first read of a region of a case) must not be charged to whichever loader happens to go first
        seeded(i)
        plain.generate_train_batch()
        order = list(variants)[i % 3:] + list(variants)[:i % 3]  # rotate who goes first: shared-machine drift
        outs = {}
        for name in order:
            seeded(i)
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            out = outs[name] = variants[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
            if name == "landmark_after":
                start = time.process_time()
                for positions in out["landmarks_in_patch"]:  # as on a rotated patch (cross terms)
                    render_heatmaps_mapped(out["data"].shape[2:], positions, landmark.spacing, landmark.encoding,
                                           rotation)
                render.append(time.process_time() - start)
        same_draws += all(torch.equal(outs["plain"]["data"], outs[n]["data"]) and
                          all(torch.equal(a, b) for a, b in zip(outs["plain"]["target"], outs[n]["target"]))
                          for n in ("landmark_before", "landmark_after"))
    result = {"patch_size": [int(i) for i in landmark.final_patch_size],
              "crop_size": [int(i) for i in landmark.patch_size],
              "batch_size": int(landmark.batch_size), "landmarks": DATASETS[k][2], "batches": batches,
              "cpu_seconds_per_batch": {name: float(np.mean(t)) for name, t in cpu.items()},
              "wall_seconds_per_batch": {name: float(np.mean(t)) for name, t in wall.items()},
              "render_cpu_seconds_per_batch_after": float(np.mean(render)),
              "batches_with_identical_images_and_segmentations": int(same_draws),
              "per_batch_cpu_seconds": cpu, "per_batch_wall_seconds": wall}
    for name in ("landmark_before", "landmark_after"):
        for measure_name, values in (("cpu", cpu), ("wall", wall)):
            result[f"{measure_name}_ratio_{name}"] = float(np.sum(values[name]) / np.sum(values["plain"]))
            result[f"{measure_name}_median_paired_ratio_{name}"] = float(
                np.median(np.asarray(values[name]) / np.asarray(values["plain"])))
    result["target_difference"] = compare_targets(landmark, seeds=range(3))
    return result


def compare_targets(loader, seeds) -> dict:
    """Heatmap targets now vs before for the same samples and draws, where the patch sampled inside the crop
    (before, the rest was the background value from padding): the interpolation differences, and how far apart
    the extrema are."""
    differences, tips, shifts = [], [], []
    for seed in seeds:
        seeded(seed)
        before = legacy_generate_train_batch(loader, valid_mask=True)["target"][-1]
        seeded(seed)
        after = loader.generate_train_batch()["target"][-1]
        k = after.shape[1]
        inside = (before[:, k:] - np.float32(loader.encoding.background)) > 0.999  # the ones channel, resampled
        for b in range(after.shape[0]):
            for j in range(k):
                mask = inside[b, 0]
                diff = (after[b, j] - before[b, j])[mask].abs()
                differences.append(float(diff.max()) if diff.numel() else 0.0)
                a, o = after[b, j].numpy(), before[b, j].numpy()
                pick = np.argmin if loader.encoding.kind == "log_distance" else np.argmax
                va, vo = np.unravel_index(pick(a), a.shape), np.unravel_index(pick(o), o.shape)
                tips.append(float(o[va] - a[va]))
                shifts.append(float(np.linalg.norm(np.subtract(va, vo))))
    return {"max_abs_difference_inside_crop": float(np.max(differences)),
            "median_of_per_heatmap_max_abs_difference": float(np.median(differences)),
            "value_at_extreme_voxel_before_minus_after_max": float(np.max(np.abs(tips))),
            "extreme_voxel_shift_voxels_max": float(np.max(shifts))}


def table(results: dict) -> str:
    rows = ["| landmarks | patch (crop before rotation), batch | plain nnU-Net: CPU s/batch | landmark before: CPU "
            "s/batch, ratio (wall ratio) | landmark now: CPU s/batch, ratio (wall ratio) | target |",
            "|---|---|---|---|---|---|"]
    for k, r in sorted(results["datasets"].items()):
        s = r["cpu_seconds_per_batch"]
        cells = [f"{s[n]:.3f}, **{r[f'cpu_ratio_{n}']:.2f}** ({r[f'wall_ratio_{n}']:.2f})"
                 for n in ("landmark_before", "landmark_after")]
        rows.append(f"| {k} | {'x'.join(map(str, r['patch_size']))} ({'x'.join(map(str, r['crop_size']))}), "
                    f"{r['batch_size']} | {s['plain']:.3f} | {cells[0]} | {cells[1]} | <= {1.10 if k == '1' else 1.20:.2f} |")
    return "\n".join(rows)


def write_results_section(results: dict, path: Path) -> None:
    one, three = results["datasets"]["1"], results["datasets"]["3"]
    diff = three["target_difference"]
    text = "\n".join([
        "## Real size: data loader", "",
        f"Machine: {results['machine']}; the loader single-threaded (as each of nnU-Net's workers runs it). "
        f"{results['cases']} MM-WHS-size phantoms (512 x 512 x {results['slices']} voxels, "
        f"{results['spacing']} mm), `nnUNetPlannerResEncM` 3d_fullres, the trainer's own training transforms, "
        f"fold `all`; CPU seconds per batch (wall-time ratios in brackets; the machine is shared), mean of "
        f"{one['batches']} batches, each batch with the same samples and random draws for all three loaders (identical "
        f"images and segmentations in {one['batches_with_identical_images_and_segmentations'] + three['batches_with_identical_images_and_segmentations']} "
        f"of {2 * one['batches']} batches). Produced by `python benchmarks/loader_scale.py` "
        f"({results['date']}).", "",
        table(results), "",
        f"Median of the per-batch ratios (CPU): before {one['cpu_median_paired_ratio_landmark_before']:.2f} / "
        f"{three['cpu_median_paired_ratio_landmark_before']:.2f}, now {one['cpu_median_paired_ratio_landmark_after']:.2f} "
        f"/ {three['cpu_median_paired_ratio_landmark_after']:.2f} (1 / 3 landmarks); cheap batches (no rotation or "
        f"scaling drawn, ~0.1 s) weigh the fixed cost of drawing the heatmaps most.", "",
        "Before: each heatmap drawn on the enlarged crop nnU-Net cuts before rotation and interpolated through "
        "the spatial transform as one more channel (measured here inside nnU-Net's loop, with the same draws; the old "
        "loader also copied every crop once more, so its cost is if anything understated). Now: the landmark positions go through the same transforms as "
        "keypoints (`training/keypoint_transforms.py`) and the heatmaps are drawn once on the final patch "
        f"({three['render_cpu_seconds_per_batch_after'] * 1000:.0f} ms per batch for 3 landmarks, "
        f"{one['render_cpu_seconds_per_batch_after'] * 1000:.0f} ms for 1).", "",
        "Targets now vs before (same draws, 3 landmarks, where the patch sampled inside the crop): largest "
        f"difference {diff['max_abs_difference_inside_crop']:.4f} (median over heatmaps "
        f"{diff['median_of_per_heatmap_max_abs_difference']:.4f}) on the [0, 1] scale, largest at the landmark "
        f"(value at the extreme voxel before minus now up to {diff['value_at_extreme_voxel_before_minus_after_max']:.4f}): "
        "trilinear interpolation blunted the tip of the log-distance map; the extreme voxel moved by at most "
        f"{diff['extreme_voxel_shift_voxels_max']:.1f} voxels. Outside the crop the old target was the padding "
        "(background); now it continues the distance function.",
    ])
    write_section(path, "loader-scale", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4, help="phantoms to generate (cached)")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per loader and dataset")
    parser.add_argument("--results-md", default=str(RESULTS_MD), help="RESULTS.md to update ('' = none)")
    args = parser.parse_args()

    prepare(args.cases)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "cases": args.cases, "datasets": {}}
    geometry = [json.loads(p.read_text()) for p in (WORKDIR / "preprocessed").glob(f"*/{PLANS}.json")][0]
    fingerprint = json.loads(next((WORKDIR / "preprocessed").glob("*/dataset_fingerprint.json")).read_text())
    shapes = np.asarray(fingerprint["shapes_after_crop"])
    results["slices"] = f"{shapes[:, 0].min()}-{shapes[:, 0].max()}"
    results["spacing"] = " x ".join(f"{s:.2f}" for s in geometry["original_median_spacing_after_transp"][::-1])
    for k in DATASETS:
        print(f"measuring the loaders with {k} landmark(s) ...", flush=True)
        results["datasets"][str(k)] = measure(k, args.batches)
    out = WORKDIR / "results.json"
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(json.dumps(results, indent=1))
    print(f"wrote {out}")
    if args.results_md:
        write_results_section(results, Path(args.results_md))


if __name__ == "__main__":
    main()
