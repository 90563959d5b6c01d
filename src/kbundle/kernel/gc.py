"""`kbundle gc`: find what dead kernels and unused bundles left behind, then remove it.

- `plan_gc(client, ...) -> GcPlan` lists, removing nothing:
  - kernel containers (kernel/labels.py) started on this host whose launcher is gone: its
    pid is dead, or now belongs to a process that started at another time; or whose
    launcher lives on orphaned (its parent died, so no Jupyter can reach the kernel);
  - kbundle images (the contract's content-hash label, or kbundle 0.1's) that no registered
    kbundle kernel names and no container uses;
  - extracted bundles nobody uses: build contexts left in kbundle's cache by a build that
    was killed, and extraction scratch dirs (`.kbundle/extract-*`) in kernels' workdirs,
    both only when older than `STALE_AFTER_S` (a build may be running right now);
  - native environments (`run --native`, image/native.py) in kbundle's cache that no
    registered kernel uses, and unfinished ones no run is installing now. Without an engine
    (`client` None) only these and the folders are planned.
  A user's working directory is never a candidate: it holds their notebook and edits.
  With `caches=True` (`kbundle gc --cache`), kbundle's download caches too (cache.py's
  DOWNLOAD_CACHES: conda packages, wheels, byte-compiled environments).
- `apply_gc(plan, client) -> GcResult` removes the listed items and says what failed.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from kbundle import cache, contract
from kbundle.kernel import labels as kernel_labels
from kbundle.kernel.launcher import PYCACHE_IMAGE_FILE

IMAGE_LABELS = (contract.LABEL_CONTENT_HASH, contract.LEGACY_LABEL_CONTENT_HASH)
STALE_AFTER_S = 6 * 3600
CONTAINER, IMAGE, DIRECTORY = "container", "image", "directory"


@dataclass(frozen=True)
class GcItem:
    kind: str  # container | image | directory
    ref: str  # container id, image tag or id, absolute path
    name: str  # what a person recognises
    reason: str
    size: Optional[int] = None  # bytes, where known

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GcPlan:
    items: list[GcItem] = field(default_factory=list)

    def of(self, kind: str) -> list[GcItem]:
        return [i for i in self.items if i.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {"items": [i.to_dict() for i in self.items]}


@dataclass
class GcResult:
    removed: list[GcItem] = field(default_factory=list)
    failed: list[tuple[GcItem, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": [i.to_dict() for i in self.removed],
            "failed": [dict(i.to_dict(), error=e) for i, e in self.failed],
        }


def connect():
    """The engine, as run and doctor reach it: a hung engine times out, an absent one is exit 4."""
    from kbundle.image.engine import connect as engine

    return engine()


def plan_gc(
    client,
    *,
    kernels: Optional[list] = None,
    host: Optional[str] = None,
    contexts_dir: Optional[Path] = None,
    pycache_dir: Optional[Path] = None,
    now: Optional[float] = None,
    caches: bool = False,
    native_dir: Optional[Path] = None,
) -> GcPlan:
    """What `kbundle gc` would remove (nothing is removed here); `caches`: kbundle's download caches too.
    `client` None: no engine answers, so kernel containers and images are left out."""
    from kbundle.image import native
    from kbundle.kernel.spec import list_kernelspecs

    kernels = list_kernelspecs() if kernels is None else kernels
    host = host or socket.gethostname()
    now = time.time() if now is None else now
    plan = GcPlan()
    if client is not None:
        plan.items += _dead_kernel_containers(client, host)
        plan.items += _unused_images(client, kernels, {i.ref for i in plan.of(CONTAINER)})
    plan.items += _unused_native(kernels, native_dir if native_dir is not None else native.native_root())
    plan.items += _stale_directories(kernels, contexts_dir if contexts_dir is not None else cache.contexts_dir(), now)
    plan.items += _unused_pycaches(kernels, pycache_dir if pycache_dir is not None else cache.pycache_root())
    if caches:
        plan.items += _download_caches()
    return plan


def _download_caches() -> list[GcItem]:
    return [
        GcItem(DIRECTORY, str(path.resolve()), f"cache/{path.name}", f"{what}, fetched again when needed", _du(path))
        for path, what in cache.download_caches()
    ]


def _unused_native(kernels: list, root: Path) -> list[GcItem]:
    """Native prefixes under `root` that no registered kernel names, left alone while a run holds their lock."""
    from kbundle.image import native

    if not root.is_dir():
        return []
    used = {os.path.abspath(k.native) for k in kernels if getattr(k, "native", "")}
    items = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        if str(path.absolute()) in used or not native.is_ours(path) or native.busy(path):
            continue
        stamp = native.stamp_of(path)
        if stamp is not None:
            what = f"native environment of {stamp.get('name') or 'a bundle'} ({str(stamp.get('bundle_hash', ''))[:12]})"
            reason = f"{what}, which no registered kernel uses"
        else:
            reason = "unfinished native environment: no run is installing it"
        items.append(GcItem(DIRECTORY, str(path.absolute()), f"native/{path.name}", reason, native.size_of(path)))
    return items


def _unused_pycaches(kernels: list, root: Path) -> list[GcItem]:
    if not root.is_dir():
        return []
    wanted = {k.image for k in kernels}
    items = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            image = (path / PYCACHE_IMAGE_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            image = ""
        if image not in wanted:
            items.append(
                GcItem(
                    DIRECTORY,
                    str(path.resolve()),
                    path.name,
                    f"bytecode cache of {image or 'an unknown image'}, which no registered kernel uses",
                    _du(path),
                )
            )
    return items


def _kernel_containers(client) -> list[dict]:
    """Kernel containers under today's label or kbundle 0.1's (docker ANDs label filters: ask twice)."""
    found: dict[str, dict] = {}
    for label in kernel_labels.KERNEL_FILTERS:
        for c in client.api.containers(all=True, filters={"label": label}):
            found.setdefault(c["Id"], c)
    return list(found.values())


def _dead_kernel_containers(client, host: str) -> list[GcItem]:
    items = []
    for c in _kernel_containers(client):
        labels = c.get("Labels") or {}
        why = _leftover_reason(labels, host)
        if not why:
            continue
        name = (c.get("Names") or ["?"])[0].lstrip("/")
        kernel = kernel_labels.read(labels, contract.LABEL_KERNEL_NAME) or "?"
        items.append(GcItem(CONTAINER, c["Id"], name, f"kernel {kernel}: {why}; {c.get('State', '?')}"))
    return items


def _leftover_reason(labels: dict, host: str) -> str:
    """Why nobody can use this kernel container any more ("" when someone may)."""
    pid = kernel_labels.read(labels, contract.LABEL_LAUNCHER_PID) or "?"
    if kernel_labels.launcher_alive(labels, host) is False:
        return f"its launcher (pid {pid}) is gone"
    # A launcher outliving its Jupyter (one from before kbundle watched its parent, or a stuck
    # one) still holds the container, GPU memory included, for a kernel nobody can reach.
    if kernel_labels.launcher_orphaned(labels, host):
        parent = labels.get(kernel_labels.LABEL_LAUNCHER_PPID, "?")
        return f"its launcher (pid {pid}) lost the process that started it (pid {parent})"
    return ""


def _unused_images(client, kernels: list, leaving: set[str]) -> list[GcItem]:
    import docker

    wanted_ids = set()
    wanted_tags = {k.image for k in kernels if k.image}
    for tag in wanted_tags:
        try:
            wanted_ids.add(client.api.inspect_image(tag)["Id"])
        except docker.errors.NotFound:
            pass
    # Containers the plan removes no longer hold their image.
    used_ids = {c.get("ImageID") for c in client.api.containers(all=True) if c["Id"] not in leaving}
    items = []
    for image in _kbundle_images(client):
        if image["Id"] in wanted_ids or image["Id"] in used_ids:
            continue
        tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
        digest = contract.image_content_hash(image.get("Labels")) or "?"
        for ref in tags or [image["Id"]]:
            items.append(
                GcItem(IMAGE, ref, ref, f"bundle {digest[:19]}: no registered kernel uses it", image.get("Size"))
            )
    return items


def _kbundle_images(client) -> list[dict]:
    found: dict[str, dict] = {}
    for label in IMAGE_LABELS:
        for image in client.api.images(filters={"label": label}):
            found.setdefault(image["Id"], image)
    return list(found.values())


def _stale_directories(kernels: list, contexts_dir: Path, now: float) -> list[GcItem]:
    candidates = []
    if contexts_dir.is_dir():
        candidates += [(p, "build context of an interrupted build") for p in contexts_dir.iterdir() if p.is_dir()]
    for kernel in kernels:
        scratch = Path(kernel.workdir) / ".kbundle" if kernel.workdir else None
        if scratch and scratch.is_dir():
            candidates += [
                (p, f"unfinished extraction for kernel {kernel.name}") for p in scratch.glob("extract-*") if p.is_dir()
            ]
    items = []
    for path, reason in candidates:
        age = now - _newest_mtime(path)
        if age >= STALE_AFTER_S:
            items.append(
                GcItem(
                    DIRECTORY, str(path.resolve()), path.name, f"{reason}, untouched for {age / 3600:.0f} h", _du(path)
                )
            )
    return items


def _newest_mtime(path: Path) -> float:
    """The latest mtime of the directory and its direct entries (a build writes there)."""
    newest = path.lstat().st_mtime
    try:
        for entry in os.scandir(path):
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    except OSError:
        pass
    return newest


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def apply_gc(plan: GcPlan, client) -> GcResult:
    """Remove the plan's items: containers first (they hold images), then images, then directories."""
    import docker

    result = GcResult()
    for item in plan.of(CONTAINER) + plan.of(IMAGE) + plan.of(DIRECTORY):
        try:
            if item.kind == CONTAINER:
                client.api.remove_container(item.ref, force=True)
            elif item.kind == IMAGE:
                client.api.remove_image(item.ref, noprune=False)
            else:
                Path(item.ref, native_stamp()).unlink(missing_ok=True)  # a half-removed prefix is never complete
                shutil.rmtree(item.ref)
            result.removed.append(item)
        except docker.errors.NotFound:
            result.removed.append(item)  # gone already (an auto-removed container): what we wanted
        except (docker.errors.APIError, OSError) as exc:
            result.failed.append((item, str(getattr(exc, "explanation", None) or exc)))
    return result


def native_stamp() -> str:
    from kbundle.image.native import STAMP

    return STAMP


def human_size(size: Optional[int]) -> str:
    """Binary units, named as such (KiB, MiB, GiB), like every size kbundle prints; "" when unknown."""
    from kbundle.display import size as shown

    return "" if size is None else shown(size)
