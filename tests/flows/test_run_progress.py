"""Progress on a non-terminal: `kbundle run` with stderr piped prints plain lines, never silence.

A cold run (fresh kbundle cache, so every package is downloaded) is read line by line as it
happens; the lines are checked for what they say and how often they come.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import uuid

import pytest
from test_run_docker import KBUNDLE, kbundle, pack

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def cold_run(world, tmp_path_factory, docker_client):
    root = tmp_path_factory.mktemp("progress")
    env = dict(os.environ, JUPYTER_DATA_DIR=str(root / "jupyter"), KBUNDLE_CACHE_DIR=str(root / "cache"))
    env.pop("JUPYTER_PATH", None)
    bundle = pack(world, env, root / "sender", f"kbp-{uuid.uuid4().hex[:8]}")
    start = time.monotonic()
    proc = subprocess.Popen(
        # --rebuild: cold even when the engine holds this environment's step images from other tests.
        [KBUNDLE, "run", str(bundle), "--yes", "--json", "--rebuild"],
        env=env,
        cwd=root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[tuple[float, str]] = []

    def read():
        for line in proc.stderr:
            lines.append((time.monotonic() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read)
    reader.start()
    out = proc.stdout.read()
    proc.wait(timeout=900)
    reader.join()
    assert proc.returncode == 0, "\n".join(t for _, t in lines)
    data = json.loads(out)
    yield data, lines, bundle, env, root
    docker_client.images.remove(data["image"], force=True)


def test_plain_lines_say_what_happens(cold_run):
    data, lines, _, _, _ = cold_run
    text = [t for _, t in lines]
    assert not [t for t in text if "\x1b" in t or "\r" in t], "terminal codes on a non-terminal"
    assert any(re.fullmatch(r"installing \d+ conda packages for /opt/kbundle/env", t) for t in text), text
    done = [t for t in text if re.match(r"installed \d+ conda packages", t)]
    assert len(done) == 1, text
    found = re.fullmatch(r"installed (\d+) conda packages \(([\d.]+) ((?:[KMG]iB|B)) downloaded\) in [\d.]+ s", done[0])
    assert found and int(found.group(1)) == data["packages"] and float(found.group(2)) > 0, done[0]
    steps = [t for t in text if re.match(rf"building {re.escape(data['image'])}: Step \d+/\d+ : ", t)]
    assert len(steps) >= 3, text
    assert steps[0].split(": Step ")[1].startswith("1/")


def test_the_first_line_comes_at_once(cold_run):
    _, lines, _, _, _ = cold_run
    assert lines and lines[0][0] < 10, lines[:3]


def test_updates_come_at_most_every_5_seconds(cold_run):
    _, lines, _, _, _ = cold_run
    updates = [(t, text) for t, text in lines if re.match(r"installing conda packages: \d+/\d+", text)]
    for (t0, a), (t1, b) in zip(updates, updates[1:], strict=False):
        assert t1 - t0 >= 4.5, (a, b)
    for _, text in updates:  # downloads show bytes; rate and ETA while bytes remain
        assert re.search(r"\d+/\d+, [\d.]+ (?:[KMG]iB|B) of [\d.]+ (?:[KMG]iB|B)", text) or text.count(",") == 0, text


def test_progress_none_prints_only_warnings(cold_run):
    data, _, bundle, env, root = cold_run
    proc = kbundle(["run", bundle, "--yes", "--json", "--progress", "none"], env, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["image"] == data["image"]
    assert all(line.startswith("warning: ") for line in proc.stderr.splitlines()), proc.stderr


def test_an_unknown_progress_mode_is_a_usage_error(cold_run):
    _, _, bundle, env, root = cold_run
    proc = kbundle(["run", bundle, "--progress", "fancy"], env, cwd=root)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --progress"), proc.stderr
