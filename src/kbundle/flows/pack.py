"""`pack` from start to end: find → normalise → choose CUDA → lock → render → write.

Each step is a module of its own; this one only passes their records along and
assembles the bundle's members. Nothing here touches Docker.
"""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from kbundle import __version__
from kbundle.bundle.format import (
    DOCKERFILE,
    ENVIRONMENT,
    LOCK,
    MANIFEST,
    ORIGINAL_DIR,
    WORK_DIR,
    Manifest,
    content_hash,
)
from kbundle.errors import KbundleError, UsageError
from kbundle.names import slug
from kbundle.pack.records import RawEnv

MAIL_LIMIT = 20 * 1024 * 1024  # mail servers commonly cap attachments at 20-25 MB
_NAME_OK = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_SKIP_DIRS = {".ipynb_checkpoints", "__pycache__", ".git"}


@dataclass
class PackOptions:
    notebook: Path
    env_file: Path | None = None
    output: Path | None = None
    name: str | None = None
    cuda: str = "auto"
    base_image: str | None = None
    includes: list[Path] = field(default_factory=list)
    lock: str = "auto"
    channels: list[str] = field(default_factory=list)  # replace the environment's channels
    add_channels: list[str] = field(default_factory=list)  # go in front of them
    python: str | None = None
    sign: Path | None = None  # an SSH private key: sign the bundle with it (bundle/signing.py)
    strict: bool = False  # any drop, unreadable line or CUDA conflict is an error


class StrictError(KbundleError):
    """`--strict` found problems: the command prints each as its own `error:` line."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class PackResult:
    path: Path
    manifest: Manifest
    size: int
    notes: list[str]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Notebook:
    path: Path
    data: bytes
    kernel_name: str | None


def read_notebook(path: Path) -> Notebook:
    if any(ord(ch) < 32 or ch == "\\" for ch in path.name):
        raise UsageError(f"the notebook's file name {path.name!r} has control characters or backslashes; rename it")
    if not path.exists():
        raise UsageError(f"notebook {path} does not exist")
    if not path.is_file():
        raise UsageError(f"{path} is not a file")
    data = path.read_bytes()
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{path.name} is not a Jupyter notebook (not JSON)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cells"), list) or not isinstance(doc.get("nbformat"), int):
        raise UsageError(f"{path.name} is not a Jupyter notebook (no cells/nbformat)")
    spec = (doc.get("metadata") or {}).get("kernelspec") or {}
    name = spec.get("name") if isinstance(spec, dict) else None
    return Notebook(path, data, name if isinstance(name, str) else None)


def bundle_name(options: PackOptions) -> str:
    if options.name is not None:
        if not _NAME_OK.match(options.name):
            raise UsageError(
                f"--name {options.name!r} must be lower case letters, digits, '.', '_' or '-' (at most 63)"
            )
        return options.name
    return slug(options.notebook.stem, limit=63, fallback="notebook")


def output_path(options: PackOptions, name: str) -> Path:
    out = options.output or Path.cwd() / f"{options.notebook.stem}.kbundle"
    if out.is_dir():
        out = out / f"{options.notebook.stem}.kbundle"
    if not out.parent.is_dir():
        raise UsageError(f"the folder for {out} does not exist")
    if out.resolve() in {options.notebook.resolve()} | ({options.env_file.resolve()} if options.env_file else set()):
        raise UsageError(f"refusing to write the bundle over the input {out}")
    if out.exists() and not _is_kbundle(out):
        raise UsageError(f"refusing to overwrite {out}: it is not a kbundle (choose another -o)")
    return out


def _is_kbundle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return MANIFEST in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def include_members(notebook: Path, includes: list[Path]) -> dict[str, bytes]:
    """`--include` files and folders, stored under work/ at their path beside the notebook."""
    root = notebook.resolve().parent
    members: dict[str, bytes] = {}
    for given in includes:
        if not given.exists() and not given.is_symlink():
            raise UsageError(f"--include {given} does not exist")
        for path in _walk(given):
            if path.is_symlink():
                raise UsageError(f"--include {path} is a symbolic link; include what it points to instead")
            resolved = path.resolve()
            if root not in resolved.parents:
                raise UsageError(f"--include {given} is outside the notebook's folder {root}")
            rel = resolved.relative_to(root).as_posix()
            if any(ord(ch) < 32 or ch == "\\" for ch in rel):
                raise UsageError(f"--include {rel!r} has control characters or backslashes in its name; rename it")
            if resolved != notebook.resolve():
                members[WORK_DIR + rel] = path.read_bytes()
    return members


def _walk(path: Path):
    if path.is_dir() and not path.is_symlink():
        for child in sorted(path.iterdir()):
            if child.name not in _SKIP_DIRS:
                yield from _walk(child)
    else:
        yield path


def _original_member(raw: RawEnv, options: PackOptions) -> tuple[str, bytes]:
    name = raw.source_file or "environment.yml"
    if options.env_file is not None:
        return ORIGINAL_DIR + options.env_file.name, options.env_file.read_bytes()
    return ORIGINAL_DIR + name, raw.source_text.encode()


def _check(options: PackOptions) -> None:
    """Cheap checks first, so bad input fails before any slow step."""
    from kbundle.pack.cuda import check_cuda_option

    if options.lock not in ("auto", "always", "never"):
        raise UsageError(f"unknown --lock {options.lock!r}: use auto, always or never")
    check_cuda_option(options.cuda)
    if options.base_image is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*", options.base_image):
        raise UsageError(f"--base-image {options.base_image!r} is not an image reference")


def _signer(options: PackOptions):
    """`--sign KEY`: checked now, before the slow steps; it signs just before the bundle is written."""
    if options.sign is None:
        return None
    from kbundle.bundle.signing import signer_for

    return signer_for(options.sign)


def _environment(options: PackOptions, notebook: Notebook):
    """Find, normalise, choose CUDA: the environment as the bundle will carry it.

    pip's resolver starts as soon as the offline reading gives its inputs (it is the slowest
    step); the channels' answer rarely changes them, and when it does pack starts it again."""
    from kbundle.pack import cuda, piplock
    from kbundle.pack.discover import find_environment
    from kbundle.pack.normalise import normalise, pip_indexes

    raw = find_environment(notebook.kernel_name, options.env_file, options.python)
    env = _with_channels(normalise(raw), options)
    indexes = pip_indexes(raw)
    early = None
    if options.lock != "never":
        guess = cuda.choose(cuda.evidence(raw, env), options.cuda, options.base_image)
        if env.python and not options.strict:  # --strict may stop pack before any lock is needed
            early = piplock.start(env.pip, indexes, env.python, guess.glibc, options.lock, _exported(raw, env) or ())
        # The channels, when they answer, decide what exists for linux-64 (else data/normalise.yaml does).
        available, down = _availability(raw, env)
        if available is not None:
            env = _with_channels(normalise(raw, available), options)
        env.channels_down = down
    choice = cuda.choose(cuda.evidence(raw, env), options.cuda, options.base_image)
    cuda.apply_added(env, choice)
    if options.strict:
        _strict(env, choice)
    return raw, env, choice, indexes, early


