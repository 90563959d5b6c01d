"""Wheel downloads into the shared cache: several at a time, resumable, each checked before it lands.

The one downloader of pip files kbundle fetches itself: the wheels pip's resolver chose
(image/wheels.py) and the sdists of a bundle's direct requirements (image/sources.py). pip
downloads one file after the other and starts over after a broken connection. Here a small
pool fetches the files together, each into `<cache>/<file>.part`, and a `.part` left by a
broken connection or an interrupted run is continued with an HTTP `Range` request (a server
that ignores it sends the whole file, and the `.part` starts over). A file enters the cache
(renamed from its `.part`) only once its sha256 matches the one its index or the bundle
gave; a mismatch removes the `.part` and fails. Two runs fetching the same file take turns
on its `.part` (an flock).

Every write stays in kbundle's own cache: the folders below `Wanted.root` are walked one at a
time without following a link (bundle/safefs.py), the `.part` is opened relative to its folder
with `O_NOFOLLOW`, and the rename into place is relative to that same folder. A file name
itself comes from `specs.url_filename` / `safe_filename`, never straight from a URL.

The network settings are pip's: the proxy variables and `.netrc` (requests reads them), the
CA bundle of PIP_CERT or the usual variables (`net.ca_for_requests`). An index URL's
credentials go with the requests to its host, as pip sends them, and never into a message.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle.display import safe
from kbundle.errors import KbundleError, first_line

WORKERS = 6  # files at a time: enough to fill a fast link, few enough for one index
ATTEMPTS = 3  # connections per file; each one continues where the last broke off
CHUNK = 1 << 20
TIMEOUT = (30, 120)  # seconds to connect, and between two reads


@dataclass(frozen=True)
class Wanted:
    """One file to fetch."""

    url: str  # without credentials
    dest: Path  # its place in the cache
    sha256: str = ""  # hex, from the index; empty when the index gives none
    auth: Optional[tuple[str, str]] = None  # the index's user and password, for its host only
    root: Optional[Path] = None  # kbundle's folder that `dest` lies below (dest's own folder when None)


class Refused(KbundleError):
    """The server refused the request (HTTP 401 or 403): pip, with the user's own settings, may be let in."""


class Cancelled(Exception):
    """Another download failed or the run was interrupted: stop this one where it is (its .part stays)."""


# ----------------------------------------------------------------- deciding (pure)


def resume_action(status: int, content_range: Optional[str], have: int) -> str:
    """What a response to `Range: bytes=<have>-` means for the `.part` holding `have` bytes:
    "append" (the rest follows), "restart" (the whole file follows: start the .part over),
    "complete" (nothing is left to send: check what is there), or "fail"."""
    if status == 206:
        start = _range_start(content_range)
        return "append" if start == have else "fail"
    if status == 200:
        return "restart"
    if status == 416 and have > 0:
        return "complete"
    return "fail"


