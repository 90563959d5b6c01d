"""The bundle's `pip:` section, fetched as wheels on the host for the image's platform and Python.

They are then installed into the environment with `--no-index --no-deps` in a container
without network (image/pipinstall.py): nothing is downloaded there, where proxies and
intercepting CAs break things. The host's pip runs with the user's own pip configuration,
proxy variables and CA settings, plus the bundle's indexes (`pip_indexes`, passed as PIP_*
variables, never in argv). pip's resolver decides which files (`pip install --dry-run
--report`, image/pipreport.py); kbundle downloads them, several at a time and resumably, into
a cache per target (Python, platform), each checked against its sha256 (image/download.py).
Two paths:

* every line an exact pin (`name==version`, with or without its wheel's hash) or a hashed
  wheel URL: each is resolved alone (`--no-deps`), so that a second run finds every one in the
  cache and does not even start pip; recorded hashes are checked;
* anything else (a range, a bare name, a VCS requirement, a URL): pip's resolver picks the
  whole set for the image (wheels only). A VCS or sdist requirement is first fetched on the
  host (git, or a plain download: no package code runs here) and built into a wheel by the
  environment's own Python in a throwaway container of the base image: no network, no
  capabilities, not root (`ContainerBuilder`). A second run of the same bundle reuses the
  resolution it recorded, when every file of it is still in the cache: nothing is asked of
  the network.

Either way the exact resolution, each wheel with its sha256, is what pip installs from (its
requirements.txt), the build log shows and the kernelspec records.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol

from kbundle.errors import KbundleError
from kbundle.pipplatform import (
    PLATFORM,
    error_line,
    explain_no_wheel,
    failure_cause,
    python_refusals,
    target_args,
    target_gaps,
    target_tags,
    target_words,
)
from kbundle.specs import PipIndexes

if TYPE_CHECKING:
    from kbundle.specs import PipPin


class WheelBuilder(Protocol):
    """Builds a VCS or sdist requirement into a wheel (image/sourcebuild.py): its path and source."""

    def build(self, pin: PipPin, python: str, indexes: PipIndexes, glibc: str | None) -> tuple[Path, str]: ...


@dataclass(frozen=True)
class WheelSet:
    pins: tuple[PipPin, ...]  # what pip/requirements.txt lists: exact pins with their wheel's hash
    files: tuple[Path, ...]  # in the order of `pins`
    downloaded: int  # how many came from the network this time
    resolution: tuple[str, ...] = ()  # the exact resolution, one line per wheel (built ones name their source)


def cache_dir(python: str) -> Path:
    from kbundle.image.env import cache_root

    path = cache_root() / "wheels" / f"cp{python.replace('.', '')}-{PLATFORM}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    """A file's sha256, read once per run: a cached wheel is checked against its pin, then named
    in the resolution, and a 3 GB PyTorch set takes seconds to read."""
    info = path.stat()
    return _sha256_of(str(path), info.st_ino, info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256_of(path: str, _inode: int, _size: int, _mtime: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _matches_hash(path: Path, hashes: Sequence[str]) -> bool:
    wanted = {h.split(":", 1)[1].lower() for h in hashes if h.lower().startswith("sha256:")}
    return not wanted or sha256_file(path) in wanted


def find_cached(pin: PipPin, directory: Path, wanted_tags: set) -> Optional[Path]:
    """The cached wheel of an exact pin for one of `wanted_tags` (and of its recorded hash, when
    it has one); None when there is none (or the pin is not exact, so only pip can say which
    file it means)."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename
    from packaging.version import InvalidVersion, Version

    if not pin.exact:
        return None
    try:
        version = Version(pin.version)
    except InvalidVersion:  # `===` pins any string; pip alone can match it
        return None
    for path in sorted(directory.glob("*.whl")):
        try:
            wname, wversion, _build, wtags = parse_wheel_filename(path.name)
        except (InvalidWheelFilename, ValueError):
            continue
        if wname == pin.name and wversion == version and wtags & wanted_tags and _matches_hash(path, pin.hashes):
            return path
    return None


