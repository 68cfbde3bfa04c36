"""Both ways users install the plugin find the trainers and run the console scripts.

``pip install .`` (wheel) and ``pip install -e .`` (editable, how nnU-Net's README tells developers to install)
lay files out differently: an editable install leaves the package in the source tree and writes only the
force-included files (the ``.pth`` start hook and its trainer folder) into site-packages. Each mode is installed
into a scratch virtual environment that reaches this environment's dependencies (torch, nnU-Net) through a
plain path line in a ``.pth`` file: a path line adds the folder to ``sys.path`` without running the ``.pth``
hooks inside it, so our installed copy's start hook does not run there and only the scratch install's does.
"""
import os
import shutil
import subprocess
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LOOKUP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    result = {"extTrainer": os.environ.get("nnUNet_extTrainer", "")}
    for name in ("nnUNetTrainerLandmark", "nnUNetTrainerLandmarkGaussian", "nnUNetTrainerLandmark_beta100"):
        cls = recursive_find_trainer_class_by_name(name)
        result[name] = None if cls is None else [cls.__module__, cls.__qualname__]
    import nnunet_landmark, nnunet_landmark.dataset_conversion.convert_mmwhs as conv
    result["package_file"] = nnunet_landmark.__file__
    result["converter_file"] = conv.__file__
    print("RESULT " + json.dumps(result))
""")


def _scratch_environment(root: Path) -> Path:
    """A venv with pip whose sys.path ends with this interpreter's site-packages (no .pth hooks run from there)."""
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    scratch_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # "zzz" sorts after the editable install's own .pth, so the source tree comes before our installed copy
    Path(scratch_site, "zzz_parent_environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


def _install_and_look_up(tmp_path: Path, editable: bool) -> dict:
    python = _scratch_environment(tmp_path)
    source = tmp_path / "checkout"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info",
                                                                   "demo_output", "output", ".pytest_cache"))
    install = [str(python), "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check"]
    install += ["-e", str(source)] if editable else [str(source)]
    done = subprocess.run(install, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    environ = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "PYTHONPATH")}
    # run from an unrelated folder so that nothing is imported from the current directory
    looked_up = subprocess.run([str(python), "-c", LOOKUP_SCRIPT], capture_output=True, text=True, env=environ,
                               cwd=tmp_path)
    assert looked_up.returncode == 0, looked_up.stdout + looked_up.stderr
    line = [ln for ln in looked_up.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    import json
    result = json.loads(line[len("RESULT "):])
    script = Path(python).parent / "nnUNetv2_convert_MMWHS"
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=environ, cwd=tmp_path)
    result["converter_help"] = (helped.returncode, helped.stdout + helped.stderr)
    result["source"] = str(source)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("editable", [True, False], ids=["editable", "wheel"])
def test_trainer_lookup_and_console_scripts(tmp_path, editable):
    result = _install_and_look_up(tmp_path, editable)
    folders = [p for p in result["extTrainer"].split(os.pathsep) if p]
    assert len(folders) == 1 and Path(folders[0], "nnunet_landmark_trainers.py").is_file(), result["extTrainer"]
    homes = {"nnUNetTrainerLandmark": "nnunet_landmark.training.trainers",
             "nnUNetTrainerLandmarkGaussian": "nnunet_landmark.training.variants.heatmap",
             "nnUNetTrainerLandmark_beta100": "nnunet_landmark.training.variants.heatmap"}
    for name, module in homes.items():
        assert result[name] == [module, name], result
    package = Path(result["package_file"]).resolve()
    # editable: the code a developer edits is the code that runs; wheel: the installed copy, not the checkout
    assert (package.is_relative_to(Path(result["source"]).resolve())) == editable, package
    # the converters' source is the checkout's top-level dataset_conversion/; a wheel carries them in the package
    converter = Path(result["converter_file"]).resolve()
    expected = Path(result["source"]).resolve() / "dataset_conversion" if editable else package.parent / "dataset_conversion"
    assert converter.parent == expected, converter
    code, text = result["converter_help"]
    assert code == 0 and "nnUNetv2_convert_MMWHS" in text, text
