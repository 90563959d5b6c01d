"""What of the host a kernel container sees (kernel/launch_mounts.py): never a home folder's dotfiles,
Jupyter's own folders, or a git repository's hooks. Table tests of the decision, then kernels started
by jupyter_client through the registered kernelspec, as Jupyter starts them, that try to reach
beyond their notebook's folder."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from kbundle import contract
from kbundle.kernel import launch_mounts as M
from kbundle.kernel.spec import KernelRequest, install_kernelspec

OWNER = 1000  # the notebook folders' owner: a root invoker's kernel runs as them


def _folder(parent: Path, name: str, *entries: str) -> Path:
    path = parent / name
    path.mkdir(parents=True)
    for entry in entries:
        target = path / entry
        if entry.endswith("/"):
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("original\n")
    return path.resolve()


def test_what_may_be_mounted(tmp_path):
    home = _folder(tmp_path, "home/u", ".bashrc", ".local/share/jupyter/kernels/k/kernel.json")
    project = _folder(tmp_path, "home/u/project", "nb.ipynb", ".git/hooks/")
    dotty = _folder(tmp_path, "elsewhere", ".profile", ".ssh/")
    data = _folder(tmp_path, "jdata", "kernels/")
    guard = M.Guard((str(home),), ((str(data), "Jupyter's data folder"),))
    assert M.exposure(str(home), guard) == "it is a home folder"
    assert M.exposure(str(home.parent), guard) == f"it holds the home folder {home}"
    assert M.exposure(str(home / ".local/share/jupyter/kernels/k"), guard) == f"it is inside {home}/.local"
    assert M.exposure(str(project), guard) == ""
    assert M.exposure(str(project / ".git/hooks"), guard) == "it is inside a git repository's .git"
    assert M.exposure(str(dotty), guard).startswith("it holds .profile, .ssh")
    assert M.exposure(str(data / "kernels"), guard) == "it is inside Jupyter's data folder"
    assert M.exposure(str(tmp_path), guard).startswith("it holds")


def test_a_home_folder_is_left_out_and_a_git_folder_mounted_read_only(tmp_path):
    home = _folder(tmp_path, "home/u", ".bashrc")
    work = _folder(tmp_path, "work", ".git/hooks/")
    guard = M.Guard((str(home),))
    mounts = M.plan_mounts(str(work), str(home), guard)
    assert mounts.writable == [str(work)] and mounts.readonly == [str(work / ".git")]
    assert mounts.working_dir == str(work)  # the notebook's folder is not there: start in the bundle's
    assert any(n.startswith(f"not mounted: {home} (it is a home folder)") for n in mounts.notes), mounts.notes
    alone = M.plan_mounts("", str(home), guard)  # nothing mountable at all
    assert alone.writable == [] and alone.working_dir == contract.WORK


def test_the_notebook_jupyter_names_is_the_folder_mounted(tmp_path):
    nb = tmp_path / "a" / "nb.ipynb"
    nb.parent.mkdir()
    nb.write_text("{}")
    assert M.notebook_folder({"JPY_SESSION_NAME": str(nb)}, str(tmp_path)) == str(nb.parent.resolve())
    assert M.notebook_folder({"JPY_SESSION_NAME": "a/nb.ipynb"}, str(tmp_path)) == str(tmp_path.resolve())


# ----------------------------------------------------------------- through the real launcher

ATTACK = """
import json, os
def attempt(path, mode):
    try:
        with open(path, mode) as fh:
            fh.write("echo pwned\\n")
        return "written"
    except OSError as exc:
        return type(exc).__name__
