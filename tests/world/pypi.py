"""Two PEP 503 simple indexes and a git repository, served over HTTP on 127.0.0.1.

* ``pypi/simple/``: tiny wheels built here with zipfile: ``kbrange`` 1.0, 1.5 and 2.0 (1.5
  needs ``kbdep``), ``kbdep`` 0.3, ``kbdemo`` 1.0, and ``kbb-01`` … ``kbb-15`` (each 1.0 and
  1.1, needing ``kbdep``) for the pip benchmark, and ``kbpy`` 1.0 and 2.0, whose wheels' own
  metadata require Python >=3.6 and >=3.10 while the pages say nothing of it (as many mirrors).
* ``extra/simple/``: ``kbdemo`` 1.0+cu118, a local version as download.pytorch.org serves them.
* ``git/kbgit.git``: a bare repository (dumb HTTP: ``git update-server-info``) holding the
  pure-python package ``kbgit`` 0.1 (tag ``v0.1``), built by an in-tree PEP 517 backend that
  needs nothing but the standard library.

Every module these packages install sets ``ORIGIN`` (``index``, ``extra-index``, ``git``), so
a test can tell where an imported package came from. The server is a plain
``python -m http.server``, started in its own session and reused like the channel's.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

from .common import log

RECIPE_VERSION = "2"
DEFAULT_PORT = 18766
STATE_FILE = "pypi-server.json"
STAMP = "pypi.stamp"
BENCH_PACKAGES = [f"kbb-{i:02d}" for i in range(1, 16)]
GIT_TAG = "v0.1"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_bytes(
    name: str, version: str, modules: dict[str, str], requires: list[str] = (), requires_python: str | None = None
) -> bytes:
    """A valid py3-none-any wheel of `modules` (path -> source), written deterministically."""
    import io

    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += f"Requires-Python: {requires_python}\n" if requires_python else ""
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = dict(modules)
    files[f"{dist}/METADATA"] = meta
    files[f"{dist}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: kbundle-world\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{path},{_record_hash(text.encode())},{len(text.encode())}\n" for path, text in files.items())
    files[f"{dist}/RECORD"] = record + f"{dist}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for path, text in files.items():
            zf.writestr(zipfile.ZipInfo(path, ZIP_DATE), text)
    return buf.getvalue()


def _module(name: str, version: str, origin: str, body: str = "") -> dict[str, str]:
    package = name.replace("-", "_")
    return {f"{package}/__init__.py": f"__version__ = {version!r}\nORIGIN = {origin!r}\n{body}"}


def _write_index(root: Path, wheels: dict[str, list[tuple[str, bytes]]]) -> None:
    """`root/simple/<project>/index.html` (PEP 503, with sha256 fragments) over `root/files/`."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    projects = sorted(wheels)
    (root / "simple").mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="{p}/">{p}</a>\n' for p in projects)
    (root / "simple" / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    for project in projects:
        anchors = []
        for filename, data in wheels[project]:
            (root / "files" / filename).write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            anchors.append(f'<a href="../../files/{filename}#sha256={digest}">{filename}</a>')
        page = root / "simple" / project / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text("<!DOCTYPE html>\n<html><body>\n" + "\n".join(anchors) + "\n</body></html>\n")


def _add(
    wheels: dict, name: str, version: str, origin: str, requires: list[str] = (), requires_python: str | None = None
) -> None:
    filename = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    data = wheel_bytes(name, version, _module(name, version, origin), requires, requires_python)
    wheels.setdefault(name, []).append((filename, data))


BACKEND = '''"""An in-tree PEP 517 backend: builds kbgit's wheel with the standard library alone."""
import base64, hashlib, os, zipfile

NAME, VERSION = "kbgit", "0.1"
DIST = f"{NAME}-{VERSION}.dist-info"


def get_requires_for_build_wheel(config_settings=None):
    return []


def _hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {}
    for folder, _dirs, names in os.walk(NAME):
        for n in names:
            if n.endswith(".py"):
                path = os.path.join(folder, n)
                with open(path, "rb") as fh:
                    files[path.replace(os.sep, "/")] = fh.read()
    files[DIST + "/METADATA"] = f"Metadata-Version: 2.1\\nName: {NAME}\\nVersion: {VERSION}\\n".encode()
    files[DIST + "/WHEEL"] = b"Wheel-Version: 1.0\\nGenerator: kbgit\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    record = "".join(f"{p},{_hash(d)},{len(d)}\\n" for p, d in files.items()) + DIST + "/RECORD,,\\n"
    files[DIST + "/RECORD"] = record.encode()
    filename = f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w", zipfile.ZIP_STORED) as zf:
        for path, data in files.items():
            zf.writestr(zipfile.ZipInfo(path, (1980, 1, 1, 0, 0, 0)), data)
    return filename
'''

PYPROJECT = """[build-system]
requires = []
build-backend = "kbgit_backend"
backend-path = ["."]

[project]
name = "kbgit"
version = "0.1"
"""


def _git(*args: str, cwd: Path) -> None:
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="kbundle world",
        GIT_AUTHOR_EMAIL="world@kbundle.invalid",
        GIT_COMMITTER_NAME="kbundle world",
        GIT_COMMITTER_EMAIL="world@kbundle.invalid",
        GIT_AUTHOR_DATE="2024-01-01T00:00:00Z",
        GIT_COMMITTER_DATE="2024-01-01T00:00:00Z",
    )
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def build_git_repo(root: Path) -> Path:
    """A bare repository of kbgit, with tag v0.1, ready for dumb HTTP."""
    if not shutil.which("git"):
        raise SystemExit("error: git is not installed (apt-get install git)")
    work = root / "kbgit-src"
    shutil.rmtree(work, ignore_errors=True)
    (work / "kbgit").mkdir(parents=True)
    (work / "kbgit" / "__init__.py").write_text('__version__ = "0.1"\nORIGIN = "git"\n')
    (work / "kbgit_backend.py").write_text(BACKEND)
    (work / "pyproject.toml").write_text(PYPROJECT)
    _git("init", "--quiet", "--initial-branch=main", ".", cwd=work)
    _git("add", "-A", cwd=work)
    _git("commit", "--quiet", "-m", "kbgit 0.1", cwd=work)
    _git("tag", GIT_TAG, cwd=work)
    bare = root / "git" / "kbgit.git"
    shutil.rmtree(bare, ignore_errors=True)
    bare.parent.mkdir(parents=True, exist_ok=True)
    _git("clone", "--quiet", "--bare", str(work), str(bare), cwd=root)
    _git("update-server-info", cwd=bare)
    shutil.rmtree(work)
    return bare


