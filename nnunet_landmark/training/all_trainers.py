"""Every trainer the plugin defines, in one namespace: what nnU-Net's ``-tr NAME`` lookup finds (through
``trainer_lookup/nnunet_landmark_trainers.py``) and what the tests enumerate."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_landmark.training.trainers import *  # noqa: F401,F403
from nnunet_landmark.training.variants.cpu_budgets import *  # noqa: F401,F403
from nnunet_landmark.training.variants.heatmap import *  # noqa: F401,F403
from nnunet_landmark.training.variants.optimizer import *  # noqa: F401,F403
from nnunet_landmark.training.variants.training_length import *  # noqa: F401,F403

__all__ = sorted(name for name, value in list(globals().items())
                 if isinstance(value, type) and issubclass(value, nnUNetTrainer)
                 and value.__module__.startswith("nnunet_landmark."))
