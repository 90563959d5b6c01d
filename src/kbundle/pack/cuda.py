"""Decide the CUDA and cuDNN an environment needs, whether it carries its own CUDA
runtime, and an nvidia/cuda base tag that still exists.

Detection (`evidence`) is kept apart from the decision (`choose`) so both can be
tested alone. All facts come from data/frameworks.yaml and data/base_tags.yaml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kbundle.bundle.format import Added
from kbundle.errors import UsageError
from kbundle.pack.envfile import canonical
from kbundle.facts import base_tags, glibc_for, frameworks, lookup_prefix, major_minor, version_key
from kbundle.pack.normalise import variant_of
from kbundle.pack.records import CondaSpec, CudaChoice, NormalisedEnv, PipPin, RawEnv, spec_name


@dataclass(frozen=True)
class Evidence:
    """One package's say about CUDA."""

    package: str
    source: str  # conda | pip
    cuda: str | None
    cudnn: str | None = None
    carries: bool = False  # the package brings the CUDA runtime itself
    runtime: bool = False  # the package *is* a runtime (cudatoolkit, nvidia-cuda-runtime-cu12, cudnn)


def _tf(name: str, version: str | None, build: str | None, source: str) -> Evidence | None:
    table = frameworks()["tensorflow"]
    if name not in table["names"][source] or name in table["cpu_names"] or not version:
        return None
    marker = variant_of(build)
    if marker and marker[0] == "cpu":
        return None
    if source == "conda":
        gpu = name == "tensorflow-gpu" or (marker is not None and marker[0] in ("gpu", "cuda"))
    else:
        gpu = name == "tensorflow-gpu" or version_key(version) >= version_key(table["gpu_in_plain_package_from"])
    build_info = lookup_prefix(table["builds"], version)
    if not gpu or not build_info:
        return None
    return Evidence(f"{name}=={version}", source, build_info["cuda"], build_info["cudnn"])


def _cuda_in_build(build: str | None) -> str | None:
    """'py3.9_cuda11.8_cudnn8.7.0_0' -> '11.8'; 'cuda118py310h..' -> '11.8'; 'cuda112' -> '11.2'."""
    match = re.search(r"cuda(\d+)\.(\d+)", build or "") or re.search(r"cuda(\d{2})(\d)", build or "")
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _torch(name: str, version: str | None, build: str | None, source: str) -> Evidence | None:
    table = frameworks()["torch"]
    if name not in table["names"][source] or not version:
        return None
    base, _, local = version.partition("+")
    if source == "pip":
        if local == "cpu":
            return None
        match = re.fullmatch(r"cu(\d+)(\d)", local)
        if match:
            return Evidence(f"{name}=={version}", source, f"{match.group(1)}.{match.group(2)}", carries=True)
        builds = lookup_prefix(table["builds"], base)
        return Evidence(f"{name}=={version}", source, builds[0], carries=True) if builds else None
    cuda = _cuda_in_build(build)
    return Evidence(f"{name}={version}", source, cuda, carries=True) if cuda else None


def _jax(name: str, version: str | None, build: str | None, source: str) -> Evidence | None:
    table = frameworks()["jax"]
    if name in table["plugins"]:
        return Evidence(name, source, table["plugins"][name], carries=True)
    if name not in table["names"][source] or not version:
        return None
    local = version.partition("+")[2]
    match = re.match(r"cuda(\d+)(?:\.cudnn(\d)(\d+))?", local)
    if match:
        cuda = frameworks()["cupy"]["major_defaults"].get(match.group(1))
        cudnn = f"{match.group(2)}.{match.group(3)}" if match.group(2) else None
        return Evidence(f"{name}=={version}", source, cuda, cudnn)
    cuda = _cuda_in_build(build)
    return Evidence(f"{name}={version}", source, cuda) if cuda else None


def _cupy(name: str, version: str | None, source: str) -> Evidence | None:
    match = re.fullmatch(r"cupy-cuda(\d+)(x?)", name)
    if source != "pip" or not match:
        return None
    digits, major_only = match.groups()
    if major_only:
        cuda = frameworks()["cupy"]["major_defaults"].get(digits)
    else:
        cuda = f"{digits[:-1]}.{digits[-1]}"
    return Evidence(name, source, cuda) if cuda else None


