"""Conda specs and pip requirements as typed records, and the one parser for each.

Both stages read them: pack from the sender's environment file or prefix, the image stage
from a bundle's manifest (pip pins to fetch as wheels). Text is made from a record only
where a file is written (`.text`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kbundle.errors import UsageError

if TYPE_CHECKING:
    from packaging.requirements import Requirement


@dataclass(frozen=True)
class CondaSpec:
    """One conda dependency: as the sender wrote it (`raw`) and in parts, so that normalising
    changes fields, not text. `text` is its form in environment.yml, the manifest and the solve."""

    raw: str
    name: str
    channel: str | None = None
    version: str | None = None  # an exact version from `=ver` / `==ver`
    build: str | None = None
    constraint: str | None = None  # any other version constraint, kept verbatim (`>=1.2`)
    exact: bool = False  # written `==ver`: that version alone (conda reads `=ver` as `ver.*`)

    @property
    def text(self) -> str:
        head = f"{self.channel}::{self.name}" if self.channel else self.name
        if self.constraint:
            # `numpy>=1.2` stays glued; with a build selector the MatchSpec needs its spaces.
            if self.build:
                return f"{head} {self.constraint} {self.build}"
            return head + (self.constraint if self.constraint[0] in "<>=!~" else " " + self.constraint)
        if self.build:
            return f"{head}={self.version or '*'}={self.build}"
        if self.version:
            return f"{head}{'==' if self.exact else '='}{self.version}"
        return head


@dataclass(frozen=True)
class PipPin:
    """One pip requirement, in any form pip accepts. `requirement` is packaging's reading of it;
    None for a local path (dropped by normalisation) or a form that is not PEP 508 (a bare VCS or
    file URL), which is kept as written."""

    raw: str
    name: str  # canonical (lower case, `-`)
    version: str | None  # the exact version of `name==version`
    local: bool = False  # a path or editable install on the sender's machine
    requirement: Requirement | None = field(default=None, compare=False, repr=False)
    url: str | None = None  # a direct reference: `git+https://…@tag`, a wheel or sdist URL
    hashes: tuple[str, ...] = ()  # `sha256:<hex>`, from `--hash=` options
    spec: str = ""  # the requirement as written, without its `--hash` options

    @property
    def exact(self) -> bool:
        """`name==version`: what kbundle can fetch as a wheel by name alone."""
        return self.version is not None and not self.local and self.url is None

    @property
    def hashed(self) -> bool:
        """An exact pin with the hash of its wheel: nothing left for the recipient to resolve."""
        return self.exact and bool(self.hashes)

    @property
    def vcs(self) -> bool:
        return self.url is not None and self.url.split("+", 1)[0].lower() in VCS_SCHEMES and "+" in self.url

    @property
    def wheel_url(self) -> bool:
        return self.url is not None and not self.vcs and last_segment(self.url).endswith(".whl")

    @property
    def text(self) -> str:
        """Its line in environment.yml's pip: section, the manifest and requirements.txt."""
        body = str(self.requirement) if self.requirement is not None else (self.spec or self.raw)
        return body + "".join(f" --hash={h}" for h in self.hashes)


VCS_SCHEMES = ("git", "hg", "svn", "bzr")
INDEX_OPTIONS = {
    "-i": "index_url",
    "--index-url": "index_url",
    "--extra-index-url": "extra_index_urls",
    "-f": "find_links",
    "--find-links": "find_links",
}


