"""Training targets: world landmarks mapped into each case's preprocessed voxels, and a landmark's signed distance
from a structure's boundary (what the prior's boundary guard learns)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PLANS, environment
from nnunet_landmark.geometry import CaseGeometry
from nnunet_landmark.training.landmark_targets import boundary_distance


def test_landmarks_map_into_nnunets_preprocessed_voxels(smoke_dataset):
    """``load_landmark_targets`` on the session's smoke dataset (flipped and oblique axes, real nnU-Net preprocessing)
    against an independent chain: SimpleITK's physical point -> continuous index on the raw image, then nnU-Net's
    transpose, crop and voxel-centre resampling from the case's .pkl and the plans."""
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from conftest import CONFIG
    from nnunet_landmark.training.landmark_targets import load_landmark_targets

    env = smoke_dataset["env"]
    base = Path(env["nnUNet_preprocessed"]) / smoke_dataset["dataset"]
    plans_manager = PlansManager(json.loads((base / f"{PLANS}.json").read_text()))
    configuration = plans_manager.get_configuration(CONFIG)
    folder = base / configuration.data_identifier
    with environment(env):
        world, preprocessed = load_landmark_targets(str(folder), str(base), plans_manager, configuration,
                                                    smoke_dataset["landmarks"], write_cache=False)
    raw = Path(env["nnUNet_raw"]) / smoke_dataset["dataset"]
    assert sorted(world) == sorted(preprocessed) and len(world) == 10
    tf = plans_manager.transpose_forward
    for case, positions in preprocessed.items():
        image = sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
        properties = load_pickle(str(folder / f"{case}.pkl"))
        zyx = np.array([image.TransformPhysicalPointToContinuousIndex([float(c) for c in p])[::-1]
                        for p in world[case]])
        transposed = zyx[:, tf] - np.array([lo for lo, _ in properties["bbox_used_for_cropping"]])
        new_shape = np.asarray(blosc2.open(str(folder / f"{case}.b2nd"), mode="r").shape[1:], dtype=float)
        old_shape = np.asarray(properties["shape_after_cropping_and_before_resampling"], dtype=float)
        expected = (transposed + 0.5) * new_shape / old_shape - 0.5
        np.testing.assert_allclose(positions, expected, atol=1e-6, err_msg=case)


def test_boundary_distance_is_the_signed_distance_from_the_structure():
    """A ball of radius 12 mm (label 2) in a label map on 1.5 x 1 x 2 mm voxels: a point's signed distance is
    |p - centre| - 12 (> 0 outside), to within a voxel's rounding of the boundary; NaN outside the image."""
    shape, spacing = (40, 60, 30), (1.5, 1.0, 2.0)
    properties = {"spacing": list(spacing), "shape_before_cropping": list(shape),
                  "bbox_used_for_cropping": [[0, s] for s in shape],
                  "shape_after_cropping_and_before_resampling": list(shape),
                  "sitk_stuff": {"spacing": spacing[::-1], "origin": (5.0, -3.0, 10.0),
                                 "direction": tuple(np.eye(3).ravel())}}
    geometry = CaseGeometry.from_nnunet(properties, [0, 1, 2], list(spacing))
    centre_index = np.array([20.0, 30.0, 15.0])
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    seg = (np.linalg.norm((index - centre_index) * spacing, axis=-1) <= 12.0).astype(np.int16)[None] * 2
    seg[0, :3] = 1  # another structure elsewhere does not count
    centre = geometry.preprocessed_to_world(centre_index)
    for offset, expected in ((0.0, -12.0), (6.0, -6.0), (12.0, 0.0), (17.0, 5.0), (25.0, 13.0)):
        for direction in (np.array([1.0, 0, 0]), np.array([0, 0.6, 0.8])):
            distance = boundary_distance(seg, geometry, 2, centre + offset * direction)
            assert distance == pytest.approx(expected, abs=1.6), (offset, direction, distance)
    assert np.isnan(boundary_distance(seg, geometry, 2, centre + np.array([500.0, 0, 0])))
