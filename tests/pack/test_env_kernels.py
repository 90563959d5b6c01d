"""The environment of the kernel a notebook names, for every kind of kernel (made by hand here, in
a private Jupyter folder: fast, no installer runs); tests/pack/test_env_real_tools.py packs ones
that real tools made."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from helpers import notebook
from kbundle.errors import UsageError
from kbundle.pack import pipconfig
from kbundle.pack.discover import find_environment
from kbundle.pack.normalise import normalise, pip_indexes
from kbundle.pack.pipenv import Hints, Reading

LOCKS = Path(__file__).resolve().parents[1] / "data" / "locks"
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    """Install a kernel by name with its argv (and language) into a private Jupyter folder."""
    root = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CONDA_PREFIX", raising=False)

    def install(name: str, argv: list, language: str = "python") -> str:
        folder = root / "kernels" / name
        folder.mkdir(parents=True)
        spec = {"argv": [str(a) for a in argv], "display_name": name, "language": language}
        (folder / "kernel.json").write_text(json.dumps(spec))
        return name

    return install


def _dist(site: Path, name: str, version: str, installer="pip", requires=(), direct_url=None) -> None:
    meta = site / f"{name.replace('-', '_')}-{version}.dist-info"
    meta.mkdir(parents=True)
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        *(f"Requires-Dist: {r}" for r in requires),
    ]
    (meta / "METADATA").write_text("\n".join(lines) + "\n\nThe description.\n")
    (meta / "INSTALLER").write_text(installer + "\n")
    if direct_url is not None:
        (meta / "direct_url.json").write_text(json.dumps(direct_url))


def _venv(root: Path) -> Path:
    """A venv as `python -m venv` lays it out, its python a link to this interpreter."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").symlink_to(sys.executable)
    (root / "pyvenv.cfg").write_text(f"home = {Path(sys.executable).parent}\ninclude-system-site-packages = false\n")
    site = root / "lib" / f"python{PY}" / "site-packages"
    site.mkdir(parents=True)
    return site


