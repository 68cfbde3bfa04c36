"""Align our CT (segmentation + landmarks) to another modality from landmarks: ``nnUNetv2_landmark_align``.

The paper finds the LV apex to align the CT of a cardiac chamber to another structure (electroanatomical map,
MRI, PET). Given two landmark sets with at least three non-collinear names in common, this module fits a rigid
(or, with ``scale``, a similarity) transform with SimpleITK's ``LandmarkBasedTransformInitializer`` and reports
how well it fits.

Direction, the one thing to get right: the transform follows ITK's resampling convention and **maps points of
the fixed space (theirs) into the moving space (ours)**: ``p_moving = T(p_fixed)``. It is what
``sitk.Resample(moving_image, fixed_image, T)`` needs to bring our images onto their grid, and what 3D Slicer
expects in a ``.tfm`` (loaded as the "from parent" transform: put our nodes under it and they move into their
space). Points and meshes of ours go into their space with the inverse, ``p_fixed = T^-1(p_moving)``.

Everything is in world LPS millimetres (``geometry``). Errors the user can fix raise ``AlignmentError`` (or the
readers' ``LandmarkFileError``) with the file named.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_landmark.alignment_landmarks import AlignmentError, common_landmarks, landmark_statuses, load_landmarks
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.landmark_files import (LandmarkFileError, read_image_3d, read_landmark_csv)
from nnunet_landmark.layout import atomic_write_json
from nnunet_landmark.surfaces import MESH_FORMATS, SurfaceError, label_surface, mesh_volume, write_surface

DIRECTION = ("maps points of the fixed space into the moving space: p_moving = T(p_fixed) (ITK resampling "
             "convention; resample moving images onto the fixed grid with T as is, move moving points and "
             "meshes into the fixed space with its inverse)")
# the landmarks deviate from their best-fit line by less than this fraction of their spread: the rotation about
# that line would be decided by the landmarks' noise
COLLINEARITY_LIMIT = 0.05
# a rigid fit between landmark sets whose sizes differ by more than this factor: most likely mm vs cm (or m)
SIZE_RATIO_LIMIT = 2.0


@dataclass(frozen=True)
class Spread:
    """How well a landmark set fixes a rotation: its extent along its principal axes."""

    singular_values: tuple[float, float, float]  # of the centred (N, 3) positions, largest first
    largest_triangle_area_mm2: float
    count: int

    @property
    def collinearity_ratio(self) -> float:
        """Second over first singular value: 0 for points on a line, up to 1."""
        return self.singular_values[1] / self.singular_values[0] if self.singular_values[0] > 0 else 0.0

    @property
    def rms_radius_mm(self) -> float:
        """RMS distance of the landmarks to their centroid."""
        return float(np.sqrt(np.sum(np.square(self.singular_values)) / self.count))

    @property
    def rms_distance_from_line_mm(self) -> float:
        """RMS distance of the landmarks to their best-fit line."""
        return float(np.sqrt((self.singular_values[1] ** 2 + self.singular_values[2] ** 2) / self.count))


def landmark_spread(points: np.ndarray) -> Spread:
    """Principal extent and largest triangle of an (N, 3) landmark set."""
    p = np.asarray(points, dtype=np.float64)
    s = np.linalg.svd(p - p.mean(axis=0), compute_uv=False)
    s = np.pad(s, (0, 3 - len(s)))
    area = 0.0
    n = len(p)
    for i in range(n):
        for j in range(i + 1, n):
            for k in range(j + 1, n):
                area = max(area, 0.5 * float(np.linalg.norm(np.cross(p[j] - p[i], p[k] - p[i]))))
    return Spread((float(s[0]), float(s[1]), float(s[2])), area, n)


def check_not_collinear(points: np.ndarray, names: Sequence[str], source: str) -> Spread:
    """Raise if the landmarks lie (nearly) on a line: the rotation about it would be undetermined."""
    spread = landmark_spread(points)
    if spread.collinearity_ratio < COLLINEARITY_LIMIT:
        raise AlignmentError(
            f"{source}: the landmarks {', '.join(names)} are (nearly) collinear: singular value ratio "
            f"{spread.collinearity_ratio:.4f} < {COLLINEARITY_LIMIT} (condition number "
            f"{spread.singular_values[0] / max(spread.singular_values[1], 1e-300):.3g}), RMS distance from their "
            f"best-fit line {spread.rms_distance_from_line_mm:.3f} mm, largest triangle area {spread.largest_triangle_area_mm2:.3f} mm^2. "
            f"The rotation about that line is undetermined: add a landmark off the line.")
    return spread


def check_same_units(moving: np.ndarray, fixed: np.ndarray, moving_source: str, fixed_source: str) -> float:
    """Raise if the two sets differ in size by more than ``SIZE_RATIO_LIMIT`` (mm vs cm?); return the ratio."""
    size_moving = landmark_spread(moving).rms_radius_mm
    size_fixed = landmark_spread(fixed).rms_radius_mm
    ratio = size_fixed / size_moving
    if not 1 / SIZE_RATIO_LIMIT <= ratio <= SIZE_RATIO_LIMIT:
        raise AlignmentError(
            f"the landmark sets differ in size by a factor {ratio:.3g} (RMS distance to their centroid: "
            f"{moving_source} {size_moving:.3g}, {fixed_source} {size_fixed:.3g}): a rigid transform cannot match "
            f"them. Are both in mm (not cm or m)? If the size difference is real, fit a similarity transform (--scale).")
    return ratio


def check_landmarks_in_image(points: np.ndarray, geometry: ImageGeometry, landmark_source: str,
                             image_source: str, margin_voxels: float = 10.0) -> None:
    """Raise if every landmark lies outside the image they should belong to (another case, or not LPS?)."""
    if not np.any(geometry.contains_world_point(points, margin_voxels)):
        corners = geometry.index_to_world(np.array([[0, 0, 0], np.asarray(geometry.size) - 1], dtype=np.float64))
        raise AlignmentError(
            f"{landmark_source}: none of the landmarks lies within {image_source} (image corners "
            f"{np.round(corners[0], 1).tolist()} to {np.round(corners[1], 1).tolist()} mm, landmark centroid "
            f"{np.round(points.mean(axis=0), 1).tolist()} mm): are they of the same case, and in LPS mm?")


def check_not_mirrored(fixed: np.ndarray, moving: np.ndarray, transform: sitk.Transform, scale: bool,
                       moving_source: str, fixed_source: str) -> None:
    """Raise if the sets are mirror images: one axis flipped (a left-right convention, voxel indices).

    No rotation maps a set onto its mirror image unless the landmarks are coplanar, so a fit to the mirrored
    set that is much better than the rigid one gives it away (3 landmarks are always coplanar: not testable).
    An RAS file read as LPS is x and y flipped, a rotation by 180 degrees: no check can see that one.
    """
    if len(fixed) < 4:
        return
    rms = float(np.sqrt(np.mean(landmark_residuals(transform, fixed, moving) ** 2)))
    mirror = np.diag([-1.0, 1.0, 1.0])
    mirrored_fit = fit_landmark_transform(fixed @ mirror, moving, scale)
    mirrored_rms = float(np.sqrt(np.mean(landmark_residuals(mirrored_fit, fixed @ mirror, moving) ** 2)))
    if rms > 3.0 and mirrored_rms < 0.25 * rms:
        raise AlignmentError(
            f"{fixed_source} looks mirrored against {moving_source}: the best rotation leaves an RMS residual of "
            f"{rms:.1f} mm, a mirror image fits to {mirrored_rms:.2f} mm. Is one file's axis flipped (a left-right "
            f"convention, voxel indices instead of LPS mm)? Both must be world LPS (or Slicer RAS markups) in mm.")


# ---------------------------------------------------------------------------------------------- fitting
def fit_landmark_transform(fixed_points: np.ndarray, moving_points: np.ndarray, scale: bool = False) -> sitk.Transform:
    """Least-squares rigid (``VersorRigid3DTransform``) or similarity (``Similarity3DTransform``) transform.

    Returned in ITK's resampling convention: it maps the fixed points onto the moving points,
    ``T(fixed_points[i]) ~ moving_points[i]``. Needs >= 3 non-collinear pairs (checked by the caller, see
    ``check_not_collinear``).
    """
    fixed = np.asarray(fixed_points, dtype=np.float64)
    moving = np.asarray(moving_points, dtype=np.float64)
    if fixed.shape != moving.shape or fixed.ndim != 2 or fixed.shape[1] != 3 or len(fixed) < 3:
        raise ValueError(f"need two (N >= 3, 3) arrays of corresponding points, got {fixed.shape} and {moving.shape}")
    initial = sitk.Similarity3DTransform() if scale else sitk.VersorRigid3DTransform()
    return sitk.LandmarkBasedTransformInitializer(initial, fixed.ravel().tolist(), moving.ravel().tolist())


def transform_matrix(transform: sitk.Transform) -> np.ndarray:
    """The 4 x 4 homogeneous matrix of a linear ITK transform, in its own direction (fixed -> moving)."""
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), dtype=np.float64)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = translation + center - matrix @ center  # ITK: T(x) = M (x - c) + c + t
    return out


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4 x 4 homogeneous matrix to (..., 3) points."""
    p = np.asarray(points, dtype=np.float64)
    return p @ matrix[:3, :3].T + matrix[:3, 3]


