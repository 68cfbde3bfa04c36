"""Write nnU-Net v2 raw datasets that carry landmarks, and read their landmarks back.

Layout (nnU-Net's, plus one folder nnU-Net ignores)::

    Dataset801_Name/
        imagesTr/CASE_0000.nii.gz
        labelsTr/CASE.nii.gz
        landmarksTr/CASE.mrk.json        3D Slicer markups, LPS mm, one control point per landmark
        dataset.json                     nnU-Net's keys + "landmarks": [names] (the heatmap channel order)
        splits_final.json                copy of the cross-validation splits

A dataset is assembled in a hidden sibling folder and moved into place only when complete, so an
interrupted run leaves no half-written dataset, and an existing dataset is only replaced with
``overwrite=True``.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from nnunet_landmark.landmark_files import LandmarkFileError, read_markups, write_markups
from nnunet_landmark.layout import LANDMARK_CACHE, LANDMARKS_FOLDER, SPLITS_FILE, atomic_write_json, check_landmark_names


class DatasetError(ValueError):
    """Bad input for a dataset; the message names the file and what is wrong."""


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 0 < int(dataset_id) < 1000:
        raise DatasetError(f"dataset id must be between 1 and 999, got {dataset_id}")
    if not name or any(c in name for c in "/\\ "):
        raise DatasetError(f"dataset name {name!r} must be non-empty without spaces or slashes")
    return f"Dataset{int(dataset_id):03d}_{name}"


def kfold_splits(case_ids: Sequence[str], num_folds: int, seed: int = 12345) -> list[dict]:
    """Deterministic k-fold splits in nnU-Net's ``splits_final.json`` format; each case is held out once."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    cases = sorted(case_ids)
    if num_folds < 2 or num_folds > len(cases):
        raise DatasetError(f"cannot make {num_folds} folds from {len(cases)} cases")
    splits = generate_crossval_split(cases, seed=seed, n_splits=num_folds)
    return [{"train": sorted(s["train"]), "val": sorted(s["val"])} for s in splits]


def make_dataset_json(channel_names: Mapping[str, str], labels: Mapping[str, int], num_training: int,
                      landmark_names: Sequence[str], file_ending: str = ".nii.gz", **extra) -> dict:
    """nnU-Net's dataset.json plus ``"landmarks"``; the order of the names fixes the heatmap channels."""
    check_landmark_names(landmark_names, "dataset.json \"landmarks\"", DatasetError)
    d = OrderedDict(channel_names=dict(channel_names), labels=dict(labels), numTraining=int(num_training),
                    file_ending=file_ending, landmarks=list(landmark_names))
    d.update(extra)
    return d


@contextmanager
def staged_dataset_folder(final_folder: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``final_folder`` in one rename.

    Raises before anything is written if ``final_folder`` exists and ``overwrite`` is False. On an
    exception (or Ctrl-C) the staging folder is removed and ``final_folder`` stays as it was.
    """
    final = Path(final_folder)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def write_case_landmarks(dataset_folder: str | os.PathLike, case: str, landmarks: Mapping[str, Iterable[float]],
                         descriptions: Mapping[str, str] | None = None) -> None:
    folder = Path(dataset_folder) / LANDMARKS_FOLDER
    folder.mkdir(exist_ok=True)
    write_markups(folder / f"{case}.mrk.json", landmarks, descriptions)


def read_dataset_landmarks(dataset_folder: str | os.PathLike, landmark_names: Sequence[str],
                           cases: Iterable[str] | None = None) -> "OrderedDict[str, np.ndarray]":
    """{case: (K, 3) LPS mm in ``landmark_names`` order} from ``landmarksTr/``.

    Raises one error that lists every case with a missing file or missing landmark.
    """
    folder = Path(dataset_folder) / LANDMARKS_FOLDER
    if not folder.is_dir():
        raise DatasetError(f"{folder} does not exist: this dataset has no landmarks (expected one "
                           f"CASE.mrk.json per training case)")
    if cases is None:
        cases = sorted(p.name[:-len(".mrk.json")] for p in folder.glob("*.mrk.json"))
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    problems = []
    for case in cases:
        path = folder / f"{case}.mrk.json"
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        try:
            points = read_markups(path)
        except LandmarkFileError as e:
            problems.append(str(e))
            continue
        missing = [n for n in landmark_names if n not in points]
        if missing:
            problems.append(f"{path}: lacks landmark(s) {missing} (has {list(points)})")
            continue
        out[case] = np.stack([points[n] for n in landmark_names])
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DatasetError(f"landmarks missing or unreadable for {len(problems)} case(s):\n  {shown}")
    return out


save_json = atomic_write_json  # the name the converter and trainer import


def install_splits(splits: list[dict], preprocessed_dataset_folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Put ``splits_final.json`` where nnU-Net's trainer reads it; never silently replace different splits."""
    folder = Path(preprocessed_dataset_folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / SPLITS_FILE
    if target.exists() and not overwrite:
        existing = json.loads(target.read_text())
        if existing != splits:
            raise FileExistsError(f"{target} already holds different splits; pass --overwrite to replace them")
    save_json(splits, target)
    return target


def load_world_landmarks(dataset_name: str, preprocessed_base: str, landmark_names: Sequence[str],
                         cases: Sequence[str], write_cache: bool = True) -> dict:
    """World landmarks (case -> (K, 3) LPS mm) from nnUNet_raw/<dataset>/landmarksTr, or from the copy kept
    beside the preprocessed data."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
    from nnunetv2.paths import nnUNet_raw

    cache = join(preprocessed_base, LANDMARK_CACHE)
    raw_folder = join(nnUNet_raw.get(), dataset_name) if nnUNet_raw.is_set() else None
    if raw_folder is not None and os.path.isdir(join(raw_folder, LANDMARKS_FOLDER)):
        try:
            world = read_dataset_landmarks(raw_folder, landmark_names, cases)
        except DatasetError as e:
            raise RuntimeError(f"{e}\nEvery training case needs all landmarks {list(landmark_names)}.") from e
        if write_cache:
            save_json({"landmarks": list(landmark_names), "coordinate_system": "LPS",
                       "cases": {c: p.tolist() for c, p in world.items()}}, cache)
        return world
    if isfile(cache):
        stored = load_json(cache)
        if stored["landmarks"] != list(landmark_names):
            raise RuntimeError(f"{cache} holds landmarks {stored['landmarks']}, dataset.json "
                               f"{list(landmark_names)}; delete it and make nnUNet_raw available")
        missing = [c for c in cases if c not in stored["cases"]]
        if missing:
            raise RuntimeError(f"{cache} lacks landmarks for case(s) {missing[:10]}")
        return {c: np.asarray(stored["cases"][c], dtype=np.float64) for c in cases}
    raise RuntimeError(f"no landmarks found for {dataset_name}: expected "
                       f"{raw_folder or '$nnUNet_raw/<dataset>'}/{LANDMARKS_FOLDER}/CASE.mrk.json or {cache}")
