"""CLI conventions: -h everywhere, examples, completion, --json errors, exit codes, engine timeouts.

Everything here runs without Docker (a hung engine is a TCP server that never answers)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from helpers import assert_one_error_line, kbundle

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "warp-speed"

COMMANDS = [
    [],
    ["pack"],
    ["inspect"],
    ["verify"],
    ["run"],
    ["doctor"],
    ["kernels"],
    ["kernels", "list"],
    ["kernels", "remove"],
    ["gc"],
    ["trust"],
    ["trust", "add"],
    ["trust", "list"],
]


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """Every command's -h, rendered by the real CLI once (in process: 13 subprocesses are slow)."""
    import contextlib
    import os

    from kbundle import cli

    out = {}
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"
    try:
        for path in COMMANDS:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                assert cli._run_app([*path, "-h"]) == 0
            out[" ".join(path)] = buffer.getvalue()
    finally:
        os.environ.pop("COLUMNS") if saved is None else os.environ.update(COLUMNS=saved)
    return out


@pytest.mark.parametrize("path", [" ".join(p) for p in COMMANDS])
def test_dash_h_works_shows_an_example_and_no_bool_placeholder(helps, path):
    text = helps[path]
    assert "Usage:" in text
    assert "<bool>" not in text
    if path:
        assert "Example: kbundle " + path.split()[0] in text


def test_dash_h_in_a_subprocess_too():
    result = kbundle("run", "-h")
    assert result.returncode == 0 and "--progress" in result.stdout and "<bool>" not in result.stdout


def test_install_completion_writes_the_shell_script(tmp_path):
    result = kbundle("--install-completion", "bash", env={"HOME": str(tmp_path), "SHELL": "/bin/bash"})
    assert result.returncode == 0, result.stderr
    script = tmp_path / ".bash_completions" / "kbundle.sh"
    assert "_KBUNDLE_COMPLETE" in script.read_text()


def test_missing_bundle_is_a_usage_error(tmp_path):
    for command in ("verify", "inspect", "run", "doctor"):
        result = kbundle(command, tmp_path / "absent.kbundle")
        assert_one_error_line(result, "absent.kbundle", "does not exist")
        assert result.returncode == 2, (command, result.stderr)


def test_json_failure_is_an_object_on_stdout_with_the_same_code(tmp_path):
    result = kbundle("verify", tmp_path / "absent.kbundle", "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout) == {
        "error": {"code": 2, "message": f"{tmp_path / 'absent.kbundle'} does not exist or is not a file"}
    }
    assert_one_error_line(result, "does not exist")
    usage = kbundle("kernels", "list", "--json", "--bogus")
    assert usage.returncode == 2 and json.loads(usage.stdout)["error"]["code"] == 2


def test_damaged_bundle_is_exit_3_in_json_too(tmp_path):
    bad = tmp_path / "bad.kbundle"
    bad.write_bytes(b"not a zip at all")
    result = kbundle("verify", bad, "--json")
    assert result.returncode == 3 and json.loads(result.stdout)["error"]["code"] == 3


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "warp-speed.kbundle"
    result = kbundle("pack", EXAMPLE / "warp-speed.ipynb", "-e", EXAMPLE / "environment.yml", "-o", out)
    assert result.returncode == 0, result.stderr
    return out


