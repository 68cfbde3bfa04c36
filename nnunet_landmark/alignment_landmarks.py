"""The landmark sets an alignment reads: one case's landmarks (LPS mm) from 3D Slicer markups or a CSV, ours or theirs;
the statuses our export gave them; and the names both sets hold."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Mapping

import numpy as np

from nnunet_landmark.geometry import ras_to_lps
from nnunet_landmark.landmark_files import (LandmarkFileError, markup_statuses, read_landmark_csv, read_landmark_table,
                                            read_markups)

# a CSV column saying in which world frame its x, y, z are (rows without it: LPS, as everything here)
CSV_COORDINATE_SYSTEM_COLUMNS = ("coordinate_system", "coordinateSystem", "coordinate_frame")


class AlignmentError(ValueError):
    """Landmarks or images that cannot be aligned; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------- landmarks
def load_landmarks(path: str | os.PathLike, case: str | None = None) -> "OrderedDict[str, np.ndarray]":
    """One case's landmarks (LPS mm) from a Slicer ``.mrk.json`` or a ``case,name,x,y,z`` CSV.

    A CSV with several cases needs ``case``; duplicate names and non-mm units are errors (the readers raise them
    with the file named).
    """
    p = str(path)
    if not os.path.isfile(p):
        raise AlignmentError(f"{p}: no such landmark file")
    if p.lower().endswith(".csv"):
        systems = set()
        for row in read_landmark_table(p):
            for column in ("unit", "units", "coordinate_units"):
                if row.get(column) not in (None, "", "mm"):
                    raise LandmarkFileError(f"{p}: coordinate units {row[column]!r} (column '{column}') are not "
                                            f"supported, only 'mm'; convert the positions to mm")
            for column in CSV_COORDINATE_SYSTEM_COLUMNS:
                if row.get(column) not in (None, ""):
                    systems.add(row[column].strip().upper())
        if not systems <= {"LPS", "RAS"} or len(systems) > 1:
            raise LandmarkFileError(f"{p}: coordinate system(s) {sorted(systems)} in its rows; one of LPS (ITK, "
                                    f"nnU-Net, this tool) or RAS (3D Slicer's world) is supported per file")
        table = read_landmark_csv(p)
        if systems == {"RAS"}:
            table = OrderedDict((c, OrderedDict((n, ras_to_lps(v)) for n, v in points.items()))
                                for c, points in table.items())
        if case is None:
            if len(table) > 1:
                raise AlignmentError(f"{p}: the CSV holds {len(table)} cases ({', '.join(list(table)[:8])}"
                                     f"{', ...' if len(table) > 8 else ''}); say which one with --case")
            return next(iter(table.values()))
        if case not in table:
            raise AlignmentError(f"{p}: no case '{case}' in the CSV; it holds {', '.join(list(table)[:8])}"
                                 f"{', ...' if len(table) > 8 else ''}")
        return table[case]
    if p.lower().endswith(".json"):
        return read_markups(p, flagged=True)
    raise AlignmentError(f"{p}: unknown landmark file type; use a 3D Slicer .mrk.json or a case,name,x,y,z CSV")


def landmark_statuses(path: str | os.PathLike, case: str | None = None) -> "OrderedDict[str, str]":
    """{name: status} of one case's landmarks as our export wrote them: ``ok``, or the reason (with its detail) a
    landmark is not credible (the CSV's ``status`` column; a markups point's ``positionStatus`` and description).
    Files from elsewhere, without statuses, are all ``ok``."""
    p = str(path)
    if p.lower().endswith(".csv"):
        rows = [r for r in read_landmark_table(p) if case is None or r["case"] == case]
        return OrderedDict((r["name"], (r.get("status") or "ok").strip()) for r in rows)
    statuses = OrderedDict()
    for name, (position_status, description) in markup_statuses(p).items():
        reason = description.split(";")[0].removeprefix("status=").strip() if description.startswith("status=") \
            else "no defined position"
        statuses[name] = "ok" if position_status == "defined" else reason
    return statuses


def common_landmarks(moving: Mapping[str, np.ndarray], fixed: Mapping[str, np.ndarray],
                     moving_source: str = "moving landmarks", fixed_source: str = "fixed landmarks",
                     minimum: int = 3) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The names both sets hold (in the moving set's order) and their (N, 3) positions, moving then fixed."""
    names = [n for n in moving if n in fixed]
    if len(names) < minimum:
        raise AlignmentError(
            f"only {len(names)} landmark name(s) in common ({', '.join(names) or 'none'}); a rigid alignment needs "
            f"at least {minimum}. {moving_source} holds: {', '.join(moving) or 'nothing'}; {fixed_source} holds: "
            f"{', '.join(fixed) or 'nothing'}. Name the same landmarks alike in both files.")
    return (names, np.array([moving[n] for n in names], dtype=np.float64),
            np.array([fixed[n] for n in names], dtype=np.float64))
