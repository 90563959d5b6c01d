"""The part of a Slurm kernel that runs on the compute node, inside the job step.

kernel/slurm.py (on the login node) starts it as `srun … python3 -c <this file's text>`:
compute nodes need a python3 and a container engine, not kbundle. It must therefore
stay standard-library only and run on the oldest python3 a cluster may have (3.6).

Its stdin is the launcher's pipe through `srun`:

1. the first line is a JSON object: the image (by digest), the content hash its labels
   must carry, the login node's address, the engine to use, the mounts, the shim, and
   the kernel's connection info with its HMAC key. The key is never in argv or in the
   job's environment, so neither `ps` on the node nor `scontrol show job` shows it.
2. every later line is a command: `INT` interrupts the kernel.
3. EOF means the launcher is gone (even by SIGKILL): the kernel is stopped.

On stdout it says, once, `KBUNDLE-NODE-READY {"address": …, "ports": {…}}`: where the
kernel listens, for the launcher's forwarder; or `KBUNDLE-NODE-ERROR <message>` before
it gives up. Everything else it or the container prints goes to stderr.

The kernel runs with the host's network, bound to the one address of this node that
routes to the login node: ports cannot be published on loopback when the client is on
another machine, and a bridge's proxy would accept the forwarder's connections before the
kernel listens. Like a local kernel it runs locked down, as the request's `policy` says
(kbundle's image/policy.py, sent by the launcher; `policy_flags` renders it for docker or
podman), as the request's `user` (the launcher applied kbundle's one user rule: never root),
with an init that forwards SIGINT, removed when it ends. A request without a policy gets the
strictest rendering (fail closed); a root user is refused.

A request with `native` (`kbundle run --native --slurm`) names a conda prefix on a file system
the nodes share instead of an image: `NativeAgent` runs the same shim with that prefix's own
python, no container engine needed, after checking that the node sees the prefix. The kernel
runs as the job's user, with the prefix's `activation` (PATH, CONDA_PREFIX, LD_LIBRARY_PATH),
in its own session so that its leftover children are ended with it, and with a private TMPDIR
(where the shim writes the key) removed when it ends, as a container's /tmp goes with it.
"""

import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading

READY = "KBUNDLE-NODE-READY "
ERROR = "KBUNDLE-NODE-ERROR "
PORT_KEYS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
STOP_GRACE_S = 1


class NodeError(Exception):
    pass


