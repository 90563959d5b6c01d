"""Slurm kernels against the world's real one-node Slurm cluster and registry, driven by jupyter_client.

The image is the world's env image with a content-hash label, pushed to the world's
registry and run by digest, as `kbundle push` + `kbundle run --slurm` would set it up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

from helpers import sleeping, squeue
from kbundle.kernel import slurm as slurmmod
from kbundle.kernel.spec import KernelRequest, build_spec, launcher_path

pytestmark = pytest.mark.docker

CONTENT_HASH = "5" * 64
DEADLINE_S = 40


@pytest.fixture(scope="module")
def digest_image(env_image, registry, docker_client, tmp_path_factory):
    """The env image, labelled as a bundle's, pushed: `REF@sha256:…`."""
    folder = tmp_path_factory.mktemp("slurm-image")
    (folder / "Dockerfile").write_text(f"FROM {env_image}\nLABEL org.kbundle.content-hash={CONTENT_HASH}\n")
    tag = f"{registry}/tests/slurm-kernel:{CONTENT_HASH[:12]}"
    docker_client.images.build(path=str(folder), tag=tag, rm=True)
    for line in docker_client.api.push(tag.rsplit(":", 1)[0], tag.rsplit(":", 1)[1], stream=True, decode=True):
        assert "error" not in line, line
    image = docker_client.images.get(tag)
    yield next(d for d in image.attrs["RepoDigests"] if d.startswith(registry))
    try:
        docker_client.images.remove(image.id, force=True)  # its parent, the world's env image, stays
    except docker.errors.ImageNotFound:
        pass


def _spec(image: str, workdir: Path, content_hash: str = CONTENT_HASH, **options) -> dict:
    opts = slurmmod.SlurmOptions(partition="debug", login_address="127.0.0.1", start_timeout=60, **options)
    request = KernelRequest("kbundle-slurm-test-slurm", "slurm-test", image, str(workdir), [], content_hash, slurm=opts)
    return build_spec(request, launcher_path())


def _start(spec: dict, cwd: Path):
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpec

    km = KernelManager()
    km._kernel_spec = KernelSpec(**{k: v for k, v in spec.items() if k != "metadata"})
    km.start_kernel(cwd=str(cwd))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    return km, kc


def _containers() -> str:
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", "name=kbundle-", "--format", "{{.Names}}"], capture_output=True, text=True
    )
    return "\n".join(n for n in out.stdout.split() if not n.startswith("kbundle-kernel-"))


def _until_gone(what: str) -> float:
    started = time.monotonic()
    while squeue() or _containers():
        assert time.monotonic() - started < DEADLINE_S, f"after {what}: left {squeue()!r} {_containers()!r}"
        time.sleep(0.2)
    return time.monotonic() - started


def _output(kc, code: str) -> str:
    seen = []
    kc.execute_interactive(code, timeout=60, output_hook=lambda m: seen.append(m["content"].get("text", "")))
    return "".join(seen)


def test_the_node_pulls_the_image_by_digest(slurm, digest_image, docker_client, tmp_path):
    """A node that lacks the image pulls it by its digest before the kernel starts."""
    image_id = docker_client.images.get(digest_image).id
    docker_client.images.remove(image_id, force=True)  # every tag and digest: a fresh cache for it
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(digest_image)
    km, kc = _start(_spec(digest_image, tmp_path), tmp_path)
    try:
        assert _output(kc, "print(6 * 7)").strip() == "42"
        assert docker_client.images.get(digest_image).id == image_id
    finally:
        km.shutdown_kernel()
        kc.stop_channels()
    _until_gone("shutdown")


PODMAN_CONF = """[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


def test_a_podman_node(slurm, digest_image, registry, tmp_path, monkeypatch):
    """`--engine podman`: the node's Podman pulls the image by digest and runs the kernel, interrupts reach it."""
    (tmp_path / "containers.conf").write_text(PODMAN_CONF)
    (tmp_path / "registries.conf").write_text(f'[[registry]]\nlocation = "{registry}"\ninsecure = true\n')
    # srun passes the environment on to the job step, as it does a user's
    monkeypatch.setenv("CONTAINERS_CONF", str(tmp_path / "containers.conf"))
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(tmp_path / "registries.conf"))
    subprocess.run(["podman", "rmi", "--force", digest_image], capture_output=True)
    km, kc = _start(_spec(digest_image, tmp_path, engine="podman"), tmp_path)
    try:
        assert _output(kc, "import os; print(os.getuid() != 0)").strip() == "True"
        sleeping(kc)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=20)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        km.shutdown_kernel()
        kc.stop_channels()
    _until_gone("shutdown")
    left = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    assert "kbundle-" not in left
    subprocess.run(["podman", "rmi", "--force", digest_image], capture_output=True)


def test_execute_interrupt_restart_shutdown(slurm, digest_image, tmp_path):
    km, kc = _start(_spec(digest_image, tmp_path), tmp_path)
    try:
        out = _output(kc, "import os, socket; print(os.getuid(), socket.gethostname(), os.getcwd())")
        uid, host, cwd = out.split()
        assert uid != "0" and host == slurm["node"] and cwd == str(tmp_path)
        assert squeue().endswith("RUNNING")
        sleeping(kc)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=20)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        km.restart_kernel()
        kc.wait_for_ready(timeout=120)
        assert _output(kc, "print('after restart')").strip() == "after restart"
    finally:
        km.shutdown_kernel()
        kc.stop_channels()
    _until_gone("shutdown")


