"""What pip's resolver chose for the image, read from `pip install --dry-run --report`.

pip resolves (and reads each wheel's metadata, which an index with PEP 658 serves apart from
the wheel), then stops; kbundle fetches the chosen files itself (image/download.py). The
report names each file's URL (credentials removed) and, when the index gives it, its sha256.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kbundle.display import safe
from kbundle.errors import KbundleError

_SHA256 = re.compile(r"^[0-9a-f]{1,128}$")


@dataclass(frozen=True)
class Chosen:
    """One file pip's resolver chose."""

    name: str
    version: str
    url: str  # as the report gives it: credentials removed; file: for a local wheel
    sha256: str = ""  # hex; empty when the index gave no hash

    @property
    def filename(self) -> str:
        from kbundle.specs import url_filename

        return url_filename(self.url)

    @property
    def line(self) -> str:
        """The requirement that names exactly this file, for pip itself to fetch."""
        pin = f"{self.name}=={self.version}"
        return pin + (f" --hash=sha256:{self.sha256}" if self.sha256 else "")


def parse(report: Mapping[str, Any]) -> list[Chosen]:
    """The report's `install` entries as records; a report pip did not write is one clear error."""
    try:
        return [_chosen(item) for item in report["install"]]
    except (KeyError, TypeError, AttributeError):
        raise KbundleError("pip's report of its resolution is not one kbundle can read") from None


def _chosen(item: Mapping[str, Any]) -> Chosen:
    info = item["download_info"]
    archive = info.get("archive_info") or {}
    sha = (archive.get("hashes") or {}).get("sha256") or ""
    if not sha and str(archive.get("hash", "")).startswith("sha256="):
        sha = archive["hash"].split("=", 1)[1]
    meta = item["metadata"]
    sha = str(sha).lower()
    if sha and not _SHA256.match(sha):  # it names a folder of the wheel cache: hex only
        raise KbundleError(f"pip's report gives {safe(str(info['url']))} a sha256 that is not one: {safe(sha)!r}")
    return Chosen(str(meta["name"]), str(meta["version"]), str(info["url"]), sha)


def report_args(report: Path, no_deps: bool, installed: bool = False) -> list[str]:
    """pip's arguments for a resolution that installs nothing and reports what it chose.

    `installed`: pip runs in a stand-in interpreter whose site-packages holds the conda side's
    distributions (kbundle/pydists.py), and takes them as installed; otherwise it resolves as
    if nothing were installed."""
    args = ["install", "--dry-run", "--report", str(report)]
    if not installed:
        args.append("--ignore-installed")
    return args + (["--no-deps"] if no_deps else [])


def index_urls(indexes, environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Every index and find-links URL pip will read: the bundle's, then the user's PIP_* variables.
    Only for credentials: the download of a file goes to its index's host with them."""
    env = os.environ if environ is None else environ
    found = [indexes.index_url] if indexes.index_url else []
    found += list(indexes.extra_index_urls) + list(indexes.find_links)
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        found += (env.get(key) or "").split()
    return [url for url in found if url]


def wanted(
    chosen: Sequence[Chosen],
    directory: Path,
    indexes,
    environ: Optional[Mapping[str, str]] = None,
    place: Optional[Callable[[Chosen], Path]] = None,
) -> list:
    """download.Wanted for each chosen file, with its index's credentials: at `place(item)` (a
    path below `directory`, kbundle's folder the download may write in), by default
    `directory/<its file name>`."""
    from kbundle.image import download

    urls = index_urls(indexes, environ)
    where = place or (lambda item: directory / item.filename)
    found = []
    for item in chosen:
        bare, auth = download.split_auth(item.url)
        found.append(
            download.Wanted(bare, where(item), item.sha256, auth or download.credentials_for(bare, urls), directory)
        )
    return found
