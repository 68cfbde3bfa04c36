"""One way to make an nnU-Net dataset of phantoms, and one way to run the console scripts.

``prepare_phantom_dataset``: phantoms in the MM-WHS CT release layout (``phantoms.write_mmwhs_phantoms``) ->
``nnUNetv2_convert_MMWHS`` -> ``nnUNetv2_plan_and_preprocess -pl nnUNetPlannerResEncM -c 3d_fullres`` -> the small
CPU configuration ``3d_cpu`` added to the plans (``cpu_plans.add_small_configuration``). The tests, the demo and
the benchmarks build their data with it. A step whose result is already there is skipped, so a rerun in the same
folders resumes.

``run_console_script``: an installed command (``nnUNetv2_*``) of this interpreter's environment; raises
``ConsoleScriptError`` with the end of its output when it fails.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

PLANNER = "nnUNetPlannerResEncM"
PLANS = "nnUNetResEncUNetMPlans"
# the small CPU configuration: 32^3 patches, 8-64 features, batch 2 (inherits 3d_fullres's preprocessed data)
SMALL_CONFIGURATION = {"name": "3d_cpu", "patch_size": (32, 32, 32), "features_per_stage": (8, 16, 32, 64),
                       "batch_size": 2}
OUTPUT_TAIL = 6000  # characters of a failed command's output in the error


class ConsoleScriptError(RuntimeError):
    """A console script ended with a non-zero exit code; the message holds the end of its output."""


def console_script(name: str) -> str:
    """The command ``name`` of this interpreter's bin folder when it is there, else ``name`` (looked up on PATH)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def run_console_script(command: Sequence[str], env: Mapping[str, str] | None = None, log: Path | None = None,
                       progress: re.Pattern | None = None, echo: bool = False, timeout: float | None = None,
                       check: bool = True) -> subprocess.CompletedProcess:
    """Run ``command`` (its first word a console script, see ``console_script``) with ``env`` on top of this
    process's environment.

    Without ``log`` stdout and stderr are captured apart. With ``log`` both go, in order, to ``stdout`` of the
    result and are appended to the file (after a ``$ command`` line), and lines matching ``progress`` are printed
    as they come. ``echo`` prints the command first. ``check``: raise ``ConsoleScriptError`` on a non-zero exit.
    """
    words = " ".join(command)
    command = [console_script(command[0]), *command[1:]]
    if echo:
        print("  $ " + " ".join(command), flush=True)
    full_env = {**os.environ, **(env or {})}
    if log is None:
        result = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)
    else:
        result = _run_logged(command, full_env, Path(log), progress, timeout)
    if check and result.returncode != 0:
        raise ConsoleScriptError(f"{words} failed with exit code {result.returncode}"
                                 + (f"; its output is in {log}" if log is not None else "")
                                 + f"\n--- stdout ---\n{result.stdout[-OUTPUT_TAIL:]}"
                                 + f"\n--- stderr ---\n{result.stderr[-OUTPUT_TAIL:]}")
    return result


def _run_logged(command: list[str], env: dict, log: Path, progress: re.Pattern | None,
                timeout: float | None) -> subprocess.CompletedProcess:
    lines = []
    with open(log, "a") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   bufsize=1)
        timed_out = threading.Event()
        timer = threading.Timer(timeout, lambda: (timed_out.set(), process.kill())) if timeout is not None else None
        if timer is not None:
            timer.start()
        try:
            for line in process.stdout:
                f.write(line)
                lines.append(line)
                if progress is not None and progress.search(line.rstrip()):
                    print("    " + line.rstrip()[-150:], flush=True)
            returncode = process.wait()
        finally:
            if timer is not None:
                timer.cancel()
    if timed_out.is_set():
        raise subprocess.TimeoutExpired(command, timeout, output="".join(lines))
    return subprocess.CompletedProcess(command, returncode, "".join(lines), "")


@dataclass(frozen=True)
class PhantomDataset:
    """What ``prepare_phantom_dataset`` made: the dataset's name and folders, and the small configuration's name
    (None without one)."""

    dataset_id: int
    name: str  # DatasetXXX_Name
    raw: Path
    plans_file: Path
    configuration: str | None


