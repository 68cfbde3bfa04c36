"""One sliding-window step of ``nnUNetv2_predict``, landmark network against plain nnU-Net's, on the CPU.

    python benchmarks/window_cost.py --width resenc_m --repeats 3     # MM-WHS ResEnc-M's network (minutes)
    python benchmarks/window_cost.py --width tiny --repeats 5         # predict_startup.py's 4-32 features

A step is what nnU-Net 2.8.1's sliding window does per tile: the network's forward pass on one 96 x 160 x 160 patch
(MM-WHS ResEnc-M's), then the Gaussian weighting and the float16 accumulation of every output channel. The plain
network makes C = 2 channels; the landmark network is the same network with ``nnUNetTrainerLandmark``'s default
decoupled head (K = 3 heatmaps, half resolution). Interleaved, the order alternating per repeat; medians printed with
their ratio. ``predict_startup.py`` times the whole command with the tiny network, where what is not the network is
what shows; this shows what a step costs at the width users train. A measurement, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

WIDTHS = {"tiny": ([4, 8, 16, 32], [1, 1, 1, 1], [[1, 1, 1]] + [[2, 2, 2]] * 3),
          "resenc_m": ([32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6],
                       [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]])}
PATCH = (96, 160, 160)


def networks(width: str):
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    from nnunet_landmark.landmark_network import HeatmapHeadConfig, LandmarkNetwork

    features, blocks, strides = WIDTHS[width]
    n = len(features)

    def build():
        return ResidualEncoderUNet(1, n, features, torch.nn.Conv3d, [[3, 3, 3]] * n, strides, blocks, 2, [1] * (n - 1),
                                   conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                                   norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                                   nonlin_kwargs={"inplace": True}, deep_supervision=False).eval()

    torch.manual_seed(0)
    plain = build()
    landmark = LandmarkNetwork(build(), 3, HeatmapHeadConfig("decoupled", stride=2, trunk_gradient_scale=0.3),
                               1.0).eval()
    return {"plain": plain, "landmark": landmark}


@torch.inference_mode()
def step(network, x: torch.Tensor, gaussian: torch.Tensor, accumulator: torch.Tensor) -> tuple[float, float]:
    """(forward seconds, weighting + accumulation seconds) of one tile, as nnU-Net's loop does them."""
    start = time.perf_counter()
    prediction = network(x)[0]
    middle = time.perf_counter()
    prediction *= gaussian
    accumulator += prediction
    return middle - start, time.perf_counter() - middle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", choices=list(WIDTHS), default="resenc_m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    nets = networks(args.width)
    x = torch.randn(1, 1, *PATCH)
    gaussian = torch.rand(PATCH).half()
    accumulators = {name: torch.zeros((2 if name == "plain" else 5, *PATCH), dtype=torch.half) for name in nets}
    times = {name: [] for name in nets}
    for repeat in range(args.repeats):
        for name in (list(nets) if repeat % 2 == 0 else list(nets)[::-1]):
            times[name].append(step(nets[name], x, gaussian, accumulators[name]))
            print(name, [f"{t:.3f}" for t in times[name][-1]], flush=True)
    median = {name: [statistics.median(t[i] for t in times[name]) for i in range(2)] for name in nets}
    print(f"\n| {args.width} network, one {PATCH} tile | plain s | landmark s | ratio |\n|---|---|---|---|")
    for i, what in enumerate(("forward pass", "weighting + float16 accumulation")):
        print(f"| {what} | {median['plain'][i]:.3f} | {median['landmark'][i]:.3f} | "
              f"{median['landmark'][i] / median['plain'][i]:.3f} |")
    total = {name: sum(median[name]) for name in nets}
    print(f"| **step** | {total['plain']:.3f} | {total['landmark']:.3f} | {total['landmark'] / total['plain']:.3f} |")


if __name__ == "__main__":
    main()
