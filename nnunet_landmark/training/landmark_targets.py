"""Landmark targets for training: world positions from the raw dataset, mapped into each case's preprocessed voxels.

nnU-Net's preprocessed folder holds images and labels only (any extra file there would be read as a case), so the
trainer reads ``nnUNet_raw/<dataset>/landmarksTr`` when training starts and keeps a copy of the world positions
beside the preprocessed dataset (``landmarksTr.json``), so that training also works where only
``nnUNet_preprocessed`` is available. The mapping world -> preprocessed voxel uses each case's ``.pkl`` properties
(``geometry.CaseGeometry``, the one place for that conversion).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, load_pickle
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunet_landmark.geometry import CaseGeometry
from nnunet_landmark.layout import LANDMARK_CACHE, LANDMARKS_FOLDER, SPLITS_FILE, atomic_write_text
from nnunet_landmark.position_prior import SURFACE_MARGIN_MM
from nnunet_landmark.raw_dataset import DatasetError, read_dataset_landmarks, save_json


def load_world_landmarks(dataset_name: str, preprocessed_base: str, landmark_names: Sequence[str],
                         cases: Sequence[str], write_cache: bool = True) -> dict:
    """World landmarks (case -> (K, 3) LPS mm) from nnUNet_raw/<dataset>/landmarksTr, or from the copy kept
    beside the preprocessed data."""
    cache = join(preprocessed_base, LANDMARK_CACHE)
    raw_folder = join(nnUNet_raw.get(), dataset_name) if nnUNet_raw.is_set() else None
    if raw_folder is not None and os.path.isdir(join(raw_folder, LANDMARKS_FOLDER)):
        try:
            world = read_dataset_landmarks(raw_folder, landmark_names, cases)
        except DatasetError as e:
            raise RuntimeError(f"{e}\nEvery training case needs all landmarks {list(landmark_names)}.") from e
        if write_cache:
            save_json({"landmarks": list(landmark_names), "coordinate_system": "LPS",
                       "cases": {c: p.tolist() for c, p in world.items()}}, cache)
        return world
    if isfile(cache):
        stored = load_json(cache)
        if stored["landmarks"] != list(landmark_names):
            raise RuntimeError(f"{cache} holds landmarks {stored['landmarks']}, dataset.json "
                               f"{list(landmark_names)}; delete it and make nnUNet_raw available")
        missing = [c for c in cases if c not in stored["cases"]]
        if missing:
            raise RuntimeError(f"{cache} lacks landmarks for case(s) {missing[:10]}")
        return {c: np.asarray(stored["cases"][c], dtype=np.float64) for c in cases}
    raise RuntimeError(f"no landmarks found for {dataset_name}: expected "
                       f"{raw_folder or '$nnUNet_raw/<dataset>'}/{LANDMARKS_FOLDER}/CASE.mrk.json or {cache}")


def load_landmark_targets(preprocessed_folder: str, preprocessed_base: str, plans_manager, configuration_manager,
                          landmark_names: Sequence[str], write_cache: bool = True) -> tuple[dict, dict]:
    """(world, preprocessed): case -> (K, 3) LPS mm, and case -> (K, 3) preprocessed voxel index, for every case
    of the preprocessed data folder. A landmark outside its preprocessed image is an error naming the case."""
    dataset_class = infer_dataset_class(preprocessed_folder)
    cases = sorted(dataset_class.get_identifiers(preprocessed_folder))
    world = load_world_landmarks(plans_manager.dataset_name, preprocessed_base, landmark_names, cases, write_cache)
    preprocessed = {}
    for case in cases:
        properties = load_pickle(join(preprocessed_folder, case + ".pkl"))
        geometry = CaseGeometry.from_nnunet(properties, plans_manager.transpose_forward, configuration_manager.spacing)
        positions = geometry.world_to_preprocessed(world[case])
        shape = np.asarray(geometry.preprocessing.shape_after_resampling)
        outside = ~np.all((positions > -1) & (positions < shape), axis=1)
        if outside.any():
            names = [n for n, o in zip(landmark_names, outside) if o]
            raise RuntimeError(f"case {case}: landmark(s) {names} lie outside the preprocessed image (positions "
                               f"{np.round(positions[outside], 1).tolist()}, image shape {shape.tolist()}); check "
                               f"the annotation's coordinate system (LPS mm expected)")
        preprocessed[case] = positions
    return world, preprocessed


def copy_raw_splits(preprocessed_base: str, dataset_name: str) -> str | None:
    """Copy the converter's ``splits_final.json`` from the raw dataset to where nnU-Net's trainer reads it, unless
    one is there; the path copied from, or None. Without it nnU-Net would silently make its own 5 folds."""
    splits_file = join(preprocessed_base, SPLITS_FILE)
    raw_splits = join(nnUNet_raw.get(), dataset_name, SPLITS_FILE) if nnUNet_raw.is_set() else None
    if isfile(splits_file) or raw_splits is None or not isfile(raw_splits):
        return None
    with open(raw_splits) as f:
        atomic_write_text(splits_file, f.read())
    return raw_splits


def fit_position_prior(preprocessed_folder: str, cases: Sequence[str], world_landmarks: dict, plans_manager,
                       configuration_manager, landmark_names: Sequence[str], margin_mm: float = SURFACE_MARGIN_MM):
    """``position_prior.PositionPrior`` of the training ``cases`` from their preprocessed reference segmentations and
    world landmarks (None with fewer than ``position_prior.MIN_CASES`` cases)."""
    from tqdm import tqdm

    from nnunet_landmark.position_prior import PositionPrior, affine_of, structure_moments

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

    from nnunet_landmark.position_prior import signed_distance, structure_mask

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