def route_source(peer):
    """This node's address on the route to `peer` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.connect((peer, 9))
        return probe.getsockname()[0]
    except OSError as exc:
        raise NodeError(f"no route from this node to the login node {peer}: {exc.strerror}") from None
    finally:
        probe.close()


def free_ports(address, wanted):
    """The ports the kernel will bind on `address`: the wanted ones where free, others where not
    (on a node that is also the login node, the launcher holds the wanted ones itself)."""
    held, chosen = [], {}
    try:
        for key in PORT_KEYS:
            sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
            held.append(sock)
            try:
                sock.bind((address, int(wanted.get(key, 0))))
            except OSError:
                sock.bind((address, 0))
            chosen[key] = sock.getsockname()[1]
    finally:
        for sock in held:
            sock.close()
    return chosen


def find_engine(asked):
    names = [asked] if asked not in ("", "auto") else ["docker", "podman"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise NodeError(f"no container engine on this node (looked for {' and '.join(names)} on PATH)")


def quiet(cmd, timeout=None):
    # capture_output is 3.7+: a node may have 3.6
    pipe = subprocess.PIPE
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, timeout=timeout)


def ensure_image(engine, image, label, content_hash):
    """Pull the image by digest when the node lacks it, then check that it is the bundle's."""
    found = quiet([engine, "image", "inspect", "--format", "{{json .Config.Labels}}", image])
    if found.returncode != 0:
        sys.stderr.write(f"kbundle-node: pulling {image}\n")
        pulled = subprocess.run([engine, "pull", "-q", image], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        if pulled.returncode != 0:
            raise NodeError(f"the node cannot pull {image} (see the engine's message above)")
        found = quiet([engine, "image", "inspect", "--format", "{{json .Config.Labels}}", image])
    try:
        labels = json.loads(found.stdout.decode() or "null") or {}
    except ValueError:
        labels = {}
    if content_hash and labels.get(label) != content_hash:
        raise NodeError(f"the image {image} on this node is not the bundle's (its {label} label differs)")


# image/preflight.py's GPU_CAPABILITIES (a test keeps them equal; this file imports nothing of kbundle's):
# without compute and utility Docker's NVIDIA path gives the container neither CUDA nor nvidia-smi.
GPU_CAPABILITIES = ("gpu", "compute", "utility")


def is_podman(engine):
    return os.path.basename(engine).startswith("podman")


def gpu_arguments(engine, environ):
    """The GPUs Slurm gave this step, passed to the container (none when it gave none): Podman takes
    them by CDI name (NVIDIA's spec, `nvidia-ctk cdi generate`), Docker as a device request with the
    capabilities CUDA needs (`--gpus` is a CSV list: the quotes keep each comma-separated value whole)."""
    ids = environ.get("SLURM_STEP_GPUS") or environ.get("SLURM_JOB_GPUS") or ""
    ids = [i.strip() for i in ids.split(",") if i.strip()]
    if not ids:
        return []
    if is_podman(engine):
        return [arg for i in ids for arg in ("--device", "nvidia.com/gpu=" + i)]
    return ["--gpus", '"device={}","capabilities={}"'.format(",".join(ids), ",".join(GPU_CAPABILITIES))]


def userns_arguments(engine, uid):
    """A rootless Podman (the job's user runs it) keeps that user themselves inside (`keep-id`), so
    that the notebook's folder stays theirs; kbundle's image/userns.py says why."""
    return ["--userns", "keep-id"] if is_podman(engine) and uid != 0 else []


def kernel_user(request):
    """The request's user and groups (the launcher decided them); never root."""
    user = str(request.get("user") or request.get("fallback_user") or "nobody")
    if user.split(":", 1)[0] in ("0", "root", ""):
        raise NodeError("refusing to run the kernel as root")
    return user, [str(g) for g in request.get("group_add", []) if str(g) != "0"]


def policy_flags(policy):
    """The lockdown (kbundle's image/policy.py `Lockdown.request`) as `docker run`/`podman run` flags.

    What the request leaves out is rendered at its strictest, so that a request from an older or
    broken launcher fails closed: every capability dropped, no new privileges, a read-only root."""
    flags = ["--network", policy.get("network_mode") or "host"]
    for cap in policy.get("cap_drop") or ["ALL"]:
        flags += ["--cap-drop", cap]
    for option in policy.get("security_opt") or ["no-new-privileges"]:
        flags += ["--security-opt", option]
    if policy.get("read_only", True):
        flags.append("--read-only")
    for path, options in policy.get("tmpfs") or [["/tmp", "rw,nosuid,nodev,exec"]]:
        flags += ["--tmpfs", f"{path}:{options}"]
    flags += ["--pids-limit", str(int(policy.get("pids_limit") or 8192))]
    return flags


def container_command(engine, request, address, environ):
    """The engine's argv (no secret in it: the connection info goes through stdin)."""
    policy = request.get("policy") or {}
    user, groups = kernel_user(request)
    cmd = [engine, "run", "--rm", "-i", "--init", "--name", request["name"]] + policy_flags(policy)
    cmd += ["--user", user] + userns_arguments(engine, os.getuid())
    for group in groups:
        cmd += ["--group-add", group]
    environment = dict(policy.get("environment") or {"HOME": "/tmp"}, **request.get("environment", {}))
    for key, value in sorted(environment.items()):
        cmd += ["-e", f"{key}={value}"]
    for key, value in sorted(request.get("labels", {}).items()):
        cmd += ["--label", f"{key}={value}"]
    workdir = "/tmp"
    for path in request.get("mounts", []):
        if os.path.isdir(path):  # a shared filesystem mounts the user's folders on the nodes too
            cmd += ["-v", f"{path}:{path}"]
            workdir = workdir if workdir != "/tmp" else path
    for path in request.get("readonly", []):
        if os.path.isdir(path):
            cmd += ["-v", f"{path}:{path}:ro"]
    if request.get("working_dir") and os.path.isdir(request["working_dir"]):
        workdir = request["working_dir"]
    cmd += ["-w", workdir]
    cmd += gpu_arguments(engine, environ)
    return cmd + [request["image"], "python", "-c", request["shim"]]


class Agent:
    def __init__(self, request):
        self.request = request
        self.engine = find_engine(request.get("engine", "auto"))
        self.proc = None
        self.stopping = threading.Event()
        self.cancelled = False  # Slurm ended the step (scancel, time limit): not a clean exit

    def start(self):
        request = self.request
        ensure_image(self.engine, request["image"], request.get("label", ""), request.get("content_hash", ""))
        address = route_source(request["login"])
        ports = free_ports(address, request["connection"])
        quiet([self.engine, "rm", "--force", request["name"]], timeout=60)  # a restart's previous kernel
        connection = dict(request["connection"], ip=address, **ports)
        self.proc = subprocess.Popen(
            container_command(self.engine, request, address, os.environ), stdin=subprocess.PIPE, stdout=sys.stderr
        )
        self.proc.stdin.write((json.dumps(connection) + "\n").encode())
        self.proc.stdin.flush()
        del connection
        say(READY + json.dumps({"address": address, "ports": ports, "job": os.environ.get("SLURM_JOB_ID", "")}))

    def listen(self, stdin):
        """The launcher's commands; EOF (it is gone) stops the kernel."""
        for line in stdin:
            if line.strip() == b"INT":
                self.interrupt()
        self.stop()

    def interrupt(self):
        quiet([self.engine, "kill", "--signal", "INT", self.request["name"]], timeout=30)

    def stop(self, cancelled=False):
        self.cancelled = self.cancelled or cancelled
        if self.stopping.is_set() or self.proc is None:
            return
        self.stopping.set()
        try:
            self.proc.stdin.close()  # the shim ends the kernel on EOF
        except OSError:
            pass
        try:
            self.proc.wait(STOP_GRACE_S * 2)
        except subprocess.TimeoutExpired:
            self.force_stop()

    def force_stop(self):
        """A kernel that outlived its EOF: the engine stops the container."""
        quiet([self.engine, "stop", "-t", str(STOP_GRACE_S), self.request["name"]], timeout=60)

    def finish(self):
        """After the kernel ended: the engine removed the container (--rm)."""


def native_python(prefix):
    """The prefix's own python, which must be visible on this node at the path it was installed at."""
    python = os.path.join(prefix, "bin", "python")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise NodeError(
            f"the environment {prefix} is not visible on node {socket.gethostname()} (no {python}): "
            "--prefix-root must be a file system every compute node mounts at the same path"
        )
    return python


def native_environment(request, environ, tmpdir):
    """The kernel's environment: the node's, the prefix's activation (`${VAR}` filled from the node's,
    as Jupyter fills a kernelspec's env), the banner's variables, and the private TMPDIR."""
    env = dict(environ)
    for key, value in (request.get("activation") or {}).items():
        env[key] = string.Template(str(value)).safe_substitute(environ)
    env.update(request.get("environment") or {})
    env["TMPDIR"] = tmpdir
    return env


def native_workdir(request, environ):
    """The notebook's folder where the node shares it, else the home folder, else /."""
    for folder in (request.get("working_dir"), environ.get("HOME")):
        if folder and os.path.isdir(folder):
            return folder
    return "/"


class NativeAgent(Agent):
    """The kernel straight from a shared prefix: the shim run by the prefix's python, no container."""

    def __init__(self, request):
        self.request = request
        self.python = native_python(request["native"])
        self.proc = None
        self.tmpdir = None
        self.stopping = threading.Event()
        self.cancelled = False

    def start(self):
        request = self.request
        address = route_source(request["login"])
        ports = free_ports(address, request["connection"])
        self.tmpdir = tempfile.mkdtemp(prefix="kbundle-kernel-")  # 0700: the shim's key file goes here
        connection = dict(request["connection"], ip=address, **ports)
        self.proc = subprocess.Popen(
            [self.python, "-c", request["shim"]],
            stdin=subprocess.PIPE,
            stdout=sys.stderr,
            env=native_environment(request, os.environ, self.tmpdir),
            cwd=native_workdir(request, os.environ),
            start_new_session=True,  # its own group: ended whole by `finish`, apart from srun's signals
        )
        self.proc.stdin.write((json.dumps(connection) + "\n").encode())
        self.proc.stdin.flush()
        del connection
        say(READY + json.dumps({"address": address, "ports": ports, "job": os.environ.get("SLURM_JOB_ID", "")}))

    def interrupt(self):
        """`INT` goes to the kernel process itself (ipykernel's interrupt)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)

    def force_stop(self):
        """A kernel that outlived its EOF: SIGTERM to its process group, then SIGKILL."""
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)

    def finish(self):
        """After the kernel ended: what it started goes too, and the folder with its key file."""
        self._signal_group(signal.SIGKILL)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except OSError:  # the group is gone already
            pass


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main():
    stdin = os.fdopen(0, "rb", 0)
    first = stdin.readline()
    try:
        request = json.loads(first.decode())
        agent = (NativeAgent if request.get("native") else Agent)(request)
    except (ValueError, KeyError, NodeError) as exc:
        say(ERROR + ("no request from the launcher" if not first else str(exc)))
        return 2
    # Slurm ends a cancelled step with SIGTERM (then SIGKILL): stop the container first.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: threading.Thread(target=agent.stop, args=(True,)).start())
    try:
        agent.start()
    except (NodeError, OSError, subprocess.SubprocessError) as exc:
        say(ERROR + str(exc))
        return 3
    listener = threading.Thread(target=agent.listen, args=(stdin,))
    listener.daemon = True
    listener.start()
    while True:
        try:
            code = agent.proc.wait()
            agent.finish()
            return 128 + signal.SIGTERM if agent.cancelled else code
        except KeyboardInterrupt:
            continue


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
