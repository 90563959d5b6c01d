"""Pure parts of `kbundle run`: workdir placement, consent, image identity, wheel cache (no engine)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kbundle.bundle import Manifest, open_bundle, write_bundle
from kbundle.errors import KbundleError
from kbundle.flows.review import consent
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


def _review(tmp_path, **changes):
    from kbundle.flows.review import Review

    base = dict(
        sender="unsigned: nobody vouches for this bundle",
        base_image="nvidia/cuda:12.2.2-runtime-ubuntu22.04",
        base_local=False,
        hosts=("conda.anaconda.org", "registry-1.docker.io"),
        conda="42 package(s), locked (11.9 MiB to download at most)",
        pip=2,
        dockerfile=str(tmp_path / "Dockerfile"),
    )
    base.update(changes)
    return Review(**base)


def test_consent_without_tty_says_to_pass_yes(tmp_path):
    with pytest.raises(KbundleError, match="--yes"):
        consent(None, yes=False, review=_review(tmp_path), interactive=False)


@pytest.mark.parametrize("answer, ok", [(True, True), (False, False)])
def test_consent_asks_and_shows_what_will_be_built(tmp_path, answer, ok):
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=200)
    asked = []
    kwargs = dict(
        yes=False,
        review=_review(tmp_path, diff=("-FROM evil/backdoor", "+FROM nvidia/cuda")),
        interactive=True,
        ask=lambda c, q: asked.append(q) or answer,
    )
    if ok:
        consent(console, **kwargs)
    else:
        with pytest.raises(KbundleError, match="declined"):
            consent(console, **kwargs)
    text = out.getvalue()
    assert asked == ["Build it and register the kernel? [y/N] "]
    for shown in ("nvidia/cuda:12.2.2-runtime-ubuntu22.04", "42 package(s)", "11.9 MiB", "registry-1.docker.io"):
        assert shown in text
    assert "unsigned" in text and "-FROM evil/backdoor" in text and str(tmp_path / "Dockerfile") in text


def test_consent_with_yes_asks_nothing(tmp_path):
    consent(None, yes=True, review=_review(tmp_path), ask=lambda c, q: pytest.fail("asked"), interactive=False)


def test_an_unknown_signer_gets_a_trust_question_in_the_same_review(tmp_path, monkeypatch):
    import io as _io

    from rich.console import Console

    from kbundle.flows import review as flow

    class Unknown:
        state, identity, fingerprint = "unknown", "alice@example.org", "SHA256:abc"

        def describe(self):
            return "signed by alice@example.org (SHA256:abc), not trusted yet"

    trusted = []
    monkeypatch.setattr(flow, "trust", trusted.append)
    asked = []
    answers = iter([True, True])
    console = Console(file=_io.StringIO(), width=200)
    consent(
        console,
        yes=False,
        review=_review(tmp_path),
        signature=Unknown(),
        interactive=True,
        ask=lambda c, q: asked.append(q) or next(answers),
    )
    assert len(asked) == 2 and "Trust" in asked[0] and len(trusted) == 1


@pytest.mark.parametrize(
    "review, expected",
    [
        ({}, ["sender      unsigned", "base image  nvidia/cuda:12.2.2-runtime-ubuntu22.04 (will be pulled)"]),
        ({"base_local": True, "hosts": ()}, ["(on this engine)", "contacts    nothing (all local)"]),
        ({"base_image": "evil\x1b[2J\nfake"}, ["base image  evil\\x1b[2J\\nfake"]),  # escaped, one line
        ({"hosts": ("a\x1b]0;x\x07",)}, ["contacts    a\\x1b]0;x\\x07"]),
        ({"unusual": ("not locked",)}, ["unusual     not locked"]),
        ({"diff": ("-a", "+b")}, ["the bundle's Dockerfile differs", "  -a", "  +b"]),
    ],
)
def test_review_lines(tmp_path, review, expected):
    from kbundle.flows.review import review_lines

    lines = review_lines(_review(tmp_path, **review))
    text = "\n".join(lines)
    for fragment in expected:
        assert fragment in text
    assert all("\x1b" not in line and "\n" not in line for line in lines)


@pytest.mark.parametrize(
    "image, registry",
    [
        ("nvidia/cuda:12.2.2-runtime-ubuntu22.04", "registry-1.docker.io"),
        ("ubuntu", "registry-1.docker.io"),
        ("ghcr.io/org/img:1", "ghcr.io"),
        ("localhost:5000/img", "localhost:5000"),
        ("localhost/img", "localhost"),
    ],
)
def test_registry_of(image, registry):
    from kbundle.flows.review import registry_of

    assert registry_of(image) == registry


def test_dockerfile_diff_is_escaped_and_bounded():
    from kbundle.flows.review import dockerfile_diff

    assert dockerfile_diff("FROM a\n", "FROM a\n") == ()
    diff = dockerfile_diff("FROM evil/backdoor\nRUN chmod u+s /bin/sh \x1b[2J\n", "FROM a\n")
    assert "-FROM evil/backdoor" in diff and "+FROM a" in diff
    assert all("\x1b" not in line for line in diff)
    long = dockerfile_diff("".join(f"RUN {i}\n" for i in range(200)), "FROM a\n", limit=10)
    assert len(long) == 11 and long[-1].startswith("... ")


@pytest.mark.parametrize(
    "records, specs, expected",
    [
        (None, ["numpy", "python=3.11"], "not locked: solved here from 2 spec(s)"),
        ((), [], "0 package(s), locked"),
    ],
)
def test_conda_summary(records, specs, expected):
    from kbundle.flows.review import conda_summary

    assert conda_summary(records, specs) == expected


def test_conda_summary_adds_sizes_only_when_all_are_known():
    from types import SimpleNamespace

    from kbundle.flows.review import conda_summary

    assert conda_summary((SimpleNamespace(size=2_000_000), SimpleNamespace(size=500_000)), []).endswith(
        "(2.4 MiB to download at most)"
    )
    assert "MiB" not in conda_summary((SimpleNamespace(size=2_000_000), SimpleNamespace(size=None)), [])


@pytest.mark.parametrize(
    "specs, loose",
    [(["numpy", "python=3.11", "scipy >=1.0", "pandas 2.*", "ipykernel"], ["numpy", "ipykernel"])],
)
def test_unpinned(specs, loose):
    from kbundle.flows.review import unpinned

    assert unpinned(specs) == loose


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
    changes = (
        dict(env_hash="f" * 64),
        dict(pip=()),
        dict(dockerfile="FROM y\n"),
        dict(base_id="sha256:2"),
        dict(work="w"),
    )
    for change in changes:
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
        "-e ./src",
        "tabulate==0.9.0\n--index-url=x",
    ],
)
def test_pip_options_and_local_paths_are_refused(pin, tmp_path, monkeypatch):
    # Ranges, bare names, URLs and VCS lines are resolved by pip on the host: tests/pack/test_pip_lines.py.
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path))
    with pytest.raises(KbundleError, match="not a requirement kbundle can install"):
        wheels.fetch([pin], "3.11")
