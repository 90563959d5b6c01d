"""Decide the CUDA and cuDNN an environment needs, whether it carries its own CUDA
runtime, and an nvidia/cuda base tag that still exists.

Detection (`evidence`) is kept apart from the decision (`choose`) so both can be
tested alone. All facts come from data/frameworks.yaml and data/base_tags.yaml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from kbundle.bundle.format import Added, Changed, Dropped
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
    # A conda framework: its conda dependencies pick the runtime, so it runs with whatever CUDA
    # runtime the environment pins (tensorflow-gpu=2.4.1 with cudatoolkit=10.1 is a real pair).
    follows_env: bool = False
    name: str = ""  # the package name, for replacing a runtime pin
    spec: str = ""  # the line as the sender wrote it
    # A conda framework's published CUDA builds: a runtime pin that fits none is a conflict.
    builds: tuple[Version, ...] = ()
    # Said only to check the environment's conda runtime pin against `builds`: without such a
    # pin it says nothing (a conda pytorch with no build string may be a CPU build).
    needs_runtime: bool = False
    guess: bool = False  # a runtime named with no version (`cudatoolkit`): the newest published, a guess


@dataclass(frozen=True)
class Wanted:
    """A package as evidence reads it: its version (exact, or the highest table key a range allows)."""

    name: str
    version: str | None
    build: str | None
    source: str
    constraint: str | None = None
    extras: frozenset[str] = frozenset()
    spec: str = ""
    gpu_intent: bool = False  # the environment says the sender ran it on a GPU (tensorflow-metal)
    python: str | None = None  # the environment's Python, when it pins one: what a newest release may be

    def pick(self, candidates) -> Version | None:
        """The version to read tables at: the exact one, else the highest candidate the range allows."""
        if self.version:
            return Version.lenient(self.version)
        return _highest_in(self.constraint, candidates)

    def pick_any(self, candidates) -> Version | None:
        """`pick`, and the highest candidate when no version is asked for at all."""
        if not self.version and not self.constraint:
            return max(candidates, default=None)
        return self.pick(candidates)


def _highest_in(constraint: str | None, candidates) -> Version | None:
    if not constraint:
        return None
    from rattler import Version as RVersion
    from rattler import VersionSpec

    try:
        spec = VersionSpec(constraint, strict=False)
    except Exception:  # a range rattler cannot read says nothing about CUDA
        return None
    fits = [c for c in candidates if spec.matches(RVersion(str(c)))]
    return max(fits) if fits else None


def _tf_gpu(w: Wanted, parsed: Version | None) -> bool:
    table = frameworks().tensorflow
    marker = variant_of(w.build)
    if w.name == "tensorflow-gpu" or w.gpu_intent or w.extras & table.carrying_extras:
        return True
    if marker is not None and marker[0] in ("gpu", "cuda"):
        return True
    if w.source == "conda" and w.build and "*" not in w.build:
        return False  # an export's build string is decisive: no gpu/cuda word, a CPU build
    return parsed is not None and parsed >= table.gpu_in_plain_package_from


def _tf(w: Wanted) -> Evidence | None:
    table = frameworks().tensorflow
    if w.name not in table.names.of(w.source) or w.name in table.cpu_names:
        return None
    marker = variant_of(w.build)
    if marker and marker[0] in ("cpu", "mkl", "eigen"):
        return None
    # An unpinned TensorFlow beside the Metal plug-in, or asked for with `[and-cuda]`, was meant
    # for a GPU and is the newest one pip finds: read it as the newest tested build. A bare
    # unpinned `tensorflow` says nothing of a GPU (a Mac's tensorflow-macos becomes one).
    intent = w.gpu_intent or bool(w.extras & table.carrying_extras)
    builds = table.builds_for_python(w.python)  # Python 3.8's newest TensorFlow is 2.13, not the newest
    parsed = w.pick_any(builds) if intent else w.pick(builds)
    tested = table.build_for(parsed)
    if not _tf_gpu(w, parsed) or not tested:
        return None
    label = f"{w.name}=={w.version}" if w.version else w.spec
    if w.source == "conda":
        # conda's GPU TensorFlow depends on cudatoolkit/cudnn: the build string or the env's runtime says which.
        cuda = _cuda_in_build(w.build) or tested.cuda
        # Only an exact pin can be checked against the runtime: a range may hold a version that fits.
        builds = table.conda_builds(parsed) if w.version and not _cuda_in_build(w.build) else ()
        return Evidence(label, "conda", cuda, tested.cudnn, carries=True, follows_env=True, name=w.name, builds=builds)
    carries = bool(w.extras & table.carrying_extras)
    return Evidence(label, "pip", tested.cuda, tested.cudnn, carries=carries, name=w.name)


def _cuda(major: str, minor: str) -> Version | None:
    # From package names and build strings the sender controls: an odd one ('cupy-cuda1') names no
    # CUDA, and neither does CUDA 0.0 (the pytorch channel's CPU-only builds).
    found = Version.lenient(f"{major}.{minor}")
    return found if found is not None and found.major > 0 else None


def _cuda_in_build(build: str | None) -> Version | None:
    """'py3.9_cuda11.8_cudnn8.7.0_0' -> 11.8; 'cuda118py310h..' -> 11.8; 'cuda112' -> 11.2;
    RAPIDS' 'cuda11_py310_..' / 'cuda_11_py39_..' name the major only (None here: see `_cuda_major_in_build`)."""
    match = re.search(r"cuda(\d+)\.(\d+)", build or "") or re.search(r"cuda(\d{2})(\d)", build or "")
    return _cuda(match.group(1), match.group(2)) if match else None


