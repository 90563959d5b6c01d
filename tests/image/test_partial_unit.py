"""Installing only the groups the engine lacks (image/partial.py): which wheels are skipped when
the engine has the chain's bottom steps, the skipped wheels' metadata placed alone, and the
final image's file list as the engine will hold it."""

from __future__ import annotations

import hashlib
import io
import stat
import zipfile
from dataclasses import dataclass

import pytest

from kbundle.errors import KbundleError
from kbundle.facts import layer_groups
from kbundle.image import partial


@dataclass(frozen=True)
class _Step:
    name: str
    tag: str


STEPS = tuple(
    _Step(n, f"kbundle-steps/{n}:{i}") for i, n in enumerate(("base", "cuda", "framework", "python", "packages"))
)


def _line(name: str, version: str = "1.0") -> str:
    return f"{name}=={version} --hash=sha256:{hashlib.sha256(name.encode()).hexdigest()}"


TORCH = [_line("nvidia-cudnn-cu12"), _line("torch"), _line("tabulate"), _line("requests")]


def _group(name: str) -> str:
    return layer_groups().group_of("pip", name)


@pytest.mark.parametrize(
    "on_engine, lines, shadowed, install, skipped",
    [
        # A second PyTorch bundle: everything but the pip packages' step is there.
        ("base cuda framework python", TORCH, (), ["tabulate", "requests"], ["nvidia-cudnn-cu12", "torch"]),
        # The conda side changed: only the CUDA and framework wheels are skipped.
        ("base cuda framework", TORCH, (), ["tabulate", "requests"], ["nvidia-cudnn-cu12", "torch"]),
        ("base cuda", TORCH, (), ["torch", "tabulate", "requests"], ["nvidia-cudnn-cu12"]),
        # Steps above a missing one do not count: the chain is built bottom up.
        ("base framework python", TORCH, (), None, None),
        # Nothing to skip: the present steps hold no pip wheel.
        ("base", TORCH, (), None, None),
        ("base cuda framework python", [_line("tabulate")], (), None, None),
        # Every step there: the caller builds only the final image.
        ("base cuda framework python packages", TORCH, (), None, None),
        # A skipped wheel that replaces a conda package's files would change a built group.
        ("base cuda framework python", TORCH, ("torch",), None, None),
        # A wheel that is not installed must be named by one sha256.
        ("base cuda framework python", [*TORCH, "left-pad==1.0"], (), None, None),
    ],
)
def test_decide(on_engine, lines, shadowed, install, skipped):
    have = {s.tag for s in STEPS if s.name in on_engine.split()}
    found = partial.decide(STEPS, have.__contains__, lines, _group, shadowed)
    if install is None:
        assert found is None
        return
    assert [line.split("==")[0] for line in found.install] == install
    assert [line.split("==")[0] for line in found.skipped] == skipped
    assert found.lines == tuple(lines)
    assert found.present == tuple(s.tag for s in STEPS if s.name in on_engine.split())


def _wheel(tmp_path, members: dict[str, bytes], links: tuple[str, ...] = ()) -> object:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data)
    path = tmp_path / "torch-2.9.1-cp312-cp312-linux_x86_64.whl"
    path.write_bytes(buf.getvalue())
    return path


def test_place_metadata_writes_only_the_dist_info(tmp_path):
    wheel = _wheel(
        tmp_path,
        {
            "torch/__init__.py": b"big",
            "torch-2.9.1.dist-info/METADATA": b"Name: torch\nVersion: 2.9.1\nRequires-Dist: filelock\n",
            "torch-2.9.1.dist-info/RECORD": b"torch/__init__.py,,\n",
            "torch-2.9.1.dist-info/licenses/LICENSE": b"BSD",
            "torch-2.9.1.data/scripts/torchrun": b"#!python",
        },
    )
    site = tmp_path / "site-packages"
    assert partial.place_metadata(wheel, site) == "torch-2.9.1.dist-info"
    written = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert written == [
        "torch-2.9.1.dist-info/METADATA",
        "torch-2.9.1.dist-info/RECORD",
        "torch-2.9.1.dist-info/licenses/LICENSE",
    ]
    assert b"Requires-Dist: filelock" in (site / "torch-2.9.1.dist-info/METADATA").read_bytes()


@pytest.mark.parametrize(
    "members, links",
    [
        ({"torch/__init__.py": b""}, ()),  # no metadata at all
        ({"a-1.dist-info/METADATA": b"", "b-1.dist-info/METADATA": b""}, ()),  # two
        ({"a-1.dist-info/METADATA": b"", "a-1.dist-info/../../../evil": b""}, ()),
        ({"a-1.dist-info/METADATA": b"", "a-1.dist-info/RECORD": b"/etc/passwd"}, ("a-1.dist-info/RECORD",)),
    ],
)
def test_place_metadata_refuses_a_strange_wheel_in_one_error(tmp_path, members, links):
    wheel = _wheel(tmp_path, members, links)
    with pytest.raises(KbundleError, match="cannot read the metadata of torch-2.9.1"):
        partial.place_metadata(wheel, tmp_path / "site")
    assert not (tmp_path / "evil").exists()


def test_place_metadata_catches_a_damaged_cache_entry(tmp_path):
    wheel = _wheel(tmp_path, {"a-1.dist-info/METADATA": b"Name: a\n" * 50})
    data = bytearray(wheel.read_bytes())
    at = data.index(b"Name: a")
    data[at : at + 7] = b"Name: b"  # the stored bytes change, the zip's CRC does not
    wheel.write_bytes(bytes(data))
    with pytest.raises(KbundleError, match="cannot read the metadata"):
        partial.place_metadata(wheel, tmp_path / "site")


def test_overlaid_lets_the_upper_layer_win():
    lower = ["f 3 lib/a.py", "f 4 lib/b.py", "l 7 bin/python"]
    upper = ["f 9 lib/b.py", "f 1 lib/c with space.py"]
    assert sorted(partial.overlaid(lower, upper)) == sorted(
        ["f 3 lib/a.py", "f 9 lib/b.py", "l 7 bin/python", "f 1 lib/c with space.py"]
    )


def test_a_damaged_skipped_wheel_means_the_whole_install_and_leaves_the_cache(tmp_path):
    """A cached wheel whose metadata fails its CRC is removed (the whole install then fetches it
    again), rather than failing this run and every later one."""
    from kbundle.image import healing
    from kbundle.image.make import _skipped_metadata

    good = _wheel(tmp_path, {"a-1.dist-info/METADATA": b"Name: a\n"})
    good = good.rename(tmp_path / "a-1-py3-none-any.whl")
    bad = _wheel(tmp_path, {"b-1.dist-info/METADATA": b"Name: b\n" * 50})
    data = bytearray(bad.read_bytes())
    at = data.index(b"Name: b")
    data[at : at + 7] = b"Name: c"
    bad.write_bytes(bytes(data))
    healing.drain()
    assert [sorted(map(str, m)) for m in _skipped_metadata([good])] == [["a-1.dist-info/METADATA"]]
    assert _skipped_metadata([good, bad]) is None
    assert good.exists() and not bad.exists()
    assert any(bad.name in line and "damaged" in line for line in healing.drain())
