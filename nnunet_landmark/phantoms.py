"""Synthetic contrast-enhanced cardiac CT phantoms in the exact MM-WHS CT release layout.

Real MM-WHS data cannot be downloaded here, so tests, the demo and the accuracy study use these. Each
phantom is an analytic heart in a chest: a half-ellipsoid LV cavity (label 500) inside a myocardial
shell (205), the LA (420) behind the mitral valve, the RV (600) wrapped around the septum, the RA (550),
ascending aorta (820) and pulmonary artery (850) as tubes, plus what makes it look like a CT and
makes the task non-trivial: contrast in every chamber and in the descending aorta (so the LV must be
told apart by shape), pericardial fat, lungs, spine, body outline, blur and noise. Pose, size,
spacing (anisotropic), direction cosines and origin are random; a seed makes a case reproducible.

Layout written by ``phantom_families.write_mmwhs_phantoms`` (the MM-WHS CT release plus our annotations)::

    OUT/ct_train/ct_train_1001_image.nii.gz      int16 HU
    OUT/ct_train/ct_train_1001_label.nii.gz      int16, {0, 205, 420, 500, 550, 600, 820, 850}
    OUT/apex/ct_train_1001_apex.nii.gz           ITK-SNAP-style sphere mask, one per landmark
    OUT/mitral_valve/ct_train_1001_mitral_valve.nii.gz
    OUT/aortic_valve/ct_train_1001_aortic_valve.nii.gz
    OUT/landmarks.csv                            case,name,x,y,z (LPS mm), all cases and landmarks
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_landmark.geometry import ImageGeometry
from nnunet_landmark.mmwhs import LANDMARKS

# image sizes (x, y, z voxels) and the in-plane field of view (mm) of the presets
SIZE_PRESETS = {
    "tiny": ((48, 48, 40), (200.0, 240.0)),
    "small": ((96, 96, 72), (200.0, 240.0)),
    "realistic": ((512, 512, None), (200.0, 250.0)),
}


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _orthogonal_part(v, axis) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return _unit(v - np.dot(v, axis) * axis)


def _random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A rotation about a uniformly random axis by an angle uniform in [-max, max] degrees."""
    axis = _unit(rng.normal(size=3))
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


@dataclass
class HeartAnatomy:
    """The analytic heart of one phantom, world LPS mm. The frame (u, v, w) is orthonormal."""

    mitral_valve: np.ndarray  # centre of the LV-LA interface, origin of the heart frame
    u: np.ndarray  # LV long axis, mitral valve -> apex (left, anterior, inferior)
    v: np.ndarray  # towards the RV (anterior-right), orthogonal to u
    lv_length: float  # cavity length along u: the apex is mitral_valve + lv_length * u
    lv_radius: float
    wall: float  # LV myocardial thickness
    la_radius: float
    aorta_radius: float
    pa_radius: float
    aorta_direction: np.ndarray
    pa_direction: np.ndarray

    @property
    def w(self) -> np.ndarray:
        return np.cross(self.u, self.v)

    @property
    def apex(self) -> np.ndarray:
        return self.mitral_valve + self.lv_length * self.u

    @property
    def mitral_orifice_radius(self) -> float:
        return 0.6 * 1.1 * self.la_radius  # the LA ellipsoid's cross-section in the base plane

    @property
    def aortic_valve(self) -> np.ndarray:
        offset = self.mitral_orifice_radius + self.aorta_radius + 1.5
        return self.mitral_valve + offset * self.v

    @property
    def pulmonary_valve(self) -> np.ndarray:
        return self.mitral_valve - 0.12 * self.lv_length * self.u + (self.lv_radius + self.wall + 14) * self.v \
            + 14 * self.w

    @property
    def landmarks(self) -> "OrderedDict[str, np.ndarray]":
        return OrderedDict(zip(LANDMARKS, (self.apex, self.mitral_valve, self.aortic_valve)))


@dataclass
class Phantom:
    image: sitk.Image  # int16 HU
    label: sitk.Image  # int16 MM-WHS label values
    anatomy: HeartAnatomy
    geometry: ImageGeometry
    intensities: dict = field(default_factory=dict)

    @property
    def landmarks(self) -> "OrderedDict[str, np.ndarray]":
        return self.anatomy.landmarks


