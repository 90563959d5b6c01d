"""Terminal injection: bundle text reaches the terminal only through display.safe. Names and
specs with control characters break the schema (exit 3, one escaped line); free text such as
reasons is allowed but shown escaped, so it cannot erase a line or print a fake one."""

from __future__ import annotations

import json

import pytest
from bundlekit import edit_manifest, good_bundle, manifest, members

from helpers import assert_one_error_line, kbundle
from kbundle.bundle import Added, Dropped
from kbundle.commands.bundle import inspect_lines

ERASE = "\x1b[2K"


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", f"good{ERASE}"),
        ("name", "good\nerror: fake"),
        ("conda.dependencies", [f"numpy{ERASE}"]),
        ("pip", ["rich==13.0.0\n--index-url http://evil"]),
        ("base_image", f"debian{ERASE}"),
    ],
)
def test_names_and_specs_with_control_characters_are_refused_escaped(tmp_path, field, value):
    def change(doc: dict) -> None:
        if "." in field:
            outer, inner = field.split(".")
            doc[outer][inner] = value
        else:
            doc[field] = value

    bad = edit_manifest(good_bundle(tmp_path / "g.kbundle"), tmp_path / "bad.kbundle", change)
    for command in ("inspect", "verify"):
        result = kbundle(command, bad)
        assert_one_error_line(result, "malformed")
        assert result.returncode == 3 and "\x1b" not in result.stderr + result.stdout


def test_free_text_is_shown_escaped_by_inspect(tmp_path):
    hostile = f"{ERASE}\rok\nname       trusted-bundle"
    bundle = good_bundle(
        tmp_path / "reasons.kbundle",
        base_image_reason=hostile,
        dropped=[Dropped("vc=14", hostile)],
        added=[Added("pip", hostile)],
        lock_note=hostile,
    )
    result = kbundle("inspect", bundle)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert "\\x1b[2K\\rok\\nname       trusted-bundle" in result.stdout
    assert [line for line in result.stdout.splitlines() if line.startswith("name ")] == []
    doc = json.loads(kbundle("inspect", bundle, "--json").stdout)  # JSON escapes by itself
    assert doc["base_image_reason"] == hostile


def test_every_field_inspect_shows_goes_through_safe():
    """Below the schema too: a manifest built in memory with control characters everywhere."""
    evil = f"x{ERASE}\ny\u202e"
    m = manifest(
        members(),
        name=evil,
        notebook=evil,
        python=evil,
        cuda=evil,
        cudnn=evil,
        base_image=evil,
        base_image_reason=evil,
        channels=[evil],
        dependencies=[evil],
        pip=[evil],
        dropped=[Dropped(evil, evil)],
        added=[Added(evil, evil)],
        lock_note=evil,
        kbundle_version=evil,
    )
    for line in inspect_lines("b.kbundle", m, "unsigned"):
        assert "\x1b" not in line and "\n" not in line and "\u202e" not in line, repr(line)
