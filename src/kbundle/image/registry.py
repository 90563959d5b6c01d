"""A bundle's image in a container registry: `kbundle push` sends it, `kbundle run --image` fetches it.

Pure parts: the `--to REGISTRY/NAMESPACE` and `--image NAME@sha256:<hex>` grammars, where a
pushed image goes (`REGISTRY/NAMESPACE/<bundle image name>:<content tag>`), following a push
or pull through the engine's JSON events, the one-line errors, and the label check.
Engine steps: tag + push, pull by digest, each with progress (kbundle/progress.py).

A reference to fetch must name a digest: a tag can be moved to another image after the
fact, a digest cannot, and the labels checked after the pull are those of that digest.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Optional

from kbundle import contract
from kbundle.display import safe, size
from kbundle.errors import KbundleError, UsageError
from kbundle.progress import Meter, finish

# Docker's reference grammar (distribution/reference), the parts kbundle accepts.
_HOST_RE = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?"
_PATH_RE = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_HOST = re.compile(_HOST_RE)
_PATH = re.compile(_PATH_RE)
_DESTINATION = re.compile(rf"(?P<registry>{_HOST_RE})/(?P<namespace>{_PATH_RE})")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_REPOSITORY = 255  # the registry API's limit on a repository name
DOCKER_HUB = "registry-1.docker.io"


def is_registry(host: str) -> bool:
    """Whether the first part of a name is a registry (Docker reads `alice/x` as Docker Hub's alice)."""
    return "." in host or ":" in host or host == "localhost"


# ----------------------------------------------------------------- references (pure)


@dataclass(frozen=True)
class Destination:
    """`--to REGISTRY/NAMESPACE`: where `kbundle push` puts a bundle's image."""

    registry: str
    namespace: str

    def repository(self, name: str) -> str:
        return f"{self.registry}/{self.namespace}/{name}"


def parse_destination(text: str) -> Destination:
    """`127.0.0.1:5000/lab`, `ghcr.io/alice/models`; a tag, a digest or no registry is refused."""
    found = _DESTINATION.fullmatch(text.strip().rstrip("/"))
    if not found or not is_registry(found["registry"]):
        raise UsageError(
            f"--to {safe(text)!r}: give REGISTRY/NAMESPACE, e.g. 127.0.0.1:5000/lab or ghcr.io/alice "
            "(a registry host with a dot or a port, then lower-case path parts; no tag)"
        )
    return Destination(found["registry"], found["namespace"])


@dataclass(frozen=True)
class PinnedRef:
    """`NAME@sha256:<64 hex>`: one image, whatever tags say later."""

    repository: str  # [registry/]path, without a tag
    digest: str  # sha256:<64 hex>

    @property
    def registry(self) -> str:
        host = self.repository.split("/")[0]
        return host if "/" in self.repository and is_registry(host) else DOCKER_HUB

    def __str__(self) -> str:
        return f"{self.repository}@{self.digest}"


def parse_pinned(text: str) -> PinnedRef:
    """`--image NAME[:TAG]@sha256:<hex>`; the tag, if any, is dropped (the digest decides, as in Docker)."""
    name, at, digest = text.strip().rpartition("@")
    if not at or not _DIGEST.fullmatch(digest):
        raise UsageError(
            f"--image {safe(text)!r}: give a digest reference NAME@sha256:<64 hex>, as `kbundle push` "
            "prints it (tags move; a digest does not)"
        )
    if ":" in name.rsplit("/", 1)[-1]:
        name, _, tag = name.rpartition(":")
        name = name if _TAG.fullmatch(tag) else ""  # refused below
    if not _is_name(name):
        raise UsageError(f"--image {safe(text)!r}: {safe(name) or 'the name'} is not an image name")
    return PinnedRef(name, digest)


def _is_name(name: str) -> bool:
    """`[registry/]path` as Docker reads it: a first part with a dot or a port is a registry."""
    first, slash, rest = name.partition("/")
    if slash and is_registry(first):
        return bool(_HOST.fullmatch(first) and _PATH.fullmatch(rest)) and len(name) <= MAX_REPOSITORY
    return bool(_PATH.fullmatch(name)) and len(name) <= MAX_REPOSITORY


def push_target(local_tag: str, destination: Destination) -> tuple[str, str]:
    """(repository, tag) a local `kbundle/<name>:<content tag>` is pushed as."""
    repo, _, tag = local_tag.rpartition(":")
    repository = destination.repository(repo.rpartition("/")[2])
    if len(repository) > MAX_REPOSITORY:
        raise UsageError(f"--to {destination.registry}/{destination.namespace}: {repository} is too long a name")
    return repository, tag


def pulled_tag(name: str, digest: str) -> str:
    """The local tag of an image pulled by digest: `kbundle/<name>:<the digest's first 16 hex>`.

    The build's content tag hashes the base image's id, which a pulled image does not carry;
    the manifest digest is the pulled image's own content hash."""
    from kbundle.names import slug

    return f"kbundle/{slug(name)}:{digest.removeprefix('sha256:')[:16]}"


def digest_in(repo_digests: list[str], repository: str) -> Optional[str]:
    """The digest `RepoDigests` records for `repository` (an image may be in several)."""
    for entry in repo_digests or []:
        name, _, digest = entry.partition("@")
        if name == repository and _DIGEST.fullmatch(digest):
            return digest
    return None


def check_labels(labels: Optional[dict[str, str]], bundle_hash: str, ref: str) -> None:
    """The image must say it was built from this bundle: its `org.kbundle.content-hash` label must be
    this bundle's identity (`bundle_hash`: members and environment-defining manifest fields), so an
    image built from a copy with the same members but another manifest is refused too."""
    found = contract.image_content_hash(labels)
    if not found:
        raise KbundleError(
            f"the image {safe(ref)} is not a kbundle image (it has no {contract.LABEL_CONTENT_HASH} label); "
            "run the bundle without --image to build it"
        )
    if found != bundle_hash:
        raise KbundleError(
            f"the image {safe(ref)} was built from another bundle "
            f"(content hash {safe(found[:12])}…, this bundle's is {bundle_hash[:12]}…)"
        )


# ----------------------------------------------------------------- the engine's events (pure)

_AUTH = ("unauthorized", "authentication required", "denied", "no basic auth credentials", "insufficient_scope")
_UNREACHABLE = ("connection refused", "no such host", "dial tcp", "i/o timeout", "network is unreachable", "timeout")
_MISSING = ("manifest unknown", "not found", "name unknown")


def describe_error(action: str, registry: str, message: str) -> str:
    """One line for a push or pull the registry (or the way to it) refused."""
    text = safe(message.strip().splitlines()[-1] if message.strip() else "no reason given", 300)
    lower = text.lower()
    if "http response to https client" in lower:
        return (
            f"cannot {action} {registry}: it speaks plain HTTP and the engine wants HTTPS "
            f'(list it under "insecure-registries" in /etc/docker/daemon.json): {text}'
        )
    if any(word in lower for word in _AUTH):
        return f"the registry {registry} refused the {action}: {text}; log in with `docker login {registry}`"
    if any(word in lower for word in _UNREACHABLE):
        return f"cannot reach the registry {registry}: {text}"
    if action == "pull" and any(word in lower for word in _MISSING):
        return f"the registry {registry} has no such image: {text}"
    return f"the {action} {'to' if action == 'push' else 'from'} {registry} failed: {text}"


@dataclass
class Transfer:
    """A push or pull followed through the engine's JSON events: bytes per layer, layers done,
    the digest, the first error (pure; the engine reports `current` beyond `total` at times)."""

    moving: str  # the status of a layer in transit: Pushing | Downloading
    finished: tuple[str, ...]  # statuses that end a layer
    sent: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    layers: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    digest: Optional[str] = None
    error: Optional[str] = None

    @classmethod
    def push(cls) -> Transfer:
        return cls("Pushing", ("Pushed", "Layer already exists", "Mounted from"))

    @classmethod
    def pull(cls) -> Transfer:
        return cls("Downloading", ("Pull complete", "Already exists"))

    @property
    def bytes(self) -> int:
        return sum(self.sent.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.totals.values())

    def feed(self, event: dict) -> None:
        if "error" in event:
            self.error = self.error or str((event.get("errorDetail") or {}).get("message") or event["error"])
            return
        aux = event.get("aux")
        if isinstance(aux, dict) and _DIGEST.fullmatch(str(aux.get("Digest", ""))):
            self.digest = aux["Digest"]
        status, layer = str(event.get("status") or ""), event.get("id")
        found = re.search(r"(?:^|\s)digest: (sha256:[0-9a-f]{64})", status, re.IGNORECASE)
        if found:
            self.digest = self.digest or found.group(1)
        if not layer or not re.fullmatch(r"[0-9a-f]{12,64}", str(layer)):
            return  # a line about the whole image, not a layer
        self.layers.add(layer)
        detail = event.get("progressDetail") or {}
        if status == self.moving and isinstance(detail.get("current"), int):
            self.sent[layer] = detail["current"]
            if isinstance(detail.get("total"), int) and detail["total"] > 0:
                self.totals[layer] = detail["total"]
        elif status.startswith(self.finished):
            self.done.add(layer)
        if status in ("Download complete", "Pushed") and layer in self.totals:  # its last chunk goes unreported
            self.sent[layer] = max(self.sent.get(layer, 0), self.totals[layer])


# ----------------------------------------------------------------- engine steps


@dataclass(frozen=True)
class Pushed:
    repository: str
    tag: str
    digest: str
    pushed_bytes: int  # what went over the wire: 0 when the registry had every layer

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"


def push(client, local_tag: str, destination: Destination, console) -> Pushed:
    """Tag `local_tag` in the destination and push it with progress; the local tag in the
    registry's name stays, so the image is known here by its pushed digest too."""
    repository, tag = push_target(local_tag, destination)
    tagged_here = not _exists(client, f"{repository}:{tag}")
    client.api.tag(local_tag, repository, tag)
    try:
        transfer = _follow(
            lambda: client.api.push(repository, tag=tag, stream=True, decode=True),
            Transfer.push(),
            f"pushing {repository}:{tag}",
            "push",
            destination.registry,
            console,
        )
    except BaseException:  # Ctrl-C too: a push that failed leaves no name of that registry behind
        if tagged_here:
            _untag(client, f"{repository}:{tag}")
        raise
    digest = transfer.digest or digest_in(client.images.get(local_tag).attrs.get("RepoDigests"), repository)
    if not digest:
        raise KbundleError(
            f"the registry {destination.registry} took the push of {repository}:{tag} but named no digest"
        )
    return Pushed(repository, tag, digest, transfer.bytes)


@dataclass(frozen=True)
class Pulled:
    image_id: str
    pulled: bool  # False: the engine had that digest already


def local_by_digest(client, ref: PinnedRef) -> Optional[str]:
    """The id of the image this engine knows by `ref`'s digest, or None."""
    return _exists(client, str(ref))


def _untag(client, reference: str) -> None:
    import docker

    try:
        client.api.remove_image(reference, noprune=True)
    except docker.errors.DockerException:
        pass  # gone already; the push's own error is the one to show


def _exists(client, reference: str) -> Optional[str]:
    import docker

    try:
        return client.images.get(reference).id
    except docker.errors.ImageNotFound:
        return None


def pull(client, ref: PinnedRef, console) -> Pulled:
    """Pull `ref` by its digest with progress, unless this engine has it already."""
    found = local_by_digest(client, ref)
    if found:
        return Pulled(found, False)
    _follow(
        lambda: client.api.pull(ref.repository, tag=ref.digest, stream=True, decode=True),
        Transfer.pull(),
        f"pulling {ref}",
        "pull",
        ref.registry,
        console,
    )
    found = local_by_digest(client, ref)
    if not found:
        raise KbundleError(f"the pull of {ref} ended without that image on this engine")
    return Pulled(found, True)


def verify_and_tag(client, image_id: str, ref: PinnedRef, bundle_hash: str, local_tag: str) -> None:
    """Refuse an image another bundle built (or no kbundle), then tag it as this bundle's."""
    check_labels(client.api.inspect_image(image_id)["Config"].get("Labels"), bundle_hash, str(ref))
    repo, _, tag = local_tag.rpartition(":")
    client.api.tag(image_id, repo, tag)


def _follow(start, transfer: Transfer, what: str, action: str, registry: str, console) -> Transfer:
    """Run one push or pull stream to its end, showing layers and bytes; errors become one line."""
    import docker

    t0 = time.perf_counter()
    with console.status(what) as status:
        meter = Meter(what, on_change=status.update)
        try:
            for event in start():
                transfer.feed(event)
                if transfer.error:
                    raise KbundleError(describe_error(action, registry, transfer.error))
                meter.total_bytes, meter.total = transfer.total_bytes, len(transfer.layers)
                meter.bytes = transfer.bytes
                meter.items(len(transfer.done))
        except docker.errors.APIError as exc:
            raise KbundleError(describe_error(action, registry, str(exc.explanation or exc))) from None
        moved = "sent" if action == "push" else "downloaded"
        finish(
            status,
            f"{what}: {len(transfer.layers)} layer(s), {size(transfer.bytes)} {moved} in {time.perf_counter() - t0:.1f} s",
        )
    return transfer
