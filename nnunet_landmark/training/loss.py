"""Segmentation loss on the first C channels + beta * MSE(sigmoid(heatmaps), target) on the last K."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationHeatmapLoss(nn.Module):
    """nnU-Net's (deep-supervised) segmentation loss plus the paper's heatmap term.

    ``output``: the network output, a tensor (B, C + K, ...) or, with deep supervision, a list of them
    (highest resolution first). ``target``: a list of the segmentation target(s) nnU-Net made (one per
    output) followed by the heatmaps (B, K, ...) at full resolution. The heatmap term is computed on the
    highest-resolution output only, in float32 whatever the autocast state. Every call runs the same
    operations (the Dice term all-gathers under DDP), so all ranks stay in step.
    """

    def __init__(self, segmentation_loss: nn.Module, num_segmentation_channels: int, heatmap_weight: float = 10.0):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.num_segmentation_channels = int(num_segmentation_channels)
        self.heatmap_weight = float(heatmap_weight)
        self.last_segmentation_loss: torch.Tensor | None = None
        self.last_heatmap_loss: torch.Tensor | None = None

    def forward(self, output, target: list) -> torch.Tensor:
        c = self.num_segmentation_channels
        *segmentation_targets, heatmap_target = target
        deep_supervision = isinstance(output, (list, tuple))
        outputs = list(output) if deep_supervision else [output]
        if len(segmentation_targets) != len(outputs):
            raise ValueError(f"{len(outputs)} network outputs but {len(segmentation_targets)} segmentation targets")
        segmentation_outputs = [o[:, :c] for o in outputs]
        if deep_supervision:
            segmentation = self.segmentation_loss(segmentation_outputs, segmentation_targets)
        else:
            segmentation = self.segmentation_loss(segmentation_outputs[0], segmentation_targets[0])
        with torch.autocast(device_type=outputs[0].device.type, enabled=False):
            predicted = torch.sigmoid(outputs[0][:, c:].float())
            heatmap = F.mse_loss(predicted, heatmap_target.float())
        self.last_segmentation_loss = segmentation.detach()
        self.last_heatmap_loss = heatmap.detach()
        return segmentation + self.heatmap_weight * heatmap
