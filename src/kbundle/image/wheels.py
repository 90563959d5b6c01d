"""The bundle's `pip:` section, fetched as wheels on the host for the image's platform and Python.

They are then installed into the environment with `--no-index --no-deps` in a container
without network (image/pipinstall.py): nothing is downloaded there, where proxies and
intercepting CAs break things. The host's pip runs with the user's own pip configuration,
proxy variables and CA settings, plus the bundle's indexes (`pip_indexes`, passed as PIP_*
variables, never in argv). pip's resolver decides which files (`pip install --dry-run
--report`, image/pipreport.py); kbundle downloads them, several at a time and resumably, into
a cache per target (Python, platform), each checked against its sha256 (image/download.py).

The cache is shared by every bundle, strangers' included, so nothing in it is found by file
name alone (a hostile index can serve its own `kbdemo-1.0-py3-none-any.whl`):

* `sha256/<hex>/<wheel>`: every wheel, stored by its content's sha256 and checked against it
  each time it is served; a damaged one is removed and fetched again;
* `index-<key>/<wheel>.sha256`: which content a set of indexes (`index_key`: the bundle's
  and the user's index URLs) served under that name. Only a pin without a hash reads these,
  and only those of its own indexes: another bundle's index never answers for it;
* the resolution pip made for a section (`resolution_record`) is keyed by everything that
  decides it (`resolution_key`: the lines, the indexes, Python, the platform, the conda side).

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

from kbundle import children
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
    wanted = _sha256s(hashes)
    return not wanted or sha256_file(path) in wanted


def _sha256s(hashes: Sequence[str]) -> list[str]:
    """The hex digests of a pin's `sha256:` hashes (others pip checks itself), hex only: each names a folder."""
    found = [h.split(":", 1)[1].lower() for h in hashes if h.lower().startswith("sha256:")]
    return [h for h in found if h and all(c in "0123456789abcdef" for c in h)]


def stored(directory: Path, sha256: str, filename: str) -> Path:
    """Where the wheel `filename` of this content lives in the cache of one target."""
    from kbundle.specs import safe_filename

    return directory / "sha256" / sha256.lower() / safe_filename(filename, "a wheel's name")


def intact(path: Path, *sha256: str) -> bool:
    """Whether `path` is a regular file of that content (one of them); a damaged one is removed,
    so that it is fetched (or built) again rather than failing every later run."""
    if path.is_symlink() or not path.is_file():
        return False
    if sha256_file(path) in {h.lower() for h in sha256}:
        return True
    from kbundle.image import healing

    healing.note(f"wheel {path.name} in kbundle's cache failed its sha256: removed, fetched or built again")
    path.unlink(missing_ok=True)
    return False


def index_key(indexes: PipIndexes, environ=None) -> str:
    """The indexes a wheel without a known hash came from: the bundle's and the user's index URLs
    (credentials removed), as a folder name. Two bundles share such wheels only when they ask the same indexes."""
    from kbundle.image.pipreport import index_urls
    from kbundle.specs import strip_credentials

    urls = [strip_credentials(u)[0] for u in index_urls(indexes, environ)]
    return hashlib.sha256(json.dumps(urls).encode()).hexdigest()[:24]


