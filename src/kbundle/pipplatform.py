"""pip wheels for the image's platform, for pack and run alike: which tags an image with a given
CPython and glibc takes, pip's options that describe it, and, when no wheel of a requirement
fits, one line saying which glibc its newest wheels need instead of pip's "conflicting
dependencies" (what pip says when a constraint in its configuration meets no matching file).
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Sequence

from kbundle.specs import PipIndexes, cpython_abis, manylinux_platforms

# manylinux2014 (glibc 2.17) runs on every CUDA base kbundle picks; older tags are subsets.
PLATFORM = "manylinux2014_x86_64"
# pip's words when no file of a requirement fits; with a constraint in pip's configuration it
# says "conflicting dependencies" instead, naming the requirement all the same.
_NOT_FOUND = re.compile(
    r"(?:Could not find a version that satisfies the requirement|No matching distribution found for"
    r"|Cannot install) ([^\s,]+)"
)
_LEGACY_GLIBC = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}
_DEFAULT_GLIBC = "2.17"  # manylinux_platforms' own default, for an image of unknown glibc


def target_platforms(glibc: str | None = None) -> list[str]:
    return [p for p in manylinux_platforms(glibc) if p != "linux_x86_64"]


def target_tags(python: str, glibc: str | None = None) -> set:
    from packaging import tags

    version = tuple(int(p) for p in python.split(".")[:2])
    interpreter = f"cp{version[0]}{version[1]}"
    platforms = target_platforms(glibc)
    found = set(tags.cpython_tags(version, platforms=platforms))
    found |= set(tags.compatible_tags(version, interpreter=interpreter, platforms=platforms))
    return found


def target_args(python: str, glibc: str | None) -> list[str]:
    version = python.split(".")
    args = ["--only-binary=:all:", "--python-version", ".".join(version[:2]), "--implementation", "cp"]
    for platform in target_platforms(glibc):
        args += ["--platform", platform]
    for abi in cpython_abis(python):
        args += ["--abi", abi]
    return args


def target_words(python: str, glibc: str | None) -> str:
    return f"CPython {python}, glibc {glibc or _DEFAULT_GLIBC} ({_glibc_platforms(glibc)})"


def _glibc_minor(glibc: str | None) -> int:
    match = re.match(r"^2\.(\d+)", glibc or _DEFAULT_GLIBC)
    return int(match.group(1)) if match else 17


def _glibc_platforms(glibc: str | None) -> str:
    return f"manylinux_2_{_glibc_minor(glibc)} and older"


@functools.lru_cache(maxsize=8)
def _tags_at_2_17(python: str) -> frozenset:
    return frozenset(target_tags(python, _DEFAULT_GLIBC))


def wheel_glibc_need(filename: str, python: str) -> int | None:
    """The oldest glibc minor (2.X) a manylinux x86_64 wheel for this CPython runs on; None when the
    wheel is not one for this CPython on x86_64 Linux at any glibc."""
    from packaging.tags import Tag
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    try:
        _name, _version, _build, tags = parse_wheel_filename(filename)
    except (InvalidWheelFilename, ValueError):
        return None
    fits = _tags_at_2_17(python)
    needs = []
    for tag in tags:
        match = re.fullmatch(r"manylinux_2_(\d+)_x86_64", tag.platform)
        legacy = _LEGACY_GLIBC.get(tag.platform.removesuffix("_x86_64")) if tag.platform.endswith("_x86_64") else None
        need = int(match.group(1)) if match else legacy
        # The interpreter and ABI judged on a platform every target has: only glibc is in question.
        if need is not None and Tag(tag.interpreter, tag.abi, "manylinux2014_x86_64") in fits:
            needs.append(need)
    return min(needs) if needs else None


def newest_wheel_need(filenames: Sequence[str], requirement: str, python: str) -> tuple[str, int] | None:
    """Of the wheels pip skipped, the newest version `requirement` allows and the oldest glibc minor
    one of its wheels for this CPython runs on; None when there is none."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return None
    best: dict = {}  # version -> the lowest need among its wheels
    for filename in filenames:
        try:
            name, version, _build, _tags = parse_wheel_filename(filename)
        except (InvalidWheelFilename, ValueError):
            continue
        need = wheel_glibc_need(filename, python)
        # pip takes a pre-release only when the requirement names one (kbundle never passes --pre).
        allowed = req.specifier.contains(version, prereleases=bool(req.specifier.prereleases))
        if name != canonicalize_name(req.name) or need is None or not allowed:
            continue
        best[version] = min(need, best.get(version, need))
    if not best:
        return None
    newest = max(best)
    return str(newest), best[newest]


