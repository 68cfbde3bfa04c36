"""nnUNetv2_convert_MMWHS: annotation forms, labels, images, splits, heatmaps, bad input; stock nnU-Net accepts it."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli, shared_data
from nnunet_landmark.dataset_conversion import convert_mmwhs
from nnunet_landmark.dataset_conversion.convert_mmwhs import convert, derive_apex, main
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.heatmap_targets import HeatmapEncoding
from nnunet_landmark.landmark_files import read_markups, write_landmark_csv, write_markups
from nnunet_landmark.phantom_families import write_mmwhs_phantoms
from nnunet_landmark.raw_dataset import DatasetError, read_dataset_landmarks

DATASET = "Dataset801_MMWHS_LVApex"
CASES = [f"ct_train_{1001 + i}" for i in range(20)]
MMWHS_STRUCTURES = {"LV_blood_cavity": 500, "LV_myocardium": 205, "LA": 420, "RA": 550, "RV": 600,
                    "ascending_aorta": 820, "pulmonary_artery": 850}


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """20 tiny phantoms in the MM-WHS layout + a folder of Slicer markups; read-only for the tests."""
    root = tmp_path_factory.mktemp("mmwhs_release")
    truth = write_mmwhs_phantoms(root, num_cases=20, seed=0, progress=False)
    (root / "markups").mkdir()
    for case, landmarks in truth.items():
        write_markups(root / "markups" / f"{case}.mrk.json", landmarks)
    geometries = {c: ImageGeometry.from_file(root / "ct_train" / f"{c}_image.nii.gz") for c in truth}
    return root, truth, geometries


@pytest.fixture
def release_copy(release, tmp_path):
    """A private copy of the release, for tests that damage it."""
    root, truth, geometries = release
    copy = tmp_path / "release"
    shutil.copytree(root, copy)
    return copy, truth, geometries


def convert_quiet(ct_train, annotations, **kwargs) -> Path:
    return convert(str(ct_train), [str(a) for a in annotations], 801, **kwargs)


def voxel_error(geometry: ImageGeometry, a, b) -> float:
    return float(np.linalg.norm(geometry.world_to_index(a) - geometry.world_to_index(b)))


def assert_nothing_written(nnunet_dirs):
    """Not the dataset, not a hidden staging folder, not splits: the roots are as empty as before."""
    assert os.listdir(nnunet_dirs["nnUNet_raw"]) == []
    assert os.listdir(nnunet_dirs["nnUNet_preprocessed"]) == []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ the three annotation forms
@pytest.mark.parametrize("form", ["sphere_masks", "csv", "markups"])
def test_each_annotation_form_gives_the_true_apex(release, nnunet_dirs, form):
    root, truth, geometries = release
    source = {"sphere_masks": root / "apex", "csv": root / "landmarks.csv", "markups": root / "markups"}[form]
    folder = convert_quiet(root / "ct_train", [source])
    assert folder == Path(nnunet_dirs["nnUNet_raw"]) / DATASET
    landmarks = read_dataset_landmarks(folder, ["apex"])
    assert list(landmarks) == CASES
    worst = max(voxel_error(geometries[c], landmarks[c][0], truth[c]["apex"]) for c in CASES)
    assert worst < 0.5, f"{form}: apex off by {worst:.3f} voxel"
    if form != "sphere_masks":  # coordinates pass through exactly
        for c in CASES:
            np.testing.assert_allclose(landmarks[c][0], truth[c]["apex"], atol=1e-9)
    markups = json.loads((folder / "landmarksTr" / f"{CASES[0]}.mrk.json").read_text())
    assert markups["markups"][0]["coordinateSystem"] == "LPS"
    assert [cp["label"] for cp in markups["markups"][0]["controlPoints"]] == ["apex"]


def test_dataset_json_labels_images_and_splits(release, nnunet_dirs):
    root, truth, geometries = release
    folder = convert_quiet(root / "ct_train", [root / "apex"])
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["landmarks"] == ["apex"]
    assert dataset["labels"] == {"background": 0, "LV_blood_cavity": 1}
    assert dataset["channel_names"] == {"0": "CT"}
    assert dataset["numTraining"] == 20 and dataset["file_ending"] == ".nii.gz"
    assert dataset["landmarks_coordinate_system"] == "LPS"
    assert "landmarks_derived" not in dataset and "heatmap_encoding" not in dataset
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in CASES]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in CASES]
    assert sorted(p.name for p in (folder / "landmarksTr").iterdir()) == [f"{c}.mrk.json" for c in CASES]
    assert not (folder / "heatmapsTr").exists()
    for case in CASES:
        source_image = root / "ct_train" / f"{case}_image.nii.gz"
        assert (folder / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == source_image.read_bytes()
        source = sitk.ReadImage(str(root / "ct_train" / f"{case}_label.nii.gz"))
        label = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
        assert ImageGeometry.from_image(label).same_grid_as(geometries[case])
        assert label.GetPixelID() == sitk.sitkUInt8
        source_array, array = sitk.GetArrayFromImage(source), sitk.GetArrayFromImage(label)
        np.testing.assert_array_equal(array, (source_array == 500).astype(np.uint8))  # LV blood cavity -> 1
        assert array.sum() > 50
    check_splits(folder, nnunet_dirs, CASES)


def check_splits(folder: Path, nnunet_dirs, cases):
    splits = json.loads((folder / "splits_final.json").read_text())
    assert len(splits) == 10
    held_out = [c for fold in splits for c in fold["val"]]
    assert sorted(held_out) == sorted(cases)  # each case held out exactly once
    for fold in splits:
        assert len(fold["val"]) == len(cases) // 10 or len(fold["val"]) == len(cases) // 10 + 1
        assert not set(fold["train"]) & set(fold["val"])
        assert sorted(fold["train"] + fold["val"]) == sorted(cases)
    if len(cases) == 20:
        assert all(len(f["val"]) == 2 and len(f["train"]) == 18 for f in splits)
    preprocessed = Path(nnunet_dirs["nnUNet_preprocessed"]) / folder.name / "splits_final.json"
    assert json.loads(preprocessed.read_text()) == splits
    return splits


def test_splits_are_deterministic_across_runs(release, nnunet_dirs, tmp_path):
    root, _, _ = release
    first = json.loads((convert_quiet(root / "ct_train", [root / "apex"]) / "splits_final.json").read_text())
    # a second conversion elsewhere, and one replacing the first: the same folds
    other = convert_quiet(root / "ct_train", [root / "landmarks.csv"], raw_root=str(tmp_path / "raw2"),
                          preprocessed_root=str(tmp_path / "pre2"))
    assert json.loads((other / "splits_final.json").read_text()) == first
    again = convert_quiet(root / "ct_train", [root / "markups"], overwrite=True)
    assert json.loads((again / "splits_final.json").read_text()) == first
    # the same as nnU-Net's own seeded generator on the sorted cases
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    reference = generate_crossval_split(CASES, seed=12345, n_splits=10)
    assert [sorted(f["val"]) for f in reference] == [f["val"] for f in first]


def test_extra_landmarks_from_name_path_sources_via_the_cli(release, nnunet_dirs):
    root, truth, geometries = release
    main(["-i", str(root / "ct_train"), "-a", str(root / "apex"), f"mitral_valve={root / 'mitral_valve'}",
          "-d", "801", "--landmarks", "apex", "mitral_valve"])
    folder = Path(nnunet_dirs["nnUNet_raw"]) / DATASET
    assert json.loads((folder / "dataset.json").read_text())["landmarks"] == ["apex", "mitral_valve"]
    landmarks = read_dataset_landmarks(folder, ["apex", "mitral_valve"])
    for case in CASES:
        assert list(read_markups(folder / "landmarksTr" / f"{case}.mrk.json")) == ["apex", "mitral_valve"]
        for k, name in enumerate(["apex", "mitral_valve"]):
            assert voxel_error(geometries[case], landmarks[case][k], truth[case][name]) < 0.5


def test_extra_landmarks_from_a_csv_keep_the_requested_order(release, nnunet_dirs):
    root, truth, _ = release
    names = ["mitral_valve", "apex", "aortic_valve"]
    folder = convert_quiet(root / "ct_train", [root / "landmarks.csv"], landmark_names=names)
    assert json.loads((folder / "dataset.json").read_text())["landmarks"] == names
    for case in CASES:
        points = read_markups(folder / "landmarksTr" / f"{case}.mrk.json")
        assert list(points) == names
        for name in names:
            np.testing.assert_allclose(points[name], truth[case][name], atol=1e-9)


def test_all_structures_keeps_seven_labels_with_the_lv_cavity_first(release, nnunet_dirs):
    root, _, _ = release
    folder = convert_quiet(root / "ct_train", [root / "markups"], all_structures=True)
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    assert len(labels) == 8 and labels["background"] == 0 and labels["LV_blood_cavity"] == 1
    assert sorted(labels.values()) == list(range(8)) and set(labels) - {"background"} == set(MMWHS_STRUCTURES)
    for case in CASES[:4]:
        source = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "ct_train" / f"{case}_label.nii.gz")))
        out = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz")))
        assert set(np.unique(out).tolist()) == set(range(8))
        for name, value in MMWHS_STRUCTURES.items():
            np.testing.assert_array_equal(out == labels[name], source == value, err_msg=f"{case} {name}")
        np.testing.assert_array_equal(out == 0, source == 0)


def test_save_heatmaps_on_the_image_grid_with_the_minimum_at_the_apex(release, nnunet_dirs):
    root, truth, geometries = release
    folder = convert_quiet(root / "ct_train", [root / "landmarks.csv"], save_heatmaps=True)
    dataset = json.loads((folder / "dataset.json").read_text())
    assert HeatmapEncoding.from_dict(dataset["heatmap_encoding"]).kind == "log_distance"
    assert sorted(p.name for p in (folder / "heatmapsTr").iterdir()) == [f"{c}_apex.nii.gz" for c in CASES]
    for case in CASES:
        image = sitk.ReadImage(str(folder / "heatmapsTr" / f"{case}_apex.nii.gz"))
        geometry = geometries[case]
        assert ImageGeometry.from_image(image).same_grid_as(geometry)
        heatmap = sitk.GetArrayFromImage(image)
        assert heatmap.shape == tuple(geometry.size[::-1])
        apex_voxel = np.round(geometry.world_to_array_index(truth[case]["apex"])).astype(int)
        assert np.unravel_index(np.argmin(heatmap), heatmap.shape) == tuple(apex_voxel), case
        # the values are the encoded distance (mm) from each voxel centre to the apex
        encoding = HeatmapEncoding.from_dict(dataset["heatmap_encoding"])
        for voxel in (apex_voxel, apex_voxel + [0, 2, -3], np.array([0, 0, 0])):
            distance = np.linalg.norm(geometry.array_index_to_world(voxel.astype(float)) - truth[case]["apex"])
            assert heatmap[tuple(voxel)] == pytest.approx(float(encoding.encode(distance)), abs=1e-5)
        half_diagonal = 0.5 * np.linalg.norm(geometry.spacing)  # farthest a point can be from its nearest voxel
        assert 0.0 <= heatmap.min() <= float(encoding.encode(half_diagonal)) + 1e-6 and heatmap.max() <= 1.0


# ------------------------------------------------------------------------------------------------ bad input
def damage_label(path: Path, change):
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(change(array))
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path), useCompression=True)


def expect_error(nnunet_dirs, ct_train, annotations, file_named, message, **kwargs):
    with pytest.raises(DatasetError, match=message) as info:
        convert_quiet(ct_train, annotations, **kwargs)
    assert str(file_named) in str(info.value), str(info.value)
    assert_nothing_written(nnunet_dirs)
    return info.value


def test_case_without_annotation_is_an_error_unless_skipped(release_copy, nnunet_dirs):
    root, _, _ = release_copy
    (root / "apex" / "ct_train_1005_apex.nii.gz").unlink()
    expect_error(nnunet_dirs, root / "ct_train", [root / "apex"], root / "ct_train" / "ct_train_1005_image.nii.gz",
                 r"ct_train_1005.*no annotation for landmark\(s\) \['apex'\].*--skip-missing")
    folder = convert_quiet(root / "ct_train", [root / "apex"], skip_missing=True)
    cases = [c for c in CASES if c != "ct_train_1005"]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 19
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
    assert list(read_dataset_landmarks(folder, ["apex"])) == cases
    check_splits(folder, nnunet_dirs, cases)


def test_label_values_outside_mmwhs_are_refused(release_copy, nnunet_dirs):
    root, _, _ = release_copy
    label = root / "ct_train" / "ct_train_1013_label.nii.gz"

    def stray_421(a):  # one LA voxel off by one, as in the MM-WHS MR labels
        a[tuple(np.argwhere(a == 420)[0])] = 421
        return a

    damage_label(label, stray_421)
    error = expect_error(nnunet_dirs, root / "ct_train", [root / "apex"], label, r"label values \[421\]")
    assert "{421: 1}" in str(error)


def test_uint16_labels_are_accepted(release_copy, nnunet_dirs):
    root, _, _ = release_copy
    label = root / "ct_train" / "ct_train_1002_label.nii.gz"
    damage_label(label, lambda a: a.astype(np.uint16))
    assert sitk.ReadImage(str(label)).GetPixelID() == sitk.sitkUInt16
    folder = convert_quiet(root / "ct_train", [root / "apex"], all_structures=True)
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "ct_train_1002.nii.gz")))
    np.testing.assert_array_equal(out == 1, source == 500)
    np.testing.assert_array_equal(out == 7, source == 850)


@pytest.mark.parametrize("change", ["origin", "spacing", "size"])
def test_image_and_label_on_different_grids_are_refused(release_copy, nnunet_dirs, change):
    root, _, _ = release_copy
    label_path = root / "ct_train" / "ct_train_1008_label.nii.gz"
    label = sitk.ReadImage(str(label_path))
    if change == "origin":
        label.SetOrigin([o + 3.0 for o in label.GetOrigin()])
    elif change == "spacing":
        label.SetSpacing([s * 1.05 for s in label.GetSpacing()])
    else:
        label = label[:, :, :-1]
    sitk.WriteImage(label, str(label_path), useCompression=True)
    expect_error(nnunet_dirs, root / "ct_train", [root / "apex"], label_path, r"grid differs from the image")


def test_apex_outside_the_image_or_far_from_the_lv_is_refused(release_copy, nnunet_dirs):
    root, truth, geometries = release_copy
    table = {c: {"apex": p["apex"]} for c, p in truth.items()}
    csv_path = root / "moved.csv"
    # outside: 1 m to the left
    table["ct_train_1011"] = {"apex": truth["ct_train_1011"]["apex"] + np.array([1000.0, 0, 0])}
    write_landmark_csv(csv_path, table)
    expect_error(nnunet_dirs, root / "ct_train", [csv_path], csv_path,
                 r"landmark 'apex' of ct_train_1011 .* lies outside the image")
    # inside the image but far from the LV: a voxel near a corner of the image
    geometry = geometries["ct_train_1011"]
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "ct_train" / "ct_train_1011_label.nii.gz")))
    lv = geometry.array_index_to_world(np.argwhere(np.isin(label, (500, 205))).astype(float))
    corner = None
    for index in ([2, 2, 2], [45, 2, 2], [2, 45, 2], [2, 2, 37], [45, 45, 37], [45, 45, 2]):
        point = geometry.index_to_world(index)
        if np.linalg.norm(lv - point, axis=1).min() > 40:
            corner = point
            break
    assert corner is not None
    table["ct_train_1011"] = {"apex": corner}
    write_landmark_csv(csv_path, table)
    expect_error(nnunet_dirs, root / "ct_train", [csv_path], csv_path,
                 r"apex of ct_train_1011 lies \d+\.\d mm from the LV .*more than 30 mm")


@pytest.mark.parametrize("which", ["image_garbage", "image_truncated", "image_nii_truncated", "label_truncated",
                                   "label_garbage", "mask_garbage", "markups_garbage", "csv_nan"])
def test_unreadable_files_are_refused_before_anything_is_written(release_copy, nnunet_dirs, which):
    root, _, _ = release_copy
    case = "ct_train_1017"
    sources = [root / "apex"]
    if which == "image_garbage":
        bad = root / "ct_train" / f"{case}_image.nii.gz"
        bad.write_bytes(b"garbage" * 100)
        message = r"cannot read the image header"
    elif which == "image_truncated":
        # a gzip cut short: the header reads, the voxels do not
        bad = root / "ct_train" / f"{case}_image.nii.gz"
        raw = gzip.decompress(bad.read_bytes())
        bad.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
        assert ImageGeometry.from_file(bad).size == (48, 48, 40)  # the header still reads
        message = r"truncated"
    elif which == "image_nii_truncated":
        source = root / "ct_train" / f"{case}_image.nii.gz"
        bad = root / "ct_train" / f"{case}_image.nii"
        raw = gzip.decompress(source.read_bytes())
        bad.write_bytes(raw[: len(raw) - 1000])
        source.unlink()
        message = r"truncated: \d+ bytes where the header needs \d+"
    elif which == "label_truncated":
        # ITK would read this label with its last slices zero-filled, losing LV voxels silently
        bad = root / "ct_train" / f"{case}_label.nii.gz"
        data = bad.read_bytes()
        bad.write_bytes(data[: int(len(data) * 0.8)])
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(bad))).shape == (40, 48, 48)  # ITK does not notice
        message = r"truncated"
    elif which == "label_garbage":
        bad = root / "ct_train" / f"{case}_label.nii.gz"
        bad.write_bytes(b"\x1f\x8b not really gzip")
        message = r"cannot read the image header"
    elif which == "mask_garbage":
        bad = root / "apex" / f"{case}_apex.nii.gz"
        bad.write_bytes(b"garbage")
        message = r"cannot read the mask"
    elif which == "markups_garbage":
        sources = [root / "markups"]
        bad = root / "markups" / f"{case}.mrk.json"
        bad.write_text("{\"markups\": [")
        message = r"cannot read as Slicer markups JSON"
    else:
        bad = root / "landmarks.csv"
        lines = bad.read_text().splitlines()
        row = next(i for i, line in enumerate(lines) if line.startswith(f"{case},apex,"))
        lines[row] = f"{case},apex,nan," + ",".join(lines[row].split(",")[3:])
        bad.write_text("\n".join(lines) + "\n")
        sources = [bad]
        message = r"NaN"
    expect_error(nnunet_dirs, root / "ct_train", sources, bad, message)


def test_cli_reports_errors_without_a_traceback(release_copy, nnunet_dirs, capsys):
    root, _, _ = release_copy
    bad = root / "broken.csv"
    bad.write_text("case,name,x,y,z\nct_train_1001,apex,1,2,nan\n")
    with pytest.raises(SystemExit) as info:
        main(["-i", str(root / "ct_train"), "-a", str(bad), "-d", "801"])
    assert str(info.value.code).startswith("nnUNetv2_convert_MMWHS: error: ")
    assert str(bad) in str(info.value.code) and "NaN" in str(info.value.code)
    with pytest.raises(SystemExit) as info:
        main(["-i", str(root / "ct_train"), "-a", str(root / "nowhere"), "-d", "801"])
    assert "annotation path does not exist" in str(info.value.code)
    with pytest.raises(SystemExit) as info:
        main(["-i", str(root / "ct_train"), "-a", str(root / "apex"), "-d", "801", "--landmarks", "apex", "apex"])
    assert "unique" in str(info.value.code)
    assert_nothing_written(nnunet_dirs)


def test_installed_console_script(release_copy, nnunet_dirs):
    """The entry point users type: converts, and fails with a one-line error (exit code 1, no traceback)."""
    root, truth, geometries = release_copy
    (root / "apex" / "ct_train_1009_apex.nii.gz").unlink()
    failed = run_cli(["nnUNetv2_convert_MMWHS", "-i", str(root / "ct_train"), "-a", str(root / "apex"), "-d", "801"],
                     env=nnunet_dirs, timeout=300, check=False)
    assert failed.returncode == 1
    assert "nnUNetv2_convert_MMWHS: error:" in failed.stderr and "ct_train_1009" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert_nothing_written(nnunet_dirs)
    run_cli(["nnUNetv2_convert_MMWHS", "-i", str(root / "ct_train"), "-a", str(root / "apex"), "-d", "801",
             "--skip-missing"], env=nnunet_dirs, timeout=300)
    folder = Path(nnunet_dirs["nnUNet_raw"]) / DATASET
    landmarks = read_dataset_landmarks(folder, ["apex"])
    assert list(landmarks) == [c for c in CASES if c != "ct_train_1009"]
    assert max(voxel_error(geometries[c], p[0], truth[c]["apex"]) for c, p in landmarks.items()) < 0.5


# ------------------------------------------------------------------------------------- bad input (issue #2)
def rewrite_image(path: Path, change) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    array = change(sitk.GetArrayFromImage(image).astype(np.float32))
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path), useCompression=True)
    return array


@pytest.mark.parametrize("how", ["a_few", "all"])
def test_nan_or_infinite_image_voxels_are_refused(release_copy, nnunet_dirs, how):
    root, _, _ = release_copy
    path = root / "ct_train" / "ct_train_1006_image.nii.gz"

    def damage(a):
        if how == "a_few":
            a[3, 4, 5] = a[10, 20, 30] = np.nan
            a[0, 0, 0] = -np.inf
        else:
            a[:] = np.inf
        return a

    array = rewrite_image(path, damage)
    count = 3 if how == "a_few" else array.size
    expect_error(nnunet_dirs, root / "ct_train", [root / "apex"], path,
                 rf"{count} of {array.size} voxels are NaN or infinite")


def test_image_values_that_are_not_hu_give_a_warning(release_copy, nnunet_dirs, capsys):
    root, _, _ = release_copy
    path = root / "ct_train" / "ct_train_1006_image.nii.gz"
    rewrite_image(path, lambda a: (a - a.min()) / (a.max() - a.min()))  # normalised to [0, 1]
    convert_quiet(root / "ct_train", [root / "apex"])
    err = capsys.readouterr().err
    assert err.count("do not look like CT in Hounsfield units") == 1, err  # the other 19 images are HU
    assert re.search(re.escape(str(path)) + r": values 0 to 1 do not look like CT", err), err


@pytest.mark.parametrize("name", ["mitral_valve", "aortic_valve"])
def test_valve_given_in_ras_is_refused_although_inside_the_image(release_copy, nnunet_dirs, name):
    root, truth, geometries = release_copy
    # RAS read as LPS negates x and y: the first case where that lands inside the image, 70-130 mm away
    case = next(c for c in CASES if geometries[c].contains_world_point(truth[c][name] * [-1, -1, 1])
                and 70 <= np.linalg.norm(truth[c][name] * [-2, -2, 0]) <= 130)
    table = {c: {"apex": truth[c]["apex"], name: truth[c][name]} for c in CASES}
    table[case][name] = truth[case][name] * [-1, -1, 1]
    csv_path = root / "ras.csv"
    write_landmark_csv(csv_path, table)
    expect_error(nnunet_dirs, root / "ct_train", [csv_path], csv_path,
                 rf"the {name} of {case} lies \d+\.\d mm from the LV-cavity/\S+ interface .*more than 20 mm.*RAS",
                 landmark_names=["apex", name])


def test_any_landmark_far_from_the_heart_is_refused(release_copy, nnunet_dirs):
    """A landmark with a name the converter has no structure for is still checked against the labelled heart."""
    root, truth, geometries = release_copy
    case = "ct_train_1011"
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "ct_train" / f"{case}_label.nii.gz")))
    heart = geometries[case].array_index_to_world(np.argwhere(label > 0).astype(float))
    corner = next(p for p in geometries[case].index_to_world(np.array([[1, 1, 1], [46, 1, 1], [1, 46, 1], [1, 1, 38],
                                                                        [46, 46, 38], [46, 46, 1]], dtype=float))
                  if np.linalg.norm(heart - p, axis=1).min() > 35)
    table = {c: {"apex": truth[c]["apex"], "pulmonary_valve": truth[c]["apex"]} for c in CASES}
    table[case]["pulmonary_valve"] = corner
    csv_path = root / "other.csv"
    write_landmark_csv(csv_path, table)
    expect_error(nnunet_dirs, root / "ct_train", [csv_path], csv_path,
                 rf"the pulmonary_valve of {case} lies \d+\.\d mm from the labelled heart .*more than 30 mm",
                 landmark_names=["apex", "pulmonary_valve"])


@pytest.mark.parametrize("problem", ["raw_is_a_file", "raw_under_a_file", "preprocessed_read_only"])
def test_unwritable_nnunet_folders_are_refused_before_reading_the_cases(release, nnunet_dirs, tmp_path, monkeypatch,
                                                                       problem):
    root, _, _ = release

    def not_yet(*args, **kwargs):
        raise AssertionError("the cases were read before the output folders were checked")

    monkeypatch.setattr(convert_mmwhs, "collect_inputs", not_yet)
    kwargs = {}
    if problem == "raw_is_a_file":
        variable, folder = "nnUNet_raw", tmp_path / "raw_file"
        folder.write_text("not a folder")
        kwargs["raw_root"] = str(folder)
        message = "is not a folder"
    elif problem == "raw_under_a_file":
        variable, folder = "nnUNet_raw", tmp_path / "raw_file" / "nnUNet_raw"
        folder.parent.write_text("not a folder")
        kwargs["raw_root"] = str(folder)
        message = "is not a folder"
    else:
        variable, folder = "nnUNet_preprocessed", Path(nnunet_dirs["nnUNet_preprocessed"])
        folder.chmod(0o555)
        if os.geteuid() == 0:  # root writes anywhere: judge by the permission bits, as for any other user
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and (
                not mode & os.W_OK or bool(os.stat(p).st_mode & 0o200)))
        message = "the folder is not writable"
    try:
        with pytest.raises(DatasetError, match=message) as info:
            convert_quiet(root / "ct_train", [root / "apex"], **kwargs)
    finally:
        folder.chmod(0o755) if folder.is_dir() else None
    assert f"{variable}={folder}" in str(info.value), str(info.value)
    assert_nothing_written(nnunet_dirs)


def test_label_without_its_image_is_reported_with_near_names(release_copy, nnunet_dirs, capsys):
    root, _, _ = release_copy
    (root / "ct_train" / "ct_train_1004_image.nii.gz").rename(root / "ct_train" / "ct_train_1004_img.nii.gz")
    label = root / "ct_train" / "ct_train_1004_label.nii.gz"
    expect_error(nnunet_dirs, root / "ct_train", [root / "apex"], label,
                 r"no image ct_train_1004_image.nii.gz beside it \(files there with a similar name: "
                 r"\['ct_train_1004_img.nii.gz'\]\); rename.*--skip-missing")
    folder = convert_quiet(root / "ct_train", [root / "apex"], skip_missing=True)
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 19
    assert "skipping ct_train_1004: " + str(label) in capsys.readouterr().err


def test_annotations_for_unknown_or_misspelt_cases_are_reported(release_copy, nnunet_dirs, capsys):
    root, truth, _ = release_copy
    # a misspelt case name (l for 1): the case finds no annotation, and the error shows what the CSV holds
    misspelt = root / "misspelt.csv"
    write_landmark_csv(misspelt, {("ct_train_l003" if c == "ct_train_1003" else c): {"apex": truth[c]["apex"]}
                                  for c in CASES})
    expect_error(nnunet_dirs, root / "ct_train", [misspelt], misspelt,
                 r"ct_train_1003 .*no annotation .* holds 20 case\(s\) .*the nearest to ct_train_1003: "
                 r"\['ct_train_l003'")
    # rows for a case that is not in ct_train: converted, with a warning that names them
    extra = root / "extra.csv"
    write_landmark_csv(extra, {**{c: {"apex": truth[c]["apex"]} for c in CASES},
                               "ct_train_1100": {"apex": truth["ct_train_1001"]["apex"]}})
    capsys.readouterr()
    convert_quiet(root / "ct_train", [extra])
    err = capsys.readouterr().err
    assert f"{extra} holds annotations for 1 case(s) not in the images folder, ignored: ct_train_1100" in err, err


def test_markups_with_slicers_default_labels_name_the_file_and_its_labels(release_copy, nnunet_dirs):
    root, truth, _ = release_copy
    bad = root / "markups" / "ct_train_1003.mrk.json"
    write_markups(bad, {"F-1": truth["ct_train_1003"]["apex"], "F-2": truth["ct_train_1003"]["mitral_valve"]})
    expect_error(nnunet_dirs, root / "ct_train", [root / "markups"], bad,
                 r"ct_train_1003 .*no annotation for landmark\(s\) \['apex'\].*holds control points labelled "
                 r"\['F-1', 'F-2'\] \(Slicer's default labels\); label each point with its landmark name")


def test_grid_that_differs_only_in_direction_shows_both_directions(release_copy, nnunet_dirs):
    root, _, geometries = release_copy
    path = root / "ct_train" / "ct_train_1008_label.nii.gz"
    label = sitk.ReadImage(str(path))
    direction = np.asarray(label.GetDirection()).reshape(3, 3) @ np.diag([1.0, 1.0, -1.0])
    label.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(label, str(path), useCompression=True)
    error = expect_error(nnunet_dirs, root / "ct_train", [root / "apex"], path, r"grid differs from the image")
    image_direction = np.round(geometries["ct_train_1008"].direction, 4).tolist()
    assert f"direction {np.round(direction.ravel(), 4).tolist()}" in str(error)
    assert f"direction {image_direction}" in str(error)


def test_too_few_cases_for_the_folds_mention_the_option(release, nnunet_dirs, tmp_path):
    root, _, _ = release
    ct_train = tmp_path / "ct_train"
    ct_train.mkdir()
    for case in CASES[:3]:
        for kind in ("image", "label"):
            shutil.copyfile(root / "ct_train" / f"{case}_{kind}.nii.gz", ct_train / f"{case}_{kind}.nii.gz")
    with pytest.raises(SystemExit, match=r"cannot make 10 folds from 3 case\(s\) in .*; pass --folds N with "
                                         r"2 <= N <= 3"):
        main(["-i", str(ct_train), "-a", str(root / "apex"), "-d", "801"])
    assert_nothing_written(nnunet_dirs)
    main(["-i", str(ct_train), "-a", str(root / "apex"), "-d", "801", "--folds", "3"])


def test_dataset_id_used_by_another_name_says_how_to_proceed(release, nnunet_dirs):
    root, _, _ = release
    folder = convert_quiet(root / "ct_train", [root / "apex"])
    before = {p: sha256(p) for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as info:
        main(["-i", str(root / "ct_train"), "-a", str(root / "apex"), "-d", "801", "--name", "Other"])
    message = str(info.value.code)
    assert "801 is already used by ['Dataset801_MMWHS_LVApex']" in message
    assert "choose a free id with -d" in message and "--name MMWHS_LVApex" in message and "--overwrite" in message
    assert {p: sha256(p) for p in folder.rglob("*") if p.is_file()} == before


def test_dataset_id_used_in_preprocessed_by_another_name_is_refused(release, nnunet_dirs):
    """nnU-Net looks an id up in nnUNet_preprocessed too, and refuses two names for one id there."""
    root, _, _ = release
    other = Path(nnunet_dirs["nnUNet_preprocessed"]) / "Dataset801_Other"
    other.mkdir()
    with pytest.raises(DatasetError, match=r"801 is already used by \['Dataset801_Other'\] in .*nnUNet_preprocessed"
                                           r".*--name Other"):
        convert_quiet(root / "ct_train", [root / "apex"])
    assert os.listdir(nnunet_dirs["nnUNet_raw"]) == [] and os.listdir(other) == []


# ------------------------------------------------------------------------------------------ existing / interrupted
def test_existing_dataset_is_never_overwritten_without_overwrite(release, nnunet_dirs):
    root, _, _ = release
    folder = convert_quiet(root / "ct_train", [root / "apex"])
    marker = folder / "my_notes.txt"
    marker.write_text("keep me")
    before = {p: sha256(p) for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=re.escape(str(folder)) + ".*--overwrite"):
        convert_quiet(root / "ct_train", [root / "landmarks.csv"], all_structures=True)
    with pytest.raises(SystemExit, match="already exists"):
        main(["-i", str(root / "ct_train"), "-a", str(root / "markups"), "-d", "801"])
    assert {p: sha256(p) for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(nnunet_dirs["nnUNet_raw"])) == [DATASET]
    # with --overwrite it is replaced as a whole
    convert_quiet(root / "ct_train", [root / "landmarks.csv"], all_structures=True, overwrite=True)
    assert not marker.exists()
    assert len(json.loads((folder / "dataset.json").read_text())["labels"]) == 8
    assert sorted(os.listdir(nnunet_dirs["nnUNet_raw"])) == [DATASET]
    # another dataset under the same id is refused
    with pytest.raises(DatasetError, match="801 is already used"):
        convert(str(root / "ct_train"), [str(root / "apex")], 801, dataset_name="Other")


def test_different_splits_already_in_preprocessed_are_not_replaced(release, nnunet_dirs):
    root, _, _ = release
    target = Path(nnunet_dirs["nnUNet_preprocessed"]) / DATASET / "splits_final.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps([{"train": CASES[:10], "val": CASES[10:]}]))
    with pytest.raises(FileExistsError, match=re.escape(str(target))):
        convert_quiet(root / "ct_train", [root / "apex"])
    assert os.listdir(nnunet_dirs["nnUNet_raw"]) == []
    assert len(json.loads(target.read_text())) == 1
    convert_quiet(root / "ct_train", [root / "apex"], overwrite=True)
    assert len(json.loads(target.read_text())) == 10


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_interrupted_conversion_leaves_nothing_behind(release, nnunet_dirs, monkeypatch, exception):
    root, _, _ = release
    calls = []
    real_write_label = convert_mmwhs.write_label

    def failing_write_label(*args, **kwargs):
        calls.append(args)
        if len(calls) == 5:
            raise exception("disk full (simulated)")
        return real_write_label(*args, **kwargs)

    monkeypatch.setattr(convert_mmwhs, "write_label", failing_write_label)
    with pytest.raises(exception, match="simulated"):
        convert_quiet(root / "ct_train", [root / "apex"])
    assert len(calls) == 5
    assert_nothing_written(nnunet_dirs)  # no dataset, no hidden partial folder, no splits


def test_interrupted_overwrite_keeps_the_old_dataset(release, nnunet_dirs, monkeypatch):
    root, _, _ = release
    folder = convert_quiet(root / "ct_train", [root / "apex"])
    before = {p: sha256(p) for p in folder.rglob("*") if p.is_file()}
    calls = []

    def failing_write_label(*args, **kwargs):
        calls.append(args)
        if len(calls) == 5:
            raise RuntimeError("simulated")

    monkeypatch.setattr(convert_mmwhs, "write_label", failing_write_label)
    with pytest.raises(RuntimeError):
        convert_quiet(root / "ct_train", [root / "markups"], all_structures=True, overwrite=True)
    assert {p: sha256(p) for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(nnunet_dirs["nnUNet_raw"])) == [DATASET]


def test_uncompressed_nifti_input_becomes_nii_gz(release_copy, nnunet_dirs):
    """dataset.json says .nii.gz, so a .nii image must arrive as .nii.gz (same bytes inside) or nnU-Net misses it."""
    root, _, _ = release_copy
    for case in CASES[:20]:
        source = root / "ct_train" / f"{case}_image.nii.gz"
        (root / "ct_train" / f"{case}_image.nii").write_bytes(gzip.decompress(source.read_bytes()))
        source.unlink()
    folder = convert_quiet(root / "ct_train", [root / "apex"])
    for case in CASES:
        copied = folder / "imagesTr" / f"{case}_0000.nii.gz"
        assert gzip.decompress(copied.read_bytes()) == (root / "ct_train" / f"{case}_image.nii").read_bytes()
    assert not list((folder / "imagesTr").glob("*.nii"))


# ---------------------------------------------------------------------------------------- real MM-WHS labels
REAL = {"ct_train_1002": 239, "ct_train_1005": 177}


@pytest.fixture(scope="module")
def real_labels():
    out = {}
    for case, slices in REAL.items():
        path = shared_data("mmwhs_ct_labels", f"{case}_label.nii.gz")
        image = sitk.ReadImage(str(path))
        out[case] = (path, image, sitk.GetArrayFromImage(image), ImageGeometry.from_image(image))
    return out


def test_real_labels_headers_and_derived_apex(real_labels):
    for case, (path, image, array, geometry) in real_labels.items():
        assert geometry.size == (512, 512, REAL[case])
        np.testing.assert_allclose(geometry.spacing, (0.4883, 0.4883, 0.625), atol=1e-4)
        np.testing.assert_allclose(geometry.direction_matrix, np.diag([1.0, -1.0, 1.0]), atol=1e-6)
        assert set(np.unique(array).tolist()) == {0, 205, 420, 500, 550, 600, 820, 850}
        apex, mitral = derive_apex(array, geometry)
        d = apex - mitral
        assert d[0] > 0 and d[1] < 0 and d[2] < 0, f"{case}: apex - mitral valve = {d}"
        assert 60.0 <= np.linalg.norm(d) <= 110.0, f"{case}: {np.linalg.norm(d):.1f} mm"
        # the apex is an LV cavity voxel centre; the mitral valve lies between LV cavity and LA
        index = geometry.world_to_array_index(apex)
        np.testing.assert_allclose(index, np.round(index), atol=1e-6)
        assert array[tuple(np.round(index).astype(int))] == 500
        mitral_voxel = tuple(np.round(geometry.world_to_array_index(mitral)).astype(int))
        window = array[tuple(slice(i - 8, i + 9) for i in mitral_voxel)]
        assert (window == 500).any() and (window == 420).any()


def test_derive_apex_ignores_stray_lv_voxels(real_labels):
    """Real MM-WHS labels hold single stray 500 voxels; one far away must not become the apex."""
    path, image, array, geometry = real_labels["ct_train_1005"]
    apex, mitral = derive_apex(array, geometry)
    stray = array.copy()
    far = (array.shape[0] - 3, 5, 5)  # a corner, ~200 mm from the heart
    assert stray[far] == 0
    stray[far] = 500
    apex2, mitral2 = derive_apex(stray, geometry)
    np.testing.assert_allclose(apex2, apex)
    np.testing.assert_allclose(mitral2, mitral)
    with pytest.raises(DatasetError, match="no LA"):
        derive_apex(np.where(array == 420, 0, array), geometry)


def test_full_converter_on_real_labels_with_derived_apex(real_labels, nnunet_dirs, tmp_path):
    ct_train = tmp_path / "ct_train"
    ct_train.mkdir()
    empty_annotations = tmp_path / "no_annotations"
    empty_annotations.mkdir()
    for case, (path, label, array, geometry) in real_labels.items():
        shutil.copyfile(path, ct_train / f"{case}_label.nii.gz")
        hu = np.full(array.shape, -60, dtype=np.int16)
        hu[array > 0] = 420
        hu[array == 205] = 110
        image = sitk.GetImageFromArray(hu)
        image.CopyInformation(label)  # exactly the label's grid
        sitk.WriteImage(image, str(ct_train / f"{case}_image.nii.gz"), useCompression=True)
    # without --derive-apex there is no annotation
    with pytest.raises(SystemExit, match="no annotation"):
        main(["-i", str(ct_train), "-a", str(empty_annotations), "-d", "801", "--folds", "2"])
    assert_nothing_written(nnunet_dirs)
    main(["-i", str(ct_train), "-a", str(empty_annotations), "-d", "801", "--folds", "2", "--derive-apex",
          "--all-structures"])
    folder = Path(nnunet_dirs["nnUNet_raw"]) / DATASET
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["landmarks_derived"] == {case: ["apex"] for case in REAL}
    assert dataset["labels"]["LV_blood_cavity"] == 1
    splits = json.loads((folder / "splits_final.json").read_text())
    assert sorted(c for s in splits for c in s["val"]) == sorted(REAL)
    for case, (path, label, array, geometry) in real_labels.items():
        out_image = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
        out_geometry = ImageGeometry.from_image(out_image)
        assert out_geometry.same_grid_as(geometry)
        np.testing.assert_allclose(out_geometry.direction_matrix, np.diag([1.0, -1.0, 1.0]), atol=1e-6)
        out = sitk.GetArrayFromImage(out_image)
        for name, value in MMWHS_STRUCTURES.items():
            assert int((out == dataset["labels"][name]).sum()) == int((array == value).sum()), f"{case} {name}"
        markups = json.loads((folder / "landmarksTr" / f"{case}.mrk.json").read_text())
        point = markups["markups"][0]["controlPoints"][0]
        assert point["label"] == "apex" and point["description"] == "derived from labels"
        np.testing.assert_allclose(point["position"], derive_apex(array, geometry)[0], atol=1e-9)


# ----------------------------------------------------------------------------------- stock nnU-Net accepts it
TRAINER_SCRIPT = r"""
import json, sys
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, join
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
folder = join(nnUNet_preprocessed, sys.argv[1])
plans = load_json(join(folder, "nnUNetResEncUNetMPlans.json"))
dataset_json = load_json(join(folder, "dataset.json"))
out = {}
for fold in range(10):
    plans["continue_training"] = False  # nnunetv2 2.8 run_training puts this into the plans before construction
    trainer = nnUNetTrainer(plans, "3d_fullres", fold, dataset_json, device=torch.device("cpu"))
    train, val = trainer.do_split()
    out[fold] = [sorted(train), sorted(val)]
