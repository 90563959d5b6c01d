"""The image as a chain of step images (image/chain.py), planned before anything is installed:
which step tags change when a package, the notebook or the bundle's name changes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import pytest

from kbundle import contract
from kbundle.facts import layer_groups
from kbundle.image import chain
from kbundle.pack.dockerfile import DockerfileInputs, render

GROUPS = ("base", "cuda", "framework", "python", "packages")


@dataclass(frozen=True)
class _Name:
    normalized: str


@dataclass(frozen=True)
class _Record:
    name: _Name
    sha256: bytes
    url: str


def _record(name: str, version: str = "1") -> _Record:
    return _Record(_Name(name), hashlib.sha256(f"{name}-{version}".encode()).digest(), f"https://c/{name}-{version}")


def _wheel(name: str, version: str = "1.0") -> str:
    return f"{name}=={version} --hash=sha256:{hashlib.sha256(f'{name}{version}'.encode()).hexdigest()}"


CONDA = ["python", "libcublas", "pytorch", "numpy", "openssl"]
PIP = ["nvidia-cudnn-cu12", "torch", "tabulate"]


def _dockerfile(name: str = "n", notebook: str = "n.ipynb", content_hash: str = "h") -> str:
    inputs = DockerfileInputs(
        name, "0", 1, content_hash, notebook, "3.11", "12.4", None, False, False, "debian:12", "why", None, True
    )
    return render(inputs)


def _tags(conda=None, pip=None, dockerfile=None, base_id="sha256:b") -> dict[str, str]:
    records = [_record(n) if isinstance(n, str) else _record(*n) for n in (conda or CONDA)]
    lines = pip if pip is not None else [_wheel(n) for n in PIP]
    inputs = chain.ChainInputs(
        base_id=base_id,
        activate_sha256="a" * 64,
        conda=chain.conda_packages(records),
        pip=chain.pip_wheels(lines),
        interpreter="py",
        groups=layer_groups(),
    )
    parts = chain.split(dockerfile or _dockerfile())
    assert chain.fits(inputs, parts)
    return {step.name: step.tag for step in chain.plan(inputs, parts)}


def _changed(a: dict, b: dict) -> list[str]:
    return [g for g in GROUPS if a[g] != b[g]]


def test_the_rendered_dockerfile_splits_into_a_head_one_copy_per_group_and_a_tail_with_the_notebook():
    parts = chain.split(_dockerfile())
    assert parts.head.splitlines()[1].startswith("FROM debian:12")
    assert f"COPY {contract.CONTEXT_ACTIVATE} {contract.ACTIVATE}" in parts.head
    assert parts.copies == tuple(
        f"COPY {contract.layer_dir(i, g)}/ {contract.PREFIX}/" for i, g in enumerate(layer_groups().names)
    )
    assert f"COPY {contract.CONTEXT_WORK}/" in parts.tail  # the final image's context: work/ alone
    assert "ENTRYPOINT" in parts.tail and "LABEL" in parts.tail
    final = chain.final_dockerfile("kbundle-steps/packages:0123", parts.tail)
    assert [ln for ln in final.splitlines() if ln.startswith("FROM")] == ["FROM kbundle-steps/packages:0123"]


def test_a_dockerfile_not_in_kbundles_layout_is_not_split():
    assert chain.split("FROM x\nCOPY env/ /opt/kbundle/env/\n") is None
    odd = _dockerfile().replace("COPY env-layers/02-framework/", "RUN true\nCOPY env-layers/02-framework/")
    assert chain.split(odd) is None


def test_the_same_packages_give_the_same_tags_in_any_order():
    first = _tags()
    assert first == _tags(conda=CONDA[::-1], pip=[_wheel(n) for n in PIP[::-1]])
    assert list(first) == list(GROUPS)
    assert all(tag.startswith(f"{chain.STEP_REPO}/{group}:") for group, tag in first.items())
    assert len(set(first.values())) == len(GROUPS)


@pytest.mark.parametrize(
    "change, changed",
    [
        ({"pip": [_wheel("nvidia-cudnn-cu12"), _wheel("torch"), _wheel("tabulate", "2.0")]}, ["packages"]),
        (
            {"pip": [_wheel("nvidia-cudnn-cu12"), _wheel("torch", "2.1"), _wheel("tabulate")]},
            ["framework", "python", "packages"],
        ),
        ({"pip": [_wheel("nvidia-cudnn-cu12", "9"), _wheel("torch"), _wheel("tabulate")]}, GROUPS[1:]),
        ({"conda": ["python", "libcublas", "pytorch", ("numpy", "2"), "openssl"]}, ["python", "packages"]),
        ({"conda": ["python", ("libcublas", "2"), "pytorch", "numpy", "openssl"]}, list(GROUPS[1:])),
        ({"conda": [*CONDA, "zlib"]}, ["python", "packages"]),
        ({"base_id": "sha256:other"}, list(GROUPS)),
    ],
    ids=["pip-packages", "pip-framework", "pip-cuda", "conda-rest", "conda-cuda", "conda-added", "base"],
)
def test_a_changed_package_changes_its_group_and_every_group_above_it_and_none_below(change, changed):
    assert _changed(_tags(), _tags(**change)) == list(changed)


def test_a_pip_package_that_replaces_a_conda_one_changes_every_group():
    # pip takes numpy's files out of conda's group: no group's content is what it was.
    assert _changed(_tags(), _tags(pip=[*(_wheel(n) for n in PIP), _wheel("numpy")])) == list(GROUPS[1:])


def test_a_notebook_or_the_bundles_name_changes_no_step():
    assert _tags() == _tags(dockerfile=_dockerfile(name="other", notebook="edited.ipynb", content_hash="h2"))


@pytest.mark.parametrize(
    "lines, ok",
    [
        (["a==1 --hash=sha256:" + "0" * 64], True),
        (["a==1 --hash=sha256:" + "0" * 64 + "  # built from git+https://x/a@v1"], True),
        (["a==1"], False),  # not one wheel until pip chose
        (["a>=1 --hash=sha256:" + "0" * 64], False),
        (["a==1 --hash=sha256:" + "0" * 64 + " --hash=sha256:" + "1" * 64], False),
    ],
)
def test_pip_lines_name_their_wheels_only_when_exact_and_hashed_once(lines, ok):
    assert (chain.pip_wheels(lines) is not None) is ok


def test_the_chain_label_round_trips_and_ignores_foreign_words():
    steps = [
        chain.StepOutcome("base", "kbundle-steps/base:1", False),
        replace(chain.StepOutcome("a", "x", True), tag="kbundle-steps/cuda:2"),
    ]
    assert chain.tags_of(chain.chain_label(steps) + " evil/other:1") == ["kbundle-steps/base:1", "kbundle-steps/cuda:2"]


class _Manifest:
    def __init__(self, locked: bool):
        self.pip_locked = locked


class _Bundle:
    def __init__(self, pip, locked=True):
        self.pip = pip
        self.manifest = _Manifest(locked)


@pytest.mark.parametrize(
    "pip, locked, recorded, known",
    [
        ([], True, None, []),
        ([_wheel("b"), _wheel("a")], True, None, [_wheel("b"), _wheel("a")]),  # the bundle's order, as pip installs
        (["a==1.0"], True, None, None),  # no hash: only pip's resolver says which wheel
        ([_wheel("a")], False, None, None),  # unlocked: resolved only while installing
        (["a>=1"], False, [_wheel("a", "1.2")], [_wheel("a", "1.2")]),  # this bundle's last resolution
    ],
)
def test_the_pip_resolution_is_known_before_installing_only_when_locked_or_recorded(
    monkeypatch, pip, locked, recorded, known
):
    from kbundle.image import make, wheels

    monkeypatch.setattr(wheels, "recorded_resolution", lambda content_hash: recorded)
    assert make._known_pip(_Bundle(pip, locked), "h") == known
