"""Landmark targets for training: world positions from the raw dataset, mapped into each case's preprocessed voxels.

nnU-Net's preprocessed folder holds images and labels only (any extra file there would be read as a case), so the
trainer reads ``nnUNet_raw/<dataset>/landmarksTr`` when training starts and keeps a copy of the world positions
beside the preprocessed dataset (``landmarksTr.json``), so that training also works where only
``nnUNet_preprocessed`` is available. The mapping world -> preprocessed voxel uses each case's ``.pkl`` properties
(``geometry.CaseGeometry``, the one place for that conversion).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_pickle
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunet_landmark.geometry import CaseGeometry
from nnunet_landmark.layout import SPLITS_FILE, atomic_write_text
from nnunet_landmark.raw_dataset import load_world_landmarks


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
