"""Downloads into kbundle's caches: several at a time, resumable, each checked before it lands.

The one downloader of the files kbundle fetches itself: the wheels pip's resolver chose
(image/wheels.py), the sdists of a bundle's direct requirements (image/sources.py), and the
conda packages of the environment (image/env.py, which then has rattler unpack each archive). pip
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
CA bundle of PIP_CERT or the usual variables (`net.ca_for_requests`; conda channels: the host's
store, `net.ca_for_channels`). An index URL's credentials go with the requests to its host, as
pip sends them, and never into a message.

A server that stops sending is not waited for: no byte for READ_TIMEOUT seconds breaks the
connection, and the next attempt continues the `.part` with `Range`. While a file waits, the
meter names it and its host (progress.Meter.waiting), and a heartbeat prints that line every
few seconds even when no byte comes; after ATTEMPTS tries, one error line names the host.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import threading
import time
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
READ_TIMEOUT = 20  # seconds without a byte before a connection counts as stalled (pip's own runs get it too)
TIMEOUT = (20, READ_TIMEOUT)  # seconds to connect, and between two reads
BACKOFF = (1.0, 3.0)  # seconds before the second and third attempt
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})  # the server's trouble, maybe passing: try again


@dataclass(frozen=True)
class Wanted:
    """One file to fetch."""

    url: str  # without credentials
    dest: Path  # its place in the cache
    sha256: str = ""  # hex, from the index; empty when the index gives none
    auth: Optional[tuple[str, str]] = None  # the index's user and password, for its host only
    root: Optional[Path] = None  # kbundle's folder that `dest` lies below (dest's own folder when None)
    size: Optional[int] = None  # bytes, when a lock records them: a server that sends more is cut off

    @property
    def host(self) -> str:
        """`host:port` the file comes from, for messages (never with credentials)."""
        return host_of(self.url)

    @property
    def name(self) -> str:
        return self.dest.name


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


def host_of(url: str) -> str:
    """`host:port` of a URL, as a message names it: no credentials, no path."""
    from urllib.parse import urlsplit

    try:
        return safe(_netloc(urlsplit(url)))
    except ValueError:
        return "?"


# ----------------------------------------------------------------- fetching


def session(verify=None, workers: int = WORKERS):
    """requests with pip's settings: proxies and .netrc from the environment, pip's CA bundle
    (`verify`: another CA rule, conda channels' `net.ca_for_channels`)."""
    import requests
    from requests.adapters import HTTPAdapter

    from kbundle import net

    http = requests.Session()
    http.verify = net.ca_for_requests() if verify is None else verify
    adapter = HTTPAdapter(pool_connections=workers, pool_maxsize=workers)
    http.mount("https://", adapter)
    http.mount("http://", adapter)
    http.headers["User-Agent"] = "kbundle (packages for an image)"
    return http


def fetch_all(
    wanted: Sequence[Wanted],
    meter=None,
    http=None,
    workers: int = WORKERS,
    plan: bool = True,
    after: Optional[Callable[[Wanted, Path], None]] = None,
) -> list[Path]:
    """Every file of `wanted` in its `dest`, checked; in the order given. The first failure stops the rest.

    `plan`: ask each file's size first, for the meter's bytes and ETA (False: the caller planned
    them, from a lock). `after(item, path)`: runs in the worker once a file is in place (conda
    unpacks it there), before the meter counts it done."""
    if not wanted:
        return []
    from concurrent.futures import FIRST_EXCEPTION, wait

    from kbundle.progress import Heartbeat

    http = http or session()
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kbundle-download")
    beat = Heartbeat(meter.pulse) if meter is not None else None
    try:
        if beat is not None:
            beat.__enter__()
        if meter is not None and plan:
            sizes = list(pool.map(lambda w: _remaining(http, w, meter), wanted))
            meter.plan_bytes(sum(s or 0 for s in sizes))
            meter.items(0, len(wanted))
        futures = [pool.submit(fetch, http, w, meter, stop.is_set, after) for w in wanted]
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
        if beat is not None:
            beat.__exit__(None, None, None)


def _remaining(http, item: Wanted, meter=None) -> Optional[int]:
    """The bytes still to fetch for one file (its size less its .part), or None when the server will not say."""
    if _is_file_url(item.url):
        return None
    part = _part(item.dest)
    have = part.stat().st_size if part.exists() else 0
    if item.size is not None:
        return max(item.size - have, 0)
    key = ("size", item)
    if meter is not None:
        meter.waiting(key, f"the size of {item.name}", item.host)
    try:
        response = http.head(item.url, auth=item.auth, allow_redirects=True, timeout=TIMEOUT)
        length = int(response.headers.get("Content-Length", "")) if response.ok else None
    except Exception:  # only the ETA needs it: the download itself says what is wrong
        return None
    finally:
        if meter is not None:
            meter.over(key)
    return max(length - have, 0) if length is not None else None


def fetch_url(url: str, dest: Path, sha256: str = "", root: Optional[Path] = None) -> Path:
    """One file a bundle names by URL (an sdist) into `dest` below kbundle's folder `root`, with
    the same network settings, `.part` and check as every wheel; credentials in the URL go to its host only."""
    bare, auth = split_auth(url)
    return fetch(session(), Wanted(bare, dest, sha256, auth, root))


def fetch(
    http,
    item: Wanted,
    meter=None,
    cancelled: Callable[[], bool] = lambda: False,
    after: Optional[Callable[[Wanted, Path], None]] = None,
) -> Path:
    """One file into its `dest`, through its `.part`; continued, checked, then renamed into place
    (and handed to `after`, see fetch_all)."""
    found = _from_file(item) if _is_file_url(item.url) else _fetch_http(http, item, meter, cancelled)
    if after is not None:
        after(item, found)
    if meter is not None:
        meter.item_done()
    return found


def _fetch_http(http, item: Wanted, meter, cancelled: Callable[[], bool]) -> Path:
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
    return item.dest


def _attempts(http, item: Wanted, fh, meter, cancelled):
    """Up to ATTEMPTS requests, each continuing the .part where the last broke off; the file's digest.

    A stall past the last attempt is a KbundleError (exit 1), not a MachineError: nothing is
    wrong with this machine, and the same run later, or through another mirror, may well pass."""
    last: Optional[_Broken] = None
    for attempt in range(ATTEMPTS):
        if attempt:
            _pause(BACKOFF[min(attempt, len(BACKOFF)) - 1], cancelled)
        note = f"attempt {attempt + 1} of {ATTEMPTS}" if attempt else ""
        if meter is not None:
            meter.waiting(item, item.name, item.host, note)
        try:
            return _get(http, item, fh, _continue(fh), meter, cancelled)
        except _Broken as exc:
            last = exc  # the .part keeps what arrived: the next attempt continues
        finally:
            if meter is not None:
                meter.over(item)
    raise KbundleError(f"cannot download {safe(item.url)}: {_why(last, item.host, item.name)}") from None


def _why(broken: Optional[_Broken], host: str, what: str) -> str:
    return broken.why(host, what) if broken is not None else "no answer"


def _pause(seconds: float, cancelled: Callable[[], bool]) -> None:
    """A short wait before the next attempt, cut short when the run stops."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cancelled():
            raise Cancelled()
        time.sleep(0.1)


class _Broken(Exception):
    """The connection broke off, timed out, or the server was in trouble: worth another attempt
    from where it stopped."""

    def __init__(self, cause: object = None, stalled: bool = False):
        super().__init__(first_line(cause) if cause is not None else "")
        self.stalled = stalled

    def why(self, host: str, what: str) -> str:
        """The last attempt's failure in one line, naming the host and what was waited for."""
        if self.stalled:
            return (
                f"{host} sent no byte of {safe(what)} for {READ_TIMEOUT} s, {ATTEMPTS} times "
                "(the server stalls; run again later, a download continues where it stopped)"
            )
        return str(self)


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
            if status in RETRY_STATUSES:
                raise _Broken(f"HTTP {status} {response.reason or ''}".strip())
            action = resume_action(status, response.headers.get("Content-Range"), have) if have else None
            if action == "complete":
                return digest
            if status != 200 and action != "append":
                raise KbundleError(f"cannot download {safe(item.url)}: HTTP {status} {response.reason or ''}".strip())
            if action == "restart":
                fh.seek(0)
                fh.truncate(0)
                digest = hashlib.sha256()
            _receive(response, item, fh, digest, meter, cancelled)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        fh.flush()
        raise _Broken(exc, stalled=_is_stall(exc)) from exc
    fh.flush()
    return digest


PAGE_LIMIT = 64 << 20  # bytes of one index page: PyPI's largest project pages are a few MiB


def fetch_text(http, url: str, what: str, auth=None, meter=None) -> Optional[str]:
    """A page (an index's list of a project's files) as text; None when the server has none (404).
    The same read timeout, attempts and progress line as a file; a stall past them is one error
    line naming the host. HTTP 401/403 is `Refused` (pip, with the user's own settings, may get in)."""
    import requests

    host, key = host_of(url), ("page", url)
    last: Optional[_Broken] = None
    for attempt in range(ATTEMPTS):
        if attempt:
            _pause(BACKOFF[min(attempt, len(BACKOFF)) - 1], lambda: False)
        if meter is not None:
            meter.waiting(key, what, host, f"attempt {attempt + 1} of {ATTEMPTS}" if attempt else "")
        try:
            return _page(http, url, auth, meter, key)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last = _Broken(exc, stalled=_is_stall(exc))
        except _Broken as exc:
            last = exc
        finally:
            if meter is not None:
                meter.over(key)
    raise KbundleError(f"cannot read {safe(url)}: {_why(last, host, what)}") from None


def _page(http, url: str, auth, meter, key) -> Optional[str]:
    headers = {"Accept": "text/html"}
    with http.get(url, auth=auth, headers=headers, stream=True, timeout=TIMEOUT) as response:
        status = response.status_code
        if status == 404:
            return None
        if status in (401, 403):
            raise Refused(f"{safe(url)}: HTTP {status} (the index wants credentials kbundle does not have)")
        if status in RETRY_STATUSES:
            raise _Broken(f"HTTP {status} {response.reason or ''}".strip())
        if status != 200:
            raise KbundleError(f"cannot read {safe(url)}: HTTP {status} {response.reason or ''}".strip())
        body = bytearray()
        for chunk in _chunks(response):
            body += chunk
            if len(body) > PAGE_LIMIT:
                raise KbundleError(
                    f"{safe(url)} is longer than {PAGE_LIMIT >> 20} MiB: not an index page kbundle reads"
                )
            if meter is not None:
                meter.heard(key)
        return bytes(body).decode(response.encoding or "utf-8", errors="replace")


def _receive(response, item: Wanted, fh, digest, meter, cancelled) -> None:
    """The response's body appended to the `.part`, each chunk telling the meter the file is alive."""
    for chunk in _chunks(response):
        if cancelled():
            raise Cancelled()
        _write(fh, chunk, item.dest)
        digest.update(chunk)
        if item.size is not None and fh.tell() > item.size:
            fh.truncate(0)
            raise KbundleError(f"{safe(item.url)} is longer than the {item.size} bytes its lock records: not kept")
        if meter is not None:
            meter.heard(item)
            meter.add_bytes(len(chunk))


def _chunks(response) -> Iterator[bytes]:
    """The body as it comes: each read returns what has arrived (urllib3's `read1`), so the bytes
    before a stall reach the `.part` and are not lost in a half-filled chunk when the read times out."""
    import requests
    import urllib3.exceptions as u3

    read1 = getattr(response.raw, "read1", None)
    if read1 is None:
        yield from response.iter_content(CHUNK)
        return
    while True:
        try:
            chunk = read1(CHUNK, decode_content=True)
        except u3.ReadTimeoutError as exc:
            raise requests.exceptions.ConnectionError(exc) from exc
        except (u3.ProtocolError, u3.SSLError, u3.DecodeError, OSError) as exc:
            raise requests.exceptions.ChunkedEncodingError(exc) from exc
        if not chunk:
            return
        yield chunk


def _is_stall(exc: BaseException) -> bool:
    """Whether a requests failure is a read that waited READ_TIMEOUT seconds (not a refused or reset connection)."""
    import requests

    text = str(exc)
    return isinstance(exc, requests.exceptions.ReadTimeout) or "Read timed out" in text or "timed out" in text


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
