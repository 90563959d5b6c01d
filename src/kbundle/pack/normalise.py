"""Turn an environment exported on any OS into one for linux-64.

Drops `prefix:` and packages that exist only on another OS (each with its reason),
drops platform build hashes but keeps a variant's intent (a CUDA build stays a CUDA
build), keeps exact versions, channels and the ordered pip section, and makes sure
the kernel's own package, ipykernel, is there. The facts live in data/normalise.yaml.
"""

from __future__ import annotations

import re
from dataclasses import replace

from kbundle.bundle.format import Added, Changed, Dropped, Variant
from kbundle.facts import normalise_facts
from kbundle.pack.platforms import Availability, verdict
from kbundle.pack.records import NormalisedEnv, RawEnv
from kbundle.pack.textfiles import write_environment_yml
from kbundle.specs import CondaSpec, PipIndexes, PipPin, parse_conda_spec, parse_pip_line

_WORDS = re.compile(r"[a-z]+")
_NO_CUDA = re.compile(r"(?:cuda|cudnn)0(?:\.0)*(?![\d.])")


def guess_platform(env: RawEnv) -> str | None:
    from kbundle.pack.platforms import detect_platform

    return detect_platform(env)


def variant_of(build: str | None) -> tuple[str, str] | None:
    """The marker a build string carries and its intent: 'py3.9_cuda11.8_0' -> ('cuda', ...)."""
    if not build:
        return None
    # The pytorch channel's CPU-only builds name CUDA 0.0 ('py35_cuda0.0_cudnn0.0_2'): no CUDA at all.
    words = set(_WORDS.findall(_NO_CUDA.sub("", build.lower())))
    for marker, intent in normalise_facts().variant_markers.items():
        if marker in words:
            return marker, intent
    return None


def normalise_conda_spec(spec: CondaSpec) -> tuple[CondaSpec, Variant | None]:
    """The spec for linux-64: no platform-only channel, no build hash, but a variant's build glob."""
    channel = spec.channel if spec.channel not in normalise_facts().platform_channels else None
    plain = replace(spec, channel=channel, build=None)
    # A range keeps its build selector too: `jaxlib >=0.3=*cuda*` must stay a CUDA build.
    found = variant_of(spec.build)
    if not found:
        return plain, None
    marker, intent = found
    kept = replace(plain, build=_build_glob(spec.build, marker))
    return kept, Variant(spec.name, kept.text, intent)


def _build_glob(build: str, marker: str) -> str:
    # A build string that is just the word (`_tflow_select=2.1.0=gpu`, `blas=1.0=mkl`) stays exact.
    return build if build.lower() == marker else f"*{marker}*"


# Not a channel: conda's instruction not to add `defaults` to the list. The solve uses the listed
# channels only, so it is honoured by leaving it out (https://docs.conda.io/projects/conda/en/
# latest/user-guide/tasks/manage-environments.html#creating-an-environment-file-manually).
NODEFAULTS = "nodefaults"


def _channels(env: RawEnv, dropped: list[Dropped], added: list[Added]) -> list[str]:
    platform_only = normalise_facts().platform_channels
    channels = []
    for channel in env.channels:
        if channel in platform_only:
            dropped.append(Dropped(f"channel {channel}", "a Windows-only channel"))
        elif channel not in channels and channel != NODEFAULTS:
            channels.append(channel)
    if not channels and NODEFAULTS in env.channels:
        channels = ["conda-forge"]
        added.append(Added("channel conda-forge", "the environment names no channel but `nodefaults`"))
    elif not channels:
        # What conda itself uses then; conda-forge only when the sender asks (--add-channel).
        channels = ["defaults"]
        added.append(Added("channel defaults", "the environment names no channel, so conda's defaults"))
    return channels


def _spec_channels(deps: list[CondaSpec], channels: list[str], added: list[Added]) -> list[str]:
    """The channels the kept specs name (`nvidia/label/cuda-11.7.1::cuda-toolkit`) and the list
    does not: conda searches them for that spec, but the solve only sees listed channels, so
    they go after the listed ones (which keep their priority)."""
    for spec in deps:
        if spec.channel and spec.channel not in channels:
            channels.append(spec.channel)
            added.append(Added(f"channel {spec.channel}", f"`{spec.raw}` names it"))
    return channels


LOCAL_REASON = "a local path or editable install on the sender's machine"
_OTHER_OS_WHEEL = (("win", "a Windows"), ("macosx", "a macOS"), ("ios", "an iOS"), ("android", "an Android"))
# The target every kbundle image is: marker values pip would see inside it.
_TARGET_MARKERS = {
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "implementation_name": "cpython",
}