def prepare_phantom_dataset(env: Mapping[str, str], dataset_id: int, phantoms: Path, name: str = "MMWHS_LVApex",
                            landmarks: Sequence[str] = ("apex",), folds: int = 10, num_cases: int = 20,
                            seed: int = 0, size: str | tuple[int, int, int] = "tiny", flips: bool = True,
                            phantom_progress: bool = True, annotations: Sequence[str] | None = None,
                            all_structures: bool = False, family: str = "analytic",
                            processes: int = 2, fingerprint_processes: int | None = None, overwrite: bool = False,
                            small_configuration: bool | Mapping[str, Any] = True,
                            write_phantoms: Callable[[Path], Any] | None = None,
                            step: Callable[[str], Any] | None = None, **run_options) -> PhantomDataset:
    """Phantoms -> ``nnUNetv2_convert_MMWHS`` -> ``nnUNetv2_plan_and_preprocess`` (ResEnc-M planner, 3d_fullres)
    -> the small CPU configuration, in the nnU-Net folders of ``env`` (``nnUNet_raw``, ``nnUNet_preprocessed``).

    ``phantoms``: the MM-WHS-like folder, written (``num_cases``, ``seed``, ``size``, ``flips``, ``family``; or by
    ``write_phantoms(phantoms)``) when the conversion needs it and it holds no ``landmarks.csv``. ``annotations``:
    the converter's ``-a`` (default the phantoms' ``landmarks.csv``); ``name``, ``landmarks``, ``folds``,
    ``overwrite``, ``all_structures``: its options (defaults: its own). ``processes`` / ``fingerprint_processes``:
    the planner's ``-np`` / ``-npfp``. ``small_configuration``: False for none, a mapping to change ``SMALL_CONFIGURATION``'s values.
    Skipped: the planning when the plans exist, the conversion also when the raw dataset exists (unless
    ``overwrite``). ``step(title)`` is called before the conversion and the planning (done or skipped);
    ``run_options`` go to ``run_console_script`` (``log``, ``progress``, ``echo``, ``timeout``).
    """
    dataset = f"Dataset{dataset_id:03d}_{name}"
    raw = Path(env["nnUNet_raw"]) / dataset
    plans_file = Path(env["nnUNet_preprocessed"]) / dataset / f"{PLANS}.json"
    plan = not plans_file.is_file()
    convert = plan and (overwrite or not (raw / "dataset.json").is_file())
    if convert and not (Path(phantoms) / "landmarks.csv").is_file():
        if write_phantoms is not None:
            write_phantoms(Path(phantoms))
        else:
            from nnunet_landmark.phantom_families import write_mmwhs_phantoms

            write_mmwhs_phantoms(phantoms, num_cases, seed=seed, size=size, flips=flips, progress=phantom_progress,
                                 family=family)
    if step is not None:
        step("nnUNetv2_convert_MMWHS")
    if convert:
        run_console_script(["nnUNetv2_convert_MMWHS", "-i", str(Path(phantoms) / "ct_train"), "-a",
                            *(annotations or [str(Path(phantoms) / "landmarks.csv")]), "-d", str(dataset_id),
                            "--name", name, "--landmarks", *landmarks, "--folds", str(folds),
                            *(["--overwrite"] if overwrite else []),
                            *(["--all-structures"] if all_structures else [])], env, **run_options)
    if step is not None:
        step("nnUNetv2_plan_and_preprocess (ResEnc-M planner)")
    if plan:
        run_console_script(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-pl", PLANNER, "-c", "3d_fullres",
                            "-np", str(processes),
                            *(["-npfp", str(fingerprint_processes)] if fingerprint_processes is not None else [])],
                           env, **run_options)
    configuration = None
    if small_configuration is not False:
        from nnunet_landmark.cpu_plans import add_small_configuration

        options = {**SMALL_CONFIGURATION, **(small_configuration if isinstance(small_configuration, Mapping) else {})}
        configuration = options["name"]
        add_small_configuration(plans_file, **options)
    return PhantomDataset(dataset_id, dataset, raw, plans_file, configuration)
