"""nnUNetv2_convert_MMWHS: the MM-WHS CT release + apex annotations -> an nnU-Net landmark dataset.

    nnUNetv2_convert_MMWHS -i MMWHS/ct_train -a APEX_ANNOTATIONS -d 801

``-a`` is a folder of ITK-SNAP sphere masks (``<case>_apex.nii.gz`` or ``<case>.nii.gz``), a CSV
``case,name,x,y,z`` (LPS mm) or a folder of 3D Slicer ``<case>.mrk.json``; give further landmarks as
``-a NAME=PATH`` and keep them with ``--landmarks apex mitral_valve ...``. Every input is read and
checked before anything is written; the dataset appears in ``$nnUNet_raw`` in one step at the end.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import sys
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.heatmap import HeatmapEncoding, render_heatmaps
from nnunet_landmark.landmark_files import LandmarkFileError, read_landmark_csv, read_markups, read_sphere_mask
from nnunet_landmark.raw_dataset import (DatasetError, dataset_folder_name, install_splits, kfold_splits,
                                         make_dataset_json, save_json, staged_dataset_folder, write_case_landmarks)

# MM-WHS CT label values
MMWHS_VALUES = OrderedDict([
    ("LV_blood_cavity", 500), ("LV_myocardium", 205), ("LA", 420), ("RA", 550), ("RV", 600),
    ("ascending_aorta", 820), ("pulmonary_artery", 850),
])
LV_CAVITY, LV_MYOCARDIUM, LEFT_ATRIUM = 500, 205, 420
MAX_APEX_DISTANCE_FROM_LV_MM = 30.0
CASE_PATTERN = re.compile(r"^(?P<case>.+)_image\.nii(\.gz)?$")


@dataclass
class CaseInput:
    case: str
    image: Path
    label: Path
    geometry: ImageGeometry | None = None
    landmarks: "OrderedDict[str, np.ndarray]" = field(default_factory=OrderedDict)
    derived: list = field(default_factory=list)
    annotation_files: dict = field(default_factory=dict)  # landmark name -> the file it was read from


def discover_cases(ct_train_dir: Path) -> "OrderedDict[str, CaseInput]":
    """``<case>_image.nii.gz`` with its ``<case>_label.nii.gz``, as in the MM-WHS release."""
    if not ct_train_dir.is_dir():
        raise DatasetError(f"{ct_train_dir}: not a folder (expected the MM-WHS ct_train folder)")
    cases: "OrderedDict[str, CaseInput]" = OrderedDict()
    for image in sorted(ct_train_dir.iterdir()):
        m = CASE_PATTERN.match(image.name)
        if not m:
            continue
        case = m.group("case")
        label = next((p for p in (ct_train_dir / f"{case}_label.nii.gz", ct_train_dir / f"{case}_label.nii")
                      if p.exists()), None)
        if label is None:
            raise DatasetError(f"{image}: no label file {case}_label.nii.gz beside it")
        cases[case] = CaseInput(case, image, label)
    if not cases:
        raise DatasetError(f"{ct_train_dir}: no <case>_image.nii.gz files found")
    return cases


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


def check_image_and_label(item: CaseInput, allowed_values: set[int]) -> np.ndarray:
    """Read headers, check both files hold all their voxels, read every label value; return the labels (z, y, x)."""
    try:
        item.geometry = ImageGeometry.from_file(item.image)
        label_geometry = ImageGeometry.from_file(item.label)
    except ValueError as e:  # names the file
        raise DatasetError(str(e)) from e
    if not item.geometry.same_grid_as(label_geometry):
        raise DatasetError(
            f"{item.label}: its grid differs from the image {item.image.name} (label size {label_geometry.size}, "
            f"spacing {np.round(label_geometry.spacing, 4).tolist()}, origin "
            f"{np.round(label_geometry.origin, 2).tolist()}; image size {item.geometry.size}, spacing "
            f"{np.round(item.geometry.spacing, 4).tolist()}, origin {np.round(item.geometry.origin, 2).tolist()})")
    # the image is copied byte for byte: a truncated or corrupt file must stop us here
    check_nifti_complete(item.image)
    check_nifti_complete(item.label)
    label = _read_voxels(item.label)
    unique = np.unique(label)
    if unique.dtype.kind == "f" and not np.all(unique == np.round(unique)):
        raise DatasetError(f"{item.label}: holds non-integer label values "
                           f"{unique[unique != np.round(unique)][:5].tolist()}; a label map needs integer values")
    values = set(int(v) for v in unique)
    unexpected = sorted(values - allowed_values)
    if unexpected:
        counts = {v: int((label == v).sum()) for v in unexpected[:10]}
        raise DatasetError(f"{item.label}: label values {unexpected} are not MM-WHS labels "
                           f"{sorted(allowed_values)} (voxel counts {counts}); fix or remap them first")
    if LV_CAVITY not in values:
        raise DatasetError(f"{item.label}: no LV blood cavity (label {LV_CAVITY})")
    return label


def derive_apex(label: np.ndarray, geometry: ImageGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(apex, mitral valve centre) in LPS mm from an MM-WHS label map.

    The mitral valve centre is the centroid of the LV-cavity voxels that touch the LA (the LV-LA
    interface); the apex is the LV-cavity voxel farthest from it. Only the largest connected piece of
    the cavity counts: real MM-WHS label maps hold stray single 500 voxels, which must not become the apex.
    """
    if not (label == LEFT_ATRIUM).any():
        raise DatasetError("cannot derive the apex: the label map has no LA (label 420) to find the mitral valve")
    cavity = label == LV_CAVITY
    if not cavity.any():
        raise DatasetError(f"cannot derive the apex: the label map has no LV blood cavity (label {LV_CAVITY})")
    # work inside the cavity's bounding box, one voxel wider for the LA next to it (10-50x fewer voxels)
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in ndimage.find_objects(cavity.view(np.uint8))[0])
    offset = np.array([s.start for s in box], dtype=np.float64)
    cavity = cavity[box]
    components, n = ndimage.label(cavity)
    if n > 1:
        cavity = components == (np.argmax(np.bincount(components.ravel())[1:]) + 1)
    la = label[box] == LEFT_ATRIUM
    interface = cavity & ndimage.binary_dilation(la, structure=ndimage.generate_binary_structure(3, 1))
    if not interface.any():
        raise DatasetError("cannot derive the apex: the LV cavity (500) and LA (420) do not touch")
    mitral = geometry.array_index_to_world(np.argwhere(interface).mean(axis=0) + offset)
    cavity_world = geometry.array_index_to_world(np.argwhere(cavity) + offset)
    apex = cavity_world[np.argmax(np.linalg.norm(cavity_world - mitral, axis=1))]
    return apex, mitral


