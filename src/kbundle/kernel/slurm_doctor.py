"""`kbundle doctor --slurm`: can this login node start kbundle kernels on the cluster?

Three checks, each a Finding like the local preflight's (image/preflight.py):

1. `sinfo` answers: Slurm's commands are here and the controller is reachable;
2. the partition (the one asked for, else the cluster's default) exists, is up, has nodes
   that can run a job now, and offers the GRES asked for (`--gres gpu:1` on a partition
   without GPUs would wait forever);
3. a test step on a node of it runs the container engine and a python3: the two things
   a compute node needs for kernel/node_agent.py.

Reading the commands' output is pure (`partition_findings`, `step_finding`) and
table-tested; `check` runs the commands.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from kbundle.image.preflight import ERROR, OK, WARN, Finding

SINFO_FORMAT = "%P|%a|%D|%t|%G"
# Podman has no daemon to ask; Docker's `info` fails when its daemon does not answer.
STEP_SCRIPT = (
    'e=$(command -v docker || command -v podman) || { echo "engine: none"; exit 3; }; '
    'case "$e" in *podman) v=$("$e" --version | sed "s/.* //");; '
    '*) v=$("$e" info --format "{{.ServerVersion}}" 2>&1 | tail -n1);; esac; '
    'echo "engine: $(basename "$e") $v"; echo "python: $(python3 -V 2>&1)"; echo "node: $(hostname -s)"'
)


@dataclass(frozen=True)
class PartitionRow:
    name: str
    default: bool
    available: str  # up | down | drain | inact
    nodes: int
    state: str  # idle, mix, alloc, down*, …
    gres: str  # (null) when none


def parse_sinfo(output: str) -> list[PartitionRow]:
    """`sinfo -h -o "%P|%a|%D|%t|%G"`: one row per partition and node state (pure)."""
    rows = []
    for line in output.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or not parts[0]:
            continue
        name, available, nodes, state, gres = parts
        rows.append(PartitionRow(name.rstrip("*"), name.endswith("*"), available, int(nodes or 0), state, gres))
    return rows


def _gres_has(offered: str, asked: str) -> bool:
    """Whether the partition's GRES (`gpu:a100:4,shard:8`) includes the kind asked for (`gpu:2`)."""
    kind = asked.split(":", 1)[0]
    return any(item.split(":", 1)[0] == kind for item in offered.split(",") if item and item != "(null)")


def partition_findings(rows: list[PartitionRow], partition: str, gres: str) -> tuple[str, list[Finding]]:
    """(the partition to test, what to say about it) from sinfo's rows (pure)."""
    if not rows:
        return "", [Finding(ERROR, "slurm", "sinfo lists no partition: this cluster has none you can use")]
    if not partition:
        default = next((r.name for r in rows if r.default), "")
        if not default:
            names = ", ".join(sorted({r.name for r in rows}))
            return "", [Finding(ERROR, "slurm", f"no default partition; choose one with --partition ({names})")]
        partition = default
    mine = [r for r in rows if r.name == partition]
    if not mine:
        names = ", ".join(sorted({r.name for r in rows}))
        return "", [Finding(ERROR, "slurm", f"no partition {partition!r} (there are: {names})")]
    if all(r.available != "up" for r in mine):
        return "", [Finding(ERROR, "slurm", f"partition {partition} is {mine[0].available}: jobs there will not start")]
    ready = sum(r.nodes for r in mine if r.state.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc", "comp"))
    usable = sum(r.nodes for r in mine if r.state.rstrip("*~#!%$@^-") in ("idle", "mix"))
    offered = ",".join(sorted({r.gres for r in mine if r.gres and r.gres != "(null)"}))
    found = []
    if ready == 0:
        found.append(Finding(ERROR, "slurm", f"partition {partition} has no node that can run jobs"))
    elif usable == 0:
        found.append(
            Finding(WARN, "slurm", f"partition {partition}: every node is busy; kernels will wait in the queue")
        )
    else:
        found.append(Finding(OK, "slurm", f"partition {partition}: {usable} of {ready} node(s) free now"))
    if gres and not _gres_has(offered, gres):
        found.append(
            Finding(ERROR, "gres", f"partition {partition} offers no {gres.split(':')[0]} GRES ({offered or 'none'})")
        )
    elif offered:
        found.append(Finding(OK, "gres", f"partition {partition} offers {offered}"))
    else:
        found.append(Finding(WARN, "gres", f"partition {partition} offers no GRES: kernels there get no GPU"))
    return partition, found


def step_finding(returncode: int, output: str, error: str) -> Finding:
    """What the test step says about a node (pure)."""
    facts = dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)
    engine = facts.get("engine", "")
    if returncode != 0 or engine in ("", "none"):
        if engine == "none":
            return Finding(ERROR, "node", "the compute node has neither docker nor podman on PATH")
        detail = (error.strip().splitlines() or [f"exit status {returncode}"])[-1]
        return Finding(ERROR, "node", f"the test step failed: {detail}")
    if not facts.get("python", "").startswith("Python 3"):
        return Finding(ERROR, "node", f"the compute node has no python3 ({facts.get('python', '?')})")
    version = engine.split(" ", 1)[1] if " " in engine else ""
    if not version or not version[0].isdigit():
        return Finding(ERROR, "node", f"the node's engine does not answer: {version or engine}")
    return Finding(
        OK, "node", f"{facts.get('node', 'a node')} runs {engine.split(' ')[0]} {version} and {facts['python']}"
    )


def _run(argv: list[str], timeout: float) -> tuple[int, str, str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return 127, "", f"{argv[0]} is not installed or not on PATH"
    except subprocess.TimeoutExpired:
        return 124, "", f"{argv[0]} did not finish within {timeout:g} s"
    return done.returncode, done.stdout, done.stderr


def check(partition: str = "", gres: str = "", timeout: float = 120.0) -> list[Finding]:
    """Run the three checks; later ones are skipped when an earlier one fails."""
    code, out, err = _run(["sinfo", "--noheader", f"--format={SINFO_FORMAT}"], 30)
    if code != 0:
        detail = (err.strip().splitlines() or ["no answer"])[-1]
        return [Finding(ERROR, "slurm", f"sinfo failed: {detail}")]
    chosen, found = partition_findings(parse_sinfo(out), partition, gres)
    if not chosen or any(f.level == ERROR for f in found):
        return found
    argv = ["srun", f"--partition={chosen}", "--nodes=1", "--ntasks=1", "--job-name=kbundle-doctor"]
    argv += [f"--gres={gres}"] if gres else []
    argv += [f"--immediate={int(timeout)}", "sh", "-c", STEP_SCRIPT]
    code, out, err = _run(argv, timeout + 30)
    return [*found, step_finding(code, out, err)]
