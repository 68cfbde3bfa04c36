"""Training pieces without a training run: data loader + augmentation, loss, network heads, integration."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_landmark.cpu_plans import small_configuration
from nnunet_landmark.heatmap_targets import HeatmapEncoding, render_heatmaps
from nnunet_landmark.heatmap_decoding import decode_heatmap
from nnunet_landmark.landmark_heads import PLANS_KEY, LandmarkHeads
from nnunet_landmark.training.data_loading import nnUNetLandmarkDataLoader
from nnunet_landmark.training.loss import SegmentationHeatmapLoss
from nnunet_landmark.training.trainers import nnUNetTrainerLandmark

ENCODINGS = [HeatmapEncoding("log_distance", max_distance_mm=120.0), HeatmapEncoding("gaussian", sigma_mm=4.0)]


class SphereDataset:
    """Duck-typed nnU-Net dataset: random images whose second segmentation channel is a ball at the landmark."""

    def __init__(self, landmarks: dict, shape=(40, 44, 36), radius=2.6, seed=0):
        rng = np.random.default_rng(seed)
        self.identifiers = list(landmarks)
        self.cases = {}
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
        for case, positions in landmarks.items():
            seg = np.zeros((2, *shape), np.int16)
            seg[0][rng.random(shape) < 0.2] = 1
            seg[1][np.linalg.norm(grid - positions[0], axis=-1) <= radius] = 1
            image = rng.normal(0, 1, (1, *shape)).astype(np.float32)
            self.cases[case] = (image, seg, {"class_locations": {1: np.argwhere(seg[:1] > 0)}})

    def load_case(self, identifier):
        image, seg, properties = self.cases[identifier]
        return image, seg, None, properties


def training_pipeline(patch_size, force_spatial: bool):
    """nnU-Net's default training transforms (deep supervision on); optionally rotation+scaling always on."""
    rotation = (-30. / 360 * 2. * np.pi, 30. / 360 * 2. * np.pi)
    transforms = nnUNetTrainer.get_training_transforms(
        patch_size, rotation, [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]], (0, 1, 2), False,
        use_mask_for_norm=[False], is_cascaded=False, foreground_labels=[1], regions=None, ignore_label=None)
    if force_spatial:
        spatial = transforms.transforms[0]
        spatial.p_rotation, spatial.p_scaling = 1.0, 1.0
    return transforms


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.kind)
def test_heatmap_survives_the_default_augmentation(encoding):
    """After rotation, scaling, mirroring and nnU-Net's other transforms, the decoded heatmap extremum lies within
    1 voxel of where the same landmark, drawn as a ball in an extra segmentation channel, ended up."""
    torch.manual_seed(0)
    np.random.seed(0)
    rng = np.random.default_rng(3)
    landmarks = {f"case_{i}": rng.uniform(12, 26, size=(1, 3)) for i in range(6)}
    dataset = SphereDataset(landmarks)
    patch, initial = (24, 24, 24), (34, 34, 34)
    label_manager = LabelManager({"background": 0, "thing": 1}, None)
    loader = nnUNetLandmarkDataLoader(dataset, 4, initial, patch, label_manager, oversample_foreground_percent=0.0,
                                      transforms=training_pipeline(patch, force_spatial=True), landmarks=landmarks,
                                      spacing=(1.0, 1.0, 1.0), encoding=encoding, landmark_oversample_percent=1.0)
    distances = []
    for _ in range(6):
        batch = loader.generate_train_batch()
        assert batch["data"].shape == (4, 1, *patch)
        assert len(batch["target"]) == 4  # three deep-supervision segmentations + the heatmaps
        heatmaps = batch["target"][-1]
        assert heatmaps.shape == (4, 1, *patch) and heatmaps.dtype == torch.float32
        ball = batch["target"][0][:, 1]
        for b in range(4):
            voxels = np.argwhere(ball[b].numpy() == 1)
            if len(voxels) < 20:  # the ball was (partly) augmented out of the patch
                continue
            # the landmark is inside the patch, so the heatmap reaches its landmark value there: the nearest voxel
            # is at most sqrt(3)/2 voxel away, 1.25 mm allowing for the scaling augmentation (x0.7-1.4)
            extreme = float(heatmaps[b, 0].min() if encoding.kind == "log_distance" else heatmaps[b, 0].max())
            sharp = float(encoding.encode(np.array(1.25)))
            assert (extreme <= sharp) if encoding.kind == "log_distance" else (extreme >= sharp), (extreme, sharp)
            decoded = decode_heatmap(heatmaps[b, 0].numpy(), encoding)
            distances.append(np.linalg.norm(decoded.position - voxels.mean(axis=0)))
    assert len(distances) >= 12
    assert max(distances) < 1.0, distances


