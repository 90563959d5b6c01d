"""The container kernel against the real engine, driven by jupyter_client like Jupyter drives it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kbundle.kernel.launcher import container_name, folder_owner, kernel_user
from kbundle.kernel.spec import KernelRequest, install_kernelspec

pytestmark = pytest.mark.docker

LAUNCHER = str(Path(sys.executable).parent / "kbundle-kernel")


@pytest.fixture(autouse=True)
def private_kbundle_cache(tmp_path_factory, monkeypatch):
    """Kernels started here (and their launchers) keep bytecode in a throwaway cache, not the user's."""
    cache = tmp_path_factory.mktemp("kbundle-cache")
    cache.chmod(0o777)  # a launcher running as another uid may use it too
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(cache))


# ----------------------------------------------------------------- helpers


def container_exists(client, name: str) -> bool:
    import docker

    try:
        client.api.inspect_container(name)
        return True
    except docker.errors.NotFound:
        return False


def wait_until(predicate, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


async def execute(kc, code: str, timeout: float = 60, on_stdout=None) -> dict:
    """Run `code`; return its stdout and error name. `on_stdout` runs once, when the first stdout arrives."""
    msg_id = kc.execute(code)
    out, error = [], None
    deadline = time.monotonic() + timeout
    while True:
        msg = await kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content["name"] == "stdout":
            if on_stdout and not out:
                await on_stdout()
            out.append(content["text"])
        elif kind == "error":
            error = content["ename"]
        elif kind == "status" and content["execution_state"] == "idle":
            break
    return {"stdout": "".join(out), "error": error}


@pytest.fixture
def jupyter_dirs(monkeypatch):
    """A private Jupyter data dir, so the test's kernelspec is seen by nobody else."""
    data = tempfile.mkdtemp(prefix="kbundle-test-jupyter-")
    monkeypatch.setenv("JUPYTER_DATA_DIR", data)
    monkeypatch.setenv("JUPYTER_PATH", data)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", os.path.join(data, "runtime"))
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", os.path.join(data, "cache"))  # the launcher's bytecode cache
    yield Path(data)
    subprocess.run(["rm", "-rf", data])


@pytest.fixture
def workdir():
    # Under /tmp directly (1777), so that a non-root launcher can reach it too.
    path = Path(tempfile.mkdtemp(prefix="kbundle-test-work-"))
    yield path
    subprocess.run(["rm", "-rf", str(path)])


@pytest.fixture
def kernel_name(env_image, jupyter_dirs, workdir) -> str:
    install_kernelspec(KernelRequest("kbundle-test", "test", env_image, str(workdir), [], "sha256:test"))
    return "kbundle-test"


async def start(kernel_name: str, workdir: Path, **kw):
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel_name)
    await km.start_kernel(cwd=str(workdir), **kw)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    return km, kc


def listening_addresses(ports: list[int]) -> dict[int, str]:
    """Local address of each listening TCP port, from /proc/net/tcp{,6} (host network = this namespace)."""
    found: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                cols = line.split()
                addr, port = cols[1].split(":")
                if cols[3] != "0A" or int(port, 16) not in ports:  # 0A = LISTEN
                    continue
                if len(addr) == 8:
                    ip = ".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
                else:
                    ip = "v6:" + addr
                found[int(port, 16)] = ip
    return found


# ----------------------------------------------------------------- tests


