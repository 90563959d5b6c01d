"""Rootful Podman's Docker-compatible socket, with a STAND-IN NVIDIA CDI spec: Podman's GPU path without a GPU.

Podman resolves Container Device Interface names (``nvidia.com/gpu=0``, ``=all``) from spec
files in /etc/cdi or /var/run/cdi (Podman 4.3 reads no other place), which say which device
nodes and environment to inject. The world writes a stand-in spec there,
``/var/run/cdi/kbundle-world-standin.yaml``, of kind ``nvidia.com/gpu`` with devices ``0``,
``1`` and ``all``, whose edits inject stand-in nodes ``/dev/nvidia0``, ``/dev/nvidia1``
(character devices 195:N made under ``/run/kbundle-world-gpus``, as the driver's are; nothing
can open them; world-readable like ``/dev``, so that a rootless Podman, ``podman_rootless.py``,
can bind them too) and ``NVIDIA_VISIBLE_DEVICES``, as NVIDIA's generated spec does. It proves the
requests and Podman's plumbing, not CUDA. Being in /var/run/cdi, every rootful Podman on
this machine sees it (and it is gone at reboot; ``up`` writes it again).

The service is ``podman system service`` on ``<world>/podman/podman.sock``, with storage of its
own (``--root``/``--runroot``) and a containers.conf of its own (``CONTAINERS_CONF``) whose
default ulimits stay within this machine's hard limits (Podman's defaults exceed what a
container host may grant, and runc then refuses to start anything). The world's base and env
images are copied into it. Started and recognised like every daemon of the world (``daemons.py``).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import time
from pathlib import Path

from .base_image import BASE_IMAGE
from .common import docker_client, log
from .daemons import locked, running, spawn, terminate

CDI_SPEC = Path("/var/run/cdi/kbundle-world-standin.yaml")
# The stand-in nodes: machine-wide like the spec, and where every user can reach them (a rootless
# Podman stats each CDI host path as its user; the world's folder may sit in root's 0700 home).
DEV = Path("/run/kbundle-world-gpus")
RUN_ROOT = Path("/run/kbundle-podman")
STATE_FILE = "podman.json"
GPUS = 2
START_TIMEOUT_S = 60
PODMAN_NPROC = 32768


def folder_of(root: Path) -> Path:
    return root / "podman"


def cdi_spec(dev: Path, gpus: int = GPUS) -> dict:
    """The stand-in spec (JSON is YAML): one device per GPU and `all`, as nvidia-ctk names them."""

    def node(i: int) -> dict:
        return {"path": f"/dev/nvidia{i}", "hostPath": str(dev / f"nvidia{i}")}

    devices = [
        {"name": str(i), "containerEdits": {"deviceNodes": [node(i)], "env": [f"NVIDIA_VISIBLE_DEVICES={i}"]}}
        for i in range(gpus)
    ]
    every = {"deviceNodes": [node(i) for i in range(gpus)], "env": ["NVIDIA_VISIBLE_DEVICES=all"]}
    devices.append({"name": "all", "containerEdits": every})
    ctl = {"path": "/dev/nvidiactl", "hostPath": str(dev / "nvidiactl")}
    return {
        "cdiVersion": "0.5.0",
        "kind": "nvidia.com/gpu",
        "devices": devices,
        "containerEdits": {"deviceNodes": [ctl]},
    }


def ensure_podman(root: Path) -> dict:
    """``{"podman_host": "unix://…", "podman_cdi_spec": …}``: the running service, or a new one;
    ``{"podman_error": why}`` where Podman is missing or does not start (its tests skip, saying so)."""
    if not shutil.which("podman"):
        return {"podman_error": "podman is not installed (Debian: apt-get install podman)"}
    folder = folder_of(root)
    try:
        with locked(folder / "lock"):
            _write_spec(folder)
            host = _ensure(folder)
            _ensure_image(host, BASE_IMAGE)
    except (SystemExit, Exception) as exc:  # optional: the Podman tests skip with this reason
        log(f"no Podman in this world: {exc}")
        return {"podman_error": str(exc)}
    return {"podman_host": host, "podman_cdi_spec": str(CDI_SPEC), "podman_gpus": GPUS}


def _podman(folder: Path) -> list[str]:
    return ["podman", "--root", str(folder / "storage"), "--runroot", str(RUN_ROOT)]


def _write_spec(folder: Path) -> None:
    dev = DEV
    dev.mkdir(parents=True, exist_ok=True)
    dev.chmod(0o755)
    for name, minor in [*((f"nvidia{i}", i) for i in range(GPUS)), ("nvidiactl", 255)]:
        if not (dev / name).exists():
            os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(195, minor))
    CDI_SPEC.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(cdi_spec(dev), indent=1) + "\n"
    if not CDI_SPEC.exists() or CDI_SPEC.read_text() != text:
        CDI_SPEC.write_text(text)


def _conf(folder: Path) -> Path:
    """containers.conf: default ulimits this machine's hard limits allow."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    # Podman lowers its own process limit to 32768 at start (and the runtime cannot raise it back).
    nproc = PODMAN_NPROC if nproc == resource.RLIM_INFINITY else min(nproc, PODMAN_NPROC)
    nofile = min(nofile, 1048576) if nofile != resource.RLIM_INFINITY else 1048576
    limits = [f"nofile={nofile}:{nofile}", f"nproc={nproc}:{nproc}"]
    conf = folder / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = [" + ", ".join(f'"{x}"' for x in limits) + "]\n")
    return conf


