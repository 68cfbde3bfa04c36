"""Phantoms drawn on real anatomy: a real MM-WHS CT label map (a template), deformed, in a synthetic chest.

The analytic phantoms (``phantoms``) share one heart shape up to a few parameters; here every case is a real heart
(``../shared/data/mmwhs_ct_labels``: ``ct_train_1002``, ``ct_train_1005``) moved by a random smooth invertible
deformation and a global affine, then rendered with the analytic family's intensity, chest, noise, blur and image
geometry model (random spacing, direction cosines with flips and oblique tilts, origin).

* **Deformation** (template world mm -> phantom world mm): ``y = A (phi(x) - c) + p``. ``phi`` is the flow of a
  stationary velocity field (cubic B-spline-smooth random values on a coarse grid over the heart, integrated with
  ``STEPS`` midpoint steps), so it is smooth and invertible, its inverse the flow of ``-v``. ``A`` = rotation (up to
  ``pose_degrees``) x isotropic scale x a stretch along a random axis; ``c`` the template's LV centre; ``p`` the image
  centre plus a random shift, as for the analytic hearts.
* **Rendering**: every output voxel is mapped back (``A^-1``, then the flow of ``-v``) and takes the template's label
  there (nearest neighbour); intensities follow the labels as in ``phantoms``.
* **Landmarks** are derived from the deformed labels by the converter's rules (``convert_mmwhs.DERIVATION_RULES``),
  on a fine grid (``DERIVATION_SPACING_MM``) over the heart, independent of the image's coarse voxels; the
  template's own landmarks carried through the deformation check them (``TemplatePhantom.carried``).
"""
from __future__ import annotations

import functools
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.mmwhs import ASCENDING_AORTA, LANDMARKS, LEFT_ATRIUM, LV_CAVITY, RIGHT_VENTRICLE
from nnunet_landmark.phantoms import _random_rotation, _sample_intensities, _unit, render_chest, sample_geometry

TEMPLATES = ("ct_train_1002", "ct_train_1005")
TEMPLATE_VARIABLE = "nnUNet_landmark_templates"  # a folder of <template>_label.nii.gz files
STEPS = 8  # midpoint steps of the velocity field's flow
CONTROL_SPACING_MM = 24.0  # the velocity field's grid
MAX_VELOCITY_MM = 6.0  # the largest velocity on that grid (displacements of a few mm, up to ~8)
DERIVATION_SPACING_MM = 1.0
# adult LV cavity volume over the cardiac cycle, about 20 ml (end-systole) to 220 ml (end-diastole): CMR reference
# ranges of Kawel-Boehm et al., J Cardiovasc Magn Reson 17:29 (2015). The deformed hearts must stay inside
LV_VOLUME_RANGE_ML = (20.0, 220.0)


def template_folder() -> Path | None:
    """Where the template label maps are: ``$nnUNet_landmark_templates``, else ``shared/data/mmwhs_ct_labels`` beside a
    source checkout (of this package or of the working directory); None where none holds them."""
    if os.environ.get(TEMPLATE_VARIABLE):
        return Path(os.environ[TEMPLATE_VARIABLE])
    relative = Path("shared") / "data" / "mmwhs_ct_labels"
    for root in (Path(__file__).resolve().parents[2], Path.cwd().parent, Path.cwd()):
        if (root / relative / f"{TEMPLATES[0]}_label.nii.gz").is_file():
            return root / relative
    return None


@dataclass(frozen=True)
class Template:
    """A template label map cropped to its heart (+ margin), and its landmarks by the converter's rules."""

    name: str
    labels: np.ndarray  # (z, y, x) MM-WHS values
    geometry: ImageGeometry
    landmarks: "OrderedDict[str, np.ndarray]"
    lv_centre: np.ndarray  # world mm

    @property
    def lv_volume_ml(self) -> float:
        return float((self.labels == LV_CAVITY).sum() * np.prod(self.geometry.spacing) / 1000)


