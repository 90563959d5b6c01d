"""Decide the CUDA and cuDNN an environment needs, whether it carries its own CUDA
runtime, and an nvidia/cuda base tag that still exists.

Detection (`evidence`) is kept apart from the decision (`choose`) so both can be
tested alone. All facts come from data/frameworks.yaml and data/base_tags.yaml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from kbundle.bundle.format import Added
from kbundle.errors import UsageError
from kbundle.facts import LiveTag, Version, base_tags, frameworks, glibc_for
from kbundle.pack.normalise import variant_of
from kbundle.pack.records import CudaChoice, NormalisedEnv, RawEnv
from kbundle.specs import CondaSpec, PipPin, parse_conda_spec


@dataclass(frozen=True)
class Evidence:
    """One package's say about CUDA."""

    package: str
    source: str  # conda | pip
    cuda: Version | None
    cudnn: Version | None = None
    carries: bool = False  # the package brings the CUDA runtime itself
    runtime: bool = False  # the package *is* a runtime (cudatoolkit, nvidia-cuda-runtime-cu12, cudnn)


def _tf(name: str, version: str | None, build: str | None, source: str) -> Evidence | None:
    table = frameworks().tensorflow
    if name not in table.names.of(source) or name in table.cpu_names or not version:
        return None
    marker = variant_of(build)
    if marker and marker[0] == "cpu":
        return None
    parsed = Version.lenient(version)
    if source == "conda":
        gpu = name == "tensorflow-gpu" or (marker is not None and marker[0] in ("gpu", "cuda"))
    else:
        gpu = name == "tensorflow-gpu" or (parsed is not None and parsed >= table.gpu_in_plain_package_from)
    tested = table.build_for(parsed)
    if not gpu or not tested:
        return None
    return Evidence(f"{name}=={version}", source, tested.cuda, tested.cudnn)


def _cuda(major: str, minor: str) -> Version | None:
    # From package names and build strings the sender controls: an odd one ('cupy-cuda1') names no CUDA.
    return Version.lenient(f"{major}.{minor}")


def _cuda_in_build(build: str | None) -> Version | None:
    """'py3.9_cuda11.8_cudnn8.7.0_0' -> 11.8; 'cuda118py310h..' -> 11.8; 'cuda112' -> 11.2."""
    match = re.search(r"cuda(\d+)\.(\d+)", build or "") or re.search(r"cuda(\d{2})(\d)", build or "")
    return _cuda(match.group(1), match.group(2)) if match else None


def _torch(name: str, version: str | None, build: str | None, source: str) -> Evidence | None:
    table = frameworks().torch
    if name not in table.names.of(source) or not version:
        return None
    base, _, local = version.partition("+")
    if source == "pip":
        if local == "cpu":
            return None
        match = re.fullmatch(r"cu(\d+)(\d)", local)
        if match:
            return Evidence(
                f"{name}=={version}", source, _cuda(match.group(1), match.group(2)), carries=table.carries_runtime
            )
        cudas = table.cudas_for(Version.lenient(base))
        return Evidence(f"{name}=={version}", source, cudas[0], carries=table.carries_runtime) if cudas else None
    cuda = _cuda_in_build(build)
    return Evidence(f"{name}={version}", source, cuda, carries=table.carries_runtime) if cuda else None


def _jax(name: str, version: str | None, build: str | None, source: str) -> Evidence | None:
    table = frameworks().jax
    if name in table.plugins:
        return Evidence(name, source, table.plugins[name], carries=True)
    if name not in table.names.of(source) or not version:
        return None
    local = version.partition("+")[2]
    match = re.match(r"cuda(\d+)(?:\.cudnn(\d)(\d+))?", local)
    if match:
        # `+cuda11` names only the major: assume the same CUDA as a major-only CuPy wheel.
        cuda = frameworks().cupy.major_defaults.get(int(match.group(1)))
        cudnn = _cuda(match.group(2), match.group(3)) if match.group(2) else None
        return Evidence(f"{name}=={version}", source, cuda, cudnn)
    cuda = _cuda_in_build(build)
    return Evidence(f"{name}={version}", source, cuda) if cuda else None


def _cupy(name: str, version: str | None, source: str) -> Evidence | None:
    match = re.fullmatch(r"cupy-cuda(\d+)(x?)", name)
    if source != "pip" or not match:
        return None
    digits, major_only = match.groups()
    if major_only:
        cuda = frameworks().cupy.major_defaults.get(int(digits))
    else:
        cuda = _cuda(digits[:-1], digits[-1])
    return Evidence(name, source, cuda) if cuda else None


