"""The wheel is the package a researcher installs: built here, installed in a fresh virtual environment
outside the checkout, it runs the CLI and finds the named configs and the built-in weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_copy(src: Path) -> Path:
    """What a build reads of the checkout, copied to ``src``."""
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lung_effnet", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    return src


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed; the dependencies (torch, MONAI, ...) are borrowed
    from this interpreter's site-packages through a ``.pth`` line, which adds the folder to ``sys.path``
    without running its ``.pth`` files, so this checkout's editable install is not seen."""
    base = tmp_path_factory.mktemp("wheel")
    src = _source_copy(base / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(base / "dist"),
                    str(src)], check=True, cwd=base)
    wheel = next((base / "dist").glob("lung_effnet-*.whl"))
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, cwd=base)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


def _run(env_dir: Path, *args: str, cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={"PATH": str(env_dir / "bin"), "HOME": str(cwd)})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_wheel_holds_the_package_and_its_configs_not_the_scripts(installed):
    import zipfile

    names = zipfile.ZipFile(next(installed.parent.glob("dist/*.whl"))).namelist()
    assert "lung_effnet/configs/demo_cpu.yaml" in names and "lung_effnet/configs/default.yaml" in names
    assert any(n.startswith("lung_effnet/models/weights/") and n.endswith(".pt") for n in names)
    assert not any(n.startswith(("pipelines/", "tests/")) for n in names)
    # pyproject.toml lists the packages by hand (configs/ is mapped in): every subpackage must be there
    for init in (ROOT / "lung_effnet").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names, f"{init.parent.name} missing from [tool.setuptools] packages"


def test_installed_cli_and_named_config_work_outside_the_checkout(installed, tmp_path):
    out = _run(installed, str(installed / "bin" / "lung-effnet"), "demo", "--help", cwd=tmp_path)
    assert "--seed" in out
    code = ("import lung_effnet, lung_effnet.config as c; from lung_effnet.models.weight_files import resolve_weights; "
            "cfg = c.load_config('demo_cpu'); print(lung_effnet.__file__); print(cfg.model.pretrained_weights); "
            "print(resolve_weights(cfg.model.pretrained_weights).is_file())")
    lines = _run(installed, str(installed / "bin" / "python"), "-c", code, cwd=tmp_path).split()
    assert lines[0].startswith(str(installed)), lines[0]  # the wheel's copy, not this checkout's
    assert lines[1].startswith("builtin:") and lines[2] == "True"
    missing = subprocess.run([str(installed / "bin" / "python"), "-c", "import pipelines"], cwd=tmp_path, capture_output=True)
    assert missing.returncode != 0  # the stage scripts are not an installed package


def test_the_build_prints_no_setuptools_warning_box(tmp_path):
    """pip shows the build backend's warnings at install: setuptools' boxes (``!!`` / ``****``), such as the
    license-table deprecation or "Package 'lung_effnet.models.weights' ... would be ignored", must not be among them."""
    src = _source_copy(tmp_path / "src")
    result = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])",
                             str(tmp_path / "dist")], cwd=src, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout + result.stderr
    assert "!!" not in printed and "*" * 20 not in printed, printed[-3000:]
    assert "Deprecat" not in printed and "would be ignored" not in printed