def platform_refusal(requirement: str, python: str, glibc: str | None, newest: tuple[str, int] | None) -> str | None:
    """What to say when no wheel of `requirement` fits the image because its glibc is too old; None
    when that is not the reason (pip's own words say it better then)."""
    if newest is None or newest[1] <= _glibc_minor(glibc):
        return None
    from packaging.requirements import Requirement

    name = Requirement(requirement).name
    version, need = newest
    return (
        f"no wheel of {requirement} fits this image's platform (CPython {python}, glibc "
        f"{glibc or _DEFAULT_GLIBC}: {_glibc_platforms(glibc)}); the newest wheels ({name} {version}) "
        f"need manylinux_2_{need}, a base image with glibc 2.{need} or newer"
    )


def explain_no_wheel(detail: str, python: str, glibc: str | None, indexes: PipIndexes) -> str | None:
    """`platform_refusal` for the requirement pip's error names, from the wheels pip skipped."""
    from packaging.requirements import InvalidRequirement, Requirement

    match = _NOT_FOUND.search(detail)
    if not match:
        return None
    requirement = match.group(1).rstrip(".")
    try:
        name = Requirement(requirement).name
    except InvalidRequirement:
        return None
    return platform_refusal(
        requirement,
        python,
        glibc,
        newest_wheel_need(_skipped_wheels(name, python, glibc, indexes), requirement, python),
    )


def _skipped_wheels(name: str, python: str, glibc: str | None, indexes: PipIndexes) -> list[str]:
    """The wheel files of `name` pip saw on the indexes and skipped for the image: `pip index`
    downloads nothing, and says at -vv why it skipped each file."""
    from kbundle.children import die_with_kbundle
    from kbundle.image.download import READ_TIMEOUT
    from kbundle.net import pip_environment

    command = [sys.executable, "-m", "pip", "index", "versions", "-vv", *target_args(python, glibc)]
    command += ["--timeout", str(READ_TIMEOUT), "--retries", "2"]  # a stalled index: kbundle's own rule
    command += ["--disable-pip-version-check", "--no-input", "--", name]  # `name` is a parsed name: no option
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=indexes.environment(pip_environment()),
            stdin=subprocess.DEVNULL,
            timeout=120,
            preexec_fn=die_with_kbundle(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in result.stdout.splitlines() + result.stderr.splitlines():
        if "Skipping link" in line:
            found += re.findall(r"/([^/\s#?]+\.whl)\b", line)
    return found


# pip's words when it could not reach an index: the connection error it retried, or the URL it could not fetch.
_UNREACHABLE = re.compile(
    r"host='([^']+)', port=(\d+)\): (?:Failed to establish a new connection: \[Errno -?\d+\] )?([^\"')]+)"
    r"|Could not fetch URL (\S+?): (.+)"
    r"|The repository located at (\S+) is not a trusted or secure host"
)


def failure_cause(stderr: str, detail: str) -> str | None:
    """pip's failure by its cause, in one line: an index that did not answer, or two requirements in
    conflict (pip's "The conflict is caused by:" lines). None: pip's own first error says it."""
    unreachable = _unreachable_index(stderr)
    if unreachable and re.search(r"from versions: none|No matching distribution", stderr):
        wanted = _NOT_FOUND.search(stderr)
        what = f" {wanted.group(1).rstrip('.')}" if wanted else ""
        return f"the package index did not answer ({unreachable}): cannot resolve{what}"
    conflict = _conflict(stderr)
    if conflict:
        return f"conflicting requirements: {conflict}"
    return None


def _unreachable_index(stderr: str) -> str | None:
    match = _UNREACHABLE.search(stderr)
    if not match:
        return None
    host, port, why, url, url_why, untrusted = match.groups()
    if host:
        return f"{host}:{port}: {why.strip().rstrip('.')}"
    if url:
        return f"{url}: {url_why.strip().rstrip('.')}"
    return f"{untrusted}: plain HTTP from a host pip does not trust (--trusted-host)"


def _conflict(stderr: str) -> str | None:
    lines = stderr.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "The conflict is caused by:")
    except StopIteration:
        return None
    causes = []
    for line in lines[start + 1 :]:
        if not line.startswith((" ", "\t")) or not line.strip():
            break
        causes.append(line.strip())
    return "; ".join(causes[:4]) or None


