"""Build the bundle's image through the docker SDK's low-level API, with live progress.

The context goes to the engine as a tar stream kbundle writes (image/tarstream.py), with
bytes, rate and ETA while it is sent; then each Dockerfile step is shown as it runs.

The tag is a content hash of what goes into the image (the resolved environment, the pip
pins, the Dockerfile, the context layout version and the base image's id), so an existing
tag means "already built": no build starts. The build itself runs untagged and the tag is
applied only after it succeeded, so a failed or interrupted build leaves no tagged image.

Nor does it leave containers. The legacy builder runs each step in an intermediate container
and removes it (`forcerm`), but a build cancelled while a step's container is being created or
committed leaves it behind, `Created` or `Exited`. Those containers carry no label, so each build
marks its own: a unique `extra_hosts` name, the one build option that reaches every intermediate
container's HostConfig without touching the image, its layers or the build cache. A failed or
interrupted build removes every container that carries its mark, and no other.

`build_tagged` does the same for any tag and labels: each step image of a chain (image/chain.py,
image/make.py) is one such build, with a mark of its own, tagged only once it is complete.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle import __version__, contract
from kbundle.errors import KbundleError
from kbundle.image import engine
from kbundle.names import slug

BUILD_MARK = "kbundle-build-{}.invalid"  # this build's name in its intermediate containers' /etc/hosts
SETTLE_S = 10.0  # how long a cancelled build's containers may take to stop before they are removed


@dataclass(frozen=True)
class ImageKey:
    """Everything the image's content depends on; its hash is the tag."""

    name: str
    env_hash: str
    pip: tuple[str, ...]
    dockerfile: str
    base_image: str
    base_id: str
    # The notebook and included files the image holds (work/): their paths and sha256s. Without
    # it an image reused for an edited notebook of the same name held the first notebook.
    work: str = ""

    @property
    def digest(self) -> str:
        payload = json.dumps(
            {
                "context": contract.CONTEXT_VERSION,
                "env": self.env_hash,
                "pip": list(self.pip),
                "dockerfile": self.dockerfile,
                "base_id": self.base_id,
                "work": self.work,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def tag(self) -> str:
        return f"kbundle/{slug(self.name)}:{self.digest[:16]}"


@dataclass(frozen=True)
class BuildResult:
    tag: str
    image_id: str
    built: bool
    seconds: float
    log: Optional[Path] = None
    steps: tuple = ()  # image/chain.py StepOutcome, bottom first: a chain's steps, built or found
    installed: bool = True  # whether the environment was installed on the host for this build


def with_base_image(dockerfile: str, base_image: str) -> str:
    """The Dockerfile with its base replaced: an `ARG BASE_IMAGE=` default, else the first FROM."""
    arg = re.compile(r"^(\s*ARG\s+BASE_IMAGE\s*=\s*)(\S+)(.*)$", re.MULTILINE | re.IGNORECASE)
    if arg.search(dockerfile):
        return arg.sub(lambda m: m.group(1) + base_image + m.group(3), dockerfile, count=1)
    first_from = re.compile(r"^(\s*FROM\s+(?:--platform=\S+\s+)?)(\S+)(.*)$", re.MULTILINE | re.IGNORECASE)
    if not first_from.search(dockerfile):
        raise KbundleError("the bundle's Dockerfile has no FROM line")
    return first_from.sub(lambda m: m.group(1) + base_image + m.group(3), dockerfile, count=1)


def labels(key: ImageKey, bundle_hash: str, env_files: str = "") -> dict[str, str]:
    found = {contract.LABEL_ENV_FILES: env_files} if env_files else {}
    return found | {
        contract.LABEL_CONTENT_HASH: bundle_hash,
        contract.LABEL_VERSION: __version__,
        contract.LABEL_NAME: key.name,
        contract.LABEL_ENV_HASH: key.env_hash,
        contract.LABEL_BASE_IMAGE: key.base_image,
    }


# ----------------------------------------------------------------- engine calls


def base_image_id(client, image: str, console=None) -> str:
    """The base image's id; pulled (with progress) when it is not on this engine yet."""
    import docker

    try:
        return client.images.get(image).id
    except docker.errors.ImageNotFound:
        pass
    except docker.errors.APIError as exc:
        raise KbundleError(f"cannot inspect base image {image}: {exc.explanation or exc}") from None
    _pull(client, image, console)
    try:
        return client.images.get(image).id
    except docker.errors.DockerException as exc:
        raise KbundleError(f"base image {image} is still missing after the pull: {exc}") from None


def _pull(client, image: str, console) -> None:
    import docker

    repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
    status = console.status(f"pulling {image}") if console else _Null()
    try:
        with status:
            for event in client.api.pull(repo, tag=tag or "latest", stream=True, decode=True):
                if "error" in event:
                    raise KbundleError(f"cannot pull base image {image}: {event['error']}")
                if console and event.get("status"):
                    status.update(f"pulling {image}: {event.get('status')} {event.get('progress', '')}")
    except docker.errors.APIError as exc:
        raise KbundleError(
            f"base image {image} is not on this engine and cannot be pulled: "
            f"{exc.explanation or exc}; pull or load it, or pass --base-image"
        ) from None


def build(
    client,
    context: Path,
    key: ImageKey,
    bundle_hash: str,
    log_path: Path,
    console=None,
    undo=None,
    preamble: Sequence[str] = (),
    env_files: str = "",
    fresh: bool = False,
    extra_labels: Optional[dict[str, str]] = None,
    append: bool = False,
) -> BuildResult:
    """Build `context` untagged, stream its steps to a live progress line, then tag it `key.tag`.

    `preamble`: lines the log starts with (what was done on the host before the build: the
    exact pip resolution, the layers); `append`: add to the log rather than start it. On failure
    the error names the failing step and where the full log is; on Ctrl-C the stream is closed
    (the engine cancels the build) and nothing is tagged. Every image the build commits is told
    to `undo` (flows/undo.py), which removes the untagged ones when the run fails."""
    t0 = time.perf_counter()
    image_labels = labels(key, bundle_hash, env_files) | (extra_labels or {})
    image_id = build_tagged(
        client, context, key.tag, image_labels, log_path, console, undo, preamble, fresh=fresh, append=append
    )
    if console is not None:
        console.print(f"built {key.tag} in {time.perf_counter() - t0:.1f} s (log: {log_path})", soft_wrap=True)
    return BuildResult(key.tag, image_id, True, time.perf_counter() - t0, log_path)


def build_tagged(
    client,
    context: Path,
    tag: str,
    image_labels: dict[str, str],
    log_path: Path,
    console=None,
    undo=None,
    preamble: Sequence[str] = (),
    fresh: bool = False,
    append: bool = False,
) -> str:
    """Build `context` untagged with `image_labels`, then tag it `tag` (only a complete image is
    ever tagged); the image's id. Its intermediate containers carry this build's own mark and go
    when it fails or is interrupted."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a" if append else "w", encoding="utf-8") as start:
        start.write("".join(f"{line}\n" for line in preamble))
    image_id = _stream_build(client, context, tag, image_labels, log_path, console, undo, fresh)
    repo, _, name = tag.rpartition(":")
    client.api.tag(image_id, repo, name)
    return client.images.get(tag).id


def _stream_build(client, context: Path, tag: str, image_labels, log_path: Path, console, undo, fresh: bool) -> str:
    tail: deque[str] = deque(maxlen=15)
    image_id: Optional[str] = None
    step = ""
    mark = None if engine.is_podman(client) else BUILD_MARK.format(uuid.uuid4().hex)  # Podman refuses extra hosts
    stream = None
    progress = _BuildProgress(console, tag)
    try:
        stream = send_context(client, context, image_labels, console, mark=mark, fresh=fresh)
        with open(log_path, "a", encoding="utf-8") as log, progress:
            for event in stream:
                if "stream" in event:
                    text = event["stream"]
                    log.write(text)
                    log.flush()  # the log is how a person (or a test) follows a long build
                    for line in text.splitlines():
                        if line.strip():
                            tail.append(line.rstrip())
                            if line.startswith("Step "):
                                step = line.strip()
                                progress.step(step)
                            found = re.match(r"Successfully built ([0-9a-f]+)", line.strip())
                            if found:
                                image_id = found.group(1)
                            layer = re.match(r"---> ([0-9a-f]{12,64})$", line.strip())
                            if layer and undo is not None:
                                undo.image(layer.group(1))
                            progress.line(line.strip())
                if "aux" in event and isinstance(event["aux"], dict) and event["aux"].get("ID"):
                    image_id = event["aux"]["ID"]
                    if undo is not None:
                        undo.image(image_id)
                if "error" in event:
                    log.write(event["error"] + "\n")
                    detail = (event.get("errorDetail") or {}).get("message") or event["error"]
                    raise KbundleError(
                        f"the image build failed at {step or 'the start'}: "
                        f"{detail.strip().splitlines()[-1]} (full log: {log_path})"
                    )
    except (KeyboardInterrupt, KbundleError):
        _abandon(client, stream, mark)
        raise
    except Exception as exc:
        _abandon(client, stream, mark)
        raise KbundleError(f"the image build failed: {exc} (full log: {log_path})") from None
    if not image_id:
        raise KbundleError(f"the image build ended without an image (full log: {log_path})")
    return image_id


def send_context(
    client, context: Path, image_labels: dict[str, str], console=None, mark: Optional[str] = None, fresh: bool = False
):
    """Start the build: the engine reads the whole context before the first step, and every
    byte of it is counted on the way (bytes, rate, ETA). The engine's stream of events.
    `mark`: a host name this build's intermediate containers carry (`remove_build_containers`).
    `fresh`: reuse no cached step (`run --rebuild`: a damaged layer must not be reused)."""
    from kbundle.display import size
    from kbundle.image import tarstream
    from kbundle.progress import Meter, finish

    total = tarstream.payload_bytes(context)
    t0 = time.perf_counter()
    with console.status(f"sending the build context ({size(total)}) to the engine") if console else _Null() as status:
        meter = Meter("sending the build context", total_bytes=total, on_change=status.update)
        stream = client.api.build(
            fileobj=tarstream.stream(context, meter),
            custom_context=True,
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            labels=image_labels,
            nocache=fresh,
            extra_hosts={mark: "127.0.0.1"} if mark else None,
        )
        finish(status, f"sent the build context ({size(total)}) in {time.perf_counter() - t0:.1f} s")
    return stream


def _close(stream) -> None:
    try:
        stream.close()
    except Exception:
        pass


def _abandon(client, stream, mark: str) -> None:
    """A failed or interrupted build: close its stream (the engine cancels the build), then remove
    the intermediate containers it left. A second Ctrl-C stops the cleanup, not the exit."""
    if stream is not None:
        _close(stream)
    if mark is None:  # Podman: its builds leave no intermediate containers of the legacy builder's kind
        return
    try:
        remove_build_containers(client, mark)
    except KeyboardInterrupt:
        pass


def remove_build_containers(client, mark: str, settle: float = SETTLE_S) -> list[str]:
    """Remove every container that carries this build's `mark`; the ids removed.

    The engine finishes a cancelled step on its own time (it kills the step's container, or
    completes a create already begun), so this looks again until two looks in a row find none
    of the build's containers, or `settle` seconds passed; a container still running then is
    removed too."""
    removed: list[str] = []
    deadline = time.monotonic() + settle
    quiet = 0
    while quiet < 2:
        found = _marked(client, mark)
        last = time.monotonic() >= deadline
        for container in found:
            if container["State"] != "running" or last:
                _remove(client, container["Id"], removed)
        quiet = 0 if found else quiet + 1
        if last:
            break
        time.sleep(0.25)
    return removed


def _marked(client, mark: str) -> list[dict]:
    """This build's containers, in any state (the mark is in their HostConfig only: each is inspected)."""
    import docker

    out = []
    for summary in client.api.containers(all=True):
        try:
            info = client.api.inspect_container(summary["Id"])
        except docker.errors.NotFound:
            continue  # removed meanwhile
        hosts = (info.get("HostConfig") or {}).get("ExtraHosts") or []
        if any(entry.split(":", 1)[0] == mark for entry in hosts):
            out.append({"Id": info["Id"], "State": (info.get("State") or {}).get("Status", "")})
    return out


def _remove(client, container_id: str, removed: list[str]) -> None:
    import docker

    try:
        client.api.remove_container(container_id, force=True, v=True)
        removed.append(container_id)
    except docker.errors.NotFound:
        pass  # the engine removed it itself
    except docker.errors.APIError:
        pass  # being removed already; the next look sees it gone


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args, **kwargs):
        pass


class _BuildProgress:
    """A rich progress bar over the Dockerfile's steps, with the latest output line beside it."""

    def __init__(self, console, tag: str):
        self.console = console
        self.tag = tag
        self.progress = None
        self.task = None
        self.status = None

    def __enter__(self):
        if self.console is None:
            return self
        if getattr(self.console, "is_plain", False):  # logs: one line per step (progress.py)
            self.status = self.console.status(f"building {self.tag}").__enter__()
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]building[/] {task.fields[step]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[line]}"),
            console=self.console,
            transient=True,
        )
        self.progress.__enter__()
        self.task = self.progress.add_task("build", total=None, step=self.tag, line="")
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def step(self, text: str) -> None:
        if self.status is not None:
            self.status.console.progress_line(f"building {self.tag}: {text[:100]}", force=True)
            return
        if self.progress is None:
            return
        found = re.match(r"Step (\d+)/(\d+) : (.*)", text)
        if found:
            done, total, what = int(found.group(1)) - 1, int(found.group(2)), found.group(3)
            self.progress.update(self.task, completed=done, total=total, step=what[:50], line="")

    def line(self, text: str) -> None:
        if self.progress is not None and not text.startswith("Step "):
            self.progress.update(self.task, line=text[:60])