def test_verify_json(small_bundle):
    result = kbundle("verify", small_bundle, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["members"] >= 1 and data["signature"]["state"] == "unsigned"


@pytest.fixture
def hung_engine():
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_hung_engine_times_out_in_doctor_and_run(hung_engine, small_bundle, tmp_path):
    env = {"DOCKER_HOST": hung_engine, "KBUNDLE_CACHE_DIR": str(tmp_path / "cache")}
    start = time.monotonic()
    doctor = kbundle("doctor", env=env, timeout=40)
    assert time.monotonic() - start < 25
    assert_one_error_line(doctor, "did not answer within 10 s", "--engine-timeout")
    assert doctor.returncode == 4
    run = kbundle("run", small_bundle, "--yes", "--engine-timeout", "2", cwd=tmp_path, env=env, timeout=40)
    assert_one_error_line(run, "did not answer within 2 s")
    assert run.returncode == 4
    assert not (tmp_path / "warp-speed").exists(), "the failed run left its workdir"


def test_doctor_with_a_bundle_checks_its_needs_even_without_an_engine(hung_engine, small_bundle, tmp_path):
    env = {"DOCKER_HOST": hung_engine, "KBUNDLE_CACHE_DIR": str(tmp_path / "cache")}
    result = kbundle("doctor", small_bundle, "--engine-timeout", "1", env=env, timeout=40)
    assert result.returncode == 4
    marks = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert marks["docker"] == "fail" and marks["bundle"] == "ok"
    assert marks["gpu"] == "warn" and "CUDA 10.1" in result.stdout  # no GPU here: it runs on CPU
    assert marks["disk"] == "warn"  # unlocked: its size is known only after a solve
    data = json.loads(kbundle("doctor", small_bundle, "--json", "--engine-timeout", "1", env=env, timeout=40).stdout)
    assert data["error"]["code"] == 4 and data["cuda"] == "10.1"


# ----------------------------------------------------------------- in process


def test_os_errors_name_errno_and_path():
    import errno

    from kbundle.cli import describe_os_error

    full = OSError(errno.ENOSPC, "No space left on device", "/var/cache/x")
    assert describe_os_error(full) == "no space left on device (ENOSPC): /var/cache/x"
    assert "(EROFS): /ro" in describe_os_error(OSError(errno.EROFS, "Read-only file system", "/ro"))


def test_the_consent_question_keeps_its_brackets():
    from rich.console import Console

    from kbundle.flows import review

    console = Console(file=io.StringIO(), force_terminal=False)
    stdin = io.StringIO("n\n")
    import sys

    saved, sys.stdin = sys.stdin, stdin
    try:
        assert review._ask(console, "Build it? [y/N] ") is False
    finally:
        sys.stdin = saved
    assert console.file.getvalue() == "Build it? [y/N] "


def test_plain_progress_is_throttled_to_one_line_per_interval():
    from kbundle.progress import Meter, PlainConsole

    now = [0.0]
    out = io.StringIO()
    console = PlainConsole(out, clock=lambda: now[0])
    with console.status("installing 3 conda packages") as status:
        meter = Meter("installing conda packages", 3, on_change=status.update, clock=lambda: now[0])
        meter.plan_bytes(120_000_000)
        for _ in range(20):  # 20 updates in 2 s: none printed (the step's first line was just now)
            now[0] += 0.1
            meter.add_bytes(1_000_000)
        now[0] += 5
        meter.add_bytes(25_000_000)
        meter.item_done()  # within the interval: not printed
        status.finish("installed 3 conda packages")
    lines = out.getvalue().splitlines()
    assert lines == [
        "installing 3 conda packages",
        "installing conda packages: 0/3, 42.9 MiB of 114.4 MiB, 6.1 MiB/s, ETA 12 s",
        "installed 3 conda packages",
    ]


def test_progress_none_still_prints_warnings_and_the_review():
    from kbundle.progress import reporter

    out = io.StringIO()
    console = reporter("none", out)
    with console.status("installing") as status:
        status.update("installing: 1/2")
    console.print("[yellow]warning:[/] careful")
    assert out.getvalue() == "warning: careful\n"


def test_unknown_progress_mode_is_a_usage_error():
    from kbundle.errors import UsageError
    from kbundle.progress import reporter

    with pytest.raises(UsageError):
        reporter("fancy")


def test_every_command_takes_json(helps):
    leaves = [p for p in helps if p and p not in ("kernels", "trust")]
    missing = {p for p in leaves if "--json" not in helps[p]}
    assert not missing, missing


def test_a_full_disk_while_downloading_names_enospc_and_the_file(tmp_path):
    import errno

    from kbundle.image.env import _disk_error

    error = _disk_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "numpy.conda")
    assert str(error) == f"no space left on device (ENOSPC): {tmp_path / 'numpy.conda'}"


def test_the_engine_line_warns_without_gpu_passthrough_and_refusals_are_machine_errors():
    from kbundle.errors import MachineError
    from kbundle.image import preflight

    engine = preflight.EngineFacts(True, "unix:///var/run/docker.sock", version="24", runtimes=("runc",))
    nvml = preflight.NvmlFacts(False, "no NVML")
    report = preflight.evaluate(engine, nvml, "12.1", preflight.GpuRequest.parse("all"))
    assert {f.topic: f.level for f in report.findings}["engine"] == preflight.WARN
    with pytest.raises(MachineError) as refused:
        report.raise_for_errors()
    assert refused.value.exit_code == 4 and "--gpus none" in str(refused.value)