def _other_os_wheel(pin: PipPin) -> str | None:
    """Why a wheel URL cannot install on linux-64 (its platform tags, or for an `any` wheel the
    OS its URL's path names), with what to write instead."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    from kbundle.specs import wheel_file_of

    wheel = wheel_file_of(pin.url) if pin.url else None
    if wheel is None:
        return None
    try:
        name, version, _build, wtags = parse_wheel_filename(wheel)
    except (InvalidWheelFilename, ValueError):
        return None
    platforms = {t.platform for t in wtags}
    if any(p.startswith(("manylinux", "musllinux", "linux")) for p in platforms):
        return None
    if "any" in platforms:
        what = _url_os(pin.url)  # a pure wheel, unless its URL says it was built for one OS
    else:
        what = next(
            (w for prefix, w in _OTHER_OS_WHEEL if any(p.startswith(prefix) for p in platforms)), "another OS's"
        )
    if what is None:
        return None
    return (
        f"{what} wheel ({', '.join(sorted(platforms))}); "
        f"write `{name}=={version}` to let pip pick the Linux wheel of the same version"
    )


def _url_os(url: str) -> str | None:
    """'a macOS' when a folder of the URL's path names macOS (`…/tensorflow/mac/cpu/…`), and so on."""
    from urllib.parse import unquote, urlsplit

    body = re.sub(r"^(git|hg|svn|bzr)\+", "", url, flags=re.IGNORECASE)
    folders = {w.lower() for w in unquote(urlsplit(body).path).split("/")[:-1]}
    words = normalise_facts().wheel_url_os_words
    found = next((os_name for os_name, names in words.items() if folders & names), None)
    return f"a {found}" if found else None


def _marker_reason(pin: PipPin, python: str | None) -> str | None:
    """Why the pin's environment marker rules it out inside the image; None when it applies (or
    cannot be told without a Python version)."""
    marker = pin.requirement.marker if pin.requirement is not None else None
    if marker is None:
        return None
    env = dict(_TARGET_MARKERS)
    if python:
        env.update(python_version=".".join(python.split(".")[:2]), python_full_version=python)
    elif "python" in str(marker):
        return None
    try:
        return None if marker.evaluate(env) else f"its marker ({marker}) is false on linux-64"
    except Exception:
        return None


_DEV_BUILD_REASON = "{local} is a build from the sender's own checkout, which no index serves; its public release"
# Local version labels that setuptools-scm / versioneer give a working tree: `+g1a2b3c4`,
# `+dirty`, `+g1a2b3c4.d20240101`. (`+cu118`, `+cpu` are real builds an index serves: kept.)
_DEV_LOCAL = re.compile(r"(^|\.)(dirty|g[0-9a-f]{7,40}|d20\d{6})(\.|$)")


_UNSERVED_REASON = (
    "`+{local}` is a local build that no index in the pip section serves and PyPI cannot (it refuses local "
    "versions), so kbundle cannot fetch it: its public release; add the index that serves it to keep the build"
)


def _public_release(pin: PipPin, indexed: bool) -> tuple[PipPin, str] | None:
    """A local-version pin nobody can fetch, as its public release, and why: a sender's own dev
    build (`mylib==1.4.2+g1a2b3c4.dirty`), or a build no index serves (`x==1.0+cu113` when the
    section names no index and kbundle knows none for x). None for anything else."""
    if not pin.version or "+" not in pin.version or pin.requirement is None:
        return None
    public, _, local = pin.version.partition("+")
    if _DEV_LOCAL.search(local):
        reason = _DEV_BUILD_REASON.format(local=pin.version)
    elif not indexed and _local_index(pin) is None:
        reason = _UNSERVED_REASON.format(local=local)
    else:
        return None
    req = pin.requirement
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return parse_pip_line(f"{req.name}{extras}=={public}{marker}"), reason


def _replaced(pin: PipPin, linux_name: str, keep_version: bool = True) -> PipPin:
    """The pin under its Linux name, with the same extras, marker and (when it means anything
    for the new name) version constraint."""
    if pin.requirement is None:
        return parse_pip_line(linux_name)
    req = pin.requirement
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return parse_pip_line(f"{linux_name}{extras}{req.specifier if keep_version else ''}{marker}")


def _renamed(pin: PipPin, present: set[str]) -> tuple[PipPin | None, str] | None:
    """The pin under the name that installs on Linux and why; (None, why) when that project is
    already in the environment; None when the name is right as it is."""
    facts = normalise_facts()
    if pin.url:
        return None
    linux = facts.pip_replace.get(pin.name)
    if linux:
        new = _replaced(pin, linux)
        return new, f"{pin.name} is another OS's build of {linux}; on Linux the same pin is {new.text}"
    dead = facts.pip_dead_names.get(pin.name)
    req = pin.requirement
    if dead is None or not dead.refuses(req.specifier if req is not None else None, pin.version):
        return None
    why = (
        f"`{pin.name}` on PyPI is a placeholder that refuses to install (see {dead.source}); the project is {dead.use}"
    )
    if dead.use in present:
        return None, f"{why}, already in the environment"
    return _replaced(pin, dead.use, dead.keep_version), why


