"""What a landmark network outputs after its segmentation channels, recorded in the plans.

A landmark model's network has C segmentation channels followed by K heatmap channels (one per name
in dataset.json ``"landmarks"``). nnU-Net rebuilds networks at inference from the trainer's static
``build_network_architecture(plans_manager, ...)``, which sees the plans but not dataset.json, so the
trainer writes this description into its copy of the plans (saved as ``plans.json`` in the model
folder) under ``PLANS_KEY``. Plans without the key are plain nnU-Net models and are left alone.

The same entry holds each trained fold's landmark position prior (``position_prior``) under ``"position_priors"``
(``{"fold_0": {...}, ...}``): the trainer of a fold records its own (rank 0, under a lock, so folds trained in
parallel keep each other's), and prediction pools every fold's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from nnunet_landmark.heatmap import HeatmapEncoding
from nnunet_landmark.layout import atomic_write_json, check_landmark_names, locked_folder
from nnunet_landmark.position_prior import PositionPrior

PLANS_KEY = "nnunet_landmark"
PRIORS_KEY = "position_priors"


@dataclass(frozen=True)
class LandmarkHeads:
    names: tuple[str, ...]
    num_segmentation_heads: int  # C: channels before the heatmaps
    encoding: HeatmapEncoding
    position_priors: tuple = field(default=(), compare=False)  # PositionPrior per trained fold (may be empty)

    @property
    def num_landmarks(self) -> int:
        return len(self.names)

    @property
    def num_output_channels(self) -> int:
        return self.num_segmentation_heads + self.num_landmarks

    def write_to_plans(self, plans: dict) -> None:
        from nnunet_landmark import __version__
        plans[PLANS_KEY] = {"landmarks": list(self.names), "num_segmentation_heads": self.num_segmentation_heads,
                            "heatmap_encoding": self.encoding.to_dict(), "plugin_version": __version__}

    @classmethod
    def from_plans(cls, plans: dict) -> "LandmarkHeads | None":
        entry = plans.get(PLANS_KEY) if isinstance(plans, dict) else None
        if entry is None:
            return None
        priors = tuple(PositionPrior.from_dict(p) for _, p in sorted(entry.get(PRIORS_KEY, {}).items()))
        return cls(tuple(entry["landmarks"]), int(entry["num_segmentation_heads"]),
                   HeatmapEncoding.from_dict(entry["heatmap_encoding"]), priors)


def set_position_prior(plans: dict, fold_key: str, prior: PositionPrior | None) -> None:
    """Make ``prior`` the only position prior of in-memory ``plans`` (a fold's trainer validates with its own)."""
    plans[PLANS_KEY][PRIORS_KEY] = {} if prior is None else {fold_key: prior.to_dict()}


def recorded_position_priors(plans_file: str) -> dict:
    """{fold key: prior dict} of a model folder's ``plans.json`` (empty if there is none)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    if not os.path.isfile(plans_file):
        return {}
    return dict(load_json(plans_file).get(PLANS_KEY, {}).get(PRIORS_KEY, {}))


def record_position_prior(plans_file: str, fold_key: str, prior: PositionPrior | None,
                          keep: dict | None = None) -> None:
    """Add (or replace) one fold's prior in a model folder's ``plans.json``, keeping the other folds' priors (and
    those of ``keep``, {fold key: prior dict}, that the file no longer has).

    nnU-Net's trainer rewrites ``plans.json`` from its in-memory plans when a fold starts, which hold that fold's
    prior only; the trainer reads the others first and hands them back as ``keep``. Folds are often trained in
    parallel: the update holds the folder's lock and rewrites the file atomically.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json

    with locked_folder(os.path.dirname(os.path.abspath(plans_file))):
        plans = load_json(plans_file)
        priors = plans.setdefault(PLANS_KEY, {}).setdefault(PRIORS_KEY, {})
        for key, value in (keep or {}).items():
            priors.setdefault(key, value)
        if prior is None:
            priors.pop(fold_key, None)
        else:
            priors[fold_key] = prior.to_dict()
        atomic_write_json(plans, plans_file)


def landmark_names_from_dataset_json(dataset_json: dict, source: str = "dataset.json") -> tuple[str, ...]:
    """The ``"landmarks"`` list of a dataset.json, checked (non-empty, unique strings)."""
    names = dataset_json.get("landmarks")
    if not names:
        raise RuntimeError(f"{source} has no \"landmarks\" list, so there is nothing for a landmark trainer to "
                           f"learn. Add e.g. \"landmarks\": [\"apex\"] and one landmarksTr/CASE.mrk.json per "
                           f"training case (nnUNetv2_convert_MMWHS does this), or train nnUNetTrainer instead.")
    if not isinstance(names, list):
        raise RuntimeError(f"{source}: \"landmarks\" must be a list of names, got {names!r}")
    return check_landmark_names(names, f"{source} \"landmarks\"", RuntimeError)
