"""Where a bundle's packages may come from and where their files may land (image/provenance.py): pure, by table."""

from __future__ import annotations

import os

import pytest

from kbundle.image import provenance as P

CH = ("http://127.0.0.1:18765/", "conda-forge")


@pytest.mark.parametrize(
    "path, unsafe",
    [
        ("lib/python3.11/site-packages/x.py", False),
        ("site-packages/x/../y.py", True),
        ("../../etc/passwd", True),
        ("/etc/passwd", True),
        ("C:/Windows/x", True),
        ("..", True),
        ("", True),
        ("a..b/c", False),
        ("bin\\..\\..\\x", True),
    ],
)
def test_unsafe_path(path, unsafe):
    assert P.unsafe_path(path) is unsafe


@pytest.mark.parametrize(
    "url, outside",
    [
        ("http://127.0.0.1:18765/noarch/x-1-0.tar.bz2", False),
        ("https://conda.anaconda.org/conda-forge/linux-64/x-1-0.conda", False),
        ("https://conda.anaconda.org/conda-forge-evil/linux-64/x-1-0.conda", True),  # a prefix, not a channel
        ("http://127.0.0.1:18766/noarch/x-1-0.tar.bz2", True),
        ("https://evil.example/noarch/x-1-0.tar.bz2", True),
        ("file:///tmp/x-1-0.tar.bz2", True),
        ("http://127.0.0.1:18765/noarch/../../x-1-0.tar.bz2", True),
        ("/tmp/x-1-0.tar.bz2", True),
    ],
)
def test_package_urls_must_sit_under_a_declared_channel(url, outside):
    assert P.outside_channels(url, CH) is outside


def test_a_file_channel_declared_by_the_bundle_allows_nothing():
    assert P.outside_channels("file:///home/you/x-1-0.tar.bz2", ("file:///",))


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"conda": "http://127.0.0.1:18765/noarch/x-1-0.tar.bz2"}, None),
        ({"conda": "/tmp/exp/noarch/x-1-0.tar.bz2"}, "/tmp/exp"),
        ({"conda": "file:///etc/x.tar.bz2"}, "file:///etc"),
        ({"conda": "noarch/x.tar.bz2"}, "noarch/x"),
        ({"conda": "http://h/noarch/x.tar.bz2", "fn": "../x.tar.bz2"}, "../x"),
        ({"conda": "http://h/noarch/x.tar.bz2", "file_name": "/x.tar.bz2"}, "/x.tar.bz2"),
        ({"conda": "http://h/\x1b[2J.tar.bz2/../x"}, "\\x1b"),
    ],
)
def test_lock_problem(entry, problem):
    found = P.lock_problem({"version": 6, "packages": [entry]})
    if problem is None:
        assert found is None
    else:
        assert found and problem in found and "\x1b" not in found


@pytest.mark.parametrize(
    "url, file_name, words",
    [
        ("http://127.0.0.1:18765/noarch/x-1-0.tar.bz2", "x-1-0.tar.bz2", None),
        ("http://127.0.0.1:18765/noarch/x-1-0.tar.bz2", "../x-1-0.tar.bz2", "file name"),
        ("https://evil.example/x-1-0.tar.bz2", "x-1-0.tar.bz2", "outside the bundle's channels"),
    ],
)
def test_record_problem(url, file_name, words):
    found = P.record_problem(url, file_name, CH)
    assert (found is None) if words is None else (words in found)


def test_paths_problem_names_the_package_and_the_path():
    assert P.paths_problem("ok-1-0", ["lib/a.py", "bin/x"]) is None
    assert "/etc/cron.d/x" in P.paths_problem("evil-1-0", ["lib/a.py", "/etc/cron.d/x"])
    assert "../../x" in P.paths_problem("evil-1-0", ["../../x"])


@pytest.mark.parametrize(
    "link, target, escapes",
    [
        ("lib/a.py", "b.py", False),
        ("bin/python", "python3.11", False),
        ("lib/a.py", "/opt/kbundle/env/lib/b.py", False),  # absolute, but inside the final prefix
        ("lib/a.py", "/home/you/secret.py", True),
        ("lib/a.py", "../../secret.py", True),
        ("lib/a.py", "../lib/../../x", True),
        ("lib/d", "../lib", False),
        ("lib/e", "d/../../..", True),  # through another link: followed as the kernel would
        ("lib/loop", "loop", True),
    ],
)
def test_escaping_links(tmp_path, link, target, escapes):
    (tmp_path / "lib").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "lib" / "b.py").write_text("")
    if link != "lib/d":
        (tmp_path / "lib" / "d").symlink_to("../lib")
    os.symlink(target, tmp_path / link)
    found = list(P.escaping_links(tmp_path))
    assert (link in found) is escapes, found
