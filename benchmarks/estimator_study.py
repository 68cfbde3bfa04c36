"""How prediction should combine the position prior with the heatmap, chosen on validation phantoms, and how well the
expected error tracks the actual one.

    python benchmarks/estimator_study.py --model MODEL_FOLDER --workdir /tmp/estimator --test-set NAME:FOLDER ...

A trained model (fold 0) predicts, once, the logits of: its fold's validation cases (what the trainer measures the
heatmap's and the prior's errors on), validation phantoms of another seed (``--validation-seed``; the rule is chosen
on these) and the given test sets (they only confirm). Every rule in ``RULES`` then decodes the cached logits the way
``landmark_export.decode_landmarks`` does, with the errors measured on the fold's validation cases as the trainer records
them. Writes ``--output`` (markdown) with a JSON beside it and the expected-error calibration plot.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from common import LANDMARKS, RESULTS_DIR, machine


# name -> (what, how the heatmap's validated RMS error becomes the t's per-axis scale, how the prior's covariance is
# set: "reference" = fitted on the training references + the floor, "validated" = scaled to the validated prior RMS)
RULES = {
    "current": ("the t's scale is the heatmap's 3D RMS error; the prior's covariance from the references + 1 mm",
                1.0, "reference"),
    "per_axis": ("the t's scale is the heatmap's RMS error per axis (3D RMS / sqrt 3)", 1 / np.sqrt(3), "reference"),
    "per_axis_validated_prior": ("per_axis, and the prior's covariance scaled to its validated RMS error",
                                 1 / np.sqrt(3), "validated"),
    "validated_prior": ("current, with the prior's covariance scaled to its validated RMS error", 1.0, "validated"),
}


def cached_logits(predictor, image_file: Path, cache: Path) -> tuple[np.ndarray, dict]:
    import pickle

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    if cache.with_suffix(".npy").exists():
        return np.load(cache.with_suffix(".npy")), pickle.loads(cache.with_suffix(".pkl").read_bytes())
    image, properties = SimpleITKIO().read_images([str(image_file)])
    item = next(PreprocessAdapterFromNpy([image], [None], [properties], [None], predictor.plans_manager,
                                         predictor.dataset_json, predictor.configuration_manager, 1))
    logits = predictor.predict_logits_from_preprocessed_data(item["data"]).numpy()
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache.with_suffix(".npy"), logits)
    cache.with_suffix(".pkl").write_bytes(pickle.dumps(item["data_properties"]))
    return logits, item["data_properties"]


def decode_all(predictor, heads, cases: dict, label_manager) -> dict:
    """{case: decode_landmarks(...)} of cached logits with ``heads``."""
    from nnunet_landmark.landmark_export import decode_landmarks

    c = heads.num_segmentation_heads
    return {case: decode_landmarks(logits[c:], properties, predictor.plans_manager, predictor.configuration_manager,
                                   heads, case, segmentation_logits=logits[:c], label_manager=label_manager)
            for case, (logits, properties) in cases.items()}


def with_rule(heads, rule: str, prior_rms: dict, heatmap_rms: dict):
    """``heads`` whose priors carry the validated errors and the rule's prior covariance."""
    from nnunet_landmark.prior.model import PRIOR_FLOOR_MM, PositionPrior

    _, heatmap_factor, prior_kind = RULES[rule]
    priors = []
    for prior in heads.position_priors:
        landmarks = {}
        for name, p in prior.landmarks.items():
            p = dataclasses.replace(p, heatmap_error_mm=heatmap_rms[name] * heatmap_factor,
                                    prior_error_mm=prior_rms[name], validation_cases=VALIDATION_CASES[0])
            if prior_kind == "validated":
                # keep the covariance's shape; its trace in world mm^2 (plus the floor) becomes the validated MSE
                # (frame coordinates scale with the structure's size: the trace ratio is taken in the frame)
                target = max(prior_rms[name] ** 2 - 3 * PRIOR_FLOOR_MM ** 2, 0.05)
                p = dataclasses.replace(p, cov=p.cov * target / max(np.trace(p.cov) * REFERENCE_SIZE2[name], 1e-9))
            landmarks[name] = p
        priors.append(PositionPrior(landmarks, prior.structure_volumes_ml))
    return dataclasses.replace(heads, position_priors=tuple(priors))


VALIDATION_CASES = [4]  # the fold's validation cases (set in main)
REFERENCE_SIZE2: dict = {}  # landmark -> the structure's squared size (mm^2) in the fold's training cases, for "validated"