def sample_anatomy(rng: np.random.Generator, center: np.ndarray, pose_degrees: float = 20.0,
                   shift_mm: float = 12.0) -> HeartAnatomy:
    """Draw heart size and pose. ``center`` is where the middle of the LV ends up (plus a random shift)."""
    scale = rng.uniform(0.85, 1.15)
    rotation = _random_rotation(rng, pose_degrees)
    u = rotation @ _unit([0.6, -0.5, -0.62])
    v = rotation @ _orthogonal_part([-0.5, -1.0, 0.1], _unit([0.6, -0.5, -0.62]))
    # mitral valve -> apex: 70-100 mm in real CT (shared/data README); the size scale alone would reach 58-106
    lv_length = float(np.clip(rng.uniform(68, 92) * scale, 65.0, 105.0))
    anatomy = HeartAnatomy(
        mitral_valve=np.zeros(3), u=u, v=v, lv_length=lv_length, lv_radius=rng.uniform(20, 26) * scale,
        wall=rng.uniform(8, 12), la_radius=rng.uniform(17, 22) * scale, aorta_radius=rng.uniform(10, 13) * scale,
        pa_radius=rng.uniform(9.5, 12) * scale,
        aorta_direction=rotation @ _unit([-0.25, -0.15, 1.0]), pa_direction=rotation @ _unit([0.35, 0.7, 1.0]))
    mid_lv = center + rng.uniform(-shift_mm, shift_mm, size=3)
    anatomy.mitral_valve = mid_lv - 0.4 * lv_length * u
    return anatomy


def _ellipsoid(coords, center, axes, radii) -> np.ndarray:
    total = np.zeros(coords.shape[:-1], dtype=np.float32)
    d = coords - center.astype(np.float32)
    for axis, radius in zip(axes, radii):
        total += ((d @ axis.astype(np.float32)) / np.float32(radius)) ** 2
    return total <= 1


def _tube(coords, start, direction, length, radius) -> np.ndarray:
    d = coords - start.astype(np.float32)
    t = d @ direction.astype(np.float32)
    radial = np.linalg.norm(d - t[..., None] * direction.astype(np.float32), axis=-1)
    return (t >= 0) & (t <= length) & (radial <= radius)


def _vertical_cylinder(coords, center, radius_x, radius_y) -> np.ndarray:
    return ((coords[..., 0] - center[0]) / radius_x) ** 2 + ((coords[..., 1] - center[1]) / radius_y) ** 2 <= 1


def _render_slab(coords: np.ndarray, a: HeartAnatomy, body_center: np.ndarray, hu: dict):
    """Labels and HU (before blur and noise) for an array of world points (..., 3)."""
    u, v, w = a.u, a.v, a.w
    m = a.mitral_valve
    frame = np.stack([u, v, w])
    s = (coords - m.astype(np.float32)) @ u.astype(np.float32)

    lv_cavity = _ellipsoid(coords, m, frame, (a.lv_length, a.lv_radius, a.lv_radius)) & (s >= 0)
    lv_outer = _ellipsoid(coords, m, frame, (a.lv_length + a.wall, a.lv_radius + a.wall, a.lv_radius + a.wall)) \
        & (s >= -1.0)
    la_center = m - 0.8 * a.la_radius * u
    la = _ellipsoid(coords, la_center, frame, (a.la_radius, 1.1 * a.la_radius, 1.15 * a.la_radius)) & (s < 0)
    ra_center = la_center + (0.9 * a.la_radius + 22) * v - 16 * w
    ra = _ellipsoid(coords, ra_center, frame, (20.0, 17.0, 22.0)) & ~la
    rv_center = m + 0.42 * a.lv_length * u + (a.lv_radius + a.wall + 6) * v
    rv_radii = (0.58 * a.lv_length, 17.0, a.lv_radius + a.wall + 9)
    rv_shape = _ellipsoid(coords, rv_center, frame, rv_radii)
    rv = rv_shape & ~lv_outer
    rv_wall = _ellipsoid(coords, rv_center, frame, tuple(r + 3.5 for r in rv_radii)) & ~rv_shape & ~lv_outer
    aorta = _tube(coords, a.aortic_valve, a.aorta_direction, 65.0, a.aorta_radius)
    pa = _tube(coords, a.pulmonary_valve, a.pa_direction, 55.0, a.pa_radius) & ~aorta

    heart_any = lv_outer | la | ra | rv_shape | rv_wall
    heart_near = ndimage_free_dilation(coords, a, margin=6.0)

    label = np.zeros(coords.shape[:-1], dtype=np.int16)
    label[lv_outer & (s >= 0)] = 205
    label[rv] = 600
    label[ra] = 550
    label[la] = 420
    label[pa] = 850
    label[aorta] = 820
    label[lv_cavity] = 500
    return label, render_chest(coords, label, rv_wall, heart_any, heart_near, a.mitral_valve, body_center, hu)


