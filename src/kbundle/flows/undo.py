"""Nothing half-done: what a failed, declined or interrupted `run` created is removed again.

`Undo` records what the run creates (the working directory it made, the images a build
committed) and, when the run leaves with an exception (KeyboardInterrupt and SIGTERM
included), removes them: every one of those images that has no tag, and the folders. The
build context removes itself (image/context.py). Cleanup ignores further Ctrl-C.

Only what this run alone created goes: the working directory is shared by every run placed in
it at the same time, so it is removed only by the run that made it, and only when no other run
is still present there and no kernel was registered from it (image/workdir.py `release`, under
the lock its placement holds). A run that succeeds leaves it as well.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path


class Undo:
    def __init__(self):
        self.folders: list[Path] = []
        self.images: list[str] = []
        self.client = None
        self.workdir = None  # image/workdir.py's Claim: the working directory, shared with concurrent runs

    def created_folder(self, path: Path) -> None:
        """`path` is about to be made by this run (when it does not exist yet)."""
        if not os.path.lexists(path):
            self.folders.append(Path(path))

    def claimed(self, claim) -> None:
        """The working directory this run placed its files in (image/workdir.py `claim`)."""
        self.workdir = claim

    def image(self, image_id: str) -> None:
        """An image this run's build committed (a step's layer, or the result)."""
        if image_id and image_id not in self.images:
            self.images.append(image_id)

    def __enter__(self) -> Undo:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            with _uninterrupted():
                self.undo()
        elif self.workdir is not None:
            self._leave(failed=False)
        return False

    def undo(self) -> None:
        self._remove_images()
        for folder in reversed(self.folders):
            shutil.rmtree(folder, ignore_errors=True)
        if self.workdir is not None:
            self._leave(failed=True)

    def _leave(self, failed: bool) -> None:
        from kbundle.image import workdir

        try:
            workdir.release(self.workdir, failed)
        except OSError:
            pass  # the cache's lock folder cannot be written: the folder stays, which harms no one
        self.workdir = None

    def _remove_images(self) -> None:
        if self.client is None:
            return
        import docker

        for image_id in reversed(self.images):  # children before their parents
            try:
                if not self.client.images.get(image_id).tags:
                    self.client.api.remove_image(image_id, noprune=False)
            except docker.errors.DockerException:
                pass  # gone already, or a layer another image builds on


class _uninterrupted:
    """Ctrl-C and SIGTERM wait while cleaning up (main thread only)."""

    def __enter__(self):
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, signal.SIG_IGN)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False
