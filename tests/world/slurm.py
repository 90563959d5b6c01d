"""A one-node Slurm cluster on this machine: munged, slurmctld and slurmd, kept running between calls.

Everything lives in ``<world>/slurm/``: ``slurm.conf``, a MUNGE key and socket of the world's
own (so a system munged, if any, is neither needed nor touched), state, spool, logs and
``slurm.json`` (the daemons' pids and what ``up`` prints). Nothing is written to
/etc/slurm: every Slurm tool finds the cluster through ``SLURM_CONF``.

The daemons run as root (``SlurmUser=root``), with ``proctrack/linuxproc`` and
``task/none`` so that no cgroup setup is needed, on ports 18768/18769 of 127.0.0.1. The node
is this machine (``slurmd -C``), in one partition ``debug`` with no time limit and no GRES.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .common import log
from .daemons import free_port, locked, running, spawn, terminate

PARTITION = "debug"
CLUSTER = "kbworld"
CTLD_PORT = 18768
SLURMD_PORT = 18769
STATE_FILE = "slurm.json"
START_TIMEOUT_S = 60
DAEMONS = ("slurmd", "slurmctld", "munged")  # the order to stop them in
# sinfo's %T for a node that is up and answering; a '*' suffix (not responding), down or drained is not.
USABLE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})
# AF_UNIX paths are limited to 108 bytes; slurmd makes step sockets of about 30 in its spool.
MAX_SOCKET_DIR = 70


def node_usable(state: str) -> bool:
    return state.strip() in USABLE_STATES


def parse_node_line(line: str) -> dict[str, str]:
    """``slurmd -C``'s first line (``NodeName=vm CPUs=2 ... RealMemory=24105``) as a dict."""
    return dict(token.split("=", 1) for token in line.split() if "=" in token)


