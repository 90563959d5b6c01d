"""A kernel container lives no longer than the processes that can reach it.

Whatever `kill -9` hits (the client that started the kernel, a server whose client dies
with it, a server that runs the client in-process, the launcher itself), the container is gone within 10 s; and
`kbundle gc` finds a container whose launcher lives on orphaned. Real engine, real
jupyter_client in real subprocesses.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kbundle import contract
from kbundle.kernel import gc as G
from kbundle.kernel.labels import LABEL_LAUNCHER_PPID, orphaned, process_parent, process_start
from kbundle.kernel.launcher import parent_lost
from kbundle.kernel.spec import KernelRequest, install_kernelspec

GONE_WITHIN_S = 10

# ----------------------------------------------------------------- pure decisions


@pytest.mark.parametrize(
    ("recorded", "current", "expected"),
    [
        ("4242", "4242", False),  # the parent it started with
        ("4242", "1", True),  # re-parented to init
        ("4242", "977", True),  # re-parented to a subreaper (systemd --user, tini)
        ("1", "1", False),  # started by PID 1 on purpose: a service, not an orphan
        ("", "1", False),  # kbundle 0.1's labels: cannot tell, keep it
        ("4242", "", False),  # no /proc: cannot tell, keep it
    ],
)
def test_orphaned(recorded, current, expected):
    assert orphaned(recorded, current) is expected


@pytest.mark.parametrize(
    ("started_with", "now", "expected"),
    [(4242, 4242, False), (4242, 1, True), (4242, 977, True), (1, 1, False), (None, 1, False)],
)
def test_parent_lost(started_with, now, expected):
    assert parent_lost(started_with, now) is expected


# ----------------------------------------------------------------- against the engine

# A Jupyter client as nbclient or papermill is one: it starts the kernel, then waits.
# The kernel's launcher is this process's child.
CLIENT = """
import sys, time
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel(cwd=sys.argv[2])
kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
print("LAUNCHER", km.provisioner.process.pid, flush=True)
time.sleep(600)
"""

# A server that runs its client in a process of its own, which ends abruptly (no kernel
# shutdown) when the server goes: its pipe from the server closes.
SERVER_PROCESS = """
import subprocess, sys
client = sys.argv[3].replace("time.sleep(600)", "import os; sys.stdin.read(); os._exit(1)")
subprocess.Popen([sys.executable, "-c", client, *sys.argv[1:3]], stdin=subprocess.PIPE).wait()
"""

# A server runs its clients in-process, here from a worker thread that then ends (a thread
# pool's): Linux's parent-death signal fires when that thread ends, which must not end the
# kernel; only the server's own death may.
SERVER_THREAD = """
import sys, threading, time
from jupyter_client.manager import KernelManager
kms = []
def start():
    km = KernelManager(kernel_name=sys.argv[1])
    km.start_kernel(cwd=sys.argv[2])
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
    kms.append(km)
worker = threading.Thread(target=start)
worker.start(); worker.join()
print("LAUNCHER", kms[0].provisioner.process.pid, flush=True)
time.sleep(600)
"""


@pytest.fixture
def kernel(env_image, monkeypatch):
    """A kbundle kernelspec on the world's image, in a private Jupyter data dir; yields (name, workdir)."""
    data = Path(tempfile.mkdtemp(prefix="kbundle-test-jupyter-"))
    work = Path(tempfile.mkdtemp(prefix="kbundle-test-work-"))  # under /tmp: reachable by any launcher
    for var, value in {
        "JUPYTER_DATA_DIR": data,
        "JUPYTER_PATH": data,
        "JUPYTER_RUNTIME_DIR": data / "runtime",
        "KBUNDLE_CACHE_DIR": data / "cache",
    }.items():
        monkeypatch.setenv(var, str(value))
    install_kernelspec(KernelRequest("kbundle-life", "life", env_image, str(work), [], "sha256:life"))
    yield "kbundle-life", work
    subprocess.run(["rm", "-rf", str(data), str(work)])


