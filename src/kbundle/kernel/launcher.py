"""`kbundle-kernel`: the process a kbundle kernelspec starts. It runs ipykernel in a container.

    kbundle-kernel --image IMAGE [--workdir DIR] [--gpus none|all|0,1] [--kernel-name NAME]
                   [--network host|bridge] -f CONNECTION_FILE

One foreground process per kernel, talking to the Docker engine through the SDK (no
`docker` CLI child), so that Jupyter's signals land on a process that understands them:

- The container is named from the connection file (a restart replaces it), runs with an
  init process and auto-removes. It runs as the invoking uid:gid (plus supplementary
  groups), never as root: a root invoker gets the owner of the notebook's folder, or the
  image's unprivileged user when that is root too. No capabilities, no new privileges
  (setuid binaries do not raise it), so a notebook cannot sniff traffic or become root. The notebook's directory (the cwd Jupyter gives the kernel) and the kernelspec's
  workdir are mounted at the same paths, and the notebook's directory is the working one.
  Its command is `python -c SHIM`; the image's ENTRYPOINT activates the environment.
- The connection info, with its HMAC key, goes through the container's stdin: never in
  argv, environment, labels or mounts that `docker inspect` shows. The shim writes it to
  a 0600 file inside the container and runs ipykernel in the same process. When stdin
  reaches EOF (this launcher is gone, even by SIGKILL) the shim ends the kernel, and
  auto-remove deletes the container.
- Network: by default a bridge, the kernel bound to 0.0.0.0 inside the container's own
  namespace, its five ports reachable from the host on 127.0.0.1 only (held by this
  launcher and forwarded, kernel/forward.py, on a local Linux engine; published by the
  engine elsewhere): the kernel cannot reach the host's loopback services or see its traffic. `--network host` (recorded in the
  kernelspec by `kbundle run --network host`, or `KBUNDLE_KERNEL_NETWORK=host`) shares the
  host's network, the kernel bound to 127.0.0.1.
- Signals: SIGINT is sent to the kernel process (through tini), so running code gets
  KeyboardInterrupt. SIGTERM/SIGHUP stop the container: SIGTERM, then SIGKILL after
  STOP_GRACE_S, well before jupyter_client's own SIGKILL (2.5 s after its SIGTERM by
  default). The launcher exits with the container's exit code as soon as it stops;
  the engine's auto-remove deletes it moments later (waiting for that could take longer
  than jupyter_client's patience on a busy machine).
- Its parent's death ends the kernel. A `kill -9` of the Jupyter server or client would
  otherwise leave this launcher re-parented to PID 1 with its container up (GPU memory
  held, nobody able to reach the kernel). Linux delivers SIGUSR2 when the parent dies
  (`prctl(PR_SET_PDEATHSIG)`), and a thread also checks `getppid()` every PARENT_POLL_S
  (other systems; a parent that died before we asked) and raises SIGUSR2 itself. When
  `getppid()` differs from the parent the launcher started with, the container
  is stopped as on SIGTERM. SIGUSR2 alone proves nothing (Linux sends it when the *thread*
  that forked us ends, as a client's thread pool does), so only a changed parent counts.
  The parent is in the container's labels too, for `kbundle gc`.
- `JPY_PARENT_PID` is not forwarded: under tini the kernel's parent is PID 1, which
  ipykernel's parent poller reads as "orphaned" and exits.

Environments installed without .pyc files (rattler does not byte-compile) would be
compiled at every kernel start, about a second for ipykernel alone. For those, the shim
points `sys.pycache_prefix` at a per-image directory in the user's kbundle cache
(mounted at PYCACHE_IN_CONTAINER), so only the first start per image pays.
`KBUNDLE_KERNEL_PYCACHE=0` turns this off.

Containers carry labels (kernel/labels.py: the launcher's pid, its start time and the
host) so that `kbundle gc` can find leftovers whose launcher is gone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from kbundle import contract
from kbundle.cache import pycache_root
from kbundle.image import engine
from kbundle.kernel.labels import container_labels, orphaned
from kbundle.kernel.shim import SHIM

STOP_GRACE_S = 1
PARENT_POLL_S = 1.0  # how often the watcher thread checks that the parent still lives
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_DEATH_SIGNAL = signal.SIGUSR2
REPLACE_WAIT_S = 10  # how long a restart waits for the previous container to go
NAME_PREFIX = "kbundle-kernel-"
PYCACHE_IN_CONTAINER = "/tmp/kbundle-pycache"
PYCACHE_IMAGE_FILE = "image.txt"
PORT_KEYS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
LOOPBACK = ("127.0.0.1", "localhost")
# A bind mount at (or above) these paths would hide the container's own system or environment.
RESERVED = (
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    contract.ROOT,
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var",
)


class LaunchError(Exception):
    """A problem the launcher reports as one `error:` line before exiting 1."""


@dataclass(frozen=True)
class LaunchPlan:
    """Everything about the container except the connection key (safe to print)."""

    name: str
    image: str
    user: str
    group_add: list[str]
    mounts: list[str]
    working_dir: str
    pycache: str  # host directory for bytecode, "" for none
    network: str
    ports: list[int]  # published by the engine on 127.0.0.1 (engines whose bridge the host cannot reach)
    environment: dict[str, str]
    labels: dict[str, str]
    gpus: str
    command: list[str] = field(default_factory=lambda: ["python", "-c", SHIM])
    cap_drop: list[str] = field(default_factory=lambda: ["ALL"])
    security_opt: list[str] = field(default_factory=lambda: ["no-new-privileges"])
    forward: list[int] = field(default_factory=list)  # held on 127.0.0.1 by the launcher (kernel/forward.py)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kbundle-kernel", description="Run a Jupyter kernel inside a kbundle image.")
    p.add_argument("-f", "--connection-file", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--workdir", default="", help="directory mounted into the kernel (default: the current one)")
    p.add_argument("--gpus", default="none", help="none, all, or comma-separated device ids")
    p.add_argument("--kernel-name", default="")
    p.add_argument("--network", choices=("auto", "host", "bridge"), default="auto")
    slurm = p.add_argument_group("Slurm", "run the kernel on a compute node through srun (kernel/slurm.py)")
    slurm.add_argument("--slurm", action="store_true")
    slurm.add_argument("--partition", default="")
    slurm.add_argument("--gres", default="")
    slurm.add_argument("--time", default="")
    slurm.add_argument("--account", default="")
    slurm.add_argument("--slurm-arg", action="append", default=[], help="one more srun argument (repeatable)")
    slurm.add_argument("--start-timeout", type=float, default=300.0, help="seconds a pending job may wait")
    slurm.add_argument("--login-address", default="", help="this machine's address as the nodes reach it")
    slurm.add_argument("--engine", choices=("auto", "docker", "podman"), default="auto")
    slurm.add_argument("--content-hash", default="", help="the bundle's content hash the image must carry")
    return p.parse_args(argv)


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


def kernel_user(uid: int, gid: int, groups: list[int], owner: tuple[int, int]) -> tuple[str, list[str]]:
    """(user, supplementary groups) for the container: never root.

    A root invoker (sudo, a root Jupyter in a container) gets the notebook folder's owner,
    or the image's unprivileged user when root owns that too; root's groups never follow."""
    if uid != 0:
        return f"{uid}:{gid}", [str(g) for g in sorted(set(groups)) if g != gid and g != 0]
    if owner[0] != 0:
        return f"{owner[0]}:{owner[1]}", []
    return contract.USER, []


def folder_owner(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_uid, st.st_gid)


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def mount_dirs(workdir: str, cwd: str) -> tuple[list[str], str]:
    """(directories to mount at the same paths, working directory in the container).

    The notebook's directory is the cwd Jupyter starts the kernel in: it is mounted and is
    the working directory, like a local kernel's. The kernelspec's workdir (the bundle's
    files) is mounted too. A cwd that would hide part of the image (Jupyter started from
    `/`, say) is left out, and the kernel starts in the workdir instead.
    """
    cwd = os.path.realpath(cwd)
    base = os.path.realpath(workdir) if workdir else cwd
    hidden = _hidden_by(base)
    if hidden:
        raise LaunchError(
            f"refusing to mount {base} into the kernel: it would hide the image's {hidden}; "
            "start the kernel from your notebook's folder"
        )
    if not os.path.isdir(base):
        raise LaunchError(f"the kernel's working directory {base} does not exist")
    if _inside(cwd, base):
        return [base], cwd
    if _hidden_by(cwd):
        return [base], base
    if _inside(base, cwd):
        return [cwd], cwd  # the notebook's folder holds the workdir: one mount covers both
    return [base, cwd], cwd


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


def _hidden_by(mount: str) -> str:
    """The reserved path that mounting `mount` would cover ("" when none)."""
    prefix = mount.rstrip("/") + "/"
    for reserved in RESERVED:
        if mount == reserved or reserved.startswith(prefix):
            return reserved
    return contract.ROOT if mount.startswith(contract.ROOT + "/") else ""


def banner_environment(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """What the shim's banner names: the bundle and CUDA come from the kernelspec's env
    (spec.banner_env), the image from the launcher's argv. Local and Slurm kernels alike."""
    return {
        "KBUNDLE_BANNER_BUNDLE": environ.get("KBUNDLE_BUNDLE") or args.kernel_name or args.image,
        "KBUNDLE_BANNER_IMAGE": args.image,
        "KBUNDLE_BANNER_CUDA": environ.get("KBUNDLE_CUDA") or "unknown",
    }


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
) -> LaunchPlan:
    """Decide the container's settings (pure, apart from checking that the workdir exists and,
    for a root invoker, who owns the notebook's folder)."""
    if info.get("transport", "tcp") != "tcp":
        raise LaunchError(f"transport {info.get('transport')!r} is not supported; kbundle kernels use tcp")
    ip = str(info.get("ip", "127.0.0.1"))
    if not (ip in LOOPBACK or ip.startswith("127.")):
        raise LaunchError(f"the connection file asks for ip {ip}; kbundle kernels listen on 127.0.0.1 only")
    network = choose_network(args.network, environ, platform)
    mounts, working_dir = mount_dirs(args.workdir, cwd)
    env = {"HOME": "/tmp"}  # the invoking uid has no home in the image; IPython wants a writable one
    pycache = pycache_dir(args.image, environ)
    if pycache:
        env["KBUNDLE_PYCACHE"] = PYCACHE_IN_CONTAINER
    if environ.get("JPY_SESSION_NAME"):
        env["JPY_SESSION_NAME"] = environ["JPY_SESSION_NAME"]  # the notebook path, for __session__
    env.update(banner_environment(args, environ))
    labels = container_labels(args.kernel_name, pid, ppid)
    ports = [int(info[k]) for k in PORT_KEYS] if network == "bridge" else []
    # A local engine on Linux: the host reaches the container's bridge address, so the launcher
    # forwards the ports itself (kernel/forward.py says why); elsewhere the engine publishes them.
    forward, ports = (ports, []) if ports and engine_is_local(environ, platform) else ([], ports)
    user, group_add = kernel_user(uid, gid, groups, owner(working_dir) if uid == 0 else (uid, gid))
    return LaunchPlan(
        name=container_name(args.connection_file),
        image=args.image,
        user=user,
        group_add=group_add,
        mounts=mounts,
        pycache=pycache,
        working_dir=working_dir,
        network=network,
        ports=ports,
        forward=forward,
        environment=env,
        labels=labels,
        gpus=args.gpus or "none",
    )