def _pip(
    pins: list[PipPin],
    dropped: list[Dropped],
    python: str | None = None,
    changed: list[Changed] | None = None,
    present: set[str] | None = None,
    indexed: bool = True,
) -> list[PipPin]:
    """The pip: section for linux-64, in order: every form pip accepts is kept as written, except
    what cannot exist on Linux (each dropped with its reason and what to write instead), names
    that do not install (renamed, a change), and builds nobody can fetch: a sender's own dev
    build, or a local build no index serves (`indexed`: the section names one), each relaxed to
    its public version. `present`: the names already in the environment (conda and pip)."""
    facts = normalise_facts()
    kept: list[PipPin] = []
    changed = [] if changed is None else changed
    present = {p.name for p in pins} | (present or set())
    for pin in pins:
        public = _public_release(pin, indexed)
        if public is not None:
            changed.append(Changed(f"pip: {pin.raw}", public[0].text, public[1]))
            pin = public[0]
        if pin.local:
            dropped.append(Dropped(f"pip: {pin.raw}", LOCAL_REASON))
            continue
        reason = facts.pip_os_reason(pin.name) or _other_os_wheel(pin) or _marker_reason(pin, python)
        if reason:
            dropped.append(Dropped(f"pip: {pin.raw}", reason))
            continue
        renamed = _renamed(pin, present)
        if renamed is not None and renamed[0] is None:
            dropped.append(Dropped(f"pip: {pin.raw}", renamed[1]))
            continue
        if renamed is not None:
            changed.append(Changed(f"pip: {pin.raw}", renamed[0].text, renamed[1]))
            pin = renamed[0]
        kept.append(pin)
    return kept


def _local_index(pin: PipPin) -> tuple[str, str] | None:
    """The (kind, URL) of the index that serves a local-version pin (`torch==1.12.1+cu113`)."""
    if not pin.version or "+" not in pin.version:
        return None
    public, _, local = pin.version.partition("+")
    for entry in normalise_facts().pip_local_indexes:
        url = entry.url_for(pin.name, public, local)
        if url:
            return entry.kind, url
    return None


def _served_builds(raw: RawEnv) -> list[tuple[str, str, PipPin]]:
    """(kind, URL, pin) for each local-version pin whose index the pip section does not name,
    but kbundle knows; nothing when the section names any index (then that one serves them)."""
    if _names_an_index(raw):
        return []
    found = []
    for pin in raw.pip:
        where = _local_index(pin)
        if where and where[1] not in {url for _, url, _ in found}:
            found.append((*where, pin))
    return found


def _names_an_index(raw: RawEnv) -> bool:
    from kbundle.specs import parse_pip_option

    options = (parse_pip_option(line) for line in _pip_option_lines(raw))
    return any(o is not None and o[0] in ("index_url", "extra_index_urls", "find_links") for o in options)


def _pip_option_lines(raw: RawEnv) -> list[str]:
    """The option lines of the sender's pip: section (or requirements file), in order.

    The readers keep only requirements, so the options are read again from the original text."""
    if raw.source_kind == "requirements":
        return [ln.strip() for ln in raw.source_text.splitlines() if ln.strip().startswith("-")]
    if raw.source_kind != "env-file" or "pip" not in raw.source_text:
        return []
    import yaml

    from kbundle.resources import yaml_loader

    try:
        data = yaml.load(raw.source_text, Loader=yaml_loader())
    except yaml.YAMLError:
        return []
    lines = []
    for item in (data or {}).get("dependencies") or [] if isinstance(data, dict) else []:
        if isinstance(item, dict) and isinstance(item.get("pip"), list):
            lines += [str(v).strip() for v in item["pip"] if str(v).strip().startswith("-")]
    return lines


