"""Heatmap encodings: values, crop independence, sub-voxel decoding, flat heatmaps."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from nnunet_landmark.heatmap_targets import HeatmapEncoding, render_heatmaps
from nnunet_landmark.heatmap_decoding import decode_heatmap

ENCODINGS = [HeatmapEncoding("log_distance", max_distance_mm=150.0), HeatmapEncoding("gaussian", sigma_mm=6.0)]


def test_encoding_values():
    log = HeatmapEncoding("log_distance", max_distance_mm=100.0, scale_mm=1.0)
    d = np.array([0.0, 1.0, 10.0, 100.0, 500.0])
    np.testing.assert_allclose(log.encode(d), [0.0, math.log(2) / math.log(101), math.log(11) / math.log(101), 1.0, 1.0],
                               rtol=1e-6)
    np.testing.assert_allclose(log.decode_distance(log.encode(d[:4])), d[:4], rtol=1e-4, atol=1e-4)
    gauss = HeatmapEncoding("gaussian", sigma_mm=5.0)
    np.testing.assert_allclose(gauss.encode([0.0, 5.0]), [1.0, math.exp(-0.5)], rtol=1e-6)
    assert log.background == 1.0 and gauss.background == 0.0
    with pytest.raises(ValueError, match="unknown heatmap encoding"):
        HeatmapEncoding("laplace")
    assert HeatmapEncoding.from_dict(log.to_dict()) == log


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.kind)
def test_render_is_a_function_of_distance_in_mm(encoding):
    spacing = (2.5, 0.8, 1.1)
    position = np.array([3.3, 10.7, 4.2])
    heatmap = render_heatmaps((8, 20, 12), position[None], spacing, encoding)[0]
    for voxel in [(0, 0, 0), (3, 11, 4), (7, 19, 11), (5, 2, 9)]:
        distance = np.linalg.norm((np.array(voxel) - position) * spacing)
        assert heatmap[voxel] == pytest.approx(float(encoding.encode(distance)), rel=1e-5, abs=1e-6)
    # crop independence: a crop of a bigger rendering equals the rendering on the crop
    big = render_heatmaps((20, 40, 30), (position + [5, 7, 9])[None], spacing, encoding)[0]
    np.testing.assert_allclose(big[5:13, 7:27, 9:21], heatmap, rtol=1e-5, atol=1e-6)
    # an unknown landmark (NaN) gives a channel of background
    unknown = render_heatmaps((4, 4, 4), np.full((1, 3), np.nan), spacing, encoding)[0]
    assert np.all(unknown == encoding.background)


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.kind)
def test_subvoxel_decoding_within_a_tenth_of_a_voxel(encoding):
    rng = np.random.default_rng(0)
    errors, unrefined = [], []
    for _ in range(40):
        spacing = rng.uniform(0.5, 3.0, size=3)
        position = rng.uniform(3, 17, size=3)
        heatmap = render_heatmaps((21, 22, 20), position[None], spacing, encoding)[0]
        errors.append(np.abs(decode_heatmap(heatmap, encoding, spacing).position - position).max())
        unrefined.append(np.abs(decode_heatmap(heatmap, encoding, spacing, refine=False).position - position).max())
    assert max(errors) < 0.1, max(errors)
    assert max(unrefined) <= 0.5 + 1e-9
    assert np.mean(unrefined) > 10 * np.mean(errors)  # refinement matters


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.kind)
def test_decoding_from_logits_and_with_noise(encoding):
    spacing = np.array([1.2, 0.9, 0.9])
    position = np.array([9.4, 12.6, 7.3])
    heatmap = render_heatmaps((20, 24, 16), position[None], spacing, encoding)[0].astype(np.float64)
    logits = np.log(np.clip(heatmap, 1e-6, 1 - 1e-6) / (1 - np.clip(heatmap, 1e-6, 1 - 1e-6)))
    from_values = decode_heatmap(heatmap, encoding, spacing)
    from_logits = decode_heatmap(logits, encoding, spacing, already_sigmoid=False)
    np.testing.assert_allclose(from_logits.position, from_values.position, atol=1e-3)
    assert from_logits.confidence == pytest.approx(from_values.confidence, abs=1e-3)
    noisy = np.clip(heatmap + np.random.default_rng(1).normal(0, 0.01, heatmap.shape), 0, 1)
    assert np.abs(decode_heatmap(noisy, encoding, spacing).position - position).max() < 0.6
    assert from_values.confidence > 0.9


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.kind)
def test_flat_heatmap_gives_a_landmark_with_zero_confidence_and_a_warning(encoding):
    flat = np.full((6, 7, 8), 0.5, dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="flat"):
        decoded = decode_heatmap(flat, encoding, name="case_7/apex")
    assert decoded.confidence == 0.0
    assert decoded.position.shape == (3,) and np.all(np.isfinite(decoded.position))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharp = render_heatmaps((6, 7, 8), np.array([[2.0, 3.0, 4.0]]), (1, 1, 1), encoding)[0]
        assert decode_heatmap(sharp, encoding).confidence > 0.5
