"""Phantoms of any family written in the MM-WHS CT release layout (``nnUNetv2_generate_landmark_phantoms``).

A family is ``analytic`` (``phantoms``: the analytic heart), ``real`` (``anatomy_phantoms``: the real MM-WHS label
maps deformed, cycling through every template), one template's name (``ct_train_1002``), or several of these joined
by ``+`` (``analytic+real``: cases alternate between them). Layout::

    OUT/ct_train/ct_train_1001_image.nii.gz      int16 HU
    OUT/ct_train/ct_train_1001_label.nii.gz      int16, {0, 205, 420, 500, 550, 600, 820, 850}
    OUT/<landmark>/ct_train_1001_<landmark>.nii.gz   ITK-SNAP-style sphere mask, one per landmark
    OUT/landmarks.csv                            case,name,x,y,z (LPS mm), all cases and landmarks
    OUT/families.csv                             case,family (analytic or the template's name)
"""
from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from pathlib import Path

from tqdm import tqdm

from nnunet_landmark.landmark_files import write_landmark_csv, write_sphere_mask
from nnunet_landmark.layout import atomic_write_text
from nnunet_landmark.mmwhs import LANDMARKS
from nnunet_landmark.phantoms import generate_phantom

ANALYTIC = "analytic"
FAMILIES_TABLE = "families.csv"


def family_members(family: str) -> list[str]:
    """The per-case generators of a family: ``analytic`` or template names, in the order cases cycle through."""
    from nnunet_landmark.anatomy_phantoms import TEMPLATES

    members = []
    for part in family.split("+"):
        part = part.strip()
        if part == ANALYTIC:
            members.append(ANALYTIC)
        elif part == "real":
            members.extend(TEMPLATES)
        elif part.startswith("ct_") or part in TEMPLATES:
            members.append(part)
        else:
            raise ValueError(f"unknown phantom family {part!r} in {family!r}: use 'analytic', 'real', a template "
                             f"name such as {TEMPLATES[0]!r}, or several joined by '+'")
    return members


def write_mmwhs_phantoms(output_folder: str | os.PathLike, num_cases: int = 20, seed: int = 0,
                         size: str | tuple[int, int, int] = "tiny", first_case: int = 1001,
                         pose_degrees: float = 20.0, oblique_degrees: float = 8.0, flips: bool = True,
                         sphere_radius_mm: float | None = None, progress: bool = True,
                         family: str = ANALYTIC) -> "OrderedDict":
    """Write phantoms of ``family`` in the MM-WHS CT release layout plus sphere masks and a CSV of the landmarks.

    Case n is made from seed ``seed * 100003 + n`` by the family's n-th generator (cycling). Returns
    {case: {landmark name: LPS position}}.
    """
    import SimpleITK as sitk

    members = family_members(family)
    out = Path(output_folder)
    (out / "ct_train").mkdir(parents=True, exist_ok=True)
    for name in LANDMARKS:
        (out / name).mkdir(exist_ok=True)
    table: "OrderedDict[str, OrderedDict]" = OrderedDict()
    provenance = ["case,family"]
    for n in tqdm(range(num_cases), desc=f"Generating phantoms ({family})", disable=not progress):
        case = f"ct_train_{first_case + n}"
        member = members[n % len(members)]
        if member == ANALYTIC:
            phantom = generate_phantom(seed * 100_003 + n, size, pose_degrees, oblique_degrees, flips)
        else:
            from nnunet_landmark.anatomy_phantoms import generate_template_phantom

            phantom = generate_template_phantom(seed * 100_003 + n, member, size, pose_degrees, oblique_degrees, flips)
        sitk.WriteImage(phantom.image, str(out / "ct_train" / f"{case}_image.nii.gz"), useCompression=True)
        sitk.WriteImage(phantom.label, str(out / "ct_train" / f"{case}_label.nii.gz"), useCompression=True)
        radius = sphere_radius_mm if sphere_radius_mm is not None else max(3.0, 1.2 * max(phantom.geometry.spacing))
        for name, position in phantom.landmarks.items():
            write_sphere_mask(out / name / f"{case}_{name}.nii.gz", phantom.geometry, position, radius)
        table[case] = phantom.landmarks
        provenance.append(f"{case},{member}")
    write_landmark_csv(out / "landmarks.csv", table)
    atomic_write_text(out / FAMILIES_TABLE, "\n".join(provenance) + "\n")
    return table


def read_families(folder: str | os.PathLike) -> dict[str, str]:
    """{case: family} of a folder ``write_mmwhs_phantoms`` wrote (every case ``analytic`` where no table exists)."""
    path = Path(folder) / FAMILIES_TABLE
    if not path.is_file():
        return {}
    return dict(line.split(",", 1) for line in path.read_text().splitlines()[1:] if line.strip())


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Generate synthetic cardiac CT phantoms in the MM-WHS CT release layout (ct_train/ + "
                    "landmark sphere masks + landmarks.csv).")
    parser.add_argument("-o", "--output", required=True, help="output folder (MM-WHS-like release root)")
    parser.add_argument("-n", "--num_cases", type=int, default=20, help="number of cases (default 20, as MM-WHS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", default=ANALYTIC,
                        help="analytic (default), real (real MM-WHS label maps deformed; needs the templates, see "
                             "nnunet_landmark/anatomy_phantoms.py), a template name, or several joined by '+'")
    parser.add_argument("--size", default="tiny",
                        help="tiny (48x48x40), small (96x96x72), realistic (512x512xN) or X,Y,Z")
    parser.add_argument("--pose_degrees", type=float, default=20.0, help="max random rotation of the heart")
    parser.add_argument("--oblique_degrees", type=float, default=8.0, help="max random tilt of the image axes")
    parser.add_argument("--no_flips", action="store_true", help="keep identity axis directions")
    args = parser.parse_args()
    size = tuple(int(s) for s in args.size.split(",")) if "," in args.size else args.size
    try:
        write_mmwhs_phantoms(args.output, args.num_cases, args.seed, size, pose_degrees=args.pose_degrees,
                             oblique_degrees=args.oblique_degrees, flips=not args.no_flips, family=args.family)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    print(f"wrote {args.num_cases} phantoms ({args.family}) to {args.output}")


if __name__ == "__main__":
    main()
