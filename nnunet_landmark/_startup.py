"""Make nnU-Net find our trainers by name, with no configuration by the user.

nnU-Net looks up ``-tr NAME`` inside its own package, then in every folder listed in the
``nnUNet_extTrainer`` environment variable. This module is imported at interpreter start by
``nnunet_landmark.pth`` and appends our small re-export folder to that variable, keeping any folders
the user listed there (their own trainers keep working). It imports nothing heavy.
"""
import os

TRAINER_LOOKUP_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer_lookup")


def register_trainer_folder(environ=os.environ) -> None:
    """Append our trainer folder to ``nnUNet_extTrainer`` unless it is already listed."""
    current = environ.get("nnUNet_extTrainer", "")
    parts = [p for p in current.split(os.pathsep) if p]
    if TRAINER_LOOKUP_FOLDER not in parts:
        environ["nnUNet_extTrainer"] = os.pathsep.join(parts + [TRAINER_LOOKUP_FOLDER])


register_trainer_folder()
