"""`kbundle-kernel`: the process a kbundle kernelspec starts. It runs ipykernel in a container.

    kbundle-kernel --image IMAGE [--workdir DIR] [--gpus none|all|0,1] [--kernel-name NAME]
                   [--network host|bridge] [--docker-host URL] -f CONNECTION_FILE

One foreground process per kernel, talking to the engine's API itself (no `docker` CLI
child), so that Jupyter's signals land on a process that understands them. A local engine's
unix socket gets the launcher's own small client (kernel/engine_http.py); TCP/SSH engines,
GPU kernels and rootless engines get docker-py (kernel/engine_sdk.py):

- The container is named from the connection file (a restart replaces it), runs with an
  init process and auto-removes. It runs as the invoking uid:gid (plus supplementary
  groups), never as root: a root invoker gets the owner of the notebook's folder, or the
  image's unprivileged user when that is root too. No capabilities, no new privileges
  (setuid binaries do not raise it), so a notebook cannot sniff traffic or become root; the
  rest of the lockdown is image/policy.py's. The notebook's own folder and the kernelspec's
  workdir are mounted at the same paths, unless kernel/launch_mounts.py leaves one out (a
  home, a folder with dotfiles, Jupyter's or kbundle's own folders; `.git` goes read-only),
  and the banner says what was mounted.
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
- The engine: the one the kernelspec names (`--docker-host`, DOCKER_HOST when `kbundle run`
  registered the kernel), else DOCKER_HOST. A Jupyter started from a desktop launcher, without
  the variable, still reaches the engine (Podman's socket, a rootless one) that holds the image.
- GPUs: `--gpus` becomes the engine's device request, with the capabilities CUDA needs
  (`device_requests`); the banner names the device nodes the container got, and says so when
  GPUs were asked for and none arrived.
- `JPY_PARENT_PID` is not forwarded: under tini the kernel's parent is PID 1, which
  ipykernel's parent poller reads as "orphaned" and exits.

Environments installed without .pyc files (rattler does not byte-compile) would be
compiled at every kernel start, about a second for ipykernel alone. For those, the shim
points `sys.pycache_prefix` at a per-image directory in the user's kbundle cache
(mounted at PYCACHE_IN_CONTAINER), so only the first start per image pays.
`KBUNDLE_KERNEL_PYCACHE=0` turns this off.

Containers carry labels (kernel/labels.py: the launcher's pid, its start time and the
host) so that `kbundle gc` can find leftovers whose launcher is gone.

Where a kernel's start goes (bench/bench_kernel.py's byte-compiled env on a quiet 2-core VM,
Docker 20.10, from `start_kernel` to ready, about 0.65 s against a native ipykernel's 0.45 s):
this process starts and imports in about 50 ms, the engine creates the container in about
10 ms and starts it in about 175 ms (on a bridge most of that is the container's network
namespace; host networking starts in about 70 ms), the container's python imports ipykernel
in about 130 ms and listens 15 ms later, the kernel_info reply follows about 70 ms after that,
and jupyter_client then waits 0.2 s for IOPub to fall quiet, as it does for a native kernel.
Kept off that path: docker-py's import (about 50 ms, hence kernel/engine_http.py), refused
first connections (the ports are held before the first engine call, kernel/forward.py), the
shim's wait for the connection info (ipykernel is imported first) and, on an environment
without .pyc, compiling the shim's own imports at every start (the bytecode cache is chosen
first).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any, Optional

from kbundle.image import engine
from kbundle.kernel.engine_http import EngineError, UnixEngine, Unreachable, frames, socket_path

# The plan and the lifecycle live in their own modules (the Slurm launcher shares them); their
# names stay importable from here, the launcher's public face.
from kbundle.kernel.launch_lifecycle import (  # noqa: F401
    HANDLED,
    PARENT_DEATH_SIGNAL,
    PARENT_POLL_S,
    PR_SET_PDEATHSIG,
    STOP_GRACE_S,
    parent_lost,
    watch_parent_death,
)
from kbundle.kernel.launch_plan import (  # noqa: F401
    LOOPBACK,
    NAME_PREFIX,
    PORT_KEYS,
    PYCACHE_IMAGE_FILE,
    PYCACHE_IN_CONTAINER,
    LaunchError,
    LaunchPlan,
    _binds,
    banner_environment,
    banner_notes,
    choose_network,
    container_name,
    device_requests,
    engine_is_local,
    folder_owner,
    kernel_connection,
    kernel_mounts,
    kernel_user,
    plan_launch,
    prepare_pycache,
    pycache_dir,
    read_connection_file,
)

REPLACE_WAIT_S = 10  # how long a restart waits for the previous container to go


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kbundle-kernel", description="Run a Jupyter kernel inside a kbundle image.")
    p.add_argument("-f", "--connection-file", required=True)
    # Every kernel runs an image, except a native Slurm kernel (--slurm --native PREFIX): checked below.
    p.add_argument("--image", default="")
    p.add_argument(
        "--workdir",
        default="",
        help="the bundle's working folder, mounted into the kernel when safe (kernel/launch_mounts.py)",
    )
    p.add_argument("--gpus", default="none", help="none, all, or comma-separated device ids")
    p.add_argument("--kernel-name", default="")
    p.add_argument("--network", choices=("auto", "host", "bridge"), default="auto")
    p.add_argument(
        "--docker-host",
        default="",
        help="the engine the kernel's image lives on (DOCKER_HOST when it was registered); default: DOCKER_HOST",
    )
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
    slurm.add_argument("--native", default="", help="no image: the prefix on a shared file system the node runs")
    slurm.add_argument(
        "--activate", action="append", default=[], help="KEY=VALUE of the prefix's activation (repeatable)"
    )
    args = p.parse_args(argv)
    if not args.image and not (args.slurm and args.native):
        p.error("the following arguments are required: --image")
    return args


class Launcher:
    """Drives one kernel container from creation to removal."""

    HANDLED = HANDLED

    def __init__(self, plan: LaunchPlan, payload: bytes, parent: Optional[int] = None):
        self.plan = plan
        self.payload = payload
        self.parent = parent  # the pid that started us; None: do not watch
        self.cid: Optional[str] = None
        self.exit_code: Optional[int] = None
        self.done = threading.Event()
        self.main_ident = threading.get_ident()
        self.engine: Any = None
        self.forwarder: Any = None

    def run(self) -> int:
        if self.parent is not None:
            watch_parent_death()  # before the container exists: a death from here on is noticed
        self._hold_ports()
        try:
            self.engine = engine_for(self.plan, os.environ.get("DOCKER_HOST", ""))
            self._create()
            try:
                sock, pending = self.engine.attach(self.cid)
                self.engine.start(self.cid)
                waiter = self.engine.wait(self.cid)
                self._send_payload(sock)
                self._route()
            except BaseException:
                self._discard()
                raise
        except Unreachable as exc:
            raise LaunchError(_unreachable_message(exc, engine.docker_host())) from None
        except EngineError as exc:
            raise LaunchError(_docker_message(exc, self.plan)) from None
        pump = threading.Thread(target=self._pump, args=(sock, pending), daemon=True)
        pump.start()
        if self.parent is not None:
            threading.Thread(target=self._poll_parent, daemon=True).start()
        threading.Thread(target=self._wait, args=(waiter,), daemon=True).start()
        self._serve_signals()
        pump.join(timeout=2)
        return self.exit_code if self.exit_code is not None else 1

    def _create(self) -> None:
        deadline = time.monotonic() + REPLACE_WAIT_S
        while True:
            try:
                self.cid = self.engine.create(self.plan, _binds(self.plan))
                return
            except EngineError as exc:
                taken = exc.status == 409 or "already in use" in exc.explanation
                if not taken or time.monotonic() > deadline:
                    raise
            # The same kernel's container from before a restart is still there (or being
            # auto-removed): replace it.
            try:
                self.engine.remove(self.plan.name, force=True)
            except EngineError as exc:
                if exc.status == 409:  # removal already in progress
                    time.sleep(0.05)
                elif exc.status != 404:
                    raise

    def _hold_ports(self) -> None:
        """Hold the kernel's ports on 127.0.0.1 before any engine call (kernel/forward.py): Jupyter's
        first connections then land at once and wait there for the kernel, instead of being refused
        and retried on ZeroMQ's 100 ms reconnect interval."""
        if not self.plan.forward:
            return
        from kbundle.kernel.forward import Forwarder, ForwardError

        self.forwarder = Forwarder(self.plan.forward, None, alive=lambda: not self.done.is_set())
        try:
            self.forwarder.start()
        except ForwardError as exc:
            raise LaunchError(str(exc)) from None

    def _route(self) -> None:
        """Join the held ports to the container's bridge address, now that it has one."""
        if self.forwarder is None:
            return
        address = self.engine.address(self.cid)
        if not address:
            raise LaunchError("the kernel's container got no bridge address")
        self.forwarder.route(address, {p: p for p in self.plan.forward})

    def _send_payload(self, sock: Any) -> None:
        """The connection info, key and all, through stdin (never argv, environment or labels)."""
        try:
            sock.sendall(self.payload)
        except OSError:
            pass  # the container is already gone; _wait reports why

    def _discard(self) -> None:
        """Remove a container that never got going (auto-remove covers only containers that ran)."""
        if self.cid is None:
            return
        try:
            self.engine.remove(self.cid, force=True)
        except Exception:
            pass  # gone already, or the engine is unreachable: `kbundle gc` finds it by its labels

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

    def _pump(self, sock: Any, pending: bytes) -> None:
        """Copy the container's stdout/stderr (the kernel's logs) to ours."""
        outs = {1: sys.stdout.buffer, 2: sys.stderr.buffer}
        try:
            for stream, data in frames(pending, lambda: sock.recv(65536)):
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
                self._call(self.engine.kill, self.cid, "SIGINT")
            elif sig in (signal.SIGTERM, signal.SIGHUP):
                if stopping:  # asked twice: no more grace
                    self._call(self.engine.kill, self.cid, "SIGKILL")
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
        threading.Thread(target=self._call, args=(self.engine.stop, self.cid, STOP_GRACE_S), daemon=True).start()
        return True

    @staticmethod
    def _call(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # e.g. the container ended meanwhile: the waiter will tell
            sys.stderr.write(f"kbundle-kernel: {exc}\n")


def engine_for(plan: LaunchPlan, docker_host: str) -> Any:
    """The launcher's own unix-socket client for a local engine (kernel/engine_http.py says why),
    docker-py for the rest: TCP/SSH engines, GPU kernels (Podman's libpod path), rootless engines."""
    path = socket_path(docker_host)
    if path and plan.gpus == "none" and not plan.rootless:
        return UnixEngine(path)
    from kbundle.kernel.engine_sdk import SdkEngine

    return SdkEngine()


def _unreachable_message(exc: Unreachable, where: str) -> str:
    cause = exc.cause
    if isinstance(cause, PermissionError):
        return f"permission denied on the Docker socket {where}; add yourself to the `docker` group"
    return f"cannot reach the Docker engine at {where} ({cause.__class__.__name__}); is it running?"


def _docker_message(exc: Exception, plan: LaunchPlan) -> str:
    text = str(getattr(exc, "explanation", None) or exc)
    if getattr(exc, "image_missing", False) or "No such image" in text:
        return f"the kernel's image {plan.image} is missing; run `kbundle run` on the bundle again to rebuild it"
    if "unresolvable CDI devices" in text:
        return (
            f"this kernel asks for GPUs ({plan.gpus}) but Podman has no CDI spec for them: make NVIDIA's with "
            "`sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`, or re-register the kernel with "
            "`kbundle run --gpus none`"
        )
    if plan.rootless and "error creating device nodes" in text:
        from kbundle.kernel.podman import device_node_message

        return device_node_message(plan.gpus)
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
        if args.docker_host:  # the kernelspec's engine wins over whatever Jupyter was started with
            os.environ["DOCKER_HOST"] = args.docker_host
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
