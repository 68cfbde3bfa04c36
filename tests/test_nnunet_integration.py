"""The seam with nnU-Net's internals (``nnunet_integration``): what it adapts is as checked against nnunetv2 2.8.1, a
changed method is named, every swap is undone, it imports nothing of ours that imports it, and its small reaches
(plans.json writes, the properties' keys, the planner's resampling) do what they say."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_landmark import nnunet_integration


def test_landmark_label_manager():
    stock = LabelManager({"background": 0, "lv": 1, "la": 2}, None)
    manager = nnunet_integration.LandmarkLabelManager(stock, 2)
    assert manager.num_segmentation_heads == 5 and manager.num_segmentation_channels == 3
    assert manager.foreground_labels == [1, 2] and manager.has_regions is False
    logits = torch.randn(5, 4, 5, 6)
    logits[3:] = 100  # heatmap channels must not win the argmax
    np.testing.assert_array_equal(np.asarray(manager.convert_logits_to_segmentation(logits)),
                                  np.asarray(stock.convert_logits_to_segmentation(logits[:3])))
    probabilities = manager.apply_inference_nonlin(logits)
    assert probabilities.shape[0] == 3
    torch.testing.assert_close(probabilities.sum(0), torch.ones(4, 5, 6))
    clone = pickle.loads(pickle.dumps(manager))  # travels to nnU-Net's export workers
    assert clone.num_segmentation_heads == 5

def test_nnunet_internals_are_as_checked():
    """Fails loudly if nnU-Net moves what nnunet_integration adapts (checked against 2.8.1)."""
    from nnunetv2.inference import predict_from_raw_data
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    from nnunet_landmark.landmark_export import export_prediction_with_landmarks

    nnunet_integration.check_internals()
    nnunet_integration.install(export_prediction_with_landmarks)
    assert predict_from_raw_data.export_prediction_from_logits is export_prediction_with_landmarks
    assert trainer_module.export_prediction_from_logits is export_prediction_with_landmarks
    assert getattr(predict_from_raw_data.nnUNetPredictor.predict_sliding_window_return_logits, "_nnunet_landmark")
    nnunet_integration.install(export_prediction_with_landmarks)  # idempotent: no double wrapping
    wrapped = predict_from_raw_data.nnUNetPredictor.predict_sliding_window_return_logits
    assert not getattr(wrapped.__wrapped__, "_nnunet_landmark", False)

@pytest.mark.parametrize("method, needle", [
    ("validation_step", "self.loss(output, target)"),
    ("configure_rotation_dummyDA_mirroring_and_inital_patch_size", "self.inference_allowed_mirroring_axes"),
    ("perform_actual_validation", "self.inference_allowed_mirroring_axes"),
])
def test_check_internals_names_a_trainer_method_that_changed(monkeypatch, method, needle):
    """The validation-step swap and the mirroring switches rely on these lines of nnUNetTrainer: an nnU-Net whose
    method lacks them fails the check, naming the method."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    def changed(self, *args, **kwargs):
        return None

    monkeypatch.setattr(nnUNetTrainer, method, changed)
    with pytest.raises(RuntimeError, match=method):
        nnunet_integration.check_internals()

def test_validation_swaps_are_undone_even_on_errors():
    class Trainer:
        network, loss, inference_allowed_mirroring_axes = "network", "loss", (0, 1, 2)

    trainer = Trainer()
    with pytest.raises(ValueError):
        with nnunet_integration.precomputed_validation_outputs(trainer, "output", 0.5):
            assert trainer.network("data") == "output" and trainer.loss("o", "t") == 0.5
            raise ValueError
    assert (trainer.network, trainer.loss) == ("network", "loss")
    with nnunet_integration.without_validation_mirroring(trainer):
        assert trainer.inference_allowed_mirroring_axes is None
    assert trainer.inference_allowed_mirroring_axes == (0, 1, 2)
    assert nnunet_integration.without_mirroring(("r", False, (8, 8, 8), (0, 1, 2))) == ("r", False, (8, 8, 8), None)

def test_dependencies_run_one_way():
    """predictor -> landmark_export -> nnunet_integration: importing the integration (and running its checks) imports
    neither the export nor the predictor. (The installed startup hook, which installs the export when nnU-Net's
    predictor is imported, is taken out first: it is the one place that joins them.)"""
    import subprocess
    import sys

    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_AdaptWhenImported']; "
            "from nnunet_landmark import nnunet_integration; nnunet_integration.check_internals(); "
            "print(sorted(m for m in sys.modules if m in ('nnunet_landmark.landmark_export', 'nnunet_landmark.predictor')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_plans_json_writes_go_through_the_given_writer_and_other_files_through_nnunets(tmp_path):
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    written = []
    original = trainer_module.save_json
    with nnunet_integration.plans_json_writes(lambda plans, path: written.append((plans, path))):
        trainer_module.save_json({"a": 1}, str(tmp_path / "plans.json"), sort_keys=False)
        trainer_module.save_json({"b": 2}, str(tmp_path / "dataset.json"), sort_keys=False)
    assert written == [({"a": 1}, str(tmp_path / "plans.json"))]
    assert json.loads((tmp_path / "dataset.json").read_text()) == {"b": 2} and not (tmp_path / "plans.json").exists()
    assert trainer_module.save_json is original


def test_case_properties_name_what_is_missing():
    properties = {"spacing": [1, 1, 1], "bbox_used_for_cropping": [[0, 2]] * 3,
                  "shape_after_cropping_and_before_resampling": [2, 2, 2]}
    assert nnunet_integration.case_properties(properties, tuple(properties)) == properties
    with pytest.raises(KeyError, match=r"lack \['sitk_stuff', 'shape_before_cropping'\]"):
        nnunet_integration.case_properties(properties)


def test_default_resampling_is_the_planners():
    resampling = nnunet_integration.default_resampling()
    assert resampling["resampling_fn_data"] == "resample_data_or_seg_to_shape"
    assert resampling["resampling_fn_probabilities"] == "resample_data_or_seg_to_shape"
    assert resampling["resampling_fn_seg_kwargs"]["is_seg"] is True
    assert resampling["resampling_fn_data_kwargs"]["is_seg"] is False


@pytest.mark.parametrize("first_import", ["nnunetv2.inference.predict_from_raw_data",  # nnUNetv2_predict
                                          "nnunetv2.run.run_training",  # nnUNetv2_train: the trainer imports the predictor
                                          "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"])
def test_a_fresh_interpreter_adapts_nnunets_predictor_as_soon_as_it_is_imported(first_import):
    """``nnUNetv2_predict`` calls ``initialize_from_trained_model_folder`` once, and it is there that nnU-Net first
    imports our trainers: the adaptations must already be in place (the installed startup hook), or that call keeps
    every fold's position prior whatever ``-f`` says. A plain interpreter: nothing of ours is imported until nnU-Net's
    predictor module is."""
    import subprocess
    import sys

    code = ("import sys, warnings\n"
            "warnings.simplefilter('error', RuntimeWarning)\n"
            "assert 'nnunet_landmark' not in sys.modules\n"
            f"import {first_import}\n"
            "from nnunetv2.inference import predict_from_raw_data as p\n"
            "from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as t\n"
            "assert t.export_prediction_from_logits.__module__ == 'nnunet_landmark.landmark_export'\n"
            "assert getattr(p.nnUNetPredictor.initialize_from_trained_model_folder, '_nnunet_landmark', False)\n"
            "assert p.export_prediction_from_logits.__module__ == 'nnunet_landmark.landmark_export'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
