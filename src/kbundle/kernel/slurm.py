"""`kbundle-kernel --slurm`: a kernel that runs on a Slurm compute node, driven from the login node.

    kbundle-kernel --slurm --image REF@sha256:… [--partition P] [--gres gpu:1] [--time T]
                   [--account A] [--slurm-arg ARG …] [--start-timeout S]
                   [--login-address ADDR] [--engine auto|docker|podman] -f CONNECTION_FILE
    kbundle-kernel --slurm --native PREFIX [--activate KEY=VALUE …] [the same job options] -f …

(`--native`: `run --native --slurm` put the environment in PREFIX, on a file system the nodes
share; the agent runs its python and ipykernel directly, with no container engine on the node.)

Jupyter starts this on the login node (or JupyterHub's single-user server) like any
kernel. It:

- holds the connection file's five ports on 127.0.0.1 at once (kernel/forward.py), so the
  Jupyter side never leaves loopback and a client that connects early simply waits;
- submits one job step with `srun` (its own session: Jupyter's interrupt, sent to this
  process group, must not reach srun, which would take two as "kill the job"), running
  kernel/node_agent.py with the node's python3. `srun` gets the parent-death signal
  SIGTERM, and its stdin is our pipe: if this launcher dies, even by SIGKILL, the step's
  stdin ends and the agent stops the kernel, so no GPU stays allocated;
- sends the agent one JSON line on that stdin with the connection info and its key: the
  key is never in srun's argv, the job's environment or `scontrol show job`;
- while the job is pending, says on stderr what the queue says (`squeue`); past
  --start-timeout it cancels the job and gives up with one line;
- once the agent says where the kernel listens (the node's address on the route to the
  login node, and its ports), routes the held ports there;
- turns SIGINT into an `INT` line (the agent signals the kernel), SIGTERM/SIGHUP or the
  loss of its parent into EOF on the step's stdin, then SIGTERM to srun, then `scancel`;
- exits when srun does: a job cancelled with `scancel` is a kernel that died, and the
  client is told so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kbundle import contract
from kbundle.image import policy
from kbundle.kernel import launch_lifecycle as lifecycle
from kbundle.kernel.labels import container_labels
from kbundle.kernel.launch_plan import PORT_KEYS
from kbundle.kernel.node_agent import ERROR, READY  # the node agent's protocol: defined there, once
from kbundle.kernel.shim import SHIM

JOB_PREFIX = "kbundle-"
QUEUE_POLL_S = 2.0  # how often a pending start asks squeue
QUEUE_SAY_EVERY_S = 30.0  # an unchanged queue state is repeated this often
STOP_GRACE_S = 3.0  # EOF first; then SIGTERM to srun; then scancel
DEFAULT_START_TIMEOUT_S = 300.0


class SlurmError(Exception):
    """A problem the launcher reports as one `error:` line before exiting 1."""


@dataclass(frozen=True)
class SlurmOptions:
    """What the kernelspec says about the job (recorded by `kbundle run --slurm`)."""

    partition: str = ""
    gres: str = ""
    time: str = ""
    account: str = ""
    extra: tuple[str, ...] = ()
    start_timeout: float = DEFAULT_START_TIMEOUT_S
    login_address: str = "127.0.0.1"
    engine: str = "auto"

    def argv(self) -> list[str]:
        """The launcher's own arguments that record these options in a kernelspec."""
        args = ["--slurm"]
        for flag, value in (
            ("--partition", self.partition),
            ("--gres", self.gres),
            ("--time", self.time),
            ("--account", self.account),
        ):
            if value:
                args += [flag, value]
        for extra in self.extra:
            args.append(f"--slurm-arg={extra}")
        args += ["--start-timeout", f"{self.start_timeout:g}", "--login-address", self.login_address]
        if self.engine != "auto":
            args += ["--engine", self.engine]
        return args


def job_name(connection_file: str) -> str:
    """One job name per kernel (a restart's new job replaces the old one's name): for squeue and scancel."""
    return JOB_PREFIX + hashlib.sha256(os.path.abspath(connection_file).encode()).hexdigest()[:16]


def srun_argv(options: SlurmOptions, name: str, script: str) -> list[str]:
    """srun's argv (pure). No secret: the connection key goes through the step's stdin."""
    argv = ["srun", f"--job-name={name}", "--nodes=1", "--ntasks=1", "--input=all", "--kill-on-bad-exit=1"]
    for flag, value in (
        ("--partition", options.partition),
        ("--gres", options.gres),
        ("--time", options.time),
        ("--account", options.account),
    ):
        if value:
            argv.append(f"{flag}={value}")
    argv += list(options.extra)
    return argv + ["python3", "-u", "-c", script]


