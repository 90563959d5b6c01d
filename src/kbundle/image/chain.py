"""The image as a chain of step images, planned before anything is installed (pure).

Why: one build of one big context sends every byte of the environment to the engine again,
even when the engine holds every layer of it from another bundle. As a chain, each layer group
of the environment (data/layers.yaml) is an image of its own, tagged by a hash of what it holds
and of everything under it; a step whose tag the engine has is neither sent nor built again,
and when the engine has every step the environment is not even installed.

    kbundle-steps/base:<h>       FROM base, the user, the activation script (the rendered
                                 Dockerfile's part before the environment's layers)
    kbundle-steps/cuda:<h>       FROM the step below; COPY env-layers/01-cuda/ <prefix>/
    kbundle-steps/framework:<h>  ...
    kbundle-steps/python:<h>
    kbundle-steps/packages:<h>
    kbundle/<name>:<tag>         FROM the last step; ENV, USER, WORKDIR, ENTRYPOINT, CMD, the
                                 notebook and included files (work/), labels (image/build.py
                                 ImageKey: the content-addressed tag, work/ included)

A group's hash covers what identifies its files before they exist: the conda records (sha256)
and pip wheels (name, version, sha256) that land in it by layers.yaml's globs, the interpreter
that byte-compiles them, the context version, the layer groups themselves, the pip names that
shadow a conda package (pip then takes files from a conda group), the step's Dockerfile and the
parent's tag, so a changed group changes every group above it and none below. conda's records
(conda-meta/) live in the conda rest group, so that group covers every conda record.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

from kbundle import contract

STEP_REPO = "kbundle-steps"  # kbundle-steps/<group>:<hash16>
HEAD = "base"  # the first step's name: the part of the Dockerfile before the environment
LABEL_STEP = contract.LABEL_NS + "step"  # a step image: its group (the final image sets it empty)
LABEL_STEPS = contract.LABEL_NS + "steps"  # the final image: its chain's tags, bottom first, space-separated

_LAYER_COPY = re.compile(rf"^\s*COPY\s+{re.escape(contract.CONTEXT_LAYERS)}/\S+\s+\S+\s*$", re.MULTILINE)


@dataclass(frozen=True)
class SplitDockerfile:
    """kbundle's rendered Dockerfile in its three parts."""

    head: str  # FROM … up to the environment's first COPY
    copies: tuple[str, ...]  # one `COPY env-layers/NN-group/ <prefix>/` per group, in order
    tail: str  # ENV … LABEL, the notebook's COPY included