def errors_of(decoded: dict, truth: dict, key: str = "world") -> dict:
    return {n: [float(np.linalg.norm(decoded[c][n][key] - truth[c][n])) if decoded[c][n][key] is not None
                else float("nan") for c in decoded] for n in LANDMARKS}


def calibration(sets: dict, png: Path, bins: int = 4) -> list[str]:
    """Binned expected against observed error of what nnUNetv2_predict writes (``ok`` landmarks of every set), as a
    markdown table and a plot at ``png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = np.array([(e, o) for entry in sets.values() for n in LANDMARKS
                      for e, o, s in zip(entry["product expected"][n], entry["product"][n], entry["product status"][n])
                      if s == "ok" and np.isfinite(e) and np.isfinite(o)])
    lines = ["#### Expected error against observed (what `nnUNetv2_predict` writes, `ok` landmarks of every set)", "",
             "| expected (mm), bin | n | mean expected | mean observed | observed / expected |", "|---|---|---|---|---|"]
    if len(pairs) == 0:
        return lines + ["| (no ok landmarks) | 0 | | | |", ""]
    edges = np.unique(np.quantile(pairs[:, 0], np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, pairs[:, 0], side="right") - 1, 0, max(len(edges) - 2, 0))
    centres, observed = [], []
    for b in np.unique(which):
        e, o = pairs[which == b, 0], pairs[which == b, 1]
        centres.append(e.mean()), observed.append(o.mean())
        lines.append(f"| {e.min():.2f}-{e.max():.2f} | {len(e)} | {e.mean():.2f} | {o.mean():.2f} | "
                     f"{o.mean() / e.mean():.2f} |")
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for (set_name, entry), marker in zip(sets.items(), "osd^v"):
        for n, colour in zip(LANDMARKS, ("C0", "C1", "C2")):
            e, o = np.array(entry["product expected"][n], float), np.array(entry["product"][n], float)
            ok = np.isfinite(e) & np.isfinite(o)
            if ok.any():
                ax.scatter(e[ok], o[ok], s=10, alpha=0.4, color=colour, marker=marker,
                           label=f"{n}, {set_name}")
    ax.plot(centres, observed, "k-o", label="bin means")
    top = float(np.nanmax(pairs)) * 1.05
    ax.plot([0, top], [0, top], "k:", lw=1)
    ax.set(xlabel="expected_error_mm", ylabel="observed error (mm)", xlim=(0, top), ylim=(0, top))
    ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(png, dpi=150)
    plt.close(fig)
    return lines + ["", f"![calibration]({png.name})", ""]


def main(argv: list[str] | None = None) -> None:
    import torch

    from nnunet_landmark.landmark_files import read_landmark_csv, read_markups
    from nnunet_landmark.phantom_families import write_mmwhs_phantoms
    from nnunet_landmark.predictor import nnUNetLandmarkPredictor
    from nnunet_landmark.prior.model import structure_frame

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--raw", type=Path, required=True, help="the model's raw dataset folder")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--validation-seed", type=int, default=999)
    parser.add_argument("--validation-cases", type=int, default=20)
    parser.add_argument("--family", default="analytic")
    parser.add_argument("--test-set", action="append", default=[], help="NAME:FOLDER (MM-WHS layout)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "estimator_study.md")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    predictor = nnUNetLandmarkPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                                        allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(args.model), (0,), "checkpoint_final.pth")
    heads = predictor.landmark_heads
    label_manager = predictor.plans_manager.get_label_manager(predictor.dataset_json)
    splits = json.loads((args.raw / "splits_final.json").read_text())

    sets = {}
    fold_val = {c: args.raw / "imagesTr" / f"{c}_0000.nii.gz" for c in splits[0]["val"]}
    VALIDATION_CASES[0] = len(fold_val)
    sets["fold validation"] = ({c: read_markups(args.raw / "landmarksTr" / f"{c}.mrk.json") for c in fold_val},
                               fold_val)
    validation = workdir / "validation_phantoms"
    if not (validation / "landmarks.csv").exists():
        write_mmwhs_phantoms(validation, args.validation_cases, seed=args.validation_seed, size=(64, 64, 48),
                             flips=False, first_case=7001, progress=False, family=args.family)
    truth = read_landmark_csv(validation / "landmarks.csv")
    sets["validation phantoms"] = (truth, {c: validation / "ct_train" / f"{c}_image.nii.gz" for c in truth})
    for item in args.test_set:
        name, folder = item.split(":", 1)
        truth = read_landmark_csv(Path(folder) / "landmarks.csv")
        sets[name] = (truth, {c: Path(folder) / "ct_train" / f"{c}_image.nii.gz" for c in truth})
    cached = {name: {c: cached_logits(predictor, image, workdir / "logits" / name.replace(" ", "_") / c)
                     for c, image in images.items()} for name, (_, images) in sets.items()}

    # what the trainer measures on its fold's validation cases: the heatmap's and the prior's RMS errors
    base = decode_all(predictor, heads, cached["fold validation"], label_manager)
    truth_val = sets["fold validation"][0]
    heatmap_rms = {n: float(np.sqrt(np.nanmean(np.square(e)))) for n, e in errors_of(base, truth_val,
                                                                                      "heatmap_world").items()}
    prior_rms = {n: float(np.sqrt(np.nanmean(np.square(e)))) for n, e in errors_of(base, truth_val,
                                                                                    "prior_world").items()}
    from nnunet_landmark.prior.model import affine_of, structure_moments  # noqa: F401 (frames' sizes below)
    for name in LANDMARKS:
        p = heads.position_priors[0].landmarks[name]
        sizes = []
        for case, (logits, properties) in cached["fold validation"].items():
            from nnunet_landmark.geometry import CaseGeometry
            geometry = CaseGeometry.from_nnunet(properties, predictor.plans_manager.transpose_forward,
                                                predictor.configuration_manager.spacing)
            moments = structure_moments(logits[:heads.num_segmentation_heads], affine_of(geometry.preprocessed_to_world),
                                        to_labels=lambda s: np.argmax(s, 0))
            if p.structure in moments:
                sizes.append(structure_frame(moments[p.structure], p.reference_axis, p.roll_axis)[2] ** 2)
        REFERENCE_SIZE2[name] = float(np.mean(sizes))

    results = {"machine": machine(), "model": str(args.model), "heatmap_rms_mm": heatmap_rms,
               "prior_rms_mm": prior_rms, "sets": {}}
    for set_name, (truth, _) in sets.items():
        if set_name == "fold validation":
            continue
        entry = {}
        plain = decode_all(predictor, with_rule(heads, "current", prior_rms, heatmap_rms), cached[set_name],
                           label_manager)
        entry["heatmap alone"] = errors_of(plain, truth, "heatmap_world")
        entry["prior alone"] = errors_of(plain, truth, "prior_world")
        for rule in RULES:
            decoded = decode_all(predictor, with_rule(heads, rule, prior_rms, heatmap_rms), cached[set_name],
                                 label_manager)
            entry[rule] = errors_of(decoded, truth)
            entry[rule + " expected"] = {n: [decoded[c][n]["expected_error_mm"] for c in decoded] for n in LANDMARKS}
            entry[rule + " status"] = {n: [decoded[c][n]["status"] for c in decoded] for n in LANDMARKS}
        product = decode_all(predictor, heads, cached[set_name], label_manager)  # as nnUNetv2_predict decodes
        entry["product"] = errors_of(product, truth)
        entry["product expected"] = {n: [product[c][n]["expected_error_mm"] for c in product] for n in LANDMARKS}
        entry["product status"] = {n: [product[c][n]["status"] for c in product] for n in LANDMARKS}
        results["sets"][set_name] = entry

    lines = [f"Model `{args.model}`; validated on its fold's {len(fold_val)} validation cases: heatmap RMS "
             + ", ".join(f"{n} {heatmap_rms[n]:.2f}" for n in LANDMARKS) + " mm; prior alone RMS "
             + ", ".join(f"{n} {prior_rms[n]:.2f}" for n in LANDMARKS) + " mm.", ""]
    for set_name, entry in results["sets"].items():
        lines += [f"#### {set_name} (mean / max mm)", "", "| estimate | " + " | ".join(LANDMARKS) + " |",
                  "|---|" + "---|" * len(LANDMARKS)]
        for key in ["heatmap alone", "prior alone", *RULES]:
            lines.append(f"| {key} | " + " | ".join(
                f"{np.nanmean(entry[key][n]):.2f} / {np.nanmax(entry[key][n]):.1f}" for n in LANDMARKS) + " |")
        lines.append("")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    lines += calibration(results["sets"], args.output.with_name(args.output.stem + "_calibration.png"))
    args.output.write_text("\n".join(lines) + "\n")
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
