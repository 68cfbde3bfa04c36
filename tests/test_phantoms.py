"""Synthetic cardiac CT phantoms: reproducible, MM-WHS label values and layout, anatomy where the apex is."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli, shared_data
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.landmark_files import read_landmark_csv, read_sphere_mask
from nnunet_landmark.phantom_families import family_members, read_families, write_mmwhs_phantoms
from nnunet_landmark.mmwhs import LANDMARKS
from nnunet_landmark.mmwhs import STRUCTURES
from nnunet_landmark.phantoms import generate_phantom, sample_anatomy

MMWHS_VALUES = {0, 205, 420, 500, 550, 600, 820, 850}
CHAMBERS = {"LA": 420, "LV_blood_cavity": 500, "RA": 550, "RV": 600, "ascending_aorta": 820,
            "pulmonary_artery": 850}
SEEDS = range(12)


@pytest.fixture(scope="module")
def tiny_phantoms():
    return {seed: generate_phantom(seed, "tiny") for seed in SEEDS}


def arrays(phantom):
    return sitk.GetArrayFromImage(phantom.image), sitk.GetArrayFromImage(phantom.label)


def test_same_seed_gives_identical_phantoms_and_different_seeds_differ(tiny_phantoms):
    again = generate_phantom(3, "tiny")
    first = tiny_phantoms[3]
    for a, b in zip(arrays(first), arrays(again)):
        np.testing.assert_array_equal(a, b)
    assert first.geometry == again.geometry
    for name in LANDMARKS:
        np.testing.assert_array_equal(first.landmarks[name], again.landmarks[name])
    image4, label4 = arrays(tiny_phantoms[4])
    image3, label3 = arrays(first)
    assert first.geometry.spacing != tiny_phantoms[4].geometry.spacing
    assert np.linalg.norm(first.landmarks["apex"] - tiny_phantoms[4].landmarks["apex"]) > 1.0
    assert not np.array_equal(image3, image4) and not np.array_equal(label3, label4)


def test_label_values_and_pixel_types(tiny_phantoms):
    assert set(STRUCTURES.values()) | {0} == MMWHS_VALUES
    for seed, phantom in tiny_phantoms.items():
        assert phantom.image.GetPixelID() == sitk.sitkInt16
        assert phantom.label.GetPixelID() == sitk.sitkInt16
        assert phantom.image.GetSize() == phantom.label.GetSize() == (48, 48, 40)
        assert ImageGeometry.from_image(phantom.image) == ImageGeometry.from_image(phantom.label) == phantom.geometry
        image, label = arrays(phantom)
        assert set(np.unique(label).tolist()) == MMWHS_VALUES, f"seed {seed}"
        # every structure is more than a speck, even at the tiny size
        for value in MMWHS_VALUES - {0}:
            assert (label == value).sum() >= 20, f"seed {seed}: label {value} has {(label == value).sum()} voxels"
        assert -1024 <= image.min() and image.max() <= 3071


def test_apex_is_the_tip_of_the_lv_cavity(tiny_phantoms):
    for seed, phantom in tiny_phantoms.items():
        geometry = phantom.geometry
        _, label = arrays(phantom)
        apex, mitral = phantom.landmarks["apex"], phantom.landmarks["mitral_valve"]
        cavity = geometry.array_index_to_world(np.argwhere(label == 500).astype(float))
        distance = np.linalg.norm(cavity - mitral, axis=1)
        farthest = cavity[np.argmax(distance)]
        off = np.linalg.norm(geometry.world_to_index(farthest) - geometry.world_to_index(apex))
        assert off <= 1.5, f"seed {seed}: the LV voxel farthest from the mitral valve is {off:.2f} voxel from the apex"
        # no LV cavity voxel reaches beyond the apex (by more than one voxel)
        assert distance.max() <= np.linalg.norm(apex - mitral) + max(geometry.spacing), f"seed {seed}"
        # the apex is inside the LV: cavity or myocardium, never another structure
        apex_voxel = tuple(np.round(geometry.world_to_array_index(apex)).astype(int))
        assert label[apex_voxel] in (500, 205), f"seed {seed}: label {label[apex_voxel]} at the apex"
        # the mitral valve is the LV-LA interface: LV cavity and LA both within 1.5 voxels of it
        near = np.linalg.norm(
            geometry.array_index_to_world(np.argwhere(np.isin(label, (420, 500))).astype(float)) - mitral, axis=1)
        assert near.min() <= 1.5 * max(geometry.spacing)
        for value in (420, 500):
            voxels = geometry.array_index_to_world(np.argwhere(label == value).astype(float))
            assert np.linalg.norm(voxels - mitral, axis=1).min() <= 1.5 * max(geometry.spacing), f"seed {seed}"


def test_apex_direction_and_distance_in_lps(tiny_phantoms):
    """Left (+x), anterior (-y), inferior (-z) of the mitral valve, 60-110 mm away, for the default pose range.

    The default long axis is ~37 deg from the x=0 plane, 30 deg from y=0 and 38 deg from z=0; the random pose turns
    it by at most 20 deg, so every component keeps its sign with at least 10 deg (|cos| >= 0.17) to spare.
    """
    rng = np.random.default_rng(2024)
    directions, lengths = [], []
    for _ in range(2000):
        anatomy = sample_anatomy(rng, np.zeros(3))
        d = anatomy.apex - anatomy.mitral_valve
        lengths.append(np.linalg.norm(d))
        directions.append(d / np.linalg.norm(d))
    directions = np.asarray(directions)
    assert np.all(directions[:, 0] > 0.17) and np.all(directions[:, 1] < -0.17) and np.all(directions[:, 2] < -0.17)
    assert 60.0 <= min(lengths) and max(lengths) <= 110.0
    # the range is used, not one fixed heart
    assert max(lengths) - min(lengths) > 25.0
    assert np.ptp(directions, axis=0).min() > 0.2
    # and in the rendered phantoms, through the whole chain
    for seed, phantom in tiny_phantoms.items():
        d = phantom.landmarks["apex"] - phantom.landmarks["mitral_valve"]
        assert d[0] > 0 and d[1] < 0 and d[2] < 0, f"seed {seed}: apex - mitral valve = {d}"
        assert 60.0 <= np.linalg.norm(d) <= 110.0
        # the aortic valve sits beside the mitral valve, anterior-right, never down towards the apex
        a = phantom.landmarks["aortic_valve"] - phantom.landmarks["mitral_valve"]
        assert 15.0 < np.linalg.norm(a) < 45.0 and a[0] < 0
        assert abs(np.dot(a, d)) < 1e-6 * np.linalg.norm(a) * np.linalg.norm(d)  # in the valve plane


def test_blood_pool_and_myocardium_intensities(tiny_phantoms):
    for seed, phantom in tiny_phantoms.items():
        image, label = arrays(phantom)
        medians = {name: float(np.median(image[label == value])) for name, value in CHAMBERS.items()}
        for name, median in medians.items():
            assert 300 <= median <= 560, f"seed {seed}: {name} blood pool median {median} HU"
        myocardium = float(np.median(image[label == 205]))
        assert 40 <= myocardium <= 180
        assert myocardium < min(medians.values()) - 150, f"seed {seed}: myocardium {myocardium} vs blood {medians}"
        # a CT, not a cartoon: lungs and fat around the heart (the spine is mostly outside the field of view)
        assert 0.05 < (image < -600).mean() < 0.8 and ((image < -40) & (image > -160)).sum() > 50
        # noise: the LV blood pool is not flat
        assert 8 < np.std(image[label == 500]) < 80


def test_spacing_anisotropic_and_directions_vary():
    geometries = [generate_phantom(seed, (8, 8, 6)).geometry for seed in range(30)]
    sign_patterns, directions = set(), set()
    for g in geometries:
        sx, sy, sz = g.spacing
        assert sx == sy and sz / sx >= 1.15, g.spacing
        d = g.direction_matrix
        np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-12)
        sign_patterns.add(tuple(np.sign(np.diag(d)).astype(int)))
        directions.add(tuple(np.round(d.ravel(), 3)))
        # oblique: off-diagonal direction cosines up to sin(8 deg)
        assert np.abs(d - np.diag(np.diag(d))).max() < np.sin(np.deg2rad(8.5)) * 2
    assert len(directions) == len(geometries)
    assert len(sign_patterns) >= 3, sign_patterns  # axis flips, as in real scanners' headers (MM-WHS: diag(1,-1,1))
    assert max(np.abs(g.direction_matrix - np.diag(np.diag(g.direction_matrix))).max() for g in geometries) > 0.02
    spacings = np.array([g.spacing for g in geometries])
    assert np.ptp(spacings[:, 0]) > 0.3 and np.ptp(spacings[:, 2] / spacings[:, 0]) > 0.2
    # without flips and tilt the axes are the world axes
    identity = generate_phantom(0, (8, 8, 6), oblique_degrees=0, flips=False).geometry
    np.testing.assert_array_equal(identity.direction_matrix, np.eye(3))


def test_write_mmwhs_phantoms_layout_and_sphere_masks(tmp_path):
    table = write_mmwhs_phantoms(tmp_path, num_cases=3, seed=5, progress=False)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    cases = ["ct_train_1001", "ct_train_1002", "ct_train_1003"]
    expected = ["landmarks.csv", "families.csv"]
    for case in cases:
        expected += [f"ct_train/{case}_image.nii.gz", f"ct_train/{case}_label.nii.gz"]
        expected += [f"{name}/{case}_{name}.nii.gz" for name in LANDMARKS]
    assert files == sorted(expected)
    assert list(table) == cases
    csv = read_landmark_csv(tmp_path / "landmarks.csv")
    assert list(csv) == cases
    for case in cases:
        image = sitk.ReadImage(str(tmp_path / "ct_train" / f"{case}_image.nii.gz"))
        label = sitk.ReadImage(str(tmp_path / "ct_train" / f"{case}_label.nii.gz"))
        assert image.GetPixelID() == label.GetPixelID() == sitk.sitkInt16
        geometry = ImageGeometry.from_image(image)
        assert geometry.same_grid_as(ImageGeometry.from_image(label))
        assert set(np.unique(sitk.GetArrayViewFromImage(label)).tolist()) == MMWHS_VALUES
        assert list(csv[case]) == list(LANDMARKS)
        for name in LANDMARKS:
            np.testing.assert_allclose(csv[case][name], table[case][name], atol=1e-9)
            mask_path = tmp_path / name / f"{case}_{name}.nii.gz"
            centroid = read_sphere_mask(mask_path, reference=geometry)  # on the image grid, one ball
            off = np.linalg.norm(geometry.world_to_index(centroid) - geometry.world_to_index(csv[case][name]))
            assert off < 0.5, f"{mask_path}: centroid {off:.2f} voxel from landmarks.csv"
    # the seed makes the release reproducible, the case number picks the phantom: the same seed again (fewer
    # cases) writes the same ct_train_1002, byte for byte in its voxels; another seed another one; cases differ
    again = write_mmwhs_phantoms(tmp_path / "again", num_cases=2, seed=5, progress=False)
    other = write_mmwhs_phantoms(tmp_path / "other", num_cases=2, seed=6, progress=False)
    np.testing.assert_array_equal(again["ct_train_1002"]["apex"], table["ct_train_1002"]["apex"])
    for kind in ("image", "label"):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "again" / "ct_train" / f"ct_train_1002_{kind}.nii.gz"))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ct_train" / f"ct_train_1002_{kind}.nii.gz"))))
    assert np.linalg.norm(other["ct_train_1002"]["apex"] - table["ct_train_1002"]["apex"]) > 1.0
    assert np.linalg.norm(table["ct_train_1001"]["apex"] - table["ct_train_1002"]["apex"]) > 1.0


def test_sphere_masks_agree_with_landmarks_for_twenty_cases(tmp_path):
    """The converter's tests use 20 such cases; every mask (3 landmarks x 20) must match within 0.5 voxel."""
    table = write_mmwhs_phantoms(tmp_path, num_cases=20, seed=0, progress=False)
    csv = read_landmark_csv(tmp_path / "landmarks.csv")
    worst = 0.0
    for case, landmarks in table.items():
        geometry = ImageGeometry.from_file(tmp_path / "ct_train" / f"{case}_image.nii.gz")
        for name, position in landmarks.items():
            np.testing.assert_array_equal(csv[case][name], position)
            centroid = read_sphere_mask(tmp_path / name / f"{case}_{name}.nii.gz", geometry)
            worst = max(worst, np.linalg.norm(geometry.world_to_index(centroid) - geometry.world_to_index(position)))
    assert worst < 0.5, worst


