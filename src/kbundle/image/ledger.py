"""The images kbundle built or pulled for this user: what `kbundle gc` may ever remove.

An engine is often shared (a lab server, a CI runner): its kbundle-labelled images are not
all this user's. Each image kbundle makes for the user gets one small record, a file named
by the image id, in the user's data: the Jupyter data dir's `kbundle/images/`, beside the
kernelspecs that use those images, so that "this user" means the same thing to `gc` as to
the kernel list. One file per image needs no lock: concurrent runs each write their own.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BUILT, PULLED = "built", "pulled"


@dataclass(frozen=True)
class Entry:
    image_id: str  # sha256:…
    how: str  # built | pulled
    name: str  # the bundle's name, for people
    tag: str  # the tag it was made under
    at: float  # when (epoch seconds)


def ledger_dir() -> Path:
    """The Jupyter data dir's `kbundle/images` (JUPYTER_DATA_DIR moves it, with the kernelspecs)."""
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "kbundle" / "images"


def _file(image_id: str) -> Path:
    digest = image_id.split(":", 1)[-1]
    if not digest or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"not an image id: {image_id!r}")
    return ledger_dir() / f"{digest}.json"


def record(image_id: str, how: str, name: str = "", tag: str = "") -> None:
    """Note that kbundle made `image_id` for this user (written atomically; a rewrite is harmless)."""
    from kbundle.atomic import write_atomic

    path = _file(image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(asdict(Entry(image_id, how, name, tag, time.time()))))


def record_quietly(image_id: str, how: str, name: str = "", tag: str = "") -> None:
    """`record`, but a full or read-only data dir only costs gc its knowledge of this image."""
    try:
        record(image_id, how, name, tag)
    except (OSError, ValueError):
        pass


def entries() -> dict[str, Entry]:
    """Every recorded image, by id; unreadable records are skipped."""
    folder = ledger_dir()
    found: dict[str, Entry] = {}
    if not folder.is_dir():
        return found
    for path in folder.glob("*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entry = Entry(**{k: data[k] for k in Entry.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found[entry.image_id] = entry
    return found


def forget(image_id: str) -> None:
    try:
        _file(image_id).unlink(missing_ok=True)
    except (OSError, ValueError):
        pass