def _runtime(name: str, version: str | None, source: str) -> Evidence | None:
    table = frameworks()["runtime_packages"]
    if source == "conda":
        gives = table["conda"].get(name)
    else:
        gives = next((r["gives"] for r in table["pip"] if re.fullmatch(r["pattern"], name)), None)
    mm = major_minor(version)
    if not gives or not mm:
        return None
    if gives == "cudnn":
        return Evidence(name, source, None, mm, carries=True, runtime=True)
    return Evidence(name, source, mm, carries=True, runtime=True)


def _one(name: str, version: str | None, build: str | None, source: str) -> Evidence | None:
    return (
        _runtime(name, version, source)
        or _tf(name, version, build, source)
        or _torch(name, version, build, source)
        or _jax(name, version, build, source)
        or _cupy(name, version, source)
    )


def evidence(raw: RawEnv, env: NormalisedEnv) -> list[Evidence]:
    """Every package's say about CUDA, conda first, then pip (pip installs win)."""
    kept = env.names()
    found: list[Evidence] = []
    for spec in raw.conda:
        if spec.name in kept:
            item = _one(spec.name, spec.version, spec.build, "conda")
            if item:
                found.append(item)
    for pin in env.pip:
        name, _, version = pin.partition("==")
        item = _one(canonical(name.split("[")[0].strip()), version.strip() or None, None, "pip")
        if item:
            found.append(item)
    return found


def known_cuda_versions() -> list[str]:
    tags = base_tags()
    versions = set(tags["live"]) | set(tags["deleted"])
    return sorted(versions, key=version_key)


def check_cuda_option(cuda_option: str) -> None:
    if cuda_option not in ("auto", "none") and cuda_option not in known_cuda_versions():
        known = ", ".join(known_cuda_versions())
        raise UsageError(f"unknown --cuda {cuda_option!r}: use auto, none or one of {known}")


def _covers(runtime: str, needed: str) -> bool:
    """Does a runtime of version `runtime` serve a framework built for `needed`?

    From CUDA 11 on, the runtime is compatible within a major version; before it, only
    the same major.minor works."""
    r, n = version_key(runtime), version_key(needed)
    if r[0] != n[0]:
        return False
    return r[0] >= 11 and r >= n or r[:2] == n[:2]


def _live_tag(cuda: str, flavour: str) -> tuple[str, str] | None:
    entry = base_tags()["live"].get(cuda)
    if not entry:
        return None
    kind = {"base": "base", "runtime": "runtime", "cudnn": f"{entry['cudnn']}-runtime"}[flavour]
    return f"{base_tags()['repository']}:{entry['release']}-{kind}-{entry['os']}", entry["os"]


def _carried_base(cuda: str) -> tuple[str, str]:
    """The lowest live `base` tag at or above `cuda` (low keeps the driver requirement low)."""
    live = sorted(base_tags()["live"], key=version_key)
    pick = next((v for v in live if version_key(v) >= version_key(cuda)), live[-1])
    image, _ = _live_tag(pick, "base")
    return image, pick


def choose(
    found: list[Evidence],
    cuda_option: str = "auto",
    base_image: str | None = None,
) -> CudaChoice:
    """Pick CUDA, cuDNN, whether the env carries its runtime, and a base image."""
    check_cuda_option(cuda_option)
    frameworks_found = [e for e in found if not e.runtime and e.cuda]
    runtimes = [e for e in found if e.runtime and e.cuda]
    cudnn_runtimes = [e for e in found if e.runtime and e.cudnn]
    needs_base = [e for e in frameworks_found if not e.carries]
    primary = (needs_base or frameworks_found or runtimes or [None])[-1]
    if cuda_option == "none" or (cuda_option == "auto" and primary is None):
        cpu = base_tags()["cpu_base"]
        reason = "--cuda none" if cuda_option == "none" else "no GPU framework or CUDA package in the environment"
        return _with_override(CudaChoice(None, None, False, cpu["image"], cpu["glibc"], f"CPU image: {reason}"), base_image)
    cuda = cuda_option if cuda_option != "auto" else primary.cuda
    cudnn = primary.cudnn if primary is not None else None
    if cudnn is None and cudnn_runtimes:
        cudnn = cudnn_runtimes[-1].cudnn
    why = f"{primary.package} needs CUDA {primary.cuda}" if primary is not None else f"--cuda {cuda}"
    if cuda_option != "auto":
        why = f"--cuda {cuda}" + (f" ({why})" if primary is not None else "")
    carried = bool(frameworks_found) and not needs_base
    if needs_base or not frameworks_found:
        carried = any(_covers(r.cuda, cuda) for r in runtimes) and (
            cudnn is None or any(version_key(r.cudnn)[0] == version_key(cudnn)[0] for r in cudnn_runtimes)
        )
    if carried:
        return _with_override(_on_live_base(cuda, cudnn, why + "; the environment carries its own CUDA runtime", (), found), base_image)
    from_image = _from_image(cuda, cudnn, why)
    if from_image is not None:
        return _with_override(from_image, base_image)
    if base_image:
        # The named base image is the sender's answer to the missing tag; add nothing.
        return _with_override(CudaChoice(cuda, cudnn, False, base_image, glibc_for(base_image), why), base_image)
    added = _runtime_packages(cuda, cudnn)
    gone = base_tags()["deleted"].get(cuda)
    why += f"; nvidia/cuda:{gone} was deleted (end of life)" if gone else f"; no published nvidia/cuda {cuda} image with cuDNN {cudnn}"
    why += ", so the environment carries the CUDA runtime (" + ", ".join(a.spec for a in added) + ")"
    return _on_live_base(cuda, cudnn, why, added, found)


