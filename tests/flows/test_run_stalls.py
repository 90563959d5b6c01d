"""`kbundle run` against a conda channel and a pip index that stop sending (tests/stalling.py).

Through the real CLI, with `--progress plain` and stderr read line by line as it comes: while a
server is silent, a line at least every ~5 s names what the run waits for and the host; when
the server comes back the run heals (the downloader continues with Range, pip is run again)
and succeeds; when it never does, the run ends with one `error:` line naming the host. And a
pip child never outlives a SIGKILLed kbundle. The real timeouts (20 s without a byte).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import KBUNDLE, run_kbundle
from stalling import StallingServer, simple_index
from world.pypi import wheel_bytes

pytestmark = pytest.mark.docker

NOTEBOOK = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(
        JUPYTER_DATA_DIR=str(root / "jupyter"),
        KBUNDLE_CACHE_DIR=str(root / "cache"),  # cold: every package is fetched
        PIP_CONFIG_FILE=os.devnull,
        PIP_FIND_LINKS="",
    )
    for key in ("JUPYTER_PATH", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"):
        env.pop(key, None)
    return env


def _pack(world, env, folder: Path, channel: str, pip_lines: list[str], lock: str = "auto") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"kbstall-{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.ipynb").write_text(json.dumps(NOTEBOOK))
    pip = "".join(f"    - {line}\n" for line in pip_lines)
    (folder / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {channel}\ndependencies:\n  - python={world['python']}\n  - ipykernel\n"
        + (f"  - pip\n  - pip:\n{pip}" if pip_lines else "")
    )
    out = folder / f"{name}.kbundle"
    args = ["pack", f"{name}.ipynb", "-e", "environment.yml", "--base-image", world["base_image"], "-o", out]
    proc = run_kbundle(args + (["--lock", lock] if lock != "auto" else []), env, folder, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


class Run:
    """`kbundle run --progress plain` in the background, its stderr lines with their times."""

    def __init__(self, bundle: Path, env: dict, cwd: Path, world, rebuild: bool = False):
        self.start = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        args = [KBUNDLE, "run", str(bundle), "--yes", "--json", "--progress", "plain", "--gpus", "none"]
        # --rebuild: the engine may hold every step image of this environment from other tests,
        # and then nothing is installed, so nothing is downloaded (image/chain.py).
        args += ["--rebuild"] if rebuild else []
        self.proc = subprocess.Popen(
            [*args, "--base-image", world["base_image"]],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.start, line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for _, text in list(self.lines):
                if re.search(pattern, text):
                    return text
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(t for _, t in self.lines))

    def finish(self, timeout: float = 900) -> tuple[int, str]:
        out = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        self.reader.join()
        return self.proc.returncode, out

    def text(self) -> str:
        return "\n".join(f"{t:6.1f} {line}" for t, line in self.lines)

    def matching(self, pattern: str) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.lines if re.search(pattern, line)]


def _assert_steady(lines: list[tuple[float, str]], at_least: int, run: Run) -> None:
    """At least `at_least` such lines; from the first to the last, no ~5 s without a line (with slack)."""
    assert len(lines) >= at_least, run.text()
    first, last = lines[0][0], lines[-1][0]
    window = [t for t, _ in run.lines if first <= t <= last]
    gaps = [b - a for a, b in zip(window, window[1:], strict=False)]
    assert max(gaps, default=0) < 8, (max(gaps), run.text()[-3000:])


@pytest.fixture
def channel_server(world):
    servers = []

    def make(**kwargs) -> StallingServer:
        servers.append(StallingServer(Path(world["channel_path"]), **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_a_stalled_conda_channel_is_named_every_5_s_and_the_run_heals(world, channel_server, tmp_path, docker_client):
    server = channel_server(stall=r"\.(conda|tar\.bz2)$", stall_after=4096, times=1)  # each package stalls once
    env = _env(tmp_path)
    bundle = _pack(world, env, tmp_path / "sender", server.url, [])
    run = Run(bundle, env, tmp_path, world, rebuild=True)
    code, out = run.finish()
    assert code == 0, run.text()
    docker_client.images.remove(json.loads(out)["image"], force=True)
    assert server.stalled, "the channel never stalled"
    waiting = run.matching(rf"^installing conda packages: .*waiting for \S+ from {re.escape(server.host)} \(\d+ s")
    _assert_steady(waiting, 3, run)  # 20 s of silence per connection: a line about every 5 s
    ranges = [r for m, p, r in server.requests if m == "GET" and p == server.stalled[0]]
    assert ranges == [None, "bytes=4096-"], ranges  # the retry continued where the stall began


def test_a_conda_channel_that_never_resumes_fails_in_one_line(world, channel_server, tmp_path):
    server = channel_server(stall=r"\.(conda|tar\.bz2)$", stall_after=4096)
    env = _env(tmp_path)
    bundle = _pack(world, env, tmp_path / "sender", server.url, [])
    run = Run(bundle, env, tmp_path, world, rebuild=True)
    code, _ = run.finish(timeout=300)
    assert code == 1, run.text()
    errors = [line for _, line in run.lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.text(), run.text()
    assert f"{server.host} sent no byte of " in errors[0] and "for 20 s, 3 times" in errors[0], errors[0]
    _assert_steady(run.matching(rf"waiting for \S+ from {re.escape(server.host)}"), 8, run)


@pytest.fixture
def stalled_index(tmp_path):
    """A PEP 503 index whose pages stall (headers and 10 bytes, then silence)."""
    data = wheel_bytes("kbslow", "1.0", {"kbslow/__init__.py": "ORIGIN = 'stalled-index'\n"})
    root = simple_index(tmp_path / "index", {"kbslow": [("kbslow-1.0-py3-none-any.whl", data)]})
    servers = []

    def make(**kwargs) -> StallingServer:
        servers.append(StallingServer(root, stall=r"^/simple/", stall_after=10, **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def _unlocked_run_against(server: StallingServer, world, tmp_path) -> Run:
    """`kbundle run` started on a bundle whose unlocked pip line resolves against `server`'s index."""
    env = _env(tmp_path)
    pip = ["--index-url " + f"{server.url}/simple", "kbslow>=1"]
    bundle = _pack(world, env, tmp_path / "sender", world["channel"], pip, "never")
    return Run(bundle, env, tmp_path, world)


