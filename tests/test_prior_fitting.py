"""Fitting a fold's prior from preprocessed data: a landmark's signed distance from a structure's boundary (what the
prior's boundary guard learns). The fit itself is checked against independent leave-one-out in test_prior_model.py
and end to end (trainer and nnUNetv2_landmark_fit_prior agree) in test_train_and_predict_cli.py."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_landmark.geometry import CaseGeometry
from nnunet_landmark.prior.fitting import boundary_distance


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
