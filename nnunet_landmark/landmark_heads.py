"""What a landmark network outputs after its segmentation channels, recorded in the plans.

A landmark model's network has C segmentation channels followed by K heatmap channels (one per name
in dataset.json ``"landmarks"``). nnU-Net rebuilds networks at inference from the trainer's static
``build_network_architecture(plans_manager, ...)``, which sees the plans but not dataset.json, so the
trainer writes this description into its copy of the plans (saved as ``plans.json`` in the model
folder) under ``PLANS_KEY``. Plans without the key are plain nnU-Net models and are left alone.

The same entry holds each trained fold's landmark position prior (``prior.storage``), which ``from_plans`` reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nnunet_landmark.heatmap_targets import HeatmapEncoding
from nnunet_landmark.landmark_network import HeatmapHeadConfig
from nnunet_landmark.layout import PLANS_KEY, check_landmark_names
from nnunet_landmark.prior.model import PositionPrior
from nnunet_landmark.prior.storage import PRIORS_KEY


@dataclass(frozen=True)
class LandmarkHeads:
    names: tuple[str, ...]
    num_segmentation_heads: int  # C: channels before the heatmaps
    encoding: HeatmapEncoding
    position_priors: tuple = field(default=(), compare=False)  # PositionPrior per trained fold (may be empty)
    head: HeatmapHeadConfig = HeatmapHeadConfig()  # where the heatmap channels come from (landmark_network)

    @property
    def num_landmarks(self) -> int:
        return len(self.names)

    @property
    def num_output_channels(self) -> int:
        return self.num_segmentation_heads + self.num_landmarks

    def write_to_plans(self, plans: dict) -> None:
        from nnunet_landmark import __version__
        plans[PLANS_KEY] = {"landmarks": list(self.names), "num_segmentation_heads": self.num_segmentation_heads,
                            "heatmap_encoding": self.encoding.to_dict(), "heatmap_head": self.head.to_dict(),
                            "plugin_version": __version__}

    @classmethod
    def from_plans(cls, plans: dict) -> "LandmarkHeads | None":
        entry = plans.get(PLANS_KEY) if isinstance(plans, dict) else None
        if entry is None:
            return None
        priors = tuple(PositionPrior.from_dict(p) for _, p in sorted(entry.get(PRIORS_KEY, {}).items()))
        return cls(tuple(entry["landmarks"]), int(entry["num_segmentation_heads"]),
                   HeatmapEncoding.from_dict(entry["heatmap_encoding"]), priors,
                   HeatmapHeadConfig.from_dict(entry.get("heatmap_head")))


def landmark_names_from_dataset_json(dataset_json: dict, source: str = "dataset.json") -> tuple[str, ...]:
    """The ``"landmarks"`` list of a dataset.json, checked (non-empty, unique strings)."""
    names = dataset_json.get("landmarks")
    if not names:
        raise RuntimeError(f"{source} has no \"landmarks\" list, so there is nothing for a landmark trainer to "
                           f"learn. Add e.g. \"landmarks\": [\"apex\"] and one landmarksTr/CASE.mrk.json per "
                           f"training case (nnUNetv2_convert_MMWHS does this), or train nnUNetTrainer instead.")
    if not isinstance(names, list):
        raise RuntimeError(f"{source}: \"landmarks\" must be a list of names, got {names!r}")
    return check_landmark_names(names, f"{source} \"landmarks\"", RuntimeError)