async def test_execute_in_container_as_jupyter_does(kernel_name, workdir, docker_client):
    km, kc = await start(kernel_name, workdir)
    name = container_name(km.connection_file)
    try:
        result = await execute(kc, "import os, sys; print(sys.prefix, os.getcwd(), 'JPY_PARENT_PID' in os.environ)")
        assert result["error"] is None
        assert result["stdout"].split() == ["/opt/kbundle/env", str(workdir.resolve()), "False"]
        # The shim's copy of the connection info inside the container is readable by the kernel's user only.
        modes = await execute(
            kc,
            "import glob, os; print(sorted((oct(os.stat(f).st_mode & 0o777), os.stat(f).st_uid == os.getuid())"
            " for f in glob.glob('/tmp/kbundle-kernel-*.json')))",
        )
        assert modes["stdout"] == "[('0o600', True)]\n"

        info = docker_client.api.inspect_container(name)
        # The key reaches the kernel through stdin only: not in argv, env, labels or mounts.
        key = json.loads(Path(km.connection_file).read_text())["key"]
        assert key and key not in json.dumps(info)
        assert info["HostConfig"]["Init"] is True and info["HostConfig"]["AutoRemove"] is True
        assert info["Config"]["Labels"]["org.kbundle.kernel"] == "1"
        # Never root: the invoker, or (for a root invoker) the notebook folder's owner or the image's user.
        expected = kernel_user(os.getuid(), os.getgid(), os.getgroups(), folder_owner(str(workdir)))[0]
        assert info["Config"]["User"] == expected != "0:0"
        assert info["HostConfig"]["CapDrop"] == ["ALL"] and info["HostConfig"]["SecurityOpt"] == ["no-new-privileges"]
        # The default network is a bridge: the five ports reach the host on its loopback only, held
        # by the launcher itself on this local engine (kernel/forward.py), not published by the engine.
        assert info["HostConfig"]["NetworkMode"] == "bridge"
        ports = {km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port}
        assert not info["HostConfig"]["PortBindings"]
        assert listening(ports) == {(port, "127.0.0.1") for port in ports}
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    assert wait_until(lambda: not container_exists(docker_client, name), 10), "container left after shutdown_kernel()"


async def test_interrupt_restart_and_kill(kernel_name, workdir, docker_client):
    km, kc = await start(kernel_name, workdir)
    name = container_name(km.connection_file)
    try:
        # Interrupt only once the code is running, as a user's Ctrl-C would: when the cell has printed.
        # Not at execute_input: ipykernel itself swallows a SIGINT that lands while IPython is still
        # preparing the cell (a race of ipykernel's, native kernels included).
        async def interrupt():
            await km.interrupt_kernel()

        started = time.monotonic()
        result = await execute(kc, "import time; print('running', flush=True); time.sleep(60)", on_stdout=interrupt)
        assert result["error"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 20
        assert (await execute(kc, "print(6 * 7)"))["stdout"] == "42\n"  # still alive, state kept

        await execute(kc, "x = 1")
        await km.restart_kernel()
        # A fresh client: one reused across a restart sometimes never sees the next reply, with a
        # native ipykernel too (about 1 restart in 10 on a loaded machine; upstream, not the container).
        kc.stop_channels()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        result = await execute(kc, "print('x' in globals(), 2 + 2)")
        assert result["stdout"] == "False 4\n"  # a fresh kernel, reached on the same connection
        assert container_exists(docker_client, name)  # the same deterministic name after the restart
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert wait_until(lambda: not container_exists(docker_client, name), 10), "container left after shutdown(now=True)"


async def test_sigkilled_launcher_takes_its_container_along(kernel_name, workdir, docker_client):
    km, kc = await start(kernel_name, workdir)
    name = container_name(km.connection_file)
    try:
        assert (await execute(kc, "print('up')"))["stdout"] == "up\n"
        os.kill(km.provisioner.process.pid, signal.SIGKILL)  # the launcher alone, not its group
        gone = wait_until(lambda: not container_exists(docker_client, name), 10)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert gone, "the container outlived its SIGKILLed launcher by more than 10 s"


def listening(ports: set[int]) -> set[tuple[int, str]]:
    """(port, address) of the host's IPv4 TCP listeners on `ports`, from /proc/net/tcp."""
    found = set()
    with open("/proc/net/tcp", encoding="ascii") as fh:
        for line in fh.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) in ports:  # 0A: LISTEN
                found.add((int(port, 16), socket.inet_ntoa(bytes.fromhex(address)[::-1])))
    return found


async def test_bridge_network_and_a_notebook_outside_the_workdir(kernel_name, workdir, docker_client, tmp_path):
    """Bridge ports on loopback only; a notebook opened from another folder runs in that folder."""
    other = Path(tempfile.mkdtemp(prefix="kbundle-test-other-"))
    other.chmod(0o755)  # a root invoker's kernel runs as another user (never root): it must read here
    (other / "data.txt").write_text("from the notebook's folder")
    env = dict(os.environ, KBUNDLE_KERNEL_NETWORK="bridge")
    km, kc = await start(kernel_name, other, env=env)
    name = container_name(km.connection_file)
    try:
        result = await execute(kc, "import os; print(os.getcwd()); print(open('data.txt').read())")
        assert result["stdout"] == f"{other.resolve()}\nfrom the notebook's folder\n"
        info = docker_client.api.inspect_container(name)
        assert info["HostConfig"]["NetworkMode"] == "bridge"
        ports = {km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port}
        assert listening(ports) == {(port, "127.0.0.1") for port in ports}
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
        subprocess.run(["rm", "-rf", str(other)])
    assert wait_until(lambda: not container_exists(docker_client, name), 10)


