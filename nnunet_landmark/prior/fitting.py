"""Fitting a fold's position prior (``prior.model``) from nnU-Net's preprocessed data: the reference segmentations and
world landmarks of its training cases, each landmark's distance from its structure's boundary, and what its
validation cases measured (the trainer's final validation table). The trainer and ``nnUNetv2_landmark_fit_prior``
both fit through here."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunet_landmark.geometry import CaseGeometry
from nnunet_landmark.prior.model import SURFACE_MARGIN_MM


def fit_position_prior(preprocessed_folder: str, cases: Sequence[str], world_landmarks: dict, plans_manager,
                       configuration_manager, landmark_names: Sequence[str], margin_mm: float = SURFACE_MARGIN_MM):
    """``position_prior.PositionPrior`` of the training ``cases`` from their preprocessed reference segmentations and
    world landmarks (None with fewer than ``position_prior.MIN_CASES`` cases)."""
    from tqdm import tqdm

    from nnunet_landmark.prior.model import PositionPrior, affine_of, structure_moments

    dataset = infer_dataset_class(preprocessed_folder)(preprocessed_folder, list(cases))
    fitted, segmentations = [], []
    for case in tqdm(sorted(cases), desc="Landmark position prior", disable=len(cases) < 50):
        _, seg, _, properties = dataset.load_case(case)
        geometry = CaseGeometry.from_nnunet(properties, plans_manager.transpose_forward, configuration_manager.spacing)
        fitted.append((structure_moments(seg, affine_of(geometry.preprocessed_to_world)), world_landmarks[case]))
        segmentations.append((seg, geometry))

    def surface_distance(index: int, structure: int, point: np.ndarray) -> float:
        seg, geometry = segmentations[index]
        return boundary_distance(seg, geometry, structure, point, margin_mm)

    return PositionPrior.fit(fitted, landmark_names, surface_distance)


def validation_measurements(table_file: str, world_landmarks: dict, landmark_names: Sequence[str],
                            cases: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """What a landmark table (the ``landmarks.csv`` of a validation or prediction folder) says about ``cases`` against
    their world landmarks: {"heatmap": errors (mm) of the heatmap extrema (``heatmap_x,y,z``), "prior": errors of the
    position prior alone (``prior_x,y,z``; none where a row has no prior), "claims": the distances the heatmap
    claimed at its extremum (``heatmap_claim_mm``)}, each {landmark: values}."""
    from nnunet_landmark.metrics import landmark_error_mm
    from nnunet_landmark.landmark_files import read_landmark_table

    out: dict[str, dict[str, list[float]]] = {"heatmap": {}, "prior": {}, "claims": {}}
    for row in read_landmark_table(table_file):
        if row["case"] not in cases or row["name"] not in landmark_names:
            continue
        reference = world_landmarks[row["case"]][list(landmark_names).index(row["name"])]
        for kind in ("heatmap", "prior"):
            if row.get(f"{kind}_x"):
                point = [float(row[f"{kind}_{a}"]) for a in "xyz"]
                out[kind].setdefault(row["name"], []).append(landmark_error_mm(point, reference))
        if row.get("heatmap_claim_mm"):
            out["claims"].setdefault(row["name"], []).append(float(row["heatmap_claim_mm"]))
    return out


def boundary_distance(seg, geometry: CaseGeometry, structure: int, point: np.ndarray,
                      margin_mm: float = SURFACE_MARGIN_MM) -> float:
    """Signed distance (mm, > 0 outside) of a world point from ``structure``'s boundary in a preprocessed (1, Z, Y, X)
    segmentation, from a crop of ``margin_mm`` around the point (NaN when the point is outside the image)."""
    from scipy import ndimage

    from nnunet_landmark.prior.model import signed_distance, structure_mask

    spacing = np.asarray(geometry.preprocessed_spacing)
    position = np.asarray(geometry.world_to_preprocessed(point), dtype=np.float64)
    index = np.round(position).astype(int)
    shape = np.asarray(seg.shape[-3:])
    if np.any(index < 0) or np.any(index >= shape):
        return float("nan")
    half = np.ceil(margin_mm / spacing).astype(int)
    lo, hi = np.maximum(index - half, 0), np.minimum(index + half + 1, shape)
    crop = np.asarray(seg[(0, *[slice(int(a), int(b)) for a, b in zip(lo, hi)])])
    distance = signed_distance(structure_mask(crop, structure), spacing)
    if not np.all(np.isfinite(distance)):
        return float("nan")
    # interpolated at the landmark itself: on coarse voxels the nearest voxel's value is off by up to a voxel
    return float(ndimage.map_coordinates(distance, (position - lo)[:, None], order=1, mode="nearest")[0])
