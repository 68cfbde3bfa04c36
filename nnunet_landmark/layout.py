"""The plugin's on-disk conventions: the names of what it writes beside nnU-Net's files, and how it writes them.

nnU-Net keeps its folder names in ``paths.py`` and ``file_path_utilities.py``; these are ours:

* raw dataset: ``landmarksTr/<case>.mrk.json`` (3D Slicer markups, LPS mm), and ``"landmarks"`` in dataset.json;
* preprocessed dataset: ``landmarksTr.json``, the world landmarks of every case, cached when training starts
  (nnU-Net treats any extra file in the data folder as a case, so it sits beside ``dataset.json``);
* prediction / validation folders: ``<case>.mrk.json``, one ``landmarks.csv`` for the folder,
  ``heatmaps/<case>_<landmark>.nii.gz`` with ``--save_probabilities``, ``landmark_summary.json`` after validation.

Every JSON or table is written atomically (a temporary file renamed over the target), so an interrupted run never
leaves a half-written file that a later run would read; files that several processes update (the prediction folder's
``landmarks.csv``, a model's ``plans.json`` priors) are updated under ``locked_folder``.
"""
from __future__ import annotations

import errno
import json
import os
import random
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

LANDMARKS_FOLDER = "landmarksTr"
MARKUPS_SUFFIX = ".mrk.json"
LANDMARK_TABLE = "landmarks.csv"
HEATMAP_FOLDER = "heatmaps"
LANDMARK_CACHE = "landmarksTr.json"
LANDMARK_SUMMARY = "landmark_summary.json"
SPLITS_FILE = "splits_final.json"
PLANS_KEY = "nnunet_landmark"  # a landmark model's entry in its plans.json (landmark_heads, prior.storage)

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


# flock fails with these where a file system has no locking (Lustre mounted noflock, some NFS and FUSE mounts)
NO_LOCKING_ERRNOS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}
LOCK_FILE = ".landmarks.csv.lock"


@contextmanager
def locked_folder(folder: str, timeout: float = 900.0, stale_after: float = 120.0):
    """An exclusive lock on a folder, so export workers (and DDP ranks) can update one table in turn.

    ``flock`` on the folder where the file system supports it; elsewhere (and on Windows) a lock file that
    ``lock_file`` creates atomically.
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            os.close(fd)
            if error.errno not in NO_LOCKING_ERRNOS:
                raise
        else:
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
    with lock_file(os.path.join(folder, LOCK_FILE), timeout, stale_after):
        yield


@contextmanager
def lock_file(path: str, timeout: float, stale_after: float):
    """Hold ``path``, created with O_CREAT | O_EXCL (atomic on local, NFSv3+ and Lustre file systems).

    A lock older than ``stale_after`` seconds is left by a process that died while holding it (a table update
    takes milliseconds): it is renamed away, which only one waiter can do. After ``timeout`` seconds of
    waiting, TimeoutError names the file.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pass
        try:
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            continue  # released in the meantime
        if age > stale_after:
            stale = f"{path}.stale.{socket.gethostname()}.{os.getpid()}"
            try:
                os.rename(path, stale)
                os.unlink(stale)
            except FileNotFoundError:
                pass
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: waited {timeout:.0f} s for another process to finish updating "
                               f"{LANDMARK_TABLE}; if no prediction is writing to this folder, delete the file")
        time.sleep(delay * (1.0 + random.random()))
        delay = min(2 * delay, 0.2)
    try:
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
