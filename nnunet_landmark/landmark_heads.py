"""What a landmark network outputs after its segmentation channels, recorded in the plans.

A landmark model's network has C segmentation channels followed by K heatmap channels (one per name
in dataset.json ``"landmarks"``). nnU-Net rebuilds networks at inference from the trainer's static
``build_network_architecture(plans_manager, ...)``, which sees the plans but not dataset.json, so the
trainer writes this description into its copy of the plans (saved as ``plans.json`` in the model
folder) under ``PLANS_KEY``. Plans without the key are plain nnU-Net models and are left alone.

The same entry holds each trained fold's landmark position prior (``position_prior``) under ``"position_priors"``
(``{"fold_0": {...}, ...}``): the trainer of a fold records its own (rank 0, under a lock, so folds trained in
parallel keep each other's), and prediction pools those of the folds it predicts with (``nnUNetv2_predict -f``,
``select_position_priors``): fold k's held-out cases predicted with ``-f k`` never meet a prior fitted on them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from nnunet_landmark.heatmap_targets import HeatmapEncoding
from nnunet_landmark.landmark_network import HeatmapHeadConfig
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
    head: HeatmapHeadConfig = HeatmapHeadConfig()  # where the heatmap channels come from (landmark_network)

    @property
    def num_landmarks(self) -> int:
        return len(self.names)

    @property
    def num_output_channels(self) -> int:
        return self.num_segmentation_heads + self.num_landmarks

    def write_to_plans(self, plans: dict) -> None:
        from nnunet_landmark import __version__
        plans[PLANS_KEY] = {"landmarks": list(self.names), "num_segmentation_heads": self.num_segmentation_heads,
                            "heatmap_encoding": self.encoding.to_dict(), "heatmap_head": self.head.to_dict(),
                            "plugin_version": __version__}

    @classmethod
    def from_plans(cls, plans: dict) -> "LandmarkHeads | None":
        entry = plans.get(PLANS_KEY) if isinstance(plans, dict) else None
        if entry is None:
            return None
        priors = tuple(PositionPrior.from_dict(p) for _, p in sorted(entry.get(PRIORS_KEY, {}).items()))
        return cls(tuple(entry["landmarks"]), int(entry["num_segmentation_heads"]),
                   HeatmapEncoding.from_dict(entry["heatmap_encoding"]), priors,
                   HeatmapHeadConfig.from_dict(entry.get("heatmap_head")))


def set_position_prior(plans: dict, fold_key: str, prior: PositionPrior | None) -> None:
    """Make ``prior`` the only position prior of in-memory ``plans`` (a fold's trainer validates with its own)."""
    plans[PLANS_KEY][PRIORS_KEY] = {} if prior is None else {fold_key: prior.to_dict()}


def fold_key(fold) -> str:
    """The key of a fold's prior: ``fold_3``, ``fold_all`` (as nnU-Net names the fold folders)."""
    return f"fold_{fold if fold == 'all' else int(fold)}"


def select_position_priors(plans: dict, folds) -> list[str]:
    """Keep, in ``plans``, only the position priors of ``folds`` (what the predictor loads: ints, or ``"all"``), and
    return the requested folds' keys that recorded none. Plans of plain models are left alone."""
    entry = plans.get(PLANS_KEY)
    if entry is None:
        return []
    wanted = [fold_key(f) for f in ([folds] if isinstance(folds, (str, int)) else folds)]
    recorded = entry.get(PRIORS_KEY, {})
    entry[PRIORS_KEY] = {k: recorded[k] for k in wanted if k in recorded}
    return [k for k in wanted if k not in recorded]


def recorded_position_priors(plans_file: str) -> dict:
    """{fold key: prior dict} of a model folder's ``plans.json`` (empty if there is none)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    if not os.path.isfile(plans_file):
        return {}
    return dict(load_json(plans_file).get(PLANS_KEY, {}).get(PRIORS_KEY, {}))


def record_position_prior(plans_file: str, fold_key: str, prior: PositionPrior | None) -> None:
    """Add (or replace) one fold's prior in a model folder's ``plans.json``, keeping the other folds' priors.

    Folds are often trained in parallel: the update holds the folder's lock and rewrites the file atomically.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json

    with locked_folder(os.path.dirname(os.path.abspath(plans_file))):
        plans = load_json(plans_file)
        priors = plans.setdefault(PLANS_KEY, {}).setdefault(PRIORS_KEY, {})
        if prior is None:
            priors.pop(fold_key, None)
        else:
            priors[fold_key] = prior.to_dict()
        atomic_write_json(plans, plans_file)


def write_plans_keeping_priors(plans: dict, plans_file: str) -> None:
    """Write ``plans`` (a trainer's in-memory plans, which hold its own fold's prior only) as a model folder's
    ``plans.json``, keeping the priors other folds recorded there: under the folder's lock, atomically.

    nnU-Net's trainer rewrites ``plans.json`` from its in-memory plans when a fold starts; the landmark trainer routes
    that write here (``nnunet_integration.plans_json_writes``), so a fold starting while another records its prior
    cannot drop it.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json

    with locked_folder(os.path.dirname(os.path.abspath(plans_file))):
        merged = json.loads(json.dumps(plans))
        if PLANS_KEY in merged and os.path.isfile(plans_file):
            recorded = load_json(plans_file).get(PLANS_KEY, {}).get(PRIORS_KEY, {})
            own = merged[PLANS_KEY].get(PRIORS_KEY, {})
            merged[PLANS_KEY][PRIORS_KEY] = {**recorded, **own}
        atomic_write_json(merged, plans_file)


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
