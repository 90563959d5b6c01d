"""Lock the pip: section for the image with pip's own resolver, at pack time.

`pip install --dry-run --report` resolves the whole section for the target image (CPython
X.Y, manylinux up to the base image's glibc, wheels only) against the bundle's indexes,
without installing anything or running any package's code. Each resolved distribution
becomes an exact pin with the sha256 of its wheel (`name==version --hash=sha256:…`), so the
recipient only downloads and checks. What pip cannot lock without building it (a VCS
requirement, an sdist URL) is carried as written, after the locked pins, for the recipient
to resolve and build; the bundle is then `pip_locked: false`.

pip resolves with the conda side installed (kbundle/pydists.py): the distributions that the
export pins, or that pack's conda lock solved, stand in site-packages as they did on the
sender's machine, so pip leaves conda's absl-py or protobuf alone where they satisfy its lines,
and the lock lists only what pip itself will install. Where the conda side is neither pinned
nor locked, nobody knows yet what it installs: the pip lines are carried for `run`, which
resolves them against the environment it has just installed.

A wheel whose own metadata refuses the image's Python (a mirror whose index pages carry no
`data-requires-python`) is never locked.

The resolver runs in a thread beside rattler's solve (`start`), so locking pip costs pack
little more than pip itself. `--lock never` never starts pip.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kbundle.errors import KbundleError
from kbundle.pipplatform import explain_no_wheel, python_refusals, target_gaps
from kbundle.pydists import Provided, WarmPip, add_stand_ins, installed_site, pip_command
from kbundle.specs import PipIndexes, PipPin, cpython_abis, manylinux_platforms, parse_pip_line

PIP_TIMEOUT_S = 8  # per connection: an offline sender hears back in seconds
PIP_RETRIES = 1
CONDA_UNKNOWN = None  # `provided` when the conda side is neither pinned nor locked


class PipLockError(KbundleError):
    """The pip: section cannot be resolved for the image (with --lock always)."""


@dataclass(frozen=True)
class PipLock:
    pins: tuple[PipPin, ...]  # what the manifest's `pip` records, in install order
    locked: bool  # every line is an exact, hashed pin
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    touched: frozenset[str] = frozenset()  # every distribution the resolution chose (canonical names)
    kept: tuple[Provided, ...] = ()  # conda's distributions pip saw installed
    report: dict | None = field(default=None, compare=False, repr=False)  # pip's own report
    carried: tuple[PipPin, ...] = ()  # lines pip could not lock, after the locked pins


@dataclass
class PendingLock:
    """A pip lock under way in a thread; `result()` waits for it."""

    future: Future | None = None
    done: PipLock | None = None
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)
    inputs: tuple = ()  # what it resolves: the pins' text, the indexes, Python, glibc
    provided: tuple[Provided, ...] | None = ()  # the conda side it resolved against

    def serves(
        self,
        pins: list[PipPin],
        indexes: PipIndexes,
        python: str | None,
        glibc: str | None,
        provided: tuple[Provided, ...] | None = (),
    ) -> bool:
        """Whether this lock holds for exactly these inputs (an early start may have guessed).

        A lock made with nothing installed also holds for a conda side it never met: pip's
        choice changes only where it reaches a distribution that conda installs."""
        if self.inputs != lock_inputs(pins, indexes, python, glibc):
            return False
        if self.provided == provided:
            return True
        if self.provided:
            return False
        result = self.result()
        return result.report is not None and not (result.touched & {p.name for p in provided})

    def result(self) -> PipLock:
        if self.done is None:
            try:
                self.done = self.future.result()
            finally:
                self._pool.shutdown(wait=False)
        return self.done


def settle(
    pending: PendingLock | None,
    pins: list[PipPin],
    indexes: PipIndexes,
    python: str | None,
    glibc: str | None,
    mode: str,
    provided: tuple[Provided, ...] | None,
) -> PipLock:
    """The lock for the conda side `provided` (None: unknown): the early lock when it holds; the
    early lock made with nothing installed, adapted to conda's packages (pack/pipadapt.py), when
    it can be; else pip's resolver again, with them installed."""
    from kbundle.pack.pipadapt import adapt

    if provided is CONDA_UNKNOWN:
        return lock(pins, indexes, python, glibc, mode, CONDA_UNKNOWN)
    if pending is None or pending.inputs != lock_inputs(pins, indexes, python, glibc):
        return lock(pins, indexes, python, glibc, mode, provided)
    if pending.serves(pins, indexes, python, glibc, provided):
        return pending.result()
    early = pending.result()
    if pending.provided or early.report is None:
        return lock(pins, indexes, python, glibc, mode, provided)
    locked = [p for p in early.pins if p not in early.carried]
    adapted = adapt(early.report, locked, provided, python, [_unhashed(p) for p in pins if lockable(p)])
    if adapted is None:
        return lock(pins, indexes, python, glibc, mode, provided)
    kept = _kept(provided, adapted)
    notes = tuple(n for n in early.notes if not n.startswith("pip: resolved with")) + _kept_note(kept)
    touched = frozenset(p.name for p in adapted)
    return PipLock(
        tuple(adapted) + early.carried, early.locked, notes, early.seconds, touched, kept, early.report, early.carried
    )


