"""Every compatibility table (kbundle/data/*.yaml, each naming its source), and version helpers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from kbundle.resources import load_data


def frameworks() -> dict[str, Any]:
    return load_data("frameworks")


def base_tags() -> dict[str, Any]:
    return load_data("base_tags")


def normalise_facts() -> dict[str, Any]:
    return load_data("normalise")


def version_key(version: str) -> tuple[int, ...]:
    """'11.8' -> (11, 8); non-numeric parts count as 0, so odd strings still sort."""
    parts = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def major_minor(version: str | None) -> str | None:
    if not version:
        return None
    parts = version.split(".")
    digits = [p for p in parts[:2] if p.isdigit()]
    if len(digits) == 2:
        return ".".join(digits)
    return digits[0] if digits else None


def lookup_prefix(table: dict[str, Any], version: str | None) -> Any:
    """The entry whose key is the longest dotted prefix of `version` ('2.3' for 2.3.1)."""
    if not version:
        return None
    best = None
    for key in table:
        if version == key or version.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    return table[best] if best is not None else None


def glibc_for(image: str) -> str:
    """The glibc of a base image, from the OS its tag names (data/base_tags.yaml)."""
    tags = base_tags()
    for os_name, glibc in tags["glibc"].items():
        if os_name in image:
            return glibc
    if "bookworm" in image:
        return tags["glibc"]["debian12"]
    return tags["glibc_unknown"]


Version = tuple[int, ...]


def parse_version(text: str) -> Version:
    """'520.61.05' → (520, 61, 5); '11.8' → (11, 8). Non-numeric tails are ignored."""
    parts: list[int] = []
    for piece in str(text).strip().split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


def cuda_key(text: str) -> Version:
    """A CUDA version reduced to major.minor, the grain of the tables."""
    v = parse_version(text)
    return (v[0], v[1] if len(v) > 1 else 0)


@dataclass(frozen=True)
class Arch:
    capability: str
    name: str
    first: Version
    last: Optional[Version]


@dataclass(frozen=True)
class CompatTables:
    toolkit_driver: dict[Version, str]  # CUDA major.minor → minimum driver (full support)
    minor_compat: dict[int, str]  # CUDA major → oldest driver for minor-version compatibility
    arches: dict[Version, Arch]  # compute capability → native CUDA range

    def min_driver(self, cuda: str) -> Optional[tuple[Version, str]]:
        """The driver needed for `cuda`: the table's entry for it, or for the next release
        listed after it (conservative for versions the table skips). None when newer than all."""
        want = cuda_key(cuda)
        for key in sorted(self.toolkit_driver):
            if key >= want:
                return key, self.toolkit_driver[key]
        return None

    def highest_cuda_for_driver(self, driver: str) -> Optional[Version]:
        have = parse_version(driver)
        fits = [k for k, d in self.toolkit_driver.items() if parse_version(d) <= have]
        return max(fits) if fits else None

    def arch(self, capability: str) -> Optional[Arch]:
        return self.arches.get(cuda_key(capability))


@lru_cache(maxsize=1)
def load_tables() -> CompatTables:
    drivers = load_data("cuda_drivers")
    arches = load_data("gpu_arch")
    return CompatTables(
        toolkit_driver={cuda_key(k): str(v) for k, v in drivers["toolkit"].items()},
        minor_compat={int(k): str(v) for k, v in drivers["minor_compat"].items()},
        arches={
            cuda_key(k): Arch(
                capability=str(k),
                name=str(v["name"]),
                first=cuda_key(str(v["first"])),
                last=cuda_key(str(v["last"])) if v.get("last") else None,
            )
            for k, v in arches["architectures"].items()
        },
    )


def fmt(version: Version) -> str:
    return ".".join(str(p) for p in version)