def test_render_mid_slices_through_the_apex(tmp_path):
    """A picture to look at: a 'small' phantom without axis flips, three planes through the apex."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    phantom = generate_phantom(11, "small", oblique_degrees=0, flips=False)
    image, label = arrays(phantom)
    geometry = phantom.geometry
    k, j, i = np.round(geometry.world_to_array_index(phantom.landmarks["apex"])).astype(int)
    mk, mj, mi = np.round(geometry.world_to_array_index(phantom.landmarks["mitral_valve"])).astype(int)
    sz, sy, sx = geometry.spacing[::-1]
    mid_k = (k + mk) // 2
    views = [  # (title, image slice, label slice, apex (col, row) or None, aspect, origin)
        ("axial through the apex", image[k], label[k], (i, j), sy / sx, "upper"),
        ("axial, mid LV", image[mid_k], label[mid_k], None, sy / sx, "upper"),
        ("coronal through the apex", image[:, j, :], label[:, j, :], (i, k), sz / sx, "lower"),
        ("sagittal through the apex", image[:, :, i], label[:, :, i], (j, k), sz / sy, "lower"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.5))
    for ax, (title, im, lab, apex, aspect, origin) in zip(axes, views):
        ax.imshow(im, cmap="gray", vmin=-250, vmax=650, aspect=aspect, origin=origin, interpolation="nearest")
        assert (lab == 500).sum() > 0, f"{title}: no LV cavity to outline"
        ax.contour(lab == 500, levels=[0.5], colors="red", linewidths=1.2)  # Z[r, c] at (c, r), as imshow
        ax.contour(lab == 205, levels=[0.5], colors="yellow", linewidths=0.6)
        if apex is not None:
            ax.plot(*apex, marker="+", color="cyan", markersize=14, markeredgewidth=2)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle("phantom seed 11 (small): LV cavity red, LV myocardium yellow, apex cyan; LPS, radiological view")
    fig.tight_layout()
    path = tmp_path / "phantom_apex.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    # the apex slice holds LV cavity next to the apex voxel (the outline is drawn where the apex is)
    near_apex = label[max(k - 1, 0):k + 2, max(j - 2, 0):j + 3, max(i - 2, 0):i + 3]
    assert (near_apex == 500).any()
    # the LV in the mid slice is a bright blood pool ringed by darker myocardium
    lv_mid = image[mid_k][label[mid_k] == 500]
    myo_mid = image[mid_k][label[mid_k] == 205]
    assert lv_mid.size > 30 and myo_mid.size > 30 and np.median(lv_mid) - np.median(myo_mid) > 150


def test_console_script_writes_the_release(tmp_path):
    run_cli(["nnUNetv2_generate_landmark_phantoms", "-o", str(tmp_path / "out"), "-n", "2", "--seed", "3",
             "--size", "20,22,18"], timeout=300)
    image = sitk.ReadImage(str(tmp_path / "out" / "ct_train" / "ct_train_1002_image.nii.gz"))
    assert image.GetSize() == (20, 22, 18)
    # the console script writes what the Python function writes with the same options
    expected = write_mmwhs_phantoms(tmp_path / "function", num_cases=2, seed=3, size=(20, 22, 18), progress=False)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(image),
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "function" / "ct_train" / "ct_train_1002_image.nii.gz"))))
    csv = read_landmark_csv(tmp_path / "out" / "landmarks.csv")
    assert list(csv) == ["ct_train_1001", "ct_train_1002"]
    for case in csv:
        for name in LANDMARKS:
            np.testing.assert_array_equal(csv[case][name], expected[case][name])


def test_families_mix_generators_case_by_case(tmp_path):
    """``analytic+real`` alternates the analytic heart and the real templates; the analytic cases are exactly what
    the analytic family writes for the same case numbers and seeds; ``families.csv`` says which is which."""
    shared_data("mmwhs_ct_labels", "ct_train_1002_label.nii.gz")
    assert family_members("analytic+real") == ["analytic", "ct_train_1002", "ct_train_1005"]
    with pytest.raises(ValueError, match="unknown phantom family 'nonsense'"):
        family_members("analytic+nonsense")
    mixed = write_mmwhs_phantoms(tmp_path / "mixed", 2, seed=4, size=(24, 24, 20), progress=False,
                                 family="analytic+ct_train_1005")
    analytic = write_mmwhs_phantoms(tmp_path / "analytic", 1, seed=4, size=(24, 24, 20), progress=False)
    assert read_families(tmp_path / "mixed") == {"ct_train_1001": "analytic", "ct_train_1002": "ct_train_1005"}
    assert read_families(tmp_path / "nothing") == {}
    np.testing.assert_array_equal(mixed["ct_train_1001"]["apex"], analytic["ct_train_1001"]["apex"])
    image = sitk.ReadImage(str(tmp_path / "mixed" / "ct_train" / "ct_train_1002_image.nii.gz"))
    assert image.GetSize() == (24, 24, 20)
