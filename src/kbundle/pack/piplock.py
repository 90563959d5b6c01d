"""Lock the pip: section for the image with pip's own resolver, at pack time.

`pip install --dry-run --report` resolves the whole section for the target image (CPython
X.Y, manylinux up to the base image's glibc, wheels only) against the bundle's indexes,
without installing anything or running any package's code. Each resolved distribution
becomes an exact pin with the sha256 of its wheel (`name==version --hash=sha256:…`), so the
recipient only downloads and checks. What pip cannot lock without building it (a VCS
requirement, an sdist URL) is carried as written, after the locked pins, for the recipient
to resolve and build; the bundle is then `pip_locked: false`.

The resolver runs in a thread beside rattler's solve (`start`), so locking pip costs pack
little more than pip itself. `--lock never` never starts pip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kbundle.errors import KbundleError
from kbundle.pipplatform import explain_no_wheel
from kbundle.specs import PipIndexes, PipPin, cpython_abis, manylinux_platforms, parse_pip_line

PIP_TIMEOUT_S = 8  # per connection: an offline sender hears back in seconds
PIP_RETRIES = 1


class PipLockError(KbundleError):
    """The pip: section cannot be resolved for the image (with --lock always)."""


@dataclass(frozen=True)
class PipLock:
    pins: tuple[PipPin, ...]  # what the manifest's `pip` records, in install order
    locked: bool  # every line is an exact, hashed pin
    notes: tuple[str, ...] = ()
    seconds: float = 0.0


@dataclass
class PendingLock:
    """A pip lock under way in a thread; `result()` waits for it."""

    future: Future | None = None
    done: PipLock | None = None
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)
    inputs: tuple = ()  # what it resolves: the pins' text, the indexes, Python, glibc

    def serves(self, pins: list[PipPin], indexes: PipIndexes, python: str | None, glibc: str | None) -> bool:
        """Whether this lock was started for exactly these inputs (an early start may have guessed)."""
        return self.inputs == _inputs(pins, indexes, python, glibc)

    def result(self) -> PipLock:
        if self.done is None:
            try:
                self.done = self.future.result()
            finally:
                self._pool.shutdown(wait=False)
        return self.done


def lockable(pin: PipPin) -> bool:
    """What pip can resolve from wheels alone: not a VCS checkout, not an sdist URL."""
    return not pin.local and not pin.vcs and (pin.url is None or pin.wheel_url)


def start(pins: list[PipPin], indexes: PipIndexes, python: str | None, glibc: str | None, mode: str) -> PendingLock:
    """Start `lock` in a thread (pip runs as a subprocess, so rattler's solve runs meanwhile)."""
    inputs = _inputs(pins, indexes, python, glibc)
    if mode == "never" or not pins or not python:
        return PendingLock(done=lock(pins, indexes, python, glibc, mode), inputs=inputs)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kbundle-piplock")
    return PendingLock(future=pool.submit(lock, pins, indexes, python, glibc, mode), _pool=pool, inputs=inputs)


def _inputs(pins: list[PipPin], indexes: PipIndexes, python: str | None, glibc: str | None) -> tuple:
    return (tuple(p.text for p in pins), repr(indexes.to_dict()), python, glibc)


def lock(pins: list[PipPin], indexes: PipIndexes, python: str | None, glibc: str | None, mode: str) -> PipLock:
    """The pip: section as the manifest will carry it, locked when pip's resolver can do it."""
    if not pins:
        return PipLock((), True)
    carried = [p for p in pins if not lockable(p)]
    notes = [f"pip: {p.text} is resolved and built by the recipient (a VCS or source requirement)" for p in carried]
    if mode == "never":
        return PipLock(tuple(pins), False, ("pip: not locked (--lock never); the recipient will resolve it",))
    if not python:
        message = "pip: not locked: the environment pins no Python version to resolve for"
        if mode == "always":
            raise PipLockError(f"cannot lock {message.removeprefix('pip: not locked: ')}")
        return PipLock(tuple(pins), False, (message,))
    wanted = [p for p in pins if lockable(p)]
    t0 = time.perf_counter()
    try:
        report = resolve([_unhashed(p) for p in wanted], indexes, python, glibc)
    except PipLockError as exc:
        if mode == "always":
            raise
        note = f"pip: not locked ({exc}); the recipient will resolve it"
        return PipLock(tuple(pins), False, (note, *notes), time.perf_counter() - t0)
    locked = pins_from_report(report)
    return PipLock(tuple(locked + carried), not carried, tuple(notes), time.perf_counter() - t0)


def _unhashed(pin: PipPin) -> str:
    # Hashes the sender's prefix recorded would put pip in hash-checking mode for every dependency.
    return pin.spec or pin.text


def pip_target_args(python: str, glibc: str | None) -> list[str]:
    """pip's options that describe the image rather than this host."""
    major, minor = python.split(".")[:2]
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", f"{major}.{minor}"]
    for platform in manylinux_platforms(glibc):
        args += ["--platform", platform]
    for abi in cpython_abis(python):
        args += ["--abi", abi]
    return args


def resolve(requirements: list[str], indexes: PipIndexes, python: str, glibc: str | None) -> dict:
    """pip's installation report for `requirements` on the image; PipLockError when pip says no."""
    with tempfile.TemporaryDirectory(prefix="kbundle-piplock-") as tmp:
        reqs = Path(tmp) / "requirements.txt"
        # A file, not argv: a line can never become an option of this pip command.
        reqs.write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            "-",
            # pip wants --target with platform options; --dry-run writes nothing there.
            "--target",
            str(Path(tmp) / "target"),
            *pip_target_args(python, glibc),
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
            "--timeout",
            str(PIP_TIMEOUT_S),
            "--retries",
            str(PIP_RETRIES),
            "-r",
            str(reqs),
        ]
        env = indexes.environment(os.environ.copy())
        try:
            proc = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise PipLockError(f"cannot start pip: {exc.strerror}") from None
    if proc.returncode != 0:
        detail = _pip_error(proc.stderr, proc.returncode)
        # pip's "conflicting dependencies" often means no file fits the image: say which glibc would
        raise PipLockError(explain_no_wheel(detail, python, glibc, indexes) or detail)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise PipLockError("pip printed no installation report (pip 22.2 or newer is needed)") from None


def _pip_error(stderr: str, code: int) -> str:
    if "No module named pip" in stderr:
        return "pip is not installed next to kbundle"
    errors = [ln.removeprefix("ERROR: ").strip() for ln in stderr.splitlines() if ln.startswith("ERROR")]
    return errors[0] if errors else (stderr.strip().splitlines() or [f"pip exited with {code}"])[-1]


def pins_from_report(report: dict) -> list[PipPin]:
    """Each distribution pip would install, as an exact pin with its wheel's sha256, in pip's order."""
    pins = []
    for item in report.get("install") or []:
        meta = item.get("metadata") or {}
        info = item.get("download_info") or {}
        archive = info.get("archive_info") or {}
        digest = (archive.get("hashes") or {}).get("sha256")
        if not digest and str(archive.get("hash", "")).startswith("sha256="):
            digest = archive["hash"].split("=", 1)[1]
        name, version = meta.get("name"), meta.get("version")
        if not (name and version):
            continue
        body = f"{name} @ {info['url']}" if item.get("is_direct") and info.get("url") else f"{name}=={version}"
        pin = parse_pip_line(body + (f" --hash=sha256:{digest}" if digest else ""))
        if pin is not None:
            pins.append(pin)
    return pins