def _range_start(content_range: Optional[str]) -> Optional[int]:
    """The first byte of `Content-Range: bytes START-END/TOTAL`."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    first = content_range[6:].split("-", 1)[0].strip()
    return int(first) if first.isdigit() else None


def split_auth(url: str) -> tuple[str, Optional[tuple[str, str]]]:
    """(the URL without `user:password@`, those credentials or None)."""
    from urllib.parse import unquote, urlsplit

    from kbundle.specs import strip_credentials

    bare, had = strip_credentials(url)
    if not had:
        return url, None
    parts = urlsplit(url)
    return bare, (unquote(parts.username or ""), unquote(parts.password or ""))


def credentials_for(url: str, index_urls: Sequence[str]) -> Optional[tuple[str, str]]:
    """The credentials of the first index URL on the same host and port as `url`, as pip sends them."""
    from urllib.parse import urlsplit

    netloc = _netloc(urlsplit(url))
    for index in index_urls:
        bare, auth = split_auth(index)
        if auth and _netloc(urlsplit(bare)) == netloc:
            return auth
    return None


def _netloc(parts) -> str:
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return f"{(parts.hostname or '').lower()}:{port}"


# ----------------------------------------------------------------- fetching


def session():
    """requests with pip's settings: proxies and .netrc from the environment, pip's CA bundle."""
    import requests
    from requests.adapters import HTTPAdapter

    from kbundle import net

    http = requests.Session()
    http.verify = net.ca_for_requests()
    adapter = HTTPAdapter(pool_connections=WORKERS, pool_maxsize=WORKERS)
    http.mount("https://", adapter)
    http.mount("http://", adapter)
    http.headers["User-Agent"] = "kbundle (pip wheels for an image)"
    return http


def fetch_all(wanted: Sequence[Wanted], meter=None, http=None, workers: int = WORKERS) -> list[Path]:
    """Every file of `wanted` in its `dest`, checked; in the order given. The first failure stops the rest."""
    if not wanted:
        return []
    from concurrent.futures import FIRST_EXCEPTION, wait

    http = http or session()
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kbundle-download")
    try:
        if meter is not None:
            sizes = list(pool.map(lambda w: _remaining(http, w), wanted))
            meter.plan_bytes(sum(s or 0 for s in sizes))
            meter.items(0, len(wanted))
        futures = [pool.submit(fetch, http, w, meter, stop.is_set) for w in wanted]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f.exception() for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            raise failed
        return [f.result() for f in futures]
    except BaseException:
        stop.set()  # the others stop at their next chunk; their .part files stay for the next run
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _remaining(http, item: Wanted) -> Optional[int]:
    """The bytes still to fetch for one file (its size less its .part), or None when the server will not say."""
    if _is_file_url(item.url):
        return None
    part = _part(item.dest)
    have = part.stat().st_size if part.exists() else 0
    try:
        response = http.head(item.url, auth=item.auth, allow_redirects=True, timeout=TIMEOUT)
        length = int(response.headers.get("Content-Length", "")) if response.ok else None
    except Exception:  # only the ETA needs it: the download itself says what is wrong
        return None
    return max(length - have, 0) if length is not None else None


def fetch_url(url: str, dest: Path, sha256: str = "", root: Optional[Path] = None) -> Path:
    """One file a bundle names by URL (an sdist) into `dest` below kbundle's folder `root`, with
    the same network settings, `.part` and check as every wheel; credentials in the URL go to its host only."""
    bare, auth = split_auth(url)
    return fetch(session(), Wanted(bare, dest, sha256, auth, root))


def fetch(http, item: Wanted, meter=None, cancelled: Callable[[], bool] = lambda: False) -> Path:
    """One file into its `dest`, through its `.part`; continued, checked, then renamed into place."""
    if _is_file_url(item.url):
        found = _from_file(item)
        if meter is not None:
            meter.item_done()
        return found
    name, part = item.dest.name, _part(item.dest).name
    with _folder(item) as folder, _locked_part(folder, part) as fh:
        if _finished(folder, name, item.sha256):  # another run finished it while this one waited
            return item.dest
        try:
            digest = _attempts(http, item, fh, meter, cancelled)
        except BaseException:
            if fh.seek(0, os.SEEK_END) == 0:  # nothing arrived: no empty .part to leave behind
                _unlink(folder, part)
            raise
        if item.sha256 and digest.hexdigest() != item.sha256.lower():
            fh.truncate(0)
            _unlink(folder, part)
            raise KbundleError(f"{safe(item.url)} does not match the sha256 its index gives: not kept")
        os.replace(part, name, src_dir_fd=folder, dst_dir_fd=folder)
    if meter is not None:
        meter.item_done()
    return item.dest


def _attempts(http, item: Wanted, fh, meter, cancelled):
    """Up to ATTEMPTS requests, each continuing the .part where the last broke off; the file's digest."""
    last: Optional[BaseException] = None
    for _attempt in range(ATTEMPTS):
        try:
            return _get(http, item, fh, _continue(fh), meter, cancelled)
        except _Broken as exc:
            last = exc.__cause__ or exc  # the .part keeps what arrived: the next attempt continues
    raise KbundleError(f"cannot download {safe(item.url)}: {first_line(last)}") from None


class _Broken(Exception):
    """The connection broke off (or timed out): worth another attempt from where it stopped."""


def _get(http, item: Wanted, fh, digest, meter, cancelled):
    """One request for the rest of the file, appended to `fh`; the digest of everything in it."""
    import requests

    have = fh.seek(0, os.SEEK_END)
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with http.get(item.url, headers=headers, auth=item.auth, stream=True, timeout=TIMEOUT) as response:
            status = response.status_code
            if status in (401, 403):
                raise Refused(f"{safe(item.url)}: HTTP {status} (the index wants credentials kbundle does not have)")
            action = resume_action(status, response.headers.get("Content-Range"), have) if have else None
            if action == "complete":
                return digest
            if status != 200 and action != "append":
                raise KbundleError(f"cannot download {safe(item.url)}: HTTP {status} {response.reason or ''}".strip())
            if action == "restart":
                fh.seek(0)
                fh.truncate(0)
                digest = hashlib.sha256()
            for chunk in response.iter_content(CHUNK):
                if cancelled():
                    raise Cancelled()
                _write(fh, chunk, item.dest)
                digest.update(chunk)
                if meter is not None:
                    meter.add_bytes(len(chunk))
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        fh.flush()
        raise _Broken() from exc
    fh.flush()
    return digest