print(json.dumps({
    "bashrc": attempt(HOME + "/.bashrc", "a"),
    "authorized_keys": attempt(HOME + "/.ssh/authorized_keys", "a"),
    "kernel_json": attempt(HOME + "/.local/share/jupyter/kernels/python3/kernel.json", "w"),
    "git_hook": attempt(PROJECT + "/.git/hooks/post-checkout", "w"),
    "git_config": attempt(PROJECT + "/.git/config", "a"),
    "project_file": attempt(PROJECT + "/results.txt", "w"),
    "cwd": os.getcwd(),
}))
"""


@pytest.fixture
def jupyter(monkeypatch, tmp_path_factory):
    data = tempfile.mkdtemp(prefix="kbundle-test-jupyter-")
    monkeypatch.setenv("JUPYTER_DATA_DIR", data)
    monkeypatch.setenv("JUPYTER_PATH", data)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", os.path.join(data, "runtime"))
    cache = tmp_path_factory.mktemp("kbundle-cache")
    cache.chmod(0o777)
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(cache))
    yield Path(data)
    subprocess.run(["rm", "-rf", data])


@pytest.mark.docker
async def test_a_kernel_opened_from_a_home_folder_cannot_touch_its_dotfiles(env_image, jupyter):
    from jupyter_client.manager import AsyncKernelManager

    root = Path(tempfile.mkdtemp(prefix="kbundle-test-mounts-"))
    root.chmod(0o755)
    home = _folder(root, "home", ".bashrc", ".ssh/authorized_keys", ".local/share/jupyter/kernels/python3/kernel.json")
    project = _folder(root, "project", "nb.ipynb", ".git/hooks/pre-commit.sample", ".git/config")
    bundle = _folder(root, "bundle")
    for path in (home, project, bundle):
        subprocess.run(["chown", "-R", f"{OWNER}:{OWNER}", str(path)], check=True)
    code = ATTACK.replace("HOME", repr(str(home))).replace("PROJECT", repr(str(project)))
    try:
        install_kernelspec(KernelRequest("kbundle-mounts", "mounts", env_image, str(bundle), [], "h"))
        from_home, banner = await _run(AsyncKernelManager, "kbundle-mounts", home, code)
        from_project, _ = await _run(AsyncKernelManager, "kbundle-mounts", project, code)
        for rel in (".bashrc", ".ssh/authorized_keys", ".local/share/jupyter/kernels/python3/kernel.json"):
            assert (home / rel).read_text() == "original\n", rel
        for rel in (".git/config",):
            assert (project / rel).read_text() == "original\n", rel
        assert not (project / ".git/hooks/post-checkout").exists()
        assert (project / "results.txt").exists()  # the notebook's own folder stays the kernel's to write
    finally:
        subprocess.run(["rm", "-rf", str(root)])
    assert from_home["bashrc"] == from_home["authorized_keys"] == "FileNotFoundError", from_home
    assert from_home["kernel_json"] == "FileNotFoundError" and from_home["cwd"] == str(bundle), from_home
    assert f"not mounted: {home} (it holds .bashrc" in banner, banner
    assert "169.254.169.254" in banner, banner  # the network's reach is said, cloud metadata included
    assert from_project["git_hook"] == from_project["git_config"] == "OSError", from_project  # read-only
    assert from_project["project_file"] == "written" and from_project["cwd"] == str(project), from_project


async def _run(manager, kernel_name: str, cwd: Path, code: str) -> tuple[dict, str]:
    """Start the kernel in `cwd` as Jupyter would, run `code`; what it printed, and its banner."""
    km = manager(kernel_name=kernel_name)
    await km.start_kernel(cwd=str(cwd))
    kc = km.client()
    kc.start_channels()
    out: list[str] = []
    try:
        await kc.wait_for_ready(timeout=60)
        reply = await kc.kernel_info(reply=True, timeout=30)
        banner = reply["content"]["banner"]
        done = await kc.execute_interactive(
            code,
            timeout=60,
            output_hook=lambda m: out.append(m["content"]["text"]) if m["msg_type"] == "stream" else None,
        )
        assert done["content"]["status"] == "ok", done["content"]
        return json.loads("".join(out)), banner
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
