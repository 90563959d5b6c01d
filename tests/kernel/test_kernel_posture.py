"""The kernel container's posture, seen from inside a kernel started through the real launcher
with jupyter_client: no capabilities, no new privileges (a setuid binary does not help), no
raw sockets, and in the default network the host's loopback services are out of reach."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from kbundle.kernel.spec import KernelRequest, install_kernelspec

pytestmark = pytest.mark.docker

SETUID_IMAGE = "kbundle-test/setuid-id:1"

PROBE = """
import json, os, socket, subprocess
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
try:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)).close()
    packet = "opened"
except OSError as exc:
    packet = type(exc).__name__
try:
    socket.create_connection(("127.0.0.1", PORT), timeout=3).close()
    loopback = "reached"
except OSError as exc:
    loopback = type(exc).__name__
euid = subprocess.run(["/usr/local/bin/suid-id", "-u"], capture_output=True, text=True).stdout.strip()
print(json.dumps({"cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
                  "uid": os.getuid(), "setuid_euid": euid, "packet": packet, "loopback": loopback}))
"""


@pytest.fixture(scope="module")
def setuid_image(env_image, docker_client):
    """The world's env image plus a setuid-root copy of `id`: what it reports as euid tells."""
    dockerfile = (
        f"FROM {env_image}\nUSER root\n"
        "RUN cp /usr/bin/id /usr/local/bin/suid-id && chmod 4755 /usr/local/bin/suid-id\n"
        "USER kbundle\nLABEL kbundle.test=1\n"
    )
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=SETUID_IMAGE, rm=True)
    yield SETUID_IMAGE
    docker_client.images.remove(SETUID_IMAGE, force=True)


@pytest.fixture
def host_service():
    """A TCP service on the host's 127.0.0.1 that records whoever connects."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    seen: list[str] = []

    def accept():
        while True:
            try:
                conn, addr = server.accept()
            except OSError:
                return
            seen.append(addr[0])
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], seen
    server.close()


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


_collected: list[str] = []


def _collect(msg) -> None:
    if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
        _collected.append(msg["content"]["text"])


async def test_the_kernel_has_no_privileges_and_no_way_to_the_host(setuid_image, jupyter, host_service):
    port, seen = host_service
    workdir = Path(tempfile.mkdtemp(prefix="kbundle-test-work-"))
    try:
        install_kernelspec(KernelRequest("kbundle-posture", "posture", setuid_image, str(workdir), [], "h"))
        facts = await _probe_code("kbundle-posture", workdir, PROBE.replace("PORT", str(port)))
    finally:
        subprocess.run(["rm", "-rf", str(workdir)])
    assert facts["cap_eff"] == "0000000000000000", facts
    assert facts["no_new_privs"] == "1", facts
    assert facts["uid"] != 0 and facts["setuid_euid"] == str(facts["uid"]), facts  # setuid-root did nothing
    assert facts["packet"] == "PermissionError", facts  # no sniffing: AF_PACKET needs CAP_NET_RAW
    assert facts["loopback"] in ("ConnectionRefusedError", "TimeoutError"), facts
    assert seen == [], "the kernel reached a service on the host's loopback"


async def test_host_network_is_an_explicit_opt_in(env_image, jupyter, host_service):
    """With `kbundle run --network host` (recorded in the kernelspec) the host's loopback is shared."""
    port, seen = host_service
    workdir = Path(tempfile.mkdtemp(prefix="kbundle-test-work-"))
    try:
        spec = install_kernelspec(
            KernelRequest("kbundle-hostnet", "hostnet", env_image, str(workdir), [], "h", network="host")
        )
        argv = json.loads((spec / "kernel.json").read_text())["argv"]
        assert argv[argv.index("--network") + 1] == "host"
        probe = PROBE.replace('["/usr/local/bin/suid-id", "-u"]', '["id", "-u"]')  # the plain env image
        facts = await _probe_code("kbundle-hostnet", workdir, probe.replace("PORT", str(port)))
    finally:
        subprocess.run(["rm", "-rf", str(workdir)])
    assert facts["loopback"] == "reached" and seen == ["127.0.0.1"], facts
    assert facts["cap_eff"] == "0000000000000000" and facts["no_new_privs"] == "1", facts


async def _probe_code(kernel_name: str, workdir: Path, code: str) -> dict:
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel_name)
    await km.start_kernel(cwd=str(workdir))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        reply = await kc.execute_interactive(code, timeout=60, output_hook=_collect)
        assert reply["content"]["status"] == "ok", reply["content"]
        return json.loads(_collected.pop())
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