def distance_to_lv_mm(point: np.ndarray, label: np.ndarray, geometry: ImageGeometry) -> float:
    lv = np.argwhere((label == LV_CAVITY) | (label == LV_MYOCARDIUM)).astype(np.float64)
    return float(np.min(np.linalg.norm(geometry.array_index_to_world(lv) - point, axis=1)))


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
            self._table = read_landmark_csv(self.path) if self.path.is_file() and self.path.suffix == ".csv" else None
        except LandmarkFileError as e:
            raise DatasetError(str(e)) from e
        self.files: dict[str, Path] = {}  # case -> the file the last ``get`` read

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


def collect_inputs(ct_train_dir: Path, sources: list[AnnotationSource], landmark_names: list[str],
                   derive_missing_apex: bool, skip_missing: bool) -> list[CaseInput]:
    """Read and check every input; raise the first problem, naming its file, before anything is written."""
    cases = discover_cases(ct_train_dir)
    allowed = {0, *MMWHS_VALUES.values()}
    accepted = []
    for item in tqdm(cases.values(), desc="Checking MM-WHS cases"):
        label = check_image_and_label(item, allowed)
        for source in sources:
            try:
                found = source.get(item.case, landmark_names, item.geometry)
            except LandmarkFileError as e:
                raise DatasetError(str(e)) from e
            for name, position in found.items():
                if name not in item.landmarks:
                    item.landmarks[name] = position
                    item.annotation_files[name] = source.files.get(item.case, source.path)
        missing = [n for n in landmark_names if n not in item.landmarks]
        if derive_missing_apex and "apex" in missing:
            try:
                apex, _ = derive_apex(label, item.geometry)
            except DatasetError as e:
                raise DatasetError(f"{item.label}: {e}") from e
            item.landmarks["apex"] = apex
            item.derived.append("apex")
            missing.remove("apex")
        if missing:
            if skip_missing:
                print(f"skipping {item.case}: no annotation for {missing}", file=sys.stderr)
                continue
            raise DatasetError(f"{item.case} ({item.image}): no annotation for landmark(s) {missing} in "
                               f"{[str(s.path) for s in sources]}; pass --derive-apex to derive the apex from the "
                               f"labels or --skip-missing to leave the case out")
        for name in landmark_names:
            p = item.landmarks[name]
            if not item.geometry.contains_world_point(p):
                raise DatasetError(f"{item.annotation_files.get(name, 'derived from the labels')}: landmark "
                                   f"'{name}' of {item.case} at {np.round(p, 1).tolist()} mm lies outside the image "
                                   f"{item.image}; check the annotation's coordinate system")
        if "apex" in landmark_names:
            d = distance_to_lv_mm(item.landmarks["apex"], label, item.geometry)
            if d > MAX_APEX_DISTANCE_FROM_LV_MM:
                raise DatasetError(f"{item.annotation_files.get('apex', 'derived from the labels')}: the apex of "
                                   f"{item.case} lies {d:.1f} mm from the LV in {item.label} (more than "
                                   f"{MAX_APEX_DISTANCE_FROM_LV_MM:.0f} mm); wrong case or coordinate system?")
        item.landmarks = OrderedDict((n, item.landmarks[n]) for n in landmark_names)
        accepted.append(item)
    if not accepted:
        raise DatasetError("no case left to convert")
    return accepted


