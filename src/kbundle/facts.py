"""Every compatibility table (kbundle/data/*.yaml, each naming its sources) as typed, read-only records,
and the one Version type they are written in.

Each table is validated when it is first loaded and then cached: a missing or mistyped key is one
`DataError` naming the file and the key, never a KeyError deep inside the CUDA choice on a user's machine.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any, NoReturn, Optional, TypeVar

from packaging.version import InvalidVersion
from packaging.version import Version as _Pep440

from kbundle.errors import KbundleError
from kbundle.resources import load_data

T = TypeVar("T")


# ---------------------------------------------------------------- the one Version type


@dataclass(frozen=True, order=True)
class Version:
    """A dotted version, ordered by its numbers ('11.8' < '11.10'), printed as it was written.

    Only the release numbers count: '2.0.1+cu118' equals '2.0.1', and a driver's '520.61.05'
    compares as (520, 61, 5) but still prints as '520.61.05' in messages."""

    parts: tuple[int, ...]
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a version needs at least one number")

    @classmethod
    def parse(cls, text: object) -> Version:
        """PEP 440 where it applies (packaging); else the leading numbers ('11.8.*', '1.0_1')."""
        text = str(text).strip()
        try:
            parts = _Pep440(text).release
        except InvalidVersion:
            parts = _leading_numbers(text)
        if not parts:
            raise ValueError(f"not a version: {text!r}")
        return cls(tuple(parts), text)

    @classmethod
    def lenient(cls, text: Optional[str]) -> Optional[Version]:
        """`parse` for versions read from a user's environment: None instead of an error."""
        if not text:
            return None
        try:
            return cls.parse(text)
        except ValueError:
            return None

    @property
    def major(self) -> int:
        return self.parts[0]

    @property
    def minor(self) -> int:
        return self.parts[1] if len(self.parts) > 1 else 0

    @property
    def major_minor(self) -> Version:
        """The grain of the CUDA tables: '12.4.127' -> 12.4, '11' -> 11.0."""
        return Version((self.major, self.minor))

    def starts_with(self, prefix: Version) -> bool:
        """'2.3.1' starts with '2.3' (and not with '2.30'): how framework tables are keyed."""
        return self.parts[: len(prefix.parts)] == prefix.parts

    def __str__(self) -> str:
        return self.text or ".".join(str(p) for p in self.parts)


def _leading_numbers(text: str) -> tuple[int, ...]:
    """The dotted numbers a non-PEP 440 version starts with; stops at the first piece that is not one."""
    parts: list[int] = []
    for piece in text.split("."):
        digits = piece[: len(piece) - len(piece.lstrip("0123456789"))]
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:
            break
    return tuple(parts)


def longest_prefix(table: Mapping[Version, T], version: Optional[Version]) -> Optional[T]:
    """The entry whose key is the longest prefix of `version` ('2.3' for 2.3.1)."""
    if version is None:
        return None
    keys = [k for k in table if version.starts_with(k)]
    return table[max(keys, key=lambda k: len(k.parts))] if keys else None


# ---------------------------------------------------------------- reading a table, with clear errors


class DataError(KbundleError):
    """A shipped data table is broken (a missing key, a wrong type): an installation problem."""


