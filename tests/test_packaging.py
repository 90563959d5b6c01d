"""The wheel carries the templates, the compatibility data and the kernel logo; the installed CLI finds them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_templates_and_data(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("kbundle-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in (ROOT / "templates").rglob("*"):
        if template.is_file():
            assert f"kbundle/templates/{template.relative_to(ROOT / 'templates').as_posix()}" in names
    data_files = {n for n in names if n.startswith("kbundle/data/") and n.endswith(".yaml")}
    assert len(data_files) >= 4, data_files
    for logo in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):  # every kernelspec gets a copy
        assert f"kbundle/data/logo/{logo}" in names
    entry_points = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    )
    assert "kbundle = kbundle.cli:main" in entry_points
    assert "kbundle-kernel = kbundle.kernel.launcher:main" in entry_points


def test_cli_version_and_help_from_another_directory(tmp_path):
    kbundle = Path(sys.executable).parent / "kbundle"
    version = subprocess.run([str(kbundle), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0
    from kbundle import __version__

    assert version.stdout.strip() == f"kbundle {__version__}"
    helptext = subprocess.run([str(kbundle), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert helptext.returncode == 0
    for command in ("pack", "inspect", "verify", "run"):
        assert command in helptext.stdout


def test_unknown_option_is_one_error_line(tmp_path):
    kbundle = Path(sys.executable).parent / "kbundle"
    proc = subprocess.run([str(kbundle), "--no-such-option"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
