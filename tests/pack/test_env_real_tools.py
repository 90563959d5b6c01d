"""The sender's environments as real tools make them, packed with no `-e` (and with `-e`):

- a venv (`python -m venv`, `pip install ipykernel` from this machine's pip configuration) whose
  kernel is installed into a private Jupyter folder: the bundle's pip side is exactly the venv's
  distributions, less the packaging tools pack says it left out;
- a uv project (`uv init`, `uv add`, `uv lock`, `uv export`): `-e uv.lock`, the uv.lock beside the
  notebook, and a kernel on the project's .venv all give the lock's linux x86_64 versions and
  wheel hashes, checked against uv's own export; the export packs with no `--hash` line dropped
  and no `\\` in any entry.

No Docker; `--lock never`. The tools are real and so are their failures: uv is a test
dependency (pyproject.toml), and a tool that cannot install here fails the test, saying why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import notebook
from kbundle.flows.pack import PackOptions, pack
from kbundle.pack.pyproject import toml
from kbundle.specs import canonical

UV = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _run(args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _must(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed here: {(proc.stderr or proc.stdout).strip().splitlines()[-3:]}"


def _nb(folder: Path, kernel: str | None) -> Path:
    path = notebook(folder, kernel=kernel)
    doc = json.loads(path.read_text())
    doc["metadata"]["language_info"] = {"name": "python", "version": PY + ".0"}
    path.write_text(json.dumps(doc))
    return path


def _pack(nb: Path, out: Path, env_file: Path | None = None):
    return pack(PackOptions(notebook=nb, env_file=env_file, output=out, lock="never"))


@pytest.fixture
def jupyter(tmp_path, monkeypatch) -> Path:
    """A private Jupyter data folder: kernels installed there are the only ones pack sees besides the stock one."""
    root = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(root / "share" / "jupyter"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(root / "data"))
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    return root


# ---------------------------------------------------------------- a venv with ipykernel


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "env"
    made = _run([sys.executable, "-m", "venv", root])
    assert made.returncode == 0, made.stderr
    _must(_run([root / "bin" / "python", "-m", "pip", "install", "-q", "ipykernel"], timeout=900), "pip install")
    return root


def test_a_venv_kernel_packs_its_distributions_less_the_packaging_tools(venv, jupyter, tmp_path):
    installed = _run([venv / "bin" / "python", "-m", "ipykernel", "install", "--prefix", jupyter, "--name", "kb-venv"])
    assert installed.returncode == 0, installed.stderr
    listed = _run([venv / "bin" / "python", "-m", "pip", "list", "--format", "json"])
    dists = {canonical(d["name"]): d["version"] for d in json.loads(listed.stdout)}
    tools = {n: v for n, v in dists.items() if n in ("pip", "setuptools", "wheel")}
    assert "pip" in tools

    result = _pack(_nb(tmp_path, "kb-venv"), tmp_path / "v.kbundle")
    m = result.manifest
    carried = {canonical(p.split("==")[0]): p.split("==")[1] for p in m.pip}
    assert carried == {n: v for n, v in dists.items() if n not in tools}
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==\S+", p) for p in m.pip), m.pip
    left = next(n for n in result.notes if n.startswith("left out "))
    assert all(f"{v}" in left for v in tools.values()) and "packaging tools" in left
    assert any(n.startswith(f"environment: the kernel 'kb-venv', the venv {venv}") for n in result.notes)
    assert m.dependencies == [f"python={PY}", "pip"]  # ipykernel comes from the venv's own pins
    assert m.source["kind"] == "requirements" and m.python == PY
    assert not m.dropped
    with zipfile.ZipFile(tmp_path / "v.kbundle") as zf:
        original = zf.read("env/original/requirements.txt").decode()
    assert original.startswith("# read by kbundle from the kernel 'kb-venv'") and "ipykernel==" in original


# ---------------------------------------------------------------- a uv project


@pytest.fixture(scope="module")
def uv_project(tmp_path_factory) -> Path:
    assert Path(UV).exists(), "uv is not installed: it is a test dependency (pip install -e '.[test]')"
    root = tmp_path_factory.mktemp("uv") / "demo"
    root.mkdir()
    env = {**os.environ, "UV_CACHE_DIR": str(root.parent / "cache"), "UV_PYTHON_DOWNLOADS": "never"}
    env.pop("VIRTUAL_ENV", None)
    init = _run(
        [UV, "init", "--app", "--no-package", "--no-workspace", "--name", "demo", "--python", sys.executable], root, env
    )
    assert init.returncode == 0, init.stderr
    _must(_run([UV, "add", "click==8.1.7", "markupsafe==2.1.5", "tqdm>=4.66"], root, env), "uv add")
    assert _run([UV, "lock"], root, env).returncode == 0
    export = _run([UV, "export", "--frozen", "--format", "requirements-txt"], root, env)
    assert export.returncode == 0, export.stderr
    (root / "requirements.txt").write_text(export.stdout)
    return root


def _oracle(project: Path) -> dict[str, tuple[str, set[str]]]:
    """{name: (version, its hashes)} of uv's own export, for linux x86_64 and this Python."""
    from packaging.requirements import Requirement

    found = {}
    for line in (project / "requirements.txt").read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        spec, *hashes = re.split(r"\s+--hash=", line)
        req = Requirement(spec)
        env = {"sys_platform": "linux", "platform_machine": "x86_64", "python_version": PY}
        env |= {"python_full_version": f"{PY}.0", "platform_python_implementation": "CPython"}
        if req.marker is None or req.marker.evaluate(env):
            found[canonical(req.name)] = (str(req.specifier).removeprefix("=="), set(hashes))
    return found


