"""No silent landmarks: each credibility rule on its own, the expected error, and the markups and table they write."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_landmark import credibility
from nnunet_landmark.prior.model import LandmarkPrior, Moments, PositionPrior


def moments(volumes: dict) -> dict:
    return {s: Moments(int(v * 100), np.zeros(3), np.eye(3), float(v)) for s, v in volumes.items()}


def prior(volumes: dict) -> PositionPrior:
    landmark = LandmarkPrior(1, np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.zeros(3), np.eye(3) * 0.01, 1.0, 8)
    return PositionPrior({"apex": landmark}, volumes)


def test_a_structure_every_training_case_held_must_be_segmented_at_a_plausible_volume():
    ranges = credibility.pooled_volume_ranges([prior({1: (40.0, 90.0), 6: (20.0, 30.0)}),
                                               prior({1: (50.0, 120.0), 6: (18.0, 25.0), 3: (10.0, 12.0)})])
    assert ranges == {1: (40.0, 120.0), 6: (18.0, 30.0)}  # structures every fold saw, widest range
    names = {1: "LV_blood_cavity", 6: "ascending_aorta"}
    assert credibility.segmentation_verdict(moments({1: 60.0, 6: 22.0}), ranges, names).ok
    # within a factor of two of the range is plausible; beyond it not
    assert credibility.segmentation_verdict(moments({1: 20.5, 6: 59.0}), ranges, names).ok
    small = credibility.segmentation_verdict(moments({1: 19.0, 6: 22.0}), ranges, names)
    assert small.status == credibility.STRUCTURE_IMPLAUSIBLE and "LV_blood_cavity (label 1) 19.0 ml" in small.detail
    large = credibility.segmentation_verdict(moments({1: 60.0, 6: 61.0}), ranges, names)
    assert large.status == credibility.STRUCTURE_IMPLAUSIBLE and "ascending_aorta" in large.detail
    missing = credibility.segmentation_verdict(moments({6: 22.0}), ranges, names)
    assert missing.status == credibility.STRUCTURE_MISSING and "LV_blood_cavity (label 1)" in missing.detail
    assert credibility.segmentation_verdict(None, ranges).status == credibility.STRUCTURE_MISSING
    assert credibility.segmentation_verdict(moments({}), {}).ok  # a model without recorded volumes: no rule
    # all the pieces together: within the range, and the largest holding most of it (noise gave a 30 ml largest
    # piece of 373 ml in 1168 pieces)
    def pieces(largest: float, total: float) -> dict:
        return {1: Moments(int(largest * 100), np.zeros(3), np.eye(3), largest, total), 6: moments({6: 22.0})[6]}

    assert credibility.segmentation_verdict(pieces(60.0, 80.0), ranges, names).ok
    spread = credibility.segmentation_verdict(pieces(60.0, 241.0), ranges, names)
    assert spread.status == credibility.STRUCTURE_IMPLAUSIBLE and "241.0 ml in all its pieces" in spread.detail
    scattered = credibility.segmentation_verdict(pieces(30.0, 61.0), ranges, names)
    assert scattered.status == credibility.STRUCTURE_IMPLAUSIBLE and "scattered" in scattered.detail
    assert credibility.segmentation_verdict(pieces(30.0, 59.0), ranges, names).ok
    # a prior written before volumes were recorded pools to nothing
    assert credibility.pooled_volume_ranges([prior({})]) == {}


def test_a_heatmap_that_claims_more_than_twice_its_validated_claims_is_flat():
    assert not credibility.heatmap_is_flat(7.0, [4.0, 3.5], support_mm=30.0)
    assert not credibility.heatmap_is_flat(9.9, [1.0], support_mm=30.0)  # the floor: 10 mm
    assert credibility.heatmap_is_flat(12.0, [4.0, 5.0], support_mm=30.0)
    assert credibility.heatmap_is_flat(30.0, [None], support_mm=30.0)  # unvalidated: half the target's support
    assert not credibility.heatmap_is_flat(14.0, [], support_mm=30.0)
    assert credibility.heatmap_is_flat(float("nan"), [4.0], support_mm=30.0)


def test_outside_anatomy_beyond_the_learned_band():
    # learned: 0.5 +- 1.2 mm from the boundary; flagged beyond 4 SD (at least 1 mm) + 3 mm
    assert not credibility.outside_anatomy([(8.0, 0.5, 1.2)])  # 7.5 < 4 * 1.2 + 3 = 7.8
    assert credibility.outside_anatomy([(8.5, 0.5, 1.2)])
    assert credibility.outside_anatomy([(-10.0, 0.5, 0.1)])  # SD floored at 1 mm: 10.5 > 7
    assert not credibility.outside_anatomy([(float("nan"), 0.5, 1.2)]) and not credibility.outside_anatomy([])
    # several structures (folds that chose differently): flagged only beyond every band
    assert not credibility.outside_anatomy([(9.0, 0.5, 1.2), (9.0, 6.0, 1.0)])


def test_expected_error_is_the_better_validated_error():
    norm = math.sqrt(8 / (3 * math.pi))  # mean length of an isotropic 3D Gaussian vector per RMS length
    assert credibility.expected_error(2.0, None) == pytest.approx(norm * 2.0)
    assert credibility.expected_error(None, 3.0) == pytest.approx(norm * 3.0)
    assert credibility.expected_error(2.0, 3.0) == credibility.expected_error(3.0, 2.0) == pytest.approx(norm * 2.0)
    assert math.isnan(credibility.expected_error(None, None))


def test_expected_error_widens_with_the_disagreement_of_the_two_estimates():
    """Where the prior and the heatmap lie far apart in a case, the estimate between them is expected further off:
    RMS sqrt(better^2 + (share * distance)^2); agreeing estimates keep the validated error."""
    norm = credibility.MEAN_NORM_PER_RMS
    share = credibility.DISAGREEMENT_SHARE
    assert credibility.expected_error(2.0, 3.0, 0.0) == pytest.approx(norm * 2.0)
    assert credibility.expected_error(2.0, 3.0, 16.0) == pytest.approx(norm * math.hypot(2.0, share * 16.0))
    assert credibility.expected_error(2.0, 3.0, 16.0) > 1.5 * credibility.expected_error(2.0, 3.0)
    assert credibility.expected_error(None, 3.0, 8.0) == pytest.approx(norm * math.hypot(3.0, share * 8.0))


def test_estimates_that_disagree_beyond_their_validated_spread_are_flagged():
    """The prior alone and the heatmap's extremum further apart than the limit times the root of the sum of their
    squared validated errors: one of them failed (a 160 mm mitral valve prior on an unseen heart shape). Within it, or
    where the heatmap proved useless on validation, nothing is flagged."""
    limit = credibility.DISAGREEMENT_LIMIT
    spread = math.hypot(2.0, 3.0)
    assert credibility.estimates_disagree(1.01 * limit * spread, 2.0, 3.0)
    assert not credibility.estimates_disagree(0.99 * limit * spread, 2.0, 3.0)
    assert credibility.estimates_disagree(160.0, 1.9, 2.6)
    assert not credibility.estimates_disagree(40.0, 1.0, 1e6)  # a useless heatmap may lie anywhere
    assert credibility.estimates_disagree(1.01 * limit * 2.0, 2.0, None)
    assert not credibility.estimates_disagree(50.0, None, None)
