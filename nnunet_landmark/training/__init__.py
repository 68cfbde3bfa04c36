"""Training: nnUNetTrainerLandmark, its data loading, loss and logging."""
