"""Big environments, the way `kbundle run` builds them: the env split into layers that two bundles
share on the engine, and a second run after `docker rmi` that downloads nothing.

The bundles' pip packages come from an index this module serves on 127.0.0.1 (a PEP 503 page
per project, with sha256 fragments), which counts the requests it gets: a fake CUDA wheel
(`nvidia-kbfake-cu12`, 16 MiB that do not compress) and small packages. The real engine, the
world's channel and base image, `kbundle pack` and `kbundle run` as a user runs them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import threading
import time
import uuid
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_run_docker import NOTEBOOK, kbundle

from helpers import KBUNDLE
from kbundle import contract
from kbundle.image import integrity
from kbundle.image.chain import LABEL_STEPS, STEP_REPO, tags_of
from world.pypi import wheel_bytes

pytestmark = pytest.mark.docker

FAKE_CUDA = "nvidia-kbfake-cu12"
FAKE_CUDA_BYTES = 16 << 20


class _Index:
    """A PEP 503 index over `root`, served on 127.0.0.1; `requests` lists every path asked for."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        self.times: list[tuple[str, float]] = []  # (path, time.monotonic()) of each GET
        index = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                index.requests.append(self.path)
                index.times.append((self.path, time.monotonic()))
                super().do_GET()

            def do_HEAD(self):
                index.requests.append(self.path)
                super().do_HEAD()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _publish(root: Path, wheels: dict[str, list[tuple[str, bytes]]]) -> None:
    for project, files in wheels.items():
        page = root / "simple" / project / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        links = []
        for filename, data in files:
            (root / "files").mkdir(exist_ok=True)
            (root / "files" / filename).write_bytes(data)
            links.append(f'<a href="../../files/{filename}#sha256={hashlib.sha256(data).hexdigest()}">{filename}</a>')
        page.write_text("<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n")


