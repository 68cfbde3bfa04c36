"""What a landmark model records in its plans about its network: the landmark heads and the head kind (the folds'
priors: test_prior_storage.py)."""
from __future__ import annotations

import json


from nnunet_landmark.heatmap_targets import HeatmapEncoding
from nnunet_landmark.landmark_heads import PLANS_KEY, LandmarkHeads
from nnunet_landmark.landmark_network import HeatmapHeadConfig


def test_heads_round_trip_through_the_plans_and_old_plans_read_as_a_shared_head():
    heads = LandmarkHeads(("apex", "mitral_valve"), 8, HeatmapEncoding("log_distance", 30.0, 10.0),
                          head=HeatmapHeadConfig("decoupled", 16, 0.0))
    plans = {"configurations": {}}
    heads.write_to_plans(plans)
    again = LandmarkHeads.from_plans(json.loads(json.dumps(plans)))
    assert again == heads and again.num_output_channels == 10 and again.head.kind == "decoupled"
    del plans[PLANS_KEY]["heatmap_head"]  # written before heads had a kind
    assert LandmarkHeads.from_plans(plans).head == HeatmapHeadConfig("shared")
    assert LandmarkHeads.from_plans({"configurations": {}}) is None  # plain nnU-Net plans