def containers_of(client, launcher_pid: int) -> list[dict]:
    return client.api.containers(all=True, filters={"label": f"{contract.LABEL_LAUNCHER_PID}={launcher_pid}"})


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def start_holder(script: str, kernel: tuple[str, Path]) -> tuple[subprocess.Popen, int]:
    """Run `script` (CLIENT, SERVER_*) until its kernel answers; return it and the launcher's pid."""
    name, work = kernel
    proc = subprocess.Popen(
        [sys.executable, "-c", script, name, str(work), CLIENT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:  # the kernel's own output shares this pipe
        if line.startswith("LAUNCHER "):
            return proc, int(line.split()[1])
    proc.kill()
    pytest.fail(f"the kernel did not start: {proc.stderr.read()[-3000:]}")


def cleanup(client, proc: subprocess.Popen, launcher: int) -> None:
    for pid in (proc.pid, launcher):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for c in containers_of(client, launcher):
        try:
            client.api.remove_container(c["Id"], force=True)
        except Exception:
            pass


HOLDERS = {"client": CLIENT, "server-process": SERVER_PROCESS, "server-thread": SERVER_THREAD}


@pytest.mark.docker
@pytest.mark.parametrize("holder", sorted(HOLDERS))
def test_kill_9_of_the_process_that_started_the_kernel_ends_its_container(holder, kernel, docker_client):
    proc, launcher = start_holder(HOLDERS[holder], kernel)
    try:
        running = containers_of(docker_client, launcher)
        assert len(running) == 1 and running[0]["State"] == "running"
        # The parent it started with is recorded, for `kbundle gc`.
        assert running[0]["Labels"][LABEL_LAUNCHER_PPID] == process_parent(launcher) != ""
        if holder == "server-thread":  # the starting thread has ended: the kernel is still the server's
            time.sleep(2)
            assert containers_of(docker_client, launcher)[0]["State"] == "running"
        os.kill(proc.pid, signal.SIGKILL)
        gone = wait_until(lambda: not containers_of(docker_client, launcher), GONE_WITHIN_S)
        assert gone, f"the container outlived its {holder} by more than {GONE_WITHIN_S} s"
        # ... and the launcher went with it.
        assert wait_until(lambda: not process_start(launcher), 5)
    finally:
        cleanup(docker_client, proc, launcher)


@pytest.mark.docker
def test_kill_9_of_the_launcher_ends_its_container(kernel, docker_client):
    proc, launcher = start_holder(CLIENT, kernel)
    try:
        assert containers_of(docker_client, launcher)
        os.kill(launcher, signal.SIGKILL)
        gone = wait_until(lambda: not containers_of(docker_client, launcher), GONE_WITHIN_S)
        assert gone, f"the container outlived its launcher by more than {GONE_WITHIN_S} s"
    finally:
        cleanup(docker_client, proc, launcher)


@pytest.mark.docker
def test_gc_lists_a_container_whose_launcher_lives_on_orphaned(env_image, docker_client, tmp_path):
    """A launcher that outlived its parent (an older kbundle's, or a stuck one) holds a kernel nobody
    can reach: gc removes it. One whose parent is the one it started with stays."""
    stand_in = subprocess.Popen(["sleep", "300"])  # plays the launcher: alive, its parent is this test
    host = socket.gethostname()
    made = []
    try:
        for recorded_parent in (os.getpid(), os.getpid() + 100000):  # its true parent; one it lost
            labels = {
                contract.LABEL_KERNEL: "1",
                contract.LABEL_KERNEL_NAME: "kbundle-orphan-test",
                contract.LABEL_LAUNCHER_PID: str(stand_in.pid),
                contract.LABEL_LAUNCHER_START: process_start(stand_in.pid),
                contract.LABEL_LAUNCHER_HOST: host,
                LABEL_LAUNCHER_PPID: str(recorded_parent),
                "kbundle.test": "1",
            }
            made.append(docker_client.api.create_container(env_image, command=["true"], labels=labels)["Id"])
        plan = G.plan_gc(docker_client, kernels=[], host=host, contexts_dir=tmp_path, pycache_dir=tmp_path)
        listed = {i.ref: i.reason for i in plan.of(G.CONTAINER) if i.ref in made}
        assert list(listed) == [made[1]], listed
        assert "lost the process that started it" in listed[made[1]]
    finally:
        stand_in.kill()
        stand_in.wait()
        for cid in made:
            docker_client.api.remove_container(cid, force=True)
