"""The build context as kbundle's own tar stream (image/tarstream.py): normalised headers, links as
links, every byte counted; and the progress line it feeds."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from kbundle import contract
from kbundle.errors import KbundleError
from kbundle.image import tarstream
from kbundle.progress import Meter


def _context(tmp_path):
    ctx = tmp_path / "ctx"
    (ctx / "env-layers/01-cuda/lib").mkdir(parents=True)
    (ctx / "env-layers/01-cuda/lib/libbig.so").write_bytes(os.urandom(3 * tarstream.CHUNK + 5))
    (ctx / "env-layers/01-cuda/lib/libbig.so").chmod(0o755)
    os.link(ctx / "env-layers/01-cuda/lib/libbig.so", ctx / "env-layers/01-cuda/lib/libsame.so")
    (ctx / "env-layers/01-cuda/lib/libbig.so.12").symlink_to("libbig.so")
    (ctx / "env-layers/02-framework").mkdir()
    deep = ctx / "work" / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "notebook.ipynb").write_text("{}")
    (ctx / "Dockerfile").write_text("FROM x\n")
    return ctx


def _read(ctx, meter=None) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(b"".join(tarstream.stream(ctx, meter))))


def test_the_stream_is_a_tar_of_the_context_with_fixed_owners_and_times(tmp_path):
    ctx = _context(tmp_path)
    members = {m.name: m for m in _read(ctx).getmembers()}
    expected = {p.relative_to(ctx).as_posix() for p in ctx.rglob("*")}
    assert set(members) == expected  # long names too (PAX headers)
    assert all(
        m.uid == 0 and m.gid == 0 and m.uname == "" and m.mtime == contract.CONTEXT_MTIME for m in members.values()
    )
    big = members["env-layers/01-cuda/lib/libbig.so"]
    assert big.isreg() and big.mode == 0o755 and big.size == 3 * tarstream.CHUNK + 5
    assert members["env-layers/01-cuda/lib/libsame.so"].isreg()  # a hard link travels as a file of its own
    link = members["env-layers/01-cuda/lib/libbig.so.12"]
    assert link.issym() and link.linkname == "libbig.so"
    assert members["env-layers/02-framework"].isdir()  # an empty layer folder still goes
    names = list(members)
    assert names.index("env-layers") < names.index("env-layers/01-cuda") < names.index("env-layers/01-cuda/lib")


def test_the_contents_arrive_whole(tmp_path):
    ctx = _context(tmp_path)
    tar = _read(ctx)
    data = tar.extractfile("env-layers/01-cuda/lib/libbig.so").read()
    assert data == (ctx / "env-layers/01-cuda/lib/libbig.so").read_bytes()


def test_every_byte_is_counted_to_the_planned_total(tmp_path):
    ctx = _context(tmp_path)
    lines = []
    meter = Meter("sending the build context", total_bytes=tarstream.payload_bytes(ctx), on_change=lines.append)
    _read(ctx, meter)
    assert meter.bytes == meter.total_bytes == 2 * (3 * tarstream.CHUNK + 5) + len("{}") + len("FROM x\n")
    assert lines[0].startswith("sending the build context: ") and " of " in lines[0]
    assert not lines[0].startswith("sending the build context: 0,")  # bytes alone: no count of items


def test_the_same_context_gives_the_same_bytes(tmp_path):
    ctx = _context(tmp_path)
    first = b"".join(tarstream.stream(ctx))
    os.utime(ctx / "Dockerfile", (1, 1))
    assert b"".join(tarstream.stream(ctx)) == first  # file times do not reach the layers


def test_a_file_that_shrinks_while_it_is_sent_is_an_error(tmp_path):
    ctx = _context(tmp_path)
    with pytest.raises(KbundleError, match="libbig.so changed while the build context was being sent"):
        for piece in tarstream.stream(ctx):
            if len(piece) == tarstream.CHUNK:  # libbig.so's first megabyte is on its way: cut the file short
                (ctx / "env-layers/01-cuda/lib/libbig.so").write_bytes(b"")
