"""Networks that stall: a server that sends headers and a few bytes, then nothing (tests/stalling.py).

The downloader (image/download.py) breaks such a connection after READ_TIMEOUT seconds without
a byte, continues the `.part` with Range, and says every few seconds what it waits for and from
which host; past its attempts it fails with one line naming the host. pip, run by kbundle, says
"still resolving" every few seconds while it waits, and gets the same short timeout. A locked
pip section runs no pip, and what pip downloaded to decide is never downloaded again.
Real HTTP servers on 127.0.0.1, real pip; the timeouts are shortened where a test only needs
the shape of the failure (the CLI tests in tests/flows/test_run_stalls.py keep the real ones).
"""

from __future__ import annotations

import hashlib
import io
import threading
import time

import pytest

from kbundle.errors import KbundleError
from kbundle.image import download, wheels
from kbundle.progress import Meter, PlainConsole
from kbundle.specs import PipIndexes
from stalling import StallingServer, simple_index
from world.pypi import wheel_bytes


class TimedLines(io.StringIO):
    """A stream that records when each line was written."""

    def __init__(self):
        super().__init__()
        self.lines: list[tuple[float, str]] = []
        self.start = time.monotonic()

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.lines.append((time.monotonic() - self.start, line))
        return len(text)


def _meter(what: str = "downloading wheels") -> tuple[Meter, TimedLines]:
    stream = TimedLines()
    console = PlainConsole(stream)
    return Meter(what, on_change=console.progress_line), stream


def _big_wheel(name: str = "kbslow", version: str = "1.0") -> tuple[str, bytes]:
    padding = "".join(f"# {hashlib.sha256(str(i).encode()).hexdigest()}\n" for i in range(4000))  # ~270 kB
    return f"{name}-{version}-py3-none-any.whl", wheel_bytes(name, version, {f"{name}/__init__.py": padding})


@pytest.fixture
def short_timeouts(monkeypatch):
    monkeypatch.setattr(download, "READ_TIMEOUT", 4)
    monkeypatch.setattr(download, "TIMEOUT", (4, 4))
    monkeypatch.setattr(download, "BACKOFF", (0.2, 0.2))


@pytest.fixture
def index(tmp_path):
    filename, data = _big_wheel()
    root = simple_index(tmp_path / "index", {"kbslow": [(filename, data)]})
    return root, filename, data


def _item(server, filename, data, tmp_path):
    return download.Wanted(
        f"{server.url}/files/{filename}", tmp_path / "cache" / filename, hashlib.sha256(data).hexdigest(), None
    )


def test_a_stalled_wheel_is_named_every_few_seconds_and_resumed_with_range(index, tmp_path):
    root, filename, data = index
    server = StallingServer(root, times=1)  # the first connection stalls for good; the next is served
    try:
        meter, stream = _meter()
        started = time.monotonic()
        path = download.fetch_all([_item(server, filename, data, tmp_path)], meter, plan=False)[0]
        took = time.monotonic() - started
    finally:
        server.close()
    assert path.read_bytes() == data
    assert download.READ_TIMEOUT <= took < download.READ_TIMEOUT + 15, took
    gets = [r for m, p, r in server.requests if m == "GET"]
    assert gets == [None, f"bytes={server.stall_after}-"], gets  # resumed where it stopped
    waiting = [(t, line) for t, line in stream.lines if f"waiting for {filename} from {server.host}" in line]
    # 20 s of silence: a line about every 5 s (at least 3, with slack), each with the seconds waited
    assert len(waiting) >= 3, stream.lines
    assert all(b - a < 7.5 for (a, _), (b, _) in zip(waiting, waiting[1:], strict=False)), waiting
    assert "s without a byte" in waiting[-1][1]


def test_a_wheel_that_never_comes_fails_with_one_line_naming_the_host(index, tmp_path, short_timeouts):
    root, filename, data = index
    server = StallingServer(root)
    try:
        with pytest.raises(KbundleError) as info:
            download.fetch_all([_item(server, filename, data, tmp_path)], _meter()[0], plan=False)
    finally:
        server.close()
    message = str(info.value)
    assert "\n" not in message
    assert f"{server.host} sent no byte of {filename} for 4 s, {download.ATTEMPTS} times" in message, message
    assert len([r for r in server.requests if r[0] == "GET"]) == download.ATTEMPTS
    part = tmp_path / "cache" / f"{filename}.part"
    # each attempt continued where the last stalled; what came is kept for the next run
    assert part.read_bytes() == data[: download.ATTEMPTS * server.stall_after]


