"""Across anatomies: train on one real heart's phantom family, test on the other's and on the analytic family.

    python benchmarks/cross_anatomy.py --workdir /tmp/cross --train ct_train_1002 analytic+ct_train_1002 \\
        --trainers landmark --seeds 1                      # the family choice: scored on validation phantoms
    python benchmarks/cross_anatomy.py --workdir /tmp/cross --train ct_train_1002 --trainers landmark plain --test
    python benchmarks/cross_anatomy.py --workdir /tmp/cross --report

Training families (``--train``): a template's family (``ct_train_1002``: the real MM-WHS label map 1002 deformed,
see ``nnunet_landmark/anatomy_phantoms.py``), optionally mixed with analytic phantoms (``analytic+ct_train_1002``),
or ``analytic`` (the demo's data before real anatomy). Each is the demo's dataset recipe (20 phantoms of 64 x 64 x 48,
seven structures, three landmarks, fold 0 of 5) and budget (``--landmark-trainer``, default the demo's, against
``nnUNetTrainer_cpu_learn``). Every model predicts the validation phantoms of every family (seed 41, 9 each): the
family the demo trains on is chosen on those. ``--test`` also predicts the test phantoms (seed 51, 12 each), which
only confirm. Scores per case as the demo (``evaluate_test_set``), plus the position prior alone; ``--report`` writes
``--output`` with one table per test family.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import (LANDMARKS, PLAIN_BASE, RESULTS_DIR, make_test_set, mean_max, predict, prepare_dataset, score,
                    train, write_trainer_variants)

TEMPLATE_FAMILIES = ("ct_train_1002", "ct_train_1005", "analytic")
TRAINING_SEED = 31
SETS = {"validation": (41, 9, 5001), "test": (51, 12, 6001)}  # (phantom seed, cases, first case number)


def dataset_of(family: str) -> tuple[int, str]:
    """(id, name) of the dataset of a training family (one per family, ids from 872)."""
    known = ["ct_train_1002", "ct_train_1005", "analytic+ct_train_1002", "analytic+ct_train_1005", "analytic",
             "real", "analytic+real"]
    if family not in known:
        raise SystemExit(f"unknown training family {family!r}: use one of {known}")
    number = 872 + known.index(family)
    return number, f"CrossAnatomy{family.replace('+', 'And').replace('ct_train_', '')}"


def test_set_name(kind: str, family: str) -> str:
    return f"{kind}_{family}"


def run(workdir: Path, family: str, trainer: str, seed: int, kinds: list[str]) -> dict:
    dataset_id, name = dataset_of(family)
    raw = prepare_dataset(workdir, dataset_id, name, family, seed=TRAINING_SEED)
    dataset = raw.name
    model = train(workdir, dataset, trainer, seed)
    result = {"family": family, "trainer": trainer, "seed": seed, "sets": {}}
    for kind in kinds:
        for test_family in TEMPLATE_FAMILIES:
            test_set = test_set_name(kind, test_family)
            predictions = predict(workdir, dataset, trainer, seed, test_set, f"{name}_{trainer}_seed{seed}")
            result["sets"][test_set] = score(workdir, raw, model, predictions, test_set, trainer != PLAIN_BASE)
    return result


def report(workdir: Path, output: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((workdir / "runs").glob("*.json"))]
    # a model scored again with more sets (--test) replaces its earlier scores
    latest: dict = {}
    for r in runs:
        for test_set, rows in r["sets"].items():
            latest[(r["family"], r["trainer"], r["seed"], test_set)] = rows
    runs = [{"family": f, "trainer": t, "seed": s, "sets": {}} for f, t, s in dict.fromkeys(k[:3] for k in latest)]
    for r in runs:
        r["sets"] = {k[3]: rows for k, rows in latest.items() if k[:3] == (r["family"], r["trainer"], r["seed"])}
    lines = []
    for kind in SETS:
        for test_family in TEMPLATE_FAMILIES:
            test_set = test_set_name(kind, test_family)
            mine = [r for r in runs if test_set in r["sets"]]
            if not mine:
                continue
            lines += [f"#### {kind} phantoms of `{test_family}` (mean / max over cases and seeds)", "",
                      "| trained on | model | seeds | LV Dice | foreground Dice | "
                      + " | ".join(f"{n}: written | {n}: heatmap alone | {n}: prior alone | {n}: best rule"
                                   for n in LANDMARKS) + " |", "|---|---|---|---|---|" + "---|" * (4 * len(LANDMARKS))]
            for family in dict.fromkeys(r["family"] for r in mine):
                for trainer in dict.fromkeys(r["trainer"] for r in mine if r["family"] == family):
                    group = [r for r in mine if r["family"] == family and r["trainer"] == trainer]
                    rows = [row for r in group for row in r["sets"][test_set]]
                    cells = [family, "plain" if trainer == PLAIN_BASE else trainer,
                             ", ".join(str(r["seed"]) for r in group), mean_max([r["dice"] for r in rows]),
                             mean_max([r["foreground_dice"] for r in rows])]
                    for n in LANDMARKS:
                        if trainer == PLAIN_BASE:
                            cells += ["", "", "", mean_max([r["rule_errors_mm"][n] for r in rows])]
                        else:
                            cells += [mean_max([r["landmark_errors_mm"][n] for r in rows]),
                                      mean_max([r["heatmap_extremum_errors_mm"][n] for r in rows]),
                                      mean_max([r["prior_alone_errors_mm"][n] for r in rows]),
                                      mean_max([r["rule_errors_mm"][n] for r in rows])]
                    lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    text = "\n".join(lines) + "\n"
    output.write_text(text)
    output.with_suffix(".json").write_text(json.dumps(runs, indent=1, default=float))
    return text


def main(argv: list[str] | None = None) -> None:
    from nnunet_landmark.demo import SETUPS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--train", nargs="+", default=[], help="training families")
    parser.add_argument("--trainers", nargs="+", default=["landmark"], choices=("landmark", "plain"))
    parser.add_argument("--landmark-trainer", default=SETUPS["cpu"][1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--test", action="store_true", help="also predict the test phantoms")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "cross_anatomy.md")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    write_trainer_variants(workdir / "trainers", {})
    kinds = ["validation"] + (["test"] if args.test else [])
    for kind in kinds:
        seed, cases, first = SETS[kind]
        for family in TEMPLATE_FAMILIES:
            make_test_set(workdir, test_set_name(kind, family), family, seed, cases, first)
    (workdir / "runs").mkdir(exist_ok=True)
    trainers = {"landmark": args.landmark_trainer, "plain": PLAIN_BASE}
    for seed in args.seeds:
        for family in args.train:
            for which in args.trainers:
                trainer = trainers[which]
                out = workdir / "runs" / f"{dataset_of(family)[1]}_{trainer}_seed{seed}_{'+'.join(kinds)}.json"
                if out.exists():
                    continue
                result = run(workdir, family, trainer, seed, kinds)
                out.write_text(json.dumps(result, indent=1, default=float))
                print(family, trainer, seed, {s: np.mean([r["dice"] for r in rows]).round(3)
                                              for s, rows in result["sets"].items()}, flush=True)
    if args.report:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        print(report(workdir, args.output))


if __name__ == "__main__":
    main()
