"""nnUNetv2_convert_MMWHS: the MM-WHS CT release + apex annotations -> an nnU-Net landmark dataset.

    nnUNetv2_convert_MMWHS -i MMWHS/ct_train -a APEX_ANNOTATIONS -d 801
    nnUNetv2_convert_MMWHS -i MMWHS/ct_train -a APEX_ANNOTATIONS -d 802 \
        --landmarks apex mitral_valve aortic_valve --derive mitral_valve aortic_valve

``-a`` is a folder of ITK-SNAP sphere masks (``<case>_apex.nii.gz`` or ``<case>.nii.gz``), a CSV
``case,name,x,y,z`` (LPS mm) or a folder of 3D Slicer ``<case>.mrk.json``; give further landmarks as
``-a NAME=PATH`` and keep them with ``--landmarks apex mitral_valve ...``. ``--derive NAME ...`` derives the
landmarks the MM-WHS labels define (``DERIVATION_RULES``) where no annotation gives them; ``-a`` is optional when
every landmark is derived. Every input is read and checked before anything is written; the dataset appears in
``$nnUNet_raw`` in one step at the end.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_landmark.annotations import AnnotationSource, missing_annotation_hints, near_matches, report_unknown_cases
from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.heatmap_targets import HeatmapEncoding, render_heatmaps
from nnunet_landmark.label_landmarks import (FarthestPoint, InterfaceCentre, LabelRuleError, derive_landmarks,
                                             distance_to_labels_mm, distance_to_points_mm, interface_voxels)
from nnunet_landmark.landmark_files import (LandmarkFileError)
from nnunet_landmark.input_checks import check_image_and_label, check_writable_root
from nnunet_landmark.layout import SPLITS_FILE, check_landmark_names
from nnunet_landmark.mmwhs import ASCENDING_AORTA, LEFT_ATRIUM, LV_CAVITY, LV_MYOCARDIUM, STRUCTURE_NAMES, STRUCTURES
from nnunet_landmark.raw_dataset import (DatasetError, dataset_folder_name, install_splits, kfold_splits,
                                         make_dataset_json, save_json, staged_dataset_folder, write_case_landmarks)

CASE_PATTERN = re.compile(r"^(?P<case>.+)_image\.nii(\.gz)?$")
LABEL_PATTERN = re.compile(r"^(?P<case>.+)_label\.nii(\.gz)?$")

# The landmarks MM-WHS labels define (the paper's alignment landmarks). The apex starts from the mitral valve
# derived from the labels, also where an annotated one exists, so a derived apex does not depend on annotations.
DERIVATION_RULES = OrderedDict([
    ("mitral_valve", InterfaceCentre(LV_CAVITY, LEFT_ATRIUM)),
    ("aortic_valve", InterfaceCentre(LV_CAVITY, ASCENDING_AORTA)),
    ("apex", FarthestPoint(LV_CAVITY, from_landmark="mitral_valve")),
])
DERIVED_DESCRIPTION = "derived from labels"

# Plausibility limits. A landmark of the wrong case, or given in RAS and read as LPS (x and y negated), lands
# 70-130 mm from where it belongs, often still inside the image and even on the heart (~120 mm across), so
# each landmark with a known structure is checked against that structure. Annotation conventions for one landmark
# differ by 10-15 mm at most (valve: annulus plane vs leaflet tips; apex: endo- vs epicardial, wall ~10 mm).
MAX_APEX_DISTANCE_FROM_LV_MM = 30.0
# the valve centre lies on its interface disc (radius 10-20 mm); a flipped point is >= 50 mm from any part of it
MAX_VALVE_DISTANCE_FROM_INTERFACE_MM = 20.0
# every landmark, named or not: cardiac landmarks lie on the labelled heart or on the vessel stumps beside it
MAX_DISTANCE_FROM_HEART_MM = 30.0
STRUCTURE_CHECKS = {  # landmark -> (what, labels of the structure or an interface (structure, neighbour), limit)
    "apex": ("the LV (labels 500, 205)", (LV_CAVITY, LV_MYOCARDIUM), MAX_APEX_DISTANCE_FROM_LV_MM),
    "mitral_valve": ("the LV-cavity/LA interface (labels 500/420)", InterfaceCentre(LV_CAVITY, LEFT_ATRIUM),
                     MAX_VALVE_DISTANCE_FROM_INTERFACE_MM),
    "aortic_valve": ("the LV-cavity/ascending-aorta interface (labels 500/820)",
                     InterfaceCentre(LV_CAVITY, ASCENDING_AORTA), MAX_VALVE_DISTANCE_FROM_INTERFACE_MM),
}

def warn(message: str) -> None:
    print(f"nnUNetv2_convert_MMWHS: warning: {message}", file=sys.stderr)


@dataclass
class CaseInput:
    case: str
    image: Path
    label: Path
    geometry: ImageGeometry | None = None
    landmarks: "OrderedDict[str, np.ndarray]" = field(default_factory=OrderedDict)
    derived: list = field(default_factory=list)
    annotation_files: dict = field(default_factory=dict)  # landmark name -> the file it was read from


def discover_cases(ct_train_dir: Path, skip_missing: bool = False) -> "OrderedDict[str, CaseInput]":
    """``<case>_image.nii.gz`` with its ``<case>_label.nii.gz``, as in the MM-WHS release.

    A label without its image is an error (a misnamed image), or a warning with ``skip_missing``.
    """
    if not ct_train_dir.is_dir():
        raise DatasetError(f"{ct_train_dir}: not a folder (expected the MM-WHS ct_train folder)")
    cases: "OrderedDict[str, CaseInput]" = OrderedDict()
    files = sorted(ct_train_dir.iterdir())
    for image in files:
        m = CASE_PATTERN.match(image.name)
        if not m:
            continue
        case = m.group("case")
        label = next((p for p in (ct_train_dir / f"{case}_label.nii.gz", ct_train_dir / f"{case}_label.nii")
                      if p.exists()), None)
        if label is None:
            raise DatasetError(f"{image}: no label file {case}_label.nii.gz beside it")
        cases[case] = CaseInput(case, image, label)
    used = {p for c in cases.values() for p in (c.image, c.label)}
    # images a label could have meant (other labels are no candidates)
    unused = [p.name for p in files if p not in used and not LABEL_PATTERN.match(p.name)]
    for label in files:
        m = LABEL_PATTERN.match(label.name)
        if not m or m.group("case") in cases:
            continue
        expected = f"{m.group('case')}_image.nii.gz"
        message = (f"{label}: no image {expected} beside it" +
                   (f" (files there with a similar name: {near_matches(expected, unused)})"
                    if near_matches(expected, unused) else ""))
        if not skip_missing:
            raise DatasetError(f"{message}; rename the image to {expected}, or pass --skip-missing to leave the "
                               f"case out")
        warn(f"skipping {m.group('case')}: {message}")
    if not cases:
        raise DatasetError(f"{ct_train_dir}: no <case>_image.nii.gz files found")
    return cases


def derive_apex(label: np.ndarray, geometry: ImageGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(apex, mitral valve centre) in LPS mm from an MM-WHS label map, by ``DERIVATION_RULES``.

    The mitral valve centre is the centroid of the LV-cavity voxels that touch the LA (the LV-LA
    interface); the apex is the LV-cavity voxel farthest from it. Only the largest connected piece of
    the cavity counts: real MM-WHS label maps hold stray single 500 voxels, which must not become the apex.
    """
    derived = derive_mmwhs_landmarks(label, geometry, ["apex", "mitral_valve"])
    return derived["apex"], derived["mitral_valve"]