@functools.lru_cache(maxsize=4)
def load_template(name: str) -> Template:
    """The template ``name`` (e.g. ``ct_train_1002``) from ``template_folder()``, read once per process."""
    from nnunet_landmark.dataset_conversion.convert_mmwhs import derive_mmwhs_landmarks

    folder = template_folder()
    path = None if folder is None else folder / f"{name}_label.nii.gz"
    if path is None or not path.is_file():
        raise FileNotFoundError(f"template label map {name}_label.nii.gz not found "
                                f"({'in ' + str(folder) if folder else 'no template folder'}): the real-anatomy "
                                f"phantoms need real MM-WHS CT label maps; point {TEMPLATE_VARIABLE} at a folder of "
                                f"<case>_label.nii.gz files (the project's shared/data/mmwhs_ct_labels holds two)")
    image = sitk.ReadImage(str(path))
    labels = sitk.GetArrayFromImage(image).astype(np.int16)
    geometry = ImageGeometry.from_image(image)
    index = np.argwhere(labels > 0)
    margin = 8
    lo = np.maximum(index.min(axis=0) - margin, 0)
    hi = np.minimum(index.max(axis=0) + margin + 1, labels.shape)
    cropped = labels[tuple(slice(a, b) for a, b in zip(lo, hi))]
    cropped_geometry = ImageGeometry(tuple(geometry.index_to_world(lo[::-1].astype(float))), geometry.spacing,
                                     geometry.direction, tuple(int(s) for s in cropped.shape[::-1]))
    landmarks = derive_mmwhs_landmarks(cropped, cropped_geometry, list(LANDMARKS))
    lv = cropped_geometry.array_index_to_world(np.argwhere(cropped == LV_CAVITY).astype(float)).mean(axis=0)
    return Template(name, cropped, cropped_geometry, OrderedDict(landmarks), lv)


class VelocityFlow:
    """The flow of a stationary velocity field given on a regular world-axis-aligned grid (trilinear between its
    points, constant beyond them): ``forward`` maps points by the flow of v, ``backward`` by that of -v.

    Dense backward mapping (every voxel of an image) interpolates the flow's displacement from a lattice of
    ``LATTICE_MM`` over the field's grid (``backward_dense``): the flow is smooth on the control spacing's scale, so
    this is within ~0.05 mm of integrating every voxel, at a fraction of the cost.
    """

    LATTICE_MM = 3.0

    def __init__(self, origin: np.ndarray, spacing: float, values: np.ndarray, steps: int = STEPS):
        self.origin, self.spacing, self.values, self.steps = np.asarray(origin, float), float(spacing), values, steps
        self._backward_lattice: np.ndarray | None = None

    def velocity(self, points: np.ndarray) -> np.ndarray:
        grid = ((points - self.origin) / self.spacing).T
        return np.stack([ndimage.map_coordinates(self.values[..., c], grid, order=1, mode="nearest")
                         for c in range(3)], axis=-1)

    def _flow(self, points: np.ndarray, sign: float) -> np.ndarray:
        x = np.array(points, dtype=np.float64, copy=True)
        h = sign / self.steps
        for _ in range(self.steps):  # midpoint (RK2) steps: the two directions invert each other to ~1e-2 mm
            x += h * self.velocity(x + 0.5 * h * self.velocity(x))
        return x

    def forward(self, points: np.ndarray) -> np.ndarray:
        return self._flow(points, 1.0)

    def backward(self, points: np.ndarray) -> np.ndarray:
        return self._flow(points, -1.0)

    def backward_dense(self, points: np.ndarray) -> np.ndarray:
        """``backward`` for many points, through the displacement interpolated from the lattice."""
        step = self.LATTICE_MM / self.spacing  # lattice steps in grid units
        if self._backward_lattice is None:
            extent = (np.asarray(self.values.shape[:3]) - 1) / step
            axes = [np.arange(int(np.ceil(e)) + 1) * self.LATTICE_MM for e in extent]
            lattice = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3) + self.origin
            self._backward_lattice = (self.backward(lattice) - lattice).reshape(*[len(a) for a in axes], 3)
        grid = ((points - self.origin) / self.LATTICE_MM).T
        return points + np.stack([ndimage.map_coordinates(self._backward_lattice[..., c], grid, order=1,
                                                          mode="nearest") for c in range(3)], axis=-1)


def random_velocity_field(rng: np.random.Generator, template: Template, max_velocity_mm: float = MAX_VELOCITY_MM,
                          control_spacing_mm: float = CONTROL_SPACING_MM) -> VelocityFlow:
    """Random smooth velocities on a grid covering the template's heart (+ one control spacing), largest
    ``max_velocity_mm``: independent normal values smoothed by a Gaussian of one grid step."""
    corners = template.geometry.array_index_to_world(
        np.array([[z, y, x] for z in (0, template.labels.shape[0] - 1) for y in (0, template.labels.shape[1] - 1)
                  for x in (0, template.labels.shape[2] - 1)], dtype=float))
    lo = corners.min(axis=0) - control_spacing_mm
    hi = corners.max(axis=0) + control_spacing_mm
    shape = tuple(int(np.ceil((b - a) / control_spacing_mm)) + 1 for a, b in zip(lo, hi))
    values = ndimage.gaussian_filter(rng.normal(size=(*shape, 3)), sigma=(1, 1, 1, 0), mode="nearest")
    values *= max_velocity_mm / max(np.abs(values).max(), 1e-9)
    return VelocityFlow(lo, control_spacing_mm, values)