@dataclass(frozen=True)
class _Node:
    """One value in a data file, with its path there, so that every complaint can name both."""

    file: str
    path: str
    value: Any

    def fail(self, problem: str) -> NoReturn:
        raise DataError(f"kbundle's data file {self.file} is broken: {self.path or 'the top level'} {problem}")

    def _child(self, key: object, value: Any) -> _Node:
        # `builds["2.3"].cuda`, `pip[0].pattern`: keys with dots stay readable.
        if isinstance(key, int):
            part = f"[{key}]"
        elif str(key).isidentifier():
            part = f".{key}" if self.path else str(key)
        else:
            part = f'["{key}"]'
        return _Node(self.file, self.path + part, value)

    def _typed(self, kind: type, what: str) -> Any:
        if not isinstance(self.value, kind) or isinstance(self.value, bool) and kind is not bool:
            self.fail(f"must be {what}, not {type(self.value).__name__} {self.value!r}")
        return self.value

    def __getitem__(self, key: str) -> _Node:
        table = self._typed(dict, "a mapping")
        if key not in table:
            self._child(key, None).fail("is missing")
        return self._child(key, table[key])

    def items(self) -> list[tuple[str, _Node]]:
        table = self._typed(dict, "a mapping")
        for key in table:
            if not isinstance(key, str):
                # An unquoted 11.10 would be read as the float 11.1: keys must be quoted.
                self._child(key, None).fail("must be a quoted string key")
        return [(key, self._child(key, value)) for key, value in table.items()]

    def version_items(self) -> list[tuple[Version, _Node]]:
        return [(_key_version(node, key), node) for key, node in self.items()]

    def seq(self) -> list[_Node]:
        return [self._child(i, v) for i, v in enumerate(self._typed(list, "a list"))]

    def text(self) -> str:
        value = self._typed(str, "a string")
        if not value.strip():
            self.fail("is empty")
        return value

    def texts(self) -> tuple[str, ...]:
        return tuple(node.text() for node in self.seq())

    def flag(self) -> bool:
        return self._typed(bool, "true or false")

    def version(self) -> Version:
        text = self.text()
        try:
            return Version.parse(text)
        except ValueError:
            self.fail(f"is not a version: {text!r}")


def _key_version(node: _Node, key: str) -> Version:
    try:
        return Version.parse(key)
    except ValueError:
        node.fail("is not keyed by a version")


def _frozen(mapping: dict) -> Mapping:
    # Tables are cached and shared: nobody may change one under another's feet.
    return MappingProxyType(mapping)


def _open(name: str, data: Any) -> _Node:
    """A file's root node; every file must name its sources."""
    root = _Node(f"{name}.yaml", "", data)
    root["source"].text()
    return root


# ---------------------------------------------------------------- frameworks.yaml


@dataclass(frozen=True)
class PackageNames:
    conda: frozenset[str]
    pip: frozenset[str]

    def of(self, source: str) -> frozenset[str]:
        """The names on one side: source is 'conda' or 'pip'."""
        return self.conda if source == "conda" else self.pip


@dataclass(frozen=True)
class TfBuild:
    cuda: Version
    cudnn: Version


@dataclass(frozen=True)
class TensorFlow:
    names: PackageNames
    builds: Mapping[Version, TfBuild]  # tested build configurations, by TF major.minor
    cpu_names: frozenset[str]
    gpu_in_plain_package_from: Version
    carrying_extras: frozenset[str]  # pip extras that pull the CUDA runtime as nvidia-* wheels
    gpu_intent: frozenset[str] = frozenset()  # pip names that say TensorFlow ran on a GPU
    conda_cudas: Mapping[Version, tuple[Version, ...]] = field(default_factory=dict)  # conda builds' other CUDAs
    last_for_python: Mapping[Version, Version] = field(default_factory=dict)  # Python x.y -> last TF release

    def build_for(self, version: Optional[Version]) -> Optional[TfBuild]:
        return longest_prefix(self.builds, version)

    def builds_for_python(self, python: Optional[str]) -> tuple[Version, ...]:
        """The tested builds' versions a Python can install (all of them when it is not known or new)."""
        last = longest_prefix(self.last_for_python, Version.lenient(python)) if python else None
        return tuple(v for v in self.builds if last is None or v <= last)

    def conda_builds(self, version: Optional[Version]) -> tuple[Version, ...]:
        """Every CUDA conda's GPU TensorFlow of this version was built for: the tested one first."""
        tested = self.build_for(version)
        return ((tested.cuda,) if tested else ()) + (longest_prefix(self.conda_cudas, version) or ())


@dataclass(frozen=True)
class Torch:
    names: PackageNames
    carries_runtime: bool
    builds: Mapping[Version, tuple[Version, ...]]  # CUDA builds of a release, PyPI's default first

    def cudas_for(self, version: Optional[Version]) -> tuple[Version, ...]:
        return longest_prefix(self.builds, version) or ()


@dataclass(frozen=True)
class JaxExtra:
    cuda: Version
    carries: bool  # pulls nvidia-* wheels


