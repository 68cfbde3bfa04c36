"""Landmark export at prediction time (the predictor class for Python users is in ``predictor``).

``export_prediction_with_landmarks`` has the signature of nnU-Net's ``export_prediction_from_logits``
and is what ``nnunet_integration`` installs in its place. For a landmark model it exports the
segmentation with nnU-Net's own function from the C segmentation channels (so the file is exactly what
plain nnU-Net writes) and then, from the K heatmap channels:

* ``CASE.mrk.json``: 3D Slicer markups, LPS mm, one control point per landmark, labelled by name, its status,
  expected error and estimator in the description; a landmark without a credible estimate has ``positionStatus``
  ``undefined`` (``credibility``);
* a row per landmark in the folder's ``landmarks.csv`` (``case,name,x,y,z,i,j,k,confidence,heatmap_x,heatmap_y,
  heatmap_z,estimator,prior_x,prior_y,prior_z,heatmap_claim_mm,expected_error_mm,status``: world LPS mm, continuous
  ITK voxel index of the original image, confidence in [0, 1], the heatmap's own extremum in world LPS mm, how the
  position was estimated (``prior+heatmap``, ``prior`` where the heatmap found nothing, or ``heatmap``), the position
  prior alone (empty without one), the distance the heatmap claims at its extremum, the expected error (mm) and
  ``ok`` or why the landmark is not credible);
* with ``save_probabilities``: ``heatmaps/CASE_NAME.nii.gz``, each heatmap where it was decoded: on the preprocessed
  grid at the heatmap head's resolution, with that grid's world geometry (float32 values in [0, 1], rounded to float16
  precision; see ``write_heatmaps``).

Heatmaps are decoded where the network predicted them (preprocessed space, with sub-voxel refinement), combined
with the model's landmark position prior placed in the frame of the predicted segmentation (``position_prior``),
and the point is mapped back through ``geometry`` - no resampling of the heatmap is involved. Decoding
makes no full-volume temporaries and never copies the C + K logits (a 512 x 512 x 300 case: about 0.1 s
for three landmarks; see benchmarks/export_scale.py), so the export costs what nnU-Net's own does plus
the landmark files.
"""
from __future__ import annotations

import csv
import os
import sys
from collections import OrderedDict
from typing import Union

import numpy as np
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference import export_prediction as nnunet_export
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_landmark import credibility, nnunet_integration
from nnunet_landmark.geometry import CaseGeometry
from nnunet_landmark.heatmap_decoding import decode_heatmap
from nnunet_landmark.landmark_files import format_landmark_rows, write_markups
from nnunet_landmark.landmark_heads import LandmarkHeads
from nnunet_landmark.layout import HEATMAP_FOLDER, LANDMARK_TABLE, atomic_write_text, locked_folder
from nnunet_landmark.prior.model import (PRIOR_FLOOR_MM, SURFACE_MARGIN_MM, affine_of, combine_with_heatmap,
                                            pooled_heatmap_error, pooled_prediction, pooled_surface_bands,
                                            sampling_stride, signed_distance, structure_mask, structure_moments)

TABLE_EXTRA_COLUMNS = ("i", "j", "k", "confidence", "heatmap_x", "heatmap_y", "heatmap_z", "estimator", "prior_x",
                       "prior_y", "prior_z", "heatmap_claim_mm", "expected_error_mm", "status")

# the function nnU-Net exports segmentations with, captured before nnunet_integration replaces the names
# that point to it
export_segmentation_from_logits = nnunet_export.export_prediction_from_logits