def wait_for_stdout(kc, msg_id: str, text: str, timeout: float = 30) -> None:
    """Until the code of request `msg_id` prints `text`: it has then run everything before that print."""
    from queue import Empty

    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.5)
        except Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(msg["msg_type"])
        if msg["msg_type"] == "stream" and text in msg["content"].get("text", ""):
            return
    raise AssertionError(f"the kernel did not print {text!r} within {timeout:.0f} s (iopub for the request: {seen})")


def wait_ready(kc, timeout: float = 60) -> None:
    """kernel_info until it answers (a client without a manager cannot ask whether the kernel lives)."""
    from queue import Empty

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg_id = kc.kernel_info()
        try:
            while True:
                reply = kc.get_shell_msg(timeout=0.5)
                if reply["parent_header"].get("msg_id") == msg_id:
                    return
        except Empty:
            continue
    raise TimeoutError("the kernel did not answer kernel_info")


async def test_bytecode_cache_only_for_environments_without_pyc(env_image, jupyter_dirs, workdir, docker_client):
    """The world's env has no .pyc (like a rattler install): the kernel keeps bytecode in kbundle's cache.
    An image whose ipykernel is byte-compiled keeps using its own __pycache__."""
    import io

    compiled = "kbundle-test/ipykernel-pyc:1"
    site = "/opt/kbundle/env/lib/python*/site-packages/ipykernel"
    # The world's image runs as the unprivileged `kbundle`, who may not write into the env.
    dockerfile = (
        f"FROM {env_image}\nUSER root\nRUN python -m compileall -q {site}\nUSER kbundle\nLABEL kbundle.test=1\n"
    )
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=compiled, rm=True)
    install_kernelspec(KernelRequest("kbundle-plain", "plain", env_image, str(workdir), [], "h"))
    install_kernelspec(KernelRequest("kbundle-compiled", "compiled", compiled, str(workdir), [], "h"))
    probe = "import sys, ipykernel; print(sys.pycache_prefix, ipykernel.__cached__)"
    try:
        seen = {}
        for name in ("kbundle-plain", "kbundle-compiled"):
            km, kc = await start(name, workdir)
            try:
                seen[name] = (await execute(kc, probe))["stdout"].split()
            finally:
                kc.stop_channels()
                await km.shutdown_kernel()
    finally:
        docker_client.images.remove(compiled, force=True)
    assert seen["kbundle-plain"][0] == "/tmp/kbundle-pycache"
    assert seen["kbundle-plain"][1].startswith("/tmp/kbundle-pycache/opt/kbundle/env/")
    assert seen["kbundle-compiled"][0] == "None" and "/ipykernel/__pycache__/" in seen["kbundle-compiled"][1]
    caches = list((jupyter_dirs / "cache" / "pycache").iterdir())
    plain_cache = next(c for c in caches if (c / "image.txt").read_text() == env_image + "\n")
    pyc = list(plain_cache.rglob("ipykernel/__init__*.pyc"))
    assert pyc
    # Written by the kernel's user: the invoker, or for a root invoker someone unprivileged.
    assert pyc[0].stat().st_uid == os.getuid() if os.getuid() else pyc[0].stat().st_uid != 0


def _connection_file(directory: Path) -> Path:
    from jupyter_client.connect import write_connection_file

    path, _ = write_connection_file(str(directory / "kernel-test.json"), ip="127.0.0.1")
    return Path(path)


# Runs the launcher as another user. The interpreter lives under /root (mode 700), so it
# imports what the launcher needs while still root, then drops to the user for good.
_AS_USER = """
import os, sys
import docker, docker.types, docker.utils.socket, requests.exceptions, json, hashlib, socket, argparse
import encodings.idna
from kbundle.kernel import launcher
uid, gid, docker_gid = (int(a) for a in sys.argv[1:4])
os.setgroups([docker_gid])
os.setgid(gid)
os.setuid(uid)
launcher.main(sys.argv[4:])
"""