def _runtime(name: str, version: str | None, source: str) -> Evidence | None:
    gives = frameworks().runtime_packages.gives(name, source)
    parsed = Version.lenient(version)
    if not gives or parsed is None:
        return None
    if gives == "cudnn":
        return Evidence(name, source, None, parsed.major_minor, carries=True, runtime=True)
    return Evidence(name, source, parsed.major_minor, carries=True, runtime=True)


def _one(name: str, version: str | None, build: str | None, source: str) -> Evidence | None:
    return (
        _runtime(name, version, source)
        or _tf(name, version, build, source)
        or _torch(name, version, build, source)
        or _jax(name, version, build, source)
        or _cupy(name, version, source)
    )


def evidence(raw: RawEnv, env: NormalisedEnv) -> list[Evidence]:
    """Every package's say about CUDA, conda first, then pip (pip installs win).

    Conda specs are read as the sender wrote them, since their build strings name the CUDA
    build; only those normalisation kept count."""
    kept = env.names()
    found: list[Evidence] = []
    for spec in raw.conda:
        if spec.name in kept:
            item = _one(spec.name, spec.version, spec.build, "conda")
            if item:
                found.append(item)
    for pin in env.pip:
        item = _one(pin.name, pin.version, None, "pip")
        if item:
            found.append(item)
    return found


def known_cuda_versions() -> list[str]:
    return [str(v) for v in base_tags().known_cuda()]


def check_cuda_option(cuda_option: str) -> None:
    if cuda_option not in ("auto", "none") and cuda_option not in known_cuda_versions():
        known = ", ".join(known_cuda_versions())
        raise UsageError(f"unknown --cuda {cuda_option!r}: use auto, none or one of {known}")


def _covers(runtime: Version, needed: Version) -> bool:
    """Does a runtime of version `runtime` serve a framework built for `needed`?

    From CUDA 11 on, the runtime is compatible within a major version (minor version
    compatibility); before it, only the same major.minor works."""
    r, n = runtime.major_minor, needed.major_minor
    if r.major != n.major:
        return False
    if r.major >= 11:
        return r >= n
    return r == n


def _same_major(a: Version, b: Version) -> bool:
    return a.major == b.major


def _live_tag(cuda: Version, flavour: str) -> tuple[str, LiveTag] | None:
    tags = base_tags()
    entry = tags.live.get(cuda)
    if not entry:
        return None
    kind = {"base": "base", "runtime": "runtime", "cudnn": f"{entry.cudnn_tag}-runtime"}[flavour]
    return f"{tags.repository}:{entry.release}-{kind}-{entry.os}", entry


def _carried_base(cuda: Version) -> tuple[str, Version]:
    """The lowest live `base` tag at or above `cuda` (low keeps the driver requirement low)."""
    live = sorted(base_tags().live)
    pick = next((v for v in live if v >= cuda), live[-1])
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
        tags = base_tags()
        reason = "--cuda none" if cuda_option == "none" else "no GPU framework or CUDA package in the environment"
        cpu = CudaChoice(None, None, False, tags.cpu_image, str(tags.cpu_glibc), f"CPU image: {reason}")
        return _with_override(cpu, base_image)
    cuda = Version.parse(cuda_option) if cuda_option != "auto" else primary.cuda
    cudnn = primary.cudnn if primary is not None else None
    if cudnn is None and cudnn_runtimes:
        cudnn = cudnn_runtimes[-1].cudnn
    why = f"{primary.package} needs CUDA {primary.cuda}" if primary is not None else f"--cuda {cuda}"
    if cuda_option != "auto":
        why = f"--cuda {cuda}" + (f" ({why})" if primary is not None else "")
    carried = bool(frameworks_found) and not needs_base
    if needs_base or not frameworks_found:
        carried = any(_covers(r.cuda, cuda) for r in runtimes) and (
            cudnn is None or any(_same_major(r.cudnn, cudnn) for r in cudnn_runtimes)
        )
    if carried:
        why += "; the environment carries its own CUDA runtime"
        return _with_override(_on_live_base(cuda, cudnn, why, (), found), base_image)
    from_image = _from_image(cuda, cudnn, why)
    if from_image is not None:
        return _with_override(from_image, base_image)
    if base_image:
        # The named base image is the sender's answer to the missing tag; add nothing.
        return _with_override(_choice(cuda, cudnn, False, base_image, why), base_image)
    added = _runtime_packages(cuda, cudnn)
    gone = base_tags().deleted.get(cuda)
    why += (
        f"; nvidia/cuda:{gone} was deleted (end of life)"
        if gone
        else f"; no published nvidia/cuda {cuda} image with cuDNN {cudnn}"
    )
    why += ", so the environment carries the CUDA runtime (" + ", ".join(a.spec for a in added) + ")"
    return _on_live_base(cuda, cudnn, why, added, found)