def _cuda_major_in_build(build: str | None) -> int | None:
    match = re.search(r"cuda_?(\d{1,2})(?:_|$)", build or "")
    return int(match.group(1)) if match else None


def _torch(w: Wanted) -> Evidence | None:
    table = frameworks().torch
    if w.name not in table.names.of(w.source):
        return None
    version = w.version or ""
    base, _, local = version.partition("+")
    if w.source == "pip":
        if local == "cpu":
            return None
        if not version:
            # `torch` or `torch>=2.1`: pip installs the newest release the range allows, and
            # PyPI's Linux torch is a CUDA build; read it as the newest tested release.
            cudas = table.cudas_for(w.pick_any(table.builds))
            return Evidence(w.spec or w.name, "pip", cudas[0], carries=table.carries_runtime) if cudas else None
        match = re.fullmatch(r"cu(\d+)(\d)", local)
        label = f"{w.name}=={version}"
        if match:
            return Evidence(label, "pip", _cuda(match.group(1), match.group(2)), carries=table.carries_runtime)
        cudas = table.cudas_for(Version.lenient(base))
        return Evidence(label, "pip", cudas[0], carries=table.carries_runtime) if cudas else None
    return _conda_torch(w)


def _conda_torch(w: Wanted) -> Evidence | None:
    """A conda pytorch pinned to a version with no build string: which CUDA builds that version
    has, to check the environment's runtime pin against (`pytorch=1.4` has none for 11.3).
    A build string that names its variant says more (the generic conda rule below)."""
    cudas = frameworks().torch.cudas_for(Version.lenient(w.version))
    if not cudas or variant_of(w.build):
        return None
    label = f"{w.name}={w.version}"
    return Evidence(
        label, "conda", cudas[0], carries=True, follows_env=True, name=w.name, builds=cudas, needs_runtime=True
    )


def _jax(w: Wanted) -> Evidence | None:
    table = frameworks().jax
    if w.name in table.plugins:
        return Evidence(w.name, w.source, table.plugins[w.name], carries=True)
    extra = next((table.extras[e] for e in sorted(w.extras) if e in table.extras), None)
    if w.source == "pip" and w.name == "jax" and extra is not None:
        return Evidence(w.spec or w.name, "pip", extra.cuda, carries=extra.carries)
    if w.name not in table.names.of(w.source) or not w.version:
        return None
    local = w.version.partition("+")[2]
    match = re.match(r"cuda(\d+)(?:\.cudnn(\d)(\d+))?", local)
    if match:
        # `+cuda11` names only the major: assume the same CUDA as a major-only CuPy wheel.
        cuda = frameworks().cupy.major_defaults.get(int(match.group(1)))
        cudnn = _cuda(match.group(2), match.group(3)) if match.group(2) else None
        return Evidence(f"{w.name}=={w.version}", w.source, cuda, cudnn)
    return None


def _cupy(w: Wanted) -> Evidence | None:
    match = re.fullmatch(r"cupy-cuda(\d+)(x?)", w.name)
    if w.source != "pip" or not match:
        return None
    digits, major_only = match.groups()
    if major_only:
        cuda = frameworks().cupy.major_defaults.get(int(digits))
    else:
        cuda = _cuda(digits[:-1], digits[-1])
    return Evidence(w.name, "pip", cuda) if cuda else None


def _onnxruntime(w: Wanted) -> Evidence | None:
    table = frameworks().onnxruntime
    if w.source != "pip" or w.name not in table.names:
        return None
    build = table.build_for(w.pick(table.builds) or max(table.builds))
    return Evidence(w.spec or w.name, "pip", build.cuda, build.cudnn) if build else None


