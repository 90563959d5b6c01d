"""Pure parts of `kbundle run`: workdir placement, consent, image identity, wheel cache (no engine)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kbundle.bundle import Manifest, open_bundle, write_bundle
from kbundle.errors import KbundleError
from kbundle.flows.run import consent
from kbundle.image import build as imagemod
from kbundle.image import wheels
from kbundle.image import workdir as wd
from kbundle.kernel.spec import kernel_name_for

NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [], "source": "print(1)"}
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def make_bundle(path: Path, name: str = "demo", notebook: dict = NOTEBOOK, data: bytes = b"a,b\n1,2\n") -> Path:
    manifest = Manifest(
        name=name,
        notebook="work/nb.ipynb",
        python="3.11",
        cuda=None,
        cudnn=None,
        cuda_runtime_in_env=False,
        base_image="debian:bookworm",
        base_image_reason="test",
        channels=["http://127.0.0.1:1/"],
        dependencies=["python 3.11.*"],
        pip=[],
        includes=["work/data/table.csv"],
    )
    members = {
        "work/nb.ipynb": json.dumps(notebook).encode(),
        "work/data/table.csv": data,
        "Dockerfile": b"FROM debian:bookworm\n",
        "env/environment.yml": b"dependencies: [python]\n",
    }
    write_bundle(path, manifest, members)
    return path


def place(bundle: Path, workdir: Path) -> wd.Placement:
    return wd.place(open_bundle(bundle), workdir, "kbundle-demo", "demo (kbundle)")


def test_notebook_names_the_new_kernel(tmp_path):
    result = place(make_bundle(tmp_path / "b.kbundle"), tmp_path / "w")
    meta = json.loads(result.notebook.read_text())["metadata"]["kernelspec"]
    assert meta == {"name": "kbundle-demo", "display_name": "demo (kbundle)", "language": "python"}
    assert (tmp_path / "w" / "data" / "table.csv").read_bytes() == b"a,b\n1,2\n"
    assert not result.kept


def test_user_changes_are_kept_and_the_fresh_copy_goes_beside(tmp_path):
    bundle = make_bundle(tmp_path / "b.kbundle")
    work = tmp_path / "w"
    place(bundle, work)
    (work / "data" / "table.csv").write_bytes(b"my edit\n")
    second = make_bundle(tmp_path / "b2.kbundle", data=b"a,b\n3,4\n")  # a newer bundle, same files
    result = place(second, work)
    assert (work / "data" / "table.csv").read_bytes() == b"my edit\n"
    assert [k.path.name for k in result.kept] == ["table.csv"]
    assert result.kept[0].fresh.name == "table.kbundle-new.csv"
    assert result.kept[0].fresh.read_bytes() == b"a,b\n3,4\n"
    # the notebook, untouched by the user and the same in both bundles, is neither kept nor rewritten
    assert result.notebook not in [k.path for k in result.kept] and result.notebook not in result.written


def test_unchanged_files_are_refreshed_by_a_newer_bundle(tmp_path):
    work = tmp_path / "w"
    place(make_bundle(tmp_path / "b.kbundle"), work)
    place(make_bundle(tmp_path / "b2.kbundle", data=b"new\n"), work)
    assert (work / "data" / "table.csv").read_bytes() == b"new\n"


def test_a_file_that_was_there_before_kbundle_is_the_users(tmp_path):
    work = tmp_path / "w"
    (work / "data").mkdir(parents=True)
    (work / "data" / "table.csv").write_bytes(b"theirs\n")
    result = place(make_bundle(tmp_path / "b.kbundle"), work)
    assert (work / "data" / "table.csv").read_bytes() == b"theirs\n"
    assert result.kept and result.kept[0].fresh.exists()


def test_a_symlink_in_the_workdir_is_never_followed(tmp_path):
    work = tmp_path / "w"
    (work / "data").mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious\n")
    (work / "data" / "table.csv").symlink_to(outside)
    result = place(make_bundle(tmp_path / "b.kbundle"), work)
    assert outside.read_bytes() == b"precious\n"
    assert result.kept and result.kept[0].fresh.read_bytes() == b"a,b\n1,2\n"


def test_consent_without_tty_says_to_pass_yes(tmp_path):
    with pytest.raises(KbundleError, match="--yes"):
        consent(
            None, yes=False, base_image="b", packages=3, pip=0, dockerfile=tmp_path / "Dockerfile", interactive=False
        )


@pytest.mark.parametrize("answer, ok", [(True, True), (False, False)])
def test_consent_asks_and_shows_what_will_be_built(tmp_path, answer, ok):
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=200)
    asked = []
    kwargs = dict(
        yes=False,
        base_image="nvidia/cuda:12.2.2-runtime-ubuntu22.04",
        packages=42,
        pip=2,
        dockerfile=tmp_path / "Dockerfile",
        interactive=True,
        ask=lambda c, q: asked.append(q) or answer,
    )
    if ok:
        consent(console, **kwargs)
    else:
        with pytest.raises(KbundleError, match="declined"):
            consent(console, **kwargs)
    text = out.getvalue()
    assert asked and "nvidia/cuda:12.2.2-runtime-ubuntu22.04" in text and "42" in text
    assert str(tmp_path / "Dockerfile") in text


def test_consent_with_yes_asks_nothing():
    consent(
        None,
        yes=True,
        base_image="b",
        packages=1,
        pip=0,
        dockerfile=Path("x"),
        ask=lambda c, q: pytest.fail("asked"),
        interactive=False,
    )


def key(**changes) -> imagemod.ImageKey:
    base = dict(
        name="My Notebook!",
        env_hash="e" * 64,
        pip=("tabulate==0.9.0",),
        dockerfile="FROM x\n",
        base_image="x",
        base_id="sha256:1",
    )
    base.update(changes)
    return imagemod.ImageKey(**base)


def test_image_tag_follows_content_only():
    assert key().tag == key().tag
    assert key().tag.startswith("kbundle/my-notebook:")
    for change in (dict(env_hash="f" * 64), dict(pip=()), dict(dockerfile="FROM y\n"), dict(base_id="sha256:2")):
        assert key(**change).tag != key().tag, change


def test_kernel_names_are_valid_jupyter_names():
    from kbundle.kernel.spec import check_name

    for name in ("My Notebook!", "tf-warp-speed", "ÜBER analysis", "---"):
        check_name(kernel_name_for(name))


@pytest.mark.parametrize(
    "dockerfile, expected",
    [
        ("FROM nvidia/cuda:11.8.0-runtime-ubuntu22.04\nRUN true\n", "FROM base:1\nRUN true\n"),
        ("ARG BASE_IMAGE=nvidia/cuda:11.8.0\nFROM ${BASE_IMAGE}\n", "ARG BASE_IMAGE=base:1\nFROM ${BASE_IMAGE}\n"),
        (
            "# c\nFROM --platform=linux/amd64 a AS env\nFROM b\n",
            "# c\nFROM --platform=linux/amd64 base:1 AS env\nFROM b\n",
        ),
    ],
)
def test_base_image_override(dockerfile, expected):
    assert imagemod.with_base_image(dockerfile, "base:1") == expected


def test_base_image_override_needs_a_from_line():
    with pytest.raises(KbundleError, match="FROM"):
        imagemod.with_base_image("RUN true\n", "x")


def parse_pip_line(text: str):
    from kbundle.specs import parse_pip_line as parse  # the one pip parser, which fetch uses

    return parse(text)


def test_wheel_cache_matches_only_the_target_platform(tmp_path):
    tags = wheels.target_tags("3.11")
    for name in (
        "numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "numpy-1.26.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "numpy-1.26.4-cp311-cp311-macosx_11_0_arm64.whl",
        "numpy-1.26.4-cp311-cp311-manylinux_2_28_x86_64.whl",
        "tabulate-0.9.0-py3-none-any.whl",
    ):
        (tmp_path / name).write_bytes(b"")
    found = wheels.find_cached(parse_pip_line("numpy==1.26.4"), tmp_path, tags)
    assert found.name.startswith("numpy-1.26.4-cp311-cp311-manylinux_2_17")
    assert (
        wheels.find_cached(parse_pip_line("Tabulate==0.9.0"), tmp_path, tags).name == "tabulate-0.9.0-py3-none-any.whl"
    )
    assert wheels.find_cached(parse_pip_line("tabulate==0.8.0"), tmp_path, tags) is None
    assert wheels.find_cached(parse_pip_line("tabulate>=0.9"), tmp_path, tags) is None  # not an exact pin: ask pip
    assert wheels.find_cached(parse_pip_line("numpy==1.26.4"), tmp_path, wheels.target_tags("3.10")) is None


def test_wheel_context_layout(tmp_path):
    wheel = tmp_path / "tabulate-0.9.0-py3-none-any.whl"
    wheel.write_bytes(b"zip")
    ctx = tmp_path / "ctx"
    wheels.write_context(wheels.WheelSet((parse_pip_line("tabulate==0.9.0"),), (wheel,), 0), ctx)
    assert (ctx / "pip" / "requirements.txt").read_text() == "tabulate==0.9.0\n"
    assert (ctx / "pip" / "wheels" / wheel.name).read_bytes() == b"zip"


def test_rattler_uses_the_hosts_proxy_and_ca_trust(monkeypatch):
    from kbundle.net import rattler_config

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("no_proxy", "127.0.0.1, localhost,.corp")
    config = rattler_config()
    assert config.proxy_https.rstrip("/") == "http://proxy.corp:3128"
    assert config.proxy_non_proxy_hosts == ["127.0.0.1", "localhost", ".corp"]
    assert config.tls_root_certs == "system"  # the OS store, where corporate CAs are installed
    monkeypatch.delenv("HTTPS_PROXY")
    assert rattler_config().proxy_https is None


@pytest.mark.parametrize(
    "name, expected",
    [
        ("analysis", "analysis"),
        ("tf warp-speed", "tf warp-speed"),
        ("../../escape", "escape"),
        ("/etc", "etc"),
        ("..", "bundle"),
        ("a/b\\c", "a-b-c"),
        ("Überblick", "Überblick"),
        (".hidden", "hidden"),
    ],
)
def test_default_workdir_is_one_component_under_cwd(tmp_path, name, expected):
    path = wd.default_workdir(name, tmp_path)
    assert path.parent == tmp_path and path.name == expected


@pytest.mark.parametrize(
    "pin",
    [
        "--index-url=http://evil.example/simple",
        "-r /etc/passwd",
        "tabulate>=0.9",
        "tabulate @ https://evil.example/t.whl",
        "tabulate",
        "tabulate==0.9.*",
        "-e ./src",
        "git+https://evil.example/t.git",
        "tabulate==0.9.0\n--index-url=x",
    ],
)
def test_pip_pins_are_exact_or_refused(pin, tmp_path, monkeypatch):
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path))
    with pytest.raises(KbundleError, match="exact pin"):
        wheels.fetch([pin], "3.11")