@dataclass(frozen=True)
class PipIndexes:
    """Where the pip: section's packages come from: its `--index-url`, `--extra-index-url` and
    `--find-links` options, as the manifest's `pip_indexes` records them."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.index_url or self.extra_index_urls or self.find_links)

    def to_dict(self) -> dict:
        return {
            "index_url": self.index_url,
            "extra_index_urls": list(self.extra_index_urls),
            "find_links": list(self.find_links),
        }

    @classmethod
    def from_dict(cls, raw: dict | None) -> PipIndexes:
        """The manifest's `pip_indexes`, as a bundle carries them: each must be an http(s) URL
        (`bundle_url`), or the bundle is refused (exit 3)."""
        raw = raw or {}
        found = cls(
            raw.get("index_url") or None,
            tuple(str(u) for u in raw.get("extra_index_urls") or ()),
            tuple(str(u) for u in raw.get("find_links") or ()),
        )
        for url in found.urls():
            bundle_url(url, "pip index")
        return found

    def urls(self) -> list[str]:
        """Every index and find-links URL, in pip's order."""
        return [*([self.index_url] if self.index_url else []), *self.extra_index_urls, *self.find_links]

    def option_lines(self) -> list[str]:
        """The options as lines of a pip: section (environment.yml)."""
        lines = [f"--index-url {self.index_url}"] if self.index_url else []
        lines += [f"--extra-index-url {u}" for u in self.extra_index_urls]
        return lines + [f"--find-links {u}" for u in self.find_links]

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """pip's environment with these indexes: passed as PIP_* variables, never on the command
        line (where a token in a URL would show in `ps`). The user's own extra indexes and
        find-links from the environment are kept after the bundle's."""
        env = dict(base)
        if self.index_url:
            env["PIP_INDEX_URL"] = self.index_url
        for key, urls in (("PIP_EXTRA_INDEX_URL", self.extra_index_urls), ("PIP_FIND_LINKS", self.find_links)):
            if urls:
                env[key] = " ".join([*urls, *(env.get(key) or "").split()])
        return env


def manylinux_platforms(glibc: str | None) -> list[str]:
    """pip's platform tags for an x86_64 Linux image with this glibc (newest first): every
    `manylinux_2_X` up to it, then the legacy aliases. Without a glibc, manylinux2014's 2.17."""
    minor = 17
    if glibc:
        match = re.match(r"^2\.(\d+)", glibc)
        minor = int(match.group(1)) if match else 17
    names = [f"manylinux_2_{m}_x86_64" for m in range(max(minor, 5), 4, -1)]
    return names + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def cpython_abis(python: str) -> list[str]:
    """pip's `--abi` values for a CPython X.Y image: its own ABI (`cp37m` before 3.8, whose
    builds carried pymalloc's `m`; `cp311` after), then the stable ABI and pure wheels."""
    major, minor = (int(part) for part in python.split(".")[:2])
    own = f"cp{major}{minor}" + ("m" if (major, minor) < (3, 8) else "")
    return [own, "abi3", "none"]


def url_filename(url: str) -> str:
    """The file name a URL ends in, without query or fragment: `.../x-1.0-py3-none-any.whl`.

    Unquoted first and split after, so `..%2F..%2Ftmp%2FX` is the name `X`, never a path; a last
    segment that is no file name is UnsafeName (`safe_filename`)."""
    return safe_filename(last_segment(url), f"the URL {url!r}")


def safe_filename(name: str, what: str = "a name") -> str:
    """`name` when it is one plain file name kbundle may create in a folder of its own; else
    UnsafeName (exit 3). Every name that comes from outside (a URL's last segment, an index link,
    an archive member's part) goes through here before it is joined to a path."""
    from kbundle.display import safe
    from kbundle.errors import UnsafeName

    if name in ("", ".", "..") or any(c in name for c in "/\\\x00"):
        raise UnsafeName(f"{safe(what)} does not end in a file name kbundle can write ({safe(name)!r})")
    return name


# The schemes a bundle's pip line or index may name: pip fetches over http(s), git also over ssh.
_FETCH_SCHEMES = ("http", "https")
_GIT_SCHEMES = ("http", "https", "ssh", "git")