def _conda_cuda_build(w: Wanted) -> Evidence | None:
    """Any conda package built for CUDA (pytorch, jaxlib, cupy, RAPIDS, ...): its build string names
    the CUDA, or the RAPIDS table does; the package depends on its runtime, so it carries one."""
    if w.source != "conda":
        return None
    rapids = frameworks().rapids
    marker = variant_of(w.build)
    is_rapids = w.name in rapids.names
    if not is_rapids and not (marker and marker[0] in ("cuda", "gpu")):
        return None
    cuda = _cuda_in_build(w.build)
    major = _cuda_major_in_build(w.build)
    if cuda is None and is_rapids:
        cuda = rapids.cuda_for(w.pick(rapids.cuda))
        if major is not None and (cuda is None or cuda.major != major):
            cuda = frameworks().cupy.major_defaults.get(major)
    if cuda is None and major is not None:
        cuda = frameworks().cupy.major_defaults.get(major)
    if cuda is None and marker and marker[0] == "cuda":
        cuda = frameworks().conda_runtime.unnamed_build_cuda
    if cuda is None:
        return None
    label = f"{w.name}={w.version}" if w.version else w.spec
    return Evidence(label, "conda", cuda, carries=True, follows_env=True, name=w.name)


def _runtime(w: Wanted) -> Evidence | None:
    table = frameworks().runtime_packages
    common = dict(carries=True, runtime=True, name=w.name, spec=w.spec)
    if w.source == "conda" and w.name in table.selectors:  # pytorch's `cuda100`: the name says it
        return Evidence(w.name, w.source, table.selectors[w.name], **common)
    gives = table.gives(w.name, w.source)
    if not gives:
        return None
    parsed = _runtime_version(w, table.published.get(w.name)) if gives == "cuda" else Version.lenient(w.version)
    if parsed is None:
        return None
    common["guess"] = not w.version and not w.constraint
    if gives == "cudnn":
        return Evidence(w.name, w.source, None, parsed.major_minor, **common)
    return Evidence(w.name, w.source, parsed.major_minor, **common)


def _runtime_version(w: Wanted, published) -> Version | None:
    """The CUDA a runtime pin gives. An open range or a bare name (`cudatoolkit>=10`,
    `pytorch-cuda`) reads as the newest version the package is published at: the one conda
    would install, never one that does not exist (cudatoolkit stops at 11.8)."""
    if published is None:
        return w.pick(base_tags().known_cuda())
    if w.version:
        return Version.lenient(w.version)
    return w.pick_any(published) if w.source == "conda" else w.pick(published)


_READERS = (_runtime, _tf, _torch, _jax, _cupy, _onnxruntime, _conda_cuda_build)


def _one(w: Wanted) -> Evidence | None:
    return next((e for e in (read(w) for read in _READERS) if e is not None), None)


def _conda_wanted(spec: CondaSpec, python: str | None = None) -> Wanted:
    return Wanted(spec.name, spec.version, spec.build, "conda", spec.constraint, spec=spec.raw, python=python)


def _pip_wanted(pin: PipPin, gpu_intent: bool = False, python: str | None = None) -> Wanted:
    req = pin.requirement
    extras = frozenset(e.lower() for e in req.extras) if req is not None else frozenset()
    constraint = str(req.specifier) if req is not None and req.specifier and not pin.version else None
    return Wanted(
        pin.name, pin.version, None, "pip", constraint, extras, spec=pin.raw, gpu_intent=gpu_intent, python=python
    )


