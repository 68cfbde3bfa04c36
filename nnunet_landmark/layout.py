"""The plugin's on-disk conventions: the names of what it writes beside nnU-Net's files, and how it writes them.

nnU-Net keeps its folder names in ``paths.py`` and ``file_path_utilities.py``; these are ours:

* raw dataset: ``landmarksTr/<case>.mrk.json`` (3D Slicer markups, LPS mm), and ``"landmarks"`` in dataset.json;
* preprocessed dataset: ``landmarksTr.json``, the world landmarks of every case, cached when training starts
  (nnU-Net treats any extra file in the data folder as a case, so it sits beside ``dataset.json``);
* prediction / validation folders: ``<case>.mrk.json``, one ``landmarks.csv`` for the folder,
  ``heatmaps/<case>_<landmark>.nii.gz`` with ``--save_probabilities``, ``landmark_summary.json`` after validation.

Every JSON or table is written atomically (a temporary file renamed over the target), so an interrupted run never
leaves a half-written file that a later run would read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

LANDMARKS_FOLDER = "landmarksTr"
MARKUPS_SUFFIX = ".mrk.json"
LANDMARK_TABLE = "landmarks.csv"
HEATMAP_FOLDER = "heatmaps"
LANDMARK_CACHE = "landmarksTr.json"
LANDMARK_SUMMARY = "landmark_summary.json"
SPLITS_FILE = "splits_final.json"

# a name becomes part of file names (heatmaps/<case>_<name>.nii.gz) and a CSV cell
_FORBIDDEN_IN_NAMES = set(',/\\\n\r\t"')


def markups_path(folder: str | os.PathLike, case: str) -> Path:
    """``<folder>/<case>.mrk.json``."""
    return Path(folder) / f"{case}{MARKUPS_SUFFIX}"


def case_of_markups(path: str | os.PathLike) -> str:
    """The case name of a ``<case>.mrk.json`` file."""
    name = Path(path).name
    return name[:-len(MARKUPS_SUFFIX)] if name.endswith(MARKUPS_SUFFIX) else Path(name).stem


def check_landmark_names(names: Iterable, source: str, error: type[Exception] = ValueError) -> tuple[str, ...]:
    """``names`` as a tuple, or ``error`` naming ``source``: they must be a non-empty list of unique, non-empty
    strings without commas, quotes, path separators or line breaks."""
    names = list(names) if not isinstance(names, str) else [names]
    if not names:
        raise error(f"{source}: no landmark names; give at least one, e.g. [\"apex\"]")
    bad = [n for n in names if not isinstance(n, str) or not n.strip() or _FORBIDDEN_IN_NAMES & set(n)]
    if bad:
        raise error(f"{source}: invalid landmark name(s) {bad!r}: names are non-empty text without commas, quotes, "
                    f"slashes or line breaks (they become file names and CSV cells)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise error(f"{source}: landmark names must be unique; {repeated} given more than once in {names}")
    return tuple(names)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed over the target."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(obj, path: str | os.PathLike) -> None:
    """``obj`` as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