def _from_image(cuda: str, cudnn: str | None, why: str) -> CudaChoice | None:
    """CUDA (and cuDNN) from a live nvidia/cuda runtime tag, if one fits."""
    tag = _live_tag(cuda, "cudnn" if cudnn else "runtime")
    if tag is None:
        return None
    live_cudnn = base_tags()["live"][cuda].get("cudnn_version")
    if not cudnn or (live_cudnn and version_key(live_cudnn)[0] == version_key(cudnn)[0]):
        image, os_name = tag
        reason = f"{why}; the image provides CUDA {cuda}" + (f" and cuDNN {cudnn}" if cudnn else "")
        return CudaChoice(cuda, cudnn, False, image, base_tags()["glibc"][os_name], reason)
    # The CUDA tag lives but with another cuDNN major: CUDA from the image, cuDNN from conda.
    image, os_name = _live_tag(cuda, "runtime")
    reason = f"{why}; the image provides CUDA {cuda}, the environment brings cuDNN {cudnn}"
    return CudaChoice(cuda, cudnn, False, image, base_tags()["glibc"][os_name], reason, None, _cudnn_package(cudnn), env_libs=True)


def _on_live_base(cuda: str, cudnn: str | None, why: str, added: tuple[Added, ...], found: list[Evidence]) -> CudaChoice:
    """The environment brings the runtime: any live base will do; take the lowest that fits."""
    image, base_cuda = _carried_base(cuda)
    require = f"cuda>={cuda}" if base_cuda != cuda else None
    # Put the env's lib/ on LD_LIBRARY_PATH only when a conda CUDA runtime lives there.
    env_libs = bool(added) or any(e.runtime and e.source == "conda" for e in found)
    gone = base_tags()["deleted"].get(cuda)
    if gone and not added:
        why += f" (nvidia/cuda:{gone} was deleted, end of life)"
    why += f"; any live base fits, and the lowest, {image}, asks the least of the driver"
    return CudaChoice(cuda, cudnn, True, image, glibc_for(image), why, require, added, env_libs)


def _runtime_packages(cuda: str, cudnn: str | None) -> tuple[Added, ...]:
    table = frameworks()["conda_runtime"]
    specs = table.get(cuda)
    if not specs:
        raise UsageError(f"no published nvidia/cuda image and no conda CUDA runtime known for CUDA {cuda}; pass --base-image")
    cudnn = cudnn or table["default_cudnn"].get(cuda.split(".")[0], "8.9")
    reason = f"no live nvidia/cuda {cuda} image; the environment brings the CUDA runtime"
    return tuple(Added(spec.format(cudnn=cudnn), reason) for spec in specs)


def _cudnn_package(cudnn: str) -> tuple[Added, ...]:
    return (Added(f"cudnn={cudnn}", "the base image's cuDNN is another major version"),)


def _with_override(choice: CudaChoice, base_image: str | None) -> CudaChoice:
    if not base_image:
        return choice
    from dataclasses import replace

    return replace(choice, base_image=base_image, glibc=glibc_for(base_image), reason=choice.reason + f"; base image {base_image} chosen with --base-image")


def apply_added(env: NormalisedEnv, choice: CudaChoice) -> None:
    """Add the runtime packages the choice asked for (once)."""
    names = env.names()
    for item in choice.added:
        if spec_name(item.spec) not in names:
            env.dependencies.append(item.spec)
            env.added.append(item)


__all__ = ["Evidence", "evidence", "choose", "apply_added", "known_cuda_versions", "CondaSpec", "PipPin"]
