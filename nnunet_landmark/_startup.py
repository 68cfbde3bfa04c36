"""Make nnU-Net find our trainers by name, and adapt its predictor before its first use, with no configuration.

nnU-Net looks up ``-tr NAME`` inside its own package, then in every folder listed in the
``nnUNet_extTrainer`` environment variable. This module is imported at interpreter start by
``nnunet_landmark.pth`` (installed as the top-level module ``_nnunet_landmark_startup``) and
appends our small re-export folder to that variable, keeping any folders
the user listed there (their own trainers keep working). It imports nothing heavy.

Installed (wheel or editable), the re-export folder is ``site-packages/_nnunet_landmark_trainer_lookup``,
written beside this module by the build (pyproject ``force-include``). It must not be looked up inside the
package: an editable install (``pip install -e .``) leaves the package in the source tree and only the
force-included files in site-packages, and resolving the package here would import it at every start.

It also registers an import hook: when nnU-Net's predictor module is imported, ``nnunet_integration.install`` runs
at once. Without it the adaptations arrived only when nnU-Net's predictor looked up a landmark trainer, in the middle
of ``initialize_from_trained_model_folder``, so ``nnUNetv2_predict``'s one call to it ran unadapted and every
recorded fold's position prior was pooled whatever ``-f`` said.
"""
import os
import sys

PREDICTOR_MODULE = "nnunetv2.inference.predict_from_raw_data"
TRAINER_MODULE = "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"  # install() adapts it too; it imports the predictor

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


class _AdaptWhenImported:
    """A meta path finder: nnU-Net's predictor (and trainer) modules load as usual, and once the predictor module is
    loaded and the trainer module is not half-way through its own imports, our adaptations are installed."""

    def find_spec(self, name, path=None, target=None):
        if name not in (PREDICTOR_MODULE, TRAINER_MODULE):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _AdaptingLoader(spec.loader)
                return spec
        return None


class _AdaptingLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _install_when_ready()

    def __getattr__(self, name):  # anything else (get_resource_reader, is_package, ...) is the real loader's
        return getattr(self.loader, name)


def _install_when_ready() -> None:
    predictor, trainer = sys.modules.get(PREDICTOR_MODULE), sys.modules.get(TRAINER_MODULE)
    if predictor is None or not hasattr(predictor, "nnUNetPredictor"):
        return
    if trainer is not None and not hasattr(trainer, "nnUNetTrainer"):
        return  # the trainer module is importing the predictor: install when it has finished
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AdaptWhenImported)]
    try:
        from nnunet_landmark import nnunet_integration
        from nnunet_landmark.landmark_export import export_prediction_with_landmarks
        nnunet_integration.install(export_prediction_with_landmarks)
    except Exception as e:  # never break plain nnU-Net; our trainers' import installs the adaptations again
        import warnings
        warnings.warn(f"nnunet-landmark could not adapt nnU-Net's predictor: {e!r}", RuntimeWarning)


def register_predictor_hook() -> None:
    """Install our adaptations as soon as nnU-Net's predictor module is imported (at once if it already is)."""
    if any(isinstance(f, _AdaptWhenImported) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _AdaptWhenImported())


register_trainer_folder()
register_predictor_hook()
