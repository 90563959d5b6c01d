"""A seeded fuzzer: 300 mutants of a good bundle per run (byte flips, truncations, inserted
bytes, manifest edits, member edits with or without resealing). Every outcome is either a
bundle that opens, inspects and extracts, or ONE line of BundleError: never another exception.

Set KBUNDLE_FUZZ_SEED to explore other mutants; a failure prints the seed and mutant number.
"""

from __future__ import annotations

import io
import json
import os
import random
import zipfile
from pathlib import Path

import pytest
from bundlekit import good_bundle, members, rewrite

from kbundle.bundle import BundleError, open_bundle
from kbundle.bundle.format import MANIFEST
from kbundle.commands.bundle import inspect_lines
from kbundle.trust import read_signature

MUTANTS = 300
SEED = int(os.environ.get("KBUNDLE_FUZZ_SEED", "20240611"))
_VALUES = [None, True, False, -1, 0, 2**40, 1.5, "", "x" * 3000, "a\nb", "\x1b[2K", [], {}, [[[]]], {"a": {}}, "../x"]


def _flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def _insert(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 64)) + data[at:]


def _manifest_field(rng: random.Random, doc: dict) -> None:
    """Set a random field (top level, or inside a nested list/object) to a random value."""
    node: object = doc
    for _ in range(rng.randint(1, 3)):
        if isinstance(node, dict) and node:
            key = rng.choice(sorted(node))
            if rng.random() < 0.5 or not isinstance(node[key], (dict, list)) or not node[key]:
                node[key] = rng.choice(_VALUES)
                return
            node = node[key]
        elif isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if rng.random() < 0.5 or not isinstance(node[i], (dict, list)) or not node[i]:
                node[i] = rng.choice(_VALUES)
                return
            node = node[i]
    if isinstance(doc, dict):
        doc.pop(rng.choice(sorted(doc)), None)


def _zip_with(files: dict[str, bytes], stored: bool) -> bytes:
    buf = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compress_type=method)
    return buf.getvalue()


def _member_level(rng: random.Random, good: Path) -> bytes:
    """Edit the zip's members themselves: the manifest's JSON, a member's bytes, its name."""
    with zipfile.ZipFile(good) as zf:
        files = {i.filename: zf.read(i) for i in zf.infolist()}
    kind = rng.choice(["field", "field", "member", "drop", "rename", "raw-manifest"])
    if kind == "field":
        doc = json.loads(files[MANIFEST])
        _manifest_field(rng, doc)
        files[MANIFEST] = json.dumps(doc).encode()
    elif kind == "member":
        name = rng.choice(sorted(n for n in files if n != MANIFEST))
        files[name] = _flip(rng, files[name]) if files[name] else b"x"
    elif kind == "drop":
        files.pop(rng.choice(sorted(files)))
    elif kind == "rename":
        name = rng.choice(sorted(files))
        files[rng.choice(["../x", "work/../x", "/abs", "work/a\\b", "kbundle.sig", name + "/"])] = files.pop(name)
    else:
        files[MANIFEST] = _flip(rng, files[MANIFEST])
    return _zip_with(files, stored=rng.random() < 0.5)


def mutant(rng: random.Random, good: Path, stored: Path) -> bytes:
    kind = rng.choice(["flip", "flip-stored", "truncate", "insert", "members", "members"])
    if kind == "flip":
        return _flip(rng, good.read_bytes())
    if kind == "flip-stored":  # stored members: flips land in the manifest's JSON itself
        return _flip(rng, stored.read_bytes())
    if kind == "truncate":
        return _truncate(rng, good.read_bytes())
    if kind == "insert":
        return _insert(rng, stored.read_bytes())
    return _member_level(rng, good)


def exercise(path: Path, out: Path) -> str:
    """What readers do with a bundle: open (verify), inspect, and extract it."""
    bundle = open_bundle(path)
    lines = inspect_lines(path, bundle.manifest, read_signature(bundle).describe())
    assert not any("\x1b" in line or "\n" in line for line in lines)
    bundle.extract(out)
    return "ok"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("fuzz")
    good = good_bundle(folder / "good.kbundle", members())
    stored = rewrite(good, folder / "stored.kbundle", lambda n, d: d, stored=True)
    return good, stored


def test_every_mutant_is_ok_or_one_bundle_error(sources, tmp_path):
    good, stored = sources
    rng = random.Random(SEED)
    outcomes: dict[str, int] = {}
    for number in range(MUTANTS):
        path = tmp_path / f"m{number}.kbundle"
        path.write_bytes(mutant(rng, good, stored))
        try:
            outcome = exercise(path, tmp_path / f"out{number}")
        except BundleError as exc:
            message = str(exc)
            assert message and "\n" not in message and "\x1b" not in message, (SEED, number, message)
            outcome = "BundleError"
        except Exception as exc:  # anything else is what the CLI would print as `error: unexpected`
            pytest.fail(f"seed {SEED}, mutant {number}: unexpected {type(exc).__name__}: {exc}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        path.unlink()
    assert sum(outcomes.values()) == MUTANTS
    assert outcomes.get("BundleError", 0) > MUTANTS // 2, outcomes  # the mutations do damage
