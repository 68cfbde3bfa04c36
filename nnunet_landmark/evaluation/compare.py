"""Moved to ``nnunet_landmark.evaluation.study.compare``; this name stays for code that still imports it."""
from nnunet_landmark.evaluation.study.compare import compare_to_plain, paired_wilcoxon  # noqa: F401