def bundle_url(url: str, what: str = "pip URL") -> str:
    """A URL a bundle names (a pip index, a direct or git requirement), checked before anything is
    fetched from it: http(s) only (git also ssh and git), so that no `file://` URL reads from this
    host (docs/format.md), and no `..` in its unquoted path, so that nothing derived from it climbs
    out of a folder. UnsafeName (exit 3) otherwise; the URL itself when sound."""
    from urllib.parse import unquote, urlsplit

    from kbundle.display import safe
    from kbundle.errors import UnsafeName

    vcs = _vcs_url(url)
    body = url.split("+", 1)[1] if vcs else url
    schemes = _GIT_SCHEMES if vcs else _FETCH_SCHEMES
    try:
        parts = urlsplit(body)
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in schemes or not parts.hostname:
        allowed = ", ".join(schemes)
        raise UnsafeName(f"the bundle's {what} {safe(url)!r} is not a URL kbundle fetches ({allowed} only)")
    if ".." in unquote(parts.path).replace("\\", "/").split("/"):
        raise UnsafeName(f"the bundle's {what} {safe(url)!r} climbs out of its folder (`..` in its path)")
    return url


def last_segment(url: str) -> str:
    """The URL's last path segment, unquoted first (for reading a name; never for writing a file)."""
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(url).path).rsplit("/", 1)[-1]


def wheel_file_of(url: str) -> str | None:
    """The wheel file a URL names, in lower case, in any spelling people write: behind a VCS
    prefix (`git+https://…/x-win_amd64.whl`), with a query or fragment, percent-encoded (even the
    `?`), upper case (`.WHL`). None when the URL names no wheel."""
    from urllib.parse import unquote

    body = url.split("+", 1)[1] if _vcs_url(url) else url
    name = re.split(r"[?#]", unquote(last_segment(body)), maxsplit=1)[0].strip().lower()
    return name if name.endswith(".whl") else None


def strip_credentials(url: str) -> tuple[str, bool]:
    """The URL without `user:token@`; whether there was one. Credentials stay with their owner."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, False
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])), True


_NAME = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._\-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(raw: str, what: str) -> str:
    # Specs end up in the Dockerfile's comments and labels: a newline must not sneak in.
    text = raw.strip()
    if _CONTROL.search(text):
        raise UsageError(f"the {what} {text.splitlines()[0]!r}... spans several lines or has control characters")
    return text


# `jaxlib=0.4.23[cuda118]`: a bare word in brackets is how people write a build selector; conda
# itself only reads `[key=value]`, so it becomes `[build=*cuda118*]`.
_BARE_BRACKET = re.compile(r"\[\s*([A-Za-z0-9_.*]+)\s*\]\s*$")
# A version conda reads as exact or as a prefix (`==1.2`, `1.2`, `1.2.*`): kept as `version`.
_PLAIN_VERSION = re.compile(r"^(?:==)?([A-Za-z0-9_.+!]+?)(?:\.\*)?$")
# A lone `=` (not part of `==`, `>=`, `<=`, `!=`, `~=`) with spaces around it: `python = 3.8`,
# `pytorch = 1.9 = py3.8_cuda11.1_0`. conda reads these as `python=3.8`; rattler would take the
# second `=` as part of the build string.
_SPACED_EQUALS = re.compile(r"\s*(?<![<>!=~])=(?!=)\s*")


# Operators written backwards, as in a real environment.yml's `ninja=>1.10.2`: conda reads no
# `=>` or `=<`, so the file fails there too; the line says which operator was meant.
_BACKWARDS = {"=>": ">=", "=<": "<="}


def _operator_hint(text: str) -> str:
    for wrong, right in _BACKWARDS.items():
        if wrong in text:
            return f": {wrong!r} is not a conda operator; did you mean {text.replace(wrong, right, 1)!r}?"
    return ""


def parse_conda_spec(raw: str) -> CondaSpec:
    """Read a conda dependency the way conda does (rattler's MatchSpec, lenient mode): export lines
    `numpy=1.19.2=py37hadc3359_0`, `numpy >=1.2`, `tensorflow ==2.7.0`, `cudatoolkit<10.2,>10.0`,
    build selectors `jaxlib=*=*cuda*`, bracket forms `name=1.0[build=*cuda*]` and `jaxlib 0.4.23[cuda118]`."""
    from rattler import MatchSpec

    text = _one_line(raw, "conda dependency")
    try:
        spec = MatchSpec(_BARE_BRACKET.sub(r"[build=*\1*]", _SPACED_EQUALS.sub("=", text)), strict=False)
    except Exception:  # rattler's InvalidMatchSpecError and friends: the sender's text, not our bug
        raise UsageError(f"cannot read the conda dependency {text!r}{_operator_hint(text)}") from None
    if spec.name is None:
        raise UsageError(f"cannot read the conda dependency {text!r} (it names no package)")
    # The channel as the sender spelled it (`conda-forge::`, a URL): rattler keeps only its last part.
    channel = text.split("::", 1)[0].strip() if "::" in text else None
    version = constraint = None
    version_text = str(spec.version) if spec.version is not None else ""
    plain = _PLAIN_VERSION.match(version_text) if version_text not in ("", "*") else None
    exact = False
    if plain and not re.search(r"[<>!,|~ ]", version_text):
        version = plain.group(1)
        exact = version_text.startswith("==") and not version_text.endswith("*") and "==" in text
    elif version_text not in ("", "*"):
        constraint = version_text
    build = str(spec.build) if spec.build is not None else None
    from_file = _package_file(text)
    if from_file is not None and version is None and constraint is None:
        version, build = from_file  # `conda list --explicit`'s URL: the file's own version and build
    return CondaSpec(
        raw=text,
        name=spec.name.normalized,
        channel=channel,
        version=version,
        build=build,
        constraint=constraint,
        exact=exact,
    )


def _package_file(text: str) -> tuple[str, str] | None:
    """(version, build) of a conda package's URL (`…/linux-64/xz-5.2.6-h166bdaf_0.tar.bz2`), else None."""
    match = re.match(r"^[a-z][a-z0-9+.-]*://\S+/[^/]+-([^-/]+)-([^-/]+)\.(?:tar\.bz2|conda)$", text, re.IGNORECASE)
    return (match.group(1), match.group(2)) if match else None


def _is_local(text: str) -> bool:
    """A path or editable install on the sender's machine: nothing the recipient can fetch."""
    body = text[2:].strip() if text.startswith("-e ") else text.removeprefix("--editable").strip(" =")
    if text.startswith(("-e ", "--editable")) and _vcs_url(body):
        return False  # `-e git+https://…#egg=x`: fetchable; installed as a normal package
    return (
        text.startswith(("-e ", "--editable", "/", ".", "\\", "~"))
        or "file:" in text.lower()
        or re.match(r"^[a-zA-Z]:[\\/]", text) is not None
        or _relative_path(text)
    )


_ARCHIVES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".tar")


