"""Making real bundles for the reader's tests: good ones, and the same with one thing wrong.

Everything here writes real zip files with the stdlib; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

from kbundle.bundle import Manifest, content_hash, write_bundle
from kbundle.bundle.format import MANIFEST, FileEntry, content_hash_of
from kbundle.bundle.writer import manifest_bytes

NOTEBOOK = json.dumps(
    {
        "cells": [{"cell_type": "code", "source": "print(1)", "metadata": {}, "outputs": [], "execution_count": None}],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
).encode()
EPOCH = (1980, 1, 1, 0, 0, 0)


def members() -> dict[str, bytes]:
    return {
        "work/nb.ipynb": NOTEBOOK,
        "work/data/table.csv": b"a,b\n1,2\n",
        "Dockerfile": b"FROM debian:bookworm-slim\n",
        "env/environment.yml": b"dependencies: [python=3.11, ipykernel]\n",
        "env/original/environment.yml": b"dependencies: [python=3.11]\n",
    }


def manifest(content: dict[str, bytes], **changes) -> Manifest:
    fields = dict(
        name="good",
        notebook="work/nb.ipynb",
        python="3.11",
        cuda=None,
        cudnn=None,
        cuda_runtime_in_env=False,
        base_image="debian:bookworm-slim",
        base_image_reason="a CPU image",
        channels=["conda-forge"],
        dependencies=["python=3.11", "ipykernel"],
        pip=["rich==13.0.0"],
        includes=["work/data/table.csv"],
        original_environment="env/original/environment.yml",
        content_hash=content_hash(content),
        kbundle_version="0.2.0",
    )
    fields.update(changes)
    return Manifest(**fields)


def good_bundle(path: Path, content: dict[str, bytes] | None = None, sign=None, **changes) -> Path:
    content = members() if content is None else content
    write_bundle(path, manifest(content, **changes), content, sign=sign)
    return path


def rewrite(src: Path, dst: Path, change: Callable[[str, bytes], bytes | None], *, stored: bool = False) -> Path:
    """Copy a zip member by member, letting `change(name, data)` alter (or, with None, drop) members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            result = change(info.filename, zin.read(info))
            if result is not None:
                info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
                zout.writestr(info, result)
    return dst


def edit_manifest(src: Path, dst: Path, change: Callable[[dict], object], *, raw: bytes | None = None) -> Path:
    """The same bundle with its manifest's JSON changed by `change(doc)` (or replaced by `raw`)."""

    def swap(name: str, data: bytes) -> bytes:
        if name != MANIFEST:
            return data
        if raw is not None:
            return raw
        doc = json.loads(data)
        change(doc)
        return json.dumps(doc).encode()

    return rewrite(src, dst, swap)


def sealed(path: Path, content: dict[str, bytes], **changes) -> Path:
    """A bundle whose manifest honestly lists `content` (sizes, hashes, content hash): so the
    only thing wrong with it is what `content` or `changes` hold."""
    return good_bundle(path, content, **changes)


def sealed_bomb(path: Path, size: int, chunk: int = 1 << 20) -> Path:
    """A small zip whose manifest honestly declares a `size`-byte member of zeros (deflated)."""
    zeros = bytes(chunk)
    digest = hashlib.sha256()
    for _ in range(size // chunk):
        digest.update(zeros)
    small = {k: v for k, v in members().items() if k != "work/data/table.csv"}
    digests = {p: hashlib.sha256(d).hexdigest() for p, d in small.items()} | {"work/zeros.bin": digest.hexdigest()}
    sizes = {p: len(d) for p, d in small.items()} | {"work/zeros.bin": size}
    m = manifest(
        small,
        name="bomb",
        includes=["work/zeros.bin"],
        content_hash=content_hash_of(digests),
        files=[FileEntry(p, digests[p], sizes[p]) for p in sorted(digests)],
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST, manifest_bytes(m))
        for name, data in sorted(small.items()):
            zf.writestr(name, data)
        info = zipfile.ZipInfo("work/zeros.bin", date_time=EPOCH)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w") as out:
            for _ in range(size // chunk):
                out.write(zeros)
    return path


def make_key(folder: Path, comment: str = "alice@example.com", name: str = "id_ed25519") -> Path:
    """A real ed25519 key pair, made by ssh-keygen, without a passphrase."""
    key = folder / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)], check=True, capture_output=True
    )
    return key


def tree_files(root: Path) -> dict[str, bytes]:
    """Every regular file below `root` (links not followed), with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()
    }