@dataclass(frozen=True)
class TemplateDeformation:
    """``y = A (flow(x) - c) + p`` (template world -> phantom world) and its inverse."""

    flow: VelocityFlow
    matrix: np.ndarray  # A
    centre: np.ndarray  # c
    position: np.ndarray  # p

    def forward(self, points: np.ndarray) -> np.ndarray:
        return (self.flow.forward(np.atleast_2d(points)) - self.centre) @ self.matrix.T + self.position

    def backward(self, points: np.ndarray, dense: bool = False) -> np.ndarray:
        local = (np.atleast_2d(points) - self.position) @ np.linalg.inv(self.matrix).T + self.centre
        return self.flow.backward_dense(local) if dense else self.flow.backward(local)


def random_affine(rng: np.random.Generator, pose_degrees: float = 20.0, scale: tuple = (0.88, 1.12),
                  stretch: tuple = (0.92, 1.08)) -> np.ndarray:
    """Rotation (up to ``pose_degrees``) x isotropic scale x a stretch along a random axis (adult hearts differ in
    size by about this much; the LV volume check keeps the result physiological)."""
    axis = _unit(rng.normal(size=3))
    stretch_matrix = np.eye(3) + (rng.uniform(*stretch) - 1.0) * np.outer(axis, axis)
    return _random_rotation(rng, pose_degrees) @ (rng.uniform(*scale) * stretch_matrix)


def sample_deformation(rng: np.random.Generator, template: Template, image_centre: np.ndarray,
                       pose_degrees: float = 20.0, shift_mm: float = 12.0) -> TemplateDeformation:
    flow = random_velocity_field(rng, template)
    matrix = random_affine(rng, pose_degrees)
    return TemplateDeformation(flow, matrix, template.lv_centre,
                               np.asarray(image_centre, float) + rng.uniform(-shift_mm, shift_mm, size=3))


