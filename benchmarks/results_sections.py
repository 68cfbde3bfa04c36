"""Named sections of benchmarks/RESULTS.md that different scripts own (so rerunning one keeps the others')."""
from __future__ import annotations

import re
from pathlib import Path


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"<!-- {re.escape(name)} -->\n.*?<!-- /{re.escape(name)} -->\n", re.S)


def sections(path: Path) -> str:
    """Every named section of the file, in order, as text ('' if none or no file)."""
    if not path.exists():
        return ""
    return "".join(m.group(0) for m in re.finditer(r"<!-- ([\w-]+) -->\n.*?<!-- /\1 -->\n", path.read_text(), re.S))


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` into the section ``name`` of the file, replacing that section or appending it."""
    block = f"<!-- {name} -->\n{text.rstrip()}\n<!-- /{name} -->\n"
    current = path.read_text() if path.exists() else ""
    if _pattern(name).search(current):
        current = _pattern(name).sub(lambda _: block, current)
    else:
        current = current.rstrip("\n") + ("\n\n" if current else "") + block
    path.write_text(current)