@dataclass(frozen=True)
class Jax:
    names: PackageNames
    plugins: Mapping[str, Version]  # plug-in wheel -> the CUDA it pulls
    extras: Mapping[str, JaxExtra]  # `jax[cuda12]` -> what it gives


@dataclass(frozen=True)
class Rapids:
    names: frozenset[str]
    cuda: Mapping[Version, Version]  # RAPIDS release line -> the CUDA assumed without a build string

    def cuda_for(self, version: Optional[Version]) -> Optional[Version]:
        return longest_prefix(self.cuda, version)


@dataclass(frozen=True)
class OnnxRuntime:
    names: frozenset[str]
    builds: Mapping[Version, TfBuild]  # release -> CUDA, cuDNN

    def build_for(self, version: Optional[Version]) -> Optional[TfBuild]:
        return longest_prefix(self.builds, version)


@dataclass(frozen=True)
class Cupy:
    major_defaults: Mapping[int, Version]  # CUDA major -> the version assumed for a major-only wheel


@dataclass(frozen=True)
class PipRuntime:
    pattern: re.Pattern[str]  # on the canonical distribution name
    gives: str  # cuda | cudnn


@dataclass(frozen=True)
class RuntimePackages:
    conda: Mapping[str, str]  # conda name -> cuda | cudnn
    pip: tuple[PipRuntime, ...]
    selectors: Mapping[str, Version] = field(default_factory=dict)  # pytorch's cuda100-style metapackages
    published: Mapping[str, tuple[Version, ...]] = field(default_factory=dict)  # CUDA versions a package exists at

    def gives(self, name: str, source: str) -> Optional[str]:
        """What a package is a runtime of (cuda | cudnn), or None."""
        if source == "conda":
            return self.conda.get(name)
        return next((r.gives for r in self.pip if r.pattern.fullmatch(name)), None)


@dataclass(frozen=True)
class CondaRuntime:
    specs: Mapping[Version, tuple[str, ...]]  # CUDA major.minor -> conda specs; `{cudnn}` is filled in
    default_cudnn: Mapping[int, Version]  # CUDA major -> cuDNN when the framework names none
    unnamed_build_cuda: Version  # a conda CUDA build that names no version (`*cuda*`)


@dataclass(frozen=True)
class Frameworks:
    tensorflow: TensorFlow
    torch: Torch
    jax: Jax
    cupy: Cupy
    rapids: Rapids
    onnxruntime: OnnxRuntime
    runtime_packages: RuntimePackages
    conda_runtime: CondaRuntime


_RUNTIME_KINDS = ("cuda", "cudnn")


def _names(node: _Node) -> PackageNames:
    return PackageNames(frozenset(node["conda"].texts()), frozenset(node["pip"].texts()))


def _section(root: _Node, key: str) -> _Node:
    node = root[key]
    node["source"].text()
    return node


def _tensorflow(node: _Node) -> TensorFlow:
    builds = {v: TfBuild(b["cuda"].version(), b["cudnn"].version()) for v, b in node["builds"].version_items()}
    conda_cudas = {v: tuple(c.version() for c in n.seq()) for v, n in node["conda_cudas"].version_items()}
    return TensorFlow(
        _names(node["names"]),
        _frozen(builds),
        frozenset(node["cpu_names"].texts()),
        node["gpu_in_plain_package_from"].version(),
        frozenset(node["carrying_extras"].texts()),
        frozenset(node["gpu_intent"].texts()),
        _frozen(conda_cudas),
        _frozen({v: n.version() for v, n in node["last_for_python"].version_items()}),
    )


def _jax(node: _Node) -> Jax:
    extras = {k: JaxExtra(n["cuda"].version(), n["carries"].flag()) for k, n in node["extras"].items()}
    plugins = {k: n.version() for k, n in node["plugins"].items()}
    return Jax(_names(node["names"]), _frozen(plugins), _frozen(extras))


def _rapids(node: _Node) -> Rapids:
    cuda = {v: n.version() for v, n in node["cuda"].version_items()}
    return Rapids(frozenset(node["names"].texts()), _frozen(cuda))


