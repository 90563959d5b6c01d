"""Real sdists for tests: a .tar.gz laid out as `python -m build --sdist` makes one, with an in-tree
PEP 517 backend written with the standard library alone (the world has no setuptools), served
over HTTP on 127.0.0.1.

A backend is a `preamble` (the project's own build code: it defines `_init_source()`, the bytes
of the package's `__init__.py`) followed by the wheel writer every backend shares."""

from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_WHEEL_WRITER = r"""
import base64, hashlib, os, zipfile

DIST = NAME + "-" + VERSION + ".dist-info"


def get_requires_for_build_wheel(config_settings=None):
    return []


def _hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {NAME + "/__init__.py": _init_source()}
    files[DIST + "/METADATA"] = ("Metadata-Version: 2.1\nName: " + NAME + "\nVersion: " + VERSION + "\n").encode()
    files[DIST + "/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: kbtest\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(p + "," + _hash(d) + "," + str(len(d)) + "\n" for p, d in files.items())
    files[DIST + "/RECORD"] = (record + DIST + "/RECORD,,\n").encode()
    filename = NAME + "-" + VERSION + "-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return filename
"""


def backend(name: str, version: str, preamble: str) -> str:
    """The source of an in-tree build backend for project `name`: `preamble` defines `_init_source()`."""
    return f"NAME, VERSION = {name!r}, {version!r}\n{preamble}\n{_WHEEL_WRITER}"


def pyproject(name: str, version: str, backend_module: str) -> str:
    return (
        f'[build-system]\nrequires = []\nbuild-backend = "{backend_module}"\nbackend-path = ["."]\n\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n'
    )


def sdist_bytes(top: str, files: dict[str, str]) -> bytes:
    """A .tar.gz as `python -m build --sdist` makes one: every file under one top folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@contextmanager
def served_folder(folder: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 over `folder`, quiet; yields its base URL (no trailing slash)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
