"""Moved to ``nnunet_landmark.evaluation.baselines``; this name stays for code that still imports it."""
from nnunet_landmark.evaluation.baselines import (BaselineError, MeanPositionBaseline, apex_from_segmentation,  # noqa: F401
                                                  fit_mean_positions, image_centre, largest_connected_component,
                                                  leave_one_out_errors, long_axis, voxel_extent_along)