def node_request(
    image: str, content_hash: str, info: dict[str, Any], options: SlurmOptions, environment=None, **more: Any
) -> bytes:
    """The agent's first stdin line (it holds the key: written to the pipe, never logged).

    The container's lockdown and environment come from image/policy.py (`policy`: the agent
    renders it as flags, kernel/node_agent.py `policy_flags`); on the node the kernel shares the
    host's network (the agent's docstring says why)."""
    request = {
        "image": image,
        "content_hash": content_hash,
        "label": contract.LABEL_CONTENT_HASH,
        "login": options.login_address,
        "engine": options.engine,
        "shim": SHIM,
        "fallback_user": contract.USER,
        "policy": policy.kernel("host").request({"HOME": "/tmp", **(environment or {})}),
        "connection": {k: v for k, v in info.items() if k != "ip"},
        **more,
    }
    return (json.dumps(request, separators=(",", ":")) + "\n").encode()


def parse_ready(line: str) -> Optional[tuple[str, dict[str, int]]]:
    """(address, ports) from the agent's READY line; None for any other line (pure)."""
    if not line.startswith(READY):
        return None
    data = json.loads(line[len(READY) :])
    ports = {str(k): int(v) for k, v in data["ports"].items()}
    return str(data["address"]), ports


def queue_state(output: str) -> str:
    """`squeue -h -o "%i %T %r"` output as one phrase: "job 42 PENDING (Resources)" (pure)."""
    for line in output.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            reason = parts[2].strip() if len(parts) == 3 else ""
            return f"job {parts[0]} {parts[1]}" + (f" ({reason})" if reason and reason != "None" else "")
    return "not in the queue yet"


def controller_host(show_config: str) -> str:
    """The first SlurmctldHost from `scontrol show config` (its address when given): `host(addr)` → addr."""
    for line in show_config.splitlines():
        match = re.match(r"^\s*SlurmctldHost\[0\]\s*=\s*([^\s(]+)(?:\(([^)]+)\))?", line)
        if match:
            return match.group(2) or match.group(1)
    return ""


def login_address(environ: dict[str, str]) -> str:
    """This machine's address that compute nodes can reach: the one on its route to slurmctld.

    Compute nodes talk to the controller, so the login node's interface towards it is the
    cluster network. Loopback when nothing better is known (a single-node cluster)."""
    import socket

    if environ.get("KBUNDLE_SLURM_LOGIN_ADDRESS"):
        return environ["KBUNDLE_SLURM_LOGIN_ADDRESS"]
    try:
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=10).stdout
        host = controller_host(shown)
        peer = socket.gethostbyname(host) if host else ""
    except (OSError, subprocess.SubprocessError):
        peer = ""
    if not peer or peer.startswith("127."):
        return "127.0.0.1"
    from kbundle.kernel.node_agent import NodeError, route_source  # the node finds its side the same way

    try:
        return route_source(peer)
    except NodeError:
        return "127.0.0.1"


def agent_script() -> str:
    return (Path(__file__).with_name("node_agent.py")).read_text(encoding="utf-8")


