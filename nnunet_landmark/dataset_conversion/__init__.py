"""Dataset-specific converters, one module per public dataset (as nnU-Net keeps ``nnunetv2.dataset_conversion``)."""
