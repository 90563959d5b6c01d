"""`kbundle kernels list|remove` and `kbundle gc --cache` as the recipient runs them, against the real engine."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kbundle.kernel import gc as G
from kbundle.kernel.spec import KernelRequest, install_kernelspec

pytestmark = pytest.mark.docker

KBUNDLE = str(Path(sys.executable).parent / "kbundle")


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, str]:
    """A private Jupyter data dir and kbundle cache, for this process and the CLI it runs."""
    for name, sub in (("JUPYTER_DATA_DIR", "data"), ("JUPYTER_PATH", "data"), ("KBUNDLE_CACHE_DIR", "cache")):
        monkeypatch.setenv(name, str(tmp_path / sub))
    return dict(os.environ)


def kbundle(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KBUNDLE, *args], capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL
    )


def register(name: str, image: str, workdir: Path, **metadata) -> None:
    install_kernelspec(KernelRequest(name, name.removeprefix("kbundle-"), image, str(workdir), [], "h", metadata))


@pytest.fixture
def own_image(docker_client, env_image):
    """A throwaway image of our own (FROM the world's), removed afterwards whatever happened."""
    tag = "kbundle-test/kernels-cli:1"
    docker_client.images.build(fileobj=io.BytesIO(f"FROM {env_image}\nLABEL kbundle.test=1\n".encode()), tag=tag)
    yield tag
    try:
        docker_client.api.remove_image(tag, force=True)
    except Exception:
        pass


def test_list_has_a_header_and_says_what_is_broken(env, env_image, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    register("kbundle-fine", env_image, work)
    register("kbundle-noimage", "kbundle-test/never-built:0", work)
    register("kbundle-nowork", env_image, tmp_path / "deleted")
    proc = kbundle(["kernels", "list"], env)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["NAME", "IMAGE", "GPUS", "HEALTH", "WORKDIR"]
    health = {row.split()[0]: row[header.index("HEALTH") : header.index("WORKDIR")].strip() for row in rows}
    assert health == {"kbundle-fine": "ok", "kbundle-noimage": "image missing", "kbundle-nowork": "workdir missing"}
    listed = json.loads(kbundle(["kernels", "list", "--json"], env).stdout)
    assert {k["name"]: k["health"] for k in listed} == health

    # Without an engine the image cannot be checked: "unknown", and the listing still works.
    offline = dict(env, DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock")
    listed = {k["name"]: k["health"] for k in json.loads(kbundle(["kernels", "list", "--json"], offline).stdout)}
    assert listed == {"kbundle-fine": "unknown", "kbundle-noimage": "unknown", "kbundle-nowork": "workdir missing"}


def test_remove_by_short_name_or_bundle_keeps_the_image(env, own_image, tmp_path, docker_client):
    bundle = tmp_path / "analysis.kbundle"
    bundle.write_bytes(b"recorded by run; not read when the kernelspec names it")
    register("kbundle-short", own_image, tmp_path)
    register("kbundle-analysis", own_image, tmp_path, bundle=str(bundle.resolve()))

    proc = kbundle(["kernels", "remove", "short"], env)
    assert proc.returncode == 0, proc.stderr
    assert "removed kernel kbundle-short" in proc.stdout and f"its image {own_image} stays" in proc.stdout

    proc = kbundle(["kernels", "remove", str(bundle), "--json"], env)
    assert proc.returncode == 0, proc.stderr
    removed = json.loads(proc.stdout)
    assert removed["kernel"] == "kbundle-analysis" and removed["image"] == own_image
    assert removed["image_removed"] is False
    assert json.loads(kbundle(["kernels", "list", "--json"], env).stdout) == []
    docker_client.api.inspect_image(own_image)  # still there

    proc = kbundle(["kernels", "remove", "short"], env)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: no kbundle kernel named 'short' (see `kbundle kernels list`)"]


def test_remove_by_a_moved_bundle_finds_its_kernel_by_content_hash(env, tmp_path):
    from bundle.bundlekit import good_bundle  # tests/bundle/: real bundles, written with kbundle's writer
    from kbundle.bundle.reader import open_bundle

    bundle = good_bundle(tmp_path / "copied.kbundle", name="analysis")  # not the path run recorded
    digest = open_bundle(bundle).content_hash
    for name in ("kbundle-analysis-2", "kbundle-other"):  # `run --name analysis-2` registered it
        install_kernelspec(
            KernelRequest(name, name, "img", str(tmp_path), [], digest if name.endswith("-2") else "h", {})
        )
    proc = kbundle(["kernels", "remove", str(bundle)], env)
    assert proc.returncode == 0, proc.stderr
    assert "removed kernel kbundle-analysis-2" in proc.stdout
    proc = kbundle(["kernels", "remove", str(bundle)], env)
    assert proc.returncode != 0 and proc.stderr.startswith("error: copied.kbundle has no kernel here"), proc.stderr
    missing = kbundle(["kernels", "remove", str(tmp_path / "nowhere.kbundle")], env)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no bundle at "), missing.stderr


def test_remove_with_image_refuses_while_the_kernel_runs(env, own_image, tmp_path, docker_client):
    register("kbundle-busy", own_image, tmp_path)
    cid = docker_client.api.create_container(
        own_image, command=["sleep", "120"], entrypoint=[], labels={"kbundle.test": "1"}
    )["Id"]
    try:
        docker_client.api.start(cid)
        proc = kbundle(["kernels", "remove", "kbundle-busy", "--image"], env)
        assert proc.returncode == 1 and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: kernel kbundle-busy is running"), proc.stderr
        assert "docker stop" in lines[0] and "nothing removed" in lines[0]
        assert [k["name"] for k in json.loads(kbundle(["kernels", "list", "--json"], env).stdout)] == ["kbundle-busy"]
        docker_client.api.inspect_image(own_image)  # still there
    finally:
        docker_client.api.remove_container(cid, force=True)
    proc = kbundle(["kernels", "remove", "kbundle-busy", "--image"], env)
    assert proc.returncode == 0 and f"removed image {own_image}" in proc.stdout, proc.stderr


def test_remove_with_image_removes_it_unless_another_kernel_uses_it(env, own_image, tmp_path, docker_client):
    import docker

    register("kbundle-one", own_image, tmp_path)
    register("kbundle-two", own_image, tmp_path)
    proc = kbundle(["kernels", "remove", "kbundle-one", "--image"], env)
    assert proc.returncode == 0, proc.stderr
    assert f"its image {own_image} stays: kernel kbundle-two uses it too" in proc.stdout
    docker_client.api.inspect_image(own_image)

    proc = kbundle(["kernels", "remove", "two", "--image"], env)
    assert proc.returncode == 0, proc.stderr
    assert f"removed image {own_image}" in proc.stdout
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.api.inspect_image(own_image)


def test_gc_cache_lists_and_empties_the_download_caches(env, docker_client, tmp_path):
    cache = Path(env["KBUNDLE_CACHE_DIR"])
    for name, size in (("pkgs", 3 * 1024**2), ("wheels/cp311-manylinux", 1024), ("pyc", 10), ("contexts/now", 5)):
        (cache / name).mkdir(parents=True)
        (cache / name / "blob").write_bytes(b"\0" * size)

    listed = json.loads(kbundle(["gc", "--cache", "--dry-run", "--json"], env).stdout)
    caches = {i["name"]: i["size"] for i in listed["items"] if i["name"].startswith("cache/")}
    assert caches == {"cache/pkgs": 3 * 1024**2, "cache/wheels": 1024, "cache/pyc": 10}  # a fresh context stays
    without = json.loads(kbundle(["gc", "--dry-run", "--json"], env).stdout)
    assert not [i for i in without["items"] if i["name"].startswith("cache/")]
    shown = kbundle(["gc", "--cache", "--dry-run"], env).stdout
    assert "cache/pkgs  (conda packages, fetched again when needed, 3.0 MiB)" in shown, shown

    # Removing: only the cache items (a real gc --yes would sweep the engine's other leftovers too).
    plan = G.plan_gc(docker_client, kernels=[], caches=True)
    result = G.apply_gc(G.GcPlan([i for i in plan.items if i.name.startswith("cache/")]), docker_client)
    assert not result.failed and len(result.removed) == 3
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == ["contexts"]  # and activity.py's lock file


@pytest.mark.parametrize(
    "size, shown",
    [(None, ""), (512, "512 B"), (1536, "1.5 KiB"), (3 * 1024**2, "3.0 MiB"), (5 * 1024**3, "5.0 GiB")],
)
def test_sizes_are_binary_units(size, shown):
    assert G.human_size(size) == shown