def _onnxruntime(node: _Node) -> OnnxRuntime:
    builds = {v: TfBuild(b["cuda"].version(), b["cudnn"].version()) for v, b in node["builds"].version_items()}
    return OnnxRuntime(frozenset(node["names"].texts()), _frozen(builds))


def _torch(node: _Node) -> Torch:
    builds = {v: tuple(c.version() for c in b.seq()) for v, b in node["builds"].version_items()}
    for version, cudas in builds.items():
        if not cudas:
            node["builds"].fail(f'["{version}"] lists no CUDA build')
    return Torch(_names(node["names"]), node["carries_runtime"].flag(), _frozen(builds))


def _kind(node: _Node) -> str:
    kind = node.text()
    if kind not in _RUNTIME_KINDS:
        node.fail(f"must be one of {', '.join(_RUNTIME_KINDS)}, not {kind!r}")
    return kind


def _pattern(node: _Node) -> re.Pattern[str]:
    try:
        return re.compile(node.text())
    except re.error as exc:
        node.fail(f"is not a regular expression ({exc})")


def _runtime_packages(node: _Node) -> RuntimePackages:
    conda = {name: _kind(kind) for name, kind in node["conda"].items()}
    pip = tuple(PipRuntime(_pattern(p["pattern"]), _kind(p["gives"])) for p in node["pip"].seq())
    selectors = {name: n.version() for name, n in node["conda_selectors"].items()}
    published = {name: tuple(v.version() for v in n.seq()) for name, n in node["published"].items()}
    return RuntimePackages(_frozen(conda), pip, _frozen(selectors), _frozen(published))


def _major_map(node: _Node) -> dict[int, Version]:
    return {_key_version(n, key).major: n.version() for key, n in node.items()}


def _conda_runtime(node: _Node) -> CondaRuntime:
    specs = {v: s.texts() for v, s in node["specs"].version_items()}
    defaults = _major_map(node["default_cudnn"])
    for version in specs:
        if version.major not in defaults:
            node["default_cudnn"].fail(f'has no entry for CUDA {version.major} (specs["{version}"] needs one)')
    return CondaRuntime(_frozen(specs), _frozen(defaults), node["unnamed_build_cuda"].version())


def frameworks_from(data: Any) -> Frameworks:
    """frameworks.yaml's contents, checked and typed."""
    root = _open("frameworks", data)
    return Frameworks(
        tensorflow=_tensorflow(_section(root, "tensorflow")),
        torch=_torch(_section(root, "torch")),
        jax=_jax(_section(root, "jax")),
        cupy=Cupy(_frozen(_major_map(_section(root, "cupy")["major_defaults"]))),
        rapids=_rapids(_section(root, "rapids")),
        onnxruntime=_onnxruntime(_section(root, "onnxruntime")),
        runtime_packages=_runtime_packages(_section(root, "runtime_packages")),
        conda_runtime=_conda_runtime(_section(root, "conda_runtime")),
    )


# ---------------------------------------------------------------- base_tags.yaml


@dataclass(frozen=True)
class LiveTag:
    """A published nvidia/cuda tag set: `{release}-{flavour}-{os}`."""

    release: str  # the point release in the tag, e.g. 11.8.0
    os: str
    cudnn_tag: str  # the cuDNN part of the cudnn-runtime flavour, e.g. cudnn8
    cudnn: Version  # the cuDNN that flavour holds


@dataclass(frozen=True)
class BaseTags:
    repository: str
    live: Mapping[Version, LiveTag]  # CUDA major.minor -> the tag kbundle uses
    deleted: Mapping[Version, str]  # CUDA major.minor -> the last tag before it was deleted
    glibc: Mapping[str, Version]  # OS as tags spell it -> its glibc
    os_aliases: Mapping[str, str]  # another name of an OS in image references (a codename) -> the OS
    glibc_unknown: Version
    cpu_image: str
    cpu_glibc: Version

    def known_cuda(self) -> list[Version]:
        return sorted(set(self.live) | set(self.deleted))

    def glibc_for(self, image: str) -> Version:
        """The glibc of a base image, from the OS its reference names."""
        for os_name, glibc in self.glibc.items():
            if os_name in image:
                return glibc
        for alias, os_name in self.os_aliases.items():
            if alias in image:
                return self.glibc[os_name]
        return self.glibc_unknown


