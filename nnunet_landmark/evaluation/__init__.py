"""Evaluation of segmentation + landmark predictions.

General, for any labels and any landmarks:

* ``folder``: evaluate a prediction folder; read references and raw datasets;
* ``baselines``: the geometric tip of a segmentation and the mean position (fitted on a raw dataset);
* ``tables``: every Markdown/CSV table; ``plots``: every figure (matplotlib is imported there only).

The paper's study on top of it (``study``): cross-validation in the layout of its Table 2, the comparison
with plain nnU-Net and ``report.md``. Console scripts: ``cli``. The per-case scores (Dice via nnU-Net's own metric
code, landmark errors in mm) and summaries are ``nnunet_landmark.metrics``, which the trainer uses too.
"""
from nnunet_landmark.evaluation.folder import EvaluationError, evaluate_folder
from nnunet_landmark.metrics import dice, landmark_error_mm, score_case, summarize

__all__ = ["EvaluationError", "evaluate_folder", "dice", "landmark_error_mm", "score_case", "summarize"]