def render_chest(coords: np.ndarray, label: np.ndarray, rv_wall: np.ndarray, heart_any: np.ndarray,
                 heart_near: np.ndarray, mitral_valve: np.ndarray, body_center: np.ndarray, hu: dict,
                 keep_descending_aorta_off: np.ndarray | None = None) -> np.ndarray:
    """HU (before blur and noise) of a chest around a heart given by its MM-WHS ``label``s, for world points
    ``coords`` (..., 3): body, fat, lungs, spine and descending aorta (placed from ``mitral_valve`` and
    ``body_center``), pericardial fat in ``heart_near`` outside ``heart_any``, myocardium (label 205 and ``rv_wall``)
    and contrast blood in every chamber. ``keep_descending_aorta_off``: where the descending aorta may not go (a real
    heart's atrium can lie where the analytic one's does not)."""
    desc_aorta_center = mitral_valve + np.array([25.0, 45.0, 0.0])
    descending_aorta = _vertical_cylinder(coords, desc_aorta_center, 11.0, 11.0)
    if keep_descending_aorta_off is not None:
        descending_aorta &= ~keep_descending_aorta_off
    spine_center = body_center + np.array([8.0, 75.0, 0.0])
    vertebra = _vertical_cylinder(coords, spine_center, 19.0, 17.0)
    vertebra_core = _vertical_cylinder(coords, spine_center, 16.5, 14.5)
    body = _vertical_cylinder(coords, body_center, 165.0, 120.0)
    body_core = _vertical_cylinder(coords, body_center, 153.0, 108.0)
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lung_center = body_center + np.array([side * 78.0, 5.0, 0.0])
        lungs |= _ellipsoid(coords, lung_center, np.eye(3), (62.0, 88.0, 190.0))
    lungs &= ~heart_near & ~descending_aorta & ~vertebra & body_core

    image = np.full(coords.shape[:-1], -1000.0, dtype=np.float32)
    image[body] = hu["fat"]
    image[body_core] = hu["soft_tissue"]
    image[lungs] = hu["lung"]
    image[heart_near & ~heart_any & body_core] = hu["fat"]
    image[vertebra] = hu["cortical_bone"]
    image[vertebra_core] = hu["bone"]
    image[descending_aorta] = hu["blood"] * hu["scale_descending_aorta"]
    image[rv_wall | (label == 205)] = hu["myocardium"]
    for value in (600, 550, 420, 850, 820, 500):
        image[label == value] = hu["blood"] * hu[f"scale_{value}"]
    return image


def ndimage_free_dilation(coords, a: HeartAnatomy, margin: float) -> np.ndarray:
    """The heart's outline grown by ``margin`` mm, analytically (cheaper than a morphological dilation)."""
    u, v, w = a.u, a.v, a.w
    frame = np.stack([u, v, w])
    m = a.mitral_valve
    s = (coords - m.astype(np.float32)) @ u.astype(np.float32)
    grown = _ellipsoid(coords, m, frame, (a.lv_length + a.wall + margin,) + (a.lv_radius + a.wall + margin,) * 2) \
        & (s >= -1.0 - margin)
    la_center = m - 0.8 * a.la_radius * u
    grown |= _ellipsoid(coords, la_center, frame, (a.la_radius + margin, 1.1 * a.la_radius + margin,
                                                   1.15 * a.la_radius + margin))
    grown |= _ellipsoid(coords, la_center + (0.9 * a.la_radius + 22) * v - 16 * w, frame,
                        (20.0 + margin, 17.0 + margin, 22.0 + margin))
    rv_center = m + 0.42 * a.lv_length * u + (a.lv_radius + a.wall + 6) * v
    grown |= _ellipsoid(coords, rv_center, frame,
                        (0.58 * a.lv_length + 3.5 + margin, 20.5 + margin, a.lv_radius + a.wall + 12.5 + margin))
    grown |= _tube(coords, a.aortic_valve, a.aorta_direction, 65.0, a.aorta_radius + margin)
    grown |= _tube(coords, a.pulmonary_valve, a.pa_direction, 55.0, a.pa_radius + margin)
    return grown