def _relative_path(text: str) -> bool:
    """`ext/simple-knn`, `dist/x-1.0-py3-none-any.whl`: pip reads a requirement with a path
    separator, or an archive's name, as a file on this machine (a project name has neither)."""
    body = text.split(";", 1)[0].strip()
    if "://" in body or " @ " in body or "@" in body.split("/", 1)[0]:
        return False
    return "/" in body or "\\" in body or body.lower().endswith(_ARCHIVES)


def _local_pin(text: str) -> PipPin:
    name = text.split("#egg=")[-1] if "#egg=" in text else text
    return PipPin(raw=text, name=canonical(re.split(r"[\s@=<>]", name.strip())[0] or name), version=None, local=True)


def _vcs_url(text: str) -> bool:
    return re.match(r"^(git|hg|svn|bzr)\+[a-z]+://", text, re.IGNORECASE) is not None


def _split_hashes(text: str) -> tuple[str, tuple[str, ...]]:
    """`x==1 --hash=sha256:ab --hash sha256:cd` -> ('x==1', ('sha256:ab', 'sha256:cd'))."""
    hashes = tuple(m.group(1) for m in re.finditer(r"\s--hash[=\s]\s*(\S+)", text))
    if not hashes:
        return text, ()
    return re.sub(r"\s--hash[=\s]\s*\S+", "", text).strip(), hashes