def _known_os(node: _Node, glibc: Mapping[str, Version]) -> str:
    os_name = node.text()
    if os_name not in glibc:
        node.fail(f"names the OS {os_name!r}, which the glibc table does not list")
    return os_name


def _live_tag(node: _Node, glibc: Mapping[str, Version]) -> LiveTag:
    return LiveTag(
        node["release"].text(), _known_os(node["os"], glibc), node["cudnn"].text(), node["cudnn_version"].version()
    )


def base_tags_from(data: Any) -> BaseTags:
    """base_tags.yaml's contents, checked and typed (every OS a tag names has a glibc)."""
    root = _open("base_tags", data)
    glibc = {os_name: node.version() for os_name, node in root["glibc"].items()}
    aliases = {alias: _known_os(node, glibc) for alias, node in root["os_aliases"].items()}
    cpu = root["cpu_base"]
    return BaseTags(
        repository=root["repository"].text(),
        live=_frozen({v: _live_tag(n, glibc) for v, n in root["live"].version_items()}),
        deleted=_frozen({v: n.text() for v, n in root["deleted"].version_items()}),
        glibc=_frozen(glibc),
        os_aliases=_frozen(aliases),
        glibc_unknown=root["glibc_unknown"].version(),
        cpu_image=cpu["image"].text(),
        cpu_glibc=glibc[_known_os(cpu["os"], glibc)],
    )


# ---------------------------------------------------------------- normalise.yaml


@dataclass(frozen=True)
class OsOnly:
    """Packages that exist only for one other OS, and the reason `pack` records when dropping one."""

    os: str
    reason: str
    names: tuple[str, ...]  # a name may be a glob: `m2-*`, `vs20*_runtime`

    def covers(self, name: str) -> bool:
        return _matches_any(name, self.names)


def _matches_any(name: str, patterns) -> bool:
    # fnmatchcase: package names are lower case already, and `[` never appears in one.
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class OsOnlyVersions:
    """Versions of a package that exist on Linux too, published only for another OS."""

    os: str
    versions: tuple[str, ...]  # globs on the version text: `5.*`

    def covers(self, version: Optional[str]) -> bool:
        return version is not None and _matches_any(version, self.versions)


def _os_only_reason(tables: tuple[OsOnly, ...], name: str) -> Optional[str]:
    return next((t.reason for t in tables if t.covers(name)), None)


@dataclass(frozen=True)
class DeadName:
    """A pip name that refuses to install (a placeholder pointing at the real project)."""

    use: str  # the real project
    keep_version: bool  # whether the placeholder's version means anything for the real project
    source: str
    since: Optional[str] = None  # the first placeholder version; None: every version

    def refuses(self, specifier, version: Optional[str]) -> bool:
        """Whether pip would reach a placeholder: every pin when `since` is None; else an exact
        version at or past it, or a range that admits it."""
        if self.since is None:
            return True
        if version is not None:
            return Version.lenient(version) is not None and Version.lenient(version) >= Version.parse(self.since)
        return specifier is None or specifier.contains(self.since, prereleases=True)


@dataclass(frozen=True)
class LocalIndex:
    """Where pip builds with a local version label (`+cu113`) of some projects are served."""

    names: frozenset[str]
    local: re.Pattern[str]  # the label, matched whole
    index: str  # a URL; `{local}` is the label
    kind: str  # extra_index_url | find_links
    versions: tuple[str, ...] = ()  # globs on the public version; empty: any

    def url_for(self, name: str, public: str, local: str) -> Optional[str]:
        """The URL for `name==public+local`, or None; the label's named groups fill the URL too."""
        match = self.local.fullmatch(local) if name in self.names else None
        if not match or (self.versions and not _matches_any(public, self.versions)):
            return None
        return self.index.format(local=local, **match.groupdict())


