"""nnU-Net's data loader, plus a heatmap per landmark drawn on each augmented patch.

nnU-Net 2.8.1 crops each sample and runs the transforms inside one loop of ``generate_train_batch``,
passing only image and segmentation. We record the crop boxes that loop draws (``get_bbox`` is called once
per sample, in order) and let it call, in place of its transforms, the same augmentation with the landmark
positions in the crop added as ``keypoints`` (``keypoint_transforms.with_landmarks``: nnU-Net's own
transforms; SpatialTransform and MirrorTransform also map the positions). So the loader draws exactly the
random numbers plain nnU-Net draws, in the same order. The heatmaps are then rendered once, at patch size,
from the mapped positions, as the same function of distance (mm in the preprocessed image) as before
augmentation. Rendering on the enlarged crop and interpolating the heatmap
through the spatial transform, as earlier versions did, cost more than nnU-Net's whole augmentation at
MM-WHS scale (benchmarks/loader_scale.py).

Each batch dict gains:

* ``target``: the segmentation target(s) as nnU-Net makes them, followed by the heatmaps (B, K, *patch)
  as the last list element (the base ``train_step`` moves list targets to the device unchanged).
* ``landmarks_in_crop``: (B, K, 3) landmark voxel positions in each crop before augmentation (equal to the
  positions in the patch for pipelines without spatial transforms, such as validation).
* ``landmarks_in_patch``: (B, K, 3) landmark voxel positions in each returned (augmented) patch.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from nnunet_landmark.heatmap_targets import HeatmapEncoding, render_heatmaps_mapped
from nnunet_landmark.training.keypoint_transforms import LandmarkKeypoints, check_conventions, with_landmarks
from nnunet_landmark.training.seeding import SeededDataLoader


class nnUNetLandmarkDataLoader(SeededDataLoader):
    def __init__(self, *args, landmarks: Mapping[str, np.ndarray], spacing: Sequence[float],
                 encoding: HeatmapEncoding, landmark_oversample_percent: float = 0.0, **kwargs):
        """``landmarks``: case identifier -> (K, 3) positions in preprocessed voxel indices.

        ``spacing``: mm per preprocessed voxel (the configuration's spacing), so heatmaps are functions
        of distance in mm. ``landmark_oversample_percent``: probability that a sample's patch is centred
        on one of its landmarks (through nnU-Net's foreground-sampling path), on top of nnU-Net's sampling.
        """
        super().__init__(*args, **kwargs)
        if self.patch_size_was_2d:
            raise NotImplementedError("landmark heatmaps are implemented for 3D configurations only")
        missing = [k for k in self.indices if k not in landmarks]
        if missing:
            raise KeyError(f"no landmark positions for case(s) {missing[:10]}")
        self.landmarks = {k: np.asarray(landmarks[k], dtype=np.float64) for k in self.indices}
        self.spacing = tuple(float(s) for s in spacing)
        self.encoding = encoding
        self.landmark_oversample_percent = float(landmark_oversample_percent)
        self._batch_keys: list[str] = []
        self._batch_crops: list[np.ndarray] = []
        self._landmark_pipeline: tuple = (None, None)  # (nnU-Net pipeline, its keypoint-aware copy)

    @property
    def landmark_transforms(self):
        """``self.transforms`` rebuilt to also map landmark keypoints (made on first use, again if replaced).

        Raises ``UnsupportedTransformError`` for a transform whose effect on positions cannot be followed.
        """
        source, adapted = self._landmark_pipeline
        if source is not self.transforms:
            check_conventions()
            adapted = with_landmarks(self.transforms)
            self._landmark_pipeline = (self.transforms, adapted)
        return adapted

    def get_indices(self):
        keys = super().get_indices()
        self._batch_keys = list(keys)
        self._batch_crops = []
        return keys

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        key = self._batch_keys[len(self._batch_crops)]
        if self.landmark_oversample_percent > 0 and np.random.uniform() < self.landmark_oversample_percent:
            # centre on a landmark, jittered by up to a quarter patch, via nnU-Net's own foreground path
            positions = self.landmarks[key]
            target = positions[np.random.randint(len(positions))]
            jitter = np.random.uniform(-0.25, 0.25, size=3) * np.asarray(self.final_patch_size)
            voxel = np.round(target + jitter).astype(int)
            lbs, ubs = super().get_bbox(data_shape, True, {"landmark": np.array([[0, *voxel]])}, "landmark")
        else:
            lbs, ubs = super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        self._batch_crops.append(np.asarray(lbs, dtype=np.float64))
        return lbs, ubs

    def generate_train_batch(self):
        pipeline = self.landmark_transforms
        keypoints: list[LandmarkKeypoints] = []

        def transforms_with_keypoints(**sample) -> dict:
            # nnU-Net's loop calls this once per sample, right after get_bbox drew that sample's crop
            j = len(self._batch_crops) - 1
            if j != len(keypoints):
                raise RuntimeError("crop boxes and samples are out of step: nnU-Net's data loader no longer calls "
                                   "get_bbox, then the transforms, once per sample (checked against nnunetv2 2.8.1)")
            sample["keypoints"] = LandmarkKeypoints.in_crop(self.landmarks[self._batch_keys[j]] - self._batch_crops[j])
            out = sample if pipeline is None else pipeline(**sample)
            if out.get("keypoints") is None:
                raise RuntimeError(f"a transform dropped the heatmaps' landmark positions (keypoints): every "
                                   f"transform must map them (_apply_to_keypoints) or leave them alone. "
                                   f"Pipeline: {pipeline}")
            keypoints.append(out.pop("keypoints"))
            return out

        # nnU-Net's own loop crops, augments and collates, with the same random draws as plain nnU-Net
        transforms, self.transforms = self.transforms, transforms_with_keypoints
        try:
            batch = super().generate_train_batch()
        finally:
            self.transforms = transforms
        if len(keypoints) != len(batch["keys"]):
            raise RuntimeError("nnU-Net's data loader did not transform every sample once (checked against nnunetv2 "
                               "2.8.1)")
        target = list(batch["target"]) if isinstance(batch["target"], list) else [batch["target"]]
        patch_shape = tuple(batch["data"].shape[2:])
        target.append(torch.from_numpy(np.stack([
            render_heatmaps_mapped(patch_shape, k.positions, self.spacing, self.encoding, k.to_crop) for k in keypoints])))
        in_crop = np.stack([self.landmarks[k] - lo for k, lo in zip(batch["keys"], self._batch_crops)])
        return {"data": batch["data"], "target": target, "keys": batch["keys"], "landmarks_in_crop": in_crop,
                "landmarks_in_patch": np.stack([k.positions for k in keypoints])}
