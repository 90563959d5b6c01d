"""Bench: `kbundle run` against its baselines, all measured in this run on this machine.

1. Warm run: a second `kbundle run` of an already built bundle (whole process) against a
   fully cached plain `docker build` of the same Dockerfile and context (docker CLI, every
   layer cached). Target: faster (ratio > 1), since no build starts at all.
2. Shared package cache: installing the environment of a second bundle that shares
   packages with the first, against installing the first into an empty cache (resolve
   from the lock, rattler install, byte-compile: the work `kbundle run` does before building).
   Target: at least 5x faster.

Needs the Docker engine and the offline world (tests/world/). Builds one image, removes
it at the end, and uses throwaway kbundle caches and Jupyter dirs.

    .venv/bin/python bench/bench_run.py [--runs 5]

`--native` measures `kbundle run --native` instead (no engine is used: DOCKER_HOST points nowhere;
the world needs Docker only for its base image), on a bundle of python, numpy, ipykernel, pip,
conda's kbdep and pip's kbrange==1.5 (world index):

3. Cold native run (whole process, empty kbundle cache) against the same work done by the tools
   themselves, as commands: a fresh interpreter that reads the same lock file and runs
   py-rattler's own `rattler.install` into a prefix (empty package cache, link scripts off; in
   place of `micromamba create`, which is not on this machine), then the prefix's own
   `pip install --no-deps` of the same hashed lines from the same index. Reported as a ratio; kbundle adds verifying the bundle, vetting every package's
   paths, the pip resolution, `pip check` and conda's records, and the kernelspec.
4. Warm native run (the prefix complete, whole process). Target: at most 1 s.

    .venv/bin/python bench/bench_run.py --native [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
KBUNDLE = str(Path(sys.executable).with_name("kbundle"))
WARM_TARGET = 1.0
CACHE_TARGET = 5.0
NATIVE_COLD_TARGET = 1.1  # cold --native against rattler + pip by hand
NATIVE_WARM_TARGET = 1.0  # seconds, whole process

NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "c1",
            "metadata": {},
            "outputs": [],
            "source": "import numpy, tabulate\nprint(numpy.__version__)",
        }
    ],
    "metadata": {},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def sh(cmd, env=None, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr}")
    return proc


def timed(cmd, runs: int, env=None, cwd=None) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sh(cmd, env, cwd)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def pack(world, env, folder: Path, name: str, deps: list[str], pip: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "nb.ipynb").write_text(json.dumps(NOTEBOOK))
    lines = [f"name: {name}", "channels:", f"  - {world['channel']}", "dependencies:"]
    lines += [f"  - {d}" for d in deps]
    if pip:
        lines += ["  - pip:"] + [f"    - {p}" for p in pip]
    (folder / "environment.yml").write_text("\n".join(lines) + "\n")
    out = folder / f"{name}.kbundle"
    sh(
        [
            KBUNDLE,
            "pack",
            "nb.ipynb",
            "-e",
            "environment.yml",
            "--name",
            name,
            "--channel",
            world["channel"],
            "--base-image",
            world["base_image"],
            "-o",
            out,
        ],
        env,
        folder,
    )
    return out


def install_seconds(bundle: Path, target: Path, base_image: str) -> tuple[float, int]:
    """What `kbundle run` does to the env before a build: resolve the lock, install, byte-compile
    (in a throwaway container of the base image, as run does)."""
    import docker

    from kbundle.bundle import open_bundle
    from kbundle.cache import cache_root
    from kbundle.flows.run import target_of
    from kbundle.image import bytecode
    from kbundle.image import env as envmod

    b = open_bundle(bundle)
    t0 = time.perf_counter()
    resolved = envmod.resolve(envmod.EnvSpec(tuple(b.channels), tuple(b.dependencies), b.lock_text, target_of(b)))
    envmod.install(resolved, target)
    client = docker.from_env()
    bytecode.compile_env(target, cache_root() / "pyc", resolved.interpreter_id(), client=client, image=base_image)
    return time.perf_counter() - t0, resolved.count


def baseline_context(bundle: Path, base_image: str, ctx: Path) -> None:
    """The same build context `kbundle run` assembles (image/context.py), built here by plain `docker build`."""
    from kbundle.bundle import open_bundle
    from kbundle.flows.run import assemble_context, target_of
    from kbundle.image import build as imagemod
    from kbundle.image import env as envmod

    b = open_bundle(bundle)
    resolved = envmod.resolve(envmod.EnvSpec(tuple(b.channels), tuple(b.dependencies), b.lock_text, target_of(b)))
    ctx.mkdir(parents=True, exist_ok=True)
    dockerfile = imagemod.with_base_image(b.dockerfile_text, base_image)
    assemble_context(ctx, b, resolved, dockerfile, base_image=base_image)


# The baseline's conda half, as a command: a fresh interpreter reads the lock file and installs
# it with rattler, as `micromamba create -f LOCK` would be a fresh process (micromamba is not on
# this machine). Its start and the lock's parsing count, as kbundle's own do.
RATTLER_CREATE = """
import asyncio, sys
import rattler
lock = rattler.LockFile.from_path(sys.argv[1]).default_environment()
(platform,) = [p for p in lock.platforms() if p.name == "linux-64"]
records = lock.conda_repodata_records_for_platform(platform)
asyncio.run(rattler.install(records, target_prefix=sys.argv[2], cache_dir=sys.argv[3],
                            execute_link_scripts=False, show_progress=False))