@dataclass(frozen=True)
class NormaliseFacts:
    conda_os_only: tuple[OsOnly, ...]
    pip_os_only: tuple[OsOnly, ...]
    pip_replace: Mapping[str, str]  # pip name on another OS -> its name on Linux
    variant_markers: Mapping[str, str]  # build-string word -> the intent it carries (first match wins)
    platform_markers: Mapping[str, frozenset[str]]  # subdir -> packages (globs) published for it alone
    platform_build_words: Mapping[str, frozenset[str]]  # subdir -> `_`-separated build-string words
    platform_prefixes: Mapping[str, re.Pattern[str]]  # subdir -> a pattern on `prefix:`
    conda_os_only_versions: Mapping[str, OsOnlyVersions]  # package -> its versions for another OS
    channel_aliases: Mapping[str, tuple[str, ...]]  # named channel -> its URLs (none: a platform-only channel)
    channel_alias: str  # the URL other bare channel names live under
    wheel_url_os_words: Mapping[str, frozenset[str]] = field(default_factory=dict)  # OS -> URL path words
    pip_dead_names: Mapping[str, DeadName] = field(default_factory=dict)  # pip name -> its real project
    pip_local_indexes: tuple[LocalIndex, ...] = ()  # first match wins

    def conda_os_reason(self, name: str) -> Optional[str]:
        return _os_only_reason(self.conda_os_only, name)

    def pip_os_reason(self, name: str) -> Optional[str]:
        return _os_only_reason(self.pip_os_only, name)

    def platforms_of_package(self, name: str) -> set[str]:
        """The subdirs a package's presence betrays (empty when it says nothing)."""
        return {p for p, names in self.platform_markers.items() if _matches_any(name, names)}

    @property
    def platform_channels(self) -> frozenset[str]:
        """Channels that exist for another OS only (they resolve to no URL)."""
        return frozenset(name for name, urls in self.channel_aliases.items() if not urls)


def _os_only(node: _Node) -> tuple[OsOnly, ...]:
    return tuple(OsOnly(os_name, n["reason"].text(), n["names"].texts()) for os_name, n in node.items())


def _dead_name(node: _Node) -> DeadName:
    table = node._typed(dict, "a mapping")
    since = node["from"].version() if "from" in table else None
    return DeadName(
        node["use"].text(), node["keep_version"].flag(), node["source"].text(), str(since) if since else None
    )


_INDEX_KINDS = ("extra_index_url", "find_links")


def _local_index(node: _Node) -> LocalIndex:
    table = node._typed(dict, "a mapping")
    kind = node["kind"].text() if "kind" in table else "extra_index_url"
    if kind not in _INDEX_KINDS:
        node["kind"].fail(f"must be one of {', '.join(_INDEX_KINDS)}, not {kind!r}")
    index = node["index"].text()
    if not index.startswith("https://"):
        node["index"].fail("must be an https:// URL")
    versions = node["versions"].texts() if "versions" in table else ()
    return LocalIndex(frozenset(node["names"].texts()), _pattern(node["local"]), index, kind, versions)


def normalise_facts_from(data: Any) -> NormaliseFacts:
    """normalise.yaml's contents, checked and typed."""
    root = _open("normalise", data)
    return NormaliseFacts(
        conda_os_only=_os_only(root["conda_os_only"]),
        pip_os_only=_os_only(root["pip_os_only"]),
        pip_replace=_frozen({k: n.text() for k, n in root["pip_replace"].items()}),
        variant_markers=_frozen({k: n.text() for k, n in root["variant_markers"].items()}),
        platform_markers=_frozen({k: frozenset(n.texts()) for k, n in root["platform_markers"].items()}),
        platform_build_words=_frozen({k: frozenset(n.texts()) for k, n in root["platform_build_words"].items()}),
        platform_prefixes=_frozen({k: _pattern(n) for k, n in root["platform_prefixes"].items()}),
        conda_os_only_versions=_frozen(
            {
                k: OsOnlyVersions(n["os"].text(), n["versions"].texts())
                for k, n in root["conda_os_only_versions"].items()
            }
        ),
        channel_aliases=_frozen({k: n.texts() for k, n in root["channel_aliases"].items()}),
        channel_alias=root["channel_alias"].text(),
        wheel_url_os_words=_frozen({k: frozenset(n.texts()) for k, n in root["wheel_url_os_words"].items()}),
        pip_dead_names=_frozen({k: _dead_name(n) for k, n in root["pip_dead_names"].items()}),
        pip_local_indexes=tuple(_local_index(n) for n in root["pip_local_indexes"].seq()),
    )