def _wheel_matcher(pin: PipPin, wanted_tags: set):
    """A test of wheel file names: this pin's name and exact version, one of the target's tags.
    None when the pin is not exact (only pip can say which file it means)."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename
    from packaging.version import InvalidVersion, Version

    if not pin.exact:
        return None
    try:
        version = Version(pin.version)
    except InvalidVersion:  # `===` pins any string; pip alone can match it
        return None

    def matches(filename: str) -> bool:
        try:
            wname, wversion, _build, wtags = parse_wheel_filename(filename)
        except (InvalidWheelFilename, ValueError):
            return False
        return wname == pin.name and wversion == version and bool(wtags & wanted_tags)

    return matches


def find_cached(pin: PipPin, directory: Path, wanted_tags: set, index: str | None = None) -> Optional[Path]:
    """The cached wheel of an exact pin for one of `wanted_tags`, checked: by the pin's hash when
    it has one (any bundle's download of that content will do), else only what the indexes
    `index` (`index_key`) served under its name. None when there is none."""
    matches = _wheel_matcher(pin, wanted_tags)
    if matches is None:
        return None
    if pin.hashes:
        for sha in _sha256s(pin.hashes):
            for path in sorted((directory / "sha256" / sha).glob("*.whl")):
                if matches(path.name) and intact(path, sha):
                    return path
        return _adopt(directory, matches, _sha256s(pin.hashes))
    return _served(directory, index, matches) if index else None


def _served(directory: Path, index: str, matches) -> Optional[Path]:
    """A wheel these indexes served under a matching name, found through their record of its content."""
    for record in sorted((directory / f"index-{index}").glob("*.whl.sha256")):
        filename = record.name.removesuffix(".sha256")
        if not matches(filename):
            continue
        try:
            sha = record.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        for hexdigest in _sha256s([f"sha256:{sha}"]):
            path = stored(directory, hexdigest, filename)
            if intact(path, hexdigest):
                return path
    return None


def _adopt(directory: Path, matches, hashes: Sequence[str]) -> Optional[Path]:
    """A wheel an earlier kbundle kept under its bare name (`<target>/<wheel>`), moved into the
    store when its content is the pin's hash; never served by name alone."""
    for path in sorted(directory.glob("*.whl")):
        if matches(path.name) and not path.is_symlink() and path.is_file() and sha256_file(path) in hashes:
            dest = stored(directory, sha256_file(path), path.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            return dest
    return None


def _in_folder(pin: PipPin, folder: Path, wanted_tags: set) -> Optional[Path]:
    """A hashed pin's wheel in a folder of its own (a built wheel's), checked against that hash."""
    matches = _wheel_matcher(pin, wanted_tags)
    hashes = _sha256s(pin.hashes)
    if matches is None or not hashes:
        return None
    for path in sorted(folder.glob("*.whl")):
        if matches(path.name) and intact(path, *hashes):
            return path
    return None


def _remember_served(directory: Path, index: str, filename: str, sha256: str) -> None:
    """What these indexes served under `filename`: the next unhashed pin of the same indexes finds it."""
    from kbundle.atomic import write_atomic

    folder = directory / f"index-{index}"
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{filename}.sha256", sha256)


def _run_pip(
    args: list[str],
    lines: Sequence[str],
    indexes: PipIndexes,
    what: str,
    target: tuple[str, str | None] | None = None,
    interpreter: Path | None = None,
    *,
    meter=None,
    doing: str = "resolving",
    keep: Path | None = None,
) -> None:
    """`pip ARGS -r FILE` with the host's pip settings and the bundle's indexes; one error line.

    `target` (python, glibc): when pip finds no file of a requirement, ask which wheels it has, so
    that a glibc too old for them is said as such rather than in pip's words. `interpreter`: a
    pydists stand-in to run pip in (the conda side installed), instead of kbundle's own.

    pip runs as a child that dies with kbundle (children.py), with kbundle's short read
    timeout (a stalled index fails in a minute, not in six), and while it runs `meter` is told
    every second "still DOING with pip (N s): what pip is at, from which host" (a plain console
    prints one such line every 5 s). `keep`: pip's temporary folder, where the wheels pip
    downloads to read their metadata (an index without PEP 658) stay for kbundle (`_adopt_from_pip`)."""
    from kbundle.image.download import ATTEMPTS, READ_TIMEOUT
    from kbundle.net import pip_environment
    from kbundle.pydists import pip_command

    with tempfile.TemporaryDirectory(prefix="kbundle-pipreq-") as tmp:
        reqs = Path(tmp) / "requirements.txt"
        # A file, not argv: a bundle's line can never become an option of this command.
        reqs.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        pip = pip_command(interpreter) if interpreter else [sys.executable, "-m", "pip"]
        pip = [pip[0], "-c", _PIP_KEEPING_DOWNLOADS] if pip[1:] == ["-m", "pip"] else pip
        command = [*pip, *args, "--disable-pip-version-check", "--no-input"]
        command += ["--timeout", str(READ_TIMEOUT), "--retries", str(ATTEMPTS - 1)]
        command += ["-vv"]  # on stdout, which page or file pip waits for, and a page it gave up on
        command += ["--progress-bar", "off", "-r", str(reqs)]
        env = indexes.environment(pip_environment())
        env["PYTHONUNBUFFERED"] = "1"  # its lines as they come: they say what it is at
        if keep is not None:
            env["TMPDIR"] = str(keep)
        for attempt in range(1, ATTEMPTS + 1):
            code, stderr, watch = _watch_pip(command, env, meter, doing)
            stalled = _pip_stall(stderr, watch) if code != 0 else None
            if not stalled or attempt == ATTEMPTS:
                break
            # pip skips a page that sent nothing in time, and finds no version: a stalled index,
            # not a missing package. Run it again, as a download is tried again.
            if meter is not None:
                meter.tell(f"pip: {stalled}; trying again (attempt {attempt + 1} of {ATTEMPTS})")
    if code != 0:
        if stalled:
            # exit 1, not 4: this machine is fine, and the index may answer later
            raise KbundleError(f"pip: {stalled}, {ATTEMPTS} times (the index stalls; run again later, or use another)")
        detail = error_line(stderr, code)
        cause = failure_cause(stderr, detail)
        refusal = cause or (_explain(detail, target, indexes, meter) if target else None)
        if refusal:
            raise KbundleError(f"pip: {refusal}")
        raise KbundleError(
            f"cannot fetch the pip: wheels for {what}: {detail} (kbundle installs pip packages from wheels only)"
        )


def _explain(detail: str, target: tuple[str, str | None], indexes: PipIndexes, meter) -> str | None:
    """pipplatform.explain_no_wheel (it asks the index again, with `pip index`), with a line every few seconds."""
    import time

    from kbundle.progress import Heartbeat

    started = time.monotonic()

    def tick() -> None:
        if meter is not None:
            meter.tell(f"still asking the index which wheels it has ({time.monotonic() - started:.0f} s)")

    with Heartbeat(tick):
        return explain_no_wheel(detail, *target, indexes)


# pip, with the folders it downloads wheels into to read their metadata kept (pip deletes them at
# exit): kbundle stores those files rather than download them again. pip's internals: when they
# change, nothing is kept and kbundle downloads the files itself, as before.
_PIP_KEEPING_DOWNLOADS = (
    "import runpy, sys\n"
    "try:\n"
    "    from pip._internal.utils import temp_dir as _t\n"
    "    _get = _t.TempDirectoryTypeRegistry.get_delete\n"
    "    _t.TempDirectoryTypeRegistry.get_delete = lambda self, kind: kind != 'unpack' and _get(self, kind)\n"
    "except Exception:\n"
    "    pass\n"
    "runpy.run_module('pip', run_name='__main__', alter_sys=True)\n"
)


class _PipWatch:
    """What pip says it is at (its `Collecting`, `Downloading` and `Looking in` lines), for the
    progress line and for the error when a host stalls."""

    def __init__(self, env: dict[str, str]):
        from kbundle.image.download import host_of

        urls = [u for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS") for u in env.get(k, "").split()]
        self.hosts = sorted({host_of(u) for u in urls if u.startswith(("http://", "https://"))})
        self.at = ""
        self.host = ""
        self.stalls: list[tuple[str, str]] = []  # (host, page) pip gave up on: it sent nothing in time

    def read(self, line: str) -> None:
        from kbundle.display import safe
        from kbundle.image.download import host_of

        text = line.strip()
        if text.startswith(("Looking in indexes:", "Looking in links:")):
            urls = [u.strip() for u in text.split(":", 1)[1].split(",")]
            self.hosts = sorted({*self.hosts, *(host_of(u) for u in urls if u.startswith(("http://", "https://")))})
        elif text.startswith("Collecting "):
            self.at, self.host = safe(text[len("Collecting ") :][:120]), ""
        elif text.startswith(("Downloading ", "Getting page ")):
            url = text.split()[-1] if text.startswith("Getting page ") else (text.split()[1:] or [""])[0]
            kind = "the page " if text.startswith("Getting page ") else ""
            self.at, self.host = kind + safe(_bare(url)[:160]), host_of(url)
        elif text.startswith("Could not fetch URL ") and ("didn't respond" in text or "timed out" in text):
            url = text[len("Could not fetch URL ") :].split(": ", 1)[0]
            self.stalls.append((host_of(url), safe(_bare(url)[:160])))

    def where(self) -> str:
        if self.host:
            return self.host
        return ", ".join(self.hosts[:3]) if self.hosts else "pip's configured index"

    def line(self, doing: str, seconds: float) -> str:
        at = f"{self.at} from {self.where()}" if self.at else f"waiting for {self.where()}"
        return f"still {doing} with pip ({seconds:.0f} s): {at}"


def _watch_pip(command: list[str], env: dict[str, str], meter, doing: str) -> tuple[int, str, _PipWatch]:
    """pip run to its end (exit code, stderr), its output read as it comes; killed if kbundle stops first."""
    import threading
    import time

    from kbundle.progress import Heartbeat

    watch = _PipWatch(env)
    errors: list[str] = []
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=env,
        preexec_fn=children.die_with_kbundle(),
    )

    def drain(stream, keep: list[str] | None) -> None:
        for line in stream:
            watch.read(line)
            if keep is not None:
                keep.append(line)

    readers = [
        threading.Thread(target=drain, args=(proc.stdout, None), daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, errors), daemon=True),
    ]
    for reader in readers:
        reader.start()
    started = time.monotonic()
    tick = (lambda: meter.tell(watch.line(doing, time.monotonic() - started))) if meter is not None else (lambda: None)
    try:
        with Heartbeat(tick):
            code = proc.wait()
    finally:
        if proc.poll() is None:  # kbundle stops (Ctrl-C, an error): pip stops with it
            proc.kill()
            proc.wait()
    for reader in readers:
        reader.join(timeout=5)
    return code, "".join(errors), watch


def _pip_stall(stderr: str, watch: _PipWatch) -> str | None:
    """A pip failure that is a stalled host, in one line naming it and what pip waited for; else None.
    pip skips a page that times out and then finds no version: that is said as the stall it is."""
    import re

    from kbundle.image.download import READ_TIMEOUT

    if watch.stalls:
        host, page = watch.stalls[0]
        what = f"of {page}"
    elif "timed out" in stderr.lower():
        found = re.search(r"host='([^']+)', port=(\d+)\): Read timed out", stderr)
        host = f"{found.group(1)}:{found.group(2)}" if found else watch.where()
        what = f"while pip was at {watch.at}" if watch.at else "to pip"
    else:
        return None
    return f"{host} sent nothing {what} for {READ_TIMEOUT} s"


def _bare(url: str) -> str:
    """A URL as a message shows it: without credentials."""
    from kbundle.specs import strip_credentials

    return strip_credentials(url)[0]


def _pip_download(
    pins: Sequence[str], python: str, dest: Path, indexes: PipIndexes | None = None, glibc: str | None = None
) -> None:
    """Each line alone (`--no-deps`) as a wheel into `dest`."""
    args = ["download", "--no-deps", *target_args(python, glibc), "-d", str(dest)]
    _run_pip(args, pins, indexes or PipIndexes(), target_words(python, glibc), (python, glibc))


def _refused(text: str) -> KbundleError:
    from kbundle.display import safe
    from kbundle.errors import UnsafeName

    return UnsafeName(
        f"pip: {safe(text)!r} is not a requirement kbundle can install (an option, a local path, or several lines)"
    )


def parse_pins(pins: Sequence[str]) -> list[PipPin]:
    """The manifest's pip lines, read by pack's one pip parser. Every requirement form pip
    accepts is read; options (`--index-url`, `-r`: the bundle's indexes are `pip_indexes`),
    local paths and multi-line texts are refused, since lines reach pip and requirements.txt;
    so is a URL that is not http(s) or climbs with `..` (`specs.bundle_url`). Each refusal is
    the bundle's fault: exit 3."""
    from kbundle.specs import bundle_url, parse_pip_line

    parsed = []
    for text in pins:
        try:
            pin = parse_pip_line(text)
        except KbundleError:
            pin = None
        if pin is None or pin.local:
            raise _refused(text)
        if pin.url:
            bundle_url(pin.url)
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

    A resolution pip made earlier for the very same inputs (`resolution_key`) is reused as it is
    when every file of it is in the cache for this target. `recorded` (a bundle's record, keyed
    by its content hash alone) is not trusted for that: another bundle with the same members and
    other indexes shares its hash. `meter` (a progress.Meter) counts the files downloaded and their bytes."""
    del recorded  # kept for the flows' calls; see above
    if not pins:
        return WheelSet((), (), 0)
    parsed = parse_pins(pins)
    indexes = indexes or PipIndexes()
    if locked and all(_alone(p) for p in parsed):
        return _fetch_pins(parsed, python, indexes, glibc, meter)
    key = resolution_key(pins, python, indexes, glibc, conda_env)
    found = _recorded(key)
    reused = _reuse(found, python, glibc) if found else None
    if reused is not None:
        return reused
    fetched = _resolve_and_fetch(parsed, python, indexes, glibc, builder, meter, conda_env)
    _remember(key, fetched.resolution)
    return fetched


def fetch_early(
    pins: Sequence[str],
    python: Optional[str],
    indexes: PipIndexes | None,
    glibc: str | None,
    recorded: Sequence[str] | None,
    locked: bool,
    meter=None,
):
    """`fetch` started now in a thread, while conda installs, when it needs nothing from the
    conda side: a locked section whose every line is fetched alone (no resolver, no build).
    A Future of the WheelSet, or None when the section must wait for the installed env.
    `meter` counts its downloads (the caller shows it once conda is done)."""
    from concurrent.futures import ThreadPoolExecutor

    if not pins or not python or not locked:
        return None
    try:
        if not all(_alone(p) for p in parse_pins(pins)):
            return None
    except KbundleError:
        return None  # the caller's own fetch says what is wrong, in order
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kbundle-wheels")
    future = pool.submit(fetch, pins, python, indexes, glibc, None, recorded, meter, True)
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
        # A recorded line always has its hash, so it is served by content, never by name.
        if found is None:
            return None
        pins.append(pin)
        files.append(found)
    return WheelSet(tuple(pins), tuple(files), 0, tuple(recorded))


def cached_unread(lines: Sequence[str], python: str, glibc: str | None) -> Optional[list[Path]]:
    """The cached wheel of each hashed exact line, found in its hash's folder without reading it
    through (image/partial.py reads only its metadata, whose zip CRCs it checks); None when any
    line is not such a pin or its wheel is not in the cache."""
    from kbundle.specs import parse_pip_line

    wanted = target_tags(python, glibc)
    directory = cache_dir(python)
    found = []
    for line in lines:
        try:
            pin = parse_pip_line(line)
        except KbundleError:
            return None
        matches = _wheel_matcher(pin, wanted) if pin is not None and pin.exact else None
        shas = _sha256s(pin.hashes) if pin is not None else []
        if matches is None or len(shas) != 1:
            return None
        paths = [p for p in sorted((directory / "sha256" / shas[0]).glob("*.whl")) if matches(p.name)]
        if not paths or paths[0].is_symlink() or not paths[0].is_file():
            return None
        found.append(paths[0])
    return found


def _built_wheel(pin: PipPin, wanted_tags: set) -> Optional[Path]:
    """A wheel ContainerBuilder built earlier, found by its hash (its folder is named after it)."""
    digest = (_sha256s(pin.hashes) or [""])[0]
    return _in_folder(pin, cache_root_dir("built") / digest[:16], wanted_tags) if digest else None


def _fetch_pins(parsed: list[PipPin], python: str, indexes: PipIndexes, glibc: str | None, meter=None) -> WheelSet:
    """Each pin as a wheel file in the shared cache; pip runs only for pins not cached yet."""
    directory = cache_dir(python)
    wanted = target_tags(python, glibc)
    index = index_key(indexes)
    missing = [p for p in parsed if _cached_pin(p, directory, wanted, index) is None]
    if missing:
        # A hashed line's file is found on its index's page by its hash: no pip at all. Only the
        # rest goes to pip (`--no-deps`): hashed lines together (pip checks every hash), unhashed apart.
        chosen, left = _locate(missing, python, indexes, glibc, meter)
        with tempfile.TemporaryDirectory(prefix=".resolve-", dir=directory) as tmp:
            for i, group in enumerate(([p for p in left if p.hashes], [p for p in left if not p.hashes])):
                if group:
                    lines = [p.text for p in group]
                    chosen += _resolve(lines, python, indexes, glibc, Path(tmp) / str(i), True, meter=meter)
            _fetch_chosen(chosen, directory, python, indexes, glibc, meter, Path(tmp))
    files = []
    for pin in parsed:
        found = _cached_pin(pin, directory, wanted, index)
        if found is None:
            raise KbundleError(f"pip: no wheel of {pin.text!r} for {target_words(python, glibc)} came back from pip")
        files.append(found)
    exact = [_exact_line(path) for path in files]
    return WheelSet(tuple(p for p, _ in exact), tuple(files), len(missing), tuple(line for _, line in exact))


def _cached_pin(pin: PipPin, directory: Path, wanted: set, index: str) -> Optional[Path]:
    """An exact pin's wheel (by hash, or as its indexes served it), or a hashed wheel URL's, from the cache."""
    return find_cached(pin, directory, wanted, index) if pin.exact else _url_wheel(pin, directory)


def _url_wheel(pin: PipPin, directory: Path) -> Optional[Path]:
    """A wheel URL's file, found by the bundle's hash of it (`_alone`: it has one)."""
    from kbundle.specs import url_filename

    name = url_filename(pin.url)
    for sha in _sha256s(pin.hashes):
        if intact(stored(directory, sha, name), sha):
            return stored(directory, sha, name)
    return None


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
    meter=None,
) -> list:
    """What pip's resolver chooses for `lines` on the image (pipreport.Chosen), fetching only metadata
    where the index serves it apart from the wheel. `conda_env`: the installed conda side, whose
    distributions pip takes as installed, as it did on the sender's machine.

    A wheel pip had to download whole to read its metadata (an index without PEP 658) stays in
    `tmp/pip-tmp` (`_run_pip`'s `keep`), where `_fetch_chosen` takes it rather than download it again."""
    from kbundle import pydists
    from kbundle.image import pipreport

    tmp.mkdir(parents=True, exist_ok=True)
    keep = tmp / "pip-tmp"
    keep.mkdir(exist_ok=True)
    report = tmp / "report.json"
    provided = pydists.from_site_packages(conda_env) if conda_env else ()
    installed = pydists.installed_site(provided, tmp) if conda_env else None
    args = pipreport.report_args(report, no_deps, installed is not None) + target_args(python, glibc)
    lines = list(lines)
    for _ in range(GAP_ROUNDS):
        words = target_words(python, glibc)
        _run_pip(args, lines, indexes, words, (python, glibc), installed, meter=meter, keep=keep)
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
    chosen: Sequence,
    directory: Path,
    python: str,
    indexes: PipIndexes,
    glibc: str | None,
    meter=None,
    pip_tmp: Path | None = None,
) -> tuple[dict[str, Path], int]:
    """Every chosen file into the cache (image/download.py), stored by its content: {file name: path},
    and how many came from the network this run. A file whose index gave no hash is fetched into
    its indexes' own folder, then stored by the sha256 it turned out to have. A file pip already
    downloaded while it resolved (below `pip_tmp`) is taken from there: never downloaded twice."""
    from kbundle.image import download, pipreport

    index = index_key(indexes)
    places: dict[str, Path] = {}
    for item in chosen:
        path = stored(directory, item.sha256, item.filename) if item.sha256 else None
        if path is not None and intact(path, item.sha256):
            places[item.filename] = path
    adopted = _adopt_from_pip([c for c in chosen if c.filename not in places], pip_tmp, directory, meter)
    places.update(adopted)
    todo = [c for c in chosen if c.filename not in places]
    unhashed = directory / f"index-{index}" / "downloads"

    def place(item) -> Path:
        return stored(directory, item.sha256, item.filename) if item.sha256 else unhashed / item.filename

    try:
        download.fetch_all(pipreport.wanted(todo, directory, indexes, place=place), meter)
        for item in todo:
            places[item.filename] = _keep(directory, place(item), item)
    except download.Refused:
        # The index wants credentials that pip has (its configuration, a keyring) and kbundle
        # does not: pip fetches what is still missing, one file after the other.
        left = [c for c in todo if not place(c).is_file()]
        with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as tmp:
            arrived = _pip_fetch(left, Path(tmp), python, indexes, glibc)
            for item in todo:
                places[item.filename] = _keep(directory, arrived.get(item.filename) or place(item), item)
    for item in chosen:
        _remember_served(directory, index, item.filename, sha256_file(places[item.filename]))
    return places, len(todo) + len(adopted)


def _adopt_from_pip(chosen: Sequence, pip_tmp: Path | None, directory: Path, meter=None) -> dict[str, Path]:
    """The chosen files pip downloaded whole while it resolved (its `pip-unpack-*` folders, kept
    by `_PIP_KEEPING_DOWNLOADS`), moved into the store by their content: {file name: path}. A file
    whose content is not the hash its index gave is left there (kbundle downloads that one)."""
    if pip_tmp is None or not chosen:
        return {}
    arrived: dict[str, Path] = {}
    for folder in sorted(pip_tmp.rglob("pip-unpack-*")):
        for path in folder.glob("*.whl"):
            if not path.is_symlink() and path.is_file():
                arrived.setdefault(path.name, path)
    adopted = {}
    for item in chosen:
        path = arrived.get(item.filename)
        if path is None:
            continue
        sha = sha256_file(path)
        if item.sha256 and sha != item.sha256:
            continue
        dest = stored(directory, sha, item.filename)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        adopted[item.filename] = dest
        if meter is not None:
            meter.add_bytes(dest.stat().st_size)
    return adopted


def _locate(pins: Sequence[PipPin], python: str, indexes: PipIndexes, glibc: str | None, meter=None):
    """(pipreport.Chosen for each pin whose file is known without pip, the pins left for pip).

    A hashed wheel URL names its file. A hashed exact pin (`name==version --hash=sha256:…`, as
    pack locks them) names its content: its file is the one of its project's page, on one of the
    indexes pip would read, that carries that sha256 and fits the image. No resolver runs, and
    no wheel is downloaded to read metadata that a lock already settled."""
    from kbundle.image.pipreport import Chosen
    from kbundle.progress import Heartbeat

    found, left, todo = [], [], []
    for pin in pins:
        if pin.url and pin.wheel_url and pin.hashes:
            found.append(Chosen(pin.name, _url_version(pin), pin.url, _sha256s(pin.hashes)[0]))
        elif pin.exact and _sha256s(pin.hashes) and not pin.url:
            todo.append(pin)
        else:
            left.append(pin)
    if not todo:
        return found, left
    places = _lookup_places(indexes)
    if not places:
        return found, left + todo
    from kbundle.image import download

    http, pages = download.session(), {}
    with Heartbeat(meter.pulse) if meter is not None else _nothing():
        for pin in todo:
            chosen = _locate_one(http, pin, places, target_tags(python, glibc), pages, meter)
            (found if chosen else left).append(chosen or pin)
    return found, left


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def _url_version(pin: PipPin) -> str:
    from packaging.utils import parse_wheel_filename

    from kbundle.specs import url_filename

    return str(parse_wheel_filename(url_filename(pin.url))[1])


def _locate_one(http, pin: PipPin, places: list[tuple[str, bool]], wanted_tags: set, pages: dict, meter):
    """The Chosen file of one hashed exact pin on the first index page that lists it, or None."""
    from packaging.utils import canonicalize_name

    from kbundle.image import download
    from kbundle.image.pipreport import Chosen

    matches = _wheel_matcher(pin, wanted_tags)
    hashes = set(_sha256s(pin.hashes))
    if matches is None:
        return None
    for base, is_index in places:
        bare, auth = download.split_auth(base)
        url = f"{bare.rstrip('/')}/{canonicalize_name(pin.name)}/" if is_index else bare
        host = download.host_of(url)
        if url not in pages and host not in pages:
            try:
                text = download.fetch_text(http, url, f"the list of {pin.name}'s files", auth, meter)
            except download.Refused:
                text = None  # pip, with the user's own credentials, may be let in
            except KbundleError:
                pages[host] = []  # a host that does not answer is asked no more: pip has the last word
                text = None
            pages[url] = _page_links(text, url) if text else []
        for link, sha in pages.get(url, []):
            filename = _link_filename(link)
            if sha in hashes and filename and matches(filename):
                return Chosen(pin.name, pin.version, link, sha)
    return None


def _link_filename(link: str) -> str | None:
    from kbundle.specs import url_filename

    try:
        return url_filename(link)
    except KbundleError:
        return None


def _page_links(text: str, page: str) -> list[tuple[str, str]]:
    """(file URL, sha256) for each link of a PEP 503 page (or a find-links page) with a sha256 fragment."""
    from html.parser import HTMLParser
    from urllib.parse import urljoin, urlsplit

    found: list[tuple[str, str]] = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            href = dict(attrs).get("href") if tag == "a" else None
            if not href:
                return
            url, _, fragment = urljoin(page, href).partition("#")
            if fragment.startswith("sha256=") and urlsplit(url).scheme in ("http", "https"):
                found.append((url, fragment[len("sha256=") :].lower()))

    Links().feed(text)
    return found


def _lookup_places(indexes: PipIndexes) -> list[tuple[str, bool]]:
    """The http(s) pages pip would read, as (URL, is a simple index) in pip's order: the bundle's
    indexes, then the user's (PIP_* variables and pip's configuration, read by `pip config list`);
    PyPI when nothing names a main index. A pin not found on any is left to pip."""
    from kbundle.net import pip_environment

    config = _pip_config(indexes.environment(pip_environment()))
    main = indexes.index_url or _first(config.get("index-url")) or "https://pypi.org/simple"
    extras = [*indexes.extra_index_urls, *config.get("extra-index-url", [])]
    links = [*indexes.find_links, *config.get("find-links", [])]
    places = [(u, True) for u in [main, *extras]] + [(u, False) for u in links]
    seen, kept = set(), []
    for url, is_index in places:
        if url.startswith(("http://", "https://")) and url not in seen:
            seen.add(url)
            kept.append((url, is_index))
    return kept


def _first(values) -> str | None:
    return values[0] if values else None


def _pip_config(env: dict[str, str]) -> dict[str, list[str]]:
    """index-url, extra-index-url and find-links as pip's configuration gives them (its files and
    PIP_* variables; the variables first), from `pip config list`: no network."""
    import re

    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=60,
            preexec_fn=children.die_with_kbundle(),
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[str, list[str]] = {}
    rows = []
    for line in result.stdout.splitlines():
        match = re.match(r"^([^.]*)\.(index-url|extra-index-url|find-links)='(.*)'$", line.strip())
        if match:
            rows.append(match.groups())
    rows.sort(key=lambda row: row[0] != ":env:")  # the variables win over the files, as in pip
    for _section, key, value in rows:
        found.setdefault(key, []).extend(value.split())
    return found


def _keep(directory: Path, path: Path, item) -> Path:
    """A downloaded file at its place in the store (by the sha256 it has), checked against its index's hash."""
    sha = sha256_file(path)
    if item.sha256 and sha != item.sha256:
        path.unlink(missing_ok=True)
        raise KbundleError(f"pip: {item.filename} does not match the sha256 its index gives: not kept")
    dest = stored(directory, sha, item.filename)
    if path != dest:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
    return dest


def _pip_fetch(todo: Sequence, tmp: Path, python: str, indexes: PipIndexes, glibc: str | None) -> dict:
    """pip's own download of the chosen files (with the user's credentials), into `tmp` in the cache."""
    for group in ([c for c in todo if c.sha256], [c for c in todo if not c.sha256]):
        if group:
            _pip_download([c.line for c in group], python, tmp, indexes, glibc)
    arrived = {path.name: path for path in tmp.glob("*.whl") if not path.is_symlink()}
    missing = [c.filename for c in todo if c.filename not in arrived]
    if missing:
        raise KbundleError(f"pip: no wheel {missing[0]} came back from pip")
    return arrived


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
    with tempfile.TemporaryDirectory(prefix=".resolve-", dir=directory) as tmp:
        chosen = _resolve(lines, python, indexes, glibc, Path(tmp), False, conda_env, meter)
        places, fetched = _fetch_chosen(
            [c for c in chosen if c.filename not in built], directory, python, indexes, glibc, meter, Path(tmp)
        )
    files, resolution, kept = [], [], []
    for item in chosen:
        if item.filename in built:
            wheel, source = built[item.filename]
            files.append(wheel)
            pin, line = _exact_line(wheel, source)
        else:
            files.append(places[item.filename])
            pin, line = _exact_line(places[item.filename])
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


def resolution_key(
    pins: Sequence[str],
    python: str,
    indexes: PipIndexes,
    glibc: str | None,
    conda_env: Path | None = None,
    environ=None,
) -> str:
    """Everything that decides what pip's resolver picks for a section: its lines, the indexes
    (the bundle's and the user's, credentials removed), the image's Python and platform, and
    the distributions the conda side provides. Two bundles share a resolution only when all agree."""
    from kbundle import pydists
    from kbundle.image.pipreport import index_urls
    from kbundle.specs import strip_credentials

    decided = {
        "pins": list(pins),
        "indexes": [strip_credentials(u)[0] for u in index_urls(indexes, environ)],
        "python": python,
        "platform": [PLATFORM, glibc or ""],
        "conda": [f"{p.name}=={p.version}" for p in pydists.from_site_packages(conda_env)] if conda_env else [],
    }
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:40]