def error_line(stderr: str, code: int) -> str:
    """pip's own first error line; for a crash ("ERROR: Exception:" and a traceback), the exception."""
    if "No module named pip" in stderr:
        return "pip is not installed next to kbundle"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln.removeprefix("ERROR: ").strip() for ln in lines if ln.startswith("ERROR")]
    if errors and errors[0] != "Exception:":
        return errors[0]
    return lines[-1] if lines else f"pip exited with {code}"


def python_refusals(report: dict, python: str) -> list[str]:
    """Each chosen wheel whose own metadata refuses the image's Python (pip trusts the index page,
    and a mirror's page may carry no `data-requires-python`)."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    found = []
    for item in report.get("install") or []:
        meta = item.get("metadata") or {}
        needs = meta.get("requires_python")
        try:
            refuses = bool(needs) and not SpecifierSet(needs).contains(python, prereleases=True)
        except InvalidSpecifier:
            refuses = False
        if refuses:
            found.append(
                f"pip chose {meta.get('name')} {meta.get('version')}, which requires Python {needs}, "
                f"not the image's {python} (the index does not say which Python each file needs)"
            )
    return found


def target_markers(python: str) -> dict[str, str]:
    """PEP 508 marker values of the image: CPython `python` on x86_64 Linux."""
    parts = (python.split(".") + ["0", "0"])[:3]
    return {
        "python_version": ".".join(parts[:2]),
        "python_full_version": ".".join(parts),
        "implementation_name": "cpython",
        "implementation_version": ".".join(parts),
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "platform_release": "",
        "platform_version": "",
    }


def target_gaps(report: dict, python: str, installed: Sequence[str] = ()) -> list[str]:
    """Requirements the image's Python needs that pip left out of its report.

    pip reads `--python-version` for wheels and Requires-Python but judges environment markers
    by the interpreter it runs in: for a Python 3.7 image resolved by a 3.11 host, Markdown's
    `importlib-metadata; python_version < "3.10"` is skipped. Each such requirement, without its
    marker, for pip to resolve again with the rest."""
    from packaging.requirements import InvalidRequirement, Requirement

    from kbundle.specs import canonical

    env = target_markers(python)
    items = report.get("install") or []
    have = {canonical(str((i.get("metadata") or {}).get("name", ""))) for i in items} | {
        canonical(n) for n in installed
    }
    gaps: dict[str, str] = {}
    for item in items:
        extras = {"", *(item.get("requested_extras") or [])}
        for text in (item.get("metadata") or {}).get("requires_dist") or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if canonical(req.name) in have or req.marker is None:
                continue
            if any(req.marker.evaluate({**env, "extra": extra}) for extra in extras):
                req.marker = None
                gaps.setdefault(f"{canonical(req.name)} {req.specifier}", str(req))
    return list(gaps.values())
