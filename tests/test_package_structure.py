"""The package's rooms: no import cycle between its modules, training does not reach into evaluation, every reach
into nnU-Net's internals is in the seam, and no module grows past the size a reader can hold."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nnunet_landmark"
MAX_LINES = 450


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    for path in sorted((ROOT / "dataset_conversion").glob("*.py")):
        found[f"nnunet_landmark.dataset_conversion.{path.stem}"] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules ``path`` imports at module level (imports inside functions run late: no cycle there)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.parse(path.read_text()).body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        out |= {t for t in targets if t in known and t != name}
    return out


def test_no_import_cycles_and_training_does_not_import_evaluation():
    found = modules()
    graph = {name: imports_of(path, name, set(found)) for name, path in found.items()}
    for name, targets in graph.items():
        if name.startswith("nnunet_landmark.training"):
            assert not any(t.startswith("nnunet_landmark.evaluation") for t in targets), (name, targets)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in graph[node]:
            if state.get(target) == 1 and not target.endswith("__init__"):
                cycle = trail[trail.index(target):] + [target] if target in trail else [node, target]
                # a package's __init__ importing its own submodules is not a cycle of rooms
                if not all(c.startswith(cycle[0].rsplit(".", 1)[0]) for c in cycle) or len(set(cycle)) > 2:
                    pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("forbidden", ["my_fantastic_logging", "_do_i_compile", "determine_resampling(",
                                       ".local_logger ="])
def test_reaches_into_nnunet_internals_live_in_the_seam(forbidden):
    offenders = [str(p.relative_to(ROOT)) for name, p in modules().items()
                 if forbidden in p.read_text() and name != "nnunet_landmark.nnunet_integration"]
    assert offenders == [], f"{forbidden} used outside nnunet_integration.py: {offenders}"


def test_no_module_is_over_its_size():
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, long


def test_every_trainer_is_documented():
    """docs/trainers.md tells a user which trainer to use when: a trainer it does not name is one nobody can choose."""
    import re

    from nnunet_landmark.training import all_trainers

    text = (ROOT / "docs" / "trainers.md").read_text()
    named = set(re.findall(r"nnUNetTrainer\w*", text))
    # the table abbreviates families: `nnUNetTrainerLandmark_{1,5,10}epochs`, `_beta1`
    for family in re.findall(r"`(nnUNetTrainer\w*)_\{([\d,]+)\}(\w+)`", text):
        named |= {f"{family[0]}_{n}{family[2]}" for n in family[1].split(",")}
    for suffix in re.findall(r"`_(\w+)`", text):
        named.add(f"nnUNetTrainerLandmark_{suffix}")
    named |= {"nnUNetTrainerLandmark_1epoch"} if "nnUNetTrainerLandmark_1epochs" in named else set()
    missing = [name for name in all_trainers.__all__ if name not in named]
    assert not missing, f"trainers missing from docs/trainers.md: {missing}"


def test_links_in_readme_and_docs_resolve():
    import re

    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith("http"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
