"""Surfaces of a segmentation for 3D Slicer and ParaView: marching cubes of one label in world LPS mm, its volume, and
the mesh written with meshio (.vtk, .stl, .ply, .obj) tagged ``SPACE=LPS``."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_landmark.geometry import ImageGeometry

MESH_FORMATS = {".vtk": "vtk42", ".stl": "stl", ".ply": "ply", ".obj": "obj"}


class SurfaceError(ValueError):
    """A surface that cannot be made or written (a label absent, an unknown format)."""


def label_surface(segmentation: sitk.Image, label: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes surface of one label: vertices (V, 3) in world LPS mm, triangles (F, 3), outward normals.

    Vertices lie half-way between a voxel centre inside and one outside the label (level 0.5 on the mask), so
    within half a voxel of the label's boundary. The mask is padded so that the surface is closed at the image
    border.
    """
    from skimage.measure import marching_cubes

    array = sitk.GetArrayViewFromImage(segmentation)  # (z, y, x)
    mask = np.pad(array == label, 1)
    if not mask.any():
        present = [int(v) for v in np.unique(array) if v != 0]
        raise SurfaceError(f"label {label} is absent from the segmentation (labels present: {present or 'none'}); "
                             f"choose the LV cavity's label with --label")
    vertices, faces, _, _ = marching_cubes(mask.astype(np.float32), level=0.5)
    geometry = ImageGeometry.from_image(segmentation)
    world = geometry.array_index_to_world(vertices.astype(np.float64) - 1.0)  # undo the padding
    # (z, y, x) -> (x, y, z) is a reflection, and so is a direction matrix with determinant -1: a mirroring map
    # turns the triangles' winding, hence their normals, inside out
    array_to_world = geometry.index_to_world_matrix[:, ::-1]
    if np.linalg.det(array_to_world) > 0:
        faces = faces[:, ::-1]
    return world, np.ascontiguousarray(faces, dtype=np.int64)


def mesh_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Signed volume (mm^3) of a closed triangle mesh: positive when the normals point outwards."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    return float(np.sum(np.einsum("ij,ij->i", a, np.cross(b, c))) / 6.0)


def write_surface(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write a triangle mesh (world LPS mm) as .vtk, .stl (binary), .ply (binary) or .obj with meshio.

    .vtk is legacy format 4.2 (what Slicer writes; 5.1 needs VTK >= 9), an unstructured grid of triangles, which
    3D Slicer and ParaView open as a surface. 3D Slicer (since 4.11) reads mesh files as LPS unless their header
    says ``SPACE=RAS``; we also put ``SPACE=LPS`` where Slicer's model reader looks for it (VTK title, PLY and OBJ
    comment, STL header), as Slicer itself writes it, so the file cannot be misread even where Slicer's default
    was changed. ParaView has no coordinate system and ignores the tag.
    """
    import meshio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_FORMATS:
        raise SurfaceError(f"{path}: unknown surface format '{suffix}'; use one of {', '.join(MESH_FORMATS)}")
    # int32: PLY has no 64-bit integers (meshio would warn and cast)
    mesh = meshio.Mesh(np.asarray(vertices, dtype=np.float64), [("triangle", np.asarray(faces, dtype=np.int32))])
    kwargs = {"binary": True} if suffix in (".vtk", ".stl", ".ply") else {}
    meshio.write(path, mesh, file_format=MESH_FORMATS[suffix], **kwargs)
    _tag_lps(path, suffix)


def _tag_lps(path: Path, suffix: str) -> None:
    """Put ``SPACE=LPS`` where Slicer's model reader looks for the coordinate system."""
    data = path.read_bytes()
    tag = b"nnunet-landmark surface, SPACE=LPS, mm"
    if suffix == ".vtk":  # the second line is the file's free-text title
        lines = data.split(b"\n", 2)
        data = b"\n".join([lines[0], tag, lines[2]])
    elif suffix == ".ply":  # a comment after the 'format' line
        lines = data.split(b"\n", 2)
        data = b"\n".join([lines[0], lines[1], b"comment " + tag, lines[2]])
    elif suffix == ".obj":
        data = b"# " + tag + b"\n" + data
    elif suffix == ".stl":  # binary: an 80-byte free header that must not start with 'solid'
        data = tag.ljust(80, b" ") + data[80:]
    path.write_bytes(data)
