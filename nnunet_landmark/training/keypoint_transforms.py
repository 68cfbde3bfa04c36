"""Landmark positions carried through nnU-Net's augmentation as keypoints, so heatmaps are drawn after it.

batchgeneratorsv2 does not implement keypoints (its SpatialTransform and MirrorTransform raise
NotImplementedError). nnU-Net 2.8.1's default spatial augmentation is affine (rotation, scaling, crop/pad;
``p_elastic_deform=0``) followed by mirroring, so a landmark maps exactly: these subclasses reuse the stock
transforms' own random draws (``get_parameters`` is theirs, unchanged) and add ``_apply_to_keypoints``.

A ``LandmarkKeypoints`` holds the K positions (voxel indices of the current array) and the linear map from a
step in the current array to a step in the crop the loader cut (``to_crop``), so the heatmap rendered at patch
size is the same function of distance in mm, measured in the preprocessed image, that a heatmap drawn on the
crop and interpolated by the spatial transform was.

``with_landmarks(pipeline)`` rebuilds a pipeline with these subclasses. A transform it cannot follow (elastic
deformation switched on, an unknown transform that may move voxels) raises ``UnsupportedTransformError`` naming
it: a misplaced heatmap would train the network on wrong targets without any sign.
The batchgeneratorsv2 conventions relied on here are checked by ``convention_problems`` (numerically, on a small
index ramp) when a landmark loader first builds its pipeline.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform, SegOnlyTransform
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms, TimedComposeTransforms
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import OneOfTransform, RandomTransform


class UnsupportedTransformError(RuntimeError):
    """A transform in the training pipeline whose effect on landmark positions nnunet-landmark cannot follow."""


@dataclass
class LandmarkKeypoints:
    """K landmark positions (K, 3) in voxel indices of the current array, and ``to_crop`` (3, 3): a step of one
    voxel along each current array axis (columns) expressed in voxels of the loader's crop."""

    positions: np.ndarray
    to_crop: np.ndarray

    @classmethod
    def in_crop(cls, positions: np.ndarray) -> "LandmarkKeypoints":
        positions = np.asarray(positions, dtype=np.float64)
        return cls(positions.copy(), np.eye(positions.shape[1]))

    def mapped(self, axes_offset: int, linear: np.ndarray, translation: np.ndarray) -> "LandmarkKeypoints":
        """New positions ``linear @ p + translation`` on the trailing spatial axes (from ``axes_offset`` on);
        ``linear`` (d, d) maps old array coordinates to new ones there, so ``to_crop`` gains its inverse."""
        d = linear.shape[0]
        full = np.eye(self.positions.shape[1])
        full[axes_offset:axes_offset + d, axes_offset:axes_offset + d] = linear
        shift = np.zeros(self.positions.shape[1])
        shift[axes_offset:axes_offset + d] = translation
        return LandmarkKeypoints(self.positions @ full.T + shift, self.to_crop @ np.linalg.inv(full))


def _spatial_axes_offset(keypoints: LandmarkKeypoints, spatial_dims: int) -> int:
    """Pseudo-2D augmentation folds the first spatial axis into channels: transforms then act on the last two."""
    offset = keypoints.positions.shape[1] - spatial_dims
    if offset < 0:
        raise UnsupportedTransformError(f"keypoints have {keypoints.positions.shape[1]} coordinates but the data "
                                        f"has {spatial_dims} spatial axes")
    return offset


def _copy_as(cls, transform: BasicTransform) -> BasicTransform:
    """An instance of ``cls`` (a subclass of type(transform)) with a copy of the transform's settings."""
    new = cls.__new__(cls)
    new.__dict__.update(copy.copy(transform.__dict__))
    return new