def evidence(raw: RawEnv, env: NormalisedEnv) -> list[Evidence]:
    """Every package's say about CUDA, conda first, then pip (pip installs win).

    Conda specs are read as the sender wrote them, since their build strings name the CUDA
    build; only those normalisation kept count. The sender's pip lines also count for intent:
    tensorflow-metal, dropped on Linux, still says TensorFlow ran on a GPU."""
    kept = env.names()
    intent = bool({p.name for p in raw.pip} & frameworks().tensorflow.gpu_intent)
    found: list[Evidence] = []
    for spec in raw.conda:
        if spec.name in kept:
            item = _one(_conda_wanted(spec, env.python))
            if item:
                found.append(item)
    for pin in env.pip:
        item = _one(_pip_wanted(pin, intent, env.python))
        if item:
            found.append(item)
    if not any(e.runtime and e.source == "conda" for e in found):
        found = [e for e in found if not e.needs_runtime]
    if any(e.runtime and e.cuda and not e.guess for e in found):  # a versioned CUDA pin outranks a bare name
        found = [e for e in found if not e.guess]
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
    """Pick CUDA, cuDNN, whether the env carries its runtime, and a base image.

    What the environment carries (a conda or pip CUDA runtime, a torch build) decides what it
    runs with: when that cannot serve a framework and no live image can either, the choice keeps
    the carried runtime, says so as a `conflict`, and names the remedy; `--cuda X` applies it."""
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
    if cuda_option == "auto" and primary.follows_env and runtimes:
        cuda = runtimes[-1].cuda  # a conda framework runs with the runtime its environment pins
        if primary.builds and not any(_built_for(b, cuda) for b in primary.builds):
            return _with_override(_no_build(primary, runtimes[-1], found), base_image)
    cudnn = primary.cudnn if primary is not None else None
    if cudnn is None and cudnn_runtimes:
        cudnn = cudnn_runtimes[-1].cudnn
    why = f"{primary.package} needs CUDA {cuda}" if primary is not None else f"--cuda {cuda}"
    if cuda_option != "auto":
        why = f"--cuda {cuda}" + (f" ({primary.package} needs CUDA {primary.cuda})" if primary is not None else "")
        stale = _stale_runtimes(found, cuda, cudnn)
        if stale:
            return _with_override(_retargeted(cuda, cudnn, why, found), base_image)
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
    if runtimes or cudnn_runtimes:
        return _conflict(primary, cuda, cudnn, found)
    added = _runtime_packages(cuda, cudnn)
    gone = base_tags().deleted.get(cuda)
    why += (
        f"; nvidia/cuda:{gone} was deleted (end of life)"
        if gone
        else f"; no published nvidia/cuda {cuda} image with cuDNN {cudnn}"
    )
    why += ", so the environment carries the CUDA runtime (" + ", ".join(a.spec for a in added) + ")"
    return _on_live_base(cuda, cudnn, why, added, found)


# ---------------------------------------------------------------- conflicts and --cuda X


def _built_for(build: Version, runtime: Version) -> bool:
    """Does a conda build for CUDA `build` install beside a runtime pin of `runtime`? From CUDA
    11 a build fits any runtime of its major version (conda-forge and the pytorch channel built
    many minors); before it, only its own major.minor."""
    if build.major != runtime.major:
        return False
    return runtime.major >= 11 or build.minor == runtime.minor


def _no_build(primary: Evidence, runtime: Evidence, found: list[Evidence]) -> CudaChoice:
    """A conda framework pinned beside a runtime that none of its builds fits (`pytorch=1.4` with
    `cudatoolkit=11.3`): the solve cannot pair them. Keep the runtime (what the sender pinned),
    say so as a conflict, and name the pins that would pair."""
    builds = ", ".join(str(b) for b in primary.builds)
    near = next((b for b in primary.builds if b.major == runtime.cuda.major), primary.builds[0])
    pin = runtime.spec or runtime.package
    # A selector (`cuda100`) has no versions of its own: the runtime to pin is cudatoolkit.
    name = "cudatoolkit" if runtime.name in frameworks().runtime_packages.selectors else runtime.name
    conflict = (
        f"CUDA conflict: {primary.package} has no build for CUDA {runtime.cuda} ({pin}); its CUDA builds are "
        f"{builds}: pin {name}={near}, or a {primary.name} built for CUDA {runtime.cuda}"
    )
    why = f"the environment pins CUDA {runtime.cuda} ({pin}), for which {primary.package} has no build: see the conflict warning"
    return replace(_on_live_base(runtime.cuda, None, why, (), found), conflict=conflict)


def _stale_runtimes(found: list[Evidence], cuda: Version, cudnn: Version | None) -> list[Evidence]:
    """The env's conda runtime pins that do not match `cuda` (or `cudnn`'s major)."""
    stale = []
    for r in found:
        if not (r.runtime and r.source == "conda"):
            continue
        if (r.cuda and r.cuda.major_minor != cuda.major_minor) or (
            r.cudnn and cudnn and not _same_major(r.cudnn, cudnn)
        ):
            stale.append(r)
    return stale


@dataclass(frozen=True)
class _Plan:
    """What `--cuda X` does to the environment's runtime pins."""

    changed: tuple[Changed, ...]
    dropped: tuple[Dropped, ...]
    added: tuple[Added, ...]

    def words(self) -> str:
        parts = [f"changes {c.spec} to {c.to}" for c in self.changed]
        parts += [f"adds {a.spec}" for a in self.added]
        parts += [f"drops {d.spec}" for d in self.dropped]
        return " and ".join(parts) or "keeps the environment's pins"


