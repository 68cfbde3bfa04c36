"""Dataset-specific converters (installed as ``nnunet_landmark.dataset_conversion``)."""
