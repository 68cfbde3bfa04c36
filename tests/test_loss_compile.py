"""The heatmap term compiled (as nnU-Net compiles its Dice term on a GPU) equals the eager one."""
import pytest
import torch

from nnunet_landmark.training.loss import SegmentationHeatmapLoss


class _MeanSquares(torch.nn.Module):
    """A stand-in segmentation loss with nnU-Net's deep-supervision weights attribute."""
    weight_factors = (0.5714, 0.2857, 0.1429, 0.0)

    def forward(self, outputs, targets):
        return sum(w * (o.float() ** 2).mean() for w, o in zip(self.weight_factors, outputs))


def _outputs_and_target(seed: int):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, 12, 16, 16), (2, 4, 6, 8, 8), (2, 4, 3, 4, 4), (2, 4, 3, 2, 2)]
    outputs = [torch.randn(s, generator=generator, requires_grad=True) for s in shapes]
    target = [torch.zeros(s[:1] + (1,) + s[2:]) for s in shapes] + [torch.rand((2, 2, 12, 16, 16),
                                                                               generator=generator)]
    return outputs, target


@pytest.mark.parametrize("kind", ["mse"])  # the default; "bce" runs through the same function
def test_compiled_heatmap_term_matches_eager(kind):
    results = {}
    for compiled in (False, True):
        loss = SegmentationHeatmapLoss(_MeanSquares(), num_segmentation_channels=2, heatmap_loss_weight=10.0,
                                       deep_supervision=True, heatmap_loss=kind, compile=compiled)
        assert loss.compiled == compiled
        outputs, target = _outputs_and_target(0)
        value = loss(outputs, target)
        value.backward()
        results[compiled] = (value.detach(), loss.last_heatmap_loss, [o.grad.clone() for o in outputs])
    eager, compiled = results[False], results[True]
    assert torch.allclose(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(compiled[1], eager[1], rtol=1e-5, atol=1e-7)
    for a, b in zip(compiled[2], eager[2]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # the zero-weighted lowest resolution gets no heatmap gradient, as nnU-Net skips zero-weighted outputs
    assert torch.count_nonzero(eager[2][3][:, 2:]) == 0 and torch.count_nonzero(eager[2][2][:, 2:]) > 0
