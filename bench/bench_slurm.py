#!/usr/bin/env python3
"""Kernel start through Slurm against kbundle's local kernel start, in the same run.

    .venv/bin/python bench/bench_slurm.py [--rounds 5]

Both kernels run the same byte-compiled image (the world's env image, compiled as
`kbundle run` builds it); the Slurm one pulls it by digest from the world's registry and
runs through the world's one-node Slurm cluster (an idle partition). Start is measured
from `start_kernel()` to the `kernel_info` reply, interleaved round by round.
Goal (issue 13): Slurm start ≤ 2× local start.

Then it splits the Slurm start into its parts, each timed alone: the job step (`srun true`),
the node's python3 (`srun python3 -c pass`), the agent's engine calls (`docker image
inspect`, `docker rm -f` of nothing), and the container's start through the docker CLI
(`docker run … python -c pass`) against the same through the SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_kernel import derived_image, one_run  # noqa: E402


def _timed(argv: list[str], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _push(client, image: str, registry: str) -> str:
    repo = f"{registry}/bench/slurm-kernel"
    client.images.get(image).tag(repo, "bench")
    for line in client.api.push(repo, "bench", stream=True, decode=True):
        if "error" in line:
            raise SystemExit(f"push failed: {line['error']}")
    return next(d for d in client.images.get(f"{repo}:bench").attrs["RepoDigests"] if d.startswith(registry))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    import docker

    import world
    from kbundle.kernel.slurm import SlurmOptions
    from kbundle.kernel.spec import KernelRequest, install_kernelspec

    info = world.up()
    os.environ["SLURM_CONF"] = info["slurm"]["conf"]
    client = docker.from_env(timeout=600)
    compiled = derived_image(
        client,
        world.ensure_env_image(info),
        "kbundle-bench/pyc:1",
        "USER root\nRUN python -m compileall -q -j0 /opt/kbundle/env >/dev/null\nUSER kbundle",
    )
    digest = _push(client, compiled, info["registry"])

    data_dir = Path(tempfile.mkdtemp(prefix="kbundle-bench-jupyter-"))
    work = Path(tempfile.mkdtemp(prefix="kbundle-bench-work-"))
    os.environ.update(JUPYTER_DATA_DIR=str(data_dir), JUPYTER_PATH=str(data_dir))
    os.environ["KBUNDLE_CACHE_DIR"] = str(data_dir / "cache")
    install_kernelspec(KernelRequest("bench-local", "local", compiled, str(work), [], "bench"))
    slurm = SlurmOptions(partition=info["slurm"]["partition"], login_address="127.0.0.1", start_timeout=60)
    install_kernelspec(KernelRequest("bench-slurm", "slurm", digest, str(work), [], "", slurm=slurm))

    variants = {"local": "bench-local", "slurm": "bench-slurm"}
    starts: dict[str, list[float]] = {v: [] for v in variants}
    for name in variants.values():  # warm-up: the pull by digest, page cache
        asyncio.run(one_run(name, str(work)))
    for r in range(args.rounds):
        for label, name in variants.items():
            starts[label].append(asyncio.run(one_run(name, str(work)))[0])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    local, slurm_start = statistics.median(starts["local"]), statistics.median(starts["slurm"])
    print(f"kernel start, median of {args.rounds}:")
    print(f"  local kbundle kernel   {local:6.3f} s")
    print(f"  Slurm kbundle kernel   {slurm_start:6.3f} s")
    print(f"  ratio slurm/local      {slurm_start / local:6.2f}x   (goal <= 2.00x)")

    partition = f"--partition={info['slurm']['partition']}"
    parts = {
        "srun true (the job step)": _timed(["srun", partition, "true"], args.rounds),
        "srun python3 -c pass": _timed(["srun", partition, "python3", "-c", "pass"], args.rounds),
        "docker image inspect": _timed(["docker", "image", "inspect", digest], args.rounds),
        "docker rm -f (nothing)": _timed(["docker", "rm", "-f", "kbundle-bench-none"], args.rounds),
        "docker run (CLI) python -c pass": _timed(
            ["docker", "run", "--rm", "-i", "--init", "--network", "host", digest, "python", "-c", "pass"], args.rounds
        ),
    }
    t_sdk = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        client.containers.run(compiled, ["python", "-c", "pass"], remove=True, init=True, network_mode="host")
        t_sdk.append(time.perf_counter() - t0)
    parts["docker run (SDK) python -c pass"] = statistics.median(t_sdk)
    print("where the Slurm start goes (each part alone, median):")
    for what, seconds in parts.items():
        print(f"  {what:<34} {seconds:6.3f} s")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