def derive_mmwhs_landmarks(label: np.ndarray, geometry: ImageGeometry,
                           names: list[str]) -> "OrderedDict[str, np.ndarray]":
    """The landmarks ``names`` (LPS mm) by ``DERIVATION_RULES``; DatasetError where the labels do not define one."""
    try:
        return derive_landmarks(label, geometry, DERIVATION_RULES, names, STRUCTURE_NAMES)
    except LabelRuleError as e:
        raise DatasetError(str(e)) from e


def check_plausible(item: "CaseInput", label: np.ndarray) -> None:
    """Every landmark near the labelled heart, and near its own structure where one is known (``STRUCTURE_CHECKS``)."""
    interfaces: dict = {}
    for name, point in item.landmarks.items():
        origin = item.annotation_files.get(name, DERIVED_DESCRIPTION)
        checks = []
        if name in STRUCTURE_CHECKS:
            checks.append(STRUCTURE_CHECKS[name])
        checks.append(("the labelled heart (any MM-WHS label)", None, MAX_DISTANCE_FROM_HEART_MM))
        for what, structure, limit in checks:
            if isinstance(structure, InterfaceCentre):
                if structure not in interfaces:
                    try:
                        interfaces[structure] = item.geometry.array_index_to_world(
                            interface_voxels(label, structure.structure, structure.neighbour).astype(float))
                    except LabelRuleError:  # no such interface in this label map: only the heart check applies
                        interfaces[structure] = None
                if interfaces[structure] is None:
                    continue
                d = distance_to_points_mm(point, interfaces[structure])
            else:
                d = distance_to_labels_mm(point, label, item.geometry, structure, search_mm=limit + 10)
            if d > limit:
                raise DatasetError(f"{origin}: the {name} of {item.case} lies {d:.1f} mm from {what} in {item.label} "
                                   f"(more than {limit:.0f} mm); wrong case, or coordinates in RAS where LPS is "
                                   f"expected (x and y negated)?")


