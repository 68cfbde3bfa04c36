"""Moved to ``nnunet_landmark.evaluation.study.report``; this name stays for code that still imports it."""
from nnunet_landmark.evaluation.study.report import write_report  # noqa: F401