# ---------------------------------------------------------------- cuda_drivers.yaml + gpu_arch.yaml


@dataclass(frozen=True)
class Arch:
    capability: Version
    name: str
    first: Version  # the first CUDA that compiles native code for it
    last: Optional[Version]  # the last CUDA that still does; None: still supported


@dataclass(frozen=True)
class CompatTables:
    toolkit_driver: Mapping[Version, Version]  # CUDA major.minor -> minimum driver (full support)
    minor_compat: Mapping[int, Version]  # CUDA major -> oldest driver for minor-version compatibility
    arches: Mapping[Version, Arch]  # compute capability -> native CUDA range

    def min_driver(self, cuda: str | Version) -> Optional[tuple[Version, Version]]:
        """The driver needed for `cuda`: the table's entry for it, or for the next release
        listed after it (conservative for versions the table skips). None when newer than all."""
        want = _as_version(cuda).major_minor
        for key in sorted(self.toolkit_driver):
            if key >= want:
                return key, self.toolkit_driver[key]
        return None

    def highest_cuda_for_driver(self, driver: str | Version) -> Optional[Version]:
        have = _as_version(driver)
        fits = [k for k, d in self.toolkit_driver.items() if d <= have]
        return max(fits) if fits else None

    def arch(self, capability: str | Version) -> Optional[Arch]:
        return self.arches.get(_as_version(capability).major_minor)


def _as_version(value: str | Version) -> Version:
    return value if isinstance(value, Version) else Version.parse(value)


def _arch(capability: Version, node: _Node) -> Arch:
    last = node["last"]
    return Arch(
        capability, node["name"].text(), node["first"].version(), last.version() if last.value is not None else None
    )


def compat_tables_from(drivers: Any, arches: Any) -> CompatTables:
    """cuda_drivers.yaml and gpu_arch.yaml, checked and typed."""
    drivers_root, arch_root = _open("cuda_drivers", drivers), _open("gpu_arch", arches)
    return CompatTables(
        toolkit_driver=_frozen({v: n.version() for v, n in drivers_root["toolkit"].version_items()}),
        minor_compat=_frozen(_major_map(drivers_root["minor_compat"])),
        arches=_frozen({v.major_minor: _arch(v, n) for v, n in arch_root["architectures"].version_items()}),
    )


# ---------------------------------------------------------------- layers.yaml

_REST = ("conda", "pip")
_GROUP_NAME = re.compile(r"[a-z][a-z0-9-]*")


@dataclass(frozen=True)
class LayerGroup:
    """One layer of the image's environment: the packages whose files it holds."""

    name: str  # lower case; the context folder and the Dockerfile say it
    holds: str  # what it holds, in words: the Dockerfile's comment over its COPY
    conda: tuple[str, ...] = ()  # globs on normalised conda package names
    pip: tuple[str, ...] = ()  # globs on normalised pip distribution names
    rest: Optional[str] = None  # "conda" or "pip": every package of that side no other group claims

    def claims(self, source: str, name: str) -> bool:
        """Whether this group's globs name the package `name` of `source` ('conda' or 'pip')."""
        return _matches_any(name, self.conda if source == "conda" else self.pip)


@dataclass(frozen=True)
class LayerGroups:
    groups: tuple[LayerGroup, ...]  # in the Dockerfile's order

    def group_of(self, source: str, name: str) -> str:
        """The group of a package: the first whose globs name it, else its side's rest group."""
        for group in self.groups:
            if group.claims(source, name):
                return group.name
        return self.rest_of(source)

    def rest_of(self, source: str) -> str:
        return next(g.name for g in self.groups if g.rest == source)

    @property
    def last(self) -> str:
        """Where files no package owns go."""
        return self.groups[-1].name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)