@dataclass(frozen=True)
class PipWheel:
    name: str  # canonical
    version: str
    sha256: str

    def line(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class CondaPackage:
    name: str  # normalised
    sha256: str  # of the archive; the URL where a record has none


@dataclass(frozen=True)
class ChainInputs:
    """Everything the steps' tags depend on, known before the environment is installed."""

    base_id: str
    activate_sha256: str  # the activation script the head step copies
    conda: tuple[CondaPackage, ...]
    pip: tuple[PipWheel, ...]
    interpreter: str  # the python record's id: byte-compiled files depend on it
    groups: object  # facts.LayerGroups


@dataclass(frozen=True)
class Step:
    name: str  # HEAD or the group's name
    folder: Optional[str]  # the group's folder in the build context (env-layers/NN-group); None for HEAD
    dockerfile: str
    tag: str


@dataclass(frozen=True)
class StepOutcome:
    """What a run did with one step: built it, or found it on the engine."""

    name: str
    tag: str
    built: bool


# ----------------------------------------------------------------- the Dockerfile


def split(rendered: str) -> Optional[SplitDockerfile]:
    """The rendered Dockerfile's parts; None when it is not in kbundle's layout (one COPY per
    group, consecutive, before the tail)."""
    found = list(_LAYER_COPY.finditer(rendered))
    if not found:
        return None
    head = _instructions(rendered[: found[0].start()])
    tail = rendered[found[-1].end() :]
    copies = tuple(m.group(0).strip() for m in found)
    between = rendered[found[0].start() : found[-1].end()]
    if any(
        line.strip() and not line.lstrip().startswith("#") and line.strip() not in copies
        for line in between.splitlines()
    ):
        return None  # something else runs between the layers: not ours to split
    return SplitDockerfile(head, copies, tail)


def _instructions(text: str) -> str:
    """The Dockerfile's instructions without its comments: the rendered header names the bundle,
    and the first step is shared by every bundle on one base image."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return "# kbundle step: the base image, the user and the activation script.\n" + "\n".join(lines) + "\n"


def step_dockerfile(group: str, holds: str, parent: str, copy: str) -> str:
    return (
        f"# kbundle step: the environment's {group} layer ({holds}).\n"
        f"# Built on {parent}; only this folder is sent to the engine.\n"
        f"FROM {parent}\n{copy}\n"
    )


def final_dockerfile(last: str, tail: str) -> str:
    """The bundle's image: on the last step, the tail of kbundle's Dockerfile (its work/ COPY
    included: the final context holds the notebook and the included files alone)."""
    return f"# kbundle: the bundle's image, on its environment's last step.\nFROM {last}\n{tail.lstrip()}"


# ----------------------------------------------------------------- identities


def pip_wheels(lines: Iterable[str]) -> Optional[tuple[PipWheel, ...]]:
    """Each exact line with one sha256 as a wheel, sorted; None when any line names no single wheel
    (then only the install says which wheels land in the image)."""
    found = wheels_in_order(lines)
    return None if found is None else tuple(sorted(set(found), key=lambda w: (w.name, w.version, w.sha256)))


def wheels_in_order(lines: Iterable[str]) -> Optional[list[PipWheel]]:
    """`pip_wheels`, in the lines' order (a resolution as pip's install would record it)."""
    from kbundle.errors import KbundleError
    from kbundle.specs import parse_pip_line

    wheels = []
    for line in lines:
        text = line.partition("  # built from ")[0]
        try:
            pin = parse_pip_line(text)
        except KbundleError:
            return None
        if pin is None:
            continue
        shas = [h.split(":", 1)[1].lower() for h in pin.hashes if h.lower().startswith("sha256:")]
        if not pin.exact or len(shas) != 1:
            return None
        wheels.append(PipWheel(pin.name, pin.version, shas[0]))
    return wheels


def conda_packages(records: Iterable) -> tuple[CondaPackage, ...]:
    """The resolved conda records (rattler's), as what names their content."""
    found = []
    for r in records:
        sha = r.sha256.hex() if getattr(r, "sha256", None) else f"url:{r.url}"
        found.append(CondaPackage(str(r.name.normalized), sha))
    return tuple(sorted(set(found), key=lambda p: (p.name, p.sha256)))


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _group_content(group, inputs: ChainInputs) -> dict:
    """What lands in `group`: its conda and pip packages (the conda rest group: every conda record,
    since it holds conda-meta/)."""
    from kbundle.image.layers import normalised

    groups = inputs.groups
    conda = [
        f"{p.name} {p.sha256}"
        for p in inputs.conda
        if group.rest == "conda" or groups.group_of("conda", normalised(p.name)) == group.name
    ]
    pip = [w.line() for w in inputs.pip if groups.group_of("pip", w.name) == group.name]
    return {"conda": sorted(conda), "pip": sorted(pip)}


def shadowed(inputs: ChainInputs) -> list[str]:
    """pip distributions that replace a conda package's: pip's install takes that package's files
    out of whatever group they were in."""
    conda = {p.name for p in inputs.conda}
    return sorted({w.name for w in inputs.pip if w.name in conda})


def plan(inputs: ChainInputs, parts: SplitDockerfile) -> tuple[Step, ...]:
    """The chain's steps, bottom first, each with its tag."""
    head_tag = _tag(
        HEAD,
        _digest(
            {
                "context": contract.CONTEXT_VERSION,
                "base_id": inputs.base_id,
                "dockerfile": parts.head,
                "activate": inputs.activate_sha256,
            }
        ),
    )
    steps = [Step(HEAD, None, parts.head, head_tag)]
    common = {
        "context": contract.CONTEXT_VERSION,
        "groups": repr(inputs.groups),
        "interpreter": inputs.interpreter,
        "shadowed": shadowed(inputs),
    }
    for i, (group, copy) in enumerate(zip(inputs.groups.groups, parts.copies, strict=False)):
        parent = steps[-1].tag
        dockerfile = step_dockerfile(group.name, group.holds, parent, copy)
        content = _group_content(group, inputs)
        tag = _tag(group.name, _digest(common | content | {"dockerfile": dockerfile, "parent": parent}))
        steps.append(Step(group.name, contract.layer_dir(i, group.name), dockerfile, tag))
    return tuple(steps)


def fits(inputs: ChainInputs, parts: SplitDockerfile) -> bool:
    """Whether the Dockerfile COPYs exactly the groups' folders, in order."""
    wanted = [contract.layer_dir(i, g.name) for i, g in enumerate(inputs.groups.groups)]
    return [c.split()[1].rstrip("/") for c in parts.copies] == wanted


def _tag(name: str, digest: str) -> str:
    return f"{STEP_REPO}/{name}:{digest[:16]}"


def chain_label(steps: Sequence[Step]) -> str:
    return " ".join(s.tag for s in steps)


def tags_of(label: str) -> list[str]:
    return [t for t in (label or "").split() if t.startswith(STEP_REPO + "/")]