def landmark_residuals(transform: sitk.Transform, fixed_points: np.ndarray, moving_points: np.ndarray) -> np.ndarray:
    """Fiducial registration error per landmark (mm): ``|T(fixed_i) - moving_i|``."""
    mapped = apply_matrix(transform_matrix(transform), fixed_points)
    return np.linalg.norm(mapped - np.asarray(moving_points, dtype=np.float64), axis=-1)


def leave_one_out_errors(fixed_points: np.ndarray, moving_points: np.ndarray,
                         scale: bool = False) -> tuple[np.ndarray | None, str]:
    """Target error (mm) of each landmark under a transform fitted to the others, and a note.

    With 3 landmarks there is nothing to report: the other 2 fix a rigid transform only up to a rotation about
    the line through them, so the error of the one left out says nothing about the alignment. Returns
    ``(None, reason)`` then. A left-out landmark whose remaining ones are (nearly) collinear gets NaN.
    """
    fixed = np.asarray(fixed_points, dtype=np.float64)
    moving = np.asarray(moving_points, dtype=np.float64)
    n = len(fixed)
    if n < 4:
        return None, (f"not available with {n} landmarks: leaving one out leaves {n - 1}, which fix a rigid transform "
                      f"only up to a rotation about the line through them; it needs >= 4 landmarks")
    errors = np.full(n, np.nan)
    skipped = []
    for i in range(n):
        keep = np.arange(n) != i
        if min(landmark_spread(fixed[keep]).collinearity_ratio,
               landmark_spread(moving[keep]).collinearity_ratio) < COLLINEARITY_LIMIT:
            skipped.append(i)
            continue
        transform = fit_landmark_transform(fixed[keep], moving[keep], scale)
        errors[i] = landmark_residuals(transform, fixed[i:i + 1], moving[i:i + 1])[0]
    note = "each landmark's error under a transform fitted to the others"
    if skipped:
        note += f"; NaN for {len(skipped)} landmark(s) whose others are (nearly) collinear"
    return errors, note


