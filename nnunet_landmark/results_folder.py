"""Where nnU-Net keeps a trained model: ``RESULTS/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION[/fold_F]``.

nnU-Net builds that name in ``nnunetv2.utilities.file_path_utilities.get_output_folder`` from ``$nnUNet_results``
(read when it is called). ``results_folder`` is that function, also for a results root known only as a path (a
test's or a benchmark's own folders, passed to the console scripts in their environment, not in ``os.environ``).
"""
from __future__ import annotations

import os
from pathlib import Path


def results_folder(dataset: str | int, trainer: str, plans: str, configuration: str, fold: int | str | None = None,
                   results: str | os.PathLike | None = None) -> Path:
    """nnU-Net's output folder of a trained model (``get_output_folder``); under ``results`` instead of
    ``$nnUNet_results`` when given. ``dataset``: a ``DatasetXXX_Name`` or an id (looked up by nnU-Net)."""
    from nnunetv2.utilities.file_path_utilities import (convert_trainer_plans_config_to_identifier,
                                                        get_output_folder)

    if results is None:
        return Path(get_output_folder(dataset, trainer, plans, configuration, fold))
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    folder = (Path(results) / maybe_convert_to_dataset_name(dataset)
              / convert_trainer_plans_config_to_identifier(trainer, plans, configuration))
    return folder if fold is None else folder / f"fold_{fold}"
