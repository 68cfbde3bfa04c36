"""On-disk conventions: landmark-name validation, atomic writes, the names every module uses."""
import json
import os

import pytest

from nnunet_landmark import layout
from nnunet_landmark.landmark_heads import landmark_names_from_dataset_json
from nnunet_landmark.raw_dataset import DatasetError, make_dataset_json


@pytest.mark.parametrize("names, message", [
    ([], "no landmark names"),
    (["apex", "apex"], "['apex'] given more than once"),
    (["apex", ""], "invalid landmark name(s) ['']"),
    (["mitral,valve"], "invalid landmark name(s) ['mitral,valve']"),
    (["a/b"], "invalid landmark name(s) ['a/b']"),
    (["apex", 3], "invalid landmark name(s) [3]"),
])
def test_bad_landmark_names_are_refused_the_same_way_everywhere(names, message):
    with pytest.raises(ValueError) as e:
        layout.check_landmark_names(names, "somewhere.json")
    assert str(e.value).startswith("somewhere.json") and message in str(e.value)
    with pytest.raises(DatasetError, match="dataset.json"):
        make_dataset_json({"0": "CT"}, {"background": 0, "LV": 1}, 1, names)
    with pytest.raises(RuntimeError, match="dataset.json"):
        landmark_names_from_dataset_json({"landmarks": names})


def test_good_names_pass_unchanged():
    names = ["apex", "mitral valve", "aortic_valve-2"]
    assert layout.check_landmark_names(names, "x") == tuple(names)
    assert landmark_names_from_dataset_json({"landmarks": names}) == tuple(names)


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    layout.atomic_write_json({"a": [1, 2]}, target)
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]
    with pytest.raises(TypeError):
        layout.atomic_write_json({"a": object()}, target)  # not serialisable: the old file stays whole
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]


def test_markups_paths_round_trip(tmp_path):
    path = layout.markups_path(tmp_path, "ct_train_1001")
    assert path == tmp_path / "ct_train_1001.mrk.json"
    assert layout.case_of_markups(path) == "ct_train_1001"