def collect_inputs(ct_train_dir: Path, sources: list[AnnotationSource], landmark_names: list[str],
                   derive: "list[str] | bool", skip_missing: bool) -> list[CaseInput]:
    """Read and check every input; raise the first problem, naming its file, before anything is written.

    ``derive``: the landmarks to derive from the labels where no annotation gives them (``True``: the apex).
    """
    derive = ["apex"] if derive is True else list(derive or [])
    cases = discover_cases(ct_train_dir, skip_missing)
    report_unknown_cases(sources, cases, warn)
    allowed = {0, *STRUCTURES.values()}
    accepted = []
    for item in tqdm(cases.values(), desc="Checking MM-WHS cases"):
        item.geometry, label = check_image_and_label(item.image, item.label, allowed, {LV_CAVITY: "LV blood cavity"},
                                                     "MM-WHS", warn)
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
        to_derive = [n for n in missing if n in derive]
        if to_derive:
            try:
                item.landmarks.update(derive_mmwhs_landmarks(label, item.geometry, to_derive))
            except DatasetError as e:
                raise DatasetError(f"{item.label}: {e}") from e
            item.derived.extend(to_derive)
            missing = [n for n in missing if n not in to_derive]
        if missing:
            hints = missing_annotation_hints(item.case, sources, cases)
            if skip_missing:
                warn(f"skipping {item.case}: no annotation for {missing}{hints}")
                continue
            given = [str(s.path) for s in sources] if sources else "(no -a given)"
            derivable = [n for n in missing if n in DERIVATION_RULES]
            raise DatasetError(f"{item.case} ({item.image}): no annotation for landmark(s) {missing} in "
                               f"{given}{hints}; pass "
                               + (f"--derive {' '.join(derivable)} to derive {derivable} from the labels, or "
                                  if derivable else "")
                               + "--skip-missing to leave the case out")
        for name in landmark_names:
            p = item.landmarks[name]
            if not item.geometry.contains_world_point(p):
                raise DatasetError(f"{item.annotation_files.get(name, DERIVED_DESCRIPTION)}: landmark "
                                   f"'{name}' of {item.case} at {np.round(p, 1).tolist()} mm lies outside the image "
                                   f"{item.image}; check the annotation's coordinate system")
        item.landmarks = OrderedDict((n, item.landmarks[n]) for n in landmark_names)
        check_plausible(item, label)
        accepted.append(item)
    if not accepted:
        raise DatasetError("no case left to convert")
    return accepted


