"""The two measurements of ``gpu_check.py`` that run in a fresh process each (``gpu_check.py --worker ...``):
training iterations of one trainer with nnU-Net's defaults, and the agreement of the landmark model's heatmaps and
landmarks on two devices. Each prints one ``RESULT <json>`` line for the driver."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

DATASET_ID = 897
DATASET = f"Dataset{DATASET_ID}_MMWHS_LVApex"
PLANS = "nnUNetResEncUNetMPlans"


# ------------------------------------------------------------------------------------------ training
def train_worker(trainer_name: str, configuration: str, device_name: str, warmup: int, timed: int) -> dict:
    """In a fresh process: nnU-Net's own start of training, then ``warmup + timed`` iterations as run_training
    runs them (next batch from the augmentation workers, train_step); the model is saved for prediction."""
    import torch
    import torch._dynamo.utils as dynamo_utils
    from nnunetv2.run.run_training import get_trainer_from_args

    recompiles = []

    class _Count(logging.Handler):
        def emit(self, record):
            recompiles.append(record.getMessage().splitlines()[0])

    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(_Count())

    device = torch.device(device_name)
    trainer = get_trainer_from_args(str(DATASET_ID), configuration, 0, trainer_name, PLANS, device=device)
    trainer.on_train_start()  # initialize (compile), nnU-Net's data loaders and augmentation workers
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    scale = (lambda: float(trainer.grad_scaler.get_scale())) if trainer.grad_scaler is not None else (lambda: None)
    waits, steps, losses, skipped = [], [], [], {"warmup": 0, "timed": 0}
    frames_after_warmup = None
    first_step_seconds = None
    for i in range(warmup + timed):
        if i == warmup:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            frames_after_warmup = dict(dynamo_utils.counters["frames"])
        before = scale()
        start = time.perf_counter()
        batch = next(trainer.dataloader_train)
        got = time.perf_counter()
        output = trainer.train_step(batch)
        sync()
        done = time.perf_counter()
        after = scale()
        if before is not None and after < before:  # GradScaler lowers its scale exactly when it skips a step
            skipped["warmup" if i < warmup else "timed"] += 1
        losses.append(float(np.asarray(output["loss"])))
        if i == 0:
            first_step_seconds = done - got
        if i >= warmup:
            waits.append(got - start)
            steps.append(done - got)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else float("nan")
    frames = dict(dynamo_utils.counters["frames"])
    graphs = int(dynamo_utils.counters["stats"].get("unique_graphs", 0))
    trainer.on_train_end()  # saves checkpoint_final.pth for prediction, stops the workers
    total = np.asarray(waits) + np.asarray(steps)
    return {"seconds_per_iteration": float(np.median(total)), "mean_seconds_per_iteration": float(total.mean()),
            "seconds_waiting_for_data": float(np.mean(waits)), "seconds_in_train_step": float(np.median(steps)),
            "first_iteration_seconds": first_step_seconds, "peak_cuda_memory_mib": peak,
            "compiled": bool(trainer._do_i_compile()), "dynamo_frames_compiled": int(frames.get("ok", 0)),
            "dynamo_unique_graphs": graphs,
            "dynamo_frames_compiled_after_warmup": int(frames.get("ok", 0)) - int((frames_after_warmup or {}).get("ok", 0)),
            "recompiles": len(recompiles), "recompile_reasons": recompiles[:5], "skipped_gradscaler_steps": skipped,
            "losses": losses, "augmentation_workers": int(os.environ.get("nnUNet_n_proc_DA", -1)),
            "patch_size": list(trainer.configuration_manager.patch_size),
            "batch_size": int(trainer.configuration_manager.batch_size),
            "output_folder": trainer.output_folder}


# -------------------------------------------------------------------------------------------- agreement
def agreement_worker(configuration: str, case_image: str, crop_center: list, devices: list[str]) -> dict:
    """The landmark model's heatmaps for one case cropped to about one patch, on two devices (GPU and CPU on a
    GPU machine): largest difference of the sigmoid heatmaps where the sliding window is reliable, and distance
    between the landmarks decoded from each."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    from nnunet_landmark.metrics import landmark_error_mm
    from nnunet_landmark.landmark_export import decode_landmarks, reliable_sliding_window_region
    from nnunet_landmark.predictor import nnUNetLandmarkPredictor
    from nnunet_landmark.results_folder import results_folder

    folder = str(results_folder(DATASET, "nnUNetTrainerLandmark", PLANS, configuration))
    predictors = {}
    for name in devices:
        predictor = nnUNetLandmarkPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                            device=torch.device(name), verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(folder, (0,), "checkpoint_final.pth")
        predictors[name] = predictor
    reference = predictors[devices[0]]
    patch = np.asarray(reference.configuration_manager.patch_size, dtype=float)  # preprocessed (z, y, x) order
    spacing = np.asarray(reference.configuration_manager.spacing, dtype=float)
    image = sitk.ReadImage(case_image)
    # a cube no larger than the patch along any axis (at the model's target spacing) keeps the CPU side to one
    # sliding window
    extent_mm = 0.9 * float(np.min(patch * spacing))
    centre = image.TransformPhysicalPointToContinuousIndex([float(c) for c in crop_center])
    half = np.ceil(extent_mm / np.asarray(image.GetSpacing()) / 2).astype(int)
    lower = np.clip(np.round(centre).astype(int) - half, 0, np.asarray(image.GetSize()) - 1)
    upper = np.clip(lower + 2 * half, 1, np.asarray(image.GetSize()))
    crop = sitk.RegionOfInterest(image, [int(u - l) for l, u in zip(lower, upper)], [int(v) for v in lower])
    path = Path(tempfile.mkdtemp()) / "crop_0000.nii.gz"
    sitk.WriteImage(crop, str(path))
    data, properties = SimpleITKIO().read_images([str(path)])
    adapter = PreprocessAdapterFromNpy([data], [None], [properties], [None], reference.plans_manager,
                                       reference.dataset_json, reference.configuration_manager, 1, verbose=False)
    item = next(adapter)
    heads = reference.landmark_heads
    c = heads.num_segmentation_heads
    logits, landmarks = {}, {}
    for name, predictor in predictors.items():
        with torch.no_grad():
            logits[name] = predictor.predict_logits_from_preprocessed_data(item["data"]).float().cpu()
        landmarks[name] = decode_landmarks(logits[name][c:], item["data_properties"], predictor.plans_manager,
                                           predictor.configuration_manager, heads)
    a, b = (torch.sigmoid(logits[d][c:]).numpy() for d in devices)
    valid = np.broadcast_to(reliable_sliding_window_region(a.shape[1:], reference.configuration_manager.patch_size),
                            a.shape[1:])
    difference = np.abs(a - b)[:, valid]
    distances = {n: landmark_error_mm(landmarks[devices[0]][n]["world"], landmarks[devices[1]][n]["world"])
                 for n in heads.names}
    return {"devices": devices, "preprocessed_shape": list(a.shape[1:]), "reliable_fraction": float(valid.mean()),
            "max_sigmoid_difference": float(difference.max()), "mean_sigmoid_difference": float(difference.mean()),
            "landmark_distance_mm": distances,
            "segmentation_agreement": float((logits[devices[0]][:c].argmax(0) == logits[devices[1]][:c].argmax(0))
                                            .float().mean())}


def worker_main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "train":
        result = train_worker(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
    else:
        result = agreement_worker(argv[1], argv[2], json.loads(argv[3]), json.loads(argv[4]))
    print("RESULT " + json.dumps(result), flush=True)