class LandmarkSpatialTransform(SpatialTransform):
    """SpatialTransform (same parameters, same random draws) that also maps ``keypoints``.

    Output voxel ``i`` samples the input at ``A (i - (patch - 1) / 2) + centre - 1/2`` (affine grid, grid_sample
    with align_corners=False) or at ``i + floor(centre) - patch // 2`` (no rotation/scaling: crop_tensor), so
    a landmark at ``p`` lands at ``A^-1 (p - centre + 1/2) + (patch - 1) / 2`` or ``p - floor(centre) + patch // 2``.
    """

    maps_landmark_keypoints = True

    @classmethod
    def from_transform(cls, transform: SpatialTransform) -> "LandmarkSpatialTransform":
        if transform.p_elastic_deform > 0:
            raise UnsupportedTransformError(
                f"SpatialTransform has elastic deformation switched on (p_elastic_deform={transform.p_elastic_deform}): "
                f"landmark heatmaps are drawn after augmentation from landmark positions mapped through the affine "
                f"part, and an elastic field moves them in ways that cannot be mapped. Set p_elastic_deform=0 in "
                f"your trainer's get_training_transforms.")
        if transform.align_corners:
            raise UnsupportedTransformError("SpatialTransform with align_corners=True: landmark keypoint mapping is "
                                            "implemented for nnU-Net's align_corners=False")
        return _copy_as(cls, transform)

    def _apply_to_keypoints(self, keypoints: LandmarkKeypoints, **params) -> LandmarkKeypoints:
        if params.get("elastic_offsets") is not None:
            raise UnsupportedTransformError("SpatialTransform drew an elastic deformation: landmark positions cannot "
                                            "be mapped through it (set p_elastic_deform=0)")
        patch = np.asarray(self.patch_size, dtype=np.float64)
        centre = np.asarray(params["center_location_in_pixels"], dtype=np.float64)
        offset = _spatial_axes_offset(keypoints, len(patch))
        if params["grid"] is None:
            shift = -np.floor(centre) + np.floor(patch / 2)
            return keypoints.mapped(offset, np.eye(len(patch)), shift)
        inverse = np.linalg.inv(np.asarray(params["affine"], dtype=np.float64))
        return keypoints.mapped(offset, inverse, inverse @ (0.5 - centre) + (patch - 1) / 2)


class LandmarkMirrorTransform(MirrorTransform):
    """MirrorTransform (same random draws) that also mirrors ``keypoints``: index ``i`` becomes ``size - 1 - i``."""

    maps_landmark_keypoints = True

    @classmethod
    def from_transform(cls, transform: MirrorTransform) -> "LandmarkMirrorTransform":
        return _copy_as(cls, transform)

    def get_parameters(self, **data_dict) -> dict:
        params = super().get_parameters(**data_dict)
        params["spatial_shape"] = tuple(data_dict["image"].shape[1:])
        return params

    def _apply_to_keypoints(self, keypoints: LandmarkKeypoints, **params) -> LandmarkKeypoints:
        if len(params["axes"]) == 0:
            return keypoints
        shape = params["spatial_shape"]
        linear, shift = np.eye(len(shape)), np.zeros(len(shape))
        for axis in params["axes"]:
            linear[axis, axis], shift[axis] = -1.0, shape[axis] - 1
        return keypoints.mapped(_spatial_axes_offset(keypoints, len(shape)), linear, shift)


class _KeypointsUnchanged:
    """Mixin for transforms that move no voxel: the keypoints pass through."""

    maps_landmark_keypoints = True

    @classmethod
    def from_transform(cls, transform):
        return _copy_as(cls, transform)

    def _apply_to_keypoints(self, keypoints, **params):
        return keypoints


class LandmarkConvert3DTo2DTransform(_KeypointsUnchanged, Convert3DTo2DTransform):
    """Pseudo-2D: the keypoints keep 3 coordinates; 2D transforms act on the last two."""


class LandmarkConvert2DTo3DTransform(_KeypointsUnchanged, Convert2DTo3DTransform):
    """Back to 3D after pseudo-2D augmentation: the keypoints already have 3 coordinates."""


# exact types replaced by a keypoint-aware subclass
_REPLACEMENTS = {SpatialTransform: LandmarkSpatialTransform, MirrorTransform: LandmarkMirrorTransform,
                 Convert3DTo2DTransform: LandmarkConvert3DTo2DTransform,
                 Convert2DTo3DTransform: LandmarkConvert2DTo3DTransform}
# transforms whose ``apply`` touches only image and/or segmentation, never voxel positions
_POSITION_NEUTRAL = (ImageOnlyTransform, SegOnlyTransform, MaskImageTransform, MoveSegAsOneHotToDataTransform)


