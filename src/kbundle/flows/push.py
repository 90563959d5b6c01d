"""`kbundle push`: the bundle's image, as `run` gets it, sent to a registry under its content tag.

1. parse `--to REGISTRY/NAMESPACE` before any work (image/registry.py)
2. open and verify the bundle once (bundle/reader.py); read its signature
3. connect to the engine (image/engine.py); no GPU is needed to push
4. the image, exactly as `run` gets it (flows/run.py `image_for`): reused under its content
   tag, or built after the same consent (it runs the sender's build), `--yes` skips it
5. tag it `REGISTRY/NAMESPACE/<name>:<content tag>` and push it with progress; the answer is the
   pinned reference `REGISTRY/NAMESPACE/<name>@sha256:…` that `run --image` takes

The review's Dockerfile and the build's log copy go to a scratch folder in kbundle's cache
(push places no notebook); a failed push removes what a failed run would (flows/undo.py).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kbundle.cache import cache_root
from kbundle.flows.options import RunOptions
from kbundle.flows.run import image_for


@dataclass(frozen=True)
class PushOptions:
    bundle: Path
    to: str  # REGISTRY/NAMESPACE
    base_image: Optional[str] = None
    yes: bool = False
    engine_timeout: float = 10.0

    def image_options(self) -> RunOptions:
        """How the image is got: run's options, as far as they concern the image."""
        return RunOptions(self.bundle, gpus="none", base_image=self.base_image, yes=self.yes)


@dataclass
class PushResult:
    name: str
    reference: str  # REGISTRY/NAMESPACE/<name>@sha256:…, for `run --image`
    repository: str
    tag: str
    digest: str
    image: str  # the local content tag
    image_id: str
    built: bool
    pushed_bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reference": self.reference,
            "repository": self.repository,
            "tag": self.tag,
            "digest": self.digest,
            "image": self.image,
            "image_id": self.image_id,
            "built": self.built,
            "pushed_bytes": self.pushed_bytes,
            "seconds": round(self.seconds, 3),
            "warnings": list(self.warnings),
        }


def push_bundle(options: PushOptions, console) -> PushResult:
    """The flow; what a failed or declined push created is removed again (flows/undo.py)."""
    from kbundle.bundle import open_bundle
    from kbundle.flows.review import read_sender
    from kbundle.flows.undo import Undo
    from kbundle.image import engine, registry

    t0 = time.perf_counter()
    destination = registry.parse_destination(options.to)  # a bad --to fails before any work
    bundle = open_bundle(options.bundle)
    signature = read_sender(bundle)
    with Undo() as undo, _scratch() as scratch:
        client = engine.connect(options.engine_timeout)
        undo.client = client
        base = options.base_image or bundle.base_image
        warnings: list[str] = []
        with image_for(
            client, bundle, options.image_options(), base, signature, scratch, warnings, console, undo
        ) as image:
            pushed = registry.push(client, image.tag, destination, console)
    return PushResult(
        name=bundle.name,
        reference=pushed.reference,
        repository=pushed.repository,
        tag=pushed.tag,
        digest=pushed.digest,
        image=image.tag,
        image_id=image.image_id,
        built=image.built,
        pushed_bytes=pushed.pushed_bytes,
        seconds=time.perf_counter() - t0,
        warnings=warnings,
    )


@contextmanager
def _scratch() -> Iterator[Path]:
    """A folder for the review's Dockerfile and the build log's copy, gone when the push ends."""
    folder = cache_root() / "push"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="push-", dir=folder) as path:
        yield Path(path)
