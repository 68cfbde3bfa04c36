"""The alignment study of the demo: each unseen phantom's predicted landmarks aligned rigidly to the same phantom
moved by a known random rigid transform (a stand-in for another modality), scored by the target registration error
on the true LV surface against the same alignment from the true landmarks."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_landmark.mmwhs import LANDMARKS, LV_CAVITY

# the stand-in for another modality: the phantom moved by a random rotation and translation up to these
MAX_ROTATION_DEGREES, MAX_TRANSLATION_MM = 30.0, 50.0


def random_rigid_matrix(rng: np.random.Generator, center: np.ndarray) -> np.ndarray:
    """4 x 4 matrix of a rotation about ``center`` (random axis, angle up to ``MAX_ROTATION_DEGREES``) followed by a
    translation (random direction, length up to ``MAX_TRANSLATION_MM``)."""
    import SimpleITK as sitk

    from nnunet_landmark.alignment import transform_matrix

    axis, direction = rng.normal(size=3), rng.normal(size=3)
    transform = sitk.VersorRigid3DTransform()
    transform.SetCenter([float(c) for c in center])
    transform.SetRotation((axis / np.linalg.norm(axis)).tolist(), float(np.deg2rad(rng.uniform(0, MAX_ROTATION_DEGREES))))
    transform.SetTranslation((direction / np.linalg.norm(direction) * rng.uniform(0, MAX_TRANSLATION_MM)).tolist())
    return transform_matrix(transform)


def align_test_set(prediction_folder: Path, test_root: Path, truth: dict, seed: int) -> tuple[list[dict], dict]:
    """Align each unseen phantom's predicted landmarks to its true ones moved by a known random rigid transform.

    Our CT is the moving space, the moved phantom the fixed one ("the other modality"). The estimated transform
    (ITK convention: fixed -> moving) brings the true LV surface into the fixed space with its inverse; the target
    registration error (TRE) is that point's distance to where the known transform puts it. The same alignment
    from the true landmarks is the sanity row (TRE ~ 0). Returns the rows and the first case's points for the figure.
    """
    import SimpleITK as sitk

    from nnunet_landmark.alignment import apply_matrix, fit_landmark_transform, landmark_residuals, transform_matrix
    from nnunet_landmark.surfaces import label_surface
    from nnunet_landmark.landmark_files import read_markups

    rows, figure = [], {}
    for number, (case, landmarks) in enumerate(truth.items()):
        true = np.array([landmarks[n] for n in LANDMARKS])
        predicted_points = read_markups(prediction_folder / f"{case}.mrk.json", flagged=True)
        predicted = np.array([predicted_points[n] for n in LANDMARKS])
        known = random_rigid_matrix(np.random.default_rng([seed, number]), true.mean(axis=0))  # moving -> fixed
        fixed = apply_matrix(known, true)
        surface, _ = label_surface(sitk.ReadImage(str(test_root / "ct_train" / f"{case}_label.nii.gz")), LV_CAVITY)
        surface_fixed = apply_matrix(known, surface)
        row = {"case": case, "surface_points": int(len(surface)),
               "rotation_degrees": float(np.degrees(np.arccos(np.clip((np.trace(known[:3, :3]) - 1) / 2, -1, 1)))),
               "translation_mm": float(np.linalg.norm(known[:3, 3] + known[:3, :3] @ true.mean(axis=0)
                                                      - true.mean(axis=0)))}
        for source, moving in (("predicted", predicted), ("true", true)):
            transform = fit_landmark_transform(fixed, moving)
            moved = apply_matrix(np.linalg.inv(transform_matrix(transform)), surface)
            tre = np.linalg.norm(moved - surface_fixed, axis=1)
            row[source] = {"fre_rms_mm": float(np.sqrt(np.mean(landmark_residuals(transform, fixed, moving) ** 2))),
                           "tre_mean_mm": float(tre.mean()), "tre_max_mm": float(tre.max())}
            if number == 0 and source == "predicted":
                figure = {"case": case, "fixed": surface_fixed, "before": surface, "after": moved}
        rows.append(row)
    return rows, figure


def alignment_markdown(rows: list[dict], figure_file: str | None) -> str:
    """Per case and overall: TRE (mean / max mm on the LV surface) from the predicted and from the true landmarks."""
    lines = ["| case | rotation (deg) | translation (mm) | FRE RMS (mm), predicted | TRE mean (mm), predicted | "
             "TRE max (mm), predicted | TRE mean (mm), true landmarks | TRE max (mm), true landmarks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, t = r["predicted"], r["true"]
        lines.append(f"| {r['case']} | {r['rotation_degrees']:.1f} | {r['translation_mm']:.1f} | {p['fre_rms_mm']:.2f} | "
                     f"{p['tre_mean_mm']:.2f} | {p['tre_max_mm']:.2f} | {t['tre_mean_mm']:.2e} | {t['tre_max_mm']:.2e} |")
    lines.append(f"| overall | | | {np.mean([r['predicted']['fre_rms_mm'] for r in rows]):.2f} | "
                 f"{np.mean([r['predicted']['tre_mean_mm'] for r in rows]):.2f} | "
                 f"{np.max([r['predicted']['tre_max_mm'] for r in rows]):.2f} | "
                 f"{np.mean([r['true']['tre_mean_mm'] for r in rows]):.2e} | "
                 f"{np.max([r['true']['tre_max_mm'] for r in rows]):.2e} |")
    text = "\n".join(lines) + "\n"
    if figure_file:
        text += f"\n![alignment of one unseen phantom, before and after]({figure_file})\n"
    return text


def alignment_section(rows: list[dict], figure_file: str | None) -> str:
    """The report's alignment section: what was done, and ``alignment_markdown``."""
    return (f"## Alignment of the unseen phantoms\n\nEach phantom's three predicted landmarks ({', '.join(LANDMARKS)}) "
            f"are aligned rigidly (`nnunet_landmark.alignment`, SimpleITK `VersorRigid3DTransform`) to the true "
            f"landmarks of the same phantom moved by a known random rigid transform (rotation up to "
            f"{MAX_ROTATION_DEGREES:.0f} degrees, translation up to {MAX_TRANSLATION_MM:.0f} mm; a stand-in for "
            f"another modality). Target registration error (TRE): distance, over the points of the true LV cavity "
            f"surface (marching cubes of label {LV_CAVITY}, world mm), between where the estimated and the known "
            f"transform put them. The same alignment from the true landmarks must give TRE ~ 0 (sanity check).\n\n"
            + alignment_markdown(rows, figure_file) + "\n")