def test_a_venv_kernel_reads_its_site_packages_without_importing(kernels, tmp_path, monkeypatch):
    monkeypatch.setattr(pipconfig, "SYSTEM_FILES", ())
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "xdg"))
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(var, raising=False)
    venv = tmp_path / "proj" / ".venv"
    site = _venv(venv)
    _dist(site, "pip", "24.0")
    _dist(site, "wheel", "0.43.0")
    _dist(site, "setuptools", "69.0.0")
    _dist(site, "legacy-thing", "1.0", requires=["setuptools>=40", "colorama; sys_platform == 'win32'"])
    _dist(site, "rich", "13.7.0", installer="uv")
    _dist(site, "mine", "0.1", direct_url={"url": "file:///home/me/mine", "dir_info": {"editable": True}})
    vcs = {"url": "https://github.com/o/tool.git", "vcs_info": {"vcs": "git", "commit_id": "a" * 40}}
    _dist(site, "tool", "0.2", direct_url=vcs)
    (venv / "pip.conf").write_text(
        "[global]\nindex-url = https://me:s3cret@mirror.example/simple\n[install]\nextra-index-url = /srv/wheels\n"
    )
    monkeypatch.setenv("PIP_FIND_LINKS", "https://links.example/wheels/")
    name = kernels("proj", [venv / "bin" / "python", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    raw = find_environment(name, None, None, notebook=notebook(tmp_path, kernel=name))
    env = normalise(raw)
    assert [p.text for p in env.pip] == [
        "legacy-thing==1.0",
        "rich==13.7.0",
        "setuptools==69.0.0",  # legacy-thing requires it: not left out
        f"tool @ git+https://github.com/o/tool.git@{'a' * 40}",
    ]
    assert [d.spec for d in env.dropped] == ["pip: mine @ file:///home/me/mine"]
    notes = "\n".join(raw.notes)
    assert "left out pip 24.0, wheel 0.43.0" in notes and "setuptools 69.0.0:" not in notes
    assert pip_indexes(raw).to_dict() == {
        "index_url": "https://mirror.example/simple",
        "extra_index_urls": [],
        "find_links": ["https://links.example/wheels/"],
    }
    assert "s3cret" not in raw.source_text + notes and "/srv/wheels is a folder or file on this machine" in notes
    assert [d.text for d in env.dependencies] == [f"python={PY}", "pip", "ipykernel"]
    with pytest.raises(UsageError, match="--extra applies to a pyproject.toml or uv.lock"):
        find_environment(name, None, None, notebook=notebook(tmp_path, kernel=name), extras=["x"])


def test_a_pixi_kernel_reads_its_workspaces_lock(kernels, tmp_path):
    workspace = tmp_path / "ws"
    prefix = workspace / ".pixi" / "envs" / "alternative"
    (prefix / "conda-meta").mkdir(parents=True)
    (prefix / "bin").mkdir()
    (prefix / "bin" / "python").write_text("")
    shutil.copy(LOCKS / "pixi-pypi-custom-registry" / "pixi.lock", workspace / "pixi.lock")
    name = kernels("pixi-alt", [prefix / "bin" / "python", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    raw = find_environment(name, None, None, notebook=notebook(tmp_path, kernel=name))
    assert raw.name == "alternative" and raw.platform == "linux-64" and raw.source_path == workspace / "pixi.lock"
    assert (
        raw.notes[0]
        == f"environment: the kernel 'pixi-alt', the pixi environment alternative ({workspace / 'pixi.lock'})"
    )
    assert pip_indexes(raw).index_url == "https://pypi.tuna.tsinghua.edu.cn/simple/"
    assert "flask==3.0.3 --hash=sha256:34e815dfaa43340d1d15a5c3a02b8476004037eb4840b34910c6e21679d288f3" in [
        p.text for p in raw.pip
    ]


def test_conda_run_kernels_find_their_prefix(kernels, tmp_path):
    prefix = tmp_path / "envs" / "ana"
    (prefix / "conda-meta").mkdir(parents=True)
    record = {"name": "python", "version": "3.10.14", "build": "h1", "subdir": "linux-64", "channel": "conda-forge"}
    (prefix / "conda-meta" / "python-3.10.14-h1.json").write_text(json.dumps(record))
    name = kernels(
        "ana", ["conda", "run", "-p", prefix, "python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    )
    raw = find_environment(name, None, None, notebook=notebook(tmp_path, kernel=name))
    assert raw.source_kind == "kernelspec-prefix" and [s.raw for s in raw.conda] == ["python=3.10.14=h1"]


@pytest.mark.parametrize(
    "argv, language, why",
    [
        (
            ["/nowhere/bin/python", "-m", "ipykernel_launcher"],
            "python",
            "runs /nowhere/bin/python, which does not exist",
        ),
        (["R", "--slave", "-e", "IRkernel::main()"], "R", "is a R kernel"),
    ],
)
def test_an_unreadable_kernel_gives_way_to_the_file_beside(kernels, tmp_path, argv, language, why):
    name = kernels("odd", argv, language)
    (tmp_path / "requirements.txt").write_text("six==1.16.0\n")
    raw = find_environment(name, None, "3.11", notebook=notebook(tmp_path, kernel=name))
    assert [p.text for p in raw.pip] == ["six==1.16.0"]
    assert raw.notes[0].startswith("environment: requirements.txt beside the notebook (") and why in raw.notes[0]


def test_uv_index_settings_for_an_environment_uv_filled(tmp_path, monkeypatch):
    monkeypatch.setattr(pipconfig, "SYSTEM_FILES", ())
    monkeypatch.setattr(pipconfig, "UV_SYSTEM_FILES", ())
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "xdg"))
    for var in [v for v in os.environ if v.startswith(("PIP_", "UV_"))]:
        monkeypatch.delenv(var)
    (tmp_path / ".config" / "uv").mkdir(parents=True)
    (tmp_path / ".config" / "uv" / "uv.toml").write_text(
        '[[index]]\nname = "cpu"\nurl = "https://download.pytorch.org/whl/cpu"\n'
    )
    monkeypatch.setenv("UV_DEFAULT_INDEX", "https://mirror.example/simple")
    reading = Reading()
    pipconfig.configured_indexes(None, True, reading)
    assert reading.options == [
        "--index-url https://mirror.example/simple",
        "--extra-index-url https://download.pytorch.org/whl/cpu",
    ]
    plain = Reading()
    pipconfig.configured_indexes(None, False, plain)  # pip's settings only
    assert plain.options == [] and Hints().extras == ()