def nnunet_labels(all_structures: bool) -> tuple["OrderedDict[str, int]", dict[int, int]]:
    """dataset.json labels and the MM-WHS value -> nnU-Net label map. The LV blood cavity is always 1."""
    names = list(STRUCTURES) if all_structures else ["LV_blood_cavity"]
    labels = OrderedDict([("background", 0)] + [(n, i + 1) for i, n in enumerate(names)])
    mapping = {STRUCTURES[n]: labels[n] for n in names}
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


def check_derivable(landmark_names: list[str], derive: list[str], annotations: list[str]) -> None:
    unknown = [n for n in derive if n not in DERIVATION_RULES]
    if unknown:
        raise DatasetError(f"cannot derive {unknown} from MM-WHS labels; derivable: {list(DERIVATION_RULES)}")
    not_kept = [n for n in derive if n not in landmark_names]
    if not_kept:
        raise DatasetError(f"--derive {' '.join(not_kept)}: not among --landmarks {landmark_names}; add "
                           f"{' '.join(not_kept)} to --landmarks")
    if not annotations and any(n not in derive for n in landmark_names):
        raise DatasetError(f"no annotations given (-a) for landmark(s) {[n for n in landmark_names if n not in derive]}"
                           f"; pass -a PATH, or --derive them from the labels (derivable: {list(DERIVATION_RULES)})")