def _decided_record(key: str) -> Path:
    return cache_root_dir("pip-resolved") / f"decided-{key}.json"


def _remember(key: str, lines: Sequence[str]) -> None:
    from kbundle.atomic import write_atomic

    write_atomic(_decided_record(key), json.dumps(list(lines)))


def _recorded(key: str) -> list[str] | None:
    return _read_lines(_decided_record(key))


def resolution_record(bundle_hash: str) -> Path:
    """Where the last build of a bundle recorded its exact pip resolution, for its kernelspec's
    metadata. Not reused to fetch: `fetch` keeps its own records under `resolution_key`."""
    return cache_root_dir("pip-resolved") / f"{bundle_hash[:32]}.json"


def remember_resolution(bundle_hash: str, lines: Sequence[str]) -> None:
    from kbundle.atomic import write_atomic

    write_atomic(resolution_record(bundle_hash), json.dumps(list(lines)))


def recorded_resolution(bundle_hash: str) -> list[str] | None:
    return _read_lines(resolution_record(bundle_hash))


def _read_lines(path: Path) -> list[str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return [str(x) for x in data] if isinstance(data, list) else None


def glibc_of(virtual_packages) -> str | None:
    """`2.36` from the image's virtual packages (`__glibc=2.36`), or None."""
    found = next((v for v in virtual_packages or () if str(v).startswith("__glibc=")), None)
    return found.split("=", 1)[1].split("=")[0] if found else None
