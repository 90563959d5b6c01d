"""pip's failures named by their cause, and pack's last line naming which side is locked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kbundle.commands.pack import lock_status
from kbundle.pipplatform import error_line, failure_cause, target_gaps

REFUSED = """\
WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection broken by 'NewConnectionError("HTTPConnection(host='127.0.0.1', port=9): Failed to establish a new connection: [Errno 111] Connection refused")': /simple/kbrange/
ERROR: Could not find a version that satisfies the requirement kbrange (from versions: none)
ERROR: No matching distribution found for kbrange
"""
TLS = """\
Could not fetch URL https://mirror.corp.example/simple/torch/: There was a problem confirming the ssl certificate: HTTPSConnectionPool(host='mirror.corp.example', port=443) - skipping
ERROR: Could not find a version that satisfies the requirement torch==2.1.0 (from versions: none)
ERROR: No matching distribution found for torch==2.1.0
"""
CONFLICT = """\
ERROR: Cannot install requests==2.31 and urllib3<1.21 because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested urllib3<1.21
    requests 2.31.0 depends on urllib3<3 and >=1.21.1

To fix this you could try to:
1. loosen the range of package versions you've specified
ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""
MISSING = """\
ERROR: Could not find a version that satisfies the requirement urllib3>=3 (from versions: 1.26.0, 2.0.0)
ERROR: No matching distribution found for urllib3>=3
"""
CRASH = """\
ERROR: Exception:
Traceback (most recent call last):
  File "pip/_internal/cli/base_command.py", line 180, in exc_logging_wrapper
OSError: [Errno 28] No space left on device
"""


@pytest.mark.parametrize(
    "stderr, expected",
    [
        (REFUSED, "the package index did not answer (127.0.0.1:9: Connection refused): cannot resolve kbrange"),
        (TLS, "the package index did not answer (https://mirror.corp.example/simple/torch/: There was a problem"),
        (
            CONFLICT,
            "conflicting requirements: The user requested urllib3<1.21; requests 2.31.0 depends on urllib3<3 and >=1.21.1",
        ),
        (MISSING, None),  # pip's own first line says it: no such version
    ],
)
def test_failure_cause(stderr, expected):
    found = failure_cause(stderr, error_line(stderr, 1))
    if expected is None:
        assert found is None
    else:
        assert found is not None and found.startswith(expected), found


def test_a_pip_crash_is_named_by_its_exception_not_by_the_word_exception():
    assert error_line(CRASH, 2) == "OSError: [Errno 28] No space left on device"
    assert error_line(MISSING, 1).startswith("Could not find a version that satisfies the requirement urllib3>=3")


def _m(locked: bool, pip: list[str], pip_locked: bool, note: str | None = None):
    return SimpleNamespace(locked=locked, pip=pip, pip_locked=pip_locked, lock_note=note)


@pytest.mark.parametrize(
    "manifest, start",
    [
        (_m(True, ["a==1 --hash=sha256:0"], True), "fully locked: every conda package and pip pin"),
        (_m(True, [], False), "fully locked: every conda package is fixed"),
        (_m(False, ["a==1 --hash=sha256:0"], True, "channels unreachable (x)"), "pip locked, conda unlocked: channels"),
        (_m(True, ["a>=1"], False), "conda locked, pip unlocked: the recipient will resolve the pip lines a>=1"),
        (_m(True, ["a==1"], False), "conda locked, pip unlocked: the recipient will resolve the dependencies"),
        (_m(False, ["a>=1"], False, "n"), "unlocked: the recipient will resolve the whole environment, conda and pip"),
        (_m(False, [], False), "unlocked: the recipient will resolve the whole environment"),
    ],
)
def test_the_summary_says_which_side_is_locked(manifest, start):
    assert lock_status(manifest).startswith(start), lock_status(manifest)


UNREACHABLE = "channels unreachable (https://c did not answer): wrote an unlocked bundle; the recipient will resolve it"


@pytest.mark.parametrize(
    "note, last",
    [
        (
            UNREACHABLE,
            "unlocked: the recipient will resolve the whole environment: channels unreachable (https://c did not answer)",
        ),
        (
            "not locked (--lock never); the recipient will resolve the environment",
            "unlocked: the recipient will resolve the whole environment: not locked (--lock never)",
        ),
    ],
)
def test_the_last_line_gives_the_notes_cause_without_repeating_it(note, last):
    """pack prints the note in full first; its last line keeps the cause only."""
    assert lock_status(_m(False, [], False, note)) == last


def _item(name: str, requires: list[str], extras: list[str] = ()) -> dict:
    return {"metadata": {"name": name, "version": "1", "requires_dist": requires}, "requested_extras": list(extras)}


@pytest.mark.parametrize(
    "python, items, installed, gaps",
    [
        # pip on a 3.11 host skipped Markdown's importlib-metadata; a 3.7 image needs it
        (
            "3.7",
            [_item("Markdown", ['importlib-metadata>=4.4; python_version < "3.10"'])],
            [],
            ["importlib-metadata>=4.4"],
        ),
        ("3.11", [_item("Markdown", ['importlib-metadata>=4.4; python_version < "3.10"'])], [], []),
        # conda provides it: pip sees it installed
        ("3.7", [_item("Markdown", ['importlib-metadata>=4.4; python_version < "3.10"'])], ["importlib_metadata"], []),
        # already chosen, or unconditional (pip followed those itself)
        ("3.7", [_item("a", ['zipp; python_version < "3.8"']), _item("zipp", [])], [], []),
        ("3.7", [_item("a", ["zipp"])], [], []),
        # an extra's requirement counts only when the extra was asked for
        ("3.7", [_item("a", ['b; extra == "x" and python_version < "3.8"'])], [], []),
        ("3.7", [_item("a", ['b; extra == "x" and python_version < "3.8"'], ["x"])], [], ["b"]),
        ("3.7", [_item("a", ['pywin32; sys_platform == "win32"'])], [], []),
    ],
)
def test_target_gaps_judge_markers_for_the_images_python(python, items, installed, gaps):
    assert target_gaps({"install": items}, python, installed) == gaps
