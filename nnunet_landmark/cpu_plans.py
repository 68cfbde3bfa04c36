"""Add a small configuration to nnU-Net plans, for CPU runs (tests, the demo, the accuracy study).

The new configuration inherits from an existing one (normally ``3d_fullres``) and therefore reuses its
preprocessed data; only the patch size, batch size and network width/depth change. It is trained and
predicted with the stock commands, e.g. ``nnUNetv2_train 801 3d_cpu 0 -tr nnUNetTrainerLandmark ...``.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from nnunet_landmark.layout import atomic_write_json


def small_configuration(plans: dict, base: str = "3d_fullres", patch_size: Sequence[int] = (32, 32, 32),
                        features_per_stage: Sequence[int] = (16, 32, 64, 128), batch_size: int = 2) -> dict:
    """A configuration dict inheriting from ``base`` with a smaller patch and network."""
    if base not in plans["configurations"]:
        raise ValueError(f"plans have no configuration {base!r}: {sorted(plans['configurations'])}")
    architecture = json.loads(json.dumps(plans["configurations"][base]["architecture"]))
    kwargs = architecture["arch_kwargs"]
    n = len(features_per_stage)
    divisor = 2 ** (n - 1)
    if any(p % divisor for p in patch_size):
        raise ValueError(f"patch size {tuple(patch_size)} must be divisible by {divisor} for {n} stages")
    kwargs.update(n_stages=n, features_per_stage=list(features_per_stage), kernel_sizes=[[3, 3, 3]] * n,
                  strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1), n_conv_per_stage_decoder=[1] * (n - 1))
    if "n_blocks_per_stage" in kwargs:  # ResidualEncoderUNet
        kwargs["n_blocks_per_stage"] = [1] * n
    else:  # PlainConvUNet
        kwargs["n_conv_per_stage"] = [1] * n
    return {"inherits_from": base, "patch_size": [int(p) for p in patch_size], "batch_size": int(batch_size),
            "architecture": architecture}


def add_small_configuration(plans_file: str | os.PathLike, name: str = "3d_cpu", **kwargs) -> dict:
    """Add (or replace) configuration ``name`` in a plans file in place; returns the configuration."""
    with open(plans_file) as f:
        plans = json.load(f)
    plans["configurations"][name] = small_configuration(plans, **kwargs)
    atomic_write_json(plans, plans_file)
    return plans["configurations"][name]


def patch_size_for(median_shape: Sequence[float], stages: int = 4, fraction: float = 1.0) -> list[int]:
    """The smallest stage-divisible patch covering ``fraction`` of the median image shape."""
    divisor = 2 ** (stages - 1)
    return [int(divisor * np.ceil(s * fraction / divisor)) for s in median_shape]