def _exported(raw, env):
    """The Python distributions a fully pinned export installs (pydists); None when it is not pinned."""
    from kbundle import pydists

    return pydists.from_pinned_specs(env.dependencies, {spec.name: spec.build for spec in raw.conda})


def _pip_lock(pending, env, indexes, python: str | None, choice, result, raw, mode: str):
    """The pip lock against the conda side as it will be installed: the conda lock's packages, or
    the export's pins; unknown when neither says (then `run` resolves pip). The lock started
    early is taken when it holds for that conda side."""
    from kbundle.pack import piplock

    provided = result.provided if result.locked else _exported(raw, env)
    # pip reads X.Y: the environment's own line (`3.7`) and the solved version (`3.7.16`) choose alike.
    return piplock.settle(pending, env.pip, indexes, env.python or python, choice.glibc, mode, provided)


def _with_channels(env, options: PackOptions):
    if options.channels:
        env.channels = list(dict.fromkeys(options.channels))
        # --channel replaced them: "conda's defaults, since none was named" no longer holds.
        env.added = [a for a in env.added if not a.spec.startswith("channel ")]
    if options.add_channels:
        env.channels = list(dict.fromkeys(options.add_channels + env.channels))
    return env


def _availability(raw, env):
    """What the environment's channels publish of its packages, and the channels that did not answer."""
    import asyncio

    from kbundle.pack import platforms
    from kbundle.pack.lock import channel_urls, unreachable

    urls = channel_urls(env.channels)
    down = unreachable(urls)
    if down:
        return None, down
    names = [spec.name for spec in raw.conda]
    try:
        found = asyncio.run(platforms.query(urls, names, platforms.query_platforms(env.source_platform)))
    except Exception:  # asking is a courtesy: the lock reports channel trouble in its own words
        return None, down
    return found, down