def test_pip_resolving_against_a_stalled_index_says_so_and_heals(world, stalled_index, tmp_path, docker_client):
    server = stalled_index(times=1)  # the page stalls once: pip gives up on it, kbundle runs pip again
    run = _unlocked_run_against(server, world, tmp_path)
    code, out = run.finish()
    assert code == 0, run.text()
    data = json.loads(out)
    docker_client.images.remove(data["image"], force=True)
    assert any(line.startswith("kbslow==1.0 --hash=sha256:") for line in data["pip_resolved"]), data
    still = run.matching(rf"^still resolving with pip \(\d+ s\): .*{re.escape(server.host)}")
    _assert_steady(still, 3, run)  # 20 s without a byte of the page
    files = [p for m, p, _ in server.requests if m == "GET" and p.startswith("/files/")]
    assert files == ["/files/kbslow-1.0-py3-none-any.whl"], files  # pip's download, kept: not fetched twice


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_pip_child_dies_with_a_killed_kbundle(world, stalled_index, tmp_path):
    server = stalled_index()  # never resumes
    run = _unlocked_run_against(server, world, tmp_path)
    try:
        run.wait_for(r"^still resolving with pip", timeout=600)
        pips = [pid for pid in _children(run.proc.pid) if b"pip" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert pips, run.text()
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(timeout=30)
        end = time.monotonic() + 15
        while time.monotonic() < end and any(_alive(pid) for pid in pips):
            time.sleep(0.2)
        assert not [pid for pid in pips if _alive(pid)], "pip outlived kbundle"
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
