"""Training targets: world landmarks mapped into each case's preprocessed voxels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from conftest import PLANS, environment


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