@dataclass
class SlurmLauncher:
    """Drives one Slurm job step from submission to its end."""

    options: SlurmOptions
    name: str
    request: bytes
    ports: list[int]
    parent: Optional[int] = None
    proc: Any = None
    forwarder: Any = None
    ready: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)  # READY, or srun ended
    failed: list[str] = field(default_factory=list)
    main_ident: int = field(default_factory=threading.get_ident)
    reader: Any = None

    HANDLED = tuple(lifecycle.HANDLED)  # the signals kbundle-kernel's main() blocks before it dispatches here

    def run(self) -> int:
        from kbundle.kernel.forward import Forwarder, ForwardError

        self.forwarder = Forwarder(self.ports, None, alive=lambda: self.proc is None or self.proc.poll() is None)
        try:
            self.forwarder.start()
        except ForwardError as exc:
            raise SlurmError(str(exc)) from None
        self._submit()
        self.reader = threading.Thread(target=self._read_stdout, daemon=True)
        self.reader.start()
        threading.Thread(target=self._reap, daemon=True).start()
        if self.parent is not None:
            threading.Thread(target=self._poll_parent, daemon=True).start()
        if not self._await_start():
            return 1
        asked = self._serve_signals()
        code = self.proc.wait()
        if not asked and code != 0:  # scancel, a time limit, a node failure: say why the kernel died
            sys.stderr.write(f"kbundle-kernel: the Slurm job step ended ({self._ended(code)}); the kernel is gone\n")
        return code

    def _submit(self) -> None:
        handled = self.HANDLED

        def child_setup() -> None:  # in the child, before exec: srun dies with us
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)  # our blocked signals are not srun's
            lifecycle.die_with_parent(signal.SIGTERM)

        argv = srun_argv(self.options, self.name, agent_script())
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=child_setup,
                restore_signals=True,
            )
        except OSError as exc:
            raise SlurmError(f"cannot run srun: {exc.strerror}; is this a Slurm login node?") from None
        try:
            self.proc.stdin.write(self.request)
            self.proc.stdin.flush()
        except OSError:
            pass  # srun ended at once: _await_start reports its exit

    def _read_stdout(self) -> None:
        """The agent's READY or ERROR line; anything else is the node's output, passed on."""
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not self.ready.is_set():
                found = parse_ready(line)
                if found:
                    address, ports = found
                    self.forwarder.route(address, {int(self._wanted(k)): p for k, p in ports.items()})
                    self.ready.set()
                    self.wake.set()
                    continue
                if line.startswith(ERROR):
                    self.failed.append(line[len(ERROR) :])
                    continue
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def _wanted(self, key: str) -> int:
        return self.ports[PORT_KEYS.index(key)]

    def _reap(self) -> None:
        self.proc.wait()
        self.wake.set()
        signal.pthread_kill(self.main_ident, signal.SIGUSR1)

    def _await_start(self) -> bool:
        """Wait for the agent's READY, telling the queue's state; False when the start failed."""
        started = time.monotonic()
        said, said_at = "", 0.0
        while not self.ready.is_set():
            if self.wake.wait(QUEUE_POLL_S) and self.ready.is_set():
                break
            if self.proc.poll() is not None:
                self.reader.join(timeout=2)  # the agent's ERROR line may still be in the pipe
                reason = self.failed[0] if self.failed else f"srun exited with status {self.proc.returncode}"
                sys.stderr.write(f"error: the Slurm kernel did not start: {reason}\n")
                return False
            waited = time.monotonic() - started
            if waited > self.options.start_timeout:
                state = self._queue()
                sys.stderr.write(
                    f"error: the Slurm job did not start within {self.options.start_timeout:g} s "
                    f"({state}); cancelled it. Try another --partition or a longer --start-timeout\n"
                )
                self._cancel()
                return False
            state = self._queue()
            if state != said or time.monotonic() - said_at > QUEUE_SAY_EVERY_S:
                sys.stderr.write(f"kbundle-kernel: Slurm {state}; waited {waited:.0f} s\n")
                sys.stderr.flush()
                said, said_at = state, time.monotonic()
        return True

    def _queue(self) -> str:
        try:
            shown = subprocess.run(
                ["squeue", "--noheader", f"--name={self.name}", "--format=%i %T %r"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return queue_state(shown.stdout)
        except (OSError, subprocess.SubprocessError):
            return "state unknown (squeue failed)"

    @staticmethod
    def _ended(code: int) -> str:
        return "cancelled" if code in (128 + signal.SIGTERM, 128 + signal.SIGKILL) else f"exit status {code}"

    def _serve_signals(self) -> bool:
        """Until srun ends; whether we asked it to end."""
        stopping = False
        while self.proc.poll() is None:
            sig = signal.sigwait(self.HANDLED)
            if self.proc.poll() is not None:
                break
            if sig == signal.SIGINT:
                self._tell(b"INT\n")
            elif sig in (signal.SIGTERM, signal.SIGHUP) or (sig == lifecycle.PARENT_DEATH_SIGNAL and self._orphaned()):
                if not stopping:
                    stopping = True
                    threading.Thread(target=self._stop, daemon=True).start()
        return stopping

    def _orphaned(self) -> bool:
        return lifecycle.parent_lost(self.parent, os.getppid())

    def _poll_parent(self) -> None:
        while self.proc is None or self.proc.poll() is None:
            time.sleep(lifecycle.PARENT_POLL_S)
            if self._orphaned():
                signal.pthread_kill(self.main_ident, lifecycle.PARENT_DEATH_SIGNAL)
                return

    def _tell(self, line: bytes) -> None:
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def _stop(self) -> None:
        """EOF (the agent stops the kernel), then SIGTERM to srun (it ends the step), then scancel."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        for step in (lambda: self.proc.send_signal(signal.SIGTERM), self._cancel):
            try:
                self.proc.wait(STOP_GRACE_S)
                return
            except subprocess.TimeoutExpired:
                step()

    def _cancel(self) -> None:
        try:
            subprocess.run(["scancel", f"--name={self.name}"], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()


def launch(args: Any, info: dict[str, Any], *, parent: Optional[int]) -> int:
    """Run a Slurm kernel for the launcher's parsed `args` and connection `info`."""
    from kbundle.kernel.launch_plan import (
        LOOPBACK,
        LaunchError,
        banner_environment,
        banner_notes,
        folder_owner,
        kernel_mounts,
        kernel_user,
    )

    ip = str(info.get("ip", "127.0.0.1"))
    if not (ip in LOOPBACK or ip.startswith("127.")):
        raise SlurmError(f"the connection file asks for ip {ip}; kbundle kernels listen on 127.0.0.1 only")
    native = getattr(args, "native", "")
    if not native and "@sha256:" not in args.image:
        raise SlurmError(f"a Slurm kernel needs its image by digest (REF@sha256:…), not {args.image}")
    options = SlurmOptions(
        partition=args.partition or "",
        gres=args.gres or "",
        time=args.time or "",
        account=args.account or "",
        extra=tuple(args.slurm_arg or ()),
        start_timeout=float(args.start_timeout),
        login_address=args.login_address or login_address(dict(os.environ)),
        engine=args.engine or "auto",
    )
    if native:  # no container, so no mounts and no user to choose: the prefix runs as the job's user
        name = job_name(args.connection_file)
        request = native_request(args, info, options, name)
        return SlurmLauncher(options, name, request, [int(info[k]) for k in PORT_KEYS], parent=parent).run()
    environ = dict(os.environ)
    try:
        mounts = kernel_mounts(args.workdir, os.getcwd(), environ, os.getuid())
    except LaunchError as exc:
        raise SlurmError(str(exc)) from None
    # The step runs as this user on the node (a cluster shares uids and the notebook's file system),
    # so image/policy.py's user rule is applied here, once, with the same answer as a local kernel's.
    owner = folder_owner(mounts.working_dir) if mounts.writable else (0, 0)
    user, group_add = kernel_user(os.getuid(), os.getgid(), os.getgroups(), owner)
    name = job_name(args.connection_file)
    request = node_request(
        args.image,
        args.content_hash or "",
        info,
        options,
        name=name,
        mounts=mounts.writable,
        readonly=mounts.readonly,
        working_dir=mounts.working_dir,
        user=user,
        group_add=group_add,
        labels=container_labels(args.kernel_name, os.getpid(), parent),
        environment={**banner_environment(args, environ), **banner_notes(mounts.notes, "node")},
    )
    launcher = SlurmLauncher(options, name, request, [int(info[k]) for k in PORT_KEYS], parent=parent)
    return launcher.run()


def parse_activation(pairs: list[str]) -> dict[str, str]:
    """The kernelspec's `--activate KEY=VALUE` arguments as a dict (pure)."""
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise SlurmError(f"--activate {pair!r}: give KEY=VALUE")
        found[key] = value
    return found


def native_request(args: Any, info: dict[str, Any], options: SlurmOptions, name: str) -> bytes:
    """The agent's first stdin line for a native kernel (`run --native --slurm`): the prefix and its
    activation instead of an image. It holds the key, as `node_request`'s does."""
    from kbundle.kernel.launch_plan import banner_environment, banner_notes

    if not os.path.isabs(args.native):
        raise SlurmError(f"--native needs an absolute prefix, not {args.native}")
    note = f"no container: the environment {args.native}, run on the node as you"
    environment = {**banner_environment(args, dict(os.environ)), **banner_notes([note], "node")}
    environment["KBUNDLE_BANNER_IMAGE"] = "native " + args.native  # the banner's "image": what runs
    request = {
        "native": args.native,
        "activation": parse_activation(list(args.activate or ())),
        "environment": environment,
        "login": options.login_address,
        "shim": SHIM,
        "name": name,
        "working_dir": os.path.abspath(args.workdir) if args.workdir else "",
        "connection": {k: v for k, v in info.items() if k != "ip"},
    }
    return (json.dumps(request, separators=(",", ":")) + "\n").encode()