def test_pip_resolving_against_a_stalled_index_says_so_then_fails_in_one_line(index, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "READ_TIMEOUT", 12)  # pip gets kbundle's timeout: --timeout 12
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path / "kbcache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    root, _filename, _data = index
    server = StallingServer(root, stall=r"^/simple/", stall_after=10)
    meter, stream = _meter()
    try:
        started = time.monotonic()
        with pytest.raises(KbundleError) as info:
            wheels.fetch(["kbslow>=1"], "3.11", PipIndexes(f"{server.url}/simple"), "2.36", None, None, meter, False)
        took = time.monotonic() - started
    finally:
        server.close()
    still = [(t, line) for t, line in stream.lines if line.startswith("still resolving with pip (")]
    assert len(still) >= max(2, int(took / 5) - 2), stream.lines
    assert all(server.host in line for _, line in still), still
    assert all(b - a < 7.5 for (a, _), (b, _) in zip(still, still[1:], strict=False)), still
    message = str(info.value)
    assert "\n" not in message and server.host in message and "sent nothing of" in message and "for 12 s" in message, (
        message
    )


def test_a_locked_section_runs_no_pip_and_a_resolved_one_downloads_each_wheel_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path / "kbcache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    dep = ("kbfast-0.3-py3-none-any.whl", wheel_bytes("kbfast", "0.3", {"kbfast/__init__.py": "X = 1\n"}))
    top = ("kbtop-1.0-py3-none-any.whl", wheel_bytes("kbtop", "1.0", {"kbtop/__init__.py": ""}, ["kbfast"]))
    root = simple_index(tmp_path / "index", {"kbfast": [dep], "kbtop": [top]})
    server = StallingServer(root, stall=r"^$")  # never stalls: it only counts requests
    runs = []
    real = wheels._watch_pip
    monkeypatch.setattr(wheels, "_watch_pip", lambda command, *a: runs.append(command) or real(command, *a))
    indexes = PipIndexes(f"{server.url}/simple")
    try:
        lines = [f"kbtop==1.0 --hash=sha256:{hashlib.sha256(top[1]).hexdigest()}"]
        lines += [f"kbfast==0.3 --hash=sha256:{hashlib.sha256(dep[1]).hexdigest()}"]
        locked = wheels.fetch(lines, "3.11", indexes, "2.36", None, None, None, True)
        assert runs == [] and locked.downloaded == 2  # no resolver, no pip at all
        files = [p for m, p, _ in server.requests if m == "GET" and p.startswith("/files/")]
        assert sorted(files) == ["/files/kbfast-0.3-py3-none-any.whl", "/files/kbtop-1.0-py3-none-any.whl"]

        monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path / "kbcache2"))  # a cold cache
        server.requests.clear()
        resolved = wheels.fetch(["kbtop>=1"], "3.11", indexes, "2.36", None, None, None, False)
    finally:
        server.close()
    assert len(runs) == 1 and sorted(p.name for p in resolved.files) == sorted([dep[0], top[0]])
    files = [p for m, p, _ in server.requests if m == "GET" and p.startswith("/files/")]
    # pip had to download both whole (no PEP 658 metadata) to decide: kbundle kept them
    assert sorted(files) == ["/files/kbfast-0.3-py3-none-any.whl", "/files/kbtop-1.0-py3-none-any.whl"], files


def test_a_stalled_index_page_is_named_while_a_locked_pin_is_looked_up(index, tmp_path, monkeypatch, short_timeouts):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    root, filename, data = index
    server = StallingServer(root, stall=r"^/simple/", stall_after=10, times=1)
    meter, stream = _meter()
    try:
        page = download.fetch_text(
            download.session(), f"{server.url}/simple/kbslow/", "the list of kbslow's files", None, meter
        )
    finally:
        server.close()
    assert filename in page and hashlib.sha256(data).hexdigest() in page


def test_the_heartbeat_stops_with_its_block():
    ticks = []
    with __import__("kbundle.progress", fromlist=["Heartbeat"]).Heartbeat(lambda: ticks.append(1), every=0.05):
        time.sleep(0.3)
    seen = len(ticks)
    time.sleep(0.2)
    assert seen >= 3 and len(ticks) == seen
    assert not [t for t in threading.enumerate() if t.name == "kbundle-heartbeat"]
