"""Make nnU-Net find our trainers by name, with no configuration by the user.

nnU-Net looks up ``-tr NAME`` inside its own package, then in every folder listed in the
``nnUNet_extTrainer`` environment variable. This module is imported at interpreter start by
``nnunet_landmark.pth`` (installed as the top-level module ``_nnunet_landmark_startup``) and
appends our small re-export folder to that variable, keeping any folders
the user listed there (their own trainers keep working). It imports nothing heavy.

Installed (wheel or editable), the re-export folder is ``site-packages/_nnunet_landmark_trainer_lookup``,
written beside this module by the build (pyproject ``force-include``). It must not be looked up inside the
package: an editable install (``pip install -e .``) leaves the package in the source tree and only the
force-included files in site-packages, and resolving the package here would import it at every start.
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
# in a source tree this file is nnunet_landmark/_startup.py and the folder is nnunet_landmark/trainer_lookup
TRAINER_LOOKUP_FOLDER = os.path.join(_HERE, "trainer_lookup") if os.path.basename(_HERE) == "nnunet_landmark" \
    else os.path.join(_HERE, "_nnunet_landmark_trainer_lookup")


def register_trainer_folder(environ=os.environ) -> None:
    """Append our trainer folder to ``nnUNet_extTrainer`` unless it is already listed."""
    current = environ.get("nnUNet_extTrainer", "")
    parts = [p for p in current.split(os.pathsep) if p]
    if TRAINER_LOOKUP_FOLDER not in parts:
        environ["nnUNet_extTrainer"] = os.pathsep.join(parts + [TRAINER_LOOKUP_FOLDER])


register_trainer_folder()
