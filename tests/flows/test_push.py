"""`kbundle push` and `kbundle run --image` against the real engine and the world's registry.

One bundle is packed and pushed once per module (`pushed`, which builds it); the recipient
side uses its own Jupyter data dir and kbundle cache, and its image is removed from the
engine first, so `run --image` finds no image of that bundle: it pulls, and builds nothing.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import docker
import pytest

from helpers import assert_one_error_line, kbundle, pack_world_bundle, run_env_for

pytestmark = pytest.mark.docker

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@pytest.fixture(scope="module")
def session() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def sender(tmp_path_factory) -> dict:
    return run_env_for(tmp_path_factory.mktemp("push-sender"))


@pytest.fixture(scope="module")
def bundle(world, sender, tmp_path_factory, session) -> Path:
    return pack_world_bundle(world, sender, tmp_path_factory.mktemp("push-pack"), f"kbpush-{session}")


@pytest.fixture(scope="module")
def other_bundle(world, sender, tmp_path_factory, session) -> Path:
    """Another bundle (content hash) with the same environment: packed, never built."""
    folder = tmp_path_factory.mktemp("push-other")
    return pack_world_bundle(world, sender, folder, f"kbother-{session}", source="print('another notebook')")


@pytest.fixture(scope="module")
def pushed(bundle, registry, sender, docker_client, session):
    """`kbundle push BUNDLE --to REGISTRY/NS --yes --json`, once (it builds); yields (json, stderr)."""
    proc = kbundle("push", bundle, "--to", f"{registry}/kbt-{session}", "--yes", "--json", env=sender, timeout=900)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    yield data, proc.stderr
    for image in docker_client.images.list(filters={"label": f"org.kbundle.name={bundle.stem}"}):
        _remove(docker_client, image.id)


def _remove(client, image_id: str) -> None:
    for container in client.api.containers(all=True, filters={"ancestor": image_id}):
        try:
            client.api.remove_container(container["Id"], force=True)
        except docker.errors.NotFound:
            pass
    try:
        client.images.remove(image_id, force=True)  # every tag: a fresh cache for that image
    except docker.errors.ImageNotFound:
        pass


def _forget(client, reference: str) -> None:
    """Remove the image `reference` names from this engine, as a machine that never had it."""
    try:
        _remove(client, client.images.get(reference).id)
    except docker.errors.ImageNotFound:
        pass
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(reference)


def _manifest_digest(registry: str, repository: str, tag: str) -> str:
    """The digest the registry itself serves for `repository:tag`."""
    name = repository.removeprefix(registry + "/")
    request = urllib.request.Request(
        f"http://{registry}/v2/{name}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.headers["Docker-Content-Digest"]


def _manifest_layers(registry: str, repository: str, tag: str) -> list[tuple[str, int]]:
    """(digest, size) of each layer the registry's manifest for `repository:tag` lists."""
    name = repository.removeprefix(registry + "/")
    request = urllib.request.Request(
        f"http://{registry}/v2/{name}/manifests/{tag}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return [(layer["digest"], int(layer["size"])) for layer in json.loads(resp.read())["layers"]]


def _has_blob(registry: str, repository: str, digest: str) -> bool:
    name = repository.removeprefix(registry + "/")
    request = urllib.request.Request(f"http://{registry}/v2/{name}/blobs/{digest}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status == 200
    except urllib.error.HTTPError:
        return False


def _tags(registry: str, repository: str) -> list[str]:
    name = repository.removeprefix(registry + "/")
    with urllib.request.urlopen(f"http://{registry}/v2/{name}/tags/list", timeout=10) as resp:
        return json.loads(resp.read())["tags"]


def _one_error(proc, *words: str) -> str:
    """Exactly one `error:` line (run prints warnings, such as "no GPU", before it), no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def _kernels(env: dict) -> dict[str, dict]:
    proc = kbundle("kernels", "list", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return {k["name"]: k for k in json.loads(proc.stdout)}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _events(client, since: int, until: int) -> list[dict]:
    return list(client.events(since=since, until=until, decode=True))


def _next_second() -> int:
    """Engine events are filtered by whole seconds: start at the next one."""
    since = int(time.time()) + 1
    while time.time() < since:
        time.sleep(0.05)
    return since


# ----------------------------------------------------------------- push


def test_push_prints_a_digest_reference_the_registry_has(pushed, bundle, registry, session):
    data, stderr = pushed
    repository = f"{registry}/kbt-{session}/{bundle.stem}"
    assert data["repository"] == repository and data["built"] is True
    assert DIGEST.fullmatch(data["digest"]) and data["reference"] == f"{repository}@{data['digest']}"
    assert data["image"] == f"kbundle/{bundle.stem}:{data['tag']}"  # pushed under the local content tag
    # The env's layers are in the registry: sent now, or already there from an earlier push of the
    # same step images (the registry then mounts them, and a few KiB go over the wire).
    layers = _manifest_layers(registry, repository, data["tag"])
    assert sum(size for _, size in layers) > 10 * 1024 * 1024, layers
    assert all(_has_blob(registry, repository, digest) for digest, _ in layers), layers
    assert data["pushed_bytes"] > 0, data
    assert data["tag"] in _tags(registry, repository)
    assert _manifest_digest(registry, repository, data["tag"]) == data["digest"]
    lines = stderr.splitlines()
    assert any(ln.startswith(f"pushing {repository}:{data['tag']}") for ln in lines), stderr
    assert any(re.search(r"layer\(s\), [\d.]+ MiB sent in", ln) for ln in lines), stderr  # the calm last line
    assert not [ln for ln in lines if "\x1b" in ln or "\r" in ln], "terminal codes on a non-terminal"


def test_push_again_reuses_the_image_and_prints_only_the_reference(pushed, bundle, registry, sender, session):
    data = pushed[0]
    proc = kbundle("push", bundle, "--to", f"{registry}/kbt-{session}", "-y", env=sender, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data["reference"] + "\n"  # scriptable: ref=$(kbundle push ...)
    proc = kbundle("push", bundle, "--to", f"{registry}/kbt-{session}", "-y", "--json", env=sender, timeout=300)
    again = json.loads(proc.stdout)
    assert again["built"] is False and again["pushed_bytes"] == 0
    assert (again["reference"], again["image_id"]) == (data["reference"], data["image_id"])
    assert "building" not in proc.stderr


@pytest.mark.parametrize("to", ["lab", "127.0.0.1:5000", "127.0.0.1:5000/lab:v1", "https://127.0.0.1:5000/lab"])
def test_a_bad_destination_is_one_usage_line(to, tmp_path):
    proc = kbundle("push", tmp_path / "missing.kbundle", "--to", to, "--yes")
    assert_one_error_line(proc, "REGISTRY/NAMESPACE")
    assert proc.returncode == 2


def test_an_unreachable_registry_is_one_line(pushed, bundle, sender, docker_client):
    registry = f"127.0.0.1:{_closed_port()}"
    proc = kbundle("push", bundle, "--to", f"{registry}/lab", "--yes", "--progress", "none", env=sender)
    assert_one_error_line(proc, f"cannot reach the registry {registry}", "connection refused")
    assert proc.returncode == 1
    assert not docker_client.images.list(name=f"{registry}/lab/{bundle.stem}"), "the failed push left its tag"


# ----------------------------------------------------------------- run --image


@pytest.fixture(scope="module")
def recipient(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("push-recipient")
    return run_env_for(root), root


@pytest.fixture(scope="module")
def pulled_run(pushed, bundle, recipient, docker_client):
    """On an engine without the bundle's image: `kbundle run BUNDLE --image REF --yes --json`."""
    data = pushed[0]
    env, root = recipient
    _forget(docker_client, data["image"])
    since = _next_second()
    proc = kbundle("run", bundle, "--image", data["reference"], "--yes", "--json", env=env, cwd=root, timeout=600)
    until = int(time.time()) + 1
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr, _events(docker_client, since, until)


def test_run_image_pulls_and_builds_nothing(pulled_run, pushed, recipient, world):
    run, stderr, events = pulled_run
    data = pushed[0]
    env, root = recipient
    assert run["built"] is False and run["pulled"] is True and run["image_ref"] == data["reference"]
    assert run["image"] == f"kbundle/{data['name']}:{data['digest'][7:23]}"
    assert run["image_id"] == data["image_id"]  # a build here would have made another image
    assert "pulling " + data["reference"] in stderr and "building" not in stderr
    # No build ran: the legacy builder runs each RUN step in a container of the step before (a bare
    # id), and bytecode one of the base image. Other workers' containers name their own images.
    creates = [e for e in events if e.get("Type") == "container" and e.get("Action") == "create"]
    images = [e.get("Actor", {}).get("Attributes", {}).get("image", "") for e in creates]
    assert not [i for i in images if i.startswith("sha256:") or i == world["base_image"]], creates
    pulls = [e for e in events if e.get("Type") == "image" and e.get("Action") == "pull"]
    assert [e for e in pulls if data["repository"] in e.get("id", "")], events
    assert not (Path(env["KBUNDLE_CACHE_DIR"]) / "logs").exists(), "a build log was written"
    assert not (Path(run["workdir"]) / ".kbundle" / "build.log").exists()


def test_the_pulled_image_is_this_bundles_under_its_local_tag(pulled_run, pushed, bundle, docker_client):
    from kbundle.bundle import open_bundle

    run = pulled_run[0]
    image = docker_client.images.get(run["image"])
    assert image.id == run["image_id"] == pushed[0]["image_id"]  # the very image that was pushed
    assert pushed[0]["reference"] in image.attrs["RepoDigests"]
    assert image.labels["org.kbundle.content-hash"] == open_bundle(bundle).identity


def test_the_kernel_records_the_reference_and_runs_in_the_pulled_image(pulled_run, recipient, monkeypatch):
    from jupyter_client.manager import KernelManager

    run = pulled_run[0]
    env, _ = recipient
    kernel = _kernels(env)[run["kernel_name"]]
    assert kernel["image"] == run["image"] and kernel["metadata"]["image_ref"] == run["image_ref"]
    monkeypatch.setenv("JUPYTER_DATA_DIR", env["JUPYTER_DATA_DIR"])
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", env["KBUNDLE_CACHE_DIR"])
    km = KernelManager(kernel_name=run["kernel_name"])
    km.start_kernel()
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=90)
        results = []
        reply = kc.execute_interactive(
            "1+1", timeout=60, output_hook=lambda m: results.append(m["content"].get("data", {}).get("text/plain"))
        )
        assert reply["content"]["status"] == "ok" and "2" in results, results
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)


