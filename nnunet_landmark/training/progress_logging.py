"""nnU-Net's local logger with the heatmap loss and the per-epoch landmark error, plotted in progress.png."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

from nnunet_landmark import nnunet_integration  # noqa: E402

LANDMARK_KEYS = ("train_heatmap_losses", "val_heatmap_losses", "val_landmark_errors_mm")


class LandmarkLocalLogger(LocalLogger):
    """Adds one value per epoch for each of ``LANDMARK_KEYS`` (``MetaLogger.log`` rejects unknown keys)."""

    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        for key in LANDMARK_KEYS:
            nnunet_integration.logged_values(self)[key] = []

    def load_checkpoint(self, checkpoint: dict):
        # a checkpoint of a plain nnU-Net run (or an older one) lacks our keys: start them empty
        super().load_checkpoint({**{k: [] for k in LANDMARK_KEYS}, **checkpoint})

    def plot_progress_png(self, output_folder: str):
        """nnU-Net's three panels plus a fourth: heatmap losses and landmark error (mm) per epoch."""
        log = nnunet_integration.logged_values(self)
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        fig, axes = plt.subplots(4, 1, figsize=(16, 24))

        ax = axes[0]
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", label="loss_tr", linewidth=3)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", label="loss_val", linewidth=3)
        ax2 = ax.twinx()
        ax2.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice", linewidth=2)
        ax2.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", label="pseudo dice (mov. avg.)", linewidth=3)
        ax.set(xlabel="epoch", ylabel="loss (segmentation + beta * heatmap MSE)")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.25, 1))

        ax = axes[1]
        ax.plot(x, log["train_heatmap_losses"][:epoch + 1], color="b", label="heatmap MSE tr", linewidth=3)
        ax.plot(x, log["val_heatmap_losses"][:epoch + 1], color="r", label="heatmap MSE val", linewidth=3)
        ax.set(xlabel="epoch", ylabel="heatmap MSE")
        ax2 = ax.twinx()
        errors = np.asarray(log["val_landmark_errors_mm"][:epoch + 1], dtype=float)
        ax2.plot(x, errors, color="m", marker="o", label="landmark error val (mm, landmarks inside patches)",
                 linewidth=2)
        ax2.set_ylabel("landmark error (mm)")
        if np.any(np.isfinite(errors)):
            ax2.set_ylim(0, max(1.0, float(np.nanmax(errors)) * 1.1))
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.3, 1))

        ax = axes[2]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][:epoch + 1], log["epoch_start_timestamps"])]
        ax.plot(x, durations, color="b", label="epoch duration", linewidth=3)
        ax.set(xlabel="epoch", ylabel="time [s]", ylim=(0, max(durations) * 1.1 if durations else 1))
        ax.legend(loc=(0, 1))

        ax = axes[3]
        ax.plot(x, log["lrs"][:epoch + 1], color="b", label="learning rate", linewidth=3)
        ax.set(xlabel="epoch", ylabel="learning rate")
        ax.legend(loc=(0, 1))

        fig.tight_layout()
        fig.savefig(os.path.join(output_folder, "progress.png"))
        plt.close(fig)
