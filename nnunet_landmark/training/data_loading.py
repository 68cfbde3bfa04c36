"""nnU-Net's data loader, plus a heatmap per landmark carried through augmentation as ``regression_target``.

nnU-Net 2.8.1 crops each sample and runs the transforms inside one loop of ``generate_train_batch``,
passing only image and segmentation. We let that loop crop (with ``transforms`` unset), record the crop
boxes it drew (``get_bbox`` is called once per sample, in order), render each sample's heatmaps on its
crop, and then run the very same transform pipeline with ``regression_target`` added.

The log-distance heatmap is 1 far from the landmark, but SpatialTransform pads with 0 wherever an
augmented patch reaches past the crop. Heatmaps therefore travel as ``heatmap - background`` (0 far
away) and get the background added back after the transforms.

Each batch dict gains:

* ``target``: the segmentation target(s) as nnU-Net makes them, followed by the heatmaps (B, K, *patch)
  as the last list element (the base ``train_step`` moves list targets to the device unchanged).
* ``landmarks_in_crop``: (B, K, 3) landmark voxel positions in each crop before augmentation. Equal to
  the positions in the returned patch only for pipelines without spatial transforms (validation).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import ThreadpoolController

from nnunet_landmark.heatmap import HeatmapEncoding, render_heatmaps

# threadpool_limits() rediscovers the loaded BLAS/OpenMP libraries on every call (~4 ms, reading /proc/self/maps):
# 10% of a small batch. One controller per process does that once.
_THREADPOOLS: ThreadpoolController | None = None


def _single_threaded():
    global _THREADPOOLS
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS.limit(limits=1, user_api=None)


class nnUNetLandmarkDataLoader(nnUNetDataLoader):
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

    def crop_batch(self) -> tuple[dict, np.ndarray]:
        """One batch cropped by nnU-Net's loop without transforms, and (B, K, 3) landmark positions in each crop."""
        transforms, self.transforms = self.transforms, None
        try:
            batch = super().generate_train_batch()
        finally:
            self.transforms = transforms
        if len(self._batch_crops) != len(batch["keys"]):
            raise RuntimeError("crop boxes and samples are out of step: nnU-Net's data loader no longer calls "
                               "get_bbox once per sample (checked against nnunetv2 2.8.1)")
        return batch, np.stack([self.landmarks[k] - lo for k, lo in zip(batch["keys"], self._batch_crops)])

    def generate_train_batch(self):
        transforms = self.transforms
        batch, in_crop = self.crop_batch()
        crop_shape = tuple(batch["data"].shape[2:])
        background = np.float32(self.encoding.background)
        heatmaps = [torch.from_numpy(render_heatmaps(crop_shape, p, self.spacing, self.encoding) - background)
                    for p in in_crop]

        if transforms is None:
            images, segs, regressions = list(batch["data"]), list(batch["target"]), heatmaps
        else:
            images, segs, regressions = [], [], []
            with torch.no_grad(), _single_threaded():
                for image, seg, heatmap in zip(batch["data"], batch["target"], heatmaps):
                    out = transforms(image=image, segmentation=seg, regression_target=heatmap)
                    if out.get("regression_target") is None:
                        raise RuntimeError(f"a transform dropped the heatmaps (regression_target): every transform "
                                           f"must implement _apply_to_regr_target or leave it alone. Pipeline: "
                                           f"{transforms}")
                    images.append(out["image"])
                    segs.append(out["segmentation"])
                    regressions.append(out["regression_target"])
        data = torch.stack(images)
        if isinstance(segs[0], list):
            target = [torch.stack([s[i] for s in segs]) for i in range(len(segs[0]))]
        else:
            target = [torch.stack(segs)]
        target.append(torch.stack(regressions).add_(background).float())
        return {"data": data, "target": target, "keys": batch["keys"], "landmarks_in_crop": in_crop}
