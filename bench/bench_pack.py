"""Bench: `kbundle pack` of the example with --lock never vs. importing its libraries.

Acceptance (issue 3): the whole `kbundle pack` process takes no more than 2x the time of
`python -c "import typer, yaml, jinja2, nbformat"`, median of several runs, both measured
here in the same run on the same machine; and the bundle is no more than 8 KB larger than
`zip -9` of the notebook and its environment file. Prints both medians, the ratio and the
size difference; exits 1 when either is above its target.

    .venv/bin/python bench/bench_pack.py [--runs 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "warp-speed"
TARGET = 2.0
SIZE_TARGET = 8 * 1024


def _kbundle() -> list[str]:
    exe = Path(sys.executable).with_name("kbundle")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kbundle.cli"]


def _time(cmd: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    baseline = [sys.executable, "-c", "import typer, yaml, jinja2, nbformat"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "warp-speed.kbundle")
        pack = _kbundle() + [
            "pack",
            str(EXAMPLE / "warp-speed.ipynb"),
            "-e",
            str(EXAMPLE / "environment.yml"),
            "-o",
            out,
            "--lock",
            "never",
        ]
        # Warm both once (page cache, .pyc files), then alternate-free medians.
        _time(baseline, 1)
        _time(pack, 1)
        base = _time(baseline, args.runs)
        packed = _time(pack, args.runs)
        ref = os.path.join(tmp, "ref.zip")
        subprocess.run(
            ["zip", "-q", "-9", "-j", ref, str(EXAMPLE / "warp-speed.ipynb"), str(EXAMPLE / "environment.yml")],
            check=True,
        )
        extra = os.path.getsize(out) - os.path.getsize(ref)
        sizes = (os.path.getsize(out), os.path.getsize(ref))
    ratio = packed / base
    print(f"baseline import typer, yaml, jinja2, nbformat: {base * 1000:.0f} ms (median of {args.runs})")
    print(f"kbundle pack --lock never (example):            {packed * 1000:.0f} ms (median of {args.runs})")
    print(f"ratio: {ratio:.2f} (target <= {TARGET})")
    print(
        f"size: bundle {sizes[0]} B, zip -9 of notebook + env file {sizes[1]} B: +{extra} B (target <= {SIZE_TARGET})"
    )
    return 0 if ratio <= TARGET and extra <= SIZE_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
