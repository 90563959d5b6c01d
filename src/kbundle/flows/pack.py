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
from kbundle.bundle.limits import DEFAULT_MAX_EXTRACT, MAX_MEMBERS, MEMBER_NAME_LIMIT, TEXT_BUDGET
from kbundle.bundle.reader import notebook_problem
from kbundle.display import safe, size
from kbundle.errors import KbundleError, UsageError, first_line
from kbundle.names import slug
from kbundle.pack.records import RawEnv

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
    extras: list[str] = field(default_factory=list)  # --extra NAME: a pyproject.toml's or uv.lock's optional deps
    strip_outputs: bool = False  # carry the notebook with its outputs and execution counts cleared


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
    stripped: tuple[int, int] | None = None  # --strip-outputs: the notebook's size before and after


@dataclass(frozen=True)
class Notebook:
    path: Path
    data: bytes
    kernel_name: str | None


def _unprintable(name: str) -> bool:
    """Control, line-separator or bidi characters, or a backslash: what no member name may hold."""
    return "\\" in name or safe(name, len(name) + 1) != name


def read_notebook(path: Path) -> Notebook:
    if _unprintable(path.name):
        raise UsageError(f"the notebook's file name {path.name!r} has control characters or backslashes; rename it")
    if not path.exists():
        raise UsageError(f"notebook {path} does not exist")
    if not path.is_file():
        raise UsageError(f"{path} is not a file")
    data = path.read_bytes()
    problem = notebook_problem(data)  # the reader's own question, so pack never packs what it refuses
    if problem:
        raise UsageError(f"{path.name} is not a Jupyter notebook ({problem})")
    doc = json.loads(data.decode("utf-8-sig"))
    spec = doc.get("metadata", {}).get("kernelspec") or {}
    name = spec.get("name") if isinstance(spec, dict) else None
    return Notebook(path, data, name if isinstance(name, str) else None)


def strip_outputs(notebook: Notebook) -> tuple[Notebook, int]:
    """The notebook with every code cell's outputs and execution count cleared (its code, markdown
    and metadata kept), written by nbformat; and how many cells had something to clear."""
    import warnings

    import nbformat
    from nbformat import reader

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nbformat's advice about cell ids is not the sender's business here
            nb = reader.reads(notebook.data.decode("utf-8-sig"))
            cleared = 0
            for cell in nb.cells:
                if cell.get("cell_type") != "code":
                    continue
                cleared += bool(cell.get("outputs")) or cell.get("execution_count") is not None
                cell["outputs"], cell["execution_count"] = [], None
            # The version's own writer: no validation pass, so no cell ids are invented (same bytes every time).
            text = nbformat.versions[nb.nbformat].writes_json(nb) + "\n"
    except Exception as exc:  # nbformat raises its own, jsonschema's and plain errors for what it cannot read
        raise UsageError(
            f"--strip-outputs: nbformat cannot read {notebook.path.name} ({safe(first_line(exc), 200)})"
        ) from None
    data = text.encode()
    if notebook_problem(data):
        raise UsageError(f"--strip-outputs: {notebook.path.name} is not a notebook kbundle reads once stripped")
    return Notebook(notebook.path, data, notebook.kernel_name), cleared


def check_notebook_budget(notebook: Notebook, options: PackOptions, other_texts: int = 0) -> None:
    """The notebook (with the Dockerfile, environment and lock, once they exist: `other_texts`
    bytes) within the TEXT_BUDGET every reader holds a bundle to; else one line with the ways out."""
    total = len(notebook.data) + other_texts
    if total <= TEXT_BUDGET:
        return
    what = f"{notebook.path.name} is {size(len(notebook.data))}"
    if other_texts:
        what += f" ({size(total)} with the bundle's Dockerfile, environment and lock)"
    ways = "save large data to files and carry them with --include"
    if options.strip_outputs:
        what = "even with its outputs cleared, " + what
    else:
        ways = "pack with --strip-outputs to clear its outputs (the code stays), or " + ways
    raise KbundleError(
        f"{what}, more than the {size(TEXT_BUDGET)} a bundle's notebook may be (kbundle verify and run refuse more): {ways}"
    )


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


# The members pack always writes: the notebook, the original and normalised environment, the
# Dockerfile and the lock. `--include` may add up to MAX_MEMBERS less these.
_OWN_MEMBERS = 5


def include_members(notebook: Path, includes: list[Path]) -> dict[str, bytes]:
    """`--include` files and folders, stored under work/ at their path beside the notebook.

    Counted and sized against the bundle's limits (bundle/limits.py) before a byte is read."""
    root = notebook.resolve().parent
    found: dict[str, Path] = {}
    room = MAX_MEMBERS - _OWN_MEMBERS
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
            if _unprintable(rel):
                raise UsageError(f"--include {rel!r} has control characters or backslashes in its name; rename it")
            if len(WORK_DIR + rel) > MEMBER_NAME_LIMIT:
                raise UsageError(f"--include {safe(rel, 80)}: its path is longer than a bundle's member names may be")
            if not path.is_file():
                raise UsageError(f"--include {safe(path, 200)} is not a regular file")
            if resolved != notebook.resolve():
                found[WORK_DIR + rel] = path
            if len(found) > room:
                raise KbundleError(
                    f"--include carries more than {room:,} files, more than a bundle may hold "
                    f"(kbundle verify and run refuse more than {MAX_MEMBERS:,} members): pack many small files "
                    "into one archive (tar or zip) and include that"
                )
    total = sum(path.stat().st_size for path in found.values())
    if total > DEFAULT_MAX_EXTRACT:
        raise KbundleError(
            f"--include carries {size(total)}, more than the {size(DEFAULT_MAX_EXTRACT)} a bundle may unpack to "
            "(kbundle verify and run refuse more): leave large data out and say where the recipient gets it"
        )
    return {member: path.read_bytes() for member, path in found.items()}


