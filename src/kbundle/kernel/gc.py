"""`kbundle gc`: find what dead kernels and unused bundles left behind, then remove it.

- `plan_gc(client, ...) -> GcPlan` lists, removing nothing:
  - kernel containers (kernel/labels.py) started on this host whose launcher is gone: its
    pid is dead, or now belongs to a process that started at another time; or whose
    launcher lives on orphaned (its parent died, so no Jupyter can reach the kernel);
  - kbundle images (the contract's content-hash label, or kbundle 0.1's) that kbundle built or
    pulled for this user (image/ledger.py), that no registered kbundle kernel names and no
    container uses, whoever started it. On a shared engine the others' images are never
    candidates, and an image with a registry tag is kept unless `pushed` (`gc --pushed`);
  - chain step images (image/chain.py, `kbundle-steps/<group>:<hash>`) this user's runs built that
    no kbundle image left on the engine is built on (a final image names its chain in a label;
    those this plan removes do not count) and no container uses: after the images, top step first.
    A chain being built has no final image yet, so its steps wait until no kbundle process of this
    user runs, or STALE_AFTER_S;
  - step images a killed build left (untagged, no child, built on kbundle's own steps) that no
    container uses: a running build's step container holds the newest one;
  - kbundle's temporary folders (resolve, lock, signature, staging) in the temp dir and in
    its cache, once no kbundle process of this user runs (activity.py), or when stale;
  - extracted bundles nobody uses: build contexts left in kbundle's cache by a build that
    was killed, and extraction scratch dirs (`.kbundle/extract-*`) in kernels' workdirs,
    both only when older than `STALE_AFTER_S` (a build may be running right now);
  - native environments (`run --native`, image/native.py) in kbundle's cache that no
    registered kernel uses, and unfinished ones no run is installing now. Without an engine
    (`client` None) only these and the folders are planned.
  A user's working directory is never a candidate: it holds their notebook and edits.
  With `caches=True` (`kbundle gc --cache`), kbundle's download caches too (cache.py's
  DOWNLOAD_CACHES: conda packages, wheels, byte-compiled environments).
- Engines: the current one (DOCKER_HOST's) and each one a kernel was registered against
  (`recorded_engines`: its kernelspec's `--docker-host`, kernel/spec.py), such as Podman's socket,
  a user's rootless one or a GPU box; their containers and images are planned the same way, each
  item naming its engine. On another engine, the images kept are those of the kernels registered
  there and of kernels that recorded no engine (they may run anywhere).
- `apply_gc(plan, client, others) -> GcResult` removes the listed items, each on its engine, and
  says what failed.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from kbundle import cache, contract
from kbundle.kernel import labels as kernel_labels
from kbundle.kernel.launcher import PYCACHE_IMAGE_FILE

IMAGE_LABELS = (contract.LABEL_CONTENT_HASH, contract.LEGACY_LABEL_CONTENT_HASH)
STALE_AFTER_S = 6 * 3600
STEP_GRACE_S = 30  # a step image younger than this may be one a running build just committed
# Temporary folders kbundle makes with tempfile (in the temp dir, or beside an env in the cache).
TEMP_PATTERNS = ("kbundle-*",)
CACHE_TEMP_PATTERNS = ("built/build-*", "native/.kbundle-*", "push/push-*", "wheels/*/.download-*")
CONTAINER, IMAGE, DIRECTORY = "container", "image", "directory"


@dataclass(frozen=True)
class GcItem:
    kind: str  # container | image | directory
    ref: str  # container id, image tag or id, absolute path
    name: str  # what a person recognises
    reason: str
    size: Optional[int] = None  # bytes, where known
    engine: str = ""  # the engine it is on: "" for the current one, else a kernel's recorded DOCKER_HOST

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GcPlan:
    items: list[GcItem] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # what gc leaves alone on purpose, in words

    def of(self, kind: str) -> list[GcItem]:
        return [i for i in self.items if i.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {"items": [i.to_dict() for i in self.items], "kept": list(self.kept)}


@dataclass
class GcResult:
    removed: list[GcItem] = field(default_factory=list)
    failed: list[tuple[GcItem, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": [i.to_dict() for i in self.removed],
            "failed": [dict(i.to_dict(), error=e) for i, e in self.failed],
        }


def connect(host: str = ""):
    """The engine (DOCKER_HOST's, or `host`), as run and doctor reach it: a hung engine times out,
    an absent one is exit 4."""
    from kbundle.image.engine import connect as engine

    return engine(host=host)


def recorded_engines(kernels: list, current: str) -> list[str]:
    """The engines kernels were registered against, other than `current` (DOCKER_HOST's, "" for the default)."""
    found = {getattr(k, "docker_host", "") for k in kernels if not getattr(k, "native", "")}
    return sorted(h for h in found if h and h != current)


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
    pushed: bool = False,
    temp_dir: Optional[Path] = None,
    others: Optional[dict[str, Any]] = None,
) -> GcPlan:
    """What `kbundle gc` would remove (nothing is removed here); `caches`: kbundle's download caches too.
    `client` None: no engine answers, so kernel containers and images are left out. `others`: the
    kernels' other engines (`recorded_engines`), host -> client, None where it does not answer."""
    from kbundle.image import native
    from kbundle.kernel.spec import list_kernelspecs

    kernels = list_kernelspecs() if kernels is None else kernels
    host = host or socket.gethostname()
    now = time.time() if now is None else now
    plan = GcPlan()
    present: set[str] = set()  # the image ids on the engines looked at
    from kbundle import activity

    idle = activity.nobody_working()  # no kbundle process of this user runs: what runs left is orphaned
    if client is not None:
        present |= _plan_engine(plan, client, kernels, host, now, pushed, idle=idle)
    for engine, other in (others or {}).items():
        if other is None:
            plan.kept.append(f"the engine {engine} (a kernel's recorded one) does not answer: not checked")
            continue
        theirs = [k for k in kernels if getattr(k, "docker_host", "") in ("", engine)]
        present |= _plan_engine(plan, other, theirs, host, now, pushed, engine, idle)
    if client is not None and None not in (others or {}).values():
        from kbundle.image import ledger

        for image_id in set(ledger.entries()) - present:
            ledger.forget(image_id)  # on no engine: removed by other means, the record goes too
    plan.items += _unused_native(kernels, native_dir if native_dir is not None else native.native_root())
    contexts = contexts_dir if contexts_dir is not None else cache.contexts_dir()
    plan.items += _stale_directories(kernels, contexts, now, idle)
    plan.items += _unused_pycaches(kernels, pycache_dir if pycache_dir is not None else cache.pycache_root())
    plan.items += _temporary_folders(Path(temp_dir or tempfile.gettempdir()), cache.cache_root(), now, idle)
    if caches:
        plan.items += _download_caches()
    return plan


def _plan_engine(
    plan: GcPlan,
    client,
    kernels: list,
    host: str,
    now: float,
    pushed: bool,
    engine: str = "",
    idle: bool = False,
) -> set[str]:
    """One engine's leftover kernel containers, unused images and step images, named by `engine`;
    the ids of kbundle's images found there."""
    from dataclasses import replace

    items = _dead_kernel_containers(client, host)
    leaving = {i.ref for i in items}
    images, kept, present = _unused_images(client, kernels, leaving, pushed)
    steps, present_steps = _unused_chain_steps(client, {i.ref for i in images}, leaving, now, idle)
    present |= present_steps
    items += images + steps
    items += _orphaned_step_images(client, leaving, now) + _leftover_throwaways(client, leaving, now)
    plan.items += [replace(i, engine=engine) for i in items]
    plan.kept += [f"{line} ({engine})" if engine else line for line in kept]
    return present


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


def _unused_images(client, kernels: list, leaving: set[str], pushed: bool) -> tuple[list[GcItem], list[str], set[str]]:
    """This user's unused kbundle images, a line for each kind of image left alone, and the ids of
    every kbundle image on the engine (the ledger forgets those on no engine: `plan_gc`)."""
    from kbundle.image import ledger

    mine = ledger.entries()
    wanted_ids = _image_ids(client, {k.image for k in kernels if k.image})
    # Containers the plan removes no longer hold their image; any other container does, anyone's.
    used_ids = {c.get("ImageID") for c in client.api.containers(all=True) if c["Id"] not in leaving}
    items, foreign, published = [], 0, 0
    present = set()
    for image in _kbundle_images(client):
        present.add(image["Id"])
        if image["Id"] not in mine:
            foreign += 1
            continue
        if image["Id"] in wanted_ids or image["Id"] in used_ids:
            continue
        tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
        if not pushed and any(_registry_tag(t) for t in tags):
            published += 1
            continue
        digest = contract.image_content_hash(image.get("Labels")) or "?"
        for ref in tags or [image["Id"]]:
            items.append(
                GcItem(IMAGE, ref, ref, f"bundle {digest[:19]}: no registered kernel uses it", image.get("Size"))
            )
    kept = []
    if foreign:
        kept.append(f"{foreign} kbundle image(s) on this engine that kbundle did not make for this user")
    if published:
        kept.append(f"{published} unused image(s) with a registry tag (--pushed removes them too)")
    return items, kept, present


def _unused_chain_steps(
    client, removing: set[str], leaving: set[str], now: float, idle: bool
) -> tuple[list[GcItem], set[str]]:
    """This user's chain step images (image/chain.py) that no kbundle image left on the engine is
    built on, and no container uses; the ids of every step image of this user's found there.

    A final image names its chain in a label; the ones this plan removes (`removing`, by tag or id)
    no longer count. A run building a chain now has no final image yet: its steps are left alone
    while any kbundle process of this user runs, unless they are older than STALE_AFTER_S. Top steps
    come first, so each is removed before the step it is built on."""
    from kbundle.image import chain, ledger

    mine = ledger.entries()
    used: set[str] = set()
    steps = []
    for image in client.api.images():  # every image: anyone's may be built on a step
        labels = image.get("Labels") or {}
        tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
        if labels.get(chain.LABEL_STEP) and not contract.image_content_hash(labels):
            steps.append(image)
        elif not (set(tags) | {image["Id"]}) & removing:
            used.update(chain.tags_of(labels.get(chain.LABEL_STEPS, "")))
    used_ids = {c.get("ImageID") for c in client.api.containers(all=True) if c["Id"] not in leaving}
    items, present = [], set()
    for image in sorted(steps, key=lambda i: -_depth(client, i["Id"])):
        if image["Id"] not in mine:
            continue
        present.add(image["Id"])
        tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
        young = now - float(image.get("Created") or now) < STALE_AFTER_S
        if set(tags) & used or image["Id"] in used_ids or (young and not idle) or not tags:
            continue
        group = (image.get("Labels") or {}).get(chain.LABEL_STEP)
        items += [
            GcItem(IMAGE, t, t, f"step image ({group}) that no remaining kbundle image is built on", image.get("Size"))
            for t in tags
        ]
    return items, present


def _depth(client, image_id: str) -> int:
    """How many build steps lie under an image (its history): a step is deeper than the one it is built on."""
    try:
        return len(client.api.history(image_id))
    except Exception:  # gone meanwhile: its place in the order no longer matters
        return 0


def _image_ids(client, refs: set[str]) -> set[str]:
    import docker

    ids = set()
    for ref in refs:
        try:
            ids.add(client.api.inspect_image(ref)["Id"])
        except docker.errors.NotFound:
            pass
    return ids


def _registry_tag(tag: str) -> bool:
    """`127.0.0.1:5000/lab/x:1` or `ghcr.io/lab/x:1`: the image was pushed or pulled under it."""
    first, _, rest = tag.partition("/")
    return bool(rest) and ("." in first or ":" in first or first == "localhost")


def _orphaned_step_images(client, leaving: set[str], now: float) -> list[GcItem]:
    """Untagged, childless images whose history holds a kbundle build step, and the stopped step
    containers on them: what a killed build leaves.

    The legacy builder commits each step as an image and runs the next step in a container of
    it; a killed build leaves the last image with no tag and no label, often with that step's
    container `Created` or `Exited`. A build still running holds its newest step image in a
    running container; STEP_GRACE_S covers the instant between a commit and that container."""
    containers = [c for c in client.api.containers(all=True) if c["Id"] not in leaving]
    items = []
    for image in client.api.images(filters={"dangling": True}):
        if now - float(image.get("Created") or now) < STEP_GRACE_S:
            continue
        if (image.get("Labels") or {}).get(contract.LABEL_CONTENT_HASH) or not _kbundle_steps(client, image["Id"]):
            continue
        on_it = [c for c in containers if c.get("ImageID") == image["Id"]]
        if any(c.get("State") in ("running", "restarting", "paused") or c.get("Labels") for c in on_it):
            continue  # a build at work, or someone's own container of it
        for c in on_it:
            name = (c.get("Names") or ["?"])[0].lstrip("/")
            items.append(
                GcItem(CONTAINER, c["Id"], name, f"step container of an interrupted kbundle build; {c.get('State')}")
            )
        items.append(
            GcItem(
                IMAGE, image["Id"], image["Id"][:19], "step image of an interrupted kbundle build", image.get("Size")
            )
        )
    return items


def _leftover_throwaways(client, leaving: set[str], now: float) -> list[GcItem]:
    """Throwaway containers (byte-compile, pip install, wheel build, GPU probe) a killed run left:
    stopped ones, and running ones older than STALE_AFTER_S (each is given minutes at most)."""
    found: dict[str, dict] = {}
    for label in contract.THROWAWAY_LABELS:
        for c in client.api.containers(all=True, filters={"label": label}):
            if c["Id"] not in leaving:
                found.setdefault(c["Id"], c)
    items = []
    for c in found.values():
        running = c.get("State") in ("running", "restarting", "paused")
        if running and now - float(c.get("Created") or now) < STALE_AFTER_S:
            continue
        role = next(
            (
                label.removeprefix(contract.LABEL_NS)
                for label in contract.THROWAWAY_LABELS
                if label in (c.get("Labels") or {})
            ),
            "?",
        )
        name = (c.get("Names") or ["?"])[0].lstrip("/")
        items.append(GcItem(CONTAINER, c["Id"], name, f"kbundle {role} container a killed run left; {c.get('State')}"))
    return items


def _kbundle_steps(client, image_id: str) -> bool:
    try:
        history = client.api.history(image_id)
    except Exception:  # gone meanwhile, or unreadable: not ours to judge
        return False
    return any(f" {contract.ROOT}/" in (h.get("CreatedBy") or "") for h in history)


def _temporary_folders(temp_dir: Path, cache_dir: Path, now: float, idle: bool) -> list[GcItem]:
    """kbundle's own temporary folders that a killed run left: all of them when no kbundle process
    of this user runs now, else those untouched for STALE_AFTER_S. Only folders this user owns."""
    found = [p for pattern in TEMP_PATTERNS for p in temp_dir.glob(pattern)]
    found += [p for pattern in CACHE_TEMP_PATTERNS for p in cache_dir.glob(pattern)]
    items = []
    for path in sorted(set(found)):
        try:
            info = path.lstat()
        except OSError:
            continue
        if not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid():
            continue
        age = now - _newest_mtime(path)
        if not idle and age < STALE_AFTER_S:
            continue
        reason = (
            "temporary folder of a kbundle run that ended"
            if idle
            else f"temporary folder, untouched for {age / 3600:.0f} h"
        )
        items.append(GcItem(DIRECTORY, str(path.absolute()), path.name, reason, _du(path)))
    return items


def running_on(client, image: str) -> list[str]:
    """Names of the running containers that use `image` (a tag or an id)."""
    ids = _image_ids(client, {image})
    return [
        (c.get("Names") or [c["Id"][:12]])[0].lstrip("/")
        for c in client.api.containers(filters={"status": "running"})
        if c.get("ImageID") in ids
    ]


def _kbundle_images(client) -> list[dict]:
    found: dict[str, dict] = {}
    for label in IMAGE_LABELS:
        for image in client.api.images(filters={"label": label}):
            found.setdefault(image["Id"], image)
    return list(found.values())


def _stale_directories(kernels: list, contexts_dir: Path, now: float, idle: bool = False) -> list[GcItem]:
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
        if idle or age >= STALE_AFTER_S:
            why = f"{reason}; no kbundle run is active" if idle else f"{reason}, untouched for {age / 3600:.0f} h"
            items.append(GcItem(DIRECTORY, str(path.resolve()), path.name, why, _du(path)))
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


def apply_gc(plan: GcPlan, client, others: Optional[dict[str, Any]] = None) -> GcResult:
    """Remove the plan's items: containers first (they hold images), then images, then directories;
    each container and image on its engine (`client`, or `others[item.engine]`)."""
    import docker

    result = GcResult()
    for item in plan.of(CONTAINER) + plan.of(IMAGE) + plan.of(DIRECTORY):
        client_of = (others or {}).get(item.engine) if item.engine else client
        try:
            if item.kind == CONTAINER:
                client_of.api.remove_container(item.ref, force=True)
            elif item.kind == IMAGE:
                _remove_image(client_of, item.ref)
            else:
                Path(item.ref, native_stamp()).unlink(missing_ok=True)  # a half-removed prefix is never complete
                shutil.rmtree(item.ref)
            result.removed.append(item)
        except docker.errors.NotFound:
            result.removed.append(item)  # gone already (an auto-removed container): what we wanted
        except (docker.errors.APIError, OSError) as exc:
            result.failed.append((item, str(getattr(exc, "explanation", None) or exc)))
    return result


def _remove_image(client, ref: str) -> None:
    from kbundle.image import ledger

    image_id = client.api.inspect_image(ref)["Id"]
    client.api.remove_image(ref, noprune=False)
    if not _image_ids(client, {image_id}):
        ledger.forget(image_id)


def native_stamp() -> str:
    from kbundle.image.native import STAMP

    return STAMP


def human_size(size: Optional[int]) -> str:
    """Binary units, named as such (KiB, MiB, GiB), like every size kbundle prints; "" when unknown."""
    from kbundle.display import size as shown

    return "" if size is None else shown(size)
