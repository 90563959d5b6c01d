"""pipadapt: an early pip lock made with nothing installed, adapted to conda's packages as pip
itself would have chosen with them installed (pure; table-driven on pip's report format)."""

from __future__ import annotations

import pytest

from kbundle.pack.pipadapt import adapt
from kbundle.pack.piplock import pins_from_report
from kbundle.pydists import Provided


def _item(name: str, version: str, requires: list[str] = (), requested: bool = False) -> dict:
    return {
        "metadata": {"name": name, "version": version, "requires_dist": list(requires)},
        "download_info": {"url": f"https://x/{name}-{version}-py3-none-any.whl", "archive_info": {"hashes": {}}},
        "requested": requested,
    }


def _conda(**versions: str) -> list[Provided]:
    return [Provided(name.replace("_", "-"), version, name) for name, version in versions.items()]


CASES = {
    "conda's version satisfies: kept, pip's dropped": (
        [_item("kbrange", "1.5", ["kbdep>=0.3"], True), _item("kbdep", "0.3")],
        _conda(kbdep="0.4"),
        ["kbrange>=1"],
        "3.11",
        ["kbrange"],
    ),
    "conda's version does not satisfy: only pip can say": (
        [_item("kbrange", "1.5", ["kbdep>=0.3"], True), _item("kbdep", "0.3")],
        _conda(kbdep="0.2"),
        ["kbrange>=1"],
        "3.11",
        None,
    ),
    "what only pip's version of a kept package needed goes too": (
        [_item("a", "1", ["b>=1"], True), _item("b", "2", ["c"]), _item("c", "1")],
        _conda(b="1.5"),
        ["a"],
        "3.11",
        ["a"],
    ),
    "what another package needs stays": (
        [_item("a", "1", ["b>=1", "c"], True), _item("b", "2", ["c"]), _item("c", "1")],
        _conda(b="1.5"),
        ["a"],
        "3.11",
        ["a", "c"],
    ),
    "a requirement whose marker is false on the image does not count": (
        [_item("a", "1", ['b>=2; python_version < "3.8"', "b>=1"], True), _item("b", "2")],
        _conda(b="1.5"),
        ["a"],
        "3.11",
        ["a"],
    ),
    "... and counts where it is true": (
        [_item("a", "1", ['b>=2; python_version < "3.8"', "b>=1"], True), _item("b", "2")],
        _conda(b="1.5"),
        ["a"],
        "3.7",
        None,
    ),
    "a pip line that names conda's package at another version replaces it": (
        [_item("six", "1.15.0", [], True)],
        _conda(six="1.16.0"),
        ["six==1.15.0"],
        "3.11",
        None,
    ),
    "a pip line that conda's version satisfies leaves it": (
        [_item("six", "1.17.0", [], True), _item("rich", "13", ["pygments>=2"], True), _item("pygments", "2.19")],
        _conda(six="1.16.0"),
        ["six", "rich"],
        "3.11",
        ["rich", "pygments"],
    ),
    "nothing conda provides is touched": (
        [_item("a", "1", ["c"], True), _item("c", "1")],
        _conda(zzz="1"),
        ["a"],
        "3.11",
        ["a", "c"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapt(case):
    items, provided, top, python, expected = CASES[case]
    report = {"install": items}
    found = adapt(report, pins_from_report(report), provided, python, top)
    if expected is None:
        assert found is None
    else:
        assert found is not None and sorted(p.name for p in found) == sorted(expected)