def convert(ct_train_dir: str, annotations: list[str], dataset_id: int, dataset_name: str = "MMWHS_LVApex",
            landmark_names: list[str] | None = None, all_structures: bool = False, num_folds: int = 10,
            derive_missing_apex: bool = False, skip_missing: bool = False, save_heatmaps: bool = False,
            heatmap_max_distance_mm: float = 100.0, overwrite: bool = False, raw_root: str | None = None,
            preprocessed_root: str | None = None, derive: list[str] | None = None) -> Path:
    """Convert; returns the dataset folder. See the module docstring and ``main`` for the options.

    ``derive``: landmarks to derive from the labels where no annotation gives them (``DERIVATION_RULES``);
    ``derive_missing_apex`` adds the apex when it is among ``landmark_names``.
    """
    landmark_names = list(landmark_names or ["apex"])
    check_landmark_names(landmark_names, "--landmarks", DatasetError)
    annotations = list(annotations or [])
    derive = list(dict.fromkeys(list(derive or []) + (["apex"] if derive_missing_apex and "apex" in landmark_names
                                                      else [])))
    check_derivable(landmark_names, derive, annotations)
    raw_root = raw_root or os.environ.get("nnUNet_raw")
    if not raw_root:
        raise DatasetError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (see nnU-Net's "
                           "setting_up_paths.md)")
    preprocessed_root = preprocessed_root or os.environ.get("nnUNet_preprocessed")
    # checked first: a folder we cannot write must not surface as a traceback after every case was read
    check_writable_root("nnUNet_raw", raw_root)
    if preprocessed_root:
        check_writable_root("nnUNet_preprocessed", preprocessed_root)
    folder_name = dataset_folder_name(dataset_id, dataset_name)
    final = Path(raw_root) / folder_name
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite to replace it")
    for root in (raw_root, preprocessed_root):
        existing_ids = sorted(p.name for p in Path(root).glob(f"Dataset{int(dataset_id):03d}_*")
                              if p.name != folder_name) if root and Path(root).is_dir() else []
        if existing_ids:
            other = existing_ids[0].split("_", 1)[1]
            raise DatasetError(f"dataset id {dataset_id} is already used by {existing_ids} in {root}; nnU-Net "
                               f"needs one name per id: choose a free id with -d, or --name {other} to convert into "
                               f"that dataset (with --overwrite to replace it), or remove {Path(root) / existing_ids[0]}")

    sources = [AnnotationSource(a) for a in annotations]
    items = collect_inputs(Path(ct_train_dir), sources, landmark_names, derive, skip_missing)
    labels, mapping = nnunet_labels(all_structures)
    if not 2 <= num_folds <= len(items):
        raise DatasetError(f"cannot make {num_folds} folds from {len(items)} case(s) in {ct_train_dir}; pass "
                           f"--folds N with 2 <= N <= {len(items)} (the default 10 suits the 20 MM-WHS CT cases)"
                           if len(items) >= 2 else f"only {len(items)} case to convert in {ct_train_dir}; "
                                                   f"cross-validation needs at least 2")
    splits = kfold_splits([i.case for i in items], num_folds)
    splits_target = Path(preprocessed_root) / folder_name / SPLITS_FILE if preprocessed_root else None
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
                                 {n: DERIVED_DESCRIPTION for n in item.derived})
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
            **({"landmarks_derivation_rules": {n: DERIVATION_RULES[n].describe() for n in landmark_names
                                               if any(n in d for d in derived.values())}} if derived else {}),
            **({"heatmap_encoding": encoding.to_dict()} if save_heatmaps else {}))
        save_json(dataset_json, staging / "dataset.json")
        save_json(splits, staging / SPLITS_FILE)
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
    parser.add_argument("-a", nargs="+", action="extend", default=None,
                        help="apex annotations: folder of sphere masks (<case>_apex.nii.gz or <case>.nii.gz), a "
                             "CSV case,name,x,y,z (LPS mm) or a folder of <case>.mrk.json. Other landmarks: "
                             "NAME=PATH (e.g. mitral_valve=annotations/mitral_valve). Optional when every landmark "
                             "is derived (--derive)")
    parser.add_argument("-d", required=True, type=int, help="dataset id, e.g. 801")
    parser.add_argument("--name", default="MMWHS_LVApex", help="dataset name (default MMWHS_LVApex)")
    parser.add_argument("--landmarks", nargs="+", default=["apex"],
                        help="landmarks to keep, in heatmap channel order (default: apex). Extra ones, e.g. "
                             "mitral_valve aortic_valve, come from the annotations or --derive")
    parser.add_argument("--all-structures", "--all_structures", action="store_true",
                        help="keep all seven MM-WHS structures as labels (LV blood cavity stays label 1)")
    parser.add_argument("--folds", type=int, default=10, help="number of cross-validation folds (default 10)")
    parser.add_argument("--derive", nargs="+", default=[], action="extend", metavar="NAME",
                        help="where no annotation gives these landmarks, derive them from the labels and mark them "
                             "as derived: mitral_valve (centre of the LV-cavity/LA interface), aortic_valve (centre "
                             "of the LV-cavity/ascending-aorta interface), apex (LV-cavity point farthest from the "
                             "mitral valve centre)")
    parser.add_argument("--derive-apex", "--derive_apex", action="store_true",
                        help="short for --derive apex")
    parser.add_argument("--skip-missing", "--skip_missing", action="store_true",
                        help="leave out cases without annotation instead of stopping")
    parser.add_argument("--save-heatmaps", "--save_heatmaps", action="store_true",
                        help="also write each case's target heatmap (log-distance) as NIfTI in heatmapsTr/")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder and splits")
    args = parser.parse_args(argv)
    try:
        convert(args.i, args.a or [], args.d, args.name, args.landmarks, args.all_structures, args.folds,
                args.derive_apex, args.skip_missing, args.save_heatmaps, overwrite=args.overwrite,
                derive=args.derive)
    except (DatasetError, LandmarkFileError, OSError) as e:  # OSError: a disk full or a folder vanished meanwhile
        raise SystemExit(f"nnUNetv2_convert_MMWHS: error: {e}")


if __name__ == "__main__":
    main()
