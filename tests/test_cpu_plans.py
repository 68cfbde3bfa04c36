"""The small CPU configuration added to nnU-Net plans: it inherits the base configuration's data, changes only the
patch, batch and network, and is refused where the network cannot divide the patch."""
from __future__ import annotations

import json

import pytest

from nnunet_landmark.cpu_plans import add_small_configuration, patch_size_for, small_configuration

BASE = {"configurations": {"3d_fullres": {"patch_size": [128, 128, 128], "batch_size": 2, "spacing": [1, 1, 1],
                                          "architecture": {"network_class_name": "ResidualEncoderUNet",
                                                           "arch_kwargs": {"n_stages": 6, "n_blocks_per_stage": [1] * 6,
                                                                           "features_per_stage": [32] * 6}}}}}


def test_small_configuration_inherits_and_resizes(tmp_path):
    small = small_configuration(BASE, patch_size=(32, 24, 40), features_per_stage=(8, 16, 32, 64), batch_size=3)
    assert small["inherits_from"] == "3d_fullres" and small["patch_size"] == [32, 24, 40] and small["batch_size"] == 3
    kwargs = small["architecture"]["arch_kwargs"]
    assert kwargs["n_stages"] == 4 and kwargs["features_per_stage"] == [8, 16, 32, 64]
    assert kwargs["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 3 and kwargs["n_blocks_per_stage"] == [1] * 4
    assert BASE["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_stages"] == 6  # base untouched
    with pytest.raises(ValueError, match="divisible by 8"):
        small_configuration(BASE, patch_size=(30, 32, 32))
    with pytest.raises(ValueError, match="no configuration '2d'"):
        small_configuration(BASE, base="2d")
    plans_file = tmp_path / "plans.json"
    plans_file.write_text(json.dumps(BASE))
    add_small_configuration(plans_file, name="3d_cpu", patch_size=(16, 16, 16), features_per_stage=(4, 8))
    written = json.loads(plans_file.read_text())["configurations"]
    assert sorted(written) == ["3d_cpu", "3d_fullres"] and written["3d_cpu"]["patch_size"] == [16, 16, 16]


def test_patch_size_covers_the_median_image():
    assert patch_size_for([40, 45, 50]) == [40, 48, 56]
    assert patch_size_for([40, 45, 50], fraction=0.5) == [24, 24, 32]
