"""Landmark position prior: moments, frames, fitting and the combination with a heatmap."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.heatmap_targets import HeatmapEncoding, render_heatmaps
from nnunet_landmark.prior.model import (ALL_FOREGROUND, PRIOR_FLOOR_MM, SURFACE_BAND_SD, PositionPrior, affine_of,
                                            combine_with_heatmap, pooled_prediction, structure_moments)


def rotation(rng, max_degrees):
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def ellipsoid_case(rng, shape=(40, 48, 44), spacing=(2.0, 1.5, 1.5)):
    """A label image (1: elongated ellipsoid, 2: a small ball elsewhere) with a random pose, and two landmarks fixed
    in the ellipsoid's frame: its tip along the long axis, and a point off its side."""
    radii = np.array([22.0, 11.0, 9.0]) * rng.uniform(0.85, 1.15)
    r = rotation(rng, 20)
    centre = np.array([0.0, 0.0, 0.0]) + rng.uniform(-8, 8, 3)
    geometry = ImageGeometry(spacing=tuple(spacing[::-1]), origin=(-33.0, -36.0, -40.0), direction=tuple(np.eye(3).ravel()),
                             size=tuple(shape[::-1]))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    world = geometry.array_index_to_world(index)
    local = (world - centre) @ r
    inside = np.sum((local / radii) ** 2, axis=1) <= 1
    labels = inside.astype(np.uint8)
    ball = rng.uniform(-20, 20, 3)
    labels[np.linalg.norm(world - ball, axis=1) < 5] = 2
    landmarks = np.stack([centre + r @ np.array([radii[0], 0, 0]), centre + r @ np.array([-0.5 * radii[0], radii[1], 0])])
    return labels.reshape(shape), geometry, landmarks


