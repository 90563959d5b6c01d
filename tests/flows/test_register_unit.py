"""flows/register.py's name claim, against kernelspecs in a private Jupyter data dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbundle.errors import KbundleError
from kbundle.flows.options import RunOptions
from kbundle.flows.register import claim
from kbundle.kernel.spec import KernelRequest, install_kernelspec

IDENTITY, MEMBERS, OTHER = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture
def registered(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)

    def one(bundle_hash: str) -> None:
        install_kernelspec(KernelRequest("kbundle-analysis", "analysis", "img:1", str(tmp_path), [], bundle_hash, {}))

    return one


@pytest.mark.parametrize(
    "recorded, legacy, same",
    [
        (IDENTITY, MEMBERS, True),  # registered by this kbundle
        (MEMBERS, MEMBERS, True),  # registered before the identity: recorded the member-only hash
        (MEMBERS, "", False),  # ... which alone proves nothing
        (OTHER, MEMBERS, False),  # another bundle
    ],
)
def test_a_kernel_of_the_same_bundle_is_no_collision_old_records_included(registered, recorded, legacy, same):
    registered(recorded)
    options = RunOptions(bundle=Path("analysis.kbundle"))
    if same:
        previous, message = claim(options, IDENTITY, "kbundle-analysis", legacy)
        assert previous is not None and message is None
    else:
        with pytest.raises(KbundleError, match="already runs another bundle"):
            claim(options, IDENTITY, "kbundle-analysis", legacy)