def test_heatmaps_match_crops_without_augmentation():
    """Without spatial transforms the heatmap is the rendering at the crop position, and the reported
    landmark position in the crop is exact."""
    rng = np.random.default_rng(5)
    landmarks = {f"case_{i}": rng.uniform(8, 30, size=(2, 3)) for i in range(4)}
    encoding = ENCODINGS[0]
    loader = nnUNetLandmarkDataLoader(SphereDataset(landmarks), 2, (20, 20, 20), (20, 20, 20),
                                      LabelManager({"background": 0, "thing": 1}, None), transforms=None,
                                      landmarks=landmarks, spacing=(2.0, 1.0, 1.5), encoding=encoding)
    batch = loader.generate_train_batch()
    for b, key in enumerate(batch["keys"]):
        expected = render_heatmaps((20, 20, 20), batch["landmarks_in_crop"][b], (2.0, 1.0, 1.5), encoding)
        np.testing.assert_allclose(batch["target"][-1][b].numpy(), expected, atol=1e-6)
        assert batch["target"][-1][b].shape[0] == 2


def test_a_transform_that_drops_the_heatmap_is_an_error():
    from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

    class Forgetful(BasicTransform):
        def _apply_to_image(self, img, **params):
            return img

        def _apply_to_segmentation(self, segmentation, **params):
            return segmentation

    landmarks = {"a": np.array([[10.0, 10.0, 10.0]])}
    loader = nnUNetLandmarkDataLoader(SphereDataset(landmarks), 1, (20, 20, 20), (20, 20, 20),
                                      LabelManager({"background": 0, "thing": 1}, None), transforms=Forgetful(),
                                      landmarks=landmarks, spacing=(1, 1, 1), encoding=ENCODINGS[0])
    with pytest.raises(RuntimeError, match="dropped the heatmaps"):
        loader.generate_train_batch()


def test_loss_is_segmentation_plus_beta_mse_in_float32():
    torch.manual_seed(0)
    c, k = 2, 3
    outputs = [torch.randn(2, c + k, 8, 8, 8, requires_grad=True), torch.randn(2, c + k, 4, 4, 4, requires_grad=True)]
    seg_targets = [torch.randint(0, c, (2, 1, 8, 8, 8)), torch.randint(0, c, (2, 1, 4, 4, 4))]
    heatmap_target = torch.rand(2, k, 8, 8, 8)

    class SumOfMeans(torch.nn.Module):  # stands in for nnU-Net's deep-supervised Dice+CE
        def forward(self, outs, targets):
            return sum(o.float().mean() + 0 * t.float().mean() for o, t in zip(outs, targets))

    loss = SegmentationHeatmapLoss(SumOfMeans(), c, heatmap_loss_weight=10.0)
    value = loss(outputs, seg_targets + [heatmap_target])
    expected_seg = sum(o[:, :c].mean() for o in outputs)
    expected_mse = ((torch.sigmoid(outputs[0][:, c:]) - heatmap_target) ** 2).mean()
    assert float(value) == pytest.approx(float(expected_seg + 10 * expected_mse), rel=1e-6)
    assert float(loss.last_heatmap_loss) == pytest.approx(float(expected_mse), rel=1e-6)
    value.backward()
    assert outputs[0].grad[:, c:].abs().sum() > 0  # heatmap channels get gradient at full resolution
    assert outputs[1].grad[:, c:].abs().sum() == 0  # and only there
    # under bfloat16 autocast the heatmap term is still computed in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss([o.detach().bfloat16() for o in outputs], seg_targets + [heatmap_target])
    assert loss.last_heatmap_loss.dtype == torch.float32
    reference = ((torch.sigmoid(outputs[0][:, c:].detach().bfloat16().float()) - heatmap_target) ** 2).mean()
    assert float(loss.last_heatmap_loss) == pytest.approx(float(reference), rel=1e-6)
    assert torch.isfinite(low)


def test_heatmap_loss_is_deep_supervised_with_nnunet_weights():
    torch.manual_seed(1)
    c, k = 2, 1
    shapes = [(8, 8, 8), (4, 4, 4), (2, 2, 2)]
    outputs = [torch.randn(2, c + k, *s, requires_grad=True) for s in shapes]
    seg_targets = [torch.randint(0, c, (2, 1, *s)) for s in shapes]
    heatmap_target = torch.rand(2, k, 8, 8, 8)

    class Zero(torch.nn.Module):
        def forward(self, outs, targets):
            return sum(0 * o.sum() for o in outs)

    weights = (4 / 7, 2 / 7, 0.0)  # as nnU-Net's: decreasing per level, the lowest output unused
    loss = SegmentationHeatmapLoss(Zero(), c, heatmap_loss_weight=10.0, deep_supervision=True,
                                   deep_supervision_weights=weights)
    value = loss(outputs, seg_targets + [heatmap_target])
    # target at half resolution: the mean of each 2x2x2 block
    half = heatmap_target.reshape(2, k, 4, 2, 4, 2, 4, 2).mean(dim=(3, 5, 7))
    mse_full = ((torch.sigmoid(outputs[0][:, c:]) - heatmap_target) ** 2).mean()
    mse_half = ((torch.sigmoid(outputs[1][:, c:]) - half) ** 2).mean()
    assert float(value) == pytest.approx(float(10 * (4 / 7 * mse_full + 2 / 7 * mse_half)), rel=1e-6)
    assert float(loss.last_heatmap_loss) == pytest.approx(float(mse_full), rel=1e-6)  # the log: full resolution
    value.backward()
    assert outputs[1].grad[:, c:].abs().sum() > 0
    assert outputs[2].grad is None or outputs[2].grad[:, c:].abs().sum() == 0  # weight 0: skipped, as nnU-Net


