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
from kbundle.pack.envfile import write_environment_yml
from kbundle.pack.platforms import Availability, verdict
from kbundle.pack.records import NormalisedEnv, RawEnv
from kbundle.specs import CondaSpec, PipIndexes, PipPin, parse_conda_spec, parse_pip_line

_WORDS = re.compile(r"[a-z]+")


def guess_platform(env: RawEnv) -> str | None:
    from kbundle.pack.platforms import detect_platform

    return detect_platform(env)


def variant_of(build: str | None) -> tuple[str, str] | None:
    """The marker a build string carries and its intent: 'py3.9_cuda11.8_0' -> ('cuda', ...)."""
    if not build:
        return None
    words = set(_WORDS.findall(build.lower()))
    for marker, intent in normalise_facts().variant_markers.items():
        if marker in words:
            return marker, intent
    return None


def normalise_conda_spec(spec: CondaSpec) -> tuple[CondaSpec, Variant | None]:
    """The spec for linux-64: no platform-only channel, no build hash, but a variant's build glob."""
    channel = spec.channel if spec.channel not in normalise_facts().platform_channels else None
    plain = replace(spec, channel=channel, build=None)
    found = variant_of(spec.build) if not spec.constraint else None
    if not found:
        return plain, None
    marker, intent = found
    kept = replace(plain, build=_build_glob(spec.build, marker))
    return kept, Variant(spec.name, kept.text, intent)


def _build_glob(build: str, marker: str) -> str:
    # A build string that is just the word (`_tflow_select=2.1.0=gpu`, `blas=1.0=mkl`) stays exact.
    return build if build.lower() == marker else f"*{marker}*"


def _channels(env: RawEnv, dropped: list[Dropped], added: list[Added]) -> list[str]:
    platform_only = normalise_facts().platform_channels
    channels = []
    for channel in env.channels:
        if channel in platform_only:
            dropped.append(Dropped(f"channel {channel}", "a Windows-only channel"))
        elif channel not in channels:
            channels.append(channel)
    if not channels:
        # What conda itself uses then; conda-forge only when the sender asks (--add-channel).
        channels = ["defaults"]
        added.append(Added("channel defaults", "the environment names no channel, so conda's defaults"))
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
    """Why a wheel URL cannot install on linux-64 (its platform tags), with what to write instead."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    from kbundle.specs import url_filename

    if not pin.wheel_url:
        return None
    try:
        name, version, _build, wtags = parse_wheel_filename(url_filename(pin.url))
    except (InvalidWheelFilename, ValueError):
        return None
    platforms = {t.platform for t in wtags}
    if any(p == "any" or p.startswith(("manylinux", "musllinux", "linux")) for p in platforms):
        return None
    what = next((w for prefix, w in _OTHER_OS_WHEEL if any(p.startswith(prefix) for p in platforms)), "another OS's")
    return (
        f"{what} wheel ({', '.join(sorted(platforms))}); "
        f"write `{name}=={version}` to let pip pick the Linux wheel of the same version"
    )


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


def _public_of_dev_build(pin: PipPin) -> PipPin | None:
    """`mylib==1.4.2+g1a2b3c4.dirty` -> `mylib==1.4.2`; None for anything else."""
    if not pin.version or "+" not in pin.version or pin.requirement is None:
        return None
    public, _, local = pin.version.partition("+")
    if not _DEV_LOCAL.search(local):
        return None
    req = pin.requirement
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return parse_pip_line(f"{req.name}{extras}=={public}{marker}")


def _replaced(pin: PipPin, linux_name: str) -> PipPin:
    """The pin under its Linux name, with the same version constraint, extras and marker."""
    if pin.requirement is None:
        return parse_pip_line(linux_name)
    req = pin.requirement
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return parse_pip_line(f"{linux_name}{extras}{req.specifier}{marker}")


def _pip(
    pins: list[PipPin], dropped: list[Dropped], python: str | None = None, changed: list[Changed] | None = None
) -> list[PipPin]:
    """The pip: section for linux-64, in order: every form pip accepts is kept as written, except
    what cannot exist on Linux (each dropped with its reason and what to write instead) and a
    sender's own dev build, relaxed to its public version (a change, with its reason)."""
    facts = normalise_facts()
    kept: list[PipPin] = []
    changed = [] if changed is None else changed
    for pin in pins:
        public = _public_of_dev_build(pin)
        if public is not None:
            changed.append(Changed(f"pip: {pin.raw}", public.text, _DEV_BUILD_REASON.format(local=pin.version)))
            pin = public
        if pin.local:
            dropped.append(Dropped(f"pip: {pin.raw}", LOCAL_REASON))
            continue
        reason = facts.pip_os_reason(pin.name) or _other_os_wheel(pin) or _marker_reason(pin, python)
        if reason:
            dropped.append(Dropped(f"pip: {pin.raw}", reason))
            continue
        linux_name = facts.pip_replace.get(pin.name)
        if linux_name and not pin.url:
            new = _replaced(pin, linux_name)
            dropped.append(Dropped(f"pip: {pin.raw}", f"replaced by {new.text} on Linux"))
            kept.append(new)
            continue
        kept.append(pin)
    return kept


def _pip_option_lines(raw: RawEnv) -> list[str]:
    """The option lines of the sender's pip: section (or requirements file), in order.

    The readers keep only requirements, so the options are read again from the original text."""
    if raw.source_kind == "requirements":
        return [ln.strip() for ln in raw.source_text.splitlines() if ln.strip().startswith("-")]
    if raw.source_kind != "env-file" or "pip" not in raw.source_text:
        return []
    import yaml

    try:
        data = yaml.safe_load(raw.source_text)
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
            elif key not in ("--trusted-host", "--pre", "--prefer-binary", "--no-cache-dir"):
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
    return PipIndexes(index_url, tuple(extras), tuple(links))


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
        if variant:
            variants.append(variant)
        python = _python_version(spec) or python
        deps.append(kept)
    pip = _pip(env.pip, dropped, python, changed)
    pip_indexes(env, dropped)  # only to say which options are not carried
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
