"""Whether an image still holds the environment kbundle built into it.

At build time the environment's file list (each regular file's and link's path and size) is
digested into the image's `org.kbundle.env-files` label. A check lists the same thing inside
the image, in a locked-down throwaway container (image/sandbox.py), and compares. Sizes
catch what damaged caches did to images before kbundle verified its caches (a truncated
module, a .pyc cut short); an image is immutable, so one verdict per image id is kept in
kbundle's cache and the check runs once per image.

`kbundle doctor BUNDLE` and `kbundle kernels list` report a mismatch; `run --rebuild` builds
the image again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle import contract

OK, DAMAGED, UNRECORDED, UNKNOWN = "ok", "damaged", "unrecorded", "unknown"
# One line per file or link: type (f or l), size in bytes, path under the prefix.
LISTING = [
    "find",
    contract.PREFIX,
    "-mindepth",
    "1",
    "(",
    "-type",
    "f",
    "-o",
    "-type",
    "l",
    ")",
    "-printf",
    "%y %s %P\\n",
]


@dataclass(frozen=True)
class Verdict:
    state: str  # ok | damaged | unrecorded (built before the label) | unknown (could not list)
    detail: str = ""


def digest(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(lines)).encode("utf-8", "surrogateescape")).hexdigest()


def of_layers(layers_root: Path) -> str:
    """The digest of the environment as the build context's layer folders hold it (their union is
    the prefix in the image)."""
    return digest(layer_lines(layers_root))


def layer_lines(layers_root: Path, only: Optional[Iterable[str]] = None) -> list[str]:
    """The file list of the layer folders (those named in `only`, when given), one line a file."""
    lines = []
    wanted = None if only is None else set(only)
    for group in sorted(p for p in layers_root.iterdir() if p.is_dir()):
        if wanted is not None and group.name not in wanted:
            continue
        for top, _dirs, files in os.walk(group):
            for name in files + [d for d in _dirs if os.path.islink(os.path.join(top, d))]:
                path = os.path.join(top, name)
                info = os.lstat(path)
                kind = "l" if os.path.islink(path) else "f"
                lines.append(f"{kind} {info.st_size} {os.path.relpath(path, group)}")
    return lines


def in_image(client, image: str) -> Optional[str]:
    """The digest of the prefix as the image holds it, or None when it cannot be listed."""
    lines = listing(client, image)
    return None if lines is None else digest(lines)


def listing(client, image: str) -> Optional[list[str]]:
    """The prefix's file list as the image holds it, or None when it cannot be listed."""
    import docker

    from kbundle.image import sandbox

    try:
        outcome = sandbox.run(
            client, image, LISTING[1:], entrypoint=LISTING[:1], mounts={}, environment={}, label=contract.LABEL_PROBE
        )
    except docker.errors.DockerException:
        return None
    if outcome.status != 0:
        return None
    return [line for line in outcome.stdout.splitlines() if line.strip()]


def check(client, image: str) -> Verdict:
    """The image's verdict, from kbundle's record of this image id when there is one."""
    try:
        attrs = client.api.inspect_image(image)
    except Exception:
        return Verdict(UNKNOWN, "the image cannot be inspected")
    recorded = (attrs.get("Config") or {}).get("Labels", {}) or {}
    expected = recorded.get(contract.LABEL_ENV_FILES)
    if not expected:
        return Verdict(UNRECORDED, "built before kbundle recorded its file list")
    known = _remembered(attrs["Id"])
    if known is not None:
        return known
    found = in_image(client, attrs["Id"])
    if found is None:
        return Verdict(UNKNOWN, "its files could not be listed")
    verdict = Verdict(OK) if found == expected else Verdict(DAMAGED, "its environment's files differ from the build's")
    _remember(attrs["Id"], verdict)
    return verdict


def _record(image_id: str) -> Path:
    from kbundle.cache import cache_root

    return cache_root() / "verified" / f"{image_id.split(':')[-1]}.json"


def _remembered(image_id: str) -> Optional[Verdict]:
    try:
        data = json.loads(_record(image_id).read_text(encoding="utf-8"))
        return Verdict(str(data["state"]), str(data.get("detail", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember(image_id: str, verdict: Verdict) -> None:
    from kbundle.atomic import write_atomic

    try:
        path = _record(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"state": verdict.state, "detail": verdict.detail}))
    except OSError:
        pass  # only costs a second listing next time