def _run_pip(
    args: list[str],
    lines: Sequence[str],
    indexes: PipIndexes,
    what: str,
    target: tuple[str, str | None] | None = None,
    interpreter: Path | None = None,
) -> None:
    """`pip ARGS -r FILE` with the host's pip settings and the bundle's indexes; one error line.

    `target` (python, glibc): when pip finds no file of a requirement, ask which wheels it has, so
    that a glibc too old for them is said as such rather than in pip's words. `interpreter`: a
    pydists stand-in to run pip in (the conda side installed), instead of kbundle's own."""
    from kbundle.net import pip_environment
    from kbundle.pydists import pip_command

    with tempfile.TemporaryDirectory(prefix="kbundle-pipreq-") as tmp:
        reqs = Path(tmp) / "requirements.txt"
        # A file, not argv: a bundle's line can never become an option of this command.
        reqs.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        pip = pip_command(interpreter) if interpreter else [sys.executable, "-m", "pip"]
        command = [*pip, *args, "--disable-pip-version-check", "--no-input"]
        command += ["--progress-bar", "off", "-r", str(reqs)]
        env = indexes.environment(pip_environment())
        result = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        detail = error_line(result.stderr, result.returncode)
        cause = failure_cause(result.stderr, detail)
        refusal = cause or (explain_no_wheel(detail, *target, indexes) if target else None)
        if refusal:
            raise KbundleError(f"pip: {refusal}")
        raise KbundleError(
            f"cannot fetch the pip: wheels for {what}: {detail} (kbundle installs pip packages from wheels only)"
        )


def _pip_download(
    pins: Sequence[str], python: str, dest: Path, indexes: PipIndexes | None = None, glibc: str | None = None
) -> None:
    """Each line alone (`--no-deps`) as a wheel into `dest`."""
    args = ["download", "--no-deps", *target_args(python, glibc), "-d", str(dest)]
    _run_pip(args, pins, indexes or PipIndexes(), target_words(python, glibc), (python, glibc))


def _refused(text: str) -> KbundleError:
    return KbundleError(
        f"pip: {text!r} is not a requirement kbundle can install (an option, a local path, or several lines)"
    )


def parse_pins(pins: Sequence[str]) -> list[PipPin]:
    """The manifest's pip lines, read by pack's one pip parser. Every requirement form pip
    accepts is read; options (`--index-url`, `-r`: the bundle's indexes are `pip_indexes`),
    local paths and multi-line texts are refused, since lines reach pip and requirements.txt."""
    from kbundle.specs import parse_pip_line

    parsed = []
    for text in pins:
        try:
            pin = parse_pip_line(text)
        except KbundleError:
            pin = None
        if pin is None or pin.local:
            raise _refused(text)
        parsed.append(pin)
    return parsed


def _alone(pin: PipPin) -> bool:
    """Fetched by itself: an exact pin, or a wheel URL whose hash the bundle records."""
    return pin.exact or (pin.wheel_url and bool(pin.hashes))


def fetch(
    pins: Sequence[str],
    python: str,
    indexes: PipIndexes | None = None,
    glibc: str | None = None,
    builder: WheelBuilder | None = None,
    recorded: Sequence[str] | None = None,
    meter=None,
    locked: bool = True,
    conda_env: Path | None = None,
) -> WheelSet:
    """The bundle's pip: section as wheel files for the image, and its exact resolution.

    `conda_env`: the conda side, installed; pip's resolver takes its distributions as installed
    (kbundle/pydists.py), so it adds only what conda does not provide, as on the sender's machine.

    `locked`: pack locked the section (`pip_locked`), so its pins are the whole set, each
    fetched alone. Exact pins pack could not lock are only the sender's top level: pip's
    resolver then brings their dependencies.

    `recorded`: the resolution an earlier run of this bundle recorded (`recorded_resolution`);
    reused as it is when every file of it is in the cache for this target. `meter` (a
    progress.Meter) counts the files downloaded and their bytes."""
    if not pins:
        return WheelSet((), (), 0)
    parsed = parse_pins(pins)
    indexes = indexes or PipIndexes()
    if locked and all(_alone(p) for p in parsed):
        return _fetch_pins(parsed, python, indexes, glibc, meter)
    reused = _reuse(recorded, python, glibc) if recorded else None
    if reused is not None:
        return reused
    return _resolve_and_fetch(parsed, python, indexes, glibc, builder, meter, conda_env)


def fetch_early(
    pins: Sequence[str],
    python: Optional[str],
    indexes: PipIndexes | None,
    glibc: str | None,
    recorded: Sequence[str] | None,
    locked: bool,
):
    """`fetch` started now in a thread, while conda installs, when it needs nothing from the
    conda side: a locked section whose every line is fetched alone (no resolver, no build).
    A Future of the WheelSet, or None when the section must wait for the installed env."""
    from concurrent.futures import ThreadPoolExecutor

    if not pins or not python or not locked:
        return None
    try:
        if not all(_alone(p) for p in parse_pins(pins)):
            return None
    except KbundleError:
        return None  # the caller's own fetch says what is wrong, in order
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kbundle-wheels")
    future = pool.submit(fetch, pins, python, indexes, glibc, None, recorded, None, True)
    pool.shutdown(wait=False)
    return future