def test_a_killed_launcher_ends_the_step(slurm, digest_image, tmp_path):
    km, kc = _start(_spec(digest_image, tmp_path), tmp_path)
    sleeping(kc)
    os.kill(km.provisioner.process.pid, signal.SIGKILL)
    _until_gone("SIGKILL of the launcher")
    kc.stop_channels()
    km.cleanup_resources()


def test_scancel_kills_the_kernel_and_the_client_sees_it(slurm, digest_image, tmp_path):
    km, kc = _start(_spec(digest_image, tmp_path), tmp_path)
    sleeping(kc)
    job = squeue().split()[0]
    subprocess.run(["scancel", job], check=True)
    started = time.monotonic()
    while km.is_alive():
        assert time.monotonic() - started < DEADLINE_S, "the kernel outlived its cancelled job"
        time.sleep(0.2)
    assert km.provisioner.process.returncode != 0
    kc.stop_channels()
    km.cleanup_resources()
    _until_gone("scancel")


def _listeners_of(pid: int) -> list[str]:
    """Local addresses that `pid` or its children listen on (ss -ltnp)."""
    pids = {str(pid), *subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()}
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    return [line.split()[3] for line in lines if any(f"pid={p}," in line for p in pids)]


def test_the_key_stays_secret_and_the_kernel_binds_to_the_route(slurm, digest_image, tmp_path):
    km, kc = _start(_spec(digest_image, tmp_path), tmp_path)
    try:
        key = km.session.key.decode()
        assert len(key) > 16
        job = squeue().split()[0]
        shown = [
            subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout,
            subprocess.run(["scontrol", "show", "step", f"{job}.0"], capture_output=True, text=True).stdout,
            subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout,
        ]
        for pid in subprocess.run(["pgrep", "-f", "srun|python3 -u -c"], capture_output=True, text=True).stdout.split():
            try:
                shown.append(Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"))
            except OSError:
                pass
        name = slurmmod.job_name(km.connection_file)
        inspected = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, check=True).stdout
        shown.append(inspected)
        assert job in shown[0]
        for text in shown:
            assert key not in text
        kernel_pid = json.loads(inspected)[0]["State"]["Pid"]
        bound = _listeners_of(kernel_pid)
        assert len(bound) >= 5, bound
        assert all(address.startswith("127.0.0.1:") for address in bound), bound
    finally:
        km.shutdown_kernel()
        kc.stop_channels()
    _until_gone("shutdown")


def _launch_directly(spec: dict, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    from jupyter_client.connect import write_connection_file

    connection, _ = write_connection_file(str(tmp_path / "kernel.json"), ip="127.0.0.1", key=b"k" * 32)
    argv = [a.replace("{connection_file}", connection) for a in spec["argv"]]
    return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_a_pending_start_says_why_and_gives_up_cancelling_the_job(slurm, digest_image, tmp_path):
    hog = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            slurm["partition"],
            "--exclusive",
            "-J",
            "hog",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 300",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        spec = _spec(digest_image, tmp_path)
        spec["argv"][spec["argv"].index("--start-timeout") + 1] = "6"
        done = _launch_directly(spec, tmp_path, timeout=60)
    finally:
        subprocess.run(["scancel", hog])
    assert done.returncode == 1
    assert "PENDING" in done.stderr
    assert "error: the Slurm job did not start within 6 s" in done.stderr
    assert "cancelled it" in done.stderr
    _until_gone("the start timeout")


def test_a_job_slurm_refuses_fails_at_once_with_one_line(slurm, digest_image, tmp_path):
    spec = _spec(digest_image, tmp_path)
    spec["argv"][spec["argv"].index("--partition") + 1] = "nosuch"
    started = time.monotonic()
    done = _launch_directly(spec, tmp_path, timeout=60)
    assert done.returncode == 1 and time.monotonic() - started < 15
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the Slurm kernel did not start: srun exited with status 1"], done.stderr
    assert "invalid partition" in done.stderr.lower()  # srun's own reason stays in the kernel's log


def test_the_node_refuses_another_bundles_image(slurm, digest_image, tmp_path):
    done = _launch_directly(_spec(digest_image, tmp_path, content_hash="6" * 64), tmp_path, timeout=60)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not the bundle's" in errors[0], done.stderr
    _until_gone("a refused image")


def test_doctor_slurm(slurm):
    kbundle = [str(Path(sys.executable).parent / "kbundle")]
    ok = subprocess.run([*kbundle, "doctor", "--slurm", "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    findings = {f["topic"]: f for f in json.loads(ok.stdout)["findings"]}
    assert findings["slurm"]["level"] == "ok" and slurm["partition"] in findings["slurm"]["message"]
    assert findings["node"]["level"] == "ok" and "docker" in findings["node"]["message"]
    assert findings["gres"]["level"] == "warn"  # a CPU-only cluster: kernels get no GPU
    missing = subprocess.run([*kbundle, "doctor", "--slurm", "--partition", "nosuch"], capture_output=True, text=True)
    assert missing.returncode == 4
    assert missing.stderr.strip().splitlines() == [f"error: no partition 'nosuch' (there are: {slurm['partition']})"], (
        missing.stderr
    )
    gpu = subprocess.run([*kbundle, "doctor", "--slurm", "--gres", "gpu:1"], capture_output=True, text=True)
    assert gpu.returncode == 4 and "offers no gpu GRES" in gpu.stderr
