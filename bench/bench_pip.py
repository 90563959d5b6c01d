"""Bench: `kbundle pack` that locks a 15-entry pip: section vs. pip's own resolver on it.

Acceptance (pip half of "Real environments"): the whole `kbundle pack --lock auto` process
(rattler's lock of the conda part included, pip's resolver run beside it) takes no more than
1.3x `pip install --dry-run --report` of the same 15 lines for the same target, median of
several runs, the two alternating in the same run on the same machine. Prints both medians
and the ratio; exits 1 above the target. Needs the offline world (`python -m tests.world up`)
for the conda channel and, by default, its PEP 503 index; `--pypi` uses real PyPI instead.

    .venv/bin/python bench/bench_pip.py [--runs 7] [--pypi]
    .venv/bin/python bench/bench_pip.py --print-commands   # the two commands, for an external timer
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.3
LOCAL = [f"kbb-{i:02d}>=1.0" for i in range(1, 16)]
PYPI = [
    "requests>=2.28",
    "tabulate",
    "rich>=13",
    "click~=8.1",
    "attrs>=23",
    "pyyaml>=6",
    "six",
    "tqdm>=4.60",
    "python-dateutil>=2.8",
    "pytz",
    "packaging>=23",
    "toml",
    "wcwidth",
    "jmespath",
    "docutils<0.22",
]


def _world() -> dict:
    out = subprocess.run([sys.executable, "-m", "tests.world", "up"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: the test world is not up: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def setup(folder: Path, pypi: bool) -> tuple[list[str], list[str], dict]:
    """The two commands, and the environment both run in."""
    from kbundle.specs import manylinux_platforms

    world = _world()
    lines = PYPI if pypi else LOCAL
    index = [] if pypi else [f"--index-url {world['pypi_index']}"]
    (folder / "nb.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    body = "".join(f"    - {json.dumps(line)}\n" for line in index + lines)
    (folder / "environment.yml").write_text(
        f"name: bench\nchannels:\n  - {world['channel']}\ndependencies:\n  - python={world['python']}\n"
        f"  - ipykernel\n  - pip\n  - pip:\n{body}"
    )
    (folder / "requirements.txt").write_text("".join(f"{line}\n" for line in index + lines))
    exe = Path(sys.executable).with_name("kbundle")
    pack = [str(exe), "pack", str(folder / "nb.ipynb"), "-e", str(folder / "environment.yml"), "-o"]
    pack += [str(folder / "bench.kbundle"), "--base-image", world["base_image"], "--lock", "auto"]
    major_minor = world["python"]
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--report", "-", "--quiet", "--ignore-installed"]
    pip += ["--target", str(folder / "target"), "--only-binary=:all:", "--implementation", "cp"]
    pip += ["--python-version", major_minor, "--disable-pip-version-check", "--no-input"]
    for platform in manylinux_platforms("2.36"):  # the world's base is Debian bookworm
        pip += ["--platform", platform]
    pip += ["-r", str(folder / "requirements.txt")]
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="")
    return pack, pip, env


def _once(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--pypi", action="store_true", help="resolve 15 real packages on PyPI")
    parser.add_argument("--print-commands", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="kbundle-bench-pip-"))
    pack, pip, env = setup(folder, args.pypi)
    if args.print_commands:
        print("export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS=")
        print(shlex.join(pack))
        print(shlex.join(pip))
        return 0
    _once(pack, env), _once(pip, env)  # warm-up: caches, imports
    packs, pips = [], []
    for _ in range(args.runs):
        packs.append(_once(pack, env))
        pips.append(_once(pip, env))
    ratios = [a / b for a, b in zip(packs, pips, strict=True)]
    manifest = json.loads(
        subprocess.run(
            ["unzip", "-p", str(folder / "bench.kbundle"), "kbundle.json"], capture_output=True, text=True
        ).stdout
        or "{}"
    )
    source = "PyPI" if args.pypi else "the world's index"
    print(
        f"pip section: 15 entries from {source}; locked: {manifest.get('pip_locked')}, "
        f"{len(manifest.get('pip', []))} pins"
    )
    print(f"kbundle pack --lock auto   median {statistics.median(packs):.3f} s")
    print(f"pip install --dry-run      median {statistics.median(pips):.3f} s")
    ratio = statistics.median(ratios)
    print(f"ratio (pair by pair)       median {ratio:.2f}x (target <= {TARGET}x)")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
