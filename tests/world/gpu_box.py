"""The GPU box: a STAND-IN GPU machine, a second Docker engine whose PATH holds a stand-in NVIDIA hook.

No machine of ours has a GPU, so every ``--gpus`` request to the main engine ends in ``could not
select device driver``. The engine's GPU path can still be shown without one: dockerd registers
its ``nvidia`` device driver when ``nvidia-container-runtime-hook`` is on its PATH at start
(moby ``daemon/nvidia_linux.go``), and then turns every GPU request into ``NVIDIA_VISIBLE_DEVICES``
in the container and that program as an OCI prestart hook. Here that program is the world's
``standin_nvidia_hook.py``: two stand-in GPUs, device nodes that nothing can open, and a log of
what it was asked. The engine is real; only the device is a stand-in (as the debootstrap image
stands in for ``nvidia/cuda``). It proves kbundle's requests and the engine's plumbing, not CUDA.

The box is its own dockerd, beside the main one and never touching it:

* its own socket, data root, exec root, pidfile and (empty) config file, all under
  ``<world>/gpu-box/`` except the exec root (``/run/kbundle-gpu-box``: containerd's sockets
  live below it and must stay short);
* its own bridge ``kbgpu0`` on 10.213.7.0/24, made here; never ``--bridge none``, which makes
  dockerd delete ``docker0`` for the main engine; ``--iptables=false`` so that it leaves the
  main engine's chains alone (its containers reach the host, and the host them, by route);
* the world's base image, copied from the main engine (``docker save | docker load``), so that
  builds on the box work offline.

Started, found and stopped like every daemon of the world (``daemons.py``): recognised by its
socket's path on its command line, kept running between calls. The bridge and the exec root
are machine-wide: one GPU box per machine, whichever ``KBUNDLE_WORLD_DIR`` started it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .base_image import BASE_IMAGE
from .common import docker_client, log
from .daemons import locked, running, spawn, terminate

BRIDGE = "kbgpu0"
BRIDGE_ADDRESS = "10.213.7.1/24"
EXEC_ROOT = Path("/run/kbundle-gpu-box")
STATE_FILE = "gpu-box.json"
HOOK_NAME = "nvidia-container-runtime-hook"
HOOK_SOURCE = Path(__file__).with_name("standin_nvidia_hook.py")
GPUS = 2  # the stand-in box's GPUs: /dev/nvidia0 and /dev/nvidia1
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20


def box_folder(root: Path) -> Path:
    return root / "gpu-box"


def hook_log(root: Path) -> Path:
    """The stand-in hook's records, one JSON object a line (``standin_nvidia_hook.py``)."""
    return box_folder(root) / "hook.jsonl"


def socket_path(root: Path) -> Path:
    return box_folder(root) / "docker.sock"


def dockerd_argv(exe: str, folder: Path) -> list[str]:
    """The box's dockerd: everything of its own, the bridge made for it, the host's iptables left alone."""
    return [
        exe,
        "--host",
        f"unix://{folder / 'docker.sock'}",
        "--data-root",
        str(folder / "data"),
        "--exec-root",
        str(EXEC_ROOT),
        "--pidfile",
        str(folder / "dockerd.pid"),
        "--config-file",
        str(folder / "daemon.json"),
        "--bridge",
        BRIDGE,
        "--iptables=false",
        "--ip-masq=false",
    ]


def ensure_gpu_box(root: Path) -> dict:
    """``{"gpu_docker_host": "unix://…", "gpu_box_hook_log": …}``: the running box, or a new one."""
    folder = box_folder(root)
    with locked(folder / "lock"):
        host = _ensure(root, folder)
        _ensure_base_image(host)
    return {"gpu_docker_host": host, "gpu_box_hook_log": str(hook_log(root)), "gpu_box_gpus": GPUS}


def _client(host: str, timeout: int = 600):
    import docker

    return docker.DockerClient(base_url=host, timeout=timeout)


