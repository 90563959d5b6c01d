"""Faults a run must survive: concurrent runs of one bundle in one folder interrupted in turn,
`kbundle run` killed (SIGKILL) at its slow steps and then run again, and a disk that fills.

Three runs that share a folder share its notebook and `.kbundle/` scratch: an interrupted run
removes only what it alone made (flows/undo.py), so every run that exits 0 leaves a kernel that
starts. A killed run leaves what SIGKILL leaves (partial downloads, a build context, a build's
container); the plain rerun heals it and succeeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers import KBUNDLE, pack_world_bundle, printed_by_kernel, run_env_for, run_kbundle

pytestmark = pytest.mark.docker

SLEEP = 12  # seconds the slow build step takes: long enough to interrupt a run in it


@pytest.fixture(scope="module")
def world_bundle(world, tmp_path_factory) -> Path:
    """The world's locked bundle (python, numpy, ipykernel; tabulate from pip), packed once."""
    root = tmp_path_factory.mktemp("faults")
    env = run_env_for(root)
    return pack_world_bundle(world, env, root / "sender", f"kbf-{uuid.uuid4().hex[:8]}")


def reseal(bundle: Path, target: Path, name: str, *, step: str = "", unlock_pip: bool = False) -> Path:
    """`bundle` under another name (so another image and kernel), resealed so that it verifies:
    with `step` after FROM in its shipped Dockerfile (built with --use-bundled-dockerfile), and
    with `unlock_pip` its pip section unlocked (pip resolves it against the world's index)."""
    from kbundle.bundle import open_bundle, write_bundle

    b = open_bundle(bundle)
    members = {k: b.read(k) for k in b.members}
    if step:
        lines = b.dockerfile_text.splitlines(keepends=True)
        at = next(i for i, ln in enumerate(lines) if ln.startswith("FROM ")) + 1
        members["Dockerfile"] = "".join(lines[:at] + [step + "\n"] + lines[at:]).encode()
    changes: dict = {"name": name, "content_hash": ""}
    if unlock_pip:
        changes["pip_locked"] = False
    write_bundle(target, dataclasses.replace(b.manifest, **changes), members)
    return target


def slow_bundle(world_bundle: Path, folder: Path, name: str) -> tuple[Path, str]:
    """A bundle whose build has a RUN step of SLEEP seconds, and the step's mark: unique to it,
    so that no build cache hit skips it and its container is told from others'."""
    mark = uuid.uuid4().hex
    step = f"RUN echo {mark} && sleep {SLEEP}"
    return reseal(world_bundle, folder / f"{name}.kbundle", name, step=step), mark


class Run:
    """One `kbundle run` in a subprocess, its stderr in a file to read while it runs."""

    def __init__(self, args: list, env: dict, cwd: Path, label: str):
        self.err_path = cwd.parent / f"{cwd.name}-{label}.err"
        self.out_path = cwd.parent / f"{cwd.name}-{label}.out"
        with open(self.err_path, "w") as err, open(self.out_path, "w") as out:
            self.proc = subprocess.Popen([KBUNDLE, *map(str, args)], env=env, cwd=cwd, stdout=out, stderr=err)

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def waiting(self) -> bool:
        return "waiting for it" in self.err

    @property
    def building_after_wait(self) -> bool:
        """Whether this run, once told to wait, took the image lock and builds."""
        return "conda packages" in self.err.partition("waiting for it")[2]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)