def sample_geometry(rng: np.random.Generator, size: str | tuple[int, int, int] = "tiny",
                    oblique_degrees: float = 8.0, flips: bool = True) -> ImageGeometry:
    """Random anisotropic spacing, direction cosines (axis flips, small oblique tilt) and origin.

    The image centre is placed at world (0, 0, 0) + a random offset; ``generate_phantom`` centres the
    heart there.
    """
    if isinstance(size, str):
        if size not in SIZE_PRESETS:
            raise ValueError(f"unknown size preset {size!r}; use one of {sorted(SIZE_PRESETS)} or (x, y, z)")
        shape, fov_range = SIZE_PRESETS[size]
    else:
        shape, fov_range = tuple(int(s) for s in size), (200.0, 240.0)
    fov = rng.uniform(*fov_range)
    spacing_xy = fov / shape[0]
    spacing_z = spacing_xy * rng.uniform(1.15, 1.6)  # always anisotropic (MM-WHS CT: z/xy ~ 1.28)
    if shape[2] is None:  # realistic preset: 120-180 mm in z
        shape = (shape[0], shape[1], int(round(rng.uniform(120, 180) / spacing_z)))
    direction = np.eye(3)
    if flips:
        choices = [np.diag([1.0, 1.0, 1.0]), np.diag([1.0, -1.0, 1.0]), np.diag([-1.0, -1.0, 1.0]),
                   np.diag([1.0, -1.0, -1.0])]
        direction = choices[rng.integers(len(choices))]
    if oblique_degrees > 0:
        direction = _random_rotation(rng, oblique_degrees) @ direction
    spacing = np.array([spacing_xy, spacing_xy, spacing_z])
    half_extent = direction @ (spacing * (np.asarray(shape) - 1) / 2)
    center = rng.uniform(-40, 40, size=3)
    origin = center - half_extent
    return ImageGeometry(tuple(origin), tuple(spacing), tuple(direction.ravel()), tuple(int(s) for s in shape))


def _sample_intensities(rng: np.random.Generator) -> dict:
    blood = rng.uniform(330, 500)  # times the per-chamber scale 0.93-1.07: medians 307-535 HU, as in contrast CT
    hu = {"blood": blood, "myocardium": rng.uniform(70, 150), "fat": rng.uniform(-120, -70),
          "soft_tissue": rng.uniform(20, 60), "lung": rng.uniform(-900, -780), "bone": rng.uniform(250, 450),
          "cortical_bone": rng.uniform(650, 950), "noise_sd": rng.uniform(12, 35), "blur_mm": rng.uniform(0.5, 1.1),
          "scale_descending_aorta": rng.uniform(0.93, 1.07)}
    for value in (600, 550, 420, 850, 820, 500):
        hu[f"scale_{value}"] = rng.uniform(0.93, 1.07)
    return hu


def generate_phantom(seed: int, size: str | tuple[int, int, int] = "tiny", pose_degrees: float = 20.0,
                     oblique_degrees: float = 8.0, flips: bool = True) -> Phantom:
    """One reproducible phantom: image, labels, the analytic anatomy and its landmarks."""
    rng = np.random.default_rng(seed)
    geometry = sample_geometry(rng, size, oblique_degrees, flips)
    image_center = geometry.index_to_world((np.asarray(geometry.size) - 1) / 2)
    anatomy = sample_anatomy(rng, image_center, pose_degrees)
    hu = _sample_intensities(rng)
    body_center = anatomy.mitral_valve + np.array([-35.0, 30.0, 0.0]) + rng.uniform(-8, 8, size=3)

    nx, ny, nz = geometry.size
    label = np.zeros((nz, ny, nx), dtype=np.int16)
    hu_image = np.zeros((nz, ny, nx), dtype=np.float32)
    jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    slab = max(1, int(4_000_000 // (nx * ny)))
    for z0 in range(0, nz, slab):
        kk = np.arange(z0, min(nz, z0 + slab))
        index = np.stack(np.broadcast_arrays(ii[None], jj[None], kk[:, None, None]), axis=-1).astype(np.float64)
        coords = geometry.index_to_world(index).astype(np.float32)
        label[kk[0]:kk[-1] + 1], hu_image[kk[0]:kk[-1] + 1] = _render_slab(coords, anatomy, body_center, hu)

    sigma_vox = [hu["blur_mm"] / s for s in geometry.spacing[::-1]]
    hu_image = ndimage.gaussian_filter(hu_image, sigma_vox)
    hu_image += rng.normal(0, hu["noise_sd"], size=hu_image.shape).astype(np.float32)
    image = geometry.apply_to(sitk.GetImageFromArray(np.clip(np.round(hu_image), -1024, 3071).astype(np.int16)))
    label_image = geometry.apply_to(sitk.GetImageFromArray(label))
    return Phantom(image, label_image, anatomy, geometry, hu)
