"""Writing an nnU-Net landmark dataset: names, folds, dataset.json, a staged folder that appears in one step, the
landmarks beside the images, and splits that are never silently replaced."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nnunet_landmark.raw_dataset import (DatasetError, dataset_folder_name, install_splits, kfold_splits,
                                         make_dataset_json, read_dataset_landmarks, staged_dataset_folder,
                                         write_case_landmarks)


def test_folder_names_and_folds():
    assert dataset_folder_name(7, "MMWHS") == "Dataset007_MMWHS"
    for bad in ((0, "x"), (1000, "x"), (5, "a b"), (5, "a/b"), (5, "")):
        with pytest.raises(DatasetError):
            dataset_folder_name(*bad)
    cases = [f"case_{i:02d}" for i in range(20)]
    splits = kfold_splits(list(reversed(cases)), 10)
    assert splits == kfold_splits(cases, 10)  # deterministic, whatever the order given
    assert sorted(c for s in splits for c in s["val"]) == cases  # each case held out once
    assert all(len(s["val"]) == 2 and not set(s["val"]) & set(s["train"]) for s in splits)
    with pytest.raises(DatasetError, match="cannot make 21 folds from 20 cases"):
        kfold_splits(cases, 21)
    dataset = make_dataset_json({"0": "CT"}, {"background": 0, "LV": 1}, 20, ["apex", "mitral_valve"])
    assert dataset["landmarks"] == ["apex", "mitral_valve"] and dataset["numTraining"] == 20


def test_a_staged_folder_appears_in_one_step_and_a_failure_leaves_the_old_one(tmp_path):
    final = tmp_path / "Dataset001_X"
    with staged_dataset_folder(final) as staging:
        (staging / "a.txt").write_text("first")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "first"
    with pytest.raises(FileExistsError, match="--overwrite"):
        with staged_dataset_folder(final):
            pass
    with pytest.raises(RuntimeError):
        with staged_dataset_folder(final, overwrite=True) as staging:
            (staging / "a.txt").write_text("second")
            raise RuntimeError("interrupted")
    assert (final / "a.txt").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == [final.name]
    with staged_dataset_folder(final, overwrite=True) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_landmarks_round_trip_and_every_problem_is_listed(tmp_path):
    write_case_landmarks(tmp_path, "c1", {"apex": [1.0, 2.0, 3.0], "mitral_valve": [4.0, 5.0, 6.0]})
    write_case_landmarks(tmp_path, "c2", {"apex": [7.0, 8.0, 9.0]})
    read = read_dataset_landmarks(tmp_path, ["mitral_valve", "apex"], ["c1"])
    np.testing.assert_array_equal(read["c1"], [[4, 5, 6], [1, 2, 3]])  # in the names' order
    with pytest.raises(DatasetError, match=r"2 case\(s\):\n.*c2\.mrk\.json: lacks landmark\(s\) \['mitral_valve'\]"
                                           r".*\n.*c3\.mrk\.json: missing"):
        read_dataset_landmarks(tmp_path, ["apex", "mitral_valve"], ["c1", "c2", "c3"])


def test_splits_are_never_silently_replaced(tmp_path):
    splits = [{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]
    target = install_splits(splits, tmp_path)
    assert json.loads(target.read_text()) == splits
    install_splits(splits, tmp_path)  # the same again is fine
    with pytest.raises(FileExistsError, match="different splits"):
        install_splits(splits[::-1], tmp_path)
    install_splits(splits[::-1], tmp_path, overwrite=True)
    assert json.loads(target.read_text()) == splits[::-1]
