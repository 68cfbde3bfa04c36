"""Evaluation of segmentation + landmark predictions: metrics, folder evaluation, cross-validation
summaries (the paper's Table 2), comparison with plain nnU-Net, QC figures and a Markdown report.

Import from the submodules (``evaluate``, ``crossval``, ``compare``, ``qc``, ``report``, ``metrics``);
this package module stays import-light (no matplotlib).
"""
from nnunet_landmark.evaluation.evaluate import EvaluationError, evaluate_folder
from nnunet_landmark.evaluation.metrics import dice, landmark_error_mm, summarize

__all__ = ["EvaluationError", "evaluate_folder", "dice", "landmark_error_mm", "summarize"]
