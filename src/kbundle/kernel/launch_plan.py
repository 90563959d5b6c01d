"""The kernel container's plan (pure decisions, table-tested): its name, user, mounts, network,
ports, environment, labels and lockdown (image/policy.py). The local launcher (kernel/launcher.py)
carries it out; the Slurm launcher (kernel/slurm.py) sends the same decisions to the node.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from kbundle import contract
from kbundle.cache import pycache_root
from kbundle.image import policy, userns
from kbundle.kernel.labels import container_labels
from kbundle.kernel.launch_mounts import MountError, guard_for, notebook_folder, notes_text, plan_mounts
from kbundle.kernel.shim import NOTES_VARIABLE, SHIM

NAME_PREFIX = "kbundle-kernel-"
PYCACHE_IN_CONTAINER = "/tmp/kbundle-pycache"
PYCACHE_IMAGE_FILE = "image.txt"
# The connection file's five ports, in the node agent's protocol order (kernel/node_agent.py holds
# the same tuple; a test keeps them equal). Not imported from there: the node agent's imports
# (subprocess, tempfile, ...) would cost every local kernel's start.
PORT_KEYS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
LOOPBACK = ("127.0.0.1", "localhost")
GPUS_VARIABLE = "KBUNDLE_GPUS_ASKED"  # the launcher's --gpus, for the shim's banner (kernel/shim.py)


class LaunchError(Exception):
    """A problem the launcher reports as one `error:` line before exiting 1."""


@dataclass(frozen=True)
class LaunchPlan:
    """Everything about the container except the connection key (safe to print)."""

    name: str
    image: str
    user: str
    group_add: list[str]
    mounts: list[str]  # read-write, at the same paths (kernel/launch_mounts.py)
    working_dir: str
    pycache: str  # host directory for bytecode, "" for none
    network: str
    ports: list[int]  # published by the engine on 127.0.0.1 (engines whose bridge the host cannot reach)
    environment: dict[str, str]
    labels: dict[str, str]
    gpus: str
    lockdown: policy.Lockdown = policy.kernel("bridge")  # image/policy.py: the one container policy
    readonly: list[str] = field(default_factory=list)  # mounted again read-only over a writable mount
    command: list[str] = field(default_factory=lambda: ["python", "-c", SHIM])
    forward: list[int] = field(default_factory=list)  # held on 127.0.0.1 by the launcher (kernel/forward.py)
    rootless: bool = False  # the engine is the invoker's own (rootless): on Podman, `keep-id` (kernel/podman.py)

    def __getattr__(self, name: str) -> Any:
        """The lockdown's engine options read as the plan's own (`plan.<option>`): image/policy.py holds them."""
        options = object.__getattribute__(self, "lockdown").host_options()
        if name in options:
            return options[name]
        raise AttributeError(name)


def container_name(connection_file: str) -> str:
    digest = hashlib.sha256(os.path.abspath(connection_file).encode()).hexdigest()
    return NAME_PREFIX + digest[:16]


def choose_network(requested: str, environ: dict[str, str], platform: str) -> str:
    """`bridge` unless host networking was asked for (the kernelspec's --network, or the variable).

    `platform` stays in the signature: where an engine runs in a VM (Docker Desktop) a
    requested `host` is that VM's network, which the user asked for knowingly."""
    if requested in ("host", "bridge"):
        return requested
    forced = environ.get("KBUNDLE_KERNEL_NETWORK", "")
    return forced if forced in ("host", "bridge") else "bridge"


def engine_is_local(environ: dict[str, str], platform: str) -> bool:
    """Whether containers share this machine's kernel, so their bridge addresses are reachable."""
    if platform != "linux":
        return False  # Docker Desktop runs containers in a VM
    host = environ.get("DOCKER_HOST", "")
    if host and not host.startswith("unix://"):
        return False  # a remote or VM engine
    # Docker Desktop for Linux is a VM; rootless engines (/run/user/…) keep their bridge in a
    # namespace of their own: the host reaches neither's container addresses.
    return "/.docker/desktop/" not in host and "/run/user/" not in host


def engine_owner(environ: dict[str, str]) -> Optional[int]:
    """The uid that owns the engine's unix socket (image/userns.py), None for none."""
    return userns.engine_owner(environ.get("DOCKER_HOST", ""))


def kernel_user(uid: int, gid: int, groups: list[int], owner: tuple[int, int]) -> tuple[str, list[str]]:
    """(user, supplementary groups) for the container: never root.

    image/policy.py's one rule, with the image's unprivileged user as the fallback: a root
    invoker gets the notebook folder's owner, or that user when root owns the folder too."""
    chosen = policy.container_user(uid, gid, groups, owner, fallback=contract.USER)
    return chosen.user, chosen.groups


def folder_owner(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_uid, st.st_gid)


def kernel_mounts(workdir: str, cwd: str, environ: dict[str, str], uid: int):
    """The kernel's mounts (kernel/launch_mounts.py) for the notebook Jupyter names or the cwd."""
    try:
        return plan_mounts(workdir, notebook_folder(environ, cwd), guard_for(environ, uid))
    except MountError as exc:
        raise LaunchError(str(exc)) from None


def pycache_dir(image: str, environ: dict[str, str]) -> str:
    """The invoking user's bytecode cache for `image` ("" when turned off).

    Keyed by the image reference: kbundle's tags are content hashes, and Python checks
    each .pyc against its source's mtime and size anyway.
    """
    if environ.get("KBUNDLE_KERNEL_PYCACHE") == "0":
        return ""
    slug = "".join(c if c.isalnum() or c in "._-" else "-" for c in image)[-60:].strip("-.")
    digest = hashlib.sha256(image.encode()).hexdigest()[:8]
    return os.path.join(pycache_root(environ), f"{slug}-{digest}")


def prepare_pycache(plan: LaunchPlan) -> LaunchPlan:
    """Create the plan's bytecode cache; without one (read-only home, say) the kernel runs without it."""
    if not plan.pycache:
        return plan
    try:
        os.makedirs(plan.pycache, mode=0o700, exist_ok=True)
        marker = os.path.join(plan.pycache, PYCACHE_IMAGE_FILE)
        if not os.path.exists(marker):  # tells `kbundle gc` which image the cache belongs to
            with open(marker, "w", encoding="utf-8") as fh:
                fh.write(plan.image + "\n")
        _hand_over(plan.pycache, plan.user)
        return plan
    except OSError:
        env = {k: v for k, v in plan.environment.items() if k != "KBUNDLE_PYCACHE"}
        return replace(plan, pycache="", environment=env)


def _hand_over(path: str, user: str) -> None:
    """A root launcher runs the kernel as someone else: let that user write the bytecode cache.

    A uid:gid gets the folder; the image's named user (its uid is only known inside the
    image) gets a folder open to all, whose parent stays the invoker's private cache."""
    if os.getuid() != 0:
        return
    uid, _, gid = user.partition(":")
    if uid.isdigit() and gid.isdigit():
        os.chown(path, int(uid), int(gid))
    else:
        os.chmod(path, 0o1777)


def banner_environment(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """What the shim's banner names: the bundle and CUDA come from the kernelspec's env
    (spec.banner_env), the image from the launcher's argv. Local and Slurm kernels alike."""
    return {
        "KBUNDLE_BANNER_BUNDLE": environ.get("KBUNDLE_BUNDLE") or args.kernel_name or args.image,
        "KBUNDLE_BANNER_IMAGE": args.image,
        "KBUNDLE_BANNER_CUDA": environ.get("KBUNDLE_CUDA") or "unknown",
    }


NETWORK_NOTES = {
    "bridge": "network: a bridge of its own, not this machine's 127.0.0.1; it reaches what this machine "
    "reaches beyond, cloud metadata (169.254.169.254) included on a cloud VM (docs/security.md)",
    "host": "network: this machine's own (--network host): its 127.0.0.1 services and cloud metadata included",
    "node": "network: the compute node's own (a Slurm kernel): its services and cloud metadata included",
}


def banner_notes(notes: list[str], network: str) -> dict[str, str]:
    """The lines the shim's banner starts with: what is mounted and how, and what the network reaches."""
    lines = [*notes, NETWORK_NOTES.get(network, f"network: {network}")]
    return {NOTES_VARIABLE: notes_text(lines)}


def plan_launch(
    args: argparse.Namespace,
    info: dict[str, Any],
    *,
    cwd: str,
    uid: int,
    gid: int,
    groups: list[int],
    pid: int,
    environ: dict[str, str],
    platform: str,
    owner: Callable[[str], tuple[int, int]] = folder_owner,
    ppid: Optional[int] = None,
    socket_owner: Callable[[dict[str, str]], Optional[int]] = engine_owner,
) -> LaunchPlan:
    """Decide the container's settings (pure, apart from checking that the workdir exists and,
    for a root invoker, who owns the notebook's folder)."""
    if info.get("transport", "tcp") != "tcp":
        raise LaunchError(f"transport {info.get('transport')!r} is not supported; kbundle kernels use tcp")
    ip = str(info.get("ip", "127.0.0.1"))
    if not (ip in LOOPBACK or ip.startswith("127.")):
        raise LaunchError(f"the connection file asks for ip {ip}; kbundle kernels listen on 127.0.0.1 only")
    network = choose_network(args.network, environ, platform)
    mounts = kernel_mounts(args.workdir, cwd, environ, uid)
    working_dir = mounts.working_dir
    env = {"HOME": "/tmp"}  # the invoking uid has no home in the image; IPython wants a writable one
    pycache = pycache_dir(args.image, environ)
    if pycache:
        env["KBUNDLE_PYCACHE"] = PYCACHE_IN_CONTAINER
    if environ.get("JPY_SESSION_NAME"):
        env["JPY_SESSION_NAME"] = environ["JPY_SESSION_NAME"]  # the notebook path, for __session__
    env.update(banner_environment(args, environ))
    env.update(banner_notes(mounts.notes, network))
    env[GPUS_VARIABLE] = args.gpus or "none"  # what was asked: the banner says when none arrived
    labels = container_labels(args.kernel_name, pid, ppid)
    ports = [int(info[k]) for k in PORT_KEYS] if network == "bridge" else []
    # A local engine on Linux: the host reaches the container's bridge address, so the launcher
    # forwards the ports itself (kernel/forward.py says why); elsewhere the engine publishes them.
    # A rootless engine keeps its bridge in a namespace of its own (slirp4netns): it publishes them.
    rootless = platform == "linux" and userns.is_rootless(socket_owner(environ), uid)
    local = engine_is_local(environ, platform) and not rootless
    forward, ports = (ports, []) if ports and local else ([], ports)
    folder = working_dir if mounts.writable else ""
    user, group_add = kernel_user(uid, gid, groups, (owner(folder) if folder else (0, 0)) if uid == 0 else (uid, gid))
    if rootless:
        group_add = []  # the user's other host groups are not mapped into their own user namespace
    return LaunchPlan(
        name=container_name(args.connection_file),
        image=args.image,
        user=user,
        group_add=group_add,
        mounts=mounts.writable,
        readonly=mounts.readonly,
        lockdown=policy.kernel(network),
        pycache=pycache,
        working_dir=working_dir,
        network=network,
        ports=ports,
        forward=forward,
        environment=env,
        labels=labels,
        gpus=args.gpus or "none",
        rootless=rootless,
    )


def _binds(plan: LaunchPlan) -> dict[str, dict[str, str]]:
    binds = {path: {"bind": path, "mode": "rw"} for path in plan.mounts}
    binds.update({path: {"bind": path, "mode": "ro"} for path in plan.readonly})
    if plan.pycache:
        binds[plan.pycache] = {"bind": PYCACHE_IN_CONTAINER, "mode": "rw"}
    return binds


def kernel_connection(info: dict[str, Any], network: str) -> bytes:
    """The line the shim receives: the connection info with the address the kernel binds."""
    data = dict(info)
    # On a bridge the kernel must listen on the container's interface; the host side of
    # the published ports stays on 127.0.0.1.
    data["ip"] = "127.0.0.1" if network == "host" else "0.0.0.0"
    return (json.dumps(data, separators=(",", ":")) + "\n").encode()


def device_requests(gpus: str) -> list[Any]:
    """The engine's GPU request for the launcher's `--gpus`: all, or these device ids, with the
    capabilities CUDA needs (image/preflight.py GPU_CAPABILITIES), in the form Docker's API takes."""
    from docker.types import DeviceRequest

    from kbundle.image.preflight import GPU_CAPABILITIES

    gpus = (gpus or "none").strip()
    capabilities = [list(GPU_CAPABILITIES)]
    if gpus == "none":
        return []
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=capabilities)]
    ids = [g for g in gpus.removeprefix("device=").split(",") if g]
    return [DeviceRequest(device_ids=ids, capabilities=capabilities)]


def read_connection_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
    except OSError as exc:
        raise LaunchError(f"cannot read the connection file {path}: {exc.strerror}") from None
    except ValueError:
        raise LaunchError(f"the connection file {path} is not JSON") from None
    missing = [k for k in PORT_KEYS + ("key",) if k not in info]
    if missing:
        raise LaunchError(f"the connection file {path} lacks {', '.join(missing)}")
    return info
