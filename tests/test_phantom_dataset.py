"""The one way tests, the demo and the benchmarks run console scripts: this environment's command, the log, and a
failure that says which command failed with the end of its output."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from nnunet_landmark.phantom_dataset import ConsoleScriptError, console_script, run_console_script


def test_console_scripts_come_from_this_interpreters_environment():
    assert console_script("nnUNetv2_train") == str(Path(sys.executable).parent / "nnUNetv2_train")
    assert console_script("surely-not-a-command") == "surely-not-a-command"


def test_a_logged_run_keeps_the_output_in_order_and_prints_progress(tmp_path, capsys):
    log = tmp_path / "log.txt"
    result = run_console_script(["python", "-u", "-c", "import sys; print('Epoch 1'); print('noise', file=sys.stderr); "
                                 "print('Epoch 2')"], log=log, progress=re.compile(r"^Epoch \d+$"))
    assert result.stdout.splitlines() == ["Epoch 1", "noise", "Epoch 2"]  # stderr interleaved where it came
    assert log.read_text().startswith("$ ") and "Epoch 2" in log.read_text()
    printed = capsys.readouterr().out
    assert "Epoch 1" in printed and "noise" not in printed


def test_a_failed_command_is_named_with_the_end_of_its_output(tmp_path):
    with pytest.raises(ConsoleScriptError, match=r"python -c .* failed with exit code 3(.|\n)*the reason"):
        run_console_script(["python", "-c", "import sys; print('the reason'); sys.exit(3)"])
    result = run_console_script(["python", "-c", "import sys; sys.exit(3)"], check=False)
    assert result.returncode == 3
