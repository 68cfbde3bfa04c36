"""nnUNetLandmarkPredictor: nnU-Net's predictor for landmark models, from Python.

``nnUNetv2_predict`` needs none of this (the export is adapted by ``nnunet_integration``); this class is for users
who predict from Python and want the landmarks in memory. Dependencies run one way: predictor -> landmark_export ->
nnunet_integration.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.inference import export_prediction as nnunet_export
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_landmark import nnunet_integration
from nnunet_landmark.landmark_export import decode_landmarks, export_prediction_with_landmarks
from nnunet_landmark.landmark_heads import LandmarkHeads


class nnUNetLandmarkPredictor(nnUNetPredictor):
    """nnU-Net's predictor for landmark models, from Python.

    ``predict_from_files`` & co. work as in nnU-Net and also write landmarks (see the module docstring).
    ``predict_single_npy_array_with_landmarks`` returns the segmentation and the landmarks in memory.
    """

    def __init__(self, *args, **kwargs):
        nnunet_integration.install(export_prediction_with_landmarks)
        super().__init__(*args, **kwargs)

    @property
    def landmark_heads(self) -> LandmarkHeads:
        heads = LandmarkHeads.from_plans(self.plans_manager.plans) if self.plans_manager is not None else None
        if heads is None:
            raise RuntimeError("this predictor holds no landmark model (its plans.json has no 'nnunet_landmark' "
                               "entry); it was trained with a plain nnU-Net trainer")
        return heads

    def predict_single_npy_array_with_landmarks(self, input_image: np.ndarray, image_properties: dict,
                                                refine: bool = True):
        """(segmentation, landmarks) for one image already loaded as nnU-Net's reader loads it.

        ``image_properties`` must hold ``spacing`` and, for world coordinates, ``sitk_stuff`` (what
        ``SimpleITKIO().read_images`` returns). Landmarks: {name: {"world", "index", "confidence"}}.
        """
        from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

        heads = self.landmark_heads
        adapter = PreprocessAdapterFromNpy([input_image], [None], [image_properties], [None], self.plans_manager,
                                           self.dataset_json, self.configuration_manager,
                                           num_threads_in_multithreaded=1, verbose=self.verbose)
        item = next(adapter)
        logits = self.predict_logits_from_preprocessed_data(item["data"]).cpu()
        c = heads.num_segmentation_heads
        segmentation = nnunet_export.convert_predicted_logits_to_segmentation_with_correct_shape(
            logits[:c], self.plans_manager, self.configuration_manager,
            self.plans_manager.get_label_manager(self.dataset_json), item["data_properties"])
        landmarks = decode_landmarks(logits[c:], item["data_properties"], self.plans_manager,
                                     self.configuration_manager, heads, refine=refine, segmentation_logits=logits[:c],
                                     label_manager=self.plans_manager.get_label_manager(self.dataset_json))
        return segmentation, landmarks
