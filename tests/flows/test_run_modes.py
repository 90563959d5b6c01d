"""A conda package cannot leave world- or group-writable files behind: not in kbundle's package
cache (which the next bundle links from), not in the environment, not in the image.

The package is a real `.tar.bz2` made with the test world's tooling, its tarball carrying a 0666
file, a 0777 script, a 0666 text file with a prefix placeholder (rattler rewrites that one rather
than linking it) and a 0777 folder; a local channel indexed by rattler serves it over HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import shutil
import stat
import threading
import uuid
from pathlib import Path

import pytest

from helpers import run_kbundle

WRITABLE = stat.S_IWOTH | stat.S_IWGRP | stat.S_ISUID | stat.S_ISGID
FILES = {
    "share/wwfiles/data.txt": 0o666,
    "bin/wwfiles-tool": 0o777,
    "etc/wwfiles/prefix.conf": 0o666,  # carries a prefix placeholder: rewritten, not linked
    "bin/wwfiles-suid": 0o6755,  # setuid and setgid: nothing in an env runs with its owner's rights
}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    """A channel on 127.0.0.1 holding `wwfiles`, whose files are world-writable in the tarball."""
    from rattler.index import index_fs

    from world.channel import PLACEHOLDER, CondaPackage, PackageFile, write_conda_package

    root = tmp_path_factory.mktemp("ww-channel")
    files = [
        PackageFile("share/wwfiles/data.txt", b"data\n", mode=0o666),
        PackageFile("bin/wwfiles-tool", b"#!/bin/sh\necho tool\n", mode=0o777),
        PackageFile("etc/wwfiles/prefix.conf", f"prefix={PLACEHOLDER}\n".encode(), mode=0o666, placeholder=True),
        PackageFile("bin/wwfiles-suid", b"#!/bin/sh\nid\n", mode=0o6755),
        PackageFile("share/wwfiles/open/inside.txt", b"x\n", mode=0o644),
    ]
    write_conda_package(CondaPackage("wwfiles", "1.0", "0", "noarch", [], files, noarch="generic"), root / "noarch")
    _open_folder_in_tarball(root / "noarch" / "wwfiles-1.0-0.tar.bz2")
    (root / "linux-64").mkdir(exist_ok=True)
    result = index_fs(root, write_zst=False, write_shards=False)
    if asyncio.iscoroutine(result):
        asyncio.run(result)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _open_folder_in_tarball(path: Path) -> None:
    """Add an explicit 0777 directory entry (tar carries folder modes too)."""
    import bz2
    import io
    import tarfile

    with tarfile.open(path, "r:bz2") as tar:
        entries = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    folder = tarfile.TarInfo("share/wwfiles/open")
    folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o777, entries[0][0].mtime
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for member, data in entries:
            if member.name == "share/wwfiles/open/inside.txt":
                tar.addfile(folder)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    path.write_bytes(bz2.compress(out.getvalue()))


def writable_by_others(root: Path) -> list[str]:
    """Every file or folder below `root` (links not followed) that group or others may write, or
    that is setuid or setgid."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & WRITABLE:
            found.append(f"{path.relative_to(root)} {stat.filemode(mode)}")
    return found


def _records(channel_url: str):
    from kbundle import solve

    target = ["__unix=0", "__linux=5.4", "__glibc=2.36", "__archspec=1=x86_64"]
    return asyncio.run(solve.solve([channel_url], ["wwfiles"], target, cache_dir=None))


def test_world_writable_modes_leave_neither_the_cache_nor_the_env(channel, tmp_path, monkeypatch):
    from kbundle.image import env as envmod

    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path / "cache"))
    records = _records(channel)
    target = tmp_path / "env"
    for attempt in ("unpacked", "from an open cache"):  # unpacked into the cache, then linked from it
        envmod.install(envmod.ResolvedEnv(tuple(records), locked=True), target, final_prefix=None)
        cached = next(p for p in envmod.package_cache_dir().iterdir() if p.name == "wwfiles-1.0-0")
        assert cached.is_dir()
        assert writable_by_others(cached) == [], attempt
        assert writable_by_others(target) == [], attempt
        for path, mode in FILES.items():  # the files are there, executable bits kept
            assert (target / path).is_file() and (target / path).stat().st_mode & 0o7777 == mode & 0o755, path
        assert str(target) in (target / "etc/wwfiles/prefix.conf").read_text()
        assert (target / "conda-meta").is_dir()
        shutil.rmtree(target)
        # As an older kbundle left its cache: the next install must close it again.
        os.chmod(cached / "share/wwfiles/data.txt", 0o666)
        os.chmod(cached / "bin/wwfiles-tool", 0o777)


@pytest.mark.docker
def test_world_writable_modes_do_not_reach_the_image(world, channel, tmp_path, docker_client):
    from test_run_trust import craft, lock_for

    env = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "JUPYTER_PATH")}
    env.update(JUPYTER_DATA_DIR=str(tmp_path / "jupyter"), KBUNDLE_CACHE_DIR=str(tmp_path / "cache"))
    channels = [world["channel"], channel]
    specs = ["python", "wwfiles"]
    name = f"ww-{uuid.uuid4().hex[:6]}"
    bundle = craft(
        tmp_path / "ww.kbundle", world, name=name, channels=channels, specs=specs, lock=lock_for(channels, specs)
    )
    # --rebuild: installed even when the engine holds this environment's step images (image/chain.py)
    # from other tests, so that the package cache this test reads is filled.
    args = ["run", bundle, "--yes", "--json", "--gpus", "none", "--rebuild"]
    proc = run_kbundle(args, env, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    try:
        cached = next(p for p in (tmp_path / "cache" / "pkgs").iterdir() if p.name == "wwfiles-1.0-0")
        assert writable_by_others(cached) == []
        script = (
            "import os, stat, sys; root = sys.prefix; bad = []\n"
            "for d, dirs, files in os.walk(root):\n"
            "    for n in dirs + files:\n"
            "        m = os.lstat(os.path.join(d, n)).st_mode\n"
            "        if not stat.S_ISLNK(m) and m & 0o022: bad.append(os.path.join(d, n))\n"
            "print(len(bad), bad[:5], oct(os.stat(os.path.join(root, 'bin/wwfiles-tool')).st_mode & 0o777))"
        )
        out = docker_client.containers.run(data["image"], ["python", "-c", script], network_disabled=True, remove=True)
        assert out.decode().split()[0] == "0", out.decode()
        assert out.decode().split()[-1] == "0o755", out.decode()
    finally:
        docker_client.images.remove(data["image"], force=True)