def lockable(pin: PipPin) -> bool:
    """What pip can resolve from wheels alone: not a VCS checkout, not an sdist URL."""
    return not pin.local and not pin.vcs and (pin.url is None or pin.wheel_url)


def start(
    pins: list[PipPin],
    indexes: PipIndexes,
    python: str | None,
    glibc: str | None,
    mode: str,
    provided: tuple[Provided, ...] = (),
    warm: WarmPip | None = None,
) -> PendingLock:
    """Start `lock` in a thread (pip runs as a subprocess, so rattler's solve runs meanwhile);
    `warm`: a pip already started, for its first command."""
    inputs = lock_inputs(pins, indexes, python, glibc)
    if mode == "never" or not pins or not python:
        done = lock(pins, indexes, python, glibc, mode, provided)
        return PendingLock(done=done, inputs=inputs, provided=provided)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kbundle-piplock")
    future = pool.submit(lock, pins, indexes, python, glibc, mode, provided, warm)
    return PendingLock(future=future, _pool=pool, inputs=inputs, provided=provided)


def lock_inputs(pins: list[PipPin], indexes: PipIndexes, python: str | None, glibc: str | None) -> tuple:
    return (tuple(p.text for p in pins), repr(indexes.to_dict()), python, glibc)


def lock(
    pins: list[PipPin],
    indexes: PipIndexes,
    python: str | None,
    glibc: str | None,
    mode: str,
    provided: tuple[Provided, ...] | None = (),
    warm: WarmPip | None = None,
) -> PipLock:
    """The pip: section as the manifest will carry it, locked when pip's resolver can do it.

    `provided`: the conda side's distributions, which pip sees installed; CONDA_UNKNOWN when the
    conda side is neither pinned nor locked, so that only `run` can know it."""
    if not pins:
        return PipLock((), True)
    carried = [p for p in pins if not lockable(p)]
    notes = [f"pip: {p.text} is resolved and built by the recipient (a VCS or source requirement)" for p in carried]
    if mode == "never":
        return PipLock(tuple(pins), False, ("pip: not locked (--lock never); the recipient will resolve it",))
    if all(p.hashed for p in pins):
        # A lock already (uv.lock, pixi.lock, `uv export`, `pip-compile --generate-hashes`): pip's
        # hash-checking mode needs every dependency pinned, so the lines are the whole set.
        return PipLock(tuple(pins), True, ("pip: taken as locked: every line is an exact pin with its hashes",))
    unlockable = _why_not(python, provided)
    if unlockable:
        if mode == "always":
            raise PipLockError(f"cannot lock pip: {unlockable}")
        return PipLock(tuple(pins), False, (f"pip: not locked: {unlockable}",))
    wanted = [p for p in pins if lockable(p)]
    t0 = time.perf_counter()
    try:
        report = resolve([_unhashed(p) for p in wanted], indexes, python, glibc, provided, warm)
    except PipLockError as exc:
        if mode == "always":
            raise
        note = f"pip: not locked ({exc}); the recipient will resolve it"
        return PipLock(tuple(pins), False, (note, *notes), time.perf_counter() - t0)
    locked = pins_from_report(report)
    kept = _kept(provided, locked)
    return PipLock(
        tuple(locked + carried),
        not carried,
        tuple(notes) + _kept_note(kept),
        time.perf_counter() - t0,
        frozenset(p.name for p in locked),
        kept,
        report,
        tuple(carried),
    )