def test_moments_slab_by_slab_equal_the_whole_volume_and_logits_give_the_same():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(9, 7, 5))
    a = rng.normal(size=(3, 3))
    b = rng.normal(size=3)
    # random labels are hundreds of pieces: every voxel counts here, the largest piece is tested below
    whole = structure_moments(labels, (a, b), slab_voxels=10 ** 9, largest_piece=False)
    slabs = structure_moments(labels, (a, b), slab_voxels=35, largest_piece=False)  # one row of 7 x 5 at a time
    logits = np.stack([(labels == c).astype(np.float32) for c in range(3)])
    from_logits = structure_moments(logits, (a, b), slab_voxels=70, to_labels=lambda s: np.argmax(s, axis=0),
                                    largest_piece=False)
    for key in (1, 2, ALL_FOREGROUND):
        index = np.argwhere(labels > 0 if key == ALL_FOREGROUND else labels == key).astype(float)
        world = index @ a.T + b
        for m in (whole[key], slabs[key], from_logits[key]):
            assert m.count == len(index)
            np.testing.assert_allclose(m.mean, world.mean(axis=0), rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(m.cov, np.cov(world.T, bias=True), rtol=1e-9, atol=1e-9)
    assert 0 not in whole or whole[0].count == np.count_nonzero(labels)


def test_moments_come_from_each_structures_largest_piece_so_stray_specks_do_not_move_the_frame():
    """Predicted segmentations hold a few stray voxels far from the structure: 3 + 1 + 1 beside a 1281-voxel LV moved
    its prior 1.2 mm. Each structure's moments (and all foreground's) come from its largest face-connected piece, in
    one slab or many, from labels or logits; without ``largest_piece`` the specks count."""
    shape = (30, 40, 36)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    labels = np.zeros(shape, dtype=np.int16)
    labels[((z - 12) / 8.0) ** 2 + ((y - 15) / 12.0) ** 2 + ((x - 14) / 6.0) ** 2 < 1] = 1
    labels[((z - 12) / 4.0) ** 2 + ((y - 15) / 4.0) ** 2 + ((x - 21) / 4.0) ** 2 < 1] = 2  # overlaps label 1
    clean = labels.copy()
    labels[28, 38, 34] = labels[0, 39, 0] = 1  # specks of label 1, far away
    labels[27:29, 2, 33] = 2
    labels[29, 39, 35] = 2  # corner-touching a speck of label 1: face connectivity keeps them apart
    labels[28, 38, 35] = 1
    a, b = np.diag([0.8, 0.7, 1.1]), np.array([3.0, -2.0, 5.0])
    expected = structure_moments(clean, (a, b), largest_piece=False)
    logits = np.stack([(labels == c).astype(np.float32) for c in range(3)])
    for moments in (structure_moments(labels, (a, b)), structure_moments(labels, (a, b), slab_voxels=40 * 36),
                    structure_moments(logits, (a, b), slab_voxels=3 * 40 * 36, to_labels=lambda s: np.argmax(s, 0))):
        for key in (1, 2, ALL_FOREGROUND):
            assert moments[key].count == expected[key].count
            np.testing.assert_allclose(moments[key].mean, expected[key].mean, atol=1e-10)
            np.testing.assert_allclose(moments[key].cov, expected[key].cov, atol=1e-9)
        # the volume of all the pieces is kept beside the largest piece's (the credibility rules read both)
        voxel_ml = float(np.linalg.det(a)) / 1000
        assert moments[1].volume_ml == pytest.approx(expected[1].count * voxel_ml)
        assert moments[1].total_volume_ml == pytest.approx((expected[1].count + 3) * voxel_ml)
    every_voxel = structure_moments(labels, (a, b), largest_piece=False)
    assert every_voxel[1].count == expected[1].count + 3
    assert np.linalg.norm(every_voxel[1].mean - expected[1].mean) > 0.02
    assert np.max(np.abs(every_voxel[1].cov - expected[1].cov)) > 0.4  # mm^2: 3 voxels of 2300


def test_affine_of_reproduces_the_geometry():
    geometry = ImageGeometry(spacing=(0.7, 0.8, 2.5), origin=(10.0, -4.0, 3.0),
                             direction=tuple(np.diag([-1.0, 1.0, -1.0]).ravel()), size=(10, 11, 12))
    a, b = affine_of(geometry.array_index_to_world)
    points = np.random.default_rng(1).uniform(0, 10, (20, 3))
    np.testing.assert_allclose(points @ a.T + b, geometry.array_index_to_world(points), atol=1e-10)


def _moments(labels, geometry):
    return structure_moments(labels, affine_of(geometry.array_index_to_world))


def test_fit_learns_the_landmarks_in_the_frame_and_picks_the_informative_structure():
    rng = np.random.default_rng(2)
    cases = [ellipsoid_case(rng) for _ in range(12)]
    prior = PositionPrior.fit([(_moments(l, g), p) for l, g, p in cases[:10]], ["tip", "side"])
    for name in ("tip", "side"):
        # label 1 (and all foreground, which is nearly label 1) carries the frame; the random ball does not
        assert prior.landmarks[name].structure in (1, ALL_FOREGROUND)
        assert prior.landmarks[name].loo_rms_mm < 1.5
    for labels, geometry, truth in cases[10:]:
        moments = _moments(labels, geometry)
        for k, name in enumerate(("tip", "side")):
            mean, cov = pooled_prediction([prior], name, moments)
            assert np.linalg.norm(mean - truth[k]) < 2.0, name  # voxels 1.5-2 mm
            assert np.all(np.linalg.eigvalsh(cov) >= -1e-9)
    # the landmark in the frame of the ball alone is unpredictable: its own leave-one-out error shows it
    only_ball = PositionPrior.fit([({2: _moments(l, g)[2]}, p) for l, g, p in cases[:10]], ["tip", "side"])
    assert only_ball.landmarks["tip"].loo_rms_mm > 5 * prior.landmarks["tip"].loo_rms_mm


def test_leave_one_out_error_is_computed_as_leave_one_out():
    """``loo_rms_mm`` recomputed independently: each structure's frames (the principal axis, its sign and roll fixed
    by the mean principal axis of all training cases and the world axis most orthogonal to it), then for each case the
    mean frame coordinates of the other cases predict it; the RMS of those errors is the recorded value, and the chosen
    structure is the one with the smallest. An in-sample error would be smaller by (n - 1) / n (0.8 here), which this
    tells apart. (In-sample and leave-one-out rank structures alike for this estimator: each case's leave-one-out
    residual is its in-sample residual times n / (n - 1), the frame being the case's own; only the values differ.)"""
    from nnunet_landmark.prior.model import structure_frame

    rng = np.random.default_rng(12)
    cases = [ellipsoid_case(rng) for _ in range(5)]
    fitted = [(_moments(l, g), p) for l, g, p in cases]
    prior = PositionPrior.fit(fitted, ["tip", "side"])
    n = len(fitted)
    for k, name in enumerate(("tip", "side")):
        per_structure = {}
        for structure in (1, 2, ALL_FOREGROUND):
            axes = []
            for m, _ in fitted:
                values, vectors = np.linalg.eigh(m[structure].cov)
                axes.append(vectors[:, -1])
            axes = [a if a @ axes[0] >= 0 else -a for a in axes]
            reference = np.mean(axes, axis=0) / np.linalg.norm(np.mean(axes, axis=0))
            roll = np.eye(3)[int(np.argmin(np.abs(reference)))]
            frames = [structure_frame(m[structure], reference, roll) for m, _ in fitted]
            coordinates = [r.T @ (p[k] - c) / size for (c, r, size), (_, p) in zip(frames, fitted)]
            errors = [np.linalg.norm(c + size * r @ np.mean([q for j, q in enumerate(coordinates) if j != i], axis=0)
                                     - fitted[i][1][k]) for i, (c, r, size) in enumerate(frames)]
            per_structure[structure] = float(np.sqrt(np.mean(np.square(errors))))
            in_sample = float(np.sqrt(np.mean(np.square([np.linalg.norm(
                c + size * r @ np.mean(coordinates, axis=0) - p[k]) for (c, r, size), (_, p) in zip(frames, fitted)]))))
            assert in_sample == pytest.approx(per_structure[structure] * (n - 1) / n, rel=1e-9)
        chosen = prior.landmarks[name]
        # the smallest (all foreground's largest piece is the ellipsoid itself: a tie with label 1)
        assert per_structure[chosen.structure] == pytest.approx(min(per_structure.values()), rel=1e-9), per_structure
        assert chosen.loo_rms_mm == pytest.approx(per_structure[chosen.structure], rel=1e-9), (name, per_structure)
        assert per_structure[2] > 3 * per_structure[chosen.structure]  # the small ball elsewhere does not place it


def test_a_flipped_direction_gives_the_same_world_frame_and_prediction():
    rng = np.random.default_rng(3)
    cases = [ellipsoid_case(rng) for _ in range(6)]
    prior = PositionPrior.fit([(_moments(l, g), p) for l, g, p in cases], ["tip", "side"])
    labels, geometry, truth = ellipsoid_case(np.random.default_rng(30))
    image = sitk.GetImageFromArray(labels)
    geometry.apply_to(image)
    flipped = sitk.Flip(image, [True, False, True])  # same voxels in space, axes reversed in the array
    g2 = ImageGeometry.from_image(flipped)
    assert not np.allclose(g2.direction_matrix, geometry.direction_matrix)
    first = _moments(labels, geometry)
    second = _moments(sitk.GetArrayFromImage(flipped), g2)
    for name in ("tip", "side"):
        a, _ = pooled_prediction([prior], name, first)
        b, _ = pooled_prediction([prior], name, second)
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_serialisation_round_trip_is_exact():
    rng = np.random.default_rng(4)
    cases = [ellipsoid_case(rng) for _ in range(4)]
    prior = PositionPrior.fit([(_moments(l, g), p) for l, g, p in cases], ["tip", "side"])
    import json
    again = PositionPrior.from_dict(json.loads(json.dumps(prior.to_dict())))
    moments = _moments(*cases[0][:2])
    for name in ("tip", "side"):
        for x, y in zip(pooled_prediction([prior], name, moments), pooled_prediction([again], name, moments)):
            np.testing.assert_array_equal(x, y)
    assert PositionPrior.fit([(_moments(l, g), p) for l, g, p in cases[:2]], ["tip", "side"]) is None


def test_combination_follows_the_prior_for_a_flat_heatmap_and_the_heatmap_where_it_is_sharp():
    encoding = HeatmapEncoding(max_distance_mm=100.0, scale_mm=20.0)
    shape, spacing = (40, 40, 40), np.array([2.0, 2.0, 2.0])
    affine = (np.diag(spacing), np.zeros(3))
    prior_mean, prior_cov = np.array([40.0, 40.0, 40.0]), np.eye(3) * 16.0  # voxel (20, 20, 20), 4 mm sd
    flat = np.zeros(shape, np.float32)  # logit 0 everywhere
    q = combine_with_heatmap(flat, encoding, None, affine, prior_mean, prior_cov)
    np.testing.assert_allclose(q, [20, 20, 20], atol=1e-6)
    # a sharp heatmap 6 mm from the prior's mean pulls the estimate most of the way with a narrow likelihood
    truth = np.array([23.0, 20.0, 20.0])
    h = np.clip(render_heatmaps(shape, truth[None], spacing, encoding)[0], 1e-4, 1 - 1e-4)
    logits = np.log(h / (1 - h))
    near = combine_with_heatmap(logits, encoding, None, affine, prior_mean, prior_cov, tau_mm=1.0)
    far = combine_with_heatmap(logits, encoding, None, affine, prior_mean, prior_cov, tau_mm=1e6)
    assert np.linalg.norm(near - truth) < 0.6
    assert np.linalg.norm(far - [20, 20, 20]) < 0.2
    # reliability mask: excluded voxels do not count
    mask = np.ones(shape, bool)
    mask[22:, :, :] = False
    masked = combine_with_heatmap(logits, encoding, mask, affine, prior_mean, prior_cov, tau_mm=1.0)
    assert masked[0] < 21.6
    # a prior outside the image gives nothing to combine
    assert combine_with_heatmap(flat, encoding, None, affine, np.array([500.0, 0, 0]), prior_cov) is None


def test_a_validated_heatmap_weighs_by_its_error_and_one_far_off_extremum_barely_moves_the_estimate():
    """With the heatmap's validated RMS error the extremum enters as a Student-t of that width: an accurate heatmap
    (0.5 mm) takes the estimate to its extremum, an inaccurate one (20 mm) leaves the prior (4 mm SD) in charge, and
    an extremum 45 mm off moves it less than a Gaussian of the same width would."""
    from nnunet_landmark.prior.model import HEATMAP_DOF

    encoding = HeatmapEncoding(max_distance_mm=100.0, scale_mm=20.0)
    shape, spacing = (40, 40, 60), np.array([2.0, 2.0, 2.0])
    affine = (np.diag(spacing), np.zeros(3))
    prior_mean, prior_cov = np.array([40.0, 40.0, 40.0]), np.eye(3) * 16.0  # voxel (20, 20, 20), 4 mm SD
    flat = np.zeros(shape, np.float32)  # the heatmap's values play no part once its error is known
    extremum = np.array([46.0, 40.0, 40.0])  # 6 mm from the prior's mean, voxel (23, 20, 20)
    sharp = combine_with_heatmap(flat, encoding, None, affine, prior_mean, prior_cov, heatmap_point=(extremum, 0.5))
    blunt = combine_with_heatmap(flat, encoding, None, affine, prior_mean, prior_cov, heatmap_point=(extremum, 20.0))
    assert np.linalg.norm(sharp - [23, 20, 20]) < 0.3, sharp  # voxels of 2 mm; the error is floored at 1 mm
    assert 20.0 < blunt[0] < 20.3 and np.allclose(blunt[1:], 20, atol=1e-6), blunt
    # the weight: with a small pull the shift is prior variance / (prior variance + t variance) of the offset
    t_scale = 20.0 ** 2 * HEATMAP_DOF / (HEATMAP_DOF + 3)  # curvature of the t's cost at its centre
    np.testing.assert_allclose((blunt[0] - 20) * 2, 6 * (17 / (17 + t_scale)), rtol=0.15)
    far = np.array([40.0 + 45.0, 40.0, 40.0])
    robust = combine_with_heatmap(flat, encoding, None, affine, prior_mean, prior_cov, heatmap_point=(far, 10.0))
    gaussian_shift = 45 * 17 / (17 + 100)  # what a Gaussian of 10 mm would do, in mm (about 6.5)
    assert 0 < (robust[0] - 20) * 2 < gaussian_shift / 2, robust


def test_heatmap_errors_from_validation_are_an_rms_and_need_two_cases():
    rng = np.random.default_rng(5)
    cases = [ellipsoid_case(rng) for _ in range(4)]
    prior = PositionPrior.fit([(_moments(l, g), p) for l, g, p in cases], ["tip", "side"])
    assert all(p.heatmap_error_mm is None for p in prior.landmarks.values())
    weighed = prior.with_validation({"tip": [3.0, 4.0, float("nan")], "side": [7.0]})
    assert weighed.landmarks["tip"].heatmap_error_mm == pytest.approx(np.sqrt(12.5))
    assert weighed.landmarks["side"].heatmap_error_mm is None  # one case says too little
    import json
    again = PositionPrior.from_dict(json.loads(json.dumps(weighed.to_dict())))
    assert again.landmarks["tip"].heatmap_error_mm == weighed.landmarks["tip"].heatmap_error_mm
    from nnunet_landmark.prior.model import pooled_heatmap_error
    other = prior.with_validation({"tip": [1.0, 1.0]})
    assert pooled_heatmap_error([weighed, other], "tip") == pytest.approx(np.sqrt((12.5 + 1.0) / 2))
    assert pooled_heatmap_error([prior], "tip") is None and pooled_heatmap_error([weighed], "side") is None


def test_pooling_averages_folds_and_skips_missing_structures():
    rng = np.random.default_rng(5)
    cases = [ellipsoid_case(rng) for _ in range(8)]
    first = PositionPrior.fit([(_moments(l, g), p) for l, g, p in cases[:4]], ["tip", "side"])
    second = PositionPrior.fit([(_moments(l, g), p) for l, g, p in cases[4:]], ["tip", "side"])
    moments = _moments(*cases[0][:2])
    a, b = (pooled_prediction([p], "tip", moments)[0] for p in (first, second))
    np.testing.assert_allclose(pooled_prediction([first, second], "tip", moments)[0], (a + b) / 2, atol=1e-12)
    assert pooled_prediction([first], "tip", {}) is None
    assert pooled_prediction([first], "unknown", moments) is None


def test_pooling_folds_that_chose_different_structures():
    """Two folds that placed "tip" in different structures' frames (the ellipsoid, all foreground): pooled as an equal
    mixture of their world Gaussians (mean of means; covariance = mean covariance + the spread of the means), and
    the boundary guard keeps one band per structure with its share of folds, not the first fold's alone."""
    import dataclasses

    from nnunet_landmark.prior.model import pooled_surface_bands

    rng = np.random.default_rng(8)
    cases = [ellipsoid_case(rng) for _ in range(4)]
    prior = PositionPrior.fit([(_moments(l, g), p) for l, g, p in cases], ["tip", "side"])
    tip = prior.landmarks["tip"]
    assert tip.structure == 1
    on_ellipsoid = PositionPrior({"tip": dataclasses.replace(tip, surface_mean=0.5, surface_sd=1.0)})
    shifted = dataclasses.replace(tip, structure=ALL_FOREGROUND, mean=tip.mean + [0.2, 0.0, 0.0],
                                  surface_mean=-2.0, surface_sd=3.0)
    on_foreground = PositionPrior({"tip": shifted})
    moments = _moments(*cases[0][:2])
    (a, ca), (b, cb) = pooled_prediction([on_ellipsoid], "tip", moments), pooled_prediction([on_foreground], "tip",
                                                                                          moments)
    assert np.linalg.norm(a - b) > 1.0  # the two frames disagree by millimetres
    mean, cov = pooled_prediction([on_ellipsoid, on_foreground], "tip", moments)
    np.testing.assert_allclose(mean, (a + b) / 2, atol=1e-12)
    np.testing.assert_allclose(cov, (ca + cb) / 2 + np.outer(a - b, a - b) / 4, atol=1e-9)
    bands = pooled_surface_bands([on_ellipsoid, on_foreground, on_ellipsoid], "tip")
    assert [(s, m, sd) for s, m, sd, _ in bands] == [(ALL_FOREGROUND, -2.0, 3.0), (1, 0.5, 1.0)]
    assert [w for *_, w in bands] == pytest.approx([1 / 3, 2 / 3])
    assert pooled_surface_bands([prior], "tip") == []  # no guard learned (fitted without boundary distances)


def test_recording_keeps_every_fold_when_nnunet_rewrites_plans(tmp_path):
    """nnU-Net rewrites plans.json from a fold's in-memory plans (its own prior only) when the fold starts: written
    through ``write_plans_keeping_priors``, the other folds' priors stay, and its own replaces a stale one."""
    import json

    from nnunet_landmark.landmark_heads import PLANS_KEY
    from nnunet_landmark.prior.storage import PRIORS_KEY, record_position_prior, recorded_position_priors, write_plans_keeping_priors

    rng = np.random.default_rng(6)
    cases = [ellipsoid_case(rng) for _ in range(6)]
    priors = [PositionPrior.fit([(_moments(l, g), p) for l, g, p in part], ["tip", "side"])
              for part in (cases[:3], cases[3:])]
    plans_file = tmp_path / "plans.json"
    plans_file.write_text(json.dumps({PLANS_KEY: {PRIORS_KEY: {"fold_0": priors[0].to_dict(),
                                                               "fold_1": priors[0].to_dict()}}}))
    in_memory = {"configurations": {}, PLANS_KEY: {PRIORS_KEY: {"fold_1": priors[1].to_dict()}}}
    write_plans_keeping_priors(in_memory, str(plans_file))  # fold 1 starts (again)
    recorded = recorded_position_priors(str(plans_file))
    assert sorted(recorded) == ["fold_0", "fold_1"]
    assert recorded["fold_0"] == priors[0].to_dict() and recorded["fold_1"] == priors[1].to_dict()
    assert json.loads(plans_file.read_text())["configurations"] == {}
    assert in_memory[PLANS_KEY][PRIORS_KEY].keys() == {"fold_1"}  # the trainer's own plans are not touched
    record_position_prior(str(plans_file), "fold_0", None)  # a fold without a prior removes its stale one
    assert sorted(recorded_position_priors(str(plans_file))) == ["fold_1"]
    assert recorded_position_priors(str(tmp_path / "missing.json")) == {}


def test_cases_without_a_landmark_are_left_out_of_its_prior():
    rng = np.random.default_rng(7)
    cases = [ellipsoid_case(rng) for _ in range(5)]
    full = PositionPrior.fit([(_moments(l, g), p) for l, g, p in cases[:4]], ["tip", "side"])
    gappy = [(_moments(l, g), p.copy()) for l, g, p in cases]
    gappy[4][1][0] = np.nan  # the fifth case lacks its tip
    prior = PositionPrior.fit(gappy, ["tip", "side"])
    assert prior.landmarks["tip"].cases == 4 and prior.landmarks["side"].cases == 5
    np.testing.assert_allclose(prior.landmarks["tip"].mean, full.landmarks["tip"].mean, atol=1e-12)


def test_strided_moments_of_a_large_structure_match_the_full_ones():
    """At prediction a full-size CT's moments come from every stride-th voxel: for an LV-sized ellipsoid (radii
    25-40 voxels) the centroid and axes stay within 0.2 voxel of the full computation (stride 3)."""
    from nnunet_landmark.prior.model import sampling_stride

    shape = (90, 110, 100)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    labels = (((z - 41.3) / 40) ** 2 + ((y - 57.8) / 30) ** 2 + ((x - 49.1) / 25) ** 2 < 1).astype(np.uint8)
    assert sampling_stride(shape, max_voxels=10 ** 9) == 1 and sampling_stride(shape, max_voxels=40_000) == 3
    full = structure_moments(labels, (np.eye(3), np.zeros(3)))[1]
    sampled = structure_moments(labels, (np.eye(3), np.zeros(3)), slab_voxels=5000, stride=3)[1]
    assert sampled.count < full.count / 20
    np.testing.assert_allclose(sampled.mean, full.mean, atol=0.2)
    np.testing.assert_allclose(np.sqrt(np.linalg.eigvalsh(sampled.cov)), np.sqrt(np.linalg.eigvalsh(full.cov)), atol=0.2)


def test_the_learned_boundary_distance_pulls_an_estimate_back_onto_the_structure():
    """A frame learned on other shapes can carry a landmark off the anatomy: the landmark's learned distance from the
    structure's boundary (here 0: on it) pulls the estimate back. A sphere of radius 10 mm, a prior 13 mm outside it,
    a flat heatmap: without the boundary factor the estimate stays outside, with it it comes back to the edge of
    the learned band (the factor is a guard: it only acts beyond 2 SD of the learned distance)."""
    from nnunet_landmark.prior.model import signed_distance

    spacing = np.array([1.0, 1.0, 1.0])
    z, y, x = np.ogrid[:50, :50, :50]
    mask = (z - 25) ** 2 + (y - 25) ** 2 + (x - 25) ** 2 <= 100
    distance = signed_distance(mask, spacing)
    assert distance[25, 25, 25] < -9 and distance[25, 25, 45] > 9
    encoding = HeatmapEncoding(max_distance_mm=100.0, scale_mm=20.0)
    affine = (np.diag(spacing), np.zeros(3))
    prior_mean, prior_cov = np.array([25.0, 25.0, 48.0]), np.eye(3) * 9.0
    flat = np.zeros(mask.shape, np.float32)
    without = combine_with_heatmap(flat, encoding, None, affine, prior_mean, prior_cov)
    with_boundary = combine_with_heatmap(flat, encoding, None, affine, prior_mean, prior_cov,
                                         surface=[(lambda box: distance[box], 0.0, 1.0, 1.0)])
    radius = lambda p: float(np.linalg.norm(np.asarray(p) - 25))  # noqa: E731
    band = SURFACE_BAND_SD * max(1.0, PRIOR_FLOOR_MM)  # the guard's SD is at least the prior's floor
    edge = 10 + band
    assert radius(without) > edge + 4, without
    # pulled back at least half way to the band's edge (a soft guard balances the prior there), not past it
    assert edge - 1.0 < radius(with_boundary) < (edge + radius(without)) / 2, (with_boundary, without)
    # inside the band the factor changes nothing
    inside_band = combine_with_heatmap(flat, encoding, None, affine, np.array([25.0, 25.0, 35.0]), np.eye(3) * 0.04,
                                       surface=[(lambda box: distance[box], 0.0, 1.0, 1.0)])
    plain = combine_with_heatmap(flat, encoding, None, affine, np.array([25.0, 25.0, 35.0]), np.eye(3) * 0.04)
    np.testing.assert_allclose(inside_band, plain, atol=0.05)
    assert np.all(np.isinf(signed_distance(np.zeros((3, 3, 3), bool), spacing)))
