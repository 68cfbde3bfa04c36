"""Every figure of the evaluation: QC slices of one case and the comparison plots (Dice, landmark errors,
per fold). matplotlib (Agg) is imported here only, so the rest of the evaluation stays import-light.

QC figures, in the spirit of Fig. 2 of the paper: three orthogonal slices through the reference landmark
(axial, coronal, sagittal), reoriented to the patient axes (radiological convention: patient left on the
viewer's right, anterior up in the axial panel, superior up in the others), zoomed onto the structure.
Reference and predicted outlines of one label and the reference and predicted points are drawn in
distinct colours; the title gives the case's Dice and landmark error (mm). Points that lie more than one
slice away from a panel's slice are drawn hollow at their in-plane projection.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from nnunet_landmark.metrics import dice, landmark_error_mm  # noqa: E402
from nnunet_landmark.evaluation.tables import format_number, wilcoxon_text  # noqa: E402
from nnunet_landmark.geometry import ImageGeometry  # noqa: E402
from nnunet_landmark.landmark_files import read_image_3d  # noqa: E402

MODEL_COLOURS = {"landmark": "#1f77b4", "plain": "#ff7f0e"}
METHOD_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f"]


REFERENCE_COLOUR = "#00e5ff"  # cyan
PREDICTION_COLOUR = "#ff3dbb"  # magenta (cyan/magenta stay distinct for red-green colour blindness)
EXTRA_STYLES = [("#ffd400", "^"), ("#7cff4d", "s"), ("#ff8c1a", "D"), ("#ffffff", "v")]
CT_WINDOW = (-200.0, 600.0)  # cardiac CT: level 200, width 800 HU


def _read_oriented(path: str | os.PathLike, what: str) -> sitk.Image:
    return sitk.DICOMOrient(read_image_3d(path, what, ValueError), "LPS")


def _window(array: np.ndarray, window) -> tuple[float, float]:
    if window is not None:
        return float(window[0]), float(window[1])
    if array.min() < -500:  # looks like CT in HU
        return CT_WINDOW
    lo, hi = np.percentile(array, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def qc_figure(image_path: str | os.PathLike, reference_label_path: str | os.PathLike,
              predicted_label_path: str | os.PathLike, reference_point_lps: Sequence[float],
              predicted_point_lps: Sequence[float] | None, output_png: str | os.PathLike, lv_label: int = 1,
              extra_points: Mapping[str, Sequence[float]] | None = None, title: str | None = None,
              landmark_name: str = "apex", window: tuple[float, float] | None = None,
              margin_mm: float = 25.0, structure_name: str = "LV") -> dict:
    """Write a QC PNG; returns {"dice", "error_mm", "png"}.

    ``lv_label``: the label outlined (named ``structure_name`` in the legend).
    ``extra_points``: further named world points to draw (e.g. baselines). ``window``: display range of the
    image (default cardiac CT window for HU images, else the 1-99th percentiles).
    """
    image = _read_oriented(image_path, "image")
    reference_image = _read_oriented(reference_label_path, "reference segmentation")
    predicted_image = _read_oriented(predicted_label_path, "predicted segmentation")
    geometry = ImageGeometry.from_image(image)
    for path, other in ((reference_label_path, reference_image), (predicted_label_path, predicted_image)):
        if not ImageGeometry.from_image(other).same_grid_as(geometry):
            raise ValueError(f"{path}: its grid differs from the image {image_path}; QC needs both on the image grid")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    reference = sitk.GetArrayFromImage(reference_image) == lv_label
    predicted = sitk.GetArrayFromImage(predicted_image) == lv_label
    dice_value = dice(reference, predicted)
    error = None if predicted_point_lps is None else landmark_error_mm(predicted_point_lps, reference_point_lps)

    points = [(f"reference {landmark_name}", reference_point_lps, REFERENCE_COLOUR, "P")]
    if predicted_point_lps is not None:
        points.append((f"predicted {landmark_name} ({error:.1f} mm)", predicted_point_lps, PREDICTION_COLOUR, "X"))
    for n, (name, point) in enumerate((extra_points or {}).items()):
        colour, marker = EXTRA_STYLES[n % len(EXTRA_STYLES)]
        label = f"{name} ({landmark_error_mm(point, reference_point_lps):.1f} mm)"
        points.append((label, point, colour, marker))
    index_of = {label: geometry.world_to_index(np.asarray(p, dtype=np.float64)) for label, p, _, _ in points}
    centre = np.clip(np.round(index_of[points[0][0]]).astype(int), 0, np.asarray(geometry.size) - 1)

    # zoom: the masks and every point plus a margin, per image axis (x, y, z voxels)
    both = np.argwhere(reference | predicted)[:, ::-1]
    extent_points = np.vstack([both] + [v[None] for v in index_of.values()]) if len(both) else \
        np.vstack(list(index_of.values()))
    margin = margin_mm / np.asarray(geometry.spacing)
    lo = np.maximum(extent_points.min(axis=0) - margin, -0.5)
    hi = np.minimum(extent_points.max(axis=0) + margin, np.asarray(geometry.size) - 0.5)

    lo_hi = _window(array, window)
    sx, sy, sz = geometry.spacing
    # (name, image/reference/prediction slices, column axis, row axis, aspect, row origin, normal axis,
    #  patient-direction letters at the left/right/bottom/top edges); axes are image x, y, z = 0, 1, 2
    panels = [
        ("axial", array[centre[2]], reference[centre[2]], predicted[centre[2]], 0, 1, sy / sx, "upper", 2,
         ("R", "L", "P", "A")),
        ("coronal", array[:, centre[1], :], reference[:, centre[1], :], predicted[:, centre[1], :], 0, 2, sz / sx,
         "lower", 1, ("R", "L", "I", "S")),
        ("sagittal", array[:, :, centre[0]], reference[:, :, centre[0]], predicted[:, :, centre[0]], 1, 2, sz / sy,
         "lower", 0, ("A", "P", "I", "S")),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(14, 5.6), dpi=110)
    for ax, (name, img, ref, pred, col_axis, row_axis, aspect, origin, normal_axis, letters) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=lo_hi[0], vmax=lo_hi[1], aspect=aspect, origin=origin,
                  interpolation="nearest")
        for mask, colour in ((ref, REFERENCE_COLOUR), (pred, PREDICTION_COLOUR)):
            if mask.any():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.6)
        for order, (label, _, colour, marker) in enumerate(points):  # the reference point is drawn on top
            idx = index_of[label]
            off_slice = abs(idx[normal_axis] - centre[normal_axis]) > 1.0
            ax.plot(idx[col_axis], idx[row_axis], linestyle="none", marker=marker, markersize=9,
                    markeredgewidth=1.6, markeredgecolor=colour if off_slice else "black",
                    markerfacecolor="none" if off_slice else colour, zorder=10 - order)
        ax.set_xlim(lo[col_axis], hi[col_axis])
        ax.set_ylim((hi[row_axis], lo[row_axis]) if origin == "upper" else (lo[row_axis], hi[row_axis]))
        ax.set_title(f"{name} (slice {centre[normal_axis]})", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        _edge_letters(ax, letters)
    handles = [Line2D([], [], color=REFERENCE_COLOUR, lw=2, label=f"reference {structure_name}"),
               Line2D([], [], color=PREDICTION_COLOUR, lw=2, label=f"predicted {structure_name}")]
    handles += [Line2D([], [], linestyle="none", marker=m, markersize=9, markeredgecolor="black", markerfacecolor=c,
                       label=label) for label, _, c, m in points]
    figure.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.03), ncol=min(len(handles), 4),
                  frameon=False, fontsize=10)
    heading = title or Path(str(predicted_label_path)).name.split(".")[0]
    error_text = "" if error is None else f"  |  {landmark_name} error {error:.1f} mm"
    figure.suptitle(f"{heading}  |  Dice {dice_value:.3f}{error_text}", fontsize=13)
    figure.text(0.5, 0.005, "slices through the reference point; hollow marker: point more than one slice "
                "away, shown projected", ha="center", fontsize=8, color="#555555")
    figure.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.19, wspace=0.04)
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_png, facecolor="white")
    plt.close(figure)
    return {"dice": dice_value, "error_mm": error, "png": str(output_png)}


def _edge_letters(ax, letters: tuple[str, str, str, str]) -> None:
    """Patient-direction letters at the left, right, bottom and top edges of a panel."""
    left, right, bottom, top = letters
    style = dict(color="white", fontsize=10, fontweight="bold", transform=ax.transAxes,
                 bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.6, edgecolor="none"))
    ax.text(0.01, 0.5, left, ha="left", va="center", **style)
    ax.text(0.99, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)
    ax.text(0.5, 0.99, top, ha="center", va="top", **style)


# ---------------------------------------------------------------------------------------------- comparison
def _box_with_points(ax, samples: Sequence[Sequence[float]], names: Sequence[str], colours: Sequence[str],
                     paired: bool = False) -> None:
    clean = [[v for v in s if v is not None and math.isfinite(v)] for s in samples]
    box = ax.boxplot(clean, tick_labels=list(names), widths=0.5, patch_artist=True, showfliers=False,
                     medianprops=dict(color="black", linewidth=1.5), showmeans=True,
                     meanprops=dict(marker="D", markerfacecolor="white", markeredgecolor="black", markersize=7))
    for patch, colour in zip(box["boxes"], colours):
        patch.set_facecolor(colour)
        patch.set_alpha(0.35)
    rng = np.random.default_rng(0)
    offsets = rng.uniform(-0.08, 0.08, size=max(len(s) for s in samples))
    if paired:
        for n in range(len(samples[0])):
            ys = [s[n] for s in samples]
            if all(y is not None and math.isfinite(y) for y in ys):
                ax.plot([i + 1 + offsets[n] for i in range(len(samples))], ys, color="#999999", linewidth=0.7,
                        zorder=1)
    for i, (s, colour) in enumerate(zip(samples, colours)):
        ys = np.asarray([np.nan if v is None else v for v in s], dtype=float)
        ax.scatter(i + 1 + offsets[:len(ys)], ys, s=22, color=colour, edgecolor="black", linewidth=0.5, zorder=3)


def comparison_plots(comparison: Mapping, output: Path) -> dict:
    """Dice box plot, landmark-error box plot and per-fold bars; returns {name: png path}."""
    per_case, landmark, paper = comparison["per_case"], comparison["landmark"], comparison["paper"]
    methods = comparison["methods"]
    n = len(per_case)
    paths = {}

    figure, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
    _box_with_points(ax, [[r["dice_landmark"] for r in per_case], [r["dice_plain"] for r in per_case]],
                     ["landmark model", "plain nnU-Net"], [MODEL_COLOURS["landmark"], MODEL_COLOURS["plain"]],
                     paired=True)
    ax.set_ylabel(f"Dice, {comparison['lv_label_name']}")
    ax.set_title(f"LV Dice per held-out image (n = {n}), lines pair the same image\n"
                 f"{wilcoxon_text(comparison['dice']['wilcoxon'])}, mean difference "
                 f"{comparison['dice']['difference']['mean']:+.4f}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    paths["dice_boxplot"] = str(output / "dice_boxplot.png")
    figure.savefig(paths["dice_boxplot"], facecolor="white")
    plt.close(figure)

    figure, ax = plt.subplots(figsize=(8, 5), dpi=110)
    wrapped = {"error_tip_plain": "tip of plain\nnnU-Net LV", "error_tip_landmark": "tip of landmark\nmodel's LV"}
    names = [wrapped.get(k, methods[k]) + f"\nmean {format_number(comparison['landmark_error_mm'][k]['mean'], 1)} mm" for k in methods]
    _box_with_points(ax, [[r[k] for r in per_case] for k in methods], names, METHOD_COLOURS)
    ax.axhline(paper["error_mm"], color="#d62728", linestyle="--", linewidth=1)
    ax.text(0.55, paper["error_mm"], f"paper: {paper['error_mm']} mm mean", color="#d62728", va="bottom",
            ha="left", fontsize=8)
    ax.set_ylabel(f"{landmark} error (mm)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{landmark} error per held-out image (n = {n}): model vs baselines\n"
                 f"box: median and quartiles; white diamond: mean", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    paths["landmark_error_boxplot"] = str(output / "landmark_error_boxplot.png")
    figure.savefig(paths["landmark_error_boxplot"], facecolor="white")
    plt.close(figure)

    folds = [str(f) for f in comparison["folds"]]
    per_fold = comparison["per_fold"]
    x = np.arange(len(folds))
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(9, 1.1 * len(folds) + 6), 4.5), dpi=110)
    for i, (key, name) in enumerate((("dice_landmark", "landmark model"), ("dice_plain", "plain nnU-Net"))):
        left.bar(x + (i - 0.5) * 0.38, [_nan(per_fold[f][key]) for f in folds], width=0.38, label=name,
                 color=list(MODEL_COLOURS.values())[i])
    dice_values = [v for f in folds for v in (per_fold[f]["dice_landmark"], per_fold[f]["dice_plain"])
                   if v is not None and math.isfinite(v)]
    left.set_ylim(max(0.0, min(dice_values, default=0.0) - 0.05), 1.0)
    left.set_title("mean LV Dice per fold", fontsize=10)
    width = 0.8 / len(methods)
    for i, (key, name) in enumerate(methods.items()):
        right.bar(x + (i - (len(methods) - 1) / 2) * width, [_nan(per_fold[f][key]) for f in folds],
                  width=width, label=name, color=METHOD_COLOURS[i])
    right.set_title(f"mean {landmark} error per fold (mm)", fontsize=10)
    for ax in (left, right):
        ax.set_xticks(x, [f"fold {f}" for f in folds])
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    paths["per_fold"] = str(output / "per_fold.png")
    figure.savefig(paths["per_fold"], facecolor="white")
    plt.close(figure)
    return paths


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


# the figure's two point sets: exact colours (no transparency) so that a test can find each in every panel
FIXED_COLOUR, MOVED_COLOUR = "#1f77b4", "#d62728"


def plot_alignment(figure: dict, path: Path, max_points: int = 3000) -> Path:
    """Three orthogonal projections (LPS x-y, x-z, y-z) of the LV surface points, before (top) and after (bottom)
    alignment: the fixed-space truth and our surface moved by the estimated transform."""
    step = max(1, len(figure["fixed"]) // max_points)
    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for row, (when, moved) in enumerate((("before", figure["before"]), ("after", figure["after"]))):
        for column, (a, b) in enumerate(((0, 1), (0, 2), (1, 2))):
            ax = axes[row, column]
            ax.scatter(figure["fixed"][::step, a], figure["fixed"][::step, b], s=10, c=FIXED_COLOUR, alpha=1.0,
                       linewidths=0, label="true LV surface, fixed space")
            ax.scatter(moved[::step, a], moved[::step, b], s=4, c=MOVED_COLOUR, alpha=1.0, linewidths=0,
                       label="our LV surface" + (" (not aligned)" if when == "before" else ", aligned"))
            ax.set_xlabel(f"{'xyz'[a]} (LPS mm)")
            ax.set_ylabel(f"{'xyz'[b]} (LPS mm)")
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_title(f"{when} alignment, {'xyz'[a]}-{'xyz'[b]}")
        axes[row, 0].legend(loc="upper left", fontsize=7, markerscale=2)
    fig.suptitle(f"{figure['case']}: rigid alignment from the predicted landmarks")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
