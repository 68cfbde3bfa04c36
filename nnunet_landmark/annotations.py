"""Landmark annotations a user gives a converter (``-a``): a folder of ITK-SNAP sphere masks, a CSV ``case,name,x,y,z``
(LPS mm) or a folder of 3D Slicer markups, for one or several landmark names; and the hints that say why a case found
none (what the sources hold instead, near matches of its name)."""
from __future__ import annotations

import difflib
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.landmark_files import (LandmarkFileError, read_landmark_csv, read_landmark_table, read_markups,
                                            read_sphere_mask)
from nnunet_landmark.raw_dataset import DatasetError


def near_matches(name: str, candidates, n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, sorted(candidates), n=n, cutoff=0.6)


def _shown(names, limit: int = 10) -> str:
    names = sorted(names)
    return str(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class AnnotationSource:
    """One ``-a`` argument: sphere masks, a CSV or markups, for one or several landmark names."""

    def __init__(self, spec: str, default_name: str = "apex"):
        name, sep, path = spec.partition("=")
        if sep and not os.path.exists(spec):
            self.name, self.path = name, Path(path)
        else:
            self.name, self.path = None, Path(spec)
        self.default_name = self.name or default_name
        if not self.path.exists():
            raise DatasetError(f"{self.path}: annotation path does not exist")
        try:
            self._table = None
            if self.path.is_file() and self.path.suffix == ".csv":
                # a CSV with only its header holds no case, like an empty folder (the cases may all be derived)
                self._table = read_landmark_csv(self.path) if read_landmark_table(self.path) else OrderedDict()
        except LandmarkFileError as e:
            raise DatasetError(str(e)) from e
        self.files: dict[str, Path] = {}  # case -> the file the last ``get`` read
        self.notes: dict[str, str] = {}  # case -> why a file there gave none of the landmarks asked for

    def case_names(self) -> set[str]:
        """The cases this source holds annotations for (CSV rows; file names in a folder)."""
        if self._table is not None:
            return set(self._table)
        if not self.path.is_dir():
            return set()
        names = set()
        for p in self.path.iterdir():
            for suffix in (".mrk.json", f"_{self.default_name}.nii.gz", f"_{self.default_name}.nii", ".nii.gz", ".nii"):
                if p.name.endswith(suffix):
                    names.add(p.name[:-len(suffix)])
                    break
        return names

    def get(self, case: str, names: list[str], geometry: ImageGeometry) -> "OrderedDict[str, np.ndarray]":
        """The landmarks among ``names`` this source has for ``case`` (possibly none)."""
        self.files[case] = self.path
        return self._get(case, names, geometry)

    def _get(self, case: str, names: list[str], geometry: ImageGeometry) -> "OrderedDict[str, np.ndarray]":
        if self._table is not None:
            return OrderedDict((n, p) for n, p in self._table.get(case, {}).items() if n in names)
        if self.path.is_file():
            raise DatasetError(f"{self.path}: unknown annotation file type; use a .csv, or a folder of sphere "
                               f"masks or .mrk.json files")
        markups = self.path / f"{case}.mrk.json"
        if markups.exists():
            self.files[case] = markups
            points = read_markups(markups)
            if len(points) == 1 and self.default_name in names and self.default_name not in points:
                return OrderedDict([(self.default_name, next(iter(points.values())))])
            if any(n not in points for n in names):
                default = all(re.fullmatch(r"F[-_ ]?\d+", n) for n in points)
                self.notes[case] = (f"{markups} holds control points labelled {list(points)}"
                                    + (" (Slicer's default labels)" if default else "")
                                    + f"; label each point with its landmark name ({names}) in Slicer's Markups "
                                      f"module or in the file's \"label\" fields")
            return OrderedDict((n, p) for n, p in points.items() if n in names)
        if self.default_name not in names:
            return OrderedDict()
        for candidate in (f"{case}_{self.default_name}.nii.gz", f"{case}.nii.gz", f"{case}_{self.default_name}.nii",
                          f"{case}.nii"):
            mask = self.path / candidate
            if mask.exists():
                self.files[case] = mask
                return OrderedDict([(self.default_name, read_sphere_mask(mask, geometry))])
        return OrderedDict()


def report_unknown_cases(sources: list[AnnotationSource], cases, warn: Callable[[str], None]) -> None:
    """Warn about annotations for cases that are not in the images folder (a misspelt name, or another release)."""
    for source in sources:
        unknown = sorted(source.case_names() - set(cases))
        if unknown:
            hints = {u: near_matches(u, cases, 1) for u in unknown[:10]}
            warn(f"{source.path} holds annotations for {len(unknown)} case(s) not in the images folder, ignored: "
                 + ", ".join(f"{u}" + (f" (did you mean {h[0]}?)" if h else "") for u, h in hints.items())
                 + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))


def missing_annotation_hints(case: str, sources: list[AnnotationSource], cases) -> str:
    """Why a case found no annotation: what the sources hold instead, with near matches of the case name."""
    hints = []
    for source in sources:
        if case in source.notes:
            hints.append(source.notes[case])
            continue
        held = source.case_names()
        if case in held:
            continue
        close = near_matches(case, held - set(cases)) or near_matches(case, held)
        hints.append(f"{source.path} holds {len(held)} case(s) {_shown(held)}"
                     + (f", the nearest to {case}: {close}" if close else ""))
    return "".join(f"; {h}" for h in hints)
