"""Checks of the NIfTI files a user hands a converter, before anything is written: complete files, finite voxels that
look like CT, a label map on its image's grid with known integer values, and writable nnU-Net folders. Each problem
is a ``DatasetError`` naming the file and the fix."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import SimpleITK as sitk

from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.raw_dataset import DatasetError

# A chest CT in HU always holds air or lung (< -500) and contrast blood or bone (> 100). Outside that the file is
# probably not in HU (raw scanner values without rescale slope/intercept, a normalised image, or MR), and nnU-Net's
# CT normalisation would clip it to a meaningless range
CT_MIN_BELOW_HU, CT_MAX_ABOVE_HU = -500.0, 100.0


def check_nifti_complete(path: Path) -> None:
    """Raise if a NIfTI file holds fewer voxel bytes than its header promises, or its gzip stream is broken.

    ITK reads a truncated file (an interrupted download) without complaint and fills the rest with zeros.
    """
    import nibabel

    try:
        header = nibabel.load(str(path)).header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape(), dtype=np.int64)) \
            * header.get_data_dtype().itemsize
    except Exception as e:  # nibabel raises many types for a broken header
        raise DatasetError(f"{path}: cannot read the NIfTI header ({e})") from e
    if str(path).endswith(".gz"):
        size = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    size += len(chunk)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path}: truncated or corrupt gzip data ({e}); download or export it again") from e
    else:
        size = os.path.getsize(path)
    if size < expected:
        raise DatasetError(f"{path}: truncated: {size} bytes where the header needs {expected}; download or "
                           f"export it again")


def _read_voxels(path: Path) -> np.ndarray:
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as e:
        raise DatasetError(f"{path}: unreadable ({str(e).strip().splitlines()[-1]})") from e


def check_image_voxels(path: Path, warn: Callable[[str], None]) -> None:
    """Raise on NaN or infinite voxels; ``warn`` where the values do not look like HU.

    Read with nibabel: SimpleITK's NIfTI reader turns NaN and infinity into 0 without a word, so nnU-Net's
    default reader would train on 0 HU (water) there, and a nibabel-based reader on NaN.
    """
    import nibabel

    try:
        array = np.asarray(nibabel.load(str(path)).dataobj)
    except Exception as e:  # nibabel raises many types for a broken file
        raise DatasetError(f"{path}: cannot read the voxels ({e})") from e
    if array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise DatasetError(f"{path}: {bad} of {array.size} voxels are NaN or infinite; fix or re-export the "
                               f"image (e.g. replace them with -1024 HU, air)")
    low, high = float(array.min()), float(array.max())
    if low > CT_MIN_BELOW_HU or high < CT_MAX_ABOVE_HU:
        warn(f"{path}: values {low:g} to {high:g} do not look like CT in Hounsfield units (a chest CT holds air or "
             f"lung below {CT_MIN_BELOW_HU:g} and blood or bone above {CT_MAX_ABOVE_HU:g}); check the rescale "
             f"slope/intercept or the modality")


def check_image_and_label(image: Path, label: Path, allowed_values: Iterable[int], required: dict[int, str],
                          dataset: str, warn: Callable[[str], None]) -> tuple[ImageGeometry, np.ndarray]:
    """Read both headers, check the label is on the image's grid, both files hold all their voxels, the image's
    voxels are finite (``check_image_voxels``) and every label value is an integer in ``allowed_values`` (the
    ``dataset``'s labels) with each of ``required`` (value -> name) present. Returns (the image geometry, the labels
    (z, y, x))."""
    try:
        geometry = ImageGeometry.from_file(image)
        label_geometry = ImageGeometry.from_file(label)
    except ValueError as e:  # names the file
        raise DatasetError(str(e)) from e
    if not geometry.same_grid_as(label_geometry):
        def describe(g: ImageGeometry) -> str:
            return (f"size {g.size}, spacing {np.round(g.spacing, 4).tolist()}, origin {np.round(g.origin, 2).tolist()}"
                    f", direction {np.round(g.direction, 4).tolist()}")
        raise DatasetError(f"{label}: its grid differs from the image {image.name} (label "
                           f"{describe(label_geometry)}; image {describe(geometry)}); the label must be drawn "
                           f"on the image's grid (resample it onto the image)")
    # the image is copied byte for byte: a truncated or corrupt file must stop us here
    check_nifti_complete(image)
    check_nifti_complete(label)
    check_image_voxels(image, warn)
    labels = _read_voxels(label)
    unique = np.unique(labels)
    if unique.dtype.kind == "f" and not np.all(unique == np.round(unique)):
        raise DatasetError(f"{label}: holds non-integer label values "
                           f"{unique[unique != np.round(unique)][:5].tolist()}; a label map needs integer values")
    values = set(int(v) for v in unique)
    allowed = set(int(v) for v in allowed_values)
    unexpected = sorted(values - allowed)
    if unexpected:
        counts = {v: int((labels == v).sum()) for v in unexpected[:10]}
        raise DatasetError(f"{label}: label values {unexpected} are not {dataset} labels "
                           f"{sorted(allowed)} (voxel counts {counts}); fix or remap them first")
    for value, name in required.items():
        if value not in values:
            raise DatasetError(f"{label}: no {name} (label {value})")
    return geometry, labels


def check_writable_root(variable: str, path: str) -> None:
    """Raise unless ``path`` is a writable folder, or can be made as one (its nearest existing parent is writable)."""
    folder = Path(path)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DatasetError(f"{variable}={path}: {existing} is not a folder; point {variable} at a folder "
                           f"(export {variable}=/path/to/folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" (it does not exist, and its parent {existing} is not writable)"
        raise DatasetError(f"{variable}={path}: the folder is not writable{where}; make it writable "
                           f"(chmod u+w) or point {variable} at a folder you can write to")
