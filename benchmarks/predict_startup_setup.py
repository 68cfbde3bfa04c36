"""The set-up of ``predict_startup.py``: two model folders of one dataset (plain nnU-Net and a landmark model that
differ only in what the landmark model adds), both with a tiny network at MM-WHS ResEnc-M's spacing and patch, and one
512 x 512 x 200 CT-like case at that spacing; the environment every measured process gets."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DATASET_ID = 898
DATASET = f"Dataset{DATASET_ID}_PredictStartup"
PLANS = "nnUNetResEncUNetMPlans"
CONFIGURATION = "3d_fullres"
TRAINERS = {"plain": "nnUNetTrainer", "landmark": "nnUNetTrainerLandmark"}
LABELS = {"background": 0, "LV_blood_cavity": 1}
LANDMARKS = ("apex", "mitral_valve", "aortic_valve")
SPACING_ZYX = (0.6287, 0.4557, 0.4557)  # MM-WHS, nnUNetPlannerResEncM 3d_fullres
PATCH = (96, 160, 160)
SIZE_XYZ = (512, 512, 200)
FEATURES = (4, 8, 16, 32)
CASE = "CASE"


def plans() -> dict:
    """Plain nnU-Net plans: one 3d_fullres configuration at MM-WHS ResEnc-M spacing and patch, a tiny network."""
    from nnunet_landmark.nnunet_integration import default_resampling

    n = len(FEATURES)
    resampling = default_resampling()
    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "arch_kwargs": {"n_stages": n, "features_per_stage": list(FEATURES), "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                        "n_blocks_per_stage": [1] * n, "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    shape_zyx = [SIZE_XYZ[2], SIZE_XYZ[1], SIZE_XYZ[0]]
    return {"dataset_name": DATASET, "plans_name": PLANS, "original_median_spacing_after_transp": list(SPACING_ZYX),
            "original_median_shape_after_transp": shape_zyx, "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "nnUNetPlannerResEncM", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {
                "max": 1200.0, "mean": 380.0, "median": 400.0, "min": -200.0, "percentile_00_5": 20.0,
                "percentile_99_5": 700.0, "std": 110.0}},
            "configurations": {CONFIGURATION: {
                "data_identifier": f"{PLANS}_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2, "patch_size": list(PATCH), "median_image_size_in_voxels": shape_zyx,
                "spacing": list(SPACING_ZYX), "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False], **resampling, "architecture": architecture, "batch_dice": False}}}


def synthetic_position_prior(cases: int = 6, seed: int = 0):
    """A ``PositionPrior`` fitted to ``cases`` synthetic LV-like structures (moments) and landmarks, world mm."""
    from nnunet_landmark.prior.model import ALL_FOREGROUND, Moments, PositionPrior

    rng = np.random.default_rng(seed)
    in_frame = np.array([[-45.0, 0.0, 0.0], [25.0, 3.0, 0.0], [20.0, -15.0, 10.0]])  # along the long axis first
    fitted = []
    for _ in range(cases):
        q, _ = np.linalg.qr(np.eye(3) + rng.normal(0, 0.1, (3, 3)))  # a rotation near a fixed pose
        rotation = q * np.sign(np.diag(q))
        mean = rng.normal(0, 10, 3)
        cov = rotation @ np.diag(np.array([35.0, 22.0, 18.0]) ** 2 * rng.uniform(0.9, 1.1, 3)) @ rotation.T
        moments = Moments(200_000, mean, cov)
        points = mean + in_frame @ rotation.T + rng.normal(0, 2.0, in_frame.shape)
        fitted.append(({ALL_FOREGROUND: moments, 1: moments}, points))
    prior = PositionPrior.fit(fitted, LANDMARKS)
    if prior is None or set(prior.landmarks) != set(LANDMARKS):
        raise RuntimeError("the synthetic position prior did not fit every landmark")
    return prior


def make_models(results: Path) -> dict[str, Path]:
    """Both model folders (dataset.json, plans.json, fold_0/checkpoint_final.pth); existing ones are kept."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_landmark.heatmap_targets import HeatmapEncoding
    from nnunet_landmark.landmark_heads import LandmarkHeads
    from nnunet_landmark.prior.storage import set_position_prior
    from nnunet_landmark.layout import atomic_write_json
    from nnunet_landmark.training.trainers import nnUNetTrainerLandmark

    folders = {}
    for model, trainer_name in TRAINERS.items():
        folder = results / DATASET / f"{trainer_name}__{PLANS}__{CONFIGURATION}"
        folders[model] = folder
        if (folder / "fold_0" / "checkpoint_final.pth").is_file():
            continue
        (folder / "fold_0").mkdir(parents=True, exist_ok=True)
        dataset_json = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 20, "file_ending": ".nii.gz"}
        model_plans = plans()
        trainer_class = nnUNetTrainer
        if model == "landmark":
            trainer_class = nnUNetTrainerLandmark
            dataset_json["landmarks"] = list(LANDMARKS)
            # as nnUNetTrainerLandmark._make_landmark_heads: log-distance up to the patch diagonal, d0 = 20 mm
            patch_mm = float(np.linalg.norm(np.asarray(PATCH) * np.asarray(SPACING_ZYX)))
            encoding = HeatmapEncoding("log_distance", max_distance_mm=patch_mm, scale_mm=20.0,
                                       sigma_mm=max(4.0, 2 * max(SPACING_ZYX)))
            LandmarkHeads(LANDMARKS, len(LABELS), encoding).write_to_plans(model_plans)
            set_position_prior(model_plans, "fold_0", synthetic_position_prior())
        manager = PlansManager(model_plans)
        torch.manual_seed(0)
        network = trainer_class.build_network_architecture(manager, manager.get_configuration(CONFIGURATION), 1,
                                                           len(LABELS), True)
        checkpoint = {"network_weights": network.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                      "logging": {}, "_best_ema": None, "current_epoch": 1,
                      "init_args": {"plans": model_plans, "configuration": CONFIGURATION, "fold": 0,
                                    "dataset_json": dataset_json, "device": "cpu"},
                      "trainer_name": trainer_name, "inference_allowed_mirroring_axes": (0, 1, 2)}
        torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
        atomic_write_json(dataset_json, folder / "dataset.json")
        atomic_write_json(model_plans, folder / "plans.json")
    return folders


def make_case(folder: Path) -> Path:
    """The 512 x 512 x 200 CT-like case (a phantom given MM-WHS ResEnc-M's spacing) as CASE_0000.nii.gz."""
    import SimpleITK as sitk

    from nnunet_landmark.phantoms import generate_phantom

    path = folder / f"{CASE}_0000.nii.gz"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    image = generate_phantom(0, SIZE_XYZ, oblique_degrees=0.0, flips=False).image
    image.SetSpacing(tuple(float(s) for s in SPACING_ZYX[::-1]))
    sitk.WriteImage(image, str(path.with_suffix(".tmp.nii.gz")), useCompression=True)
    path.with_suffix(".tmp.nii.gz").rename(path)
    return path


def environment(workdir: Path) -> dict:
    return {**os.environ, "nnUNet_raw": str(workdir / "nnUNet_raw"),
            "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
            "nnUNet_results": str(workdir / "nnUNet_results"), "PYTHONUNBUFFERED": "1",
            "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "2")}
