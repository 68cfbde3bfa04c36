"""``report.md``: the cross-validation results of the landmark model in one readable page.

Sections: headline numbers against the paper, the Table-2 layout, the comparison with plain nnU-Net
(when given), learning curves and QC figures. Images are linked relative to the report so the folder
can be moved or zipped as a whole.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from nnunet_landmark.evaluation.study import PAPER
from nnunet_landmark.evaluation.tables import comparison_tables, format_number, table2_markdown
from nnunet_landmark.layout import atomic_write_text


def _image(path: str | os.PathLike, output: Path, caption: str) -> str:
    return f"![{caption}]({Path(os.path.relpath(Path(path).resolve(), output.resolve())).as_posix()})"


def _mean_sd(statistics: Mapping, digits: int) -> str:
    return f"{format_number(statistics['mean'], digits)} ± {format_number(statistics['sd'], digits)}"


def _further_rows(crossval_results: Mapping) -> list[tuple[str, str, int]]:
    """(column, headline text, digits) of the labels and landmarks reported beside the LV and the apex."""
    labels, landmarks = list(crossval_results.get("labels") or {}), list(crossval_results.get("landmarks") or [])
    rows = [(f"dice_{n}", f"Dice, {n}", 3) for n in labels[1:]] if len(labels) > 1 else []
    for n in landmarks[1:] if len(landmarks) > 1 else []:
        rows += [(f"error_mm_{n}", f"{n} error (mm)", 2),
                 (f"mean_position_error_mm_{n}", f"{n}: mean-position baseline (mm)", 2)]
    return rows


def write_report(output_folder: str | os.PathLike, crossval_results: Mapping, comparison: Mapping | None = None,
                 learning_curve_pngs: Sequence[str | os.PathLike] = (), qc_pngs: Sequence[str | os.PathLike] = (),
                 title: str = "LV segmentation and apex detection: cross-validation report") -> Path:
    """Write ``report.md`` into ``output_folder``; returns its path.

    ``crossval_results``: what ``crossval_summary`` returns (or ``comparison['landmark_crossval']``);
    ``comparison``: what ``compare_to_plain`` returns.
    """
    output = Path(output_folder)
    output.mkdir(parents=True, exist_ok=True)
    overall, landmark = crossval_results["overall"], crossval_results["landmark"]
    n = len(crossval_results["per_case"])
    lines = [f"# {title}", "",
             f"Results: `{crossval_results['results_folder']}`; reference: `{crossval_results['raw_dataset_folder']}`; "
             f"{n} held-out images in {len(crossval_results['folds'])} fold(s).", "",
             "## Headline", "",
             "| | this model (mean ± SD) | median | paper (mean) |", "|---|---|---|---|",
             f"| Dice, {crossval_results['lv_label_name']} | {_mean_sd(overall['dice'], 3)} | "
             f"{format_number(overall['dice']['median'], 3)} | {PAPER['dice']} |",
             f"| {landmark} error (mm) | {_mean_sd(overall['error_mm'], 2)} | "
             f"{format_number(overall['error_mm']['median'], 2)} | {PAPER['error_mm']} |",
             f"| geometric-tip baseline (mm) | {_mean_sd(overall['geometric_tip_error_mm'], 2)} | "
             f"{format_number(overall['geometric_tip_error_mm']['median'], 2)} | |",
             f"| mean-position baseline (mm) | {_mean_sd(overall['mean_position_error_mm'], 2)} | "
             f"{format_number(overall['mean_position_error_mm']['median'], 2)} | |"]
    lines += [f"| {what} | {_mean_sd(overall[key], digits)} | {format_number(overall[key]['median'], digits)} | |"
              for key, what, digits in _further_rows(crossval_results)]
    lines += ["", "## Per held-out image (layout of the paper's Table 2)", "", table2_markdown(crossval_results)]
    if comparison is not None:
        lines += ["## Comparison with plain nnU-Net (same folds)", "", comparison_tables(comparison)]
        for name, path in comparison.get("plots", {}).items():
            lines += [_image(path, output, name.replace("_", " ")), ""]
    if learning_curve_pngs:
        lines += ["## Learning curves", ""]
        for path in learning_curve_pngs:
            lines += [f"{Path(path).parent.name}:", "", _image(path, output, f"learning curve {Path(path).parent.name}"),
                      ""]
    if qc_pngs:
        lines += ["## Quality control", "",
                  "Slices through the reference landmark; reference LV outline cyan, prediction magenta.", ""]
        for path in qc_pngs:
            lines += [_image(path, output, Path(path).stem), ""]
    report = output / "report.md"
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    return report