def nnunet_labels(all_structures: bool) -> tuple["OrderedDict[str, int]", dict[int, int]]:
    """dataset.json labels and the MM-WHS value -> nnU-Net label map. The LV blood cavity is always 1."""
    names = list(MMWHS_VALUES) if all_structures else ["LV_blood_cavity"]
    labels = OrderedDict([("background", 0)] + [(n, i + 1) for i, n in enumerate(names)])
    mapping = {MMWHS_VALUES[n]: labels[n] for n in names}
    return labels, mapping


def copy_image(source: Path, target: Path) -> None:
    """Byte for byte; a ``.nii`` is gzipped (same bytes inside) since dataset.json says ``.nii.gz``."""
    if source.name.endswith(".gz"):
        shutil.copyfile(source, target)
    else:
        with open(source, "rb") as f_in, gzip.open(target, "wb", compresslevel=6) as f_out:
            shutil.copyfileobj(f_in, f_out, 1 << 20)


def write_label(source: Path, target: Path, mapping: dict[int, int]) -> None:
    image = sitk.ReadImage(str(source))
    array = sitk.GetArrayViewFromImage(image)
    out = np.zeros(array.shape, dtype=np.uint8)
    for value, label in mapping.items():
        out[array == value] = label
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    sitk.WriteImage(result, str(target), useCompression=True)