def test_run_image_again_finds_it_here_by_digest(pulled_run, bundle, recipient, docker_client):
    run = pulled_run[0]
    env, root = recipient
    since = _next_second()
    proc = kbundle("run", bundle, "--image", run["image_ref"], "--json", env=env, cwd=root)  # no --yes: nothing fetched
    until = int(time.time()) + 1
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["pulled"] is False and again["built"] is False and again["image_id"] == run["image_id"]
    assert not [e for e in _events(docker_client, since, until) if e.get("Action") == "pull"]


def test_another_bundles_image_is_refused_and_nothing_is_left(pushed, other_bundle, docker_client, tmp_path):
    from kbundle.bundle import open_bundle

    data = pushed[0]
    env = run_env_for(tmp_path)
    _forget(docker_client, data["reference"])  # so this run pulls it, and must remove it again
    proc = kbundle("run", other_bundle, "--image", data["reference"], "--yes", env=env, cwd=tmp_path, timeout=600)
    ours = open_bundle(other_bundle).identity
    _one_error(proc, f"the image {data['reference']} was built from another bundle", ours[:12])
    assert proc.returncode == 1
    assert f"kbundle-{other_bundle.stem}" not in _kernels(env), "a kernel was registered"
    assert not (tmp_path / other_bundle.stem).exists(), "the run's workdir was left"
    with pytest.raises(docker.errors.ImageNotFound):  # the image only this run fetched is gone again
        docker_client.images.get(data["reference"])