print("SPLITS" + json.dumps(out))
"""


@pytest.mark.slow
def test_stock_nnunet_plans_preprocesses_and_sees_the_ten_folds(release, nnunet_dirs):
    root, _, _ = release
    folder = convert_quiet(root / "ct_train", [root / "apex"])
    splits = json.loads((folder / "splits_final.json").read_text())
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", "801", "-pl", "nnUNetPlannerResEncM", "-c", "3d_fullres",
             "-np", "1", "--verify_dataset_integrity"],
            # one worker for fingerprinting and verifying too (default 8): on 2 cores, 8 spawned workers each
            # importing torch took minutes for 20 tiny cases
            env={**nnunet_dirs, "nnUNet_def_n_proc": "1"}, timeout=600)
    preprocessed = Path(nnunet_dirs["nnUNet_preprocessed"]) / DATASET
    assert (preprocessed / "nnUNetResEncUNetMPlans.json").is_file()
    assert json.loads((preprocessed / "splits_final.json").read_text()) == splits
    # "landmarks" survives into the preprocessed dataset.json (the trainer reads it from there)
    assert json.loads((preprocessed / "dataset.json").read_text())["landmarks"] == ["apex"]
    result = subprocess.run([sys.executable, "-c", TRAINER_SCRIPT, DATASET], env={**os.environ, **nnunet_dirs},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    folds = json.loads(result.stdout.split("SPLITS", 1)[1])
    assert len(folds) == 10
    for fold in ("0", "9"):
        train, val = folds[fold]
        assert len(train) == 18 and len(val) == 2 and not set(train) & set(val)
    assert sorted(c for f in folds.values() for c in f[1]) == CASES
    assert [f[1] for f in folds.values()] == [s["val"] for s in splits]