def test_files_written_by_the_kernel_belong_to_the_invoking_user(env_image, workdir, docker_client):
    """The launcher runs as uid 4321 (in the docker group); the kernel's files must be 4321's, not root's."""
    import grp

    from jupyter_client.blocking import BlockingKernelClient

    uid = gid = 4321
    conn = _connection_file(workdir)
    os.chown(conn, uid, gid)
    os.chown(workdir, uid, gid)
    argv = ["--image", env_image, "--workdir", str(workdir), "-f", str(conn)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _AS_USER, str(uid), str(gid), str(grp.getgrnam("docker").gr_gid), *argv],
        cwd=workdir,
        stderr=subprocess.PIPE,
        text=True,
    )
    kc = BlockingKernelClient(connection_file=str(conn))
    kc.load_connection_file()
    kc.start_channels()
    try:
        wait_ready(kc)
        reply = kc.execute_interactive("import os; open('made-by-kernel.txt', 'w').write(str(os.getuid()))", timeout=30)
        assert reply["content"]["status"] == "ok"
        made = workdir / "made-by-kernel.txt"
        assert (made.stat().st_uid, made.stat().st_gid) == (uid, gid)
        assert made.read_text() == str(uid)
        kc.shutdown()
        assert proc.wait(timeout=20) == 0
    finally:
        kc.stop_channels()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_until(lambda: not container_exists(docker_client, container_name(str(conn))), 10)


def test_sigterm_stops_the_container_and_exits_with_its_code(env_image, workdir, docker_client):
    from jupyter_client.blocking import BlockingKernelClient

    conn = _connection_file(workdir)
    proc = subprocess.Popen(
        [LAUNCHER, "--image", env_image, "--workdir", str(workdir), "-f", str(conn)],
        cwd=workdir,
        stderr=subprocess.PIPE,
        text=True,
    )
    kc = BlockingKernelClient(connection_file=str(conn))
    kc.load_connection_file()
    kc.start_channels()
    try:
        wait_ready(kc)
        # Busy, ignoring SIGTERM: only the SIGKILL after the grace period ends it. Signal it once the
        # handler is in place, which the kernel says by printing.
        msg_id = kc.execute(
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ignoring SIGTERM', flush=True); time.sleep(60)"
        )
        wait_for_stdout(kc, msg_id, "ignoring SIGTERM")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        elapsed = time.monotonic() - started
    finally:
        kc.stop_channels()
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGKILL
    assert elapsed < 2.5, f"stopping took {elapsed:.1f}s: longer than jupyter_client waits before SIGKILL"
    assert wait_until(lambda: not container_exists(docker_client, container_name(str(conn))), 10)


def test_missing_gpu_runtime_is_one_clear_line(env_image, workdir, docker_client):
    """This engine has no NVIDIA runtime: asking for GPUs must fail clearly and leave nothing behind."""
    conn = _connection_file(workdir)
    proc = subprocess.run(
        [LAUNCHER, "--image", env_image, "--gpus", "all", "-f", str(conn)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "NVIDIA" in proc.stderr and "--gpus none" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not container_exists(docker_client, container_name(str(conn)))


def test_a_restart_replaces_a_leftover_container_of_the_same_name(env_image, workdir, docker_client):
    from jupyter_client.blocking import BlockingKernelClient

    conn = _connection_file(workdir)
    name = container_name(str(conn))
    stale = docker_client.api.create_container(
        env_image, command=["sleep", "300"], name=name, labels={"kbundle.test": "1"}
    )["Id"]
    docker_client.api.start(stale)
    proc = subprocess.Popen(
        [LAUNCHER, "--image", env_image, "--workdir", str(workdir), "-f", str(conn)],
        cwd=workdir,
        stderr=subprocess.PIPE,
        text=True,
    )
    kc = BlockingKernelClient(connection_file=str(conn))
    kc.load_connection_file()
    kc.start_channels()
    try:
        wait_ready(kc)
        assert docker_client.api.inspect_container(name)["Id"] != stale
        kc.shutdown()
        assert proc.wait(timeout=20) == 0
    finally:
        kc.stop_channels()
        if proc.poll() is None:
            proc.kill()
        try:
            docker_client.api.remove_container(stale, force=True)
        except Exception:
            pass
    assert wait_until(lambda: not container_exists(docker_client, name), 10)
