#!/usr/bin/env python3
"""Kernel start and interrupt latency: kbundle's container kernel vs native ipykernel vs dockernel.

    .venv/bin/python bench/bench_kernel.py [--rounds 5] [--image TAG] [--no-pyc]

- start: from `start_kernel()` to the `kernel_info` reply (jupyter_client's wait_for_ready);
- interrupt: from `interrupt_kernel()` (sent once `time.sleep(60)`'s execute_input arrived)
  to the KeyboardInterrupt error on iopub.

All variants run in the same process, interleaved round by round, against the same image
(each run waits until the previous run's container is gone: the engine's teardown of one
variant must not land on the next one's start)
(the offline world's env image unless --image is given). dockernel (PyPI, `bench` extra)
needs an image whose CMD starts ipykernel on $DOCKERNEL_CONNECTION_FILE; the bench derives
one from the same image. Both container kernels also run on a copy of the image whose
environment was byte-compiled, as `kbundle run` builds it (`--no-pyc` skips that). The
world's env has no .pyc (like a bare rattler install): kbundle's launcher then keeps
bytecode in a per-image cache, so only its first start compiles; the
bench starts from an empty cache and prints that first (cold) start separately.
Goal (issue 5): kbundle ≤ 1.5× native start, and no slower than dockernel.

Kernels run on a bridge network by default (ports published on 127.0.0.1); `--network host`
is an opt-in. `--network-only` measures just those two, interleaved in the same run, on the
byte-compiled image, and prints bridge/host (goal: ≤ 1.10×).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LABEL = {"kbundle.test": "1", "kbundle.bench": "1"}


def env_image_tag(given: str | None) -> str:
    if given:
        return given
    import world

    return world.ensure_env_image(world.up())


def derived_image(client, base: str, tag: str, lines: str) -> str:
    dockerfile = f"FROM {base}\n{lines}\nLABEL kbundle.test=1 kbundle.bench=1\n"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    return tag


def write_spec(data_dir: Path, name: str, spec: dict) -> None:
    d = data_dir / "kernels" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps(spec))


async def one_run(kernel_name: str, cwd: str) -> tuple[float, float | None]:
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel_name)
    t0 = time.perf_counter()
    await km.start_kernel(cwd=cwd)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        start = time.perf_counter() - t0
        msg_id = kc.execute("import time; time.sleep(60)")
        interrupted_at = None
        interrupt = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                msg = await kc.get_iopub_msg(timeout=max(0.05, deadline - time.monotonic()))
            except Exception:
                break
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "execute_input" and interrupted_at is None:
                await asyncio.sleep(0.3)  # let the cell reach time.sleep, as a user's Ctrl-C would
                interrupted_at = time.perf_counter()
                await km.interrupt_kernel()
            elif msg["msg_type"] == "error" and interrupted_at is not None:
                interrupt = time.perf_counter() - interrupted_at
                break
        return start, interrupt
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


def container_ids(client) -> set[str]:
    return {c["Id"] for c in client.api.containers(all=True)}


def settled_run(client, name: str, cwd: str) -> tuple[float, float | None]:
    """One run, then a wait (up to 10 s) until the containers it made are gone: the engine's
    teardown of one variant's container (unmounts, its network namespace) must not land on
    the next variant's start. Containers that were there before (anyone's) are not waited for."""
    before = container_ids(client)
    result = asyncio.run(one_run(name, cwd))
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and container_ids(client) - before:
        time.sleep(0.05)
    return result


def cleanup_containers(client, images: list[str]) -> None:
    for c in client.api.containers(all=True):
        if c.get("Image") in images:
            try:
                client.api.remove_container(c["Id"], force=True)
            except Exception:
                pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--image", default=None)
    # `kbundle run` byte-compiles the environments it builds, so the compiled variant is the
    # one users get; the world's uncompiled env (a bare rattler install) is measured beside it.
    p.add_argument(
        "--no-pyc",
        dest="pyc",
        action="store_false",
        help="skip the container kernels on a byte-compiled env (as `kbundle run` builds them)",
    )
    p.add_argument("--keep-images", action="store_true", help="keep the derived images for the next run")
    p.add_argument("--network-only", action="store_true", help="only kbundle on a bridge vs on the host network")
    args = p.parse_args()
    if args.network_only:
        return network_only(args)

    import docker

    from kbundle.kernel.launcher import container_name  # noqa: F401  (kbundle importable)
    from kbundle.kernel.spec import KernelRequest, install_kernelspec

    client = docker.from_env(timeout=600)
    image = env_image_tag(args.image)
    dockernel_cmd = 'CMD ["sh", "-c", "exec python -m ipykernel_launcher -f \\"$DOCKERNEL_CONNECTION_FILE\\""]'
    if os.getuid() == 0:
        # dockernel runs the image's user and mounts Jupyter's connection file (0600, the
        # invoker's): a bench run as root needs root inside to read it. dockernel has no --user.
        dockernel_cmd = "USER root\n" + dockernel_cmd
    images = {"": image, "dockernel": derived_image(client, image, "kbundle-bench/dockernel:1", dockernel_cmd)}
    if args.pyc:
        compiled = derived_image(
            client,
            image,
            "kbundle-bench/pyc:1",
            "USER root\nRUN python -m compileall -q -j0 /opt/kbundle/env >/dev/null\nUSER kbundle",
        )
        images["pyc"] = compiled
        images["dockernel-pyc"] = derived_image(client, compiled, "kbundle-bench/dockernel-pyc:1", dockernel_cmd)

    data_dir = Path(tempfile.mkdtemp(prefix="kbk-kernel-bench-jupyter-"))
    work = Path(tempfile.mkdtemp(prefix="kbk-kernel-bench-work-"))
    os.environ["JUPYTER_DATA_DIR"] = str(data_dir)
    os.environ["KBUNDLE_CACHE_DIR"] = str(data_dir / "cache")  # a cold bytecode cache for the launcher
    os.environ["JUPYTER_PATH"] = str(data_dir)
    variants = {"native": "bench-native", "kbundle": "bench-kbundle", "dockernel": "bench-dockernel"}
    with_dockernel = importlib.util.find_spec("dockernel") is not None
    if not with_dockernel:  # its kernel would die at once ("Kernel died before replying to kernel_info")
        print("dockernel is not installed (pip install -e '.[bench]'): measuring without it", file=sys.stderr)
        del variants["dockernel"]
    write_spec(
        data_dir,
        "bench-native",
        {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "native",
            "language": "python",
            "interrupt_mode": "signal",
        },
    )
    install_kernelspec(KernelRequest("bench-kbundle", "bench", image, str(work), [], "bench"))

    def dockernel_spec(img):
        return {
            "argv": [sys.executable, "-m", "dockernel", "start", img, "{connection_file}"],
            "display_name": "dockernel",
            "language": "python",
            "interrupt_mode": "message",
        }

    write_spec(data_dir, "bench-dockernel", dockernel_spec(images["dockernel"]))
    if args.pyc:
        install_kernelspec(KernelRequest("bench-kbundle-pyc", "bench pyc", images["pyc"], str(work), [], "bench"))
        write_spec(data_dir, "bench-dockernel-pyc", dockernel_spec(images["dockernel-pyc"]))
        variants["kbundle (pyc env)"] = "bench-kbundle-pyc"
        if with_dockernel:
            variants["dockernel (pyc env)"] = "bench-dockernel-pyc"

    results: dict[str, dict[str, list[float]]] = {v: {"start": [], "interrupt": []} for v in variants}
    failures: dict[str, int] = {v: 0 for v in variants}
    try:
        first: dict[str, float] = {}
        for label, name in variants.items():  # warm-up: page cache, image layers, kbundle's bytecode cache
            first[label] = settled_run(client, name, str(work))[0]
        for r in range(args.rounds):
            for label, name in variants.items():
                start, interrupt = settled_run(client, name, str(work))
                results[label]["start"].append(start)
                if interrupt is None:
                    failures[label] += 1
                else:
                    results[label]["interrupt"].append(interrupt)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        cleanup_containers(client, list(images.values()))
        if not args.keep_images:
            for tag in reversed([t for t in images.values() if t != image]):  # children before parents
                try:
                    client.api.remove_image(tag)
                except docker.errors.APIError as exc:
                    print(f"could not remove {tag}: {exc}", file=sys.stderr)
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    med = {v: {k: (statistics.median(xs) if xs else float("nan")) for k, xs in d.items()} for v, d in results.items()}
    print(f"image {image}; {args.rounds} rounds; medians (seconds)")
    nan = {"start": float("nan"), "interrupt": float("nan")}
    print(f"{'variant':<22}{'start':>9}{'interrupt':>11}{'start/native':>14}{'start/dockernel':>17}")
    for v in variants:
        s, i = med[v]["start"], med[v]["interrupt"]
        failed = f"  ({failures[v]} interrupts not delivered)" if failures[v] else ""
        base_d = med.get("dockernel (pyc env)" if "pyc" in v else "dockernel", nan)["start"]
        print(f"{v:<22}{s:>9.3f}{i:>11.3f}{s / med['native']['start']:>13.2f}x{s / base_d:>16.2f}x{failed}")
    print(
        "first start of each variant (cold: kbundle's bytecode cache empty): "
        + ", ".join(f"{v} {t:.3f}" for v, t in first.items())
    )
    k, n, d = med["kbundle"], med["native"], med.get("dockernel", nan)
    # Round by round too: a load that comes and goes (a 2-core VM shared with other work) moves
    # both kernels of a round alike, and the median of their ratios shrugs it off.
    paired = {
        v: statistics.median(a / b for a, b in zip(d_["start"], results["native"]["start"], strict=True))
        for v, d_ in results.items()
    }
    print("start / native, round by round (median): " + ", ".join(f"{v} {r:.2f}x" for v, r in paired.items()))
    print(f"kbundle start / native start       = {k['start'] / n['start']:.2f}x (goal <= 1.5x)")
    print(f"kbundle start / dockernel start    = {k['start'] / d['start']:.2f}x (goal <= 1.0x)")
    print(f"kbundle interrupt / native         = {k['interrupt'] / n['interrupt']:.2f}x")
    print(f"kbundle interrupt / dockernel      = {k['interrupt'] / d['interrupt']:.2f}x")
    if args.pyc:
        kp, dp = med["kbundle (pyc env)"], med.get("dockernel (pyc env)", nan)
        print(f"kbundle start / native (pyc env)   = {kp['start'] / n['start']:.2f}x")
        print(f"kbundle start / dockernel (pyc env)= {kp['start'] / dp['start']:.2f}x")
    return 0


def network_only(args) -> int:
    """kbundle's kernel on its default bridge vs `--network host`: same image, same run, interleaved."""
    import docker

    from kbundle.kernel.spec import KernelRequest, install_kernelspec

    client = docker.from_env(timeout=600)
    image = env_image_tag(args.image)
    compiled = image
    if args.pyc:
        compiled = derived_image(
            client,
            image,
            "kbundle-bench/pyc:1",
            "USER root\nRUN python -m compileall -q -j0 /opt/kbundle/env >/dev/null\nUSER kbundle",
        )
    data_dir = Path(tempfile.mkdtemp(prefix="kbk-kernel-bench-jupyter-"))
    work = Path(tempfile.mkdtemp(prefix="kbk-kernel-bench-work-"))
    os.environ.update(JUPYTER_DATA_DIR=str(data_dir), JUPYTER_PATH=str(data_dir), KBUNDLE_CACHE_DIR=str(data_dir / "c"))
    variants = {"bridge": "bench-bridge", "host": "bench-host"}
    for label, name in variants.items():
        install_kernelspec(KernelRequest(name, name, compiled, str(work), [], "bench", network=label))
    starts: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for name in variants.values():
            settled_run(client, name, str(work))  # warm-up
        for r in range(args.rounds):
            for label, name in variants.items():
                starts[label].append(settled_run(client, name, str(work))[0])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        cleanup_containers(client, [compiled])
        if compiled != image and not args.keep_images:
            client.api.remove_image(compiled, force=True)  # auto-removed kernels may linger a moment
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    med = {v: statistics.median(xs) for v, xs in starts.items()}
    print(f"image {compiled}; {args.rounds} rounds; start medians (seconds)")
    for v, xs in starts.items():
        print(f"{v:<8}{med[v]:>8.3f}   all: {', '.join(f'{x:.3f}' for x in xs)}")
    paired = statistics.median(b / h for b, h in zip(starts["bridge"], starts["host"], strict=True))
    print(
        f"bridge start / host start = {med['bridge'] / med['host']:.2f}x (goal <= 1.10x); round by round {paired:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