def _why_not(python: str | None, provided: tuple[Provided, ...] | None) -> str | None:
    if not python:
        return "the environment pins no Python version to resolve for"
    if provided is CONDA_UNKNOWN:
        return (
            "the conda side is neither pinned nor locked, so which packages it installs is known only "
            "when the recipient solves it; pip is resolved then, with those packages installed"
        )
    return None


def _kept(provided: tuple[Provided, ...] | None, locked: list[PipPin]) -> tuple[Provided, ...]:
    """conda's distributions that stay conda's: pip installs no other version of them."""
    chosen = {p.name for p in locked}
    return tuple(p for p in provided or () if p.name not in chosen)


def _kept_note(kept: tuple[Provided, ...]) -> tuple[str, ...]:
    if not kept:
        return ()
    return (f"pip: resolved with the conda side installed ({len(kept)} Python packages), as on the sender's machine",)


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


GAP_ROUNDS = 4  # marker-only requirements pip skipped pull in their own: a few rounds close it


def resolve(
    requirements: list[str],
    indexes: PipIndexes,
    python: str,
    glibc: str | None,
    provided: tuple[Provided, ...] = (),
    warm: WarmPip | None = None,
) -> dict:
    """pip's installation report for `requirements` on the image, with `provided` installed;
    PipLockError when pip says no, or when it chose a wheel the image's Python refuses.

    pip judges markers by the Python it runs on, so the requirements the image's Python needs
    and pip skipped (pipplatform.target_gaps) go back to pip with the rest until none is left.
    `warm`: a pip started early in its own stand-in interpreter, which then serves the first round."""
    lines = list(requirements)
    with tempfile.TemporaryDirectory(prefix="kbundle-piplock-") as tmp:
        # pip's resolver sees the conda side as installed in this stand-in interpreter.
        if warm is not None and warm.fresh:
            interpreter = warm.interpreter
            add_stand_ins(interpreter, provided)
        else:
            interpreter, warm = installed_site(provided, Path(tmp)), None
        for _ in range(GAP_ROUNDS):
            report = _dry_run(lines, interpreter, Path(tmp), indexes, python, glibc, warm)
            warm = None
            gaps = target_gaps(report, python, [p.name for p in provided])
            if not gaps:
                break
            lines += gaps
    refused = python_refusals(report, python)
    if refused:
        raise PipLockError(refused[0])
    return report


def _dry_run(
    lines: list[str],
    interpreter: Path,
    tmp: Path,
    indexes: PipIndexes,
    python: str,
    glibc: str | None,
    warm: WarmPip | None = None,
) -> dict:
    reqs = tmp / "requirements.txt"
    # A file, not argv: a line can never become an option of this pip command.
    reqs.write_text("".join(f"{r}\n" for r in lines), encoding="utf-8")
    args = ["install", "--dry-run", "--quiet"]
    args += ["--report", "-", *pip_target_args(python, glibc), "--disable-pip-version-check", "--no-input"]
    args += ["--progress-bar", "off", "--timeout", str(PIP_TIMEOUT_S), "--retries", str(PIP_RETRIES)]
    args += ["-r", str(reqs)]
    env = indexes.environment(os.environ.copy())
    try:
        if warm is not None:
            proc = warm.run(args, env)
        else:
            command = [*pip_command(interpreter), *args]
            proc = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise PipLockError(f"cannot start pip: {exc.strerror}") from None
    if proc.returncode != 0:
        raise PipLockError(pip_failure(proc.stderr, proc.returncode, python, glibc, indexes))
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise PipLockError("pip printed no installation report (pip 25.1 or newer is needed)") from None


def pip_failure(stderr: str, code: int, python: str, glibc: str | None, indexes: PipIndexes) -> str:
    """pip's failure in words that name its cause: an index that did not answer, no wheel for the
    image's platform, or a conflict between two requirements."""
    from kbundle.pipplatform import error_line, failure_cause

    detail = error_line(stderr, code)
    return failure_cause(stderr, detail) or explain_no_wheel(detail, python, glibc, indexes) or detail


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
