"""Phantoms drawn on real anatomy: the deformation is smooth and invertible, the landmarks derived from the deformed
labels agree with the template's landmarks carried through it, the hearts stay physiological, and the converter
takes the result like a real MM-WHS release."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_data
from nnunet_landmark.anatomy_phantoms import (LV_CAVITY, LV_VOLUME_RANGE_ML, TEMPLATES, generate_template_phantom,
                                              load_template, sample_deformation)


@pytest.fixture(scope="module", autouse=True)
def templates_present():
    shared_data("mmwhs_ct_labels", "ct_train_1002_label.nii.gz")


def jacobian_determinants(mapping, points: np.ndarray, step: float = 0.5) -> np.ndarray:
    """det of the central-difference Jacobian of ``mapping`` (N, 3) -> (N, 3) at ``points``."""
    columns = [(mapping(points + step * e) - mapping(points - step * e)) / (2 * step) for e in np.eye(3)]
    return np.linalg.det(np.stack(columns, axis=-1))


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_deformation_is_invertible_and_its_inverse_undoes_it(name):
    template = load_template(name)
    index = np.argwhere(template.labels > 0)[::997].astype(float)
    points = template.geometry.array_index_to_world(index)
    for seed in range(5):
        deformation = sample_deformation(np.random.default_rng(seed), template, np.zeros(3))
        determinants = jacobian_determinants(deformation.flow.forward, points)
        assert determinants.min() > 0.3, (seed, determinants.min())  # smooth: far from folding
        assert determinants.max() < 3.0, (seed, determinants.max())
        moved = deformation.forward(points)
        displacement = np.linalg.norm(deformation.flow.forward(points) - points, axis=1)
        assert 0.5 < displacement.max() < 12.0, displacement.max()  # a real deformation, of a few mm
        np.testing.assert_allclose(deformation.backward(moved), points, atol=0.02)
        np.testing.assert_allclose(deformation.backward(moved, dense=True), points, atol=0.1)


def test_derived_landmarks_agree_with_the_carried_template_landmarks_and_hearts_stay_physiological():
    """The truth of a real-anatomy phantom is what the converter's rules derive from its deformed labels; the
    template's own landmarks carried through the deformation must agree within 2 mm. LV cavity volumes stay in the
    adult range (``LV_VOLUME_RANGE_ML``, Kawel-Boehm et al. 2015)."""
    worst, volumes = {}, []
    for seed in range(4):
        for name in TEMPLATES:
            phantom = generate_template_phantom(seed, name, "tiny", flips=False)
            for landmark, position in phantom.landmarks.items():
                error = float(np.linalg.norm(position - phantom.carried[landmark]))
                worst[landmark] = max(worst.get(landmark, 0.0), error)
            volumes.append(phantom.lv_volume_ml)
            label = sitk.GetArrayFromImage(phantom.label)
            assert set(np.unique(label)) == {0, 205, 420, 500, 550, 600, 820, 850}
            distance = np.linalg.norm(phantom.landmarks["apex"] - phantom.landmarks["mitral_valve"])
            assert 50 < distance < 110, distance  # real hearts: 70-100 mm, scaled by up to +-12%
    print({"worst_mm": worst, "lv_volume_ml": np.round(volumes, 1).tolist()})
    assert max(worst.values()) < 2.0, worst
    assert LV_VOLUME_RANGE_ML[0] < min(volumes) and max(volumes) < LV_VOLUME_RANGE_ML[1], volumes


def test_a_seed_makes_a_phantom_and_the_labels_follow_the_image_geometry():
    a = generate_template_phantom(11, TEMPLATES[1], "tiny")
    b = generate_template_phantom(11, TEMPLATES[1], "tiny")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a.image), sitk.GetArrayFromImage(b.image))
    assert a.image.GetDirection() == a.label.GetDirection() and a.image.GetOrigin() == a.label.GetOrigin()
    # the LV cavity of the image grid sits where the fine-grid truth says (its apex inside or next to it)
    label = sitk.GetArrayFromImage(a.label)
    lv = a.geometry.array_index_to_world(np.argwhere(label == LV_CAVITY).astype(float))
    assert np.linalg.norm(lv - a.landmarks["apex"], axis=1).min() < max(a.geometry.spacing) * 1.5
    # blood is bright, myocardium darker (contrast CT)
    image = sitk.GetArrayFromImage(a.image)
    assert np.median(image[label == LV_CAVITY]) > np.median(image[label == 205]) + 150


def test_the_converter_takes_real_anatomy_phantoms(tmp_path, nnunet_dirs):
    from nnunet_landmark.phantom_dataset import run_console_script
    from nnunet_landmark.phantom_families import read_families, write_mmwhs_phantoms

    truth = write_mmwhs_phantoms(tmp_path / "mmwhs", 4, seed=3, size="tiny", progress=False, family="real")
    assert len(truth) == 4
    assert list(read_families(tmp_path / "mmwhs").values()) == list(TEMPLATES) * 2
    run_console_script(["nnUNetv2_convert_MMWHS", "-i", str(tmp_path / "mmwhs" / "ct_train"), "-a",
                        str(tmp_path / "mmwhs" / "landmarks.csv"), "-d", "861", "--name", "RealAnatomy",
                        "--landmarks", "apex", "mitral_valve", "aortic_valve", "--folds", "2", "--all-structures"],
                       nnunet_dirs)
