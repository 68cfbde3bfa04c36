"""The checks that decide ``gpu_check.py``'s exit status, and the table it prints. Only numpy: the tests load this
file alone."""
from __future__ import annotations

import numpy as np

TARGETS = {"iteration": 1.03, "memory": 1.02, "prediction": 1.05}  # landmark / plain, enforced on a GPU only


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def find_failures(results: dict) -> list[str]:
    """Every check that failed, in words. Performance targets count on a GPU only."""
    failures: list[str] = []
    train, prediction, agreement = results["training"], results["prediction"], results["agreement"]
    dry = results["dry_run"]
    for label, r in train.items():
        if not np.all(np.isfinite(r["losses"])):
            failures.append(f"{label}: non-finite training loss {r['losses']}")
        if r["skipped_gradscaler_steps"]["timed"]:
            failures.append(f"{label}: GradScaler skipped {r['skipped_gradscaler_steps']['timed']} steps after warm-up")
        if r["dynamo_frames_compiled_after_warmup"]:
            failures.append(f"{label}: torch.compile compiled {r['dynamo_frames_compiled_after_warmup']} frames "
                            f"after warm-up (recompiles: {r['recompile_reasons']})")
        if not dry and not r["compiled"]:
            failures.append(f"{label}: nnU-Net did not use torch.compile")
    if train["landmark"]["recompiles"] > train["plain"]["recompiles"]:
        failures.append(f"landmark: {train['landmark']['recompiles']} recompiles against plain's "
                        f"{train['plain']['recompiles']}: {train['landmark']['recompile_reasons']}")
    n = results["prediction_cases"]
    if prediction["landmark"]["segmentations"] != n or prediction["plain"]["segmentations"] != n:
        failures.append(f"segmentations written: landmark {prediction['landmark']['segmentations']}, plain "
                        f"{prediction['plain']['segmentations']} of {n}")
    if prediction["landmark"]["markups"] != n or not prediction["landmark"]["landmark_table"]:
        failures.append(f"landmark model wrote {prediction['landmark']['markups']} of {n} markups, "
                        f"landmarks.csv {'present' if prediction['landmark']['landmark_table'] else 'missing'}")
    if prediction["plain"]["markups"] or prediction["plain"]["landmark_table"]:
        failures.append("plain nnU-Net wrote landmark files")
    if not agreement["max_sigmoid_difference"] <= 0.02:
        failures.append(f"{agreement['devices'][0]} and {agreement['devices'][1]} heatmaps differ by up to "
                        f"{agreement['max_sigmoid_difference']:.4f} (> 0.02) in the reliable region")
    if not max(agreement["landmark_distance_mm"].values()) <= 1.0:
        failures.append(f"{agreement['devices'][0]} and {agreement['devices'][1]} landmarks differ by "
                        f"{agreement['landmark_distance_mm']} mm (> 1 mm)")
    for key, limit in TARGETS.items():
        if not dry and not results["ratios"][key] <= limit:
            failures.append(f"{key} ratio {results['ratios'][key]:.3f} above the target {limit}")
    return failures


def render_table(results: dict, configuration: str, plans: str, warmup: int, timed: int) -> str:
    tr, pr, ag, ra = results["training"], results["prediction"], results["agreement"], results["ratios"]
    pl, lm = tr["plain"], tr["landmark"]
    dry = results["dry_run"]

    def target(key: str) -> str:
        return f"<= {TARGETS[key]}" + (" (GPU only)" if dry else "")

    lines = [
        f"Machine: {results['machine']}  ",
        f"Configuration `{configuration}` of `{plans}`: patch {lm['patch_size']}, batch {lm['batch_size']}; "
        f"{lm['augmentation_workers']} augmentation workers; torch.compile {'on' if lm['compiled'] else 'off'}; "
        f"{warmup} warm-up + {timed} timed iterations; total {results['seconds']['total']:.0f} s"
        f"{' (dry run on CPU)' if dry else ''}.", "",
        "| what | plain nnU-Net | landmark | ratio | target |", "|---|---|---|---|---|",
        f"| training iteration, median (s) | {pl['seconds_per_iteration']:.3f} | {lm['seconds_per_iteration']:.3f} | "
        f"{ra['iteration']:.3f} | {target('iteration')} |",
        f"| of which waiting for the data loader, mean (s) | {pl['seconds_waiting_for_data']:.3f} | "
        f"{lm['seconds_waiting_for_data']:.3f} | | |",
        f"| peak CUDA memory after warm-up (MiB) | {pl['peak_cuda_memory_mib']:.0f} | {lm['peak_cuda_memory_mib']:.0f} "
        f"| {ra['memory']:.3f} | {target('memory')} |",
        f"| first iteration, with compile (s) | {pl['first_iteration_seconds']:.1f} | "
        f"{lm['first_iteration_seconds']:.1f} | | |",
        f"| dynamo frames compiled / unique graphs / recompiles | {pl['dynamo_frames_compiled']} / "
        f"{pl['dynamo_unique_graphs']} / {pl['recompiles']} | {lm['dynamo_frames_compiled']} / "
        f"{lm['dynamo_unique_graphs']} / {lm['recompiles']} | | no recompiles after warm-up |",
        f"| skipped GradScaler steps (warm-up / timed) | {pl['skipped_gradscaler_steps']['warmup']} / "
        f"{pl['skipped_gradscaler_steps']['timed']} | {lm['skipped_gradscaler_steps']['warmup']} / "
        f"{lm['skipped_gradscaler_steps']['timed']} | | 0 timed |",
        f"| losses finite (last) | {np.all(np.isfinite(pl['losses']))} ({pl['losses'][-1]:.3f}) | "
        f"{np.all(np.isfinite(lm['losses']))} ({lm['losses'][-1]:.3f}) | | all |",
        f"| `nnUNetv2_predict`, {results['prediction_cases']} case(s), TTA {'on' if results.get('prediction_tta') else 'off'}"
        f" (s) | {pr['plain']['seconds']:.1f} | "
        f"{pr['landmark']['seconds']:.1f} | {ra['prediction']:.3f} | {target('prediction')} |",
        f"| landmark files (markups / landmarks.csv) | {pr['plain']['markups']} / {pr['plain']['landmark_table']} | "
        f"{pr['landmark']['markups']} / {pr['landmark']['landmark_table']} | | none for plain |",
        f"| heatmaps {ag['devices'][0]} vs {ag['devices'][1]}: max / mean sigmoid difference in the reliable region "
        f"({100 * ag['reliable_fraction']:.0f}% of {ag['preprocessed_shape']}) | | {ag['max_sigmoid_difference']:.4f} /"
        f" {ag['mean_sigmoid_difference']:.5f} | | <= 0.02 |",
        f"| landmarks {ag['devices'][0]} vs {ag['devices'][1]} (mm) | | "
        f"{', '.join(f'{k} {v:.3f}' for k, v in ag['landmark_distance_mm'].items())} | | <= 1 |",
        f"| segmentation voxels agreeing {ag['devices'][0]} vs {ag['devices'][1]} | | "
        f"{100 * ag['segmentation_agreement']:.2f}% | | |",
        "",
        ("PASSED: every check" if not results["failures"] else
         "FAILED:\n" + "\n".join(f"- {f}" for f in results["failures"])),
    ]
    return "\n".join(lines) + "\n"