def with_landmarks(transform: BasicTransform | None) -> BasicTransform | None:
    """A copy of an augmentation pipeline that also maps ``keypoints`` (LandmarkKeypoints); the original is untouched.

    Raises ``UnsupportedTransformError`` for a transform that may move voxels in a way not followed here.
    """
    if transform is None:
        return None
    kind = type(transform)
    if kind in (ComposeTransforms, TimedComposeTransforms):
        new = copy.copy(transform)
        new.transforms = [with_landmarks(t) for t in transform.transforms]
        if kind is TimedComposeTransforms:
            new._stats = copy.deepcopy(transform._stats)
        return new
    if kind is RandomTransform:
        new = copy.copy(transform)
        new.transform = with_landmarks(transform.transform)
        return new
    if kind is OneOfTransform:
        new = copy.copy(transform)
        new.list_of_transforms = [with_landmarks(t) for t in transform.list_of_transforms]
        return new
    if kind in _REPLACEMENTS:
        return _REPLACEMENTS[kind].from_transform(transform)
    if isinstance(transform, _POSITION_NEUTRAL) or getattr(transform, "maps_landmark_keypoints", False):
        return transform
    raise UnsupportedTransformError(
        f"the landmark heatmaps cannot follow {kind.__name__} in the training pipeline: nnunet-landmark draws "
        f"heatmaps after augmentation from landmark positions mapped through nnU-Net's spatial transforms, and it "
        f"does not know how {kind.__name__} moves voxels (it would have dropped the heatmaps or misplaced them). "
        f"Known: SpatialTransform without elastic deformation, MirrorTransform, pseudo-2D conversion, and "
        f"image/segmentation-only transforms (ImageOnlyTransform, SegOnlyTransform). Derive {kind.__name__} from "
        f"ImageOnlyTransform if it does not move voxels, or give it an _apply_to_keypoints that maps "
        f"nnunet_landmark.training.keypoint_transforms.LandmarkKeypoints and a class attribute "
        f"maps_landmark_keypoints = True.")


SPATIAL_TRANSFORM_PARAMETERS = {"center_location_in_pixels", "grid", "affine", "elastic_offsets"}


def convention_problems() -> list[str]:
    """Every voxel of an index ramp holds its own index: after SpatialTransform (affine and crop-only paths) and
    MirrorTransform, mapping the sampled indices as keypoints must give back the output voxels that hold them."""
    import numpy as np
    import torch
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform


    shape, patch = (13, 12, 11), (7, 6, 5)
    ramp = torch.from_numpy(np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")))
    inner = np.array([[3, 2, 2], [3, 3, 2], [2, 3, 3], [4, 2, 1]])  # output voxels that sample inside the ramp
    problems = []
    state = np.random.get_state()  # the check must not change the caller's random draws
    with torch.no_grad():
        try:
            np.random.seed(0)
            for p_affine in (1, 0):
                stock = SpatialTransform(patch, 0, False, p_rotation=p_affine, rotation=(0.2, 0.4), p_scaling=p_affine,
                                         scaling=(1.1, 1.1))
                params = stock.get_parameters(image=ramp)
                if set(params) != SPATIAL_TRANSFORM_PARAMETERS:
                    problems.append(f"SpatialTransform.get_parameters returns {sorted(params)}, expected "
                                    f"{sorted(SPATIAL_TRANSFORM_PARAMETERS)}")
                    break
                sampled = stock._apply_to_image(ramp, **params).numpy()
                sources = sampled[(slice(None), *inner.T)].T
                mapped = LandmarkSpatialTransform.from_transform(stock)._apply_to_keypoints(
                    LandmarkKeypoints.in_crop(sources), **params).positions
                if not np.allclose(mapped, inner, atol=1e-3):
                    problems.append(f"SpatialTransform ({'affine grid' if p_affine else 'crop only'}) no longer samples "
                                    f"where nnunet-landmark maps landmarks: {mapped.tolist()} vs {inner.tolist()}")
            mirror = MirrorTransform((0, 1, 2))
            params = {"axes": [0, 2]}
            flipped = mirror._apply_to_image(ramp, **params).numpy()
            sources = flipped[(slice(None), *inner.T)].T
            mapped = LandmarkMirrorTransform.from_transform(mirror)._apply_to_keypoints(
                LandmarkKeypoints.in_crop(sources), **params, spatial_shape=shape).positions
            if not np.allclose(mapped, inner):
                problems.append("MirrorTransform no longer flips the way nnunet-landmark mirrors landmarks")
        finally:
            np.random.set_state(state)
    return problems


_CONVENTIONS_CHECKED = False


def check_conventions() -> None:
    """Raise, naming what moved, if batchgeneratorsv2 no longer samples and mirrors as the keypoints assume (checked
    once per process, numerically: ``convention_problems``)."""
    global _CONVENTIONS_CHECKED
    if _CONVENTIONS_CHECKED:
        return
    problems = convention_problems()
    if problems:
        raise RuntimeError("the landmark keypoints follow batchgeneratorsv2's transforms as in nnunetv2 2.8.1's "
                           "environment, and these have changed:\n  " + "\n  ".join(problems))
    _CONVENTIONS_CHECKED = True