# ---------------------------------------------------------------------------------------------- images, meshes
def resample_segmentation(segmentation: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """Our (moving) segmentation on the fixed image's grid, nearest neighbour; ``transform`` maps fixed -> moving."""
    return sitk.Resample(segmentation, reference, transform, sitk.sitkNearestNeighbor, 0.0, segmentation.GetPixelID())


# ---------------------------------------------------------------------------------------------- the command
def align(moving_file: str | os.PathLike, fixed_file: str | os.PathLike, output_transform: str | os.PathLike,
          scale: bool = False, case: str | None = None, fixed_case: str | None = None,
          segmentation: str | os.PathLike | None = None, fixed_image: str | os.PathLike | None = None,
          segmentation_output: str | os.PathLike | None = None, surface: str | os.PathLike | None = None,
          label: int = 1, allow_flagged: bool = False) -> dict:
    """Fit, write ``output_transform`` (.tfm) and the report (.json beside it); optionally move a segmentation.

    ``moving_file`` holds our landmarks (the CT the segmentation belongs to), ``fixed_file`` theirs. Every input is
    checked before anything is written; a landmark our export flagged as not credible (``landmark_statuses``) stops
    the alignment unless ``allow_flagged``. Returns the report that is also written as JSON.
    """
    output_transform = Path(output_transform)
    if output_transform.suffix.lower() not in (".tfm", ".txt", ".h5", ".hdf5", ".mat"):
        raise AlignmentError(f"{output_transform}: write the transform as an ITK .tfm (3D Slicer and SimpleITK read it)")
    if fixed_image is not None and segmentation is None:
        raise AlignmentError(f"{fixed_image}: --fixed-image resamples a segmentation; give it with --segmentation")
    if surface is not None and segmentation is None:
        raise AlignmentError(f"{surface}: a surface is made from a segmentation; give it with --segmentation")
    if segmentation is not None and fixed_image is None and surface is None:
        raise AlignmentError(f"{segmentation}: say what to do with the segmentation: --fixed-image (resample it onto "
                             f"their grid) and/or --surface (its surface in their space)")
    if surface is not None and Path(surface).suffix.lower() not in MESH_FORMATS:
        raise AlignmentError(f"{surface}: unknown surface format; use one of {', '.join(MESH_FORMATS)}")

    moving_landmarks = load_landmarks(moving_file, case)
    flagged = {n: s for n, s in landmark_statuses(moving_file, case).items() if s != "ok" and n in moving_landmarks}
    if flagged and not allow_flagged:
        raise AlignmentError(f"{moving_file}" + (f", case {case}" if case else "") + ": landmark(s) without a credible "
                             "estimate: " + "; ".join(f"{n}: {s}" for n, s in flagged.items())
                             + ". Check that case (its segmentation and image); --allow-flagged aligns with them "
                               "anyway")
    fixed_landmarks = load_landmarks(fixed_file, fixed_case if fixed_case is not None else _same_case(fixed_file, case))
    names, moving, fixed = common_landmarks(moving_landmarks, fixed_landmarks, f"{moving_file} (moving)",
                                            f"{fixed_file} (fixed)")
    check_not_collinear(moving, names, str(moving_file))
    check_not_collinear(fixed, names, str(fixed_file))
    size_ratio = None if scale else check_same_units(moving, fixed, str(moving_file), str(fixed_file))
    seg_image = _read_image(segmentation) if segmentation is not None else None
    reference = _read_image(fixed_image) if fixed_image is not None else None
    if seg_image is not None:
        check_landmarks_in_image(moving, ImageGeometry.from_image(seg_image), str(moving_file), str(segmentation))
    if reference is not None:
        check_landmarks_in_image(fixed, ImageGeometry.from_image(reference), str(fixed_file), str(fixed_image))

    transform = fit_landmark_transform(fixed, moving, scale)
    check_not_mirrored(fixed, moving, transform, scale, str(moving_file), str(fixed_file))
    matrix = transform_matrix(transform)
    residuals = landmark_residuals(transform, fixed, moving)
    loo, loo_note = leave_one_out_errors(fixed, moving, scale)
    surface_mesh = None
    if surface is not None:
        try:
            surface_mesh = label_surface(seg_image, label)
        except SurfaceError as e:
            raise AlignmentError(f"{segmentation}: {e}") from None

    output_transform.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(transform, str(output_transform))
    report = {
        "transform_file": output_transform.name,
        "transform_type": transform.GetName(),
        "direction": DIRECTION,
        "moving": str(moving_file),
        "fixed": str(fixed_file),
        "coordinate_system": "LPS",
        "units": "mm",
        "fixed_to_moving_matrix": matrix.tolist(),
        "moving_to_fixed_matrix": np.linalg.inv(matrix).tolist(),
        "scale": float(transform.GetScale()) if scale else 1.0,
        "rotation_degrees": float(np.degrees(np.arccos(np.clip(
            (np.trace(matrix[:3, :3]) / (transform.GetScale() if scale else 1.0) - 1) / 2, -1, 1)))),
        "landmarks": [{"name": n, "moving": moving[i].tolist(), "fixed": fixed[i].tolist(),
                       "fixed_mapped_to_moving": apply_matrix(matrix, fixed[i]).tolist(),
                       "fre_mm": float(residuals[i]),
                       "leave_one_out_mm": None if loo is None or np.isnan(loo[i]) else float(loo[i])}
                      for i, n in enumerate(names)],
        "fre_rms_mm": float(np.sqrt(np.mean(residuals ** 2))),
        "leave_one_out": {"available": loo is not None, "note": loo_note,
                          "rms_mm": None if loo is None or np.all(np.isnan(loo))
                          else float(np.sqrt(np.nanmean(loo ** 2)))},
        "landmarks_only_in_moving": [n for n in moving_landmarks if n not in fixed_landmarks],
        "landmarks_only_in_fixed": [n for n in fixed_landmarks if n not in moving_landmarks],
    }
    if size_ratio is not None:
        report["size_ratio_fixed_to_moving"] = size_ratio
    if reference is not None:
        out = Path(segmentation_output) if segmentation_output else \
            output_transform.parent / (output_transform.stem + "_segmentation.nii.gz")
        out.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(resample_segmentation(seg_image, reference, transform), str(out), useCompression=True)
        report["segmentation_in_fixed"] = str(out)
    if surface_mesh is not None:
        vertices, faces = surface_mesh
        vertices_fixed = apply_matrix(np.linalg.inv(matrix), vertices)
        Path(surface).parent.mkdir(parents=True, exist_ok=True)
        write_surface(surface, vertices_fixed, faces)
        report["surface"] = {"file": str(surface), "label": label, "space": "fixed (LPS mm)",
                             "vertices": int(len(vertices)), "triangles": int(len(faces)),
                             "volume_mm3": mesh_volume(vertices_fixed, faces)}

    report_file = output_transform.with_suffix(".json")
    atomic_write_json(report, report_file)
    report["report_file"] = str(report_file)
    return report


def _same_case(path: str | os.PathLike, case: str | None) -> str | None:
    """``case`` where ``path`` is a CSV that holds it (their table may use our case names), else None."""
    if case is None or not str(path).lower().endswith(".csv") or not os.path.isfile(path):
        return None
    return case if case in read_landmark_csv(path) else None


def _read_image(path: str | os.PathLike) -> sitk.Image:
    return read_image_3d(path, "image", AlignmentError)


def format_report(report: dict) -> str:
    """The printed summary: transform, direction, FRE and leave-one-out error per landmark."""
    lines = [f"{report['transform_type']} from {len(report['landmarks'])} landmarks "
             f"(moving: {report['moving']}; fixed: {report['fixed']})",
             f"{report['transform_file']} {report['direction']}",
             f"rotation {report['rotation_degrees']:.2f} deg, scale {report['scale']:.5f}",
             f"{'landmark':<24}{'FRE (mm)':>10}{'leave-one-out (mm)':>20}"]
    for lm in report["landmarks"]:
        loo = "n/a" if lm["leave_one_out_mm"] is None else f"{lm['leave_one_out_mm']:.3f}"
        lines.append(f"{lm['name']:<24}{lm['fre_mm']:>10.3f}{loo:>20}")
    loo_rms = report["leave_one_out"]["rms_mm"]
    lines.append(f"{'RMS':<24}{report['fre_rms_mm']:>10.3f}{'n/a' if loo_rms is None else f'{loo_rms:.3f}':>20}")
    if not report["leave_one_out"]["available"]:
        lines.append(f"leave-one-out error {report['leave_one_out']['note']}")
    for key, what in (("landmarks_only_in_moving", "only in the moving file (unused)"),
                      ("landmarks_only_in_fixed", "only in the fixed file (unused)")):
        if report[key]:
            lines.append(f"{what}: {', '.join(report[key])}")
    if "segmentation_in_fixed" in report:
        lines.append(f"segmentation on the fixed grid: {report['segmentation_in_fixed']}")
    if "surface" in report:
        lines.append(f"surface of label {report['surface']['label']} in the fixed space: {report['surface']['file']} "
                     f"({report['surface']['triangles']} triangles, {report['surface']['volume_mm3'] / 1000:.1f} ml)")
    lines.append(f"report: {report['report_file']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_landmark_align",
        description="Rigid (or similarity) alignment of our CT to another modality from >= 3 named landmarks both "
                    "sides hold. Writes an ITK .tfm (3D Slicer, SimpleITK) that maps points of the fixed space "
                    "into the moving space (ITK resampling convention) and a .json report beside it (residuals, "
                    "leave-one-out error, the matrix both ways).")
    parser.add_argument("-moving", required=True,
                        help="our landmarks: the predicted CASE.mrk.json or landmarks.csv (LPS mm)")
    parser.add_argument("-fixed", required=True,
                        help="their landmarks: 3D Slicer markups (.mrk.json, LPS or RAS) or a case,name,x,y,z CSV "
                             "(LPS mm) from the other modality")
    parser.add_argument("-o", required=True, help="output transform, e.g. transform.tfm (report: transform.json)")
    parser.add_argument("--scale", action="store_true",
                        help="fit a similarity transform (rotation, translation, isotropic scale) instead of rigid")
    parser.add_argument("--case", default=None, help="case to use from a -moving CSV with several cases (also used "
                                                     "for a -fixed CSV that holds it)")
    parser.add_argument("--fixed-case", "--fixed_case", dest="fixed_case", default=None,
                        help="case to use from a -fixed CSV with several cases")
    parser.add_argument("--segmentation", default=None, help="our segmentation (CASE.nii.gz) to bring along")
    parser.add_argument("--fixed-image", "--fixed_image", dest="fixed_image", default=None,
                        help="their image: the segmentation is resampled onto its grid (nearest neighbour)")
    parser.add_argument("--segmentation-output", "--segmentation_output", dest="segmentation_output", default=None,
                        help="where to write the resampled segmentation (default: beside -o, STEM_segmentation.nii.gz)")
    parser.add_argument("--surface", default=None,
                        help="write the surface of --label of the segmentation, moved into the fixed space, as .vtk, "
                             ".stl, .ply or .obj (LPS mm)")
    parser.add_argument("--label", type=int, default=1, help="label of the surface (default 1, the LV cavity)")
    parser.add_argument("--allow-flagged", "--allow_flagged", dest="allow_flagged", action="store_true",
                        help="align even with landmarks nnUNetv2_predict flagged as not credible (their status is "
                             "not 'ok'); by default such a case is refused, naming the landmark and the reason")
    args = parser.parse_args(argv)
    try:
        report = align(args.moving, args.fixed, args.o, args.scale, args.case, args.fixed_case, args.segmentation,
                       args.fixed_image, args.segmentation_output, args.surface, args.label, args.allow_flagged)
    except (AlignmentError, LandmarkFileError, FileNotFoundError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    print(format_report(report))


if __name__ == "__main__":
    main()
