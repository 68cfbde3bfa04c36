"""Dataset-specific converters, one module per public dataset (as nnU-Net keeps ``nnunetv2.dataset_conversion``).

Their source is the repository's top-level ``dataset_conversion/`` folder (the project's layout); they are imported
as ``nnunet_landmark.dataset_conversion.<module>``. A wheel carries them here, beside this file; in a source checkout
or an editable install this package's path points at that folder instead.
"""
from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
_source = _here.parents[1] / "dataset_conversion"
if not any(_here.glob("convert_*.py")) and _source.is_dir():
    __path__ = [str(_source)]