def _check_against_the_lock(project: Path, pins: list[str]) -> None:
    oracle = _oracle(project)
    mine = {canonical(p.split("==")[0]): p for p in pins}
    assert {n: p.split()[0].split("==")[1] for n, p in mine.items()} == {n: v for n, (v, _) in oracle.items()}
    for name, pin in mine.items():
        hashes = set(re.findall(r"--hash=(\S+)", pin))
        assert hashes and hashes <= oracle[name][1], pin
    # markupsafe has a wheel per platform: the one for CPython X.Y on manylinux x86_64 is the one carried.
    lock = toml().loads((project / "uv.lock").read_text())
    wheels = next(p for p in lock["package"] if p["name"] == "markupsafe")["wheels"]
    tag = f"cp{PY.replace('.', '')}"
    linux = {w["hash"] for w in wheels if f"-{tag}-{tag}-manylinux" in w["url"] and "x86_64" in w["url"]}
    assert linux and set(re.findall(r"--hash=(\S+)", mine["markupsafe"])) == linux


def test_uv_lock_with_e(uv_project, tmp_path):
    m = _pack(_nb(tmp_path, None), tmp_path / "a.kbundle", uv_project / "uv.lock").manifest
    _check_against_the_lock(uv_project, m.pip)
    assert "colorama" not in " ".join(m.pip) and not m.dropped  # a virtual project installs nothing of its own
    assert m.python == PY


def test_uv_lock_beside_the_notebook(uv_project, jupyter):
    nb = _nb(uv_project, None)
    try:
        result = _pack(nb, uv_project / "b.kbundle")
    finally:
        nb.unlink()
    _check_against_the_lock(uv_project, result.manifest.pip)
    assert result.notes[0].startswith("environment: uv.lock beside the notebook")


def test_a_kernel_on_the_uv_projects_venv(uv_project, jupyter, tmp_path):
    kernel = jupyter / "share" / "jupyter" / "kernels" / "kb-uv"
    kernel.mkdir(parents=True)
    argv = [str(uv_project / ".venv" / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernel / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "uv", "language": "python"}))
    result = _pack(_nb(tmp_path, "kb-uv"), tmp_path / "k.kbundle")
    _check_against_the_lock(uv_project, result.manifest.pip)
    assert result.notes[0].startswith(f"environment: the kernel 'kb-uv', the uv project {uv_project}")


def test_uv_export_packs_without_dropped_hashes_or_backslashes(uv_project, tmp_path):
    m = _pack(_nb(tmp_path, None), tmp_path / "e.kbundle", uv_project / "requirements.txt").manifest
    assert not any("\\" in p for p in m.pip)
    assert not any("--hash" in d.spec or d.spec.endswith("\\") for d in m.dropped), m.dropped
    assert [d.spec.split(" ;")[0] for d in m.dropped] == ["pip: colorama==0.4.6"]  # Windows only, said so
    oracle = _oracle(uv_project)
    assert {canonical(p.split("==")[0]): p.split()[0].split("==")[1] for p in m.pip} == {
        n: v for n, (v, _) in oracle.items()
    }
    assert all(" --hash=sha256:" in p for p in m.pip)
