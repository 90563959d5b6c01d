"""The first steps of every `kbundle run`, whichever kernel it registers (image, Slurm, native):

1. open the bundle once, verifying every member (bundle/reader.py); read and check its signature
2. refuse a kernel name another bundle holds, before anything is written (flows/register.py)
3. place its notebook and files in the working directory (image/workdir.py), which the run's
   undo removes again when it made it, the run fails, and no other run uses it (flows/undo.py)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kbundle.display import safe
from kbundle.flows.options import RunOptions
from kbundle.flows.register import claim


@dataclass(frozen=True)
class Arrival:
    """The verified bundle, placed: what every kind of run goes on from."""

    bundle: Any  # bundle/reader.py's Bundle, verified
    signature: Any  # flows/review.py's reading of its signature
    content_hash: str
    kernel_name: str
    display_name: str
    placement: Any  # image/workdir.py's Placement
    started: float  # time.perf_counter() when the run took the bundle (RunResult.seconds counts from it)

    @property
    def kept_warnings(self) -> list[str]:
        """One warning per file of the user's that placing the bundle kept."""
        return [
            f"kept your {k.path} (it differs from the bundle's); the bundle's copy is at {k.fresh}"
            for k in self.placement.kept
        ]

    @property
    def kept(self) -> list[dict[str, str]]:
        return [{"path": str(k.path), "fresh": str(k.fresh)} for k in self.placement.kept]


def arrive(
    options: RunOptions,
    undo,
    hash_of: Callable[[Any], str],
    kernel_name_of: Callable[[str], str],
    suffix: str,
) -> Arrival:
    """Steps 1-3. `hash_of` gives the bundle's content hash; `kernel_name_of` makes the kernel's
    name from this machine's name for the bundle; `suffix` follows it in the display name."""
    from kbundle.bundle import open_bundle
    from kbundle.flows.review import check_signature, read_sender
    from kbundle.image import workdir as wd

    started = time.perf_counter()
    bundle = open_bundle(options.bundle, max_extract=options.max_extract)
    signature = read_sender(bundle)
    check_signature(signature, options.require_signature)
    content_hash = hash_of(bundle)
    local_name = options.name or bundle.name
    kernel_name = kernel_name_of(local_name)
    # A name collision is refused before anything is written.
    claim(options, content_hash, kernel_name, getattr(bundle, "content_hash", ""))
    display_name = f"{safe(local_name)}{suffix}"
    target = options.workdir or wd.default_workdir(local_name)
    with wd.claim(target) as held:  # runs in one folder place one at a time; the folder is theirs together
        undo.claimed(held)
        placement = wd.place(bundle, target, kernel_name, display_name)
    return Arrival(bundle, signature, content_hash, kernel_name, display_name, placement, started)