def slurm_conf(folder: Path, node: dict[str, str], ctld_port: int, slurmd_port: int) -> str:
    """The cluster's slurm.conf: this machine as its only node, every file under `folder`."""
    name = node["NodeName"]
    hardware = " ".join(f"{k}={v}" for k, v in node.items() if k != "NodeName")
    lines = [
        f"ClusterName={CLUSTER}",
        # The address in parentheses keeps every daemon and client on loopback.
        f"SlurmctldHost={name}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={folder / 'munge.socket'}",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        f"PlugStackConfig={folder / 'plugstack.conf'}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        # Short waits: a cancelled job frees the node in seconds, finished jobs are forgotten soon.
        "KillWait=5",
        "MinJobAge=30",
        "SlurmdTimeout=30",
        "SlurmctldTimeout=30",
        f"NodeName={name} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={name} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def _exe(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise SystemExit(f"error: {name} is not installed (Debian: apt-get install slurm-wlm munge)")
    return path


def _env(conf: Path) -> dict:
    return {**os.environ, "SLURM_CONF": str(conf)}


def _markers(folder: Path) -> dict[str, str]:
    """For each daemon, a path of this world that only its command line holds."""
    conf = str(folder / "slurm.conf")
    return {"munged": str(folder / "munge.socket"), "slurmctld": conf, "slurmd": conf}


def _node_state(conf: Path, node: str) -> str:
    proc = subprocess.run(
        [_exe("sinfo"), "-h", "-N", "-n", node, "-p", PARTITION, "-o", "%T"],
        env=_env(conf),
        capture_output=True,
        text=True,
        timeout=15,
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _alive(state: dict, folder: Path) -> bool:
    markers = _markers(folder)
    pids = state.get("pids", {})
    if not all(running(pids.get(d, -1), markers[d]) for d in DAEMONS):
        return False
    info = state["info"]
    return node_usable(_node_state(Path(info["conf"]), info["node"]))


def _stop_daemons(folder: Path, state: dict) -> None:
    """Cancel the cluster's jobs while it can, stop its daemons, then kill step daemons they left.

    slurmd does not end running steps when it stops, and a slurmstepd whose slurmd died
    retries forever; both still hold our slurmd.log open, which is how they are found.
    """
    markers = _markers(folder)
    pids = state.get("pids", {})
    if running(pids.get("slurmctld", -1), markers["slurmctld"]):
        _cancel_all(folder / "slurm.conf")
    for daemon in DAEMONS:
        # Short: a slurmd whose controller is gone spends its whole message timeout saying goodbye.
        terminate(pids.get(daemon, -1), markers[daemon], timeout=3)
    strays = _holding(folder / "slurmd.log")
    for pid in strays + _descendants(strays):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cancel_all(conf: Path) -> None:
    env = _env(conf)
    subprocess.run([_exe("scancel"), "-p", PARTITION], env=env, capture_output=True, timeout=15)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        squeue = subprocess.run([_exe("squeue"), "-h"], env=env, capture_output=True, text=True, timeout=15)
        if squeue.returncode != 0 or not squeue.stdout.strip():
            return
        time.sleep(0.2)


def _holding(path: Path) -> list[int]:
    """Pids of the processes that have `path` open (also after it was deleted)."""
    target = str(path)
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue  # gone, or not ours to read
        if any(link.removesuffix(" (deleted)") == target for link in links):
            found.append(int(fd_dir.parent.name))
    return found


def _descendants(pids: list[int]) -> list[int]:
    """Every process below `pids` (a step daemon's tasks), from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], list(pids)
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _prepare(folder: Path) -> None:
    """A fresh state and spool (jobs of a cluster that died are gone); the MUNGE key is kept."""
    if len(str(folder)) > MAX_SOCKET_DIR:
        raise SystemExit(f"error: {folder} is too long for Slurm's sockets: set a shorter KBUNDLE_WORLD_DIR")
    folder.mkdir(parents=True, exist_ok=True)
    # munged checks that everyone may reach its socket, and that no one else may write there.
    folder.chmod(0o755)
    for sub in ("state", "spool"):
        shutil.rmtree(folder / sub, ignore_errors=True)
        (folder / sub).mkdir()
    for stale in ("munge.socket", "munge.socket.lock"):
        (folder / stale).unlink(missing_ok=True)
    (folder / "plugstack.conf").write_text("")
    key = folder / "munge.key"
    if not key.exists():
        subprocess.run([_exe("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)


def _start_munged(folder: Path) -> subprocess.Popen:
    sock = folder / "munge.socket"
    argv = [
        _exe("munged"),
        "--foreground",
        # As root, munged refuses a socket under a directory that others cannot enter (/root is 0700).
        "--force",
        f"--socket={sock}",
        f"--key-file={folder / 'munge.key'}",
        f"--log-file={folder / 'munged.log'}",
        f"--pid-file={folder / 'munged.pid'}",
        f"--seed-file={folder / 'munged.seed'}",
    ]
    proc = spawn(argv, folder / "munged.out")
    deadline = time.monotonic() + 10
    while not _accepts(sock):
        if time.monotonic() > deadline or proc.poll() is not None:
            terminate(proc.pid, str(sock))
            raise SystemExit(f"error: munged did not start; see {folder}/munged.log and munged.out")
        time.sleep(0.05)
    return proc


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _wait_until_ready(folder: Path, procs: dict[str, subprocess.Popen], info: dict) -> None:
    """Until the node is idle and ``srun hostname`` runs on it; one clear error at the deadline."""
    conf, node = Path(info["conf"]), info["node"]
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer from sinfo"
    while time.monotonic() < deadline:
        dead = [name for name, proc in procs.items() if proc.poll() is not None]
        if dead:
            raise SystemExit(f"error: {dead[0]} exited while Slurm started; see {folder}/{dead[0]}.log and .out")
        state = _node_state(conf, node)
        if state == "idle":
            srun = subprocess.run(
                [_exe("srun"), "-p", PARTITION, "hostname"], env=_env(conf), capture_output=True, text=True, timeout=30
            )
            if srun.returncode == 0 and srun.stdout.strip() == node:
                return
            last = f"srun hostname: {srun.stderr.strip() or srun.stdout.strip()}"
        else:
            last = f"node {node} is {state or 'unknown'}"
        time.sleep(0.2)
    raise SystemExit(f"error: Slurm was not ready in {START_TIMEOUT_S} s ({last}); see {folder}/slurmctld.log")


def ensure_slurm(root: Path) -> dict:
    """``{"slurm": {conf, partition, node, cpus}}``: the running cluster, or a freshly started one."""
    folder = root / "slurm"
    with locked(folder / "lock"):
        return {"slurm": _ensure(folder)}


def _ensure(folder: Path) -> dict:
    state_file = folder / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state and _alive(state, folder):
        return state["info"]
    if os.geteuid() != 0:
        raise SystemExit("error: the world's Slurm cluster runs its daemons as root; run `up` as root")
    _stop_daemons(folder, state)
    _prepare(folder)
    probe = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True)
    node = parse_node_line(probe.stdout.splitlines()[0])
    conf = folder / "slurm.conf"
    ports = free_port(CTLD_PORT), free_port(SLURMD_PORT)
    conf.write_text(slurm_conf(folder, node, *ports))
    info = {"conf": str(conf), "partition": PARTITION, "node": node["NodeName"], "cpus": int(node["CPUs"])}
    log(f"starting Slurm ({info['node']}, {info['cpus']} CPUs, ports {ports[0]}/{ports[1]})")
    procs = {"munged": _start_munged(folder)}
    procs["slurmctld"] = spawn([_exe("slurmctld"), "-D", "-f", str(conf)], folder / "slurmctld.out", _env(conf))
    procs["slurmd"] = spawn([_exe("slurmd"), "-D", "-f", str(conf)], folder / "slurmd.out", _env(conf))
    state = {"pids": {name: proc.pid for name, proc in procs.items()}, "info": info}
    try:
        _wait_until_ready(folder, procs, info)
    except SystemExit:
        _stop_daemons(folder, state)
        raise
    state_file.write_text(json.dumps(state))
    return info


def stop_slurm(root: Path) -> None:
    """Stop slurmd, slurmctld and the world's munged, and remove the cluster's files."""
    folder = root / "slurm"
    state_file = folder / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    _stop_daemons(folder, state)
    shutil.rmtree(folder, ignore_errors=True)