def _reuse(recorded: Sequence[str], python: str, glibc: str | None) -> Optional[WheelSet]:
    """The recorded resolution, when the cache holds each of its wheels for this target; else None."""
    from kbundle.specs import parse_pip_line

    wanted = target_tags(python, glibc)
    pins, files = [], []
    for line in recorded:
        text, _, source = line.partition("  # built from ")
        try:
            pin = parse_pip_line(text)
        except KbundleError:
            return None
        if pin is None or not pin.exact or not pin.hashes:
            return None
        found = _built_wheel(pin, wanted) if source else find_cached(pin, cache_dir(python), wanted)
        if found is None:
            return None
        pins.append(pin)
        files.append(found)
    return WheelSet(tuple(pins), tuple(files), 0, tuple(recorded))


def _built_wheel(pin: PipPin, wanted_tags: set) -> Optional[Path]:
    """A wheel ContainerBuilder built earlier, found by its hash (its folder is named after it)."""
    digest = pin.hashes[0].split(":", 1)[-1].lower()
    return find_cached(pin, cache_root_dir("built") / digest[:16], wanted_tags)


def _fetch_pins(parsed: list[PipPin], python: str, indexes: PipIndexes, glibc: str | None, meter=None) -> WheelSet:
    """Each pin as a wheel file in the shared cache; pip runs only for pins not cached yet."""
    directory = cache_dir(python)
    wanted = target_tags(python, glibc)
    missing = [p for p in parsed if find_cached(p, directory, wanted) is None]
    if missing:
        # Hashed lines go together (pip checks every hash), unhashed ones apart.
        with tempfile.TemporaryDirectory(prefix="kbundle-resolve-") as tmp:
            chosen = []
            for i, group in enumerate(([p for p in missing if p.hashes], [p for p in missing if not p.hashes])):
                if group:
                    chosen += _resolve([p.text for p in group], python, indexes, glibc, Path(tmp) / str(i), True)
        _fetch_chosen(chosen, directory, python, indexes, glibc, meter)
    files = []
    for pin in parsed:
        found = find_cached(pin, directory, wanted) if pin.exact else _url_wheel(pin, directory)
        if found is None:
            raise KbundleError(f"pip: no wheel of {pin.text!r} for {target_words(python, glibc)} came back from pip")
        files.append(found)
    exact = [_exact_line(path) for path in files]
    return WheelSet(tuple(p for p, _ in exact), tuple(files), len(missing), tuple(line for _, line in exact))


def _url_wheel(pin: PipPin, directory: Path) -> Optional[Path]:
    from kbundle.specs import url_filename

    path = directory / url_filename(pin.url)
    return path if path.is_file() and _matches_hash(path, pin.hashes) else None


def _exact_line(path: Path, source: str | None = None) -> tuple[PipPin, str]:
    """The exact pin of a wheel file, with its sha256; and its resolution line (naming a built wheel's source)."""
    from packaging.utils import parse_wheel_filename

    from kbundle.specs import parse_pip_line

    name, version, _build, _tags = parse_wheel_filename(path.name)
    pin = parse_pip_line(f"{name}=={version} --hash=sha256:{sha256_file(path)}")
    return pin, pin.text + (f"  # built from {source}" if source else "")


GAP_ROUNDS = 4  # marker-only requirements pip skipped pull in their own: a few rounds close it


def _resolve(
    lines: Sequence[str],
    python: str,
    indexes: PipIndexes,
    glibc: str | None,
    tmp: Path,
    no_deps: bool,
    conda_env: Path | None = None,
) -> list:
    """What pip's resolver chooses for `lines` on the image (pipreport.Chosen), fetching only metadata
    where the index serves it apart from the wheel. `conda_env`: the installed conda side, whose
    distributions pip takes as installed, as it did on the sender's machine."""
    from kbundle import pydists
    from kbundle.image import pipreport

    tmp.mkdir(parents=True, exist_ok=True)
    report = tmp / "report.json"
    provided = pydists.from_site_packages(conda_env) if conda_env else ()
    installed = pydists.installed_site(provided, tmp) if conda_env else None
    args = pipreport.report_args(report, no_deps, installed is not None) + target_args(python, glibc)
    lines = list(lines)
    for _ in range(GAP_ROUNDS):
        _run_pip(args, lines, indexes, target_words(python, glibc), (python, glibc), installed)
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise KbundleError("pip wrote no report of its resolution (kbundle needs pip 25.1 or newer)") from None
        # pip judges markers by the host's Python: what the image's needs and pip skipped goes back to it.
        gaps = [] if no_deps else target_gaps(data, python, [p.name for p in provided])
        if not gaps:
            break
        lines += gaps
    refused = python_refusals(data, python)
    if refused:
        raise KbundleError(f"pip: {refused[0]}")
    return sorted(pipreport.parse(data), key=lambda c: c.filename)