def test_bce_heatmap_loss_option():
    torch.manual_seed(2)
    outputs = torch.randn(2, 3, 6, 6, 6)
    heatmap_target = torch.rand(2, 1, 6, 6, 6)

    class Zero(torch.nn.Module):
        def forward(self, out, target):
            return 0 * out.sum()

    loss = SegmentationHeatmapLoss(Zero(), 2, heatmap_loss_weight=3.0, heatmap_loss="bce")
    value = loss(outputs, [torch.zeros(2, 1, 6, 6, 6), heatmap_target])
    t, x = heatmap_target, outputs[:, 2:]
    expected = -(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x))).mean()
    assert float(value) == pytest.approx(3 * float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="unknown heatmap loss 'l1'"):
        SegmentationHeatmapLoss(Zero(), 2, heatmap_loss="l1")


def _plans_with_heads(tmp_config: dict, network_class: str, heads: LandmarkHeads) -> PlansManager:
    arch = tmp_config["architecture"]
    arch["network_class_name"] = network_class
    kwargs = arch["arch_kwargs"]
    if network_class.endswith("PlainConvUNet"):
        kwargs["n_conv_per_stage"] = kwargs.pop("n_blocks_per_stage")
    plans = {"configurations": {"3d_fullres": {"patch_size": [32, 32, 32], "batch_size": 2, "spacing": [1, 1, 1],
                                               "architecture": arch, "data_identifier": "x",
                                               "preprocessor_name": "DefaultPreprocessor"}},
             "dataset_name": "Dataset999_X", "plans_name": "p", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2]}
    plans["configurations"]["3d_cpu"] = small_configuration(plans, patch_size=(16, 16, 16),
                                                            features_per_stage=(4, 8, 16))
    heads.write_to_plans(plans)
    return PlansManager(plans)


RESENC_ARCH = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
               "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                               "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                               "n_blocks_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                               "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                               "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                               "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                               "nonlin_kwargs": {"inplace": True}},
               "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