def _wheel(name: str, version: str, modules: dict[str, str]) -> tuple[str, bytes]:
    return f"{name.replace('-', '_')}-{version}-py3-none-any.whl", wheel_bytes(name, version, modules)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    # Random bytes, base64: a text file wheel_bytes can hold, as incompressible as a CUDA library.
    blob = base64.b64encode(os.urandom(FAKE_CUDA_BYTES * 3 // 4)).decode()
    _publish(
        root,
        {
            FAKE_CUDA: [_wheel(FAKE_CUDA, "1.0", {"nvidia/kbfake/__init__.py": "", "nvidia/kbfake/lib.txt": blob})],
            "kbsmall-a": [_wheel("kbsmall-a", v, {"kbsmall_a/__init__.py": f"V = {v!r}\n"}) for v in ("1.0", "1.1")],
            "kbsmall-b": [_wheel("kbsmall-b", "1.0", {"kbsmall_b/__init__.py": "V = '1.0'\n"})],
            # Needs the CUDA wheel: pip check must see it where only its step holds its files.
            "kbsmall-c": [
                (
                    "kbsmall_c-1.0-py3-none-any.whl",
                    wheel_bytes("kbsmall-c", "1.0", {"kbsmall_c/__init__.py": ""}, requires=[f"{FAKE_CUDA}==1.0"]),
                )
            ],
        },
    )
    served = _Index(root)
    yield served
    served.close()


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    env = dict(
        os.environ,
        JUPYTER_DATA_DIR=str(root / "jupyter"),
        KBUNDLE_CACHE_DIR=str(root / "cache"),
        PIP_CONFIG_FILE=os.devnull,  # this module's index only
        PIP_FIND_LINKS="",
    )
    env.pop("JUPYTER_PATH", None)
    return env


def _pack(world, env, index: _Index, folder: Path, name: str, pip: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.ipynb").write_text(json.dumps(NOTEBOOK))
    lines = "".join(f"    - {line}\n" for line in [f"--index-url {index.url}", *pip])
    (folder / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {world['channel']}\ndependencies:\n"
        f"  - python={world['python']}\n  - pip\n  - pip:\n{lines}"
    )
    out = folder / f"{name}.kbundle"
    args = ["pack", f"{name}.ipynb", "-e", "environment.yml", "--base-image", world["base_image"], "-o", out]
    proc = kbundle(args, env, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return out


def _run(world, env, bundle: Path, cwd: Path) -> tuple[dict, str]:
    cwd.mkdir(parents=True, exist_ok=True)
    args = ["run", bundle, "--base-image", world["base_image"], "--gpus", "none", "--json", "--yes"]
    proc = kbundle(args, env, cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


@pytest.fixture(scope="module")
def two_bundles(world, run_env, index, tmp_path_factory, docker_client):
    """Two friends' bundles: the same fake CUDA wheel and small package; the second adds one small package
    and has another notebook."""
    tag = uuid.uuid4().hex[:6]
    root = tmp_path_factory.mktemp("friends")
    first = _pack(world, run_env, index, root / "a", f"kbl-a-{tag}", [f"{FAKE_CUDA}==1.0", "kbsmall-a==1.0"])
    second = _pack(
        world, run_env, index, root / "b", f"kbl-b-{tag}", [f"{FAKE_CUDA}==1.0", "kbsmall-a==1.0", "kbsmall-b==1.0"]
    )
    runs = [_run(world, run_env, bundle, root / f"run-{i}") for i, bundle in enumerate((first, second))]
    yield runs, (first, second), root
    for data, _ in runs:
        remove_with_steps(docker_client, data["image"])


def chain_of(docker_client, image: str) -> list[str]:
    """The step images an image was built on (image/chain.py LABEL_STEPS), bottom first."""
    labels = docker_client.api.inspect_image(image)["Config"].get("Labels") or {}
    return tags_of(labels.get(LABEL_STEPS, ""))


def step_tags(docker_client) -> set[str]:
    """Every kbundle step image's tag on the engine."""
    return {t for i in docker_client.api.images() for t in i.get("RepoTags") or [] if t.startswith(STEP_REPO + "/")}


def remove_with_steps(docker_client, image: str) -> None:
    """An image and the step tags under it, top first (a step another image builds on is only untagged)."""
    try:
        steps = chain_of(docker_client, image)
        docker_client.images.remove(image, force=True)
    except Exception:
        return
    for tag in reversed(steps):
        try:
            docker_client.images.remove(tag)
        except Exception:
            pass


def _layers(docker_client, image: str) -> list[str]:
    return docker_client.api.inspect_image(image)["RootFS"]["Layers"]


def test_the_env_is_split_into_the_dockerfiles_layers(two_bundles, docker_client):
    (data, stderr), _ = two_bundles[0]
    summary = re.search(r"^layers: (.*)$", stderr, re.MULTILINE)
    assert summary, stderr
    groups = dict(re.findall(r"(\w+) ([\d.]+ [KMG]?i?B) \(\d+ files\)", summary.group(1)))
    assert list(groups) == ["cuda", "framework", "python", "packages"], summary.group(1)
    assert groups["cuda"].endswith("MiB") and float(groups["cuda"].split()[0]) >= 16, groups  # the fake CUDA wheel
    assert groups["framework"] == "0 B", groups
    history = [h["CreatedBy"] for h in docker_client.api.history(data["image"])][::-1]
    copies = [h for h in history if "COPY dir:" in h and "/opt/kbundle/env/" in h]
    assert len(copies) == 4, history
    log = (Path(data["workdir"]) / ".kbundle" / "build.log").read_text()
    assert all(line in log for line in data["pip_resolved"]), log[:3000]  # the exact resolution, in the log
    assert "--hash=sha256:" in data["pip_resolved"][0]


def test_two_bundles_share_every_layer_but_the_last_packages_and_the_notebook(two_bundles, docker_client):
    (first, _), (second, _) = two_bundles[0]
    a, b = _layers(docker_client, first["image"]), _layers(docker_client, second["image"])
    assert len(a) == len(b)
    shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    # base ..., useradd, activation script, cuda, framework, python: shared; packages and work/ differ.
    assert shared == len(a) - 2, (a, b)
    # Stored once: the engine counts the shared layers (the 16 MiB CUDA wheel among them) for both.
    images = {i["Id"]: i for i in docker_client.df()["Images"]}
    second_image = images[docker_client.images.get(second["image"]).id]
    assert second_image["SharedSize"] >= FAKE_CUDA_BYTES, second_image
    own = second_image["Size"] - second_image["SharedSize"]
    assert own < FAKE_CUDA_BYTES // 10, second_image  # what the second bundle adds: its small package, notebook


def test_a_second_run_after_rmi_downloads_nothing(two_bundles, world, run_env, index, docker_client, tmp_path):
    _, (bundle, _), _ = two_bundles
    # A range, so pip's resolver (not the exact-pin cache) chose the first time.
    ranged = _pack(world, run_env, index, tmp_path / "c", f"kbl-c-{uuid.uuid4().hex[:6]}", ["kbsmall-a>=1.0,<2"])
    made = []
    try:
        for source in (bundle, ranged):
            first, _ = _run(world, run_env, source, tmp_path / f"{source.stem}-1")
            docker_client.images.remove(first["image"], force=True)
            before = list(index.requests)
            # Every step of its environment is still on the engine: nothing is installed, only the final image built.
            again, stderr = _run(world, run_env, source, tmp_path / f"{source.stem}-2")
            assert again["built"] is True and again["pip_resolved"] == first["pip_resolved"]
            assert "nothing to install" in stderr and not re.search(r"installed \d+ conda packages", stderr), stderr
            assert index.requests == before, index.requests[len(before) :]
            # Without its steps either: installed again, from the caches.
            remove_with_steps(docker_client, again["image"])
            again, stderr = _run(world, run_env, source, tmp_path / f"{source.stem}-3")
            made.append(again["image"])
            assert again["built"] is True and again["pip_resolved"] == first["pip_resolved"]
            assert index.requests == before, index.requests[len(before) :]  # not even an index page
            assert re.search(r"installed \d+ conda packages \(0 B downloaded\)", stderr), stderr
            assert re.search(r"fetched \d+ wheel\(s\) \(0 B downloaded\)", stderr), stderr
    finally:
        for image in made:
            remove_with_steps(docker_client, image)


def test_a_bundle_differing_by_one_pip_package_builds_only_that_group_and_the_final_image(
    world, run_env, index, docker_client, tmp_path
):
    """Of a second bundle with small packages more, only the pip packages' group and the final
    image are built: the CUDA wheel, the conda side and the base are found on the engine, neither
    sent nor built again, and the CUDA wheel is not even installed (image/partial.py): only its
    metadata, so that pip check sees what kbsmall-c requires."""
    token = uuid.uuid4().hex[:6]
    pins = [f"{FAKE_CUDA}==1.0", "kbsmall-a==1.1"]
    first = _pack(world, run_env, index, tmp_path / "d", f"kbl-d-{token}", pins)
    second = _pack(world, run_env, index, tmp_path / "e", f"kbl-e-{token}", [*pins, "kbsmall-b==1.0", "kbsmall-c==1.0"])
    made = []
    try:
        data, _ = _run(world, run_env, first, tmp_path / "run-d")
        made.append(data["image"])
        before = step_tags(docker_client)
        data, stderr = _run(world, run_env, second, tmp_path / "run-e")
        made.append(data["image"])
        chain = chain_of(docker_client, data["image"])
        new = (step_tags(docker_client) - before) & set(chain)  # others' tests may build steps meanwhile
        assert [t.split("/")[1].split(":")[0] for t in chain] == ["base", "cuda", "framework", "python", "packages"]
        assert new == {chain[-1]}, (new, chain)  # only the pip packages' group is new
        assert chain[:-1] == chain_of(docker_client, made[0])[:-1]  # the rest: the first bundle's own steps
        assert re.search(r"step packages: built ", stderr), stderr
        assert re.search(r"step cuda: \S+ is on this engine already", stderr), stderr
        log = (Path(data["workdir"]) / ".kbundle" / "build.log").read_text()
        assert "# ---- step packages: " in log and "#   FROM kbundle-steps/python:" in log, log[-3000:]
        assert "installing only the pip wheels of the others (3 of 4)" in stderr, stderr
        assert [(s["name"], s["built"]) for s in data["steps"]] == [
            ("base", False),
            ("cuda", False),
            ("framework", False),
            ("python", False),
            ("packages", True),
        ] and data["installed"] is True, data
        assert "installed 3 wheel(s) with pip" in stderr, stderr
        # The image is whole: the CUDA wheel's files (from its step) and its metadata, pip check
        # content, and the file list recorded at build time is what the image holds.
        probe = (
            "import importlib.metadata as m, os, nvidia.kbfake, kbsmall_b, kbsmall_c;"
            f"print(m.version('{FAKE_CUDA}'), os.path.getsize(os.path.join(nvidia.kbfake.__path__[0], 'lib.txt')))"
        )
        said = docker_client.containers.run(data["image"], ["python", "-c", probe], remove=True, network_disabled=True)
        version, size = said.decode().split()
        assert version == "1.0" and int(size) == FAKE_CUDA_BYTES, said
        checked = docker_client.containers.run(
            data["image"], ["python", "-m", "pip", "check"], remove=True, network_disabled=True
        )
        assert b"No broken requirements" in checked, checked
        labels = docker_client.api.inspect_image(data["image"])["Config"]["Labels"]
        assert integrity.in_image(docker_client, data["image"]) == labels[contract.LABEL_ENV_FILES]
    finally:
        for image in made:
            remove_with_steps(docker_client, image)


def test_a_notebook_only_change_builds_only_the_final_image_and_installs_nothing(
    world, run_env, index, docker_client, tmp_path
):
    """The same bundle with an edited notebook: the final image's tag covers work/, so it is built
    again, from work/ alone, on the same steps; nothing is installed, no step is built."""
    name = f"kbl-nb-{uuid.uuid4().hex[:6]}"
    folder = tmp_path / "nb"
    bundle = _pack(world, run_env, index, folder, name, ["kbsmall-a==1.0"])
    first, _ = _run(world, run_env, bundle, tmp_path / "first")
    edited = None
    try:
        notebook = json.loads(json.dumps(NOTEBOOK))
        notebook["cells"][0]["source"] = "print('edited and mailed back')"
        (folder / f"{name}.ipynb").write_text(json.dumps(notebook))
        out = tmp_path / f"{name}.kbundle"
        args = ["pack", f"{name}.ipynb", "-e", "environment.yml", "--base-image", world["base_image"], "-o", out]
        proc = kbundle(args, run_env, cwd=folder)
        assert proc.returncode == 0, proc.stderr
        before = step_tags(docker_client)
        (tmp_path / "edited").mkdir()
        args = ["run", out, "--base-image", world["base_image"], "--gpus", "none", "--json", "--yes", "--replace"]
        proc = kbundle(args, run_env, cwd=tmp_path / "edited", timeout=900)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        edited = data["image"]
        assert edited != first["image"] and data["built"] is True, proc.stderr
        assert "nothing to install" in proc.stderr, proc.stderr
        assert data["installed"] is False and not any(s["built"] for s in data["steps"]), data
        assert not re.search(r"installed \d+ conda packages|byte-compil|step \w+: built", proc.stderr), proc.stderr
        assert chain_of(docker_client, edited) == chain_of(docker_client, first["image"])
        assert not set(chain_of(docker_client, edited)) - before
        # The image holds the edited notebook: a kernel whose folder is left out sees this copy.
        container = docker_client.containers.run(
            edited, ["cat", f"{contract.WORK}/{name}.ipynb"], entrypoint=[], remove=True, network_disabled=True
        )
        assert b"edited and mailed back" in container
    finally:
        if edited is not None:
            docker_client.images.remove(edited, force=True)
        remove_with_steps(docker_client, first["image"])


def test_a_locked_pip_section_downloads_while_conda_installs(world, run_env, index, tmp_path, docker_client):
    """The wheels of a locked pip: section need nothing of the conda side: their download starts
    before conda's install ends (image/make.py `_early_wheels`), not after it. The index stamps the
    wheel's GET; the run's own line saying conda is installed is stamped as it arrives."""
    name = f"kbl-early-{uuid.uuid4().hex[:6]}"
    bundle = _pack(world, run_env, index, tmp_path / "p", name, ["kbsmall-b==1.0"])
    env = dict(run_env, KBUNDLE_CACHE_DIR=str(tmp_path / "cold-cache"))  # conda unpacks and links it all
    args = [
        KBUNDLE,
        "run",
        bundle,
        "--base-image",
        world["base_image"],
        "--gpus",
        "none",
        "--yes",
        "--rebuild",
        "--json",
    ]
    (tmp_path / "run").mkdir()
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(a) for a in args],
        env=env,
        cwd=tmp_path / "run",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,  # one small JSON object, read once stderr ends
        stderr=subprocess.PIPE,
        text=True,
    )
    conda_done, lines = None, []
    for line in proc.stderr:
        lines.append(line)
        if conda_done is None and re.search(r"installed \d+ conda packages", line):
            conda_done = time.monotonic()
    data = json.loads(proc.stdout.read() or "{}")
    assert proc.wait(timeout=600) == 0, "".join(lines)
    remove_with_steps(docker_client, data["image"])
    got = [t for path, t in index.times if path.endswith("kbsmall_b-1.0-py3-none-any.whl") and t > started]
    assert conda_done is not None and got, "".join(lines)
    assert got[-1] < conda_done, (got[-1] - conda_done, "".join(lines))
