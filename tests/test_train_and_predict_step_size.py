"""``nnUNetv2_predict -step_size``: the landmark export decodes in the region of the windows actually used.

Reuses the smoke landmark model of test_train_and_predict_cli.py (trained there when that module runs first in
the session; trained here otherwise).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import environment
from nnunet_landmark.landmark_files import read_markups
from test_train_and_predict_cli import DATASET, LANDMARK_TRAINER, LANDMARKS, predict, results_folder, train

pytestmark = pytest.mark.slow
STEP_SIZES = (0.3, 0.5, 1.0)


@pytest.fixture(scope="session")
def smoke_landmark_model(smoke_dataset):
    env = smoke_dataset["env"]
    folder = results_folder(env, LANDMARK_TRAINER)
    if not (folder / "fold_0" / "checkpoint_final.pth").exists():
        train(env, LANDMARK_TRAINER, 0)
    return {**smoke_dataset, "folder": folder}


def test_step_size_reaches_the_landmark_export(smoke_landmark_model, tmp_path):
    """The same case with -step_size 0.3, 0.5 and 1.0: each export equals decoding that step size's logits in that
    step size's reliable region (as the predictor recorded it)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    from nnunet_landmark import nnunet_integration
    from nnunet_landmark.landmark_export import SlidingWindowRegion, decode_landmarks
    from nnunet_landmark.predictor import nnUNetLandmarkPredictor

    env = smoke_landmark_model["env"]
    image = sorted((Path(env["nnUNet_raw"]) / DATASET / "imagesTr").glob("*_0000.nii.gz"))[0]
    case = image.name[:-len("_0000.nii.gz")]
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copyfile(image, inputs / image.name)
    exported, regions, windows = {}, {}, {}
    for step in STEP_SIZES:
        out = tmp_path / f"step_{step}"
        predict(env, inputs, out, LANDMARK_TRAINER, ("0",), "--disable_tta", "-step_size", str(step), "-npp", "1",
                "-nps", "1")
        exported[step] = read_markups(out / f"{case}.mrk.json", flagged=True)
        with environment(env):
            predictor = nnUNetLandmarkPredictor(tile_step_size=step, use_mirroring=False, device=torch.device("cpu"),
                                                allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(smoke_landmark_model["folder"]), (0,),
                                                           "checkpoint_final.pth")
            data, properties = SimpleITKIO().read_images([str(image)])
            item = next(PreprocessAdapterFromNpy([data], [None], [properties], [None], predictor.plans_manager,
                                                 predictor.dataset_json, predictor.configuration_manager, 1))
            logits = predictor.predict_logits_from_preprocessed_data(item["data"]).cpu().numpy()
        assert nnunet_integration.sliding_window_settings(predictor.configuration_manager) == (step, True)
        decoded = decode_landmarks(logits[2:], item["data_properties"], predictor.plans_manager,
                                   predictor.configuration_manager, predictor.landmark_heads,
                                   segmentation_logits=logits[:2],
                                   label_manager=predictor.plans_manager.get_label_manager(predictor.dataset_json))
        for name in LANDMARKS:
            np.testing.assert_allclose(exported[step][name], decoded[name]["world"], atol=1e-3)
        regions[step] = np.asarray(SlidingWindowRegion(logits.shape[1:], predictor.configuration_manager.patch_size,
                                                       step))
        patch = predictor.configuration_manager.patch_size
        steps = nnunet_integration.sliding_window_steps([max(s, p) for s, p in zip(logits.shape[1:], patch)], patch,
                                                        step)
        windows[step] = steps
    # 0.3 places more windows than 0.5 on this case, so its reliable region is another one
    assert windows[0.3] != windows[0.5] and not np.array_equal(regions[0.3], regions[0.5])