def test_an_image_without_kbundle_labels_is_refused(world, registry, bundle, docker_client, tmp_path, session):
    repository = f"{registry}/kbt-{session}/plain"
    docker_client.api.tag(world["base_image"], repository, "base")
    events = list(docker_client.api.push(repository, tag="base", stream=True, decode=True))
    digest = next(e["aux"]["Digest"] for e in events if isinstance(e.get("aux"), dict) and "Digest" in e["aux"])
    env = run_env_for(tmp_path)
    try:
        proc = kbundle("run", bundle, "--image", f"{repository}@{digest}", "--yes", env=env, cwd=tmp_path)
    finally:
        docker_client.api.remove_image(f"{repository}:base")
    _one_error(proc, "is not a kbundle image", "org.kbundle.content-hash")
    assert f"kbundle-{bundle.stem}" not in _kernels(env) and not (tmp_path / bundle.stem).exists()


@pytest.mark.parametrize("suffix", ["", ":latest", "@sha256:abc"])
def test_image_without_a_digest_is_one_usage_line(pushed, bundle, suffix, tmp_path):
    env = run_env_for(tmp_path)
    proc = kbundle("run", bundle, "--image", pushed[0]["repository"] + suffix, "--yes", env=env, cwd=tmp_path)
    _one_error(proc, "NAME@sha256:", "tags move")
    assert proc.returncode == 2
    assert f"kbundle-{bundle.stem}" not in _kernels(env) and not (tmp_path / bundle.stem).exists()


