"""Re-export of our trainer classes for nnU-Net's ``nnUNet_extTrainer`` lookup.

nnU-Net imports every module of this folder as a top-level module and removes it from sys.modules
afterwards. The classes themselves live in ``nnunet_landmark.training`` (the core class in ``trainers``, the variants by topic
in ``variants/``) so that they keep one importable, picklable home (DDP spawn, checkpoints); this module only
names them.
"""
from nnunet_landmark.training.all_trainers import *  # noqa: F401,F403