def pip_indexes(raw: RawEnv, dropped: list[Dropped] | None = None) -> PipIndexes:
    """The pip: section's `--index-url`, `--extra-index-url` and `--find-links` (and `-i`, `-f`).

    Credentials in a URL stay with the sender (the recipient brings their own through pip.conf,
    keyring or .netrc); other options and local find-links folders are dropped, each said so."""
    from kbundle.specs import parse_pip_option, strip_credentials

    dropped = [] if dropped is None else dropped
    index_url, extras, links = None, [], []
    for line in _pip_option_lines(raw):
        option = parse_pip_option(line)
        if option is None:
            continue
        key, value = option
        if key not in ("index_url", "extra_index_urls", "find_links"):
            if key in ("-r", "--requirement", "-c", "--constraint"):
                dropped.append(Dropped(f"pip: {line}", "a file on the sender's machine; list its lines instead"))
            elif key == "--pre":
                # Unlocked, the recipient's pip would choose final releases only: say so.
                dropped.append(
                    Dropped(f"pip: {line}", "not carried: a pre-release is installed only where a pin names it")
                )
            elif key not in ("--trusted-host", "--prefer-binary", "--no-cache-dir"):
                dropped.append(Dropped(f"pip: {line}", "a pip option kbundle does not carry"))
            continue
        url, had = strip_credentials(value)
        if not re.match(r"^https?://", url, re.IGNORECASE):
            dropped.append(Dropped(f"pip: {line}", LOCAL_REASON))
            continue
        if had:
            dropped.append(
                Dropped(
                    f"pip: {key} credentials",
                    "credentials stay with the sender: the recipient "
                    "configures their own (pip.conf, keyring or .netrc)",
                )
            )
        if key == "index_url":
            index_url = url
        elif url not in (extras if key == "extra_index_urls" else links):
            (extras if key == "extra_index_urls" else links).append(url)
    for kind, url, _pin in _served_builds(raw):
        (extras if kind == "extra_index_url" else links).append(url)
    return PipIndexes(index_url, tuple(extras), tuple(links))


def _served_notes(raw: RawEnv) -> list[Added]:
    """What pip_indexes added for local-version pins, said as the manifest's `added` entries."""
    option = {"extra_index_url": "--extra-index-url", "find_links": "--find-links"}
    return [
        Added(
            f"pip: {option[kind]} {url}",
            f"`{pin.raw}` is a local build that only this index serves (PyPI refuses local versions), "
            "and the pip section names no index",
        )
        for kind, url, pin in _served_builds(raw)
    ]


def _python_version(spec: CondaSpec) -> str | None:
    """python's version when the spec pins a plain one (3.10, 3.10.*), else None."""
    if spec.name == "python" and re.fullmatch(r"\d+(\.\d+)*(\.\*)?", spec.version or ""):
        return spec.version.rstrip(".*")
    return None


def normalise(env: RawEnv, available: Availability | None = None) -> NormalisedEnv:
    """`available`: what the channels publish (pack/platforms.py), when they answered; else the table decides."""
    dropped: list[Dropped] = []
    added: list[Added] = []
    variants: list[Variant] = []
    channels = _channels(env, dropped, added)
    deps: list[CondaSpec] = []
    python = None
    changed: list[Changed] = []
    for spec in env.conda:
        found = verdict(spec, available)
        if found is not None and found.to is None:
            dropped.append(Dropped(spec.raw, found.reason))
            continue
        if found is not None:
            changed.append(Changed(spec.raw, found.to.text, found.reason))
            spec = found.to
        kept, variant = normalise_conda_spec(spec)
        if "://" in spec.raw and kept.text != spec.raw:
            changed.append(
                Changed(spec.raw, kept.text, "a package file's URL, for one platform: its version, from the channels")
            )
        if variant:
            variants.append(variant)
        python = _python_version(spec) or python
        deps.append(kept)
    channels = _spec_channels(deps, channels, added)
    present = {d.name for d in deps}
    pip = _pip(env.pip, dropped, python, changed, present, _names_an_index(env))
    pip_indexes(env, dropped)  # only to say which options are not carried
    added += _served_notes(env)
    names = {d.name for d in deps}
    if pip and "pip" not in names:
        deps.append(parse_conda_spec("pip"))
        added.append(Added("pip", "the environment has a pip: section"))
    if "ipykernel" not in names and "ipykernel" not in {p.name for p in pip}:
        deps.append(parse_conda_spec("ipykernel"))
        added.append(Added("ipykernel", "the kernel inside the image needs it"))
    return NormalisedEnv(
        channels=channels,
        dependencies=deps,
        pip=pip,
        python=python,
        dropped=dropped,
        added=added,
        variants=variants,
        changed=changed,
        source_platform=guess_platform(env),
    )


def environment_yml(name: str, env: NormalisedEnv, indexes: PipIndexes | None = None) -> str:
    """The normalised environment as an environment.yml (no prefix, no build hashes); the pip
    section's index options come first, as pip reads them."""
    header = "normalised by kbundle for linux-64; see kbundle.json for what was dropped or added"
    pip = (indexes.option_lines() if indexes and env.pip else []) + [p.text for p in env.pip]
    return write_environment_yml(header, name, env.channels, [d.text for d in env.dependencies], pip)
