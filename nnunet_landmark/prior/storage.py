"""Where a model keeps its folds' position priors: its ``plans.json``, beside the landmark heads (``landmark_heads``),
under ``"position_priors"`` (``{"fold_0": {...}, ...}``). A fold's trainer records its own (rank 0, under the
folder's lock; nnU-Net's own rewrite of the file when a fold starts merges the others' back in), and prediction keeps
those of the folds it predicts with (``nnUNetv2_predict -f``): fold k's held-out cases predicted with ``-f k`` never
meet a prior fitted on them.
"""
from __future__ import annotations

import json
import os

from nnunet_landmark.layout import PLANS_KEY, atomic_write_json, locked_folder
from nnunet_landmark.prior.model import PositionPrior

PRIORS_KEY = "position_priors"


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