class SlidingWindowRegion:
    """Voxels whose sliding-window average nnU-Net computes reliably, as a mask evaluated box by box.

    nnU-Net 2.8.1 accumulates Gaussian-weighted logits in float16 (peak weight 10). Near the edges and
    corners of a volume only the far tails of the outermost windows contribute; there both the weighted
    logits and the weight sum are float16 subnormals and their ratio is quantised noise. Harmless for a
    segmentation argmax, fatal for a heatmap argmin. The windows form a Cartesian grid (placed by the
    predictor's ``tile_step_size``) and the Gaussian is separable, so the weight sum is a product of per-axis
    sums; we keep voxels where it reaches ``minimum_weight``. Landmarks inside the anatomy are far from those
    corners. Between the first and last window centres of every axis, where tails meet only at the seams of
    step sizes above 0.5 (weight ~7e-3 at -step_size 1), the float16 sums are normal numbers down to far
    lower weights: there ``seam_minimum_weight`` applies, so that a landmark on a seam is not pushed off it
    (for step sizes up to 0.5 every voxel there already reaches ``minimum_weight``: the region is unchanged).
    Indexing (``region[box]``) gives the boolean mask of a box; the whole mask is never needed at once
    (``np.asarray(region)`` builds it slab by slab, one byte a voxel).
    """

    def __init__(self, shape, patch_size, step_size: float = 0.5, use_gaussian: bool = True,
                 minimum_weight: float = 1e-2, seam_minimum_weight: float = 1e-4):
        self.shape = tuple(int(s) for s in shape)
        self.step_size, self.use_gaussian = float(step_size), bool(use_gaussian)
        self.minimum_weight, self.seam_minimum_weight = minimum_weight, seam_minimum_weight
        patch = [int(p) for p in patch_size]
        padded = [max(s, p) for s, p in zip(self.shape, patch)]
        self.steps = nnunet_integration.sliding_window_steps(padded, patch, step_size)
        self.axis_weights, self.between_centres = [], []
        for axis, (n, p) in enumerate(zip(self.shape, patch)):
            offset = (padded[axis] - n) // 2  # nnU-Net pads small images symmetrically
            x = np.arange(n, dtype=np.float64) + offset
            self.between_centres.append((x >= self.steps[axis][0] + p // 2) & (x <= self.steps[axis][-1] + p // 2))
            sigma = p / 8.0
            weight = np.zeros(n)
            for start in self.steps[axis]:
                d = x - (start + p // 2)
                inside = (x >= start) & (x < start + p) & (np.abs(d) <= 4 * sigma)  # gaussian_filter truncates at 4 sd
                weight += np.where(inside, np.exp(-d * d / (2 * sigma * sigma)), 0.0)
            self.axis_weights.append(weight)

    def __getitem__(self, box) -> np.ndarray:
        """The mask of ``box`` (a tuple of slices and integers, as for a numpy array of ``self.shape``)."""
        box = box if isinstance(box, tuple) else (box,)
        box = box + (slice(None),) * (len(self.shape) - len(box))
        parts = [w[b] for w, b in zip(self.axis_weights, box)]
        kept = [i for i, b in enumerate(box) if not isinstance(b, (int, np.integer))]
        if not self.use_gaussian:  # plain averages of whole windows: nothing is subnormal
            return np.ones([parts[i].size for i in kept], dtype=bool) if kept else np.bool_(True)
        inside = [c[b] for c, b in zip(self.between_centres, box)]
        for position, axis in enumerate(kept):
            view = [1] * len(kept)
            view[position] = parts[axis].size
            parts[axis] = parts[axis].reshape(view)
            inside[axis] = inside[axis].reshape(view)
        total = 10.0 * parts[0]  # the same float64 operations, in the same order, for a box as for the volume
        for w in parts[1:]:
            total = total * w
        valid = total >= self.minimum_weight
        between = inside[0]
        for c in inside[1:]:
            between = between & c
        return valid | (between & (total >= self.seam_minimum_weight))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        mask = np.empty(self.shape, dtype=bool)
        for i in range(self.shape[0]):
            mask[i] = self[i]
        return mask if dtype is None else mask.astype(dtype)


def reliable_sliding_window_region(shape, patch_size, step_size: float = 0.5, minimum_weight: float = 1e-2,
                                   use_gaussian: bool = True, seam_minimum_weight: float = 1e-4) -> np.ndarray:
    """The whole boolean mask of ``SlidingWindowRegion`` (one byte a voxel; decoding uses the region itself)."""
    return np.asarray(SlidingWindowRegion(shape, patch_size, step_size, use_gaussian, minimum_weight,
                                          seam_minimum_weight))


def decode_landmarks(heatmap_logits: Union[np.ndarray, torch.Tensor], properties: dict, plans_manager: PlansManager,
                     configuration_manager: ConfigurationManager, heads: LandmarkHeads, case: str = "case",
                     refine: bool = True, segmentation_logits: Union[np.ndarray, torch.Tensor, None] = None,
                     label_manager=None, label_names: dict | None = None) -> "OrderedDict[str, dict]":
    """{name: {"world": LPS mm, "index": ITK continuous index, "confidence": float, "heatmap_world": LPS mm,
    "estimator": str, "prior_world": LPS mm or None, "heatmap_claim_mm", "expected_error_mm": float,
    "status": str, "status_detail": str}} from (K, ...) heatmap logits in preprocessed space (as the sliding window
    returns them).

    ``heatmap_world`` is the heatmap's own extremum (sub-voxel refined). Only voxels the predictor's sliding window
    (its step size, recorded by ``nnunet_integration``) averaged reliably are searched. With the model's position
    priors (``heads.position_priors``) and the (C, ...) ``segmentation_logits``, ``world`` combines the prior, placed in
    the frame of the predicted segmentation, with the heatmap (``position_prior.combine_with_heatmap``; estimator
    ``"prior+heatmap"``), which weighs as much as its extremum's error on the folds' validation cases allows where the
    trainer measured it; where the heatmap found nothing it is the prior alone (``"prior"``); without a prior, the
    heatmap extremum (``"heatmap"``). ``status`` and ``expected_error_mm``: ``credibility`` (``label_names``,
    label -> name, make its reasons readable). No full-volume temporaries.
    """
    if isinstance(heatmap_logits, torch.Tensor):
        heatmap_logits = heatmap_logits.detach().cpu().numpy()
    geometry = CaseGeometry.from_nnunet(properties, plans_manager.transpose_forward, configuration_manager.spacing)
    step_size, use_gaussian = nnunet_integration.sliding_window_settings(configuration_manager)
    valid = SlidingWindowRegion(heatmap_logits.shape[1:], configuration_manager.patch_size, step_size, use_gaussian)
    affine = affine_of(geometry.preprocessed_to_world)
    priors = heads.position_priors
    moments, segmentation = None, credibility.Verdict(credibility.OK)
    if priors and segmentation_logits is not None:
        if isinstance(segmentation_logits, torch.Tensor):
            segmentation_logits = segmentation_logits.detach().cpu().numpy()
        if label_manager is not None and label_manager.has_regions:
            def to_labels(slab):
                return label_manager.convert_logits_to_segmentation(np.asarray(slab, dtype=np.float32))
        else:
            def to_labels(slab):
                return np.argmax(slab, axis=0)
        moments = structure_moments(segmentation_logits, affine, to_labels=to_labels,
                                    stride=sampling_stride(segmentation_logits.shape[1:]))
        segmentation = credibility.segmentation_verdict(moments, credibility.pooled_volume_ranges(priors),
                                                        label_names)
    out: "OrderedDict[str, dict]" = OrderedDict()
    for name, logits in zip(heads.names, heatmap_logits):
        decoded = decode_heatmap(logits, heads.encoding, geometry.preprocessed_spacing, refine=refine,
                                 name=f"{case}/{name}", already_sigmoid=False, valid=valid)
        position, estimator = decoded.position, "heatmap"
        heatmap_world = geometry.preprocessed_to_world(decoded.position)
        claim = float(heads.encoding.decode_distance(decoded.value))
        learned = [p.landmarks[name] for p in priors if name in p.landmarks]
        flat = credibility.heatmap_is_flat(claim, [p.heatmap_claim_mm for p in learned], heads.encoding.support_mm)
        heatmap_rms = pooled_heatmap_error(priors, name)
        # the prior's error on predicted segmentations (its validation), else on the training references
        prior_rms = _pooled_rms([p.loo_rms_mm if p.prior_error_mm is None else p.prior_error_mm for p in learned])
        prediction = pooled_prediction(priors, name, moments) if moments is not None else None
        prior_world, verdict = None, segmentation
        if prediction is not None:
            surface = _surface_factors(priors, name, segmentation_logits, to_labels, geometry.preprocessed_spacing)
            alone = combine_with_heatmap(logits, heads.encoding, valid, affine, *prediction, surface=surface,
                                         heatmap_point=(heatmap_world, 1e9))
            if alone is not None:
                prior_world = geometry.preprocessed_to_world(alone)
                if prior_rms is None:  # not validated: the prior's own spread (+ its floor)
                    prior_rms = float(np.sqrt(np.trace(prediction[1]) + 3 * PRIOR_FLOOR_MM ** 2))
            if flat:  # the heatmap found nothing: its extremum is a random point
                combined, estimator_name = alone, "prior"
            else:
                point = None if heatmap_rms is None else (heatmap_world, heatmap_rms)
                combined, estimator_name = combine_with_heatmap(logits, heads.encoding, valid, affine, *prediction,
                                                                surface=surface, heatmap_point=point), "prior+heatmap"
            if combined is not None:
                position, estimator = combined, estimator_name
                if surface and verdict.ok:
                    measured = [(_boundary_distance(distances_of, position), m, sd)
                                for distances_of, m, sd, _ in surface]
                    if credibility.outside_anatomy(measured):
                        verdict = credibility.Verdict(credibility.OUTSIDE_ANATOMY, "; ".join(
                            f"{d:.1f} mm from its structure's boundary, training cases {m:.1f} +- {sd:.1f}"
                            for d, m, sd in measured))
        elif priors and verdict.ok:
            verdict = credibility.Verdict(credibility.STRUCTURE_MISSING, "the structure that places it is not "
                                                                         "segmented")
        if estimator == "heatmap" and flat and verdict.ok:
            verdict = credibility.Verdict(credibility.HEATMAP_FLAT, f"the heatmap claims {claim:.1f} mm at its "
                                                                    f"extremum")
        world = geometry.preprocessed_to_world(position)
        # how far apart the two estimates the written one combines lie in this case
        disagreement = float(np.linalg.norm(np.asarray(prior_world) - heatmap_world)) \
            if estimator == "prior+heatmap" and prior_world is not None else 0.0
        if verdict.ok and credibility.estimates_disagree(disagreement, prior_rms, heatmap_rms):
            verdict = credibility.Verdict(credibility.ESTIMATES_DISAGREE, (
                f"the position prior and the heatmap's extremum are {disagreement:.1f} mm apart; their validated "
                f"errors are " + " and ".join(f"{v:.1f}" for v in (prior_rms, heatmap_rms) if v is not None) + " mm"))
        # no error to expect of a landmark without a credible estimate
        expected = credibility.expected_error(None if estimator == "heatmap" else prior_rms,
                                              None if estimator == "prior" else heatmap_rms, disagreement) \
            if verdict.ok else float("nan")
        out[name] = {"world": world,
                     "index": geometry.preprocessed_to_image_index(position),
                     "confidence": decoded.confidence,
                     "heatmap_world": heatmap_world,
                     "estimator": estimator,
                     "prior_world": prior_world,
                     "heatmap_claim_mm": claim,
                     "expected_error_mm": expected,
                     "status": verdict.status,
                     "status_detail": verdict.detail}
    return out


def _pooled_rms(values) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.sqrt(np.mean(np.square(known)))) if known else None


def _boundary_distance(distances_of, position: np.ndarray) -> float:
    """The signed distance (mm) of a preprocessed position from a structure's boundary (``distances_of`` of a surface
    factor), linearly interpolated; NaN where no boundary is in reach."""
    from scipy import ndimage

    lo = np.floor(position).astype(int)
    box = tuple(slice(int(a), int(a) + 2) for a in lo)
    values = np.asarray(distances_of(box), dtype=np.float64)
    if values.shape != (2, 2, 2) or not np.all(np.isfinite(values)):
        return float("nan")
    return float(ndimage.map_coordinates(values, (position - lo)[:, None], order=1, mode="nearest")[0])


def _surface_factors(priors, name: str, segmentation_logits, to_labels, spacing,
                     margin_mm: float = SURFACE_MARGIN_MM) -> list:
    """[(distances(box), mean, SD, weight)] for ``combine_with_heatmap``: the priors' learned distance of ``name`` from
    its structure's boundary, one factor per structure the folds chose (``pooled_surface_bands``); empty where no
    prior learned one."""
    shape = np.asarray(segmentation_logits.shape[1:])
    half = np.ceil(margin_mm / np.asarray(spacing)).astype(int)

    def distances_for(structure: int):
        def distances_of(box: tuple) -> np.ndarray:
            lo = np.maximum([b.start - h for b, h in zip(box, half)], 0)
            hi = np.minimum([b.stop + h for b, h in zip(box, half)], shape)
            labels = to_labels(segmentation_logits[(slice(None), *[slice(int(a), int(b)) for a, b in zip(lo, hi)])])
            distance = signed_distance(structure_mask(np.asarray(labels), structure), spacing)
            return distance[tuple(slice(b.start - int(a), b.stop - int(a)) for b, a in zip(box, lo))]
        return distances_of

    return [(distances_for(structure), mean, sd, weight)
            for structure, mean, sd, weight in pooled_surface_bands(priors, name)]


def update_landmark_table(folder: str, case: str, landmarks: "OrderedDict[str, dict]") -> None:
    """Replace ``case``'s rows of ``folder/landmarks.csv`` (creating it), keeping other cases' rows."""
    path = os.path.join(folder, LANDMARK_TABLE)
    def prior(v: dict) -> dict:
        return {f"prior_{axis}": float(c) if v.get("prior_world") is not None else ""
                for axis, c in zip("xyz", v.get("prior_world") if v.get("prior_world") is not None else [0.0] * 3)}

    new_rows = [{"case": case, "name": name, "x": float(v["world"][0]), "y": float(v["world"][1]),
                 "z": float(v["world"][2]), "i": float(v["index"][0]), "j": float(v["index"][1]),
                 "k": float(v["index"][2]), "confidence": float(v["confidence"]),
                 **{f"heatmap_{axis}": float(c) for axis, c in zip("xyz", v.get("heatmap_world", v["world"]))},
                 "estimator": v.get("estimator", "heatmap"), **prior(v),
                 "heatmap_claim_mm": float(v.get("heatmap_claim_mm", float("nan"))),
                 "expected_error_mm": float(v.get("expected_error_mm", float("nan"))),
                 "status": v.get("status", "ok")} for name, v in landmarks.items()]
    with locked_folder(folder):
        rows = []
        if os.path.isfile(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r["case"] != case]
        rows.extend(new_rows)
        rows.sort(key=lambda r: r["case"])
        atomic_write_text(path, format_landmark_rows(rows, TABLE_EXTRA_COLUMNS))


def write_heatmaps(heatmap_logits: np.ndarray, properties: dict, plans_manager: PlansManager,
                   configuration_manager: ConfigurationManager, heads: LandmarkHeads,
                   output_file_truncated: str) -> list[str]:
    """One NIfTI per landmark of the heatmap (values in [0, 1]) where the decoder searched it: on the preprocessed grid,
    every ``heatmap_stride(heads)``-th voxel, with that grid's world geometry, so 3D Slicer overlays it on the image.
    Voxels the sliding window did not average reliably (``SlidingWindowRegion``) hold the background value.

    Not resampled to the image grid: plain nnU-Net resamples C probability channels, and K more resamplings and
    K full-size files cost 1.5-2x its export (benchmarks/results/RESULTS.md, "export-scale"). The decoupled head
    works at 1 / stride of the output's resolution, so its heatmap holds nothing finer than its stride; values are
    stored at float16 precision (relative 5e-4, that of nnU-Net's float16 logits), which gzip compresses ~4x faster.
    """
    stride = heatmap_stride(heads)
    every = (slice(None, None, stride),) * (heatmap_logits.ndim - 1)
    folder = os.path.join(os.path.dirname(output_file_truncated), HEATMAP_FOLDER)
    os.makedirs(folder, exist_ok=True)
    geometry = CaseGeometry.from_nnunet(properties, plans_manager.transpose_forward, configuration_manager.spacing)
    grid = geometry.preprocessed_image_geometry(heatmap_logits.shape[1:], stride)
    # what the decoder cannot trust (the far tails of the sliding window at the volume's edges and corners) is
    # written as "far from the landmark", so the file shows what the decoder searched
    step_size, use_gaussian = nnunet_integration.sliding_window_settings(configuration_manager)
    reliable = SlidingWindowRegion(heatmap_logits.shape[1:], configuration_manager.patch_size, step_size,
                                   use_gaussian)[every]
    written = []
    for name, logits in zip(heads.names, heatmap_logits):
        heatmap = torch.sigmoid_(torch.from_numpy(np.array(logits[every], dtype=np.float32))).numpy()
        heatmap[~reliable] = heads.encoding.background
        heatmap[...] = heatmap.astype(np.float16)
        path = os.path.join(folder, f"{os.path.basename(output_file_truncated)}_{name}.nii.gz")
        sitk.WriteImage(grid.apply_to(sitk.GetImageFromArray(heatmap)), path,
                        useCompression=True)
        written.append(path)
    return written


def heatmap_stride(heads: LandmarkHeads) -> int:
    """Every how many preprocessed voxels the written heatmaps sample (the decoupled head's stride, else 1)."""
    return int(heads.head.stride) if heads.head.kind == "decoupled" else 1


def export_landmarks(heatmap_logits, properties: dict, plans_manager: PlansManager,
                     configuration_manager: ConfigurationManager, heads: LandmarkHeads, output_file_truncated: str,
                     save_heatmaps: bool = False, segmentation_logits=None, label_manager=None,
                     label_names: dict | None = None) -> "OrderedDict[str, dict]":
    """Decode and write one case's landmarks (markups, the folder's table, optionally heatmaps)."""
    if isinstance(heatmap_logits, torch.Tensor):
        heatmap_logits = heatmap_logits.detach().cpu().numpy()
    case = os.path.basename(output_file_truncated)
    landmarks = decode_landmarks(heatmap_logits, properties, plans_manager, configuration_manager, heads, case,
                                 segmentation_logits=segmentation_logits, label_manager=label_manager,
                                 label_names=label_names)
    flagged = [n for n, v in landmarks.items() if v["status"] != credibility.OK]
    for name in flagged:
        print(f"nnunet-landmark: WARNING: {case}: landmark {name} is not credible ({landmarks[name]['status']}: "
              f"{landmarks[name]['status_detail']}); it is written with positionStatus 'undefined' and status "
              f"'{landmarks[name]['status']}', and nnUNetv2_landmark_align refuses it", file=sys.stderr, flush=True)
    write_markups(output_file_truncated + ".mrk.json", {n: v["world"] for n, v in landmarks.items()},
                  {n: f"status={v['status']}" + (f" ({v['status_detail']})" if v["status_detail"] else "")
                      + (f"; expected error {v['expected_error_mm']:.1f} mm" if np.isfinite(v["expected_error_mm"])
                         else "") + f"; estimator={v['estimator']}; "
                      f"confidence={v['confidence']:.3f}; heatmap extremum (LPS mm)="
                      + ",".join(f"{c:.2f}" for c in v["heatmap_world"]) for n, v in landmarks.items()},
                  undefined=flagged)
    update_landmark_table(os.path.dirname(os.path.abspath(output_file_truncated)), case, landmarks)
    if save_heatmaps:
        write_heatmaps(heatmap_logits, properties, plans_manager, configuration_manager, heads, output_file_truncated)
    return landmarks


def export_prediction_with_landmarks(predicted_array_or_file, properties_dict: dict,
                                     configuration_manager: ConfigurationManager, plans_manager: PlansManager,
                                     dataset_json_dict_or_file, output_file_truncated: str,
                                     save_probabilities: bool = False, num_threads_torch: int = None):
    """Drop-in for nnU-Net's ``export_prediction_from_logits`` that also exports landmarks.

    Plans without landmark heads (plain nnU-Net models) go to nnU-Net's function unchanged.
    """
    heads = LandmarkHeads.from_plans(plans_manager.plans)
    kwargs = {} if num_threads_torch is None else {"num_threads_torch": num_threads_torch}
    if heads is None:
        return export_segmentation_from_logits(predicted_array_or_file, properties_dict, configuration_manager,
                                               plans_manager, dataset_json_dict_or_file, output_file_truncated,
                                               save_probabilities, **kwargs)
    if isinstance(dataset_json_dict_or_file, str):
        dataset_json_dict_or_file = load_json(dataset_json_dict_or_file)
    c = heads.num_segmentation_heads
    if predicted_array_or_file.shape[0] != heads.num_output_channels:
        raise RuntimeError(f"{output_file_truncated}: prediction has {predicted_array_or_file.shape[0]} channels, "
                           f"the landmark model {heads.num_output_channels} ({c} segmentation + {heads.num_landmarks} "
                           f"heatmaps)")
    label_names = {int(v): k for k, v in dataset_json_dict_or_file.get("labels", {}).items()
                   if isinstance(v, int) and v > 0}
    export_landmarks(predicted_array_or_file[c:], properties_dict, plans_manager, configuration_manager, heads,
                     output_file_truncated, save_probabilities, segmentation_logits=predicted_array_or_file[:c],
                     label_manager=plans_manager.get_label_manager(dataset_json_dict_or_file), label_names=label_names)
    return export_segmentation_from_logits(predicted_array_or_file[:c], properties_dict, configuration_manager,
                                           plans_manager, dataset_json_dict_or_file, output_file_truncated,
                                           save_probabilities, **kwargs)