def _layer_group(node: _Node) -> LayerGroup:
    name = node["name"].text()
    if not _GROUP_NAME.fullmatch(name):
        node["name"].fail(f"must be a lower-case word (letters, digits, -), not {name!r}")
    table = node._typed(dict, "a mapping")
    rest = node["rest"].text() if "rest" in table else None
    if rest is not None and rest not in _REST:
        node["rest"].fail(f"must be one of {', '.join(_REST)}, not {rest!r}")
    globs = {side: node[side].texts() if side in table else () for side in _REST}
    for side, patterns in globs.items():
        if any(p != p.lower() for p in patterns):
            node[side].fail("must be lower case (names are matched normalised)")
    return LayerGroup(name, node["holds"].text(), globs["conda"], globs["pip"], rest)


def layer_groups_from(data: Any) -> LayerGroups:
    """layers.yaml's contents, checked and typed: unique names, one rest group for each side."""
    root = _open("layers", data)
    groups = tuple(_layer_group(n) for n in root["groups"].seq())
    if len({g.name for g in groups}) != len(groups):
        root["groups"].fail("must not name a group twice")
    for side in _REST:
        if [g.rest for g in groups].count(side) != 1:
            root["groups"].fail(f"must mark exactly one group `rest: {side}`")
    return LayerGroups(groups)


# ---------------------------------------------------------------- kernel_noise.yaml


@dataclass(frozen=True)
class NoiseGroup:
    """Lines a kernel prints that only mean one thing (no GPU here), and the one line that says it."""

    summary: str
    patterns: tuple[re.Pattern[str], ...]

    def matches(self, line: str) -> bool:
        return any(p.search(line) for p in self.patterns)


@dataclass(frozen=True)
class KernelNoise:
    groups: tuple[NoiseGroup, ...]

    def summary_for(self, line: str) -> Optional[str]:
        """The summary of the first group that takes `line`; None for a line that must pass."""
        return next((g.summary for g in self.groups if g.matches(line)), None)


def kernel_noise_from(data: Any) -> KernelNoise:
    """kernel_noise.yaml's contents, checked and typed: every pattern compiles."""
    root = _open("kernel_noise", data)
    groups = tuple(
        NoiseGroup(n["summary"].text(), tuple(_pattern(p) for p in n["patterns"].seq())) for n in root["groups"].seq()
    )
    for node, group in zip(root["groups"].seq(), groups, strict=True):
        if not group.patterns:
            node["patterns"].fail("must list at least one pattern")
    return KernelNoise(groups)


# ---------------------------------------------------------------- the cached loaders


@lru_cache(maxsize=1)
def frameworks() -> Frameworks:
    return frameworks_from(load_data("frameworks"))


@lru_cache(maxsize=1)
def base_tags() -> BaseTags:
    return base_tags_from(load_data("base_tags"))


@lru_cache(maxsize=1)
def normalise_facts() -> NormaliseFacts:
    return normalise_facts_from(load_data("normalise"))


@lru_cache(maxsize=1)
def load_tables() -> CompatTables:
    return compat_tables_from(load_data("cuda_drivers"), load_data("gpu_arch"))


@lru_cache(maxsize=1)
def layer_groups() -> LayerGroups:
    return layer_groups_from(load_data("layers"))


@lru_cache(maxsize=1)
def kernel_noise() -> KernelNoise:
    return kernel_noise_from(load_data("kernel_noise"))


def glibc_for(image: str) -> str:
    """The glibc of a base image, for the lock's __glibc virtual package (data/base_tags.yaml)."""
    return str(base_tags().glibc_for(image))


# ---------------------------------------------------------------- conda_pypi.yaml


@dataclass(frozen=True)
class CondaPypi:
    """Which Python distribution a conda package installs, where the names differ (None: none pip sees)."""

    names: Mapping[str, Optional[str]]


def conda_pypi_from(data: Any) -> CondaPypi:
    """conda_pypi.yaml's contents, checked and typed: each value a distribution name or null."""
    root = _open("conda_pypi", data)
    names: dict[str, Optional[str]] = {}
    for key, node in root["names"].items():
        names[key.lower()] = None if node.value is None else node.text()
    return CondaPypi(_frozen(names))


@lru_cache(maxsize=1)
def conda_pypi() -> CondaPypi:
    return conda_pypi_from(load_data("conda_pypi"))