def deformed_labels(template: Template, deformation: TemplateDeformation, geometry: ImageGeometry,
                    slab_voxels: int = 2_000_000) -> np.ndarray:
    """The template's labels on ``geometry``'s grid under ``deformation`` ((z, y, x) int16, nearest neighbour)."""
    nx, ny, nz = geometry.size
    out = np.zeros((nz, ny, nx), dtype=np.int16)
    jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    rows = max(1, slab_voxels // (nx * ny))
    for z0 in range(0, nz, rows):
        kk = np.arange(z0, min(nz, z0 + rows))
        index = np.stack(np.broadcast_arrays(ii[None], jj[None], kk[:, None, None]), axis=-1).reshape(-1, 3)
        world = geometry.index_to_world(index.astype(np.float64))
        source = template.geometry.world_to_array_index(deformation.backward(world, dense=True))  # (z, y, x)
        sampled = ndimage.map_coordinates(template.labels, source.T, order=0, mode="constant", cval=0)
        out[kk[0]:kk[-1] + 1] = sampled.reshape(len(kk), ny, nx)
    return out


def derivation_geometry(template: Template, deformation: TemplateDeformation,
                        spacing_mm: float = DERIVATION_SPACING_MM, margin_mm: float = 4.0) -> ImageGeometry:
    """A world-axis-aligned grid of ``spacing_mm`` covering the deformed structures the landmark rules read (LV
    cavity, LA, ascending aorta), where the landmarks are derived."""
    index = np.argwhere(np.isin(template.labels, (LV_CAVITY, LEFT_ATRIUM, ASCENDING_AORTA)))
    corners = template.geometry.array_index_to_world(np.concatenate([index.min(axis=0)[None], index.max(axis=0)[None]])
                                                     .astype(float))
    box = np.array([[a, b, c] for a in corners[:, 0] for b in corners[:, 1] for c in corners[:, 2]])
    mapped = deformation.forward(box)
    lo, hi = mapped.min(axis=0) - margin_mm, mapped.max(axis=0) + margin_mm
    size = tuple(int(np.ceil((b - a) / spacing_mm)) + 1 for a, b in zip(lo, hi))
    return ImageGeometry(tuple(lo), (spacing_mm,) * 3, tuple(np.eye(3).ravel()), size)


@dataclass
class TemplatePhantom:
    image: sitk.Image
    label: sitk.Image
    landmarks: "OrderedDict[str, np.ndarray]"  # derived from the deformed labels (the truth)
    carried: "OrderedDict[str, np.ndarray]"  # the template's landmarks through the deformation (the check)
    geometry: ImageGeometry
    template: str
    lv_volume_ml: float
    deformation: TemplateDeformation


def generate_template_phantom(seed: int, template_name: str, size: str | tuple[int, int, int] = "tiny",
                              pose_degrees: float = 20.0, oblique_degrees: float = 8.0,
                              flips: bool = True) -> TemplatePhantom:
    """One reproducible real-anatomy phantom (see the module docstring)."""
    from nnunet_landmark.dataset_conversion.convert_mmwhs import derive_mmwhs_landmarks

    template = load_template(template_name)
    rng = np.random.default_rng(seed)
    geometry = sample_geometry(rng, size, oblique_degrees, flips)
    image_centre = geometry.index_to_world((np.asarray(geometry.size) - 1) / 2)
    deformation = sample_deformation(rng, template, image_centre, pose_degrees)
    hu = _sample_intensities(rng)

    fine = derivation_geometry(template, deformation)
    fine_labels = deformed_labels(template, deformation, fine)
    landmarks = OrderedDict(derive_mmwhs_landmarks(fine_labels, fine, list(LANDMARKS)))
    carried = OrderedDict((n, deformation.forward(p)[0]) for n, p in template.landmarks.items())
    lv_volume = float((fine_labels == LV_CAVITY).sum() * np.prod(fine.spacing) / 1000)

    labels = deformed_labels(template, deformation, geometry)
    body_centre = landmarks["mitral_valve"] + np.array([-35.0, 30.0, 0.0]) + rng.uniform(-8, 8, size=3)
    spacing_zyx = np.asarray(geometry.spacing[::-1])
    heart = labels > 0
    rv_wall = (ndimage.distance_transform_edt(labels != RIGHT_VENTRICLE, sampling=spacing_zyx) <= 3.5) & ~heart
    heart_near = ndimage.distance_transform_edt(~(heart | rv_wall), sampling=spacing_zyx) <= 6.0
    hu_image = render_chest_on_grid(geometry, labels, rv_wall, heart | rv_wall, heart_near,
                                    landmarks["mitral_valve"], body_centre, hu)
    sigma_vox = [hu["blur_mm"] / s for s in geometry.spacing[::-1]]
    hu_image = ndimage.gaussian_filter(hu_image, sigma_vox)
    hu_image += rng.normal(0, hu["noise_sd"], size=hu_image.shape).astype(np.float32)
    image = geometry.apply_to(sitk.GetImageFromArray(np.clip(np.round(hu_image), -1024, 3071).astype(np.int16)))
    return TemplatePhantom(image, geometry.apply_to(sitk.GetImageFromArray(labels)), landmarks, carried, geometry,
                           template_name, lv_volume, deformation)


def render_chest_on_grid(geometry: ImageGeometry, labels: np.ndarray, rv_wall: np.ndarray, heart_any: np.ndarray,
                         heart_near: np.ndarray, mitral_valve: np.ndarray, body_centre: np.ndarray,
                         hu: dict) -> np.ndarray:
    """``phantoms.render_chest`` over a whole image grid, a slab of slices at a time (float32 HU, (z, y, x))."""
    nx, ny, nz = geometry.size
    out = np.zeros((nz, ny, nx), dtype=np.float32)
    jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    rows = max(1, int(4_000_000 // (nx * ny)))
    for z0 in range(0, nz, rows):
        kk = np.arange(z0, min(nz, z0 + rows))
        index = np.stack(np.broadcast_arrays(ii[None], jj[None], kk[:, None, None]), axis=-1).astype(np.float64)
        coords = geometry.index_to_world(index).astype(np.float32)
        box = slice(kk[0], kk[-1] + 1)
        out[box] = render_chest(coords, labels[box], rv_wall[box], heart_any[box], heart_near[box], mitral_valve,
                                body_centre, hu, keep_descending_aorta_off=heart_near[box])
    return out