def build_pypi(root: Path) -> Path:
    """The indexes and the git repository under `root` (rebuilt when the recipe changed)."""
    stamp = root / STAMP
    if stamp.exists() and stamp.read_text() == RECIPE_VERSION:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log("building the PEP 503 indexes and the git repository")
    main: dict = {}
    for version in ("1.0", "1.5", "2.0"):
        _add(main, "kbrange", version, "index", ["kbdep>=0.3"] if version == "1.5" else [])
    _add(main, "kbdep", "0.3", "index")
    _add(main, "kbdemo", "1.0", "index")
    # Like a mirror whose pages carry no data-requires-python: only the wheel's own metadata says
    # that kbpy 2.0 needs Python 3.10 (issue 17: a lock the recipient cannot install).
    _add(main, "kbpy", "1.0", "index", requires_python=">=3.6")
    _add(main, "kbpy", "2.0", "index", requires_python=">=3.10")
    for name in BENCH_PACKAGES:
        for version in ("1.0", "1.1"):
            _add(main, name, version, "index", ["kbdep>=0.3"])
    _write_index(root / "pypi", main)
    extra: dict = {}
    _add(extra, "kbdemo", "1.0+cu118", "extra-index")
    _write_index(root / "extra", extra)
    build_git_repo(root)
    stamp.write_text(RECIPE_VERSION)
    return root


def ensure_pypi(world: Path) -> dict:
    """The indexes' and the repository's URLs, from the running server or a new one."""
    from .server import serve_folder

    root = build_pypi(world / "pypi-root")
    url = serve_folder(root, world / STATE_FILE, "pypi/simple/", "KBUNDLE_WORLD_PYPI_PORT", DEFAULT_PORT)
    return {
        "pypi_index": f"{url}pypi/simple",
        "pypi_extra_index": f"{url}extra/simple",
        "git_repo": f"{url}git/kbgit.git",
        "git_tag": GIT_TAG,
    }


def stop_pypi(world: Path) -> None:
    from .server import stop_folder_server

    stop_folder_server(world / STATE_FILE)
