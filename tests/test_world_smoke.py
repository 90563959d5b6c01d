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


@pytest.mark.docker
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


@pytest.mark.docker
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


@pytest.mark.docker
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


@pytest.mark.docker
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


@pytest.mark.docker
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


def _manifest_digest(registry: str, name: str, tag: str) -> str:
    import urllib.request

    request = urllib.request.Request(
        f"http://{registry}/v2/{name}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.headers["Docker-Content-Digest"]


def _file_in_image(docker_client, ref: str, path: str) -> bytes:
    """A file's bytes, read from a created (never started) container: no logs to race with."""
    import io
    import tarfile

    container = docker_client.containers.create(ref, ["true"])
    try:
        stream, _ = container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            return tar.extractfile(tar.getmembers()[0]).read()
    finally:
        container.remove(force=True)


@pytest.mark.docker
def test_registry_push_pull_round_trip(world, registry, docker_client):
    """An image pushed to the world's registry, removed here and pulled back, is the same image."""
    import io
    import tarfile
    import urllib.request

    import docker.errors

    name, tag = "kbundle-test/smoke", uuid.uuid4().hex[:12]
    ref = f"{registry}/{name}:{tag}"
    # A tiny layer of our own on the world's base: the pull below must download it for real.
    payload = tarfile.TarInfo("kbundle-smoke")
    payload.size = len(tag)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.addfile(payload, io.BytesIO(tag.encode()))
    container = docker_client.containers.create(world["base_image"], ["true"])
    try:
        container.put_archive("/", archive.getvalue())
        pushed = container.commit(f"{registry}/{name}", tag)
    finally:
        container.remove(force=True)
    try:
        for line in docker_client.images.push(f"{registry}/{name}", tag, stream=True, decode=True):
            assert "error" not in line, line
        with urllib.request.urlopen(f"http://{registry}/v2/{name}/tags/list", timeout=10) as resp:
            assert tag in json.load(resp)["tags"]
        docker_client.images.remove(ref)
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(pushed.id)
        pulled = docker_client.images.pull(f"{registry}/{name}", tag)
        assert pulled.id == pushed.id
        assert _file_in_image(docker_client, ref, "/kbundle-smoke") == tag.encode()
    finally:
        digest = _manifest_digest(registry, name, tag)
        delete = urllib.request.Request(f"http://{registry}/v2/{name}/manifests/{digest}", method="DELETE")
        with urllib.request.urlopen(delete, timeout=10) as resp:
            assert resp.status == 202
        try:
            docker_client.images.remove(ref, force=True)
        except docker.errors.ImageNotFound:
            pass


@pytest.mark.docker
def test_srun_runs_on_the_worlds_node(slurm):
    # No --gres, no account, no time limit: the default partition takes a bare srun.
    proc = subprocess.run(["srun", "-p", slurm["partition"], "hostname"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == slurm["node"]


@pytest.mark.docker
def test_srun_forwards_stdin_and_its_eof(slurm):
    """What a kernel launched through srun relies on: the task reads srun's stdin, and sees it close."""
    import threading

    proc = subprocess.Popen(
        ["srun", "-p", slurm["partition"], "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # A watchdog, so that a srun that never forwards fails the test instead of hanging it.
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        proc.stdin.write("first line\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "first line\n"  # forwarded while srun's stdin is still open
        proc.stdin.close()
        # cat exits only on EOF: a hang here means srun did not pass the close on.
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert proc.stdout.read() == ""
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("state", "usable"),
    [
        ("idle", True),
        ("mixed", True),
        ("allocated", True),
        ("completing", True),
        ("idle*", False),  # not responding
        ("down", False),
        ("drained", False),
        ("", False),  # sinfo did not answer
    ],
)
def test_slurm_node_states_that_up_reuses(state, usable):
    assert world_module.slurm.node_usable(state) is usable


@pytest.mark.docker
def test_world_json_names_the_registry_and_the_cluster(world, registry, slurm):
    import re
    import socket

    assert re.fullmatch(r"127\.0\.0\.1:\d+", registry)
    assert set(slurm) == {"conf", "partition", "node", "cpus"}
    assert Path(slurm["conf"]).is_file()
    assert os.environ["SLURM_CONF"] == slurm["conf"]
    assert slurm["partition"] == "debug"
    assert slurm["node"] == socket.gethostname().split(".")[0]
    assert slurm["cpus"] == os.cpu_count()


@pytest.mark.docker
def test_up_reuses_the_running_registry_and_cluster(world, registry, slurm):
    root = Path(world["world_dir"])
    before = json.loads((root / "slurm" / "slurm.json").read_text())["pids"]
    registry_pid = json.loads((root / "registry" / "registry.json").read_text())["pid"]
    start = time.monotonic()
    assert world_module.ensure_registry(root) == {"registry": registry}
    assert world_module.ensure_slurm(root) == {"slurm": slurm}
    elapsed = time.monotonic() - start
    assert json.loads((root / "slurm" / "slurm.json").read_text())["pids"] == before
    assert json.loads((root / "registry" / "registry.json").read_text())["pid"] == registry_pid
    assert elapsed < 1, f"reusing the registry and the cluster took {elapsed:.2f}s"


# ---------------------------------------------------------------- the world's Pythons (KBUNDLE_WORLD_PYTHONS)


@pytest.mark.docker
async def test_channel_solves_ipykernel_and_numpy_for_every_world_python(world, tmp_path):
    """Each CPython of `pythons` has its own `python` and the packages pip picked for it."""
    from kbundle import contract, solve
    from kbundle.facts import glibc_for

    assert world["python"] in world["pythons"]
    target = contract.target_virtual_packages(glibc_for(world["base_image"]), None)
    for version in world["pythons"]:
        records = await solve.solve([world["channel"]], [f"python={version}", "ipykernel", "numpy"], target, tmp_path)
        by_name = {r.name.normalized: r for r in records}
        assert str(by_name["python"].version).startswith(version + "."), by_name["python"]
        tag = "py" + version.replace(".", "")
        for record in records:
            if str(record.subdir) == "linux-64" and record.name.normalized != "python":
                assert str(record.build).startswith(f"{tag}_"), record  # binary: built for this Python
            elif str(record.subdir) == "noarch":
                assert str(record.build) in ("pyh_kbundle_0", f"pyh_{tag}_kbundle_0"), record
        if version == "3.7":  # the last releases for 3.7, as pip picked them
            assert str(by_name["ipykernel"].version).startswith("6.16."), by_name["ipykernel"]
            assert str(by_name["numpy"].version).startswith("1.21."), by_name["numpy"]


def test_up_refuses_a_python_this_machine_lacks_in_one_line(tmp_path):
    env = {**os.environ, "KBUNDLE_WORLD_PYTHONS": "3.7,3.99", "KBUNDLE_WORLD_DIR": str(tmp_path / "w")}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.world", "up"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: KBUNDLE_WORLD_PYTHONS asks for 3.99, which is not on this machine "
        f"(looked in {os.path.expanduser('~/.pyenv')}/versions/3.99.*, /usr/bin/python3.99)"
    ]


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, ["3.7"]),  # unset: 3.7 besides the running Python
        ("3.7,3.11", ["3.7", "3.11"]),
        (" 3.8 , ,3.8,/opt/py/bin/python3", ["3.8", "/opt/py/bin/python3"]),
        ("", []),  # set and empty: the running Python alone
    ],
)
def test_requested_pythons(value, expected):
    from world.common import requested_pythons

    assert requested_pythons(value) == expected


@pytest.mark.parametrize("value", ["3", "3.7.16", "python3.7", "py37", "~/py/bin/python"])
def test_requested_pythons_refuses_other_forms(value):
    from world.common import WorldPythonsError, requested_pythons

    with pytest.raises(WorldPythonsError, match="neither a version like 3.7 nor an absolute path"):
        requested_pythons(value)


def test_python_candidates_prefer_pyenvs_highest_patch(tmp_path):
    from world.common import python_candidates

    for name in ("3.7.9", "3.7.16", "3.7.2", "3.7-dev", "3.70.1", "3.8.1"):
        (tmp_path / "versions" / name).mkdir(parents=True)
    found, looked = python_candidates("3.7", tmp_path)
    assert found == [
        tmp_path / "versions" / "3.7.16" / "bin" / "python3.7",
        tmp_path / "versions" / "3.7.9" / "bin" / "python3.7",
        tmp_path / "versions" / "3.7.2" / "bin" / "python3.7",
        Path("/usr/bin/python3.7"),
    ]
    assert looked == [f"{tmp_path}/versions/3.7.*", "/usr/bin/python3.7"]


def _pure(name: str, depends: list[str], data: bytes = b"x"):
    from world.channel import CondaPackage, PackageFile

    return CondaPackage(
        name, "1.0", "pyh_kbundle_0", "noarch", depends, [PackageFile("site-packages/m.py", data)], "python"
    )


PY37 = world_module.common.WorldPython("3.7.16", Path("/p37"), Path("/p37/bin/python3.7"))
PY311 = world_module.common.WorldPython("3.11.7", Path("/p311"), Path("/p311/bin/python3.11"))


@pytest.mark.parametrize(
    "made, every, expected",
    [
        # the same version alike for every Python: one shared build
        (
            [(PY37, _pure("a", ["python >=3.7"])), (PY311, _pure("a", ["python >=3.7"]))],
            [PY37, PY311],
            [("pyh_kbundle_0", ["python >=3.7"])],
        ),
        # one Python alone got this version: pinned to it, so another Python never picks it
        (
            [(PY311, _pure("a", ["python"]))],
            [PY37, PY311],
            [("pyh_py311_kbundle_0", ["python", "python >=3.11,<3.12.0a0"])],
        ),
        # the markers gave each Python other dependencies: one build each, each keeping its own
        (
            [(PY37, _pure("a", ["b", "python"])), (PY311, _pure("a", ["python"]))],
            [PY37, PY311],
            [
                ("pyh_py37_kbundle_0", ["b", "python", "python >=3.7,<3.8.0a0"]),
                ("pyh_py311_kbundle_0", ["python", "python >=3.11,<3.12.0a0"]),
            ],
        ),
        # other files under the same name and version (another wheel): one build each
        (
            [(PY37, _pure("a", ["python"], b"x")), (PY311, _pure("a", ["python"], b"y"))],
            [PY37, PY311],
            [
                ("pyh_py37_kbundle_0", ["python", "python >=3.7,<3.8.0a0"]),
                ("pyh_py311_kbundle_0", ["python", "python >=3.11,<3.12.0a0"]),
            ],
        ),
        # a world of one Python: shared, as before
        ([(PY311, _pure("a", ["python"]))], [PY311], [("pyh_kbundle_0", ["python"])]),
    ],
)
def test_noarch_builds_are_shared_only_when_every_python_got_them_alike(made, every, expected):
    from world.channel import noarch_builds

    built = noarch_builds(made, every)
    assert [(p.build, p.depends) for p in built] == expected
    assert all(p.noarch == "python" and p.subdir == "noarch" and p.version == "1.0" for p in built)