def convert(ct_train_dir: str, annotations: list[str], dataset_id: int, dataset_name: str = "MMWHS_LVApex",
            landmark_names: list[str] | None = None, all_structures: bool = False, num_folds: int = 10,
            derive_missing_apex: bool = False, skip_missing: bool = False, save_heatmaps: bool = False,
            heatmap_max_distance_mm: float = 100.0, overwrite: bool = False, raw_root: str | None = None,
            preprocessed_root: str | None = None) -> Path:
    """Convert; returns the dataset folder. See the module docstring and ``main`` for the options."""
    landmark_names = list(landmark_names or ["apex"])
    if len(set(landmark_names)) != len(landmark_names) or not all(landmark_names):
        raise DatasetError(f"landmark names must be unique and non-empty, got {landmark_names}")
    raw_root = raw_root or os.environ.get("nnUNet_raw")
    if not raw_root:
        raise DatasetError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (see nnU-Net's "
                           "setting_up_paths.md)")
    preprocessed_root = preprocessed_root or os.environ.get("nnUNet_preprocessed")
    folder_name = dataset_folder_name(dataset_id, dataset_name)
    final = Path(raw_root) / folder_name
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite to replace it")
    existing_ids = [p.name for p in Path(raw_root).glob(f"Dataset{int(dataset_id):03d}_*") if p.name != folder_name] \
        if Path(raw_root).exists() else []
    if existing_ids:
        raise DatasetError(f"dataset id {dataset_id} is already used by {existing_ids} in {raw_root}")

    sources = [AnnotationSource(a) for a in annotations]
    items = collect_inputs(Path(ct_train_dir), sources, landmark_names, derive_missing_apex, skip_missing)
    labels, mapping = nnunet_labels(all_structures)
    splits = kfold_splits([i.case for i in items], num_folds)
    splits_target = Path(preprocessed_root) / folder_name / "splits_final.json" if preprocessed_root else None
    if splits_target is not None and splits_target.exists() and not overwrite:
        try:
            same = json.loads(splits_target.read_text()) == splits
        except (OSError, ValueError):
            same = False
        if not same:  # checked now, not after writing every case
            raise FileExistsError(f"{splits_target} already holds different splits; pass --overwrite to replace them")
    encoding = HeatmapEncoding("log_distance", max_distance_mm=heatmap_max_distance_mm)

    with staged_dataset_folder(final, overwrite) as staging:
        for sub in ("imagesTr", "labelsTr"):
            (staging / sub).mkdir()
        for item in tqdm(items, desc=f"Writing {folder_name}"):
            copy_image(item.image, staging / "imagesTr" / f"{item.case}_0000.nii.gz")
            write_label(item.label, staging / "labelsTr" / f"{item.case}.nii.gz", mapping)
            write_case_landmarks(staging, item.case, item.landmarks,
                                 {n: "derived from labels" for n in item.derived})
            if save_heatmaps:
                (staging / "heatmapsTr").mkdir(exist_ok=True)
                size_zyx = item.geometry.size[::-1]
                positions = item.geometry.world_to_array_index(np.stack(list(item.landmarks.values())))
                heatmaps = render_heatmaps(size_zyx, positions, item.geometry.spacing[::-1], encoding)
                for name, heatmap in zip(item.landmarks, heatmaps):
                    image = item.geometry.apply_to(sitk.GetImageFromArray(heatmap))
                    sitk.WriteImage(image, str(staging / "heatmapsTr" / f"{item.case}_{name}.nii.gz"),
                                    useCompression=True)
        derived = {i.case: i.derived for i in items if i.derived}
        dataset_json = make_dataset_json(
            {"0": "CT"}, labels, len(items), landmark_names, ".nii.gz",
            name=dataset_name, description="MM-WHS CT (Zhuang et al.) with LV apex annotations, converted by "
                                           "nnunet-landmark", reference="https://zmiclab.github.io/zxh/0/mmwhs/",
            licence="see the MM-WHS challenge terms", landmarks_coordinate_system="LPS",
            **({"landmarks_derived": derived} if derived else {}),
            **({"heatmap_encoding": encoding.to_dict()} if save_heatmaps else {}))
        save_json(dataset_json, staging / "dataset.json")
        save_json(splits, staging / "splits_final.json")
        if preprocessed_root:
            install_splits(splits, Path(preprocessed_root) / folder_name, overwrite)
    print(f"Wrote {final} ({len(items)} cases, {num_folds} folds, landmarks {landmark_names})")
    if not preprocessed_root:
        print("nnUNet_preprocessed is not set: copy splits_final.json into the preprocessed dataset folder "
              "before training, or nnU-Net will make its own 5 folds")
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_convert_MMWHS",
        description="Convert the MM-WHS CT training set plus LV apex annotations into an nnU-Net v2 dataset "
                    "with landmarks and 10-fold cross-validation splits.")
    parser.add_argument("-i", required=True, help="MM-WHS ct_train folder (ct_train_1001_image.nii.gz, "
                                                  "ct_train_1001_label.nii.gz, ...)")
    parser.add_argument("-a", required=True, nargs="+", action="extend",
                        help="apex annotations: folder of sphere masks (<case>_apex.nii.gz or <case>.nii.gz), a "
                             "CSV case,name,x,y,z (LPS mm) or a folder of <case>.mrk.json. Other landmarks: "
                             "NAME=PATH (e.g. mitral_valve=annotations/mitral_valve)")
    parser.add_argument("-d", required=True, type=int, help="dataset id, e.g. 801")
    parser.add_argument("--name", default="MMWHS_LVApex", help="dataset name (default MMWHS_LVApex)")
    parser.add_argument("--landmarks", nargs="+", default=["apex"],
                        help="landmarks to keep, in heatmap channel order (default: apex). Extra ones, e.g. "
                             "mitral_valve aortic_valve, must be in the annotations")
    parser.add_argument("--all-structures", "--all_structures", action="store_true",
                        help="keep all seven MM-WHS structures as labels (LV blood cavity stays label 1)")
    parser.add_argument("--folds", type=int, default=10, help="number of cross-validation folds (default 10)")
    parser.add_argument("--derive-apex", "--derive_apex", action="store_true",
                        help="where no apex annotation exists, derive it from the labels (LV cavity point farthest "
                             "from the mitral valve centre) and mark it as derived")
    parser.add_argument("--skip-missing", "--skip_missing", action="store_true",
                        help="leave out cases without annotation instead of stopping")
    parser.add_argument("--save-heatmaps", "--save_heatmaps", action="store_true",
                        help="also write each case's target heatmap (log-distance) as NIfTI in heatmapsTr/")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder and splits")
    args = parser.parse_args(argv)
    try:
        convert(args.i, args.a, args.d, args.name, args.landmarks, args.all_structures, args.folds,
                args.derive_apex, args.skip_missing, args.save_heatmaps, overwrite=args.overwrite)
    except (DatasetError, LandmarkFileError, FileExistsError) as e:
        raise SystemExit(f"nnUNetv2_convert_MMWHS: error: {e}")


if __name__ == "__main__":
    main()