def _unresolved(pin) -> str:
    if pin.vcs or pin.url:
        return f"unresolved pip line `{pin.raw}`: the recipient resolves and builds it (a VCS or source requirement)"
    return f"unresolved pip line `{pin.raw}`: kbundle cannot read it"


def _strict(env, choice) -> None:
    """--strict: every drop, unreadable line and conflict is a problem; all of them, one line each."""
    problems = [f"dropped `{d.spec}`: {d.reason}" for d in env.dropped]
    problems += [_unresolved(p) for p in env.pip if p.requirement is None]
    if choice.conflict:
        problems.append(choice.conflict)
    if problems:
        raise StrictError(problems)


def pack(options: PackOptions, progress=None) -> PackResult:
    """Write the bundle. `progress(message)` returns a context manager shown around slow steps."""
    from kbundle.bundle.writer import write_bundle
    from kbundle.pack import piplock
    from kbundle.pack.dockerfile import render_for
    from kbundle.pack.lock import channel_urls, lock, target
    from kbundle.pack.normalise import environment_yml

    _check(options)
    signer = _signer(options)
    notebook = read_notebook(options.notebook)
    name = bundle_name(options)
    out = output_path(options, name)
    includes = include_members(options.notebook, options.includes)
    raw, env, choice, indexes, pending = _environment(options, notebook)
    if pending is not None and pending.inputs != piplock.lock_inputs(env.pip, indexes, env.python, choice.glibc):
        pending = None  # started on a guess the channels overturned
    if pending is None and env.python:
        # pip's resolver runs beside rattler's solve when the Python version is already known.
        pending = piplock.start(env.pip, indexes, env.python, choice.glibc, options.lock, _exported(raw, env) or ())
    slow = (
        progress("Locking the environment for linux-64 with rattler…")
        if progress and options.lock != "never"
        else contextlib.nullcontext()
    )
    with slow:
        result = lock(env, choice, options.lock)
        python = result.python or env.python  # the solved version is the precise one
        pip_lock = _pip_lock(pending, env, indexes, python, choice, result, raw, options.lock)

    nb_member = WORK_DIR + options.notebook.name
    original_path, original_bytes = _original_member(raw, options)
    members: dict[str, bytes] = {nb_member: notebook.data, **includes, original_path: original_bytes}
    members[ENVIRONMENT] = environment_yml(name, env, indexes).encode()
    if result.locked and result.text:
        members[LOCK] = result.text.encode()
    manifest = Manifest(
        name=name,
        notebook=nb_member,
        python=python,
        cuda=choice.cuda,
        cudnn=choice.cudnn,
        cuda_runtime_in_env=choice.runtime_in_env,
        cuda_env_libs=choice.env_libs,
        require_cuda=choice.require_cuda,
        base_image=choice.base_image,
        base_image_reason=choice.reason,
        channels=env.channels,
        dependencies=[d.text for d in env.dependencies],
        pip=[p.text for p in pip_lock.pins],
        pip_indexes=indexes.to_dict(),
        pip_locked=bool(pip_lock.pins) and pip_lock.locked,
        dropped=env.dropped,
        channel_urls=channel_urls(env.channels),
        added=env.added,
        variants=env.variants,
        changed=env.changed,
        locked=result.locked,
        lock=LOCK if result.locked else None,
        virtual_packages=target(choice),
        lock_note=result.note,
        original_environment=original_path,
        source={"kind": raw.source_kind, "env_name": raw.name, "platform": env.source_platform},
        includes=sorted(includes),
        kbundle_version=__version__,
    )
    members[DOCKERFILE] = render_for(manifest).encode()  # rendered from the manifest alone, as run can redo it
    # The hash covers the Dockerfile too, so it is taken once every member exists.
    manifest.content_hash = content_hash(members)
    sealed = write_bundle(out, manifest, members, sign=signer)
    notes = [f"{a.spec}: added ({a.reason})" for a in env.added]
    if result.note and options.lock != "never":
        notes.append(result.note)
    if options.lock != "never":
        notes += pip_lock.notes
    warnings = [choice.conflict] if choice.conflict else []
    return PackResult(out, sealed, out.stat().st_size, notes, warnings)