def _answers(host: str) -> bool:
    try:
        _client(host, timeout=5).ping()
        return True
    except Exception:
        return False


def _ensure(root: Path, folder: Path) -> str:
    sock = socket_path(root)
    host = f"unix://{sock}"
    state_file = folder / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state and running(state.get("pid", -1), str(sock)) and _answers(host):
        return host
    exe = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not os.access(exe, os.X_OK):
        raise SystemExit("error: dockerd is not installed (Debian: apt-get install docker.io)")
    if state:
        terminate(state.get("pid", -1), str(sock), timeout=STOP_TIMEOUT_S)
    folder.mkdir(parents=True, exist_ok=True)
    _ensure_bridge()
    (folder / "daemon.json").write_text("{}\n")  # not /etc/docker/daemon.json: nothing of the main engine's
    bindir = _hook_bin(folder)
    hook_log(root).touch()
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "KBUNDLE_GPU_BOX_LOG": str(hook_log(root)),
        "KBUNDLE_GPU_BOX_GPUS": str(GPUS),
    }
    env.pop("DOCKER_HOST", None)
    log_path = folder / "dockerd.log"
    log(f"starting the stand-in GPU box: a second dockerd on {host}, bridge {BRIDGE}")
    proc = spawn(dockerd_argv(exe, folder), log_path, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(host):
        if time.monotonic() > deadline or proc.poll() is not None:
            terminate(proc.pid, str(sock))
            raise SystemExit(f"error: the GPU box's dockerd did not answer on {host}; see {log_path}")
        time.sleep(0.2)
    state_file.write_text(json.dumps({"pid": proc.pid, "host": host}))
    return host


def _hook_bin(folder: Path) -> Path:
    """A folder for dockerd's PATH whose only program is the stand-in hook, run by the host's python3."""
    bindir = folder / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    hook = bindir / HOOK_NAME
    hook.write_text(f"#!/bin/sh\n# the world's STAND-IN for NVIDIA's hook\nexec {python} {HOOK_SOURCE} \"$@\"\n")
    hook.chmod(0o755)
    return bindir


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _ensure_bridge() -> None:
    """The box's own bridge, with its own subnet: dockerd adopts a bridge it is given."""
    if _ip("link", "show", BRIDGE, check=False).returncode != 0:
        _ip("link", "add", BRIDGE, "type", "bridge")
    if BRIDGE_ADDRESS.split("/")[0] not in _ip("-4", "addr", "show", BRIDGE).stdout:
        _ip("addr", "add", BRIDGE_ADDRESS, "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def _ensure_base_image(host: str) -> None:
    """The world's base image on the box too (from the main engine), so that builds there stay offline."""
    box = _client(host)
    try:
        box.images.get(BASE_IMAGE)
        return
    except Exception:
        pass
    log(f"docker save {BASE_IMAGE} | docker load (into the GPU box)")
    main = docker_client()
    box.images.load(b"".join(main.images.get(BASE_IMAGE).save(named=True)))


def stop_gpu_box(root: Path) -> None:
    """Stop the box's dockerd, remove its bridge and everything it stored. The machine-wide parts
    (exec root, bridge) only when this world started the box: one GPU box per machine."""
    folder = box_folder(root)
    state_file = folder / STATE_FILE
    if not state_file.exists():
        shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        terminate(json.loads(state_file.read_text())["pid"], str(socket_path(root)), timeout=STOP_TIMEOUT_S)
    except (KeyError, ValueError):
        pass
    for base in (folder, EXEC_ROOT):  # mounts a killed dockerd left behind would stop rmtree
        for mount in reversed(_mounts_under(base)):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    _ip("link", "del", BRIDGE, check=False)


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base.resolve()) + "/"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    return [p for p in (line.split()[1] for line in lines if len(line.split()) > 1) if p.startswith(prefix)]