def _fetch_chosen(
    chosen: Sequence, directory: Path, python: str, indexes: PipIndexes, glibc: str | None, meter=None
) -> int:
    """Every chosen file into the cache (image/download.py); how many were downloaded."""
    from kbundle.image import download, pipreport

    wanted = [w for w in pipreport.wanted(chosen, directory, indexes) if not w.dest.exists()]
    try:
        download.fetch_all(wanted, meter)
    except download.Refused:
        # The index wants credentials that pip has (its configuration, a keyring) and kbundle
        # does not: pip fetches what is still missing, one file after the other.
        left = [c for c in chosen if not (directory / c.filename).exists()]
        with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as tmp:
            for group in ([c for c in left if c.sha256], [c for c in left if not c.sha256]):
                if group:
                    _pip_download([c.line for c in group], python, Path(tmp), indexes, glibc)
            for path in Path(tmp).glob("*.whl"):
                os.replace(path, directory / path.name)
    return len(wanted)


def _resolve_and_fetch(
    parsed: list[PipPin],
    python: str,
    indexes: PipIndexes,
    glibc: str | None,
    builder: WheelBuilder | None,
    meter=None,
    conda_env: Path | None = None,
) -> WheelSet:
    """pip's resolver over the whole section, for the image, with the conda side (`conda_env`)
    installed; VCS and sdist lines built first."""
    from packaging.utils import parse_wheel_filename

    directory = cache_dir(python)
    built: dict[str, tuple[Path, str]] = {}  # wheel file name -> (file, source)
    lines = []
    for pin in parsed:
        if pin.vcs or (pin.url and not pin.wheel_url):
            if builder is None:
                raise KbundleError(f"pip: {pin.text} must be built into a wheel, and no container builder is set up")
            wheel, source = builder.build(pin, python, indexes, glibc)
            built[wheel.name] = (wheel, source)
            lines.append(str(wheel))
        else:
            lines.append(pin.spec or pin.text)  # hashes are checked below: pip would want one for every line
    with tempfile.TemporaryDirectory(prefix="kbundle-resolve-") as tmp:
        chosen = _resolve(lines, python, indexes, glibc, Path(tmp), False, conda_env)
    fetched = _fetch_chosen([c for c in chosen if c.filename not in built], directory, python, indexes, glibc, meter)
    files, resolution, kept = [], [], []
    for item in chosen:
        if item.filename in built:
            wheel, source = built[item.filename]
            files.append(wheel)
            pin, line = _exact_line(wheel, source)
        else:
            files.append(directory / item.filename)
            pin, line = _exact_line(directory / item.filename)
        kept.append(pin)
        resolution.append(line)
    for wheel, source in built.values():
        if wheel not in files:  # a built wheel pip did not report (it should): installed all the same
            files.append(wheel)
            pin, line = _exact_line(wheel, source)
            kept.append(pin)
            resolution.append(line)
    by_name = {parse_wheel_filename(f.name)[0]: f for f in files}
    for pin in parsed:
        if pin.hashes and pin.name in by_name and not _matches_hash(by_name[pin.name], pin.hashes):
            raise KbundleError(f"pip: the wheel pip chose for {pin.name} does not match the bundle's hash")
    return WheelSet(tuple(kept), tuple(files), fetched, tuple(resolution))


def cache_root_dir(name: str) -> Path:
    from kbundle.image.env import cache_root

    path = cache_root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def pth_files(files: Sequence[Path]) -> list[tuple[str, str]]:
    """(wheel file name, .pth file) for every `.pth` file a wheel installs into site-packages, read
    from the wheels' file lists before anything is installed. Python runs the lines of such a
    file that start with `import` at every interpreter start."""
    import zipfile

    found = []
    for path in files:
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (OSError, zipfile.BadZipFile):
            raise KbundleError(f"pip: {path.name} is not a readable wheel") from None
        for name in names:
            parts = name.split("/")
            in_site = len(parts) == 1 or (
                len(parts) == 3 and parts[0].endswith(".data") and parts[1] in ("purelib", "platlib")
            )
            if in_site and parts[-1].endswith(".pth"):
                found.append((path.name, parts[-1]))
    return found


def resolution_record(bundle_hash: str) -> Path:
    """Where the last build of a bundle recorded its exact pip resolution (for warm runs)."""
    return cache_root_dir("pip-resolved") / f"{bundle_hash[:32]}.json"


def remember_resolution(bundle_hash: str, lines: Sequence[str]) -> None:
    from kbundle.atomic import write_atomic

    write_atomic(resolution_record(bundle_hash), json.dumps(list(lines)))


def recorded_resolution(bundle_hash: str) -> list[str] | None:
    try:
        data = json.loads(resolution_record(bundle_hash).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return [str(x) for x in data] if isinstance(data, list) else None


def glibc_of(virtual_packages) -> str | None:
    """`2.36` from the image's virtual packages (`__glibc=2.36`), or None."""
    found = next((v for v in virtual_packages or () if str(v).startswith("__glibc=")), None)
    return found.split("=", 1)[1].split("=")[0] if found else None
