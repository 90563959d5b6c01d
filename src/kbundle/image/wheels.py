"""The bundle's `pip:` pins, fetched as wheels on the host for the image's platform and Python.

The image build then installs them with `--no-index --no-deps`: nothing is downloaded
inside the build, where proxies and intercepting CAs break things. The host's pip runs
with the user's own pip configuration, proxy variables and CA settings. Wheels are cached
per target (Python, platform) so that a second run does not even start pip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kbundle.errors import KbundleError

if TYPE_CHECKING:
    from kbundle.specs import PipPin

# manylinux2014 (glibc 2.17) runs on every CUDA base kbundle picks; older tags are subsets.
PLATFORM = "manylinux2014_x86_64"
_GLIBC_MINORS = range(17, 4, -1)


@dataclass(frozen=True)
class WheelSet:
    pins: tuple[PipPin, ...]
    files: tuple[Path, ...]  # in the order of `pins`
    downloaded: int  # how many came from the network this time


def target_platforms() -> list[str]:
    names = [f"manylinux_2_{m}_x86_64" for m in _GLIBC_MINORS]
    return names + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def target_tags(python: str) -> set:
    from packaging import tags

    version = tuple(int(p) for p in python.split(".")[:2])
    interpreter = f"cp{version[0]}{version[1]}"
    platforms = target_platforms()
    found = set(tags.cpython_tags(version, platforms=platforms))
    found |= set(tags.compatible_tags(version, interpreter=interpreter, platforms=platforms))
    return found


def cache_dir(python: str) -> Path:
    from kbundle.image.env import cache_root

    path = cache_root() / "wheels" / f"cp{python.replace('.', '')}-{PLATFORM}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_cached(pin: PipPin, directory: Path, wanted_tags: set) -> Optional[Path]:
    """The cached wheel of an exact pin for one of `wanted_tags`; None when there is none (or
    the pin is not exact, so only pip can say which file it means)."""
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
        if wname == pin.name and wversion == version and wtags & wanted_tags:
            return path
    return None


def _pip_download(pins: Sequence[str], python: str, dest: Path) -> None:
    version = python.split(".")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--no-deps",
        "--platform",
        PLATFORM,
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--abi",
        f"cp{version[0]}{version[1]}",
        "--abi",
        "abi3",
        "--abi",
        "none",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        *pins,
    ]
    # pip reads the host's proxy variables, pip.conf and CA settings from this environment.
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if result.returncode != 0:
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")] or result.stderr.splitlines()[-1:]
        detail = errors[0].removeprefix("ERROR: ").strip() if errors else f"pip exited with {result.returncode}"
        if "No module named pip" in result.stderr:
            detail = "pip is not installed next to kbundle"
        raise KbundleError(
            f"cannot fetch the pip: wheels for {PLATFORM} / CPython {python}: {detail} "
            f"(kbundle installs pip packages from wheels only)"
        )


def parse_pins(pins: Sequence[str]) -> list[PipPin]:
    """The manifest's pins, read by pack's one pip parser; anything but `name==version` is refused,
    since pins reach pip's command line and requirements.txt (never an option, a URL or a range)."""
    from kbundle.specs import parse_pip_line

    parsed = []
    for text in pins:
        try:
            pin = parse_pip_line(text)
        except KbundleError:
            pin = None
        if pin is None or not pin.exact:
            raise KbundleError(f"pip: {text!r} is not an exact pin (name==version); kbundle installs only those")
        parsed.append(pin)
    return parsed


def fetch(pins: Sequence[str], python: str) -> WheelSet:
    """Each pin as a wheel file in the shared cache; pip runs only for pins not cached yet."""
    if not pins:
        return WheelSet((), (), 0)
    parsed = parse_pins(pins)
    directory = cache_dir(python)
    wanted = target_tags(python)
    missing = [p for p in parsed if find_cached(p, directory, wanted) is None]
    if missing:
        # Download beside the cache, then move in: a broken download leaves nothing half-written.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as tmp:
            _pip_download([p.text for p in missing], python, Path(tmp))
            for path in Path(tmp).glob("*.whl"):
                os.replace(path, directory / path.name)
    files = []
    for pin in parsed:
        found = find_cached(pin, directory, wanted)
        if found is None:
            raise KbundleError(f"pip: no wheel of {pin.text!r} for {PLATFORM} / CPython {python} came back from pip")
        files.append(found)
    return WheelSet(tuple(parsed), tuple(files), len(missing))


def write_context(wheels: WheelSet, context: Path) -> None:
    """`pip/requirements.txt` (exact pins, in the bundle's order) and `pip/wheels/` in the build context."""
    if not wheels.pins:
        return
    target = context / "pip" / "wheels"
    target.mkdir(parents=True, exist_ok=True)
    for path in wheels.files:
        dest = target / path.name
        try:
            os.link(path, dest)  # same filesystem: no copy
        except OSError:
            shutil.copy2(path, dest)
    (context / "pip" / "requirements.txt").write_text("".join(f"{p.text}\n" for p in wheels.pins), encoding="utf-8")
