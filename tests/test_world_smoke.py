"""The offline world is real: its channel solves and installs, and its packages run in a container."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import world as world_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def staged_env(world, tmp_path_factory) -> tuple[Path, list]:
    staging = tmp_path_factory.mktemp("stage") / "env"
    records = world_module.solve_and_install(world["channel"], world_module.ENV_SPECS, staging)
    return staging, records


def test_world_up_prints_json_last_and_is_fast_the_second_time(world):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.world", "up"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["base_image"] == world["base_image"]
    assert info["channel"].startswith("http://127.0.0.1:")
    assert info["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert elapsed < 5, f"a second `up` took {elapsed:.1f}s"


def test_channel_is_indexed_and_served_over_http(world):
    import urllib.request

    for subdir in ("linux-64", "noarch"):
        with urllib.request.urlopen(f"{world['channel']}{subdir}/repodata.json", timeout=5) as resp:
            repodata = json.load(resp)
        assert repodata["info"]["subdir"] == subdir
    linux = json.loads((Path(world["channel_path"]) / "linux-64" / "repodata.json").read_text())
    noarch = json.loads((Path(world["channel_path"]) / "noarch" / "repodata.json").read_text())
    names = {r["name"] for r in linux["packages"].values()} | {r["name"] for r in noarch["packages"].values()}
    assert {"python", "numpy", "ipykernel", "pip", "pyzmq", "tornado", "traitlets"} <= names
    assert any(r.get("noarch") == "python" for r in noarch["packages"].values())


def test_rattler_solves_and_installs_with_final_prefix(world, staged_env):
    staging, records = staged_env
    assert {"python", "ipykernel", "numpy"} <= {r.name.normalized for r in records}
    assert all(str(r.subdir) in ("linux-64", "noarch") for r in records)
    py = f"python{world['python']}"
    assert (staging / "bin" / py).is_file()
    assert (staging / "lib" / py / "site-packages" / "ipykernel" / "kernelapp.py").is_file()
    assert (staging / "lib" / py / "site-packages" / "numpy" / "__init__.py").is_file()
    assert any((staging / "conda-meta").glob("numpy-*.json"))
    # Text files were relocated for the in-image prefix, not for the staging directory.
    sysconfigdata = next((staging / "lib" / py).glob("_sysconfigdata_*.py")).read_text()
    assert f"'prefix': '{world_module.ENV_PREFIX}'" in sysconfigdata
    shebang = (staging / "bin" / "jupyter").read_text().splitlines()[0]
    assert shebang.startswith(f"#!{world_module.ENV_PREFIX}/bin/python")
    assert world_module.PLACEHOLDER not in sysconfigdata


def test_image_from_base_runs_the_envs_python(world, staged_env, docker_client, tmp_path):
    staging, records = staged_env
    tag = f"kbundle-test/smoke:{uuid.uuid4().hex[:8]}"
    world_module.write_env_context(tmp_path / "ctx", world["base_image"], staging)
    world_module.build_image(tmp_path / "ctx", tag, {"kbundle.test": "1"})
    try:
        code = "import sys, numpy, ipykernel; print(sys.executable, numpy.__version__, ipykernel.__version__)"
        out = (
            docker_client.containers.run(tag, [f"{world_module.ENV_PREFIX}/bin/python", "-c", code], remove=True)
            .decode()
            .split()
        )
        assert out[0].startswith(world_module.ENV_PREFIX)
        channel_numpy = next(r.version for r in records if r.name.normalized == "numpy")
        assert out[1] == str(channel_numpy)
        # The base image has no python of its own: what ran came from the env.
        probe = (
            docker_client.containers.run(
                world["base_image"], ["sh", "-c", "command -v python3 || echo none"], remove=True
            )
            .decode()
            .strip()
        )
        assert probe == "none"
    finally:
        docker_client.images.remove(tag, force=True)


async def test_kernel_in_container_answers_execute_request(env_image, docker_client, tmp_path):
    """A jupyter_client client talks to ipykernel in a container (host network, connection file mounted)."""
    from jupyter_client import AsyncKernelClient
    from jupyter_client.connect import write_connection_file

    conn_file, info = write_connection_file(str(tmp_path / "kernel.json"), ip="127.0.0.1")
    os.chmod(conn_file, 0o644)  # readable by the kernel's user in the container
    # As this user, like kbundle's launcher: the image's own user (`kbundle`) cannot enter tmp_path.
    container = docker_client.containers.run(
        env_image,
        ["python", "-m", "ipykernel_launcher", "-f", "/conn/kernel.json"],
        network_mode="host",
        volumes={str(tmp_path): {"bind": "/conn", "mode": "rw"}},
        user=f"{os.getuid()}:{os.getgid()}",
        detach=True,
        labels={"kbundle.test": "1"},
    )
    outputs: list[dict] = []
    client = AsyncKernelClient()
    client.load_connection_file(conn_file)
    client.start_channels()
    try:
        # A client without a manager judges liveness by heartbeat: wait until the kernel is listening.
        deadline = time.monotonic() + 60
        while b"--existing" not in container.logs():
            assert time.monotonic() < deadline, container.logs().decode()
            container.reload()
            assert container.status in ("created", "running"), container.logs().decode()
            time.sleep(0.1)
        await client.wait_for_ready(timeout=60)
        reply = await client.execute_interactive(
            "import sys, numpy; print(sys.prefix, numpy.__version__)",
            timeout=30,
            output_hook=lambda msg: outputs.append(msg),
        )
        assert reply["content"]["status"] == "ok"
        text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert text.startswith(world_module.ENV_PREFIX + " ")
    finally:
        client.stop_channels()
        container.remove(force=True)
