"""The landmark network: the plans' segmentation network, and where its K heatmap channels come from.

Two heads, recorded in the plans (``landmark_heads``) so that prediction rebuilds the same network:

* ``shared`` (the paper's): the plans' network is built with C + K output channels, so the heatmaps are K more
  channels of the segmentation's last 1x1 convolution, on the same features. Any heatmap loss weight that matters
  then moves the segmentation (beta 100 cost 0.027 LV Dice on the CPU budget).
* ``decoupled``: the plans' network is built exactly as plain nnU-Net builds it (C channels, same parameters, same
  state-dict keys, so plain weights still pretrain it) and a small head reads the features of the decoder stages,
  coarse to fine (a feature pyramid: a 1x1 convolution per stage, upsampled and summed), and optionally the
  segmentation's own probabilities, to make the K heatmaps. It works at 1 / ``stride`` of the output's resolution
  (the decoder's last ``log2(stride)`` stages are not read) and its K logits are upsampled trilinearly: on a CPU a
  full-resolution head of 16 channels cost 1.7x plain nnU-Net's iteration, at half resolution it costs a few percent.
  Its gradient into the shared trunk is scaled by ``trunk_gradient_scale``: at 0 the segmentation gets exactly plain
  nnU-Net's gradient.

Either way the network outputs C + K channels at every output (deep supervision: the head's heatmaps are
average-pooled to each lower resolution), so the loss, the sliding window and the export see one format.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("shared", "decoupled")


@dataclass(frozen=True)
class HeatmapHeadConfig:
    """Which head makes the heatmaps (see the module docstring) and, for the decoupled one, its width, its gradient
    into the trunk and whether it reads the segmentation's probabilities."""

    kind: str = "shared"
    channels: int = 16
    trunk_gradient_scale: float = 1.0
    reads_segmentation: bool = False
    segmentation_nonlinearity: str = "softmax"  # "sigmoid" for nnU-Net's region-based labels
    stride: int = 2  # the head's resolution: 1 / stride of the output's (1 or a power of 2)

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown heatmap head {self.kind!r}; use one of {HEAD_KINDS}")
        if self.channels < 1 or not 0.0 <= self.trunk_gradient_scale <= 1.0 or self.stride < 1 or \
                self.stride & (self.stride - 1):
            raise ValueError(f"heatmap head needs channels >= 1, a trunk gradient scale in [0, 1] and a stride that "
                             f"is a power of 2: {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "HeatmapHeadConfig":
        """The recorded head; plans written before heads existed (no entry) had the shared one."""
        if not d:
            return cls()
        return cls(str(d["kind"]), int(d.get("channels", 16)), float(d.get("trunk_gradient_scale", 1.0)),
                   bool(d.get("reads_segmentation", False)), str(d.get("segmentation_nonlinearity", "softmax")),
                   int(d.get("stride", 1)))


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient times ``scale`` in the backward pass (0: detached)."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return _ScaleGradient.apply(x, scale)


class HeatmapHead(nn.Module):
    """K heatmap logits from decoder features (coarse to fine; the finest one read sets the head's resolution) and,
    optionally, the segmentation's probabilities (average-pooled to that resolution)."""

    def __init__(self, stage_channels: Sequence[int], num_segmentation_channels: int, num_landmarks: int,
                 config: HeatmapHeadConfig, background: float):
        super().__init__()
        width = config.channels
        self.lateral = nn.ModuleList(nn.Conv3d(c, width, 1) for c in stage_channels)
        self.from_segmentation = nn.Conv3d(num_segmentation_channels, width, 1) if config.reads_segmentation else None
        self.segmentation_nonlinearity = config.segmentation_nonlinearity
        self.nonlin = nn.LeakyReLU(0.01, inplace=True)
        self.output = nn.Conv3d(width, num_landmarks, 1)
        # start near the background value (most of a patch is far from every landmark) instead of at 0.5
        with torch.no_grad():
            p = min(max(0.9 * background + 0.1 * (1.0 - background), 0.02), 0.98)
            self.output.bias.fill_(math.log(p / (1.0 - p)))

    def forward(self, features: Sequence[torch.Tensor], segmentation_logits: torch.Tensor) -> torch.Tensor:
        h = self.lateral[0](features[0])
        for lateral, f in zip(self.lateral[1:], features[1:]):
            h = F.interpolate(h, size=f.shape[2:], mode="trilinear", align_corners=False) + lateral(f)
        if self.from_segmentation is not None:
            s = segmentation_logits.detach()
            s = torch.softmax(s, 1) if self.segmentation_nonlinearity == "softmax" else torch.sigmoid(s)
            h = h + self.from_segmentation(F.interpolate(s, size=h.shape[2:], mode="area") if s.shape[2:] != h.shape[2:]
                                           else s)
        return self.output(self.nonlin(h))


class LandmarkNetwork(nn.Module):
    """A segmentation UNet (``encoder`` + ``decoder``, as dynamic_network_architectures builds nnU-Net's) whose output
    gains K heatmap channels from a ``HeatmapHead`` on its decoder stages.

    ``encoder`` and ``decoder`` are the segmentation network's own modules, so checkpoints keep plain nnU-Net's keys
    (plus ``heatmap_head.seg_layers.*``), and nnU-Net's ``set_deep_supervision_enabled``
    (``network.decoder.deep_supervision``) works unchanged. The decoder stages' outputs are picked up by forward hooks, so nnU-Net's decoder runs as is.
    """

    def __init__(self, segmentation_network: nn.Module, num_landmarks: int, config: HeatmapHeadConfig,
                 background: float):
        super().__init__()
        self.encoder = segmentation_network.encoder
        self.decoder = segmentation_network.decoder
        self.trunk_gradient_scale = float(config.trunk_gradient_scale)
        skipped = int(round(math.log2(config.stride)))
        if skipped >= len(self.decoder.stages):
            raise ValueError(f"heatmap head stride {config.stride} skips every one of the decoder's "
                             f"{len(self.decoder.stages)} stages")
        self.read_stages = len(self.decoder.stages) - skipped  # the decoder stages the head reads (coarse first)
        stage_channels = [stage.output_channels for stage in self.decoder.stages][:self.read_stages]
        # nnU-Net's -pretrained_weights transfers every key but the output layers', which it knows by '.seg_layers.'
        # in the key; the head is an output layer too, so a plain checkpoint pretrains the trunk and the head starts
        # fresh (as nnU-Net's own output layers do when the labels change)
        self.heatmap_head = nn.ModuleDict({"seg_layers": HeatmapHead(stage_channels, self.decoder.num_classes,
                                                                     num_landmarks, config, background)})
        self._stage_outputs: dict[int, torch.Tensor] = {}
        for index, stage in enumerate(self.decoder.stages[:self.read_stages]):
            stage.register_forward_hook(_StageRecorder(self._stage_outputs, index))

    def forward(self, x: torch.Tensor):
        self._stage_outputs.clear()
        segmentation = self.decoder(self.encoder(x))
        features = [scale_gradient(self._stage_outputs[i], self.trunk_gradient_scale) for i in range(self.read_stages)]
        self._stage_outputs.clear()
        outputs = segmentation if isinstance(segmentation, (list, tuple)) else [segmentation]
        heatmaps = self.heatmap_head["seg_layers"](features, outputs[0])
        if heatmaps.shape[2:] != outputs[0].shape[2:]:
            heatmaps = F.interpolate(heatmaps, size=outputs[0].shape[2:], mode="trilinear", align_corners=False)
        joined = [torch.cat((outputs[0], heatmaps.to(outputs[0].dtype)), 1)]
        for o in outputs[1:]:  # deep supervision: the same heatmaps, average-pooled to each lower resolution
            pooled = F.interpolate(heatmaps, size=o.shape[2:], mode="area")
            joined.append(torch.cat((o, pooled.to(o.dtype)), 1))
        return joined if isinstance(segmentation, (list, tuple)) else joined[0]

    def compute_conv_feature_map_size(self, input_size):
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)


class _StageRecorder:
    """Forward hook keeping a decoder stage's output (a class, not a closure, so the network stays picklable)."""

    def __init__(self, store: dict, index: int):
        self.store, self.index = store, index

    def __call__(self, module, inputs, output):
        self.store[self.index] = output
