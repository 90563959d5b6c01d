"""envcheck: the environment after pip, judged as its users will see it (pure, table-driven)."""

from __future__ import annotations

import json

import pytest

from kbundle.image import envcheck

PIP_CHECK = """\
tensorboard 2.3.0 has requirement setuptools>=41.0.0, but you have setuptools 40.2.0.
kbrange 1.5 requires kbdep, which is not installed.
ipython 7.18.1 has requirement jedi>=0.10, but you have jedi 0.9.
No broken requirements found.
"""


def test_parse_pip_check_reads_both_kinds_of_line():
    problems = envcheck.parse_pip_check(PIP_CHECK)
    assert [(p.owner, p.needed, p.found) for p in problems] == [
        ("tensorboard", "setuptools", "setuptools 40.2.0"),
        ("kbrange", "kbdep", None),
        ("ipython", "jedi", "jedi 0.9"),
    ]


@pytest.mark.parametrize(
    "pip_names, errors, warnings",
    [
        # pip installed tensorboard and kbrange: their broken requirements are errors, naming both sides
        ({"tensorboard", "kbrange"}, 2, 1),
        # pip installed setuptools (the needed side): tensorboard's broken need is still pip's doing
        ({"setuptools"}, 1, 2),
        # pip touched none of them: the conda side came that way
        (set(), 0, 3),
    ],
)
def test_judge_blames_the_side_that_broke_it(pip_names, errors, warnings):
    found_errors, found_warnings = envcheck.judge(envcheck.parse_pip_check(PIP_CHECK), pip_names)
    assert (len(found_errors), len(found_warnings)) == (errors, warnings)
    for line in found_errors:
        assert "pip's" in line or "(from pip)" in line
    for line in found_warnings:
        assert "conda side" in line


def _conda_package(prefix, name: str, version: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = prefix / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    meta = prefix / "conda-meta"
    meta.mkdir(exist_ok=True)
    record = {"name": name, "version": version, "files": sorted(files)}
    (meta / f"{name}-{version}-0.json").write_text(json.dumps(record))


def _pip_dist(prefix, name: str, version: str, files: list[str]) -> None:
    site = prefix / "lib/python3.11/site-packages"
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "INSTALLER").write_text("pip\n")
    for rel in files:
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text("pip's")
    (info / "RECORD").write_text("".join(f"{rel},sha256=x,1\n" for rel in files))


def test_conda_records_intact_say_nothing(tmp_path):
    _conda_package(tmp_path, "kbdep", "0.4", {"lib/python3.11/site-packages/kbdep/__init__.py": "conda"})
    _pip_dist(tmp_path, "kbrange", "1.5", ["kbrange/__init__.py"])
    assert envcheck.conda_records(tmp_path, {"kbrange"}) == []


def test_conda_files_pip_replaced_or_removed_are_named_with_both_sides(tmp_path):
    sp = "lib/python3.11/site-packages"
    _conda_package(tmp_path, "tensorflow-base", "2.1.0", {f"{sp}/tensorflow/__init__.py": "conda"})
    _pip_dist(tmp_path, "tensorflow_gpu", "2.3.1", ["tensorflow/__init__.py"])
    _conda_package(tmp_path, "numpy", "1.19.2", {f"{sp}/numpy/__init__.py": "conda"})
    (tmp_path / sp / "numpy/__init__.py").unlink()  # pip uninstalled conda's numpy
    found = envcheck.conda_records(tmp_path, {"tensorflow-gpu", "numpy"})
    assert len(found) == 2
    assert any("tensorflow-gpu" in w and "tensorflow-base 2.1.0" in w for w in found)
    assert any("numpy 1.19.2" in w for w in found)