def _plan(cuda: Version, cudnn: Version | None, found: list[Evidence]) -> _Plan:
    """Replace the env's conda runtime pins by data/frameworks.yaml's runtime for `cuda`."""
    table = frameworks().conda_runtime
    specs = table.specs.get(cuda.major_minor)
    if not specs:
        raise UsageError(f"no conda CUDA runtime known for CUDA {cuda}; pass --base-image or another --cuda")
    cudnn = cudnn or table.default_cudnn[cuda.major]
    target = {parse_conda_spec(t).name: t for t in (spec.format(cudnn=cudnn) for spec in specs)}
    why = f"--cuda {cuda}"
    changed, dropped, have = [], [], set()
    for r in found:
        if not (r.runtime and r.source == "conda"):
            continue
        have.add(r.name)
        fits = (r.cuda and r.cuda.major_minor == cuda.major_minor) or (r.cudnn and _same_major(r.cudnn, cudnn))
        if fits:
            continue
        new = target.get(r.name) or ({"pytorch-cuda": f"pytorch-cuda={cuda}"}.get(r.name))
        if new is None and r.name in ("cuda-cudart", "cuda-runtime"):
            new = r.name  # cuda-version pins it
        if new is None:
            dropped.append(Dropped(r.spec, f"{why}: CUDA {cuda} comes as {', '.join(target.values())}"))
        else:
            changed.append(Changed(r.spec, new, f"{why}: the environment's CUDA runtime follows it"))
    added = [Added(t, f"{why}: the environment carries the CUDA runtime") for n, t in target.items() if n not in have]
    return _Plan(tuple(changed), tuple(dropped), tuple(added))


def _retargeted(cuda: Version, cudnn: Version | None, why: str, found: list[Evidence]) -> CudaChoice:
    plan = _plan(cuda, cudnn, found)
    cudnn = cudnn or frameworks().conda_runtime.default_cudnn[cuda.major]
    why += f"; pack {plan.words()}"
    choice = _on_live_base(cuda, cudnn, why, plan.added, found)
    return replace(choice, changed=plan.changed, dropped=plan.dropped, env_libs=True)


def _conflict(primary: Evidence, cuda: Version, cudnn: Version | None, found: list[Evidence]) -> CudaChoice:
    """The env carries a runtime that cannot serve `primary`, and no live image provides `cuda`:
    keep what the env carries (that is what it runs with) and say so, with the remedy."""
    runtimes = [e for e in found if e.runtime]
    carried = next((r.cuda for r in reversed(runtimes) if r.cuda), None)
    carried_cudnn = next((r.cudnn for r in reversed(runtimes) if r.cudnn), None)
    pins = ", ".join(r.spec or r.package for r in runtimes)
    need = f"CUDA {cuda}" + (f" and cuDNN {cudnn}" if cudnn else "")
    if any(r.source == "conda" for r in runtimes):
        remedy = f"pack with `--cuda {cuda}`, which {_plan(cuda, cudnn, found).words()}"
    else:
        remedy = f"pin the nvidia-*-cu{cuda.major} wheels of CUDA {cuda} in the pip: section"
    conflict = f"CUDA conflict: {primary.package} needs {need}, but the environment pins {pins}; {remedy}"
    if carried is None:  # only a cuDNN pin: the image cannot be chosen from it, keep the framework's CUDA
        carried = cuda
    why = (
        f"the environment carries CUDA {carried} ({pins}), which cannot serve {primary.package} "
        f"(needs {need}): see the conflict warning"
    )
    choice = _on_live_base(carried, carried_cudnn, why, (), found)
    return replace(choice, conflict=conflict)


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
    """Apply the choice to the environment: replace or drop the runtime pins `--cuda` retargeted,
    then add the runtime packages it asked for (once)."""
    for item in choice.changed:
        name = parse_conda_spec(item.spec).name
        env.dependencies = [parse_conda_spec(item.to) if d.name == name else d for d in env.dependencies]
        env.changed.append(item)
    for item in choice.dropped:
        name = parse_conda_spec(item.spec).name
        env.dependencies = [d for d in env.dependencies if d.name != name]
        env.dropped.append(item)
    names = env.names()
    for item in choice.added:
        spec = parse_conda_spec(item.spec)
        if spec.name not in names:
            env.dependencies.append(spec)
            env.added.append(item)


__all__ = ["Evidence", "evidence", "choose", "apply_added", "known_cuda_versions", "CondaSpec", "PipPin"]
