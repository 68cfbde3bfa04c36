"""The one place for coordinate conversions.

Three spaces, and only these three:

* **world**: ITK/LPS physical points in mm, ``(x, y, z)``. What Slicer (LPS markups), ITK-SNAP and our
  landmark files store.
* **image index**: ITK continuous index ``(i, j, k)`` in ``(x, y, z)`` order of the original image,
  ``world = origin + D @ (spacing * index)``. A SimpleITK/NumPy array is indexed ``[k, j, i]``; nnU-Net's
  readers hand the same ``(z, y, x)`` array order to preprocessing ("array index" below is that order).
* **preprocessed index**: continuous voxel index into the array nnU-Net trains on, after
  ``transpose_forward``, cropping to the nonzero bounding box and resampling to the target spacing
  (nnunetv2 2.8.1 ``DefaultPreprocessor.run_case_npy``). Resampling maps voxel centres:
  ``i_new = (i_old + 0.5) * new_shape / old_shape - 0.5``.

Every point array here is ``(..., 3)`` float64 so single points and batches share one code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

# LPS <-> RAS flips x and y
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _points(p: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.shape[-1] != 3:
        raise ValueError(f"expected points with 3 coordinates in the last axis, got shape {arr.shape}")
    return arr


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Flip x and y: LPS <-> RAS (the same operation both ways)."""
    return _points(points) @ LPS_TO_RAS


ras_to_lps = lps_to_ras


