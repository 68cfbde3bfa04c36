"""Segmentation loss on the first C channels + beta * heatmap loss (the paper's MSE on the sigmoid) on the last K."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEATMAP_LOSSES = ("mse", "bce")
# how the per-voxel heatmap loss becomes one number, per output:
# * "mean": over every voxel of the patch (the paper's); the voxels that decide the extremum are ~0.1% of a patch;
# * "landmark": summed over voxels per sample and landmark, divided by the voxels of the target's support ball, so it
#   does not shrink as the patch grows (Payer et al.'s per-landmark sums; a constant factor patch / ball on the mean);
# * "topk": the mean of the hardest ``topk_fraction`` of voxels per sample and landmark (nnLandmark's reduction).
HEATMAP_REDUCTIONS = ("mean", "landmark", "topk")


def _reduce(loss: torch.Tensor, reduction: str, reference_fraction: float, topk_fraction: float) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "landmark":
        return loss.mean() / reference_fraction
    flat = loss.flatten(2)
    k = max(1, int(math.ceil(topk_fraction * flat.shape[2])))
    return torch.topk(flat, k, dim=2, sorted=False).values.mean()


def heatmap_term(heatmap_logits: list, target: torch.Tensor, weights: tuple, kind: str = "mse",
                 reduction: str = "mean", reference_fraction: float = 1.0, topk_fraction: float = 0.2):
    """(weighted sum over outputs, the first output's unweighted term) of the heatmap loss, in float32.

    ``heatmap_logits``: the heatmap channels of each network output used (highest resolution first); the target
    is average-pooled (``area``) to each output's size. ``reduction``: see ``HEATMAP_REDUCTIONS``;
    ``reference_fraction``: the target's support ball as a fraction of the patch (the same at every resolution).
    One function, so that ``torch.compile`` sees every deep-supervision output in one graph.
    """
    with torch.autocast(device_type=target.device.type, enabled=False):
        target = target.float()
        total = first = None
        for weight, logits in zip(weights, heatmap_logits):
            scaled = target if logits.shape[2:] == target.shape[2:] else \
                F.interpolate(target, size=logits.shape[2:], mode="area")
            if kind == "mse":
                loss = (torch.sigmoid(logits.float()) - scaled) ** 2
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), scaled, reduction="none")
            term = _reduce(loss, reduction, reference_fraction, topk_fraction)
            total = weight * term if total is None else total + weight * term
            first = term if first is None else first
    return total, first


class SegmentationHeatmapLoss(nn.Module):
    """nnU-Net's (deep-supervised) segmentation loss plus the paper's heatmap term.

    ``output``: the network output, a tensor (B, C + K, ...) or, with deep supervision, a list of them
    (highest resolution first). ``target``: a list of the segmentation target(s) nnU-Net made (one per
    output) followed by the heatmaps (B, K, ...) at full resolution.

    The heatmap term is computed in float32 whatever the autocast state. With ``deep_supervision`` it is
    deep-supervised like the segmentation: the weighted sum of the MSE at every output resolution, the
    target average-pooled to each, with ``deep_supervision_weights`` or else the weights of nnU-Net's
    DeepSupervisionWrapper around ``segmentation_loss`` (read at every call, so the two never disagree);
    a zero weight skips that output, as nnU-Net does. Otherwise only the highest resolution counts. Every call runs the same operations (the Dice term all-gathers under DDP), so ranks stay in step.
    """

    def __init__(self, segmentation_loss: nn.Module, num_segmentation_channels: int, heatmap_loss_weight: float = 10.0,
                 deep_supervision: bool = False, heatmap_loss: str = "mse",
                 deep_supervision_weights: Sequence[float] | None = None, compile: bool = False,
                 reduction: str = "mean", reference_fraction: float = 1.0, topk_fraction: float = 0.2):
        super().__init__()
        if heatmap_loss not in HEATMAP_LOSSES:
            raise ValueError(f"unknown heatmap loss {heatmap_loss!r}; use one of {HEATMAP_LOSSES}")
        if reduction not in HEATMAP_REDUCTIONS:
            raise ValueError(f"unknown heatmap loss reduction {reduction!r}; use one of {HEATMAP_REDUCTIONS}")
        if not (reference_fraction > 0 and 0 < topk_fraction <= 1):
            raise ValueError(f"reference_fraction must be > 0 and topk_fraction in (0, 1], got {reference_fraction}, "
                             f"{topk_fraction}")
        self.heatmap_loss = heatmap_loss
        self.reduction = reduction
        self.reference_fraction = float(reference_fraction)
        self.topk_fraction = float(topk_fraction)
        self.segmentation_loss = segmentation_loss
        self.num_segmentation_channels = int(num_segmentation_channels)
        self.heatmap_loss_weight = float(heatmap_loss_weight)
        self.deep_supervision = bool(deep_supervision)
        self.deep_supervision_weights = None if deep_supervision_weights is None else \
            tuple(float(w) for w in deep_supervision_weights)
        # nnU-Net compiles its Dice term when it compiles the network; eagerly, this term is dozens of small
        # kernels forward and backward (one sigmoid, pooling and MSE per deep-supervision output), which cost
        # 11% of a ResEnc-M step on an H200 (benchmarks/results/RESULTS.md). One compiled function fuses them.
        self.last_segmentation_loss: torch.Tensor | None = None
        self.last_heatmap_loss: torch.Tensor | None = None
        self.compiled = bool(compile)
        self._heatmap_term = torch.compile(heatmap_term) if compile else heatmap_term

    def deep_supervision_heatmap_weights(self, num_outputs: int) -> tuple[float, ...]:
        """The heatmap term's weight per network output (highest resolution first)."""
        if not self.deep_supervision or num_outputs == 1:
            return (1.0,) + (0.0,) * (num_outputs - 1)
        weights = self.deep_supervision_weights or getattr(self.segmentation_loss, "weight_factors", None)
        if weights is None or len(weights) < num_outputs:
            raise ValueError(f"{num_outputs} network outputs but deep supervision weights {weights}")
        return tuple(float(w) for w in weights[:num_outputs])

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
        weights = self.deep_supervision_heatmap_weights(len(outputs))
        used = [(w, o[:, c:]) for w, o in zip(weights, outputs) if w != 0]  # a zero weight skips that output
        heatmap, full_resolution = self._heatmap_term([o for _, o in used], heatmap_target,
                                                      tuple(w for w, _ in used), self.heatmap_loss, self.reduction,
                                                      self.reference_fraction, self.topk_fraction)
        if used and used[0][1].shape[2:] != outputs[0].shape[2:]:
            full_resolution = None
        self.last_segmentation_loss = segmentation.detach()
        # the log shows the full-resolution MSE, comparable with or without deep supervision
        self.last_heatmap_loss = (full_resolution if full_resolution is not None else heatmap).detach()
        return segmentation + self.heatmap_loss_weight * heatmap
