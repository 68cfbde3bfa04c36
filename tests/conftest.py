"""Shared fixtures: nnU-Net folders in a temporary place, CLI runner, the real-data folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BIN = Path(sys.executable).parent


def shared_data(*parts: str) -> Path:
    """A file of ../shared/data; the test is skipped (with the reason) only where that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-anatomy data folder {SHARED_DATA} is absent")
    assert path.exists(), f"{path} missing although {SHARED_DATA} exists"
    return path


def nnunet_environment(root: Path) -> dict[str, str]:
    env = {
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        "nnUNet_n_proc_DA": "2",
        "nnUNet_compile": "0",
    }
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch) -> dict[str, str]:
    """Empty nnUNet_raw / _preprocessed / _results folders, set in this process's environment."""
    env = nnunet_environment(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def run_cli(command: list[str], env: dict[str, str] | None = None, timeout: float = 900,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run an installed console script (nnUNetv2_*) from this interpreter's bin folder."""
    full_env = {**os.environ, **(env or {})}
    exe = str(BIN / command[0]) if (BIN / command[0]).exists() else command[0]
    result = subprocess.run([exe, *command[1:]], env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed with exit code {result.returncode}\n"
                             f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}")
    return result