@dataclass(frozen=True)
class ImageGeometry:
    """Origin, spacing and direction of an ITK image: the world <-> image index mapping."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, as SimpleITK reports them
    size: tuple[int, int, int] | None = None  # (x, y, z) voxels, when known

    def __post_init__(self):
        if len(self.origin) != 3 or len(self.spacing) != 3 or len(self.direction) != 9:
            raise ValueError("ImageGeometry is 3D only: origin and spacing need 3 values, direction 9")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def index_to_world_matrix(self) -> np.ndarray:
        """``D @ diag(spacing)``: maps an index offset to a world offset."""
        return self.direction_matrix @ np.diag(np.asarray(self.spacing, dtype=np.float64))

    @classmethod
    def from_image(cls, image: sitk.Image) -> "ImageGeometry":
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(tuple(image.GetOrigin()), tuple(image.GetSpacing()), tuple(image.GetDirection()),
                   tuple(int(s) for s in image.GetSize()))

    @classmethod
    def from_file(cls, path: str) -> "ImageGeometry":
        """Read only the header of an image file."""
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise ValueError(f"{path}: cannot read the image header ({str(e).strip().splitlines()[-1]})") from e
        if reader.GetDimension() != 3:
            raise ValueError(f"{path}: expected a 3D image, got {reader.GetDimension()}D")
        return cls(tuple(reader.GetOrigin()), tuple(reader.GetSpacing()), tuple(reader.GetDirection()),
                   tuple(int(s) for s in reader.GetSize()))

    @classmethod
    def from_nnunet_properties(cls, properties: dict) -> "ImageGeometry":
        """From the properties nnU-Net's SimpleITK reader stores (``properties['sitk_stuff']``)."""
        if "sitk_stuff" not in properties:
            raise ValueError("these nnU-Net properties hold no 'sitk_stuff': only SimpleITK-based readers "
                             "(SimpleITKIO, the default for .nii.gz/.mha/.nrrd) are supported for landmarks")
        s = properties["sitk_stuff"]
        return cls(tuple(s["origin"]), tuple(s["spacing"]), tuple(np.asarray(s["direction"]).ravel()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    def world_to_index(self, points) -> np.ndarray:
        """World (LPS mm) -> continuous ITK index (x, y, z)."""
        return (_points(points) - np.asarray(self.origin)) @ np.linalg.inv(self.index_to_world_matrix).T

    def index_to_world(self, index) -> np.ndarray:
        """Continuous ITK index (x, y, z) -> world (LPS mm)."""
        return _points(index) @ self.index_to_world_matrix.T + np.asarray(self.origin)

    def world_to_array_index(self, points) -> np.ndarray:
        """World -> continuous index in NumPy array order (z, y, x)."""
        return self.world_to_index(points)[..., ::-1]

    def array_index_to_world(self, array_index) -> np.ndarray:
        return self.index_to_world(_points(array_index)[..., ::-1])

    def contains_world_point(self, points, margin_voxels: float = 0.5) -> np.ndarray:
        """True where a world point lies inside the image extent (voxel centres +- ``margin_voxels``)."""
        if self.size is None:
            raise ValueError("image size unknown: build the geometry from an image or file")
        idx = self.world_to_index(points)
        return np.all((idx >= -margin_voxels) & (idx <= np.asarray(self.size) - 1 + margin_voxels), axis=-1)

    def same_grid_as(self, other: "ImageGeometry", tolerance: float = 1e-4) -> bool:
        """Same size, spacing, origin and direction (relative tolerance on spacing/origin in mm)."""
        if self.size is not None and other.size is not None and tuple(self.size) != tuple(other.size):
            return False
        scale = max(1.0, float(np.max(np.abs(self.spacing))))
        return (np.allclose(self.spacing, other.spacing, atol=tolerance * scale)
                and np.allclose(self.origin, other.origin, atol=tolerance * 100 * scale)
                and np.allclose(self.direction, other.direction, atol=tolerance))


@dataclass(frozen=True)
class PreprocessedGeometry:
    """The array index <-> preprocessed index mapping of one case, as nnU-Net preprocessing did it."""

    transpose_forward: tuple[int, int, int]
    bbox: tuple[tuple[int, int], ...]  # in transposed axes, [low, high) per axis
    shape_after_cropping: tuple[int, int, int]  # transposed, before resampling
    shape_after_resampling: tuple[int, int, int]

    @classmethod
    def from_nnunet(cls, properties: dict, transpose_forward: Sequence[int], original_spacing_zyx: Sequence[float],
                    target_spacing: Sequence[float]) -> "PreprocessedGeometry":
        """From a case's ``.pkl`` properties, the plans' ``transpose_forward`` and the configuration's spacing.

        ``original_spacing_zyx`` is ``properties['spacing']`` (array order, before transposing);
        ``target_spacing`` is ``configuration_manager.spacing`` (already transposed; 2 values for 2D).
        The resampled shape is computed exactly as nnU-Net does (``compute_new_shape``).
        """
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        from nnunet_landmark.nnunet_integration import case_properties

        properties = case_properties(properties, ("spacing", "bbox_used_for_cropping",
                                                  "shape_after_cropping_and_before_resampling"))
        tf = tuple(int(i) for i in transpose_forward)
        old_shape = tuple(int(i) for i in properties["shape_after_cropping_and_before_resampling"])
        spacing_transposed = [float(original_spacing_zyx[i]) for i in tf]
        target = [float(s) for s in target_spacing]
        if len(target) < 3:  # 2D configurations keep the spacing of the first (slice) axis
            target = [spacing_transposed[0]] + target
        new_shape = tuple(int(i) for i in compute_new_shape(old_shape, spacing_transposed, target))
        bbox = tuple((int(lo), int(hi)) for lo, hi in properties["bbox_used_for_cropping"])
        return cls(tf, bbox, old_shape, new_shape)

    @property
    def _scale(self) -> np.ndarray:
        return np.asarray(self.shape_after_resampling, dtype=np.float64) / np.asarray(self.shape_after_cropping)

    def array_index_to_preprocessed(self, array_index) -> np.ndarray:
        a = _points(array_index)
        transposed = a[..., list(self.transpose_forward)]
        cropped = transposed - np.asarray([lo for lo, _ in self.bbox], dtype=np.float64)
        return (cropped + 0.5) * self._scale - 0.5

    def preprocessed_to_array_index(self, preprocessed_index) -> np.ndarray:
        q = _points(preprocessed_index)
        cropped = (q + 0.5) / self._scale - 0.5
        transposed = cropped + np.asarray([lo for lo, _ in self.bbox], dtype=np.float64)
        backward = np.argsort(self.transpose_forward)
        return transposed[..., list(backward)]

    @property
    def preprocessed_spacing_factor(self) -> np.ndarray:
        """Preprocessed voxels per original (transposed) voxel, per preprocessed axis."""
        return self._scale


@dataclass(frozen=True)
class CaseGeometry:
    """World <-> preprocessed index for one case: the chain nnU-Net preprocessing applied."""

    image: ImageGeometry
    preprocessing: PreprocessedGeometry
    preprocessed_spacing: tuple[float, float, float]  # mm per preprocessed voxel, preprocessed axis order

    @classmethod
    def from_nnunet(cls, properties: dict, transpose_forward: Sequence[int],
                    target_spacing: Sequence[float]) -> "CaseGeometry":
        image = ImageGeometry.from_nnunet_properties(properties)
        pre = PreprocessedGeometry.from_nnunet(properties, transpose_forward, properties["spacing"], target_spacing)
        spacing_transposed = np.asarray([properties["spacing"][i] for i in pre.transpose_forward], dtype=np.float64)
        # the exact spacing of the resampled grid (target spacing up to rounding of the shape)
        exact = spacing_transposed / pre.preprocessed_spacing_factor
        return cls(image, pre, tuple(float(s) for s in exact))

    def world_to_preprocessed(self, points) -> np.ndarray:
        return self.preprocessing.array_index_to_preprocessed(self.image.world_to_array_index(points))

    def preprocessed_to_world(self, preprocessed_index) -> np.ndarray:
        return self.image.array_index_to_world(self.preprocessing.preprocessed_to_array_index(preprocessed_index))

    def preprocessed_to_image_index(self, preprocessed_index) -> np.ndarray:
        """Preprocessed index -> continuous ITK index (x, y, z) of the original image."""
        return self.preprocessing.preprocessed_to_array_index(preprocessed_index)[..., ::-1]

    def preprocessed_image_geometry(self, shape: Sequence[int], stride: int = 1) -> ImageGeometry:
        """The ITK geometry of an array on the preprocessed grid (preprocessed axis order, ``shape``) sampled every
        ``stride`` voxels from index 0: its voxel (i, j, k) (ITK order, the array's axes reversed) lies at
        ``preprocessed_to_world(stride * (k, j, i))``."""
        origin = self.preprocessed_to_world(np.zeros(3))
        columns = (self.preprocessed_to_world(np.eye(3)) - origin).T * float(stride)  # world step per array axis
        columns = columns[:, ::-1]  # ITK index axes are the array's reversed
        spacing = np.linalg.norm(columns, axis=0)
        direction = columns / spacing
        size = tuple(int(-(-n // stride)) for n in shape)[::-1]
        return ImageGeometry(tuple(float(v) for v in origin), tuple(float(v) for v in spacing),
                             tuple(float(v) for v in direction.reshape(-1)), size)