def _write(fh, chunk: bytes, dest: Path) -> None:
    try:
        fh.write(chunk)
    except OSError as exc:
        import errno

        name = errno.errorcode.get(exc.errno or 0, "OSError")
        raise KbundleError(f"cannot write {_part(dest)}: {os.strerror(exc.errno or 0).lower()} ({name})") from None


def _continue(fh):
    """The sha256 of what a `.part` already holds: the download goes on from there."""
    digest = hashlib.sha256()
    fh.seek(0)
    for block in iter(lambda: fh.read(CHUNK), b""):
        digest.update(block)
    return digest


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


@contextmanager
def _folder(item: Wanted) -> Iterator[int]:
    """`dest`'s folder, open: made as needed below `root`, one folder at a time, never through a link."""
    from kbundle.bundle import safefs

    root = item.root or item.dest.parent
    try:
        below = item.dest.parent.relative_to(root).parts
    except ValueError:
        raise KbundleError(f"{safe(str(item.dest))} is not below {safe(str(root))}") from None
    try:
        with safefs.root(root) as root_fd:
            fd = safefs.open_dir(root_fd, list(below), create=True)
    except safefs.LinkInTheWay as exc:
        raise KbundleError(f"cannot download into {safe(str(item.dest.parent))}: {exc}") from None
    try:
        yield fd
    finally:
        os.close(fd)


_PART_FLAGS = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _open_part(folder: int, part: str):
    """The `.part`, opened for appending relative to its folder; a link or non-file there is refused."""
    try:
        fd = os.open(part, _PART_FLAGS, 0o644, dir_fd=folder)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KbundleError(f"refusing to write {safe(part)}: it is a symbolic link") from None
        raise
    fh = os.fdopen(fd, "a+b")
    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
        fh.close()
        raise KbundleError(f"refusing to write {safe(part)}: it is not a regular file")
    return fh


@contextmanager
def _locked_part(folder: int, part: str) -> Iterator:
    """The `.part` in `folder`, open for appending and locked; waits while another run holds it.

    The lock is on the open file: once it is granted, the name must still be that file (the
    other run may have renamed it into place, or removed it), else open it afresh."""
    while True:
        fh = _open_part(folder, part)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(part, dir_fd=folder, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same or _kind(folder, part.removesuffix(".part")) == "file":
                yield fh
                return
        finally:
            fh.close()  # closing drops the lock


def _kind(folder: int, name: str) -> str:
    from kbundle.bundle import safefs

    return safefs.kind(folder, name)


def _finished(folder: int, name: str, sha256: str) -> bool:
    """Whether `name` is in place, as a regular file of the wanted sha256 (when one is known).
    A damaged file (or a link) is removed: it is fetched again, never served."""
    from kbundle.bundle import safefs

    found = _kind(folder, name)
    if found == "absent":
        return False
    if found == "file" and (not sha256 or safefs.file_sha256(folder, name) == sha256.lower()):
        return True
    _unlink(folder, name)
    return False


def _unlink(folder: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=folder)
    except FileNotFoundError:
        pass


def _is_file_url(url: str) -> bool:
    return url.lower().startswith("file:")


def _from_file(item: Wanted) -> Path:
    """A wheel pip found in a local folder (the user's own find-links): linked (or copied) into
    the cache as a `.part`, checked there, then renamed into place."""
    from urllib.parse import urlsplit
    from urllib.request import url2pathname

    source = Path(url2pathname(urlsplit(item.url).path))
    if source.resolve() == item.dest.resolve():
        return item.dest
    name, part = item.dest.name, _part(item.dest).name
    with _folder(item) as folder:
        _unlink(folder, part)
        try:
            os.link(source, part, dst_dir_fd=folder, follow_symlinks=True)
        except OSError:
            _copy_into(source, folder, part)
        if item.sha256 and _sha256_in(folder, part) != item.sha256.lower():
            _unlink(folder, part)
            raise KbundleError(f"{safe(str(source))} does not match the sha256 pip gives for it: not kept")
        os.replace(part, name, src_dir_fd=folder, dst_dir_fd=folder)
    return item.dest


def _copy_into(source: Path, folder: int, name: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        with open(source, "rb") as src, os.fdopen(os.open(name, flags, 0o644, dir_fd=folder), "wb") as out:
            for block in iter(lambda: src.read(CHUNK), b""):
                out.write(block)
    except OSError as exc:
        _unlink(folder, name)
        raise KbundleError(f"cannot copy {safe(str(source))} into kbundle's cache: {exc.strerror or exc}") from None


def _sha256_in(folder: int, name: str) -> str | None:
    from kbundle.bundle import safefs

    return safefs.file_sha256(folder, name)
