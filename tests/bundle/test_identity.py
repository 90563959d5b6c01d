"""The bundle's identity (`bundle_hash`): the content hash and every manifest field that defines what
is built, so that a copy with the same members and another manifest is another bundle.

Real bundles written by kbundle's writer, edited member by member (bundlekit), read by the reader
and the real CLI."""

from __future__ import annotations

import ast
import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
from bundlekit import edit_manifest, good_bundle, make_key

from helpers import assert_one_error_line, kbundle
from kbundle.bundle import BundleError, open_bundle
from kbundle.bundle.format import IDENTITY_FIELDS, MANIFEST, NOT_IDENTITY, Manifest, identity_of
from kbundle.bundle.signing import signer_for
from kbundle.flows.run import bundle_hash


def _without_identity(doc: dict) -> None:
    doc.pop("bundle_hash", None)


def test_every_manifest_field_is_either_part_of_the_identity_or_left_out_on_purpose():
    names = {f.name for f in dataclasses.fields(Manifest)}
    assert set(IDENTITY_FIELDS) | set(NOT_IDENTITY) == names
    assert not set(IDENTITY_FIELDS) & set(NOT_IDENTITY)


def test_the_writer_states_the_identity_and_the_reader_agrees(tmp_path):
    bundle = open_bundle(good_bundle(tmp_path / "b.kbundle"))
    assert len(bundle.identity) == 64 and bundle.identity != bundle.content_hash
    assert bundle.manifest.bundle_hash == bundle.identity == bundle_hash(bundle)
    assert bundle.identity == identity_of(bundle.manifest, bundle.content_hash)
    doc = json.loads(kbundle("inspect", tmp_path / "b.kbundle", "--json").stdout)
    assert doc["bundle_hash"] == bundle.identity


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pip", ["evil==6.6.6"]),
        ("pip_indexes", {"index_url": "https://evil.example/simple", "extra_index_urls": [], "find_links": []}),
        ("pip_locked", True),
        ("conda", {"channels": ["https://evil.example/channel"], "dependencies": ["python=3.11", "ipykernel"]}),
        ("conda", {"channels": ["conda-forge"], "dependencies": ["python=3.11", "ipykernel", "evil"]}),
        ("channel_urls", ["https://evil.example/channel"]),
        ("base_image", "evil/base:latest"),
        ("cuda", "12.1"),
        ("python", "3.12"),
        ("virtual_packages", ["__glibc=2.17"]),
        ("name", "other"),
    ],
)
def test_a_copy_with_another_environment_in_its_manifest_is_another_bundle(tmp_path, field, value):
    """The attack: same members (same content hash), an edited manifest. The copy still opens (it
    is unsigned, and states no identity, as an older bundle), but it is another bundle."""
    honest = open_bundle(good_bundle(tmp_path / "honest.kbundle"))

    def edit(doc: dict) -> None:
        doc[field] = value
        _without_identity(doc)

    copy = open_bundle(edit_manifest(honest.path, tmp_path / "copy.kbundle", edit))
    assert copy.content_hash == honest.content_hash
    assert copy.identity != honest.identity and bundle_hash(copy) != bundle_hash(honest)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("base_image_reason", "another sentence"),
        ("dropped", [{"spec": "pywin32", "reason": "exists only for Windows"}]),
        ("lock_note", "a note"),
        ("source", {"kind": "env-file", "env_name": "x", "platform": "osx-arm64"}),
    ],
)
def test_notes_for_people_do_not_change_the_identity(tmp_path, field, value):
    honest = open_bundle(good_bundle(tmp_path / "honest.kbundle"))

    def edit(doc: dict) -> None:
        doc[field] = value
        _without_identity(doc)

    assert open_bundle(edit_manifest(honest.path, tmp_path / "copy.kbundle", edit)).identity == honest.identity


def test_a_bundle_from_before_the_identity_still_opens_with_the_same_identity(tmp_path):
    written = open_bundle(good_bundle(tmp_path / "new.kbundle"))
    old = open_bundle(edit_manifest(written.path, tmp_path / "old.kbundle", _without_identity))
    assert old.manifest.bundle_hash == "" and old.identity == written.identity
    assert kbundle("verify", old.path).returncode == 0


def test_a_field_that_joins_later_at_its_default_leaves_old_identities_alone(tmp_path):
    """A field at its default is left out of the hash: a manifest that never had it keeps its identity."""
    written = open_bundle(good_bundle(tmp_path / "b.kbundle"))
    assert written.manifest.require_cuda is None and written.manifest.cuda_env_libs is False
    with_defaults = open_bundle(
        edit_manifest(written.path, tmp_path / "d.kbundle", lambda d: d.update(require_cuda=None, cuda_env_libs=False))
    )
    assert with_defaults.identity == written.identity


def test_an_identity_that_does_not_match_the_manifest_is_a_damaged_bundle(tmp_path):
    honest = good_bundle(tmp_path / "honest.kbundle")

    def edit(doc: dict) -> None:
        doc["pip"] = ["evil==6.6.6"]  # the stated identity kept: the honest bundle's

    copy = edit_manifest(honest, tmp_path / "copy.kbundle", edit)
    with pytest.raises(BundleError, match="bundle_hash does not match"):
        open_bundle(copy)
    result = kbundle("verify", copy)
    assert_one_error_line(result, "bundle_hash does not match")
    assert result.returncode == 3


def test_a_malformed_identity_is_refused_by_the_schema(tmp_path):
    bad = edit_manifest(
        good_bundle(tmp_path / "b.kbundle"), tmp_path / "bad.kbundle", lambda d: d.update(bundle_hash="x")
    )
    with pytest.raises(BundleError, match="manifest.bundle_hash"):
        open_bundle(bad)


def test_the_signature_covers_the_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("KBUNDLE_CONFIG_DIR", str(tmp_path / "config"))
    signed = good_bundle(tmp_path / "signed.kbundle", sign=signer_for(make_key(tmp_path)))
    assert open_bundle(signed).signer is not None
    for edit in (lambda d: d.update(bundle_hash="0" * 64), _without_identity):
        with pytest.raises(BundleError, match="signature"):
            open_bundle(edit_manifest(signed, tmp_path / "edited.kbundle", edit))


def test_the_identity_is_the_same_for_the_same_bundle_written_twice(tmp_path):
    one, two = good_bundle(tmp_path / "1.kbundle"), good_bundle(tmp_path / "2.kbundle")
    assert one.read_bytes() == two.read_bytes()
    with zipfile.ZipFile(one) as zf:
        assert json.loads(zf.read(MANIFEST))["bundle_hash"] == open_bundle(two).identity


# ----------------------------------------------------------------- no import cycle


def _imports(root: Path) -> dict[str, set[str]]:
    """kbundle's import graph, counting imports inside functions (as /tmp/cycles.py does)."""
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    graph[name] |= {full} if full in modules else ({base} if base in modules else set())
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


@pytest.mark.parametrize(
    "module", ["kbundle.bundle.reader", "kbundle.bundle.signing", "kbundle.bundle.sshsig", "kbundle.trust"]
)
def test_the_reader_signing_and_trust_import_no_circle(module):
    graph = _imports(Path(__file__).resolve().parents[2] / "src")
    assert module not in _reachable(graph, module), f"{module} imports itself through others"