def test_run_image_from_an_unreachable_registry_is_one_line(bundle, tmp_path):
    env = run_env_for(tmp_path)
    registry = f"127.0.0.1:{_closed_port()}"
    ref = f"{registry}/lab/x@sha256:" + "0" * 64
    proc = kbundle("run", bundle, "--image", ref, "--yes", "--progress", "none", env=env, cwd=tmp_path)
    _one_error(proc, f"cannot reach the registry {registry}")
    assert f"kbundle-{bundle.stem}" not in _kernels(env) and not (tmp_path / bundle.stem).exists()


# ----------------------------------------------------------------- run --slurm


def test_run_slurm_registers_a_kernel_that_runs_on_the_node(pushed, bundle, slurm, tmp_path, monkeypatch):
    """push, then `run --slurm --image`: the kernel runs through srun on the world's node, by digest."""
    import subprocess

    from jupyter_client.manager import KernelManager

    env = run_env_for(tmp_path)
    ref = pushed[0]["reference"]
    args = ["--slurm", "--image", ref, "--partition", slurm["partition"], "--login-address", "127.0.0.1"]
    proc = kbundle("run", bundle, *args, "--yes", "--json", "--workdir", tmp_path / "work", env=env)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    assert run["kernel_name"].endswith("-slurm") and run["display_name"].endswith("(kbundle, Slurm)")
    assert run["image"] == ref and run["built"] is False and run["slurm"]["partition"] == slurm["partition"]
    kernel = _kernels(env)[run["kernel_name"]]
    assert kernel["metadata"]["image_ref"] == ref and kernel["metadata"]["slurm"]["partition"] == slurm["partition"]
    human = kbundle("run", bundle, *args, "--yes", "--workdir", tmp_path / "work", env=env)
    assert human.returncode == 0 and "a Slurm node, through srun --partition" in human.stdout, human.stderr
    monkeypatch.setenv("JUPYTER_DATA_DIR", env["JUPYTER_DATA_DIR"])
    km = KernelManager(kernel_name=run["kernel_name"])
    km.start_kernel(cwd=str(tmp_path / "work"))
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        seen = []
        kc.execute_interactive(
            "import socket; print(socket.gethostname())",
            timeout=60,
            output_hook=lambda m: seen.append(m["content"].get("text", "")),
        )
        assert "".join(seen).strip() == slurm["node"]
        kc.stop_channels()
    finally:
        km.shutdown_kernel()
    deadline = time.monotonic() + 30
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the kernel's job step outlived its shutdown"
        time.sleep(0.2)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--slurm"], ("--slurm needs the image in a registry", "kbundle push")),
        (["--partition", "gpu"], ("--partition goes with --slurm",)),
        (["--slurm", "--gpus", "all", "--image", "r@sha256:" + "a" * 64], ("--gres gpu:N",)),
        (["--slurm", "--slurm-arg", "qos", "--image", "r@sha256:" + "a" * 64], ("give one srun option",)),
    ],
)
def test_slurm_usage_errors_are_one_line(bundle, args, words, tmp_path):
    proc = kbundle("run", bundle, *args, "--yes", env=run_env_for(tmp_path))
    assert proc.returncode == 2
    _one_error(proc, *words)
