"""Bounded resources: a 1 MB bundle that honestly declares a 1 GiB member (a sealed "bomb")
is verified, inspected and placed in well under 100 MB of memory; what passes the extraction
limit is refused before anything is written or even hashed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bundlekit import edit_manifest, good_bundle, members, sealed, sealed_bomb

from kbundle.bundle import BundleError, open_bundle
from kbundle.bundle.reader import TEXT_BUDGET

GIB = 1024**3
PEAK_LIMIT_MIB = 100


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = sealed_bomb(tmp_path_factory.mktemp("bomb") / "bomb.kbundle", GIB)
    assert path.stat().st_size < 2 * 1024 * 1024  # mail-sized, yet it unpacks to 1 GiB
    return path


_MEASURE = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(proc.stderr)
print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak(*argv: str) -> tuple[int, float]:
    """Run `argv` in a fresh process; its exit code and its peak RSS in MiB (Linux reports KiB)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, timeout=300)
    code, kib = out.stdout.split()[-2:]
    return int(code), int(kib) / 1024


def test_verify_of_a_sealed_1gib_bomb_stays_under_100mb(bomb):
    code, mib = peak(sys.executable, "-m", "kbundle.cli", "verify", str(bomb))
    assert code == 0 and mib < PEAK_LIMIT_MIB, f"exit {code}, peak {mib:.0f} MiB"


def test_inspect_of_a_sealed_1gib_bomb_stays_under_100mb(bomb):
    code, mib = peak(sys.executable, "-m", "kbundle.cli", "inspect", str(bomb))
    assert code == 0 and mib < PEAK_LIMIT_MIB, f"exit {code}, peak {mib:.0f} MiB"


_PLACE = """
import sys
from pathlib import Path
from kbundle.bundle import open_bundle
from kbundle.image.workdir import place
placement = place(open_bundle(sys.argv[1]), Path(sys.argv[2]), "k", "k")
assert (placement.workdir / "zeros.bin").stat().st_size == 1024**3
"""


def test_placing_a_sealed_1gib_bomb_streams_it_under_100mb(bomb, tmp_path):
    """What `kbundle run` does with the bundle's files (open, verify, place) streams them."""
    code, mib = peak(sys.executable, "-c", _PLACE, str(bomb), str(tmp_path / "work"))
    assert code == 0 and mib < PEAK_LIMIT_MIB, f"exit {code}, peak {mib:.0f} MiB"


def test_extracting_past_the_limit_is_refused_before_writing(bomb, tmp_path):
    opened = open_bundle(bomb)
    with pytest.raises(BundleError, match="limit"):
        opened.extract(tmp_path / "out", limit=GIB // 2)
    assert not any((tmp_path / "out").rglob("*"))
    with pytest.raises(BundleError, match="limit"):
        open_bundle(bomb, max_extract=GIB // 2)


def test_a_bundle_declaring_more_than_2gib_is_refused_before_hashing(tmp_path):
    """The manifest's sizes are checked against the limit first: no inflating 3 GiB to find out."""
    good = good_bundle(tmp_path / "good.kbundle")

    def claim(doc: dict) -> None:
        doc["files"][0]["size"] = 3 * GIB

    with pytest.raises(BundleError, match="more than the 2,048.0 MiB limit"):
        open_bundle(edit_manifest(good, tmp_path / "claims.kbundle", claim))


def test_texts_kbundle_reads_have_a_budget(tmp_path):
    big = json.dumps({"cells": [], "nbformat": 4, "metadata": {}, "pad": "x" * TEXT_BUDGET}).encode()
    with pytest.raises(BundleError, match="together are more than"):
        open_bundle(sealed(tmp_path / "big.kbundle", {**members(), "work/nb.ipynb": big}))


def test_only_the_texts_are_kept_in_memory(tmp_path):
    opened = open_bundle(good_bundle(tmp_path / "good.kbundle"))
    assert set(opened.cached) == {"work/nb.ipynb", "Dockerfile", "env/environment.yml"}
    assert opened.read("work/data/table.csv") == b"a,b\n1,2\n"  # read again, with the hash check
    assert opened.members["work/data/table.csv"].size == 8