def until(condition, timeout: float, what: str, runs=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or (runs and all(r.proc.poll() is not None for r in runs)):
            details = "\n".join(f"--- run {i}: rc={r.proc.poll()}\n{r.err[-2000:]}" for i, r in enumerate(runs))
            for r in runs:
                r.signal(signal.SIGKILL)
            pytest.fail(f"{what}\n{details}")
        time.sleep(0.1)


def step_containers(docker_client, mark: str) -> set[str]:
    """The running containers of the slow build step marked `mark` (the legacy builder's `Running in`)."""
    return {c["Id"] for c in docker_client.api.containers() if mark in (c.get("Command") or "")}


def notebook_in(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.ipynb"))


def kernel_of(env: dict, name: str) -> dict:
    listed = run_kbundle(["kernels", "list", "--json"], env)
    kernels = [k for k in json.loads(listed.stdout) if k["name"] == f"kbundle-{name}"]
    assert len(kernels) == 1, listed.stdout
    return kernels[0]


def assert_kernel_starts(env: dict, name: str) -> None:
    """The registered kernel of bundle `name` has its workdir, and runs `print(1+1)`."""
    kernel = kernel_of(env, name)
    assert Path(kernel["workdir"]).is_dir(), kernel
    saved = os.environ.get("JUPYTER_DATA_DIR")
    os.environ["JUPYTER_DATA_DIR"] = env["JUPYTER_DATA_DIR"]
    try:
        assert printed_by_kernel(f"kbundle-{name}", "print(1+1)").strip() == "2"
    finally:
        if saved is None:
            os.environ.pop("JUPYTER_DATA_DIR", None)
        else:
            os.environ["JUPYTER_DATA_DIR"] = saved


def remove_images(docker_client, name: str) -> None:
    for image in docker_client.images.list(name=f"kbundle/{name}"):
        docker_client.api.remove_image(image.id, force=True)


def assert_clean_ends(runs: list[Run]) -> list[int]:
    """Every run ended with 0 or 130 (interrupted), one `error:` line at most, no ENOENT, no traceback."""
    codes = [r.wait() for r in runs]
    for r, code in zip(runs, codes, strict=True):
        err = r.err
        assert code in (0, 130), err
        assert "Traceback" not in err and "ENOENT" not in err and "No such file" not in err, err
        if code == 130:
            assert err.strip().splitlines()[-1] == "error: interrupted", err
    return codes


# ----------------------------------------------------------------- three runs, one folder


@pytest.mark.parametrize(
    ("first", "second"), [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)], ids=["TERM", "INT"]
)
def test_three_runs_in_one_folder_interrupted_in_turn(first, second, world, world_bundle, docker_client, tmp_path):
    """Three runs of one bundle in one folder: the builder is interrupted while it builds, then a
    run waiting on the image lock, then the new builder just after its build. Every run that
    exits 0 leaves a kernel that starts; no run trips on a file another removed."""
    name = f"kbf-three-{first.name[3:].lower()}-{uuid.uuid4().hex[:6]}"
    bundle, mark = slow_bundle(world_bundle, tmp_path, name)
    env = run_env_for(tmp_path)
    cwd = tmp_path / "here"
    cwd.mkdir()
    args = ["run", bundle, "--yes", "--use-bundled-dockerfile"]
    runs = [Run(args, env, cwd, f"r{i}") for i in range(3)]
    try:
        # 1. the builder, while its slow step runs
        until(lambda: sum(r.waiting for r in runs) == 2, 300, "two runs were not waiting on the image lock", runs)
        builder = next(r for r in runs if not r.waiting)
        until(lambda: step_containers(docker_client, mark), 300, "the slow step did not run", runs)
        seen = step_containers(docker_client, mark)
        builder.signal(first)
        until(lambda: builder.proc.poll() is not None, 120, "the interrupted builder did not end", runs)
        assert builder.proc.returncode == 130, builder.err
        assert notebook_in(cwd / name), "the interrupted run removed the shared folder"

        # 2. a run waiting on the image lock, while the next builder builds
        others = [r for r in runs if r is not builder]
        until(lambda: step_containers(docker_client, mark) - seen, 300, "the second build's step did not run", runs)
        until(lambda: any(r.building_after_wait for r in others), 60, "no run took over the build", runs)
        waiter = next(r for r in others if not r.building_after_wait)
        time.sleep(1)
        waiter.signal(second)
        until(lambda: waiter.proc.poll() is not None, 120, "the interrupted waiter did not end", runs)

        # 3. the last one, just after its image is tagged
        last = next(r for r in others if r is not waiter)
        until(
            lambda: docker_client.images.list(name=f"kbundle/{name}") or last.proc.poll() is not None,
            300,
            "the image was not built",
            runs,
        )
        last.signal(first)
        codes = assert_clean_ends(runs)
        assert codes[runs.index(builder)] == 130
        if 0 in codes:
            assert_kernel_starts(env, name)
        # The folder stays while a kernel or another run relies on it; else the run that made it removed it.
        if 0 in codes:
            assert notebook_in(cwd / name)

        # A plain rerun in the folder succeeds and its kernel starts.
        again = run_kbundle(args, env, cwd=cwd, timeout=600)
        assert again.returncode == 0, again.stderr
        assert_kernel_starts(env, name)
    finally:
        for r in runs:
            r.signal(signal.SIGKILL)
        remove_images(docker_client, name)


# ----------------------------------------------------------------- SIGKILL, then a plain rerun


class SlowChannel:
    """The world's conda channel served at `rate` bytes per second per file (with Range), so that
    a run can be killed while it downloads; `fast()` lifts the limit."""

    def __init__(self, root: Path, rate: int = 512 * 1024):
        import http.server
        import threading

        channel = self
        self.rate = rate

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = Path(self.translate_path(self.path))
                if not path.is_file():
                    return super().do_GET()
                data = path.read_bytes()
                start = 0
                wanted = self.headers.get("Range", "")
                if wanted.startswith("bytes=") and wanted[6:].split("-")[0].isdigit():
                    start = min(int(wanted[6:].split("-")[0]), len(data))
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                try:
                    for at in range(start, len(data), 64 * 1024):
                        self.wfile.write(data[at : at + 64 * 1024])
                        if channel.rate:
                            time.sleep(64 * 1024 / channel.rate)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fast(self) -> None:
        self.rate = 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def moved_to(bundle: Path, target: Path, name: str, old_url: str, new_url: str) -> Path:
    """`bundle` under `name`, its channel (lock, manifest) moved from `old_url` to `new_url`."""
    from kbundle.bundle import open_bundle, write_bundle

    b = open_bundle(bundle)
    members = {k: b.read(k) for k in b.members}
    lock = b.manifest.lock
    members[lock] = members[lock].replace(old_url.encode(), new_url.encode())
    m = b.manifest
    manifest = dataclasses.replace(
        m,
        name=name,
        content_hash="",
        channels=[c.replace(old_url, new_url) for c in m.channels],
        channel_urls=[c.replace(old_url, new_url) for c in m.channel_urls],
    )
    write_bundle(target, manifest, members)
    return target


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every descendant of `pid`, from /proc."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
    found, frontier = [], {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier}
        found += [(p, commands[p]) for p in frontier]
    return found


def killed_then_rerun(args: list, env: dict, cwd: Path, name: str, when, what: str, before_rerun=None) -> str:
    """Start `kbundle run`, SIGKILL it once `when(run)` holds, then run it again plainly: the rerun
    succeeds and its kernel starts. The killed run's stderr."""
    run = Run(args, env, cwd, "killed")
    until(lambda: when(run), 300, f"the run never reached {what}", [run])
    run.proc.kill()
    run.wait(30)
    killed = run.err
    if before_rerun:
        before_rerun()
    again = run_kbundle(args, env, cwd=cwd, timeout=600)
    assert again.returncode == 0, f"the rerun after a SIGKILL {what} failed:\n{again.stderr}\n--- killed run:\n{killed}"
    assert "Traceback" not in again.stderr
    assert_kernel_starts(env, name)
    cache = Path(env["KBUNDLE_CACHE_DIR"])
    parts = [str(p) for p in cache.rglob("*.part")]
    assert not parts, f"the rerun left the killed run's partial downloads: {parts}"
    contexts = cache / "contexts"
    left = list(contexts.iterdir()) if contexts.is_dir() else []
    assert not left, f"the rerun left the killed run's build context: {left}"
    return killed


def test_sigkill_during_the_conda_download_then_rerun(world, world_bundle, docker_client, tmp_path):
    name = f"kbf-kill-dl-{uuid.uuid4().hex[:6]}"
    slow = SlowChannel(Path(world["channel_path"]))
    try:
        bundle = moved_to(world_bundle, tmp_path / f"{name}.kbundle", name, world["channel"], slow.url)
        env = run_env_for(tmp_path)
        cwd = tmp_path / "here"
        cwd.mkdir()
        pkgs = Path(env["KBUNDLE_CACHE_DIR"]) / "conda-archives"

        def downloading(run) -> bool:
            return pkgs.is_dir() and any(p.name.endswith(".part") and p.stat().st_size for p in pkgs.rglob("*"))

        # --rebuild: the engine may hold this environment's step images from other tests (image/chain.py),
        # and then nothing would be downloaded.
        args = ["run", bundle, "--yes", "--rebuild"]
        killed_then_rerun(args, env, cwd, name, downloading, "during the conda download", slow.fast)
    finally:
        slow.close()
        remove_images(docker_client, name)


def test_sigkill_during_pips_resolve_then_rerun(world, world_bundle, docker_client, tmp_path):
    """An unlocked pip line, resolved by pip against the world's index: killed while pip resolves."""
    from kbundle.bundle import open_bundle, write_bundle

    name = f"kbf-kill-pip-{uuid.uuid4().hex[:6]}"
    b = open_bundle(world_bundle)
    manifest = dataclasses.replace(
        b.manifest,
        name=name,
        content_hash="",
        pip=["kbb-01"],
        pip_locked=False,
        pip_indexes={"index_url": world["pypi_index"], "extra_index_urls": [], "find_links": []},
    )
    bundle = tmp_path / f"{name}.kbundle"
    write_bundle(bundle, manifest, {k: b.read(k) for k in b.members})
    env = dict(run_env_for(tmp_path), PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="")
    cwd = tmp_path / "here"
    cwd.mkdir()

    def resolving(run) -> bool:
        return any("--dry-run" in cmd for _, cmd in children_of(run.proc.pid))

    try:
        killed_then_rerun(["run", bundle, "--yes"], env, cwd, name, resolving, "during pip's resolve")
    finally:
        remove_images(docker_client, name)


def test_sigkill_during_the_image_build_then_rerun(world, world_bundle, docker_client, tmp_path):
    name = f"kbf-kill-build-{uuid.uuid4().hex[:6]}"
    bundle, mark = slow_bundle(world_bundle, tmp_path, name)
    env = run_env_for(tmp_path)
    cwd = tmp_path / "here"
    cwd.mkdir()
    try:
        killed_then_rerun(
            ["run", bundle, "--yes", "--use-bundled-dockerfile"],
            env,
            cwd,
            name,
            lambda run: step_containers(docker_client, mark),
            "during the image build",
        )
        assert not step_containers(docker_client, mark), "the killed build's step still runs"
    finally:
        remove_images(docker_client, name)


# ----------------------------------------------------------------- a disk that fills mid-run


@pytest.fixture
def small_tmpfs(tmp_path, mount_tmpfs):
    """A 20 MiB tmpfs (root only), unmounted afterwards whatever happens."""
    return mount_tmpfs(tmp_path / "small", "size=20m")


def test_a_cache_that_fills_mid_run_is_exit_4_naming_it(world, world_bundle, docker_client, tmp_path, small_tmpfs):
    """An unlocked bundle has no estimate before its solve, so nothing refuses it ahead: the cache's
    disk fills while the run downloads and unpacks. Exit 4, one line naming the full place."""
    from kbundle.bundle import open_bundle, write_bundle

    name = f"kbf-full-{uuid.uuid4().hex[:6]}"
    b = open_bundle(world_bundle)
    members = {k: b.read(k) for k in b.members if k != b.manifest.lock}
    manifest = dataclasses.replace(b.manifest, name=name, content_hash="", locked=False, lock=None)
    bundle = tmp_path / f"{name}.kbundle"
    write_bundle(bundle, manifest, members)
    env = run_env_for(tmp_path)
    env["KBUNDLE_CACHE_DIR"] = str(small_tmpfs / "cache")
    cwd = tmp_path / "here"
    cwd.mkdir()
    proc = run_kbundle(["run", bundle, "--yes"], env, cwd=cwd, timeout=600)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 4, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "ENOSPC" in errors[0] and str(small_tmpfs) in errors[0], errors[0]
    assert not (cwd / name).exists(), "the failed run left the folder it made"
    assert not docker_client.images.list(name=f"kbundle/{name}")