sys.stdout.flush()
import os; os._exit(0)  # an interpreter that used rattler can crash at exit (kbundle's cli does the same)
"""


def rattler_and_pip(bundle: Path, prefix: Path, pkgs: Path, resolved: list[str], index: str, env=None) -> float:
    """The baseline, as a person would do it by hand with the tools themselves: rattler's own
    install of the bundle's lock into an empty package cache, as a command (RATTLER_CREATE), then
    the prefix's own `pip install` of the same exact, hashed pip lines from the same index."""
    from kbundle.bundle import open_bundle

    prefix.parent.mkdir(parents=True, exist_ok=True)
    lock = prefix.parent / "rattler.lock"
    lock.write_text(open_bundle(bundle).lock_text, encoding="utf-8")
    requirements = prefix.parent / "requirements.txt"
    requirements.write_text("".join(f"{line.split('  #')[0]}\n" for line in resolved))
    t0 = time.perf_counter()
    sh([sys.executable, "-c", RATTLER_CREATE, lock, prefix, pkgs], env)
    pip = [str(prefix / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-compile", "--no-cache-dir"]
    sh([*pip, "--disable-pip-version-check", "--index-url", index, "-r", requirements], env)
    return time.perf_counter() - t0


def baseline(bundle: Path, tmp: Path, i: int, resolved: list[str], world, env) -> float:
    """One baseline run into its own empty prefix and package cache, with the same pip
    configuration (none) as kbundle's side."""
    return rattler_and_pip(
        bundle, tmp / f"baseline-{i}" / "env", tmp / f"baseline-pkgs-{i}", resolved, world["pypi_index"], env
    )


def native_main(world, runs: int, tmp: Path) -> int:
    """Cold pairs (kbundle, then the tools by hand), each from empty caches, then warm runs."""
    base_env = dict(
        os.environ,
        PIP_CONFIG_FILE=os.devnull,
        PIP_FIND_LINKS="",
        DOCKER_HOST="unix:///nonexistent/docker.sock",
    )
    # Python's default on both sides: .pyc files are written. A shell that sets PYTHONDONTWRITEBYTECODE
    # (this CI machine's does) made kbundle, installed editable, compile its own modules at every
    # start (about 40 ms), which no installed kbundle does; and it spared the baseline's pip the
    # .pyc writes that kbundle's pip makes.
    base_env.pop("PYTHONDONTWRITEBYTECODE", None)
    tag = os.urandom(3).hex()
    deps = [f"python={world['python']}", "numpy", "ipykernel", "pip", "kbdep=0.4"]
    pack_env = dict(base_env, JUPYTER_DATA_DIR=str(tmp / "jupyter-pack"), KBUNDLE_CACHE_DIR=str(tmp / "cache-pack"))
    bundle = pack(
        world, pack_env, tmp / "n", f"bench-n-{tag}", deps, [f"--index-url {world['pypi_index']}", "kbrange==1.5"]
    )
    run_cmd = [KBUNDLE, "run", bundle, "--native", "--json", "--yes"]

    colds, bases = [], []
    resolved: list[str] = []  # the pip lines kbundle resolved, which the baseline installs too
    for i in range(max(1, runs // 2)):
        env = dict(base_env, JUPYTER_DATA_DIR=str(tmp / f"jupyter-{i}"), KBUNDLE_CACHE_DIR=str(tmp / f"cache-{i}"))
        # Who goes first alternates: the machine's disk writeback of one side's files can land
        # on the other, and it must not always land on the same side.
        if i % 2:
            bases.append(baseline(bundle, tmp, i, resolved, world, base_env))
        t0 = time.perf_counter()
        cold = json.loads(sh(run_cmd, env, tmp).stdout)
        colds.append(time.perf_counter() - t0)
        assert cold["native"]["reused"] is False
        resolved = cold["pip_resolved"]
        if not i % 2:
            bases.append(baseline(bundle, tmp, i, resolved, world, base_env))
    samples, inside = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        warm = json.loads(sh(run_cmd, env, tmp).stdout)
        samples.append(time.perf_counter() - t0)
        inside.append(warm["seconds"])
        assert warm["native"]["reused"] is True
    ratios = [a / b for a, b in zip(colds, bases, strict=True)]
    warm_median = statistics.median(samples)
    print(
        f"cold kbundle run --native (empty caches, whole process): median {statistics.median(colds):6.2f} s  "
        f"({cold['packages']} conda, {len(cold['pip_resolved'])} pip; {len(colds)} runs)"
    )
    print(f"rattler install of the same lock + pip install of the same lines: median {statistics.median(bases):6.2f} s")
    print(
        f"ratio cold kbundle --native / rattler + pip (pair by pair): median {statistics.median(ratios):.2f}x "
        f"(target <= {NATIVE_COLD_TARGET:g}x)"
    )
    print(
        f"warm kbundle run --native (prefix complete, whole process): {warm_median:6.2f} s  (median of {runs}; "
        f"in the flow {statistics.median(inside):.2f} s; target <= {NATIVE_WARM_TARGET:g} s)"
    )
    ok = warm_median <= NATIVE_WARM_TARGET and statistics.median(ratios) <= NATIVE_COLD_TARGET
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--native", action="store_true", help="measure `kbundle run --native` (see above)")
    args = parser.parse_args()
    import world as world_module

    world = world_module.up()
    if args.native:
        tmp = Path(tempfile.mkdtemp(prefix="kbundle-bench-native-"))
        try:
            return native_main(world, args.runs, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix="kbundle-bench-"))
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp / "jupyter"), KBUNDLE_CACHE_DIR=str(tmp / "cache-run"))
    image = None
    try:
        tag = os.urandom(3).hex()
        deps = [f"python={world['python']}", "numpy", "ipykernel", "pip"]
        first = pack(world, env, tmp / "a", f"bench-a-{tag}", deps, ["tabulate==0.9.0"])
        second = pack(
            world,
            env,
            tmp / "b",
            f"bench-b-{tag}",
            [f"python={world['python']}", "ipykernel", "pip", "tzdata", "python-dateutil"],
            [],
        )

        # 1. warm run vs a fully cached docker build
        t0 = time.perf_counter()
        built = json.loads(sh([KBUNDLE, "run", first, "--json", "--yes", "--gpus", "none"], env, tmp).stdout)
        cold_run = time.perf_counter() - t0
        image = built["image"]
        run_cmd = [KBUNDLE, "run", first, "--json", "--yes", "--gpus", "none"]
        warm = timed(run_cmd, args.runs, env, tmp)
        assert json.loads(sh(run_cmd, env, tmp).stdout)["built"] is False
        ctx = tmp / "ctx"
        os.environ["KBUNDLE_CACHE_DIR"] = env["KBUNDLE_CACHE_DIR"]
        baseline_context(first, world["base_image"], ctx)
        build_cmd = ["docker", "build", "-q", "-t", f"kbundle-bench/plain:{tag}", ctx]
        sh(build_cmd)  # fill any layer the kbundle build did not
        plain = timed(build_cmd, args.runs)
        sh(["docker", "rmi", f"kbundle-bench/plain:{tag}"])

        # 2. second bundle with a shared package cache vs first bundle into an empty cache
        os.environ["KBUNDLE_CACHE_DIR"] = str(tmp / "cache-install")
        t_first, n_first = install_seconds(first, tmp / "inst-a" / "env", world["base_image"])
        t_second, n_second = install_seconds(second, tmp / "inst-b" / "env", world["base_image"])

        print(f"cold kbundle run (install + build, empty cache):  {cold_run:7.2f} s")
        print(f"warm kbundle run (image exists, whole process):   {warm:7.2f} s  (median of {args.runs})")
        print(f"plain docker build, fully cached, same context:  {plain:7.2f} s  (median of {args.runs})")
        print(f"ratio plain docker build / warm kbundle run: {plain / warm:.1f}x (target > {WARM_TARGET:g}x)")
        print(f"install first bundle, empty cache:   {t_first:6.2f} s  ({n_first} packages)")
        print(f"install second bundle, shared cache: {t_second:6.2f} s  ({n_second} packages)")
        print(f"ratio first / second install: {t_first / t_second:.1f}x (target >= {CACHE_TARGET:g}x)")
        ok = plain / warm > WARM_TARGET and t_first / t_second >= CACHE_TARGET
        return 0 if ok else 1
    finally:
        if image:
            subprocess.run(["docker", "rmi", "-f", image], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # an interpreter that used rattler can crash at exit