def _url_name(url: str) -> str | None:
    """The project a bare URL names: `#egg=name`, a wheel's or sdist's file name, a repository's name."""
    from packaging.utils import InvalidSdistFilename, InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename

    egg = re.search(r"[#&]egg=([A-Za-z0-9][A-Za-z0-9._\-]*)", url)
    if egg:
        return egg.group(1)
    filename = last_segment(url)
    try:
        if wheel_file_of(url):
            return parse_wheel_filename(wheel_file_of(url))[0]
        if filename.endswith((".tar.gz", ".zip", ".tar.bz2")):
            return parse_sdist_filename(filename)[0]
    except (InvalidWheelFilename, InvalidSdistFilename, ValueError):
        pass
    if _vcs_url(url):
        from urllib.parse import urlsplit

        path = urlsplit(url.split("+", 1)[1]).path.rstrip("/")
        repo = path.rsplit("/", 1)[-1].split("@", 1)[0]
        return repo.removesuffix(".git") or None
    return None


def _exact_version(req: Requirement) -> str | None:
    """The version of `name==version` (or `===`); None for ranges, wildcards, URLs and several clauses."""
    specs = list(req.specifier)
    if req.url or len(specs) != 1 or specs[0].operator not in ("==", "===") or specs[0].version.endswith(".*"):
        return None
    return specs[0].version


def parse_pip_option(raw: str) -> tuple[str, str] | None:
    """An option line of a pip: section: `--extra-index-url URL` -> ('extra_index_urls', URL);
    other options come back under their own name (`--trusted-host` -> ('--trusted-host', 'x')).
    None for a line that is not an option."""
    text = _one_line(raw, "pip option")
    if not text.startswith("-") or text.startswith(("-e ", "--editable")):
        return None
    match = re.match(r"^(--?[A-Za-z][A-Za-z\-]*)(?:[=\s]\s*(.*))?$", text)
    if not match:
        if text[:2] in ("-i", "-f"):  # `-ihttps://…`
            return INDEX_OPTIONS[text[:2]], text[2:].strip()
        return text, ""
    option, value = match.group(1), (match.group(2) or "").strip()
    return INDEX_OPTIONS.get(option, option), value


def parse_pip_line(raw: str) -> PipPin | None:
    """The one reader of pip requirements: a line of a pip: section, requirements.txt or a bundle's manifest.

    None for blank lines, comments and options (`--extra-index-url` and friends: see
    `parse_pip_option`). Every requirement form pip accepts comes back: PEP 508 (`x>=1`,
    `x[extra]~=2.6; python_version<"3.12"`, `x @ https://…`), bare VCS and file URLs,
    `-e git+…` (installed as a normal package), local paths (marked `local`), and exact pins
    carrying `--hash=sha256:…` options."""
    from packaging.requirements import InvalidRequirement, Requirement

    text = _one_line(raw, "pip requirement")
    if not text or text.startswith("#"):
        return None
    text = re.sub(r"\s+#.*$", "", text)  # a trailing comment
    if _is_local(text):
        return _local_pin(text)
    if text.startswith(("-e ", "--editable")):
        text = text.split(None, 1)[1] if text.startswith("-e ") else text.removeprefix("--editable").strip(" =")
    elif text.startswith("-"):
        return None
    spec, hashes = _split_hashes(text)
    if _vcs_url(spec) or re.match(r"^https?://", spec, re.IGNORECASE):
        name = _url_name(spec)
        if not name:
            raise UsageError(f"cannot tell which package the pip requirement {raw!r} is: add #egg=NAME")
        return PipPin(raw=text, name=canonical(name), version=None, url=spec, hashes=hashes, spec=spec)
    try:
        req = Requirement(spec)
    except InvalidRequirement:
        return _unreadable_pin(raw, text)
    if req.url and req.url.lower().startswith("file:"):
        return _local_pin(text)
    return PipPin(
        raw=text,
        name=canonical(req.name),
        version=_exact_version(req),
        requirement=req,
        url=req.url or None,
        hashes=hashes,
        spec=spec,
    )


def _unreadable_pin(raw: str, text: str) -> PipPin:
    # Not PEP 508 (a trailing pip option pip may still know): keep it as written, not exact, so
    # that the recipient's pip names it rather than pack guessing at it.
    match = _NAME.match(text)
    if not match:
        raise UsageError(f"cannot read the pip requirement {raw!r}")
    return PipPin(raw=text, name=canonical(match["name"]), version=None, spec=text)