def _binds(plan: LaunchPlan) -> dict[str, dict[str, str]]:
    binds = {path: {"bind": path, "mode": "rw"} for path in plan.mounts}
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
    from docker.types import DeviceRequest

    gpus = (gpus or "none").strip()
    if gpus == "none":
        return []
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    ids = [g for g in gpus.removeprefix("device=").split(",") if g]
    return [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]


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


def _raw(sock: Any) -> Any:
    """The socket under docker-py's SocketIO wrapper (it is what `sendall` and timeouts need)."""
    return getattr(sock, "_sock", sock)


def watch_parent_death() -> bool:
    """Ask Linux for PARENT_DEATH_SIGNAL when our parent ends (False where that is not possible)."""
    if not sys.platform.startswith("linux"):
        return False  # the getppid() poll alone covers other systems
    try:
        import ctypes  # here: only Linux needs it, and every kernel start pays for imports

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) == 0
    except (ImportError, OSError, AttributeError):  # no ctypes (a stripped or unreadable stdlib): poll only
        return False


def parent_lost(started_with: Optional[int], now: int) -> bool:
    """Whether the parent the launcher started with is gone (pure): we were re-parented."""
    return started_with is not None and orphaned(str(started_with), str(now))


class Launcher:
    """Drives one kernel container from creation to removal."""

    HANDLED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, PARENT_DEATH_SIGNAL}

    def __init__(self, plan: LaunchPlan, payload: bytes, parent: Optional[int] = None):
        self.plan = plan
        self.payload = payload
        self.parent = parent  # the pid that started us; None: do not watch
        self.cid: Optional[str] = None
        self.exit_code: Optional[int] = None
        self.done = threading.Event()
        self.main_ident = threading.get_ident()
        self.api: Any = None
        self.forwarder: Any = None

    def run(self) -> int:
        import docker
        from requests.exceptions import ConnectionError as RequestsConnectionError

        if self.parent is not None:
            watch_parent_death()  # before the container exists: a death from here on is noticed
        try:
            self.api = engine.low_level()
            self._create()
            try:
                sock = self.api.attach_socket(self.cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
                _raw(sock).settimeout(None)
                self.api.start(self.cid)
                waiter = self._register_wait()
                self._forward()
            except BaseException:
                self._discard()
                raise
        except RequestsConnectionError as exc:
            raise LaunchError(f"cannot reach the Docker engine ({exc.__class__.__name__}); is it running?") from None
        except docker.errors.DockerException as exc:
            raise LaunchError(_docker_message(exc, self.plan)) from None
        pump = threading.Thread(target=self._pump, args=(sock,), daemon=True)
        pump.start()
        if self.parent is not None:
            threading.Thread(target=self._poll_parent, daemon=True).start()
        threading.Thread(target=self._wait, args=(waiter,), daemon=True).start()
        try:
            _raw(sock).sendall(self.payload)
        except OSError:
            pass  # the container is already gone; _wait reports why
        self._serve_signals()
        pump.join(timeout=2)
        return self.exit_code if self.exit_code is not None else 1

    def _create(self) -> None:
        import docker

        plan, api = self.plan, self.api
        host_config = api.create_host_config(
            init=True,
            auto_remove=True,
            network_mode="host" if plan.network == "host" else "bridge",
            binds=_binds(plan),
            port_bindings={p: ("127.0.0.1", p) for p in plan.ports} or None,
            device_requests=device_requests(plan.gpus) or None,
            group_add=plan.group_add or None,
            cap_drop=plan.cap_drop,
            security_opt=plan.security_opt,
        )
        kwargs = dict(
            image=plan.image,
            command=plan.command,
            name=plan.name,
            user=plan.user,
            stdin_open=True,
            detach=False,
            tty=False,  # detach=False makes StdinOnce: our EOF is the kernel's
            working_dir=plan.working_dir,
            environment=plan.environment,
            labels=plan.labels,
            host_config=host_config,
            ports=plan.ports or None,
        )
        deadline = time.monotonic() + REPLACE_WAIT_S
        while True:
            try:
                self.cid = api.create_container(**kwargs)["Id"]
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 409 or time.monotonic() > deadline:
                    raise
            # The same kernel's container from before a restart is still there (or being
            # auto-removed): replace it.
            try:
                api.remove_container(plan.name, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: removal already in progress
                    raise
                time.sleep(0.05)

    def _forward(self) -> None:
        """Hold the kernel's ports on 127.0.0.1 and join them to the container (kernel/forward.py)."""
        if not self.plan.forward:
            return
        from kbundle.kernel.forward import Forwarder, ForwardError

        address = self.api.inspect_container(self.cid)["NetworkSettings"].get("IPAddress") or ""
        if not address:
            raise LaunchError("the kernel's container got no bridge address")
        self.forwarder = Forwarder(self.plan.forward, address, alive=lambda: not self.done.is_set())
        try:
            self.forwarder.start()
        except ForwardError as exc:
            raise LaunchError(str(exc)) from None

    def _discard(self) -> None:
        """Remove a container that never got going (auto-remove covers only containers that ran)."""
        try:
            self.api.remove_container(self.cid, force=True)
        except Exception:
            pass  # gone already, or the engine is unreachable: `kbundle gc` finds it by its labels

    def _register_wait(self) -> Any:
        """Start `wait?condition=not-running` and return once the engine has registered it.

        The engine sends the response headers as soon as the wait is in place (API >= 1.30)
        and the body when the container stops, so nothing can slip in between.
        """
        url = self.api._url("/containers/{0}/wait", self.cid)
        response = self.api.post(url, params={"condition": "not-running"}, stream=True, timeout=None)
        self.api._raise_for_status(response)
        return response

    def _wait(self, response: Any) -> None:
        try:
            result = response.json()
            self.exit_code = int(result.get("StatusCode", 1))
            error = (result.get("Error") or {}).get("Message")
            if error:
                sys.stderr.write(f"kbundle-kernel: {error}\n")
        except Exception as exc:  # the engine went away: nothing left to drive
            sys.stderr.write(f"kbundle-kernel: lost the engine while waiting: {exc}\n")
            self.exit_code = 1
        finally:
            self.done.set()
            signal.pthread_kill(self.main_ident, signal.SIGUSR1)

    def _pump(self, sock: Any) -> None:
        """Copy the container's stdout/stderr (the kernel's logs) to ours."""
        from docker.utils.socket import frames_iter

        outs = {1: sys.stdout.buffer, 2: sys.stderr.buffer}
        try:
            for stream, data in frames_iter(_raw(sock), tty=False):
                out = outs.get(stream, sys.stderr.buffer)
                try:
                    out.write(data)
                    out.flush()
                except OSError:
                    pass  # nobody reads our output any more; keep draining
        except OSError:
            pass

    def _serve_signals(self) -> None:
        stopping = False
        while not self.done.is_set():
            sig = signal.sigwait(self.HANDLED)
            if self.done.is_set():
                break
            if sig == signal.SIGINT:
                self._call(self.api.kill, self.cid, signal="SIGINT")
            elif sig in (signal.SIGTERM, signal.SIGHUP):
                if stopping:  # asked twice: no more grace
                    self._call(self.api.kill, self.cid, signal="SIGKILL")
                else:
                    stopping = self._stop()
            elif sig == PARENT_DEATH_SIGNAL and not stopping and parent_lost(self.parent, os.getppid()):
                sys.stderr.write(f"kbundle-kernel: the process that started this kernel (pid {self.parent}) is gone\n")
                stopping = self._stop()

    def _poll_parent(self) -> None:
        """Where the parent-death signal is missing or was too late (the parent died before we
        asked for it), notice the new parent ourselves; the signal loop decides."""
        while not self.done.wait(PARENT_POLL_S):
            if parent_lost(self.parent, os.getppid()):
                signal.pthread_kill(self.main_ident, PARENT_DEATH_SIGNAL)
                return

    def _stop(self) -> bool:
        """Stop the container in the background (SIGTERM, SIGKILL after the grace); the waiter sees it end."""
        threading.Thread(
            target=self._call, args=(self.api.stop, self.cid), kwargs={"timeout": STOP_GRACE_S}, daemon=True
        ).start()
        return True

    @staticmethod
    def _call(fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # e.g. the container ended meanwhile: the waiter will tell
            sys.stderr.write(f"kbundle-kernel: {exc}\n")


def _docker_message(exc: Exception, plan: LaunchPlan) -> str:
    import docker

    text = str(getattr(exc, "explanation", None) or exc)
    if isinstance(exc, docker.errors.ImageNotFound) or "No such image" in text:
        return f"the kernel's image {plan.image} is missing; run `kbundle run` on the bundle again to rebuild it"
    if "could not select device driver" in text:
        return (
            "this kernel asks for GPUs but the Docker engine has no NVIDIA runtime; install the NVIDIA "
            "Container Toolkit or re-register the kernel with `kbundle run --gpus none`"
        )
    if "permission denied" in text.lower() and "docker.sock" in text:
        return "permission denied on the Docker socket; add yourself to the `docker` group"
    return f"Docker refused to run the kernel: {text}"


def main(argv: Optional[list[str]] = None) -> None:
    # Signals are taken synchronously by the main thread (sigwait); block them before
    # anything else so that an early SIGINT is not a traceback. Threads inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, Launcher.HANDLED)
    parent = os.getppid()  # first thing: the later we look, the likelier it is already PID 1
    args = parse_args(argv)
    try:
        info = read_connection_file(args.connection_file)
        if args.slurm:
            _exit(_launch_slurm(args, info, parent))
        plan = plan_launch(
            args,
            info,
            cwd=os.getcwd(),
            uid=os.getuid(),
            gid=os.getgid(),
            groups=os.getgroups(),
            pid=os.getpid(),
            environ=dict(os.environ),
            platform=sys.platform,
            ppid=parent,
        )
        plan = prepare_pycache(plan)
        code = Launcher(plan, kernel_connection(info, plan.network), parent).run()
    except LaunchError as exc:
        sys.stderr.write(f"error: {exc}\n")
        code = 1
    _exit(code)


def _launch_slurm(args: argparse.Namespace, info: dict[str, Any], parent: int) -> int:
    from kbundle.kernel.slurm import SlurmError, launch

    try:
        return launch(args, info, parent=parent)
    except SlurmError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
