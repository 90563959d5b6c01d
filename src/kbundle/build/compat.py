"""The compatibility tables (CUDA → driver, compute capability → CUDA) as typed records.

The facts live in `kbundle/data/*.yaml`, each naming its source; this module only reads
them and answers lookups, so that preflight decisions stay data-driven.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from kbundle.resources import load_data

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