def _walk(path: Path):
    if path.is_dir() and not path.is_symlink():
        for child in sorted(path.iterdir()):
            if child.name not in _SKIP_DIRS:
                yield from _walk(child)
    else:
        yield path


def _original_member(raw: RawEnv, options: PackOptions) -> tuple[str, bytes]:
    name = raw.source_file or "environment.yml"
    original = options.env_file or raw.source_path  # a file pack found itself is kept as given too
    if original is not None:
        return ORIGINAL_DIR + original.name, original.read_bytes()
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


def _environment(options: PackOptions, notebook: Notebook, warm=None):
    """Find, normalise, choose CUDA: the environment as the bundle will carry it.

    pip's resolver starts as soon as the offline reading gives its inputs (it is the slowest
    step); the channels' answer rarely changes them, and when it does pack starts it again."""
    from kbundle.pack import cuda, piplock
    from kbundle.pack.discover import find_environment
    from kbundle.pack.normalise import normalise, pip_indexes

    raw = find_environment(
        notebook.kernel_name, options.env_file, options.python, notebook=notebook.path, extras=options.extras
    )
    env = _with_channels(normalise(raw), options)
    indexes = pip_indexes(raw)
    early = None
    if options.lock != "never":
        guess = cuda.choose(cuda.evidence(raw, env), options.cuda, options.base_image)
        if env.python and not options.strict:  # --strict may stop pack before any lock is needed
            exported = _exported(raw, env) or ()
            early = piplock.start(env.pip, indexes, env.python, guess.glibc, options.lock, exported, warm)
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
    with _warm_pip(options) as warm:
        return _pack(options, progress, warm)


@contextlib.contextmanager
def _warm_pip(options: PackOptions):
    """pip, started now in a stand-in interpreter (pydists.WarmPip): its third of a second of
    imports overlaps pack's reading of the environment, and its first command is the pip lock."""
    if options.lock == "never":
        yield None
        return
    import tempfile

    from kbundle.pydists import WarmPip

    # A lock pack no longer waits for may still be writing there: its leftovers are not our error.
    with tempfile.TemporaryDirectory(prefix="kbundle-warmpip-", ignore_cleanup_errors=True) as tmp:
        warm = WarmPip(Path(tmp))
        try:
            yield warm
        finally:
            warm.close()


def _pack(options: PackOptions, progress, warm) -> PackResult:
    from kbundle.bundle.writer import write_bundle
    from kbundle.pack import piplock
    from kbundle.pack.dockerfile import render_for, template
    from kbundle.pack.lock import channel_urls, lock, target
    from kbundle.pack.normalise import environment_yml

    _check(options)
    signer = _signer(options)
    notebook = read_notebook(options.notebook)
    stripped = None
    if options.strip_outputs:
        before = len(notebook.data)
        notebook, cleared = strip_outputs(notebook)
        stripped = (before, len(notebook.data), cleared)
    check_notebook_budget(notebook, options)  # before the slow steps: the notebook alone may be too large
    name = bundle_name(options)
    out = output_path(options, name)
    includes = include_members(options.notebook, options.includes)
    raw, env, choice, indexes, pending = _environment(options, notebook, warm)
    if pending is not None and pending.inputs != piplock.lock_inputs(env.pip, indexes, env.python, choice.glibc):
        pending = None  # started on a guess the channels overturned
    if pending is None and env.python:
        # pip's resolver runs beside rattler's solve when the Python version is already known.
        exported = _exported(raw, env) or ()
        pending = piplock.start(env.pip, indexes, env.python, choice.glibc, options.lock, exported, warm)
    slow = (
        progress("Locking the environment for linux-64 with rattler…")
        if progress and options.lock != "never"
        else contextlib.nullcontext()
    )
    with slow:
        result = lock(env, choice, options.lock)
        python = result.python or env.python  # the solved version is the precise one
        template()  # compiled while pip's resolver runs, not after it
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
    check_notebook_budget(
        notebook, options, sum(len(members[m]) for m in (DOCKERFILE, ENVIRONMENT, LOCK) if m in members)
    )
    # check: every limit and rule a reader enforces, before anything is signed or written.
    sealed = write_bundle(out, manifest, members, sign=signer, check=True)
    notes = list(raw.notes) + [f"{a.spec}: added ({a.reason})" for a in env.added]
    if stripped is not None:
        before, after, cleared = stripped
        saved = f"{size(before - after)} saved" if before >= after else "nothing saved"
        notes.insert(
            0,
            f"--strip-outputs: cleared the outputs and execution counts of {cleared} code cell"
            f"{'' if cleared == 1 else 's'}; the bundle's notebook is {size(after)}, yours {size(before)} "
            f"({saved}; your file is unchanged)",
        )
    if result.note and options.lock != "never":
        notes.append(result.note)
    if options.lock != "never":
        notes += pip_lock.notes
    warnings = [choice.conflict] if choice.conflict else []
    return PackResult(out, sealed, out.stat().st_size, notes, warnings, stripped[:2] if stripped else None)