@pytest.mark.parametrize("network_class", ["dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                                           "dynamic_network_architectures.architectures.unet.PlainConvUNet"])
def test_network_has_segmentation_plus_heatmap_channels(network_class):
    import copy
    heads = LandmarkHeads(("apex", "mitral_valve", "aortic_valve"), 2, HeatmapEncoding())
    plans_manager = _plans_with_heads({"architecture": copy.deepcopy(RESENC_ARCH)}, network_class, heads)
    configuration = plans_manager.get_configuration("3d_cpu")
    network = nnUNetTrainerLandmark.build_network_architecture(plans_manager, configuration, 1, 2, True)
    assert type(network).__name__ == network_class.rsplit(".", 1)[1]
    outputs = network(torch.zeros(1, 1, 16, 16, 16))
    assert [o.shape[1] for o in outputs] == [5, 5]  # every deep-supervision output has C + K channels
    with pytest.raises(RuntimeError, match="segmentation"):
        nnUNetTrainerLandmark.build_network_architecture(plans_manager, configuration, 1, 3, False)
    del plans_manager.plans[PLANS_KEY]
    with pytest.raises(RuntimeError, match="no landmark heads"):
        nnUNetTrainerLandmark.build_network_architecture(plans_manager, configuration, 1, 2, False)


def test_decoupled_head_keeps_plain_nnunets_network_and_scales_its_gradient_into_it(tmp_path):
    """The decoupled head: the plans' segmentation network built as plain nnU-Net builds it (same parameter names,
    so nnU-Net's ``-pretrained_weights`` loads a plain checkpoint into it), C + K channels at every output, and the heatmap loss's gradient into the shared
    trunk scaled by ``trunk_gradient_scale``: none at 0, a tenth at 0.1; the head itself always learns."""
    import copy

    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from nnunet_landmark.landmark_network import HeatmapHeadConfig, LandmarkNetwork

    gradients = {}
    for scale in (0.0, 0.1, 1.0):
        heads = LandmarkHeads(("apex", "mitral_valve"), 2, HeatmapEncoding(max_distance_mm=30.0),
                              head=HeatmapHeadConfig("decoupled", 6, scale))
        plans_manager = _plans_with_heads({"architecture": copy.deepcopy(RESENC_ARCH)}, RESENC_ARCH["network_class_name"],
                                          heads)
        configuration = plans_manager.get_configuration("3d_cpu")
        torch.manual_seed(0)
        network = nnUNetTrainerLandmark.build_network_architecture(plans_manager, configuration, 1, 2, True)
        assert isinstance(network, LandmarkNetwork)
        torch.manual_seed(0)
        plain = nnUNetTrainer.build_network_architecture(plans_manager, configuration, 1, 2, True)
        trunk = {k for k in network.state_dict() if not k.startswith("heatmap_head.seg_layers.")}
        assert trunk == set(plain.state_dict())  # plain nnU-Net's keys and shapes: its weights load
        # as nnUNetv2_train -pretrained_weights does it: the trunk is the plain model's, the head keeps its start
        checkpoint = tmp_path / f"plain_{scale}.pth"
        torch.save({"network_weights": plain.state_dict()}, checkpoint)
        head_before = {k: v.clone() for k, v in network.state_dict().items() if k.startswith("heatmap_head.")}
        load_pretrained_weights(network, str(checkpoint))
        after = network.state_dict()
        assert all(torch.equal(after[k], v) for k, v in plain.state_dict().items() if ".seg_layers." not in k)
        assert head_before and all(torch.equal(after[k], v) for k, v in head_before.items())
        network.load_state_dict({**network.state_dict(), **plain.state_dict()})
        x = torch.randn(2, 1, 16, 16, 16)
        outputs = network(x)
        assert [tuple(o.shape[1:]) for o in outputs] == [(4, 16, 16, 16), (4, 8, 8, 8)]
        for got, want in zip(outputs, plain(x)):  # the segmentation channels are plain nnU-Net's output
            torch.testing.assert_close(got[:, :2], want)
        torch.testing.assert_close(outputs[1][:, 2:], torch.nn.functional.avg_pool3d(outputs[0][:, 2:], 2))
        outputs[0][:, 2:].square().sum().backward()  # a loss on the heatmaps alone
        gradients[scale] = {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}
        network.decoder.deep_supervision = False  # as nnU-Net's set_deep_supervision_enabled, for inference
        assert network(x).shape == (2, 4, 16, 16, 16)
    for scale in (0.0, 0.1, 1.0):
        assert any(n.startswith("heatmap_head.") and g.abs().sum() > 0 for n, g in gradients[scale].items())
    trunk_names = [n for n in gradients[1.0] if n.startswith("encoder.")]
    assert trunk_names and not any(n in gradients[0.0] and gradients[0.0][n].abs().sum() > 0 for n in trunk_names)
    tenth, full = (torch.cat([gradients[s][n].flatten() for n in trunk_names]) for s in (0.1, 1.0))
    assert full.abs().max() > 0
    torch.testing.assert_close(tenth, 0.1 * full, rtol=0, atol=1e-4 * float(full.abs().max()))


def test_heatmap_loss_reductions():
    """"landmark": the patch mean divided by the target's support ball as a fraction of the patch (a per-landmark sum
    that does not shrink as the patch grows); "topk": the mean of the hardest fraction of voxels per sample and
    landmark."""
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 6, 6, 6)
    target = torch.rand(2, 1, 6, 6, 6)

    class Zero(torch.nn.Module):
        def forward(self, out, target):
            return 0 * out.sum()

    squared = (torch.sigmoid(logits[:, 2:]) - target) ** 2
    mean = SegmentationHeatmapLoss(Zero(), 2, heatmap_loss_weight=1.0)
    per_landmark = SegmentationHeatmapLoss(Zero(), 2, heatmap_loss_weight=1.0, reduction="landmark", reference_fraction=0.05)
    assert float(per_landmark(logits, [None, target])) == pytest.approx(float(squared.mean()) / 0.05, rel=1e-6)
    assert float(mean(logits, [None, target])) == pytest.approx(float(squared.mean()), rel=1e-6)
    topk = SegmentationHeatmapLoss(Zero(), 2, heatmap_loss_weight=1.0, reduction="topk", topk_fraction=0.1,
                                   heatmap_loss="bce")
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 2:], target, reduction="none").flatten(2)
    hardest = torch.sort(bce, dim=2, descending=True).values[:, :, :22]  # ceil(0.1 * 216)
    assert float(topk(logits, [None, target])) == pytest.approx(float(hardest.mean()), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        SegmentationHeatmapLoss(Zero(), 2, reduction="median")
