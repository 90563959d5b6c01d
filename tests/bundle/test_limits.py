"""One set of limits for the writer and the reader (bundle/limits.py): at each limit the writer's
check (what pack runs before it writes) and the reader (verify, inspect, run) say the same thing.
A bundle the check passes opens; one byte or one member past a limit, the check refuses it."""

from __future__ import annotations

import json

import pytest
from bundlekit import manifest, members

from kbundle.bundle import limits, open_bundle, reader, schema, signing
from kbundle.bundle.reader import BundleError
from kbundle.bundle.writer import OverLimit, check_writable, seal, write_bundle


def _notebook(size: int) -> bytes:
    """A valid notebook of exactly `size` bytes."""
    head = {"cells": [], "nbformat": 4, "metadata": {}, "pad": ""}
    pad = size - len(json.dumps(head).encode())
    return json.dumps({**head, "pad": "x" * pad}).encode()


def _content(**replace: bytes) -> dict[str, bytes]:
    return {**members(), **{f"work/{k}" if k.endswith(".ipynb") else k: v for k, v in replace.items()}}


def _others(content: dict[str, bytes]) -> int:
    return sum(len(content[m]) for m in ("Dockerfile", "env/environment.yml"))


def test_the_reader_reads_its_limits_from_the_one_module():
    assert reader.TEXT_BUDGET == limits.TEXT_BUDGET == 16 * 1024**2
    assert reader.DEFAULT_MAX_EXTRACT == limits.DEFAULT_MAX_EXTRACT
    assert schema.MAX_MEMBERS == limits.MAX_MEMBERS
    assert signing.MEMBER_LIMIT == limits.SIGNATURE_LIMIT


def test_texts_exactly_at_the_budget_are_written_and_open(tmp_path):
    content = _content()
    content["work/nb.ipynb"] = _notebook(limits.TEXT_BUDGET - _others(content))
    path = tmp_path / "edge.kbundle"
    write_bundle(path, manifest(content), content, check=True)
    assert open_bundle(path).members["work/nb.ipynb"].size == len(content["work/nb.ipynb"])


def test_one_byte_past_the_budget_is_refused_by_both(tmp_path):
    content = _content()
    content["work/nb.ipynb"] = _notebook(limits.TEXT_BUDGET - _others(content) + 1)
    path = tmp_path / "over.kbundle"
    with pytest.raises(OverLimit, match="16.0 MiB"):
        write_bundle(path, manifest(content), content, check=True)
    assert not path.exists() and not list(tmp_path.iterdir())
    write_bundle(path, manifest(content), content)  # unchecked, as the reader's tests craft bundles
    with pytest.raises(BundleError, match="together are more than 16.0 MiB"):
        open_bundle(path)


def test_member_count_at_and_past_the_limit():
    content = _content()
    base = len(content)
    at = {**content, **{f"work/d/{i}": b"" for i in range(limits.MAX_MEMBERS - base)}}
    check_writable(seal(manifest(at, includes=[]), at), at)
    past = {**at, "work/d/one-more": b""}
    with pytest.raises(OverLimit, match="10,001 files, more than the 10,000"):
        check_writable(seal(manifest(past, includes=[]), past), past)


def test_names_too_long_for_the_manifest_or_the_directory_are_refused():
    content = _content()
    long = {f"work/{'d' * 900}/{i}": b"" for i in range(4000)}
    many = {**content, **long}
    with pytest.raises(OverLimit, match="manifest would be .* more than the 4.0 MiB|directory would pass 3.0 MiB"):
        check_writable(seal(manifest(many, includes=[]), many), many)


@pytest.mark.parametrize(
    "name, rule",
    [
        ("work/a\u202eb.csv", "control characters"),
        ("work/a\x7fb.csv", "control characters"),
        ("work/" + "x" * limits.MEMBER_NAME_LIMIT, "longer than 1024"),
        ("work//a.csv", "not a member path"),
    ],
)
def test_member_names_a_reader_refuses_are_refused_before_writing(name, rule):
    content = {**_content(), name: b"x"}
    with pytest.raises(OverLimit, match=rule):
        check_writable(seal(manifest(content, includes=[]), content), content)


def test_a_manifest_the_schema_refuses_is_not_written(tmp_path):
    content = _content()
    bad = manifest(content, dependencies=["numpy\n=1.0"])
    with pytest.raises(OverLimit, match="malformed .*dependencies\\[0\\] has control characters"):
        write_bundle(tmp_path / "x.kbundle", bad, content, check=True)
    assert not list(tmp_path.iterdir())


def test_a_notebook_the_reader_refuses_is_not_written(tmp_path):
    content = _content(**{"nb.ipynb": b'{"cells": [], "nbformat": 4, "metadata": []}'})
    with pytest.raises(OverLimit, match="not a Jupyter notebook"):
        write_bundle(tmp_path / "x.kbundle", manifest(content), content, check=True)
    assert not list(tmp_path.iterdir())
