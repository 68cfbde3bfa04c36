"""nnUNetv2_landmark_fit_prior: give a trained landmark model the landmark position prior of its folds.

Models trained by ``nnUNetTrainerLandmark`` record each fold's prior (``position_prior``) in their ``plans.json`` as
they train. A model trained before nnunet-landmark had priors predicts the heatmap extremum; this command fits each
fold's prior from the fold's training cases (their preprocessed reference segmentations, ``splits_final.json`` and
world landmarks, as the trainer does), with the heatmap's error on the fold's validation cases where the fold's
``validation/landmarks.csv`` exists, and records it, after which ``nnUNetv2_predict`` combines prior and heatmap.

    nnUNetv2_landmark_fit_prior -d 801 -tr nnUNetTrainerLandmark -p nnUNetResEncUNetMPlans -c 3d_fullres -f 0 1 2
"""
from __future__ import annotations

import argparse
import os

from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json


def fit_model_priors(model_folder: str, folds: list[str]) -> dict:
    """Fit and record the prior of each fold in ``model_folder`` (an nnU-Net trained-model folder); returns
    {fold key: PositionPrior or None}."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.file_path_utilities import parse_dataset_trainer_plans_configuration_from_path
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_landmark.landmark_heads import LandmarkHeads, landmark_names_from_dataset_json
    from nnunet_landmark.prior.storage import record_position_prior
    from nnunet_landmark.layout import LANDMARK_TABLE, SPLITS_FILE
    from nnunet_landmark.raw_dataset import load_world_landmarks
    from nnunet_landmark.prior.fitting import fit_position_prior, validation_measurements

    plans_file = join(model_folder, "plans.json")
    if not isfile(plans_file):
        raise SystemExit(f"{model_folder}: no plans.json; give the folder of a trained model")
    plans = load_json(plans_file)
    if LandmarkHeads.from_plans(plans) is None:
        raise SystemExit(f"{plans_file}: not a landmark model (no 'nnunet_landmark' entry)")
    names = landmark_names_from_dataset_json(load_json(join(model_folder, "dataset.json")))
    plans_manager = PlansManager(plans)
    configuration = parse_dataset_trainer_plans_configuration_from_path(os.path.normpath(model_folder))[3]
    configuration_manager = plans_manager.get_configuration(configuration)
    base = join(nnUNet_preprocessed.get(), plans_manager.dataset_name)
    data_folder = join(base, configuration_manager.data_identifier)
    splits_file = join(base, SPLITS_FILE)
    if not isfile(splits_file):
        raise SystemExit(f"{splits_file} is missing: the folds' training cases are unknown")
    splits = load_json(splits_file)
    fitted = {}
    for fold in folds:
        if fold == "all":
            cases = sorted({c for s in splits for c in s["train"] + s["val"]})
        else:
            if int(fold) >= len(splits):
                raise SystemExit(f"fold {fold}: {splits_file} has {len(splits)} folds")
            cases = splits[int(fold)]["train"]
        world = load_world_landmarks(plans_manager.dataset_name, base, names, cases, write_cache=False)
        prior = fit_position_prior(data_folder, cases, world, plans_manager, configuration_manager, names)
        table = join(model_folder, f"fold_{fold}", "validation", LANDMARK_TABLE)
        if prior is not None and fold != "all" and isfile(table):  # what the validation measured, as the trainer
            val = splits[int(fold)]["val"]
            val_world = load_world_landmarks(plans_manager.dataset_name, base, names, val, write_cache=False)
            measured = validation_measurements(table, val_world, names, val)
            prior = prior.with_validation(measured["heatmap"], measured["prior"], measured["claims"])
        record_position_prior(plans_file, f"fold_{fold}", prior)
        fitted[f"fold_{fold}"] = prior
    return fitted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_landmark_fit_prior", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-tr", default="nnUNetTrainerLandmark")
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0-4)")
    args = parser.parse_args(argv)
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    folder = get_output_folder(maybe_convert_to_dataset_name(args.d), args.tr, args.p, args.c)
    for key, prior in fit_model_priors(folder, args.f).items():
        if prior is None:
            print(f"{key}: fewer than 3 training cases, no prior")
            continue
        print(f"{key}: " + ", ".join(
            f"{n} (structure {p.structure}, leave-one-out {p.loo_rms_mm:.2f} mm, heatmap "
            + ("error on validation unknown" if p.heatmap_error_mm is None else
               f"{p.heatmap_error_mm:.2f} mm RMS on validation") + ")" for n, p in prior.landmarks.items()))
    print(f"recorded in {join(folder, 'plans.json')}")


if __name__ == "__main__":
    main()