def _answers(host: str) -> bool:
    try:
        import docker

        docker.DockerClient(base_url=host, timeout=5).ping()
        return True
    except Exception:
        return False


def _ensure(folder: Path) -> str:
    sock = folder / "podman.sock"
    env = {**os.environ, "CONTAINERS_CONF": str(_conf(folder))}
    env.pop("DOCKER_HOST", None)
    command = [*_podman(folder), "system", "service", "--time=0", f"unix://{sock}"]
    return ensure_service(
        folder / STATE_FILE, sock, command, f"rootful Podman's service (stand-in CDI spec {CDI_SPEC})", env
    )


def ensure_service(state_file: Path, sock: Path, command: list[str], what: str, env=None) -> str:
    """The Docker-API URL of the Podman service `state_file` records while it answers on `sock`;
    else `command` starts a new one (logged beside the state file), waited for until it answers."""
    host = f"unix://{sock}"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state and running(state.get("pid", -1), str(sock)) and _answers(host):
        return host
    if state:
        terminate(state.get("pid", -1), str(sock))
    log_path = state_file.parent / "podman.log"
    log(f"starting {what} on {host}")
    proc = spawn(command, log_path, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(host):
        if time.monotonic() > deadline or proc.poll() is not None:
            terminate(proc.pid, str(sock))
            raise SystemExit(f"error: {what} did not answer on {host}; see {log_path}")
        time.sleep(0.2)
    state_file.write_text(json.dumps({"pid": proc.pid, "host": host}))
    return host


def _ensure_image(host: str, tag: str) -> None:
    """`tag` from the main engine into Podman's storage (docker save | podman load)."""
    import docker

    box = docker.DockerClient(base_url=host, timeout=600)
    try:
        box.images.get(tag)
        return
    except docker.errors.DockerException:
        pass
    log(f"docker save {tag} | podman load")
    box.images.load(b"".join(docker_client().images.get(tag).save(named=True)))


def copy_image(root: Path, tag: str) -> None:
    """An image of the main engine (the world's env image, say) into the world's Podman."""
    _ensure_image(f"unix://{folder_of(root) / 'podman.sock'}", tag)


def stop_podman(root: Path) -> None:
    """Stop the service, remove the stand-in spec and everything the service stored."""
    folder = folder_of(root)
    state_file = folder / STATE_FILE
    if not state_file.exists():  # the spec and run root are machine-wide: only the world that started it
        shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        terminate(json.loads(state_file.read_text())["pid"], str(folder / "podman.sock"))
    except (KeyError, ValueError):
        pass
    CDI_SPEC.unlink(missing_ok=True)
    shutil.rmtree(DEV, ignore_errors=True)
    if folder.exists() and shutil.which("podman"):
        subprocess.run([*_podman(folder), "system", "reset", "--force"], capture_output=True, timeout=120)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(RUN_ROOT, ignore_errors=True)