def _choice(
    cuda: Version,
    cudnn: Version | None,
    runtime_in_env: bool,
    image: str,
    reason: str,
    glibc: Version | None = None,
    **more,
) -> CudaChoice:
    """The record the rest of pack reads: versions become text here. Without `glibc`, the
    image's glibc comes from the OS its reference names."""
    glibc_text = str(glibc) if glibc is not None else glibc_for(image)
    return CudaChoice(str(cuda), str(cudnn) if cudnn else None, runtime_in_env, image, glibc_text, reason, **more)


def _from_image(cuda: Version, cudnn: Version | None, why: str) -> CudaChoice | None:
    """CUDA (and cuDNN) from a live nvidia/cuda runtime tag, if one fits."""
    tag = _live_tag(cuda, "cudnn" if cudnn else "runtime")
    if tag is None:
        return None
    image, entry = tag
    if not cudnn or _same_major(entry.cudnn, cudnn):
        reason = f"{why}; the image provides CUDA {cuda}" + (f" and cuDNN {cudnn}" if cudnn else "")
        return _image_choice(cuda, cudnn, image, entry, reason)
    # The CUDA tag lives but with another cuDNN major: CUDA from the image, cuDNN from conda.
    image, entry = _live_tag(cuda, "runtime")
    reason = f"{why}; the image provides CUDA {cuda}, the environment brings cuDNN {cudnn}"
    return _image_choice(cuda, cudnn, image, entry, reason, added=_cudnn_package(cudnn), env_libs=True)


def _image_choice(cuda: Version, cudnn: Version | None, image: str, entry: LiveTag, reason: str, **more) -> CudaChoice:
    # The tag's own OS is known for certain: no need to read it back out of the image name.
    return _choice(cuda, cudnn, False, image, reason, glibc=base_tags().glibc[entry.os], **more)


def _on_live_base(
    cuda: Version, cudnn: Version | None, why: str, added: tuple[Added, ...], found: list[Evidence]
) -> CudaChoice:
    """The environment brings the runtime: any live base will do; take the lowest that fits."""
    image, base_cuda = _carried_base(cuda)
    require = f"cuda>={cuda}" if base_cuda != cuda else None
    # Put the env's lib/ on LD_LIBRARY_PATH only when a conda CUDA runtime lives there.
    env_libs = bool(added) or any(e.runtime and e.source == "conda" for e in found)
    gone = base_tags().deleted.get(cuda)
    if gone and not added:
        why += f" (nvidia/cuda:{gone} was deleted, end of life)"
    why += f"; any live base fits, and the lowest, {image}, asks the least of the driver"
    return _choice(cuda, cudnn, True, image, why, require_cuda=require, added=added, env_libs=env_libs)


def _runtime_packages(cuda: Version, cudnn: Version | None) -> tuple[Added, ...]:
    table = frameworks().conda_runtime
    specs = table.specs.get(cuda)
    if not specs:
        raise UsageError(
            f"no published nvidia/cuda image and no conda CUDA runtime known for CUDA {cuda}; pass --base-image"
        )
    cudnn = cudnn or table.default_cudnn[cuda.major]  # the loader checked every major has one
    reason = f"no live nvidia/cuda {cuda} image; the environment brings the CUDA runtime"
    return tuple(Added(spec.format(cudnn=cudnn), reason) for spec in specs)


def _cudnn_package(cudnn: Version) -> tuple[Added, ...]:
    return (Added(f"cudnn={cudnn}", "the base image's cuDNN is another major version"),)


def _with_override(choice: CudaChoice, base_image: str | None) -> CudaChoice:
    if not base_image:
        return choice
    return replace(
        choice,
        base_image=base_image,
        glibc=glibc_for(base_image),
        reason=choice.reason + f"; base image {base_image} chosen with --base-image",
    )


def apply_added(env: NormalisedEnv, choice: CudaChoice) -> None:
    """Add the runtime packages the choice asked for (once)."""
    names = env.names()
    for item in choice.added:
        spec = parse_conda_spec(item.spec)
        if spec.name not in names:
            env.dependencies.append(spec)
            env.added.append(item)


__all__ = ["Evidence", "evidence", "choose", "apply_added", "known_cuda_versions", "CondaSpec", "PipPin"]
