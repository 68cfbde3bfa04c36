"""Trainer variants by topic, as nnU-Net files its own under ``nnUNetTrainer/variants/<topic>/``: each is a few
lines setting one attribute after ``super().__init__`` with the exact signature (nnU-Net rebuilds trainers
from checkpoints by class name and signature). ``nnunet_landmark.training.all_trainers`` collects them."""
