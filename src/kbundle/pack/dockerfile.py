"""Render the bundle's Dockerfile from templates/Dockerfile.j2 against the image contract.

Rendering only: every decision was made before, by the other pack modules, and arrives
here as plain values. The template escapes its own values with the filters below, so no
caller needs to know Dockerfile quoting; paths and label keys come from kbundle.contract.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass

from kbundle import contract
from kbundle.errors import UsageError

TEMPLATE = "Dockerfile.j2"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# A Docker image reference: [registry[:port]/]name[:tag][@digest], no spaces or quotes.
_IMAGE_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*")


@dataclass(frozen=True)
class DockerfileInputs:
    name: str
    kbundle_version: str
    format_version: int
    content_hash: str
    notebook: str  # path inside work/
    python: str | None
    cuda: str | None
    cudnn: str | None
    runtime_in_env: bool
    env_libs: bool
    base_image: str
    base_reason: str
    require_cuda: str | None
    pip: bool


def comment(value: object) -> str:
    """A value inside a `#` comment: one line, whatever it holds."""
    return _CONTROL.sub(" ", str(value)).strip()


def double_quoted(value: object) -> str:
    """A value inside "..." of a LABEL or ENV: quotes, backslashes and `$` escaped, one line."""
    text = comment(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")


def image_ref(value: object) -> str:
    """A FROM argument: a plain image reference, or an error (it must not smuggle in a second word)."""
    text = str(value)
    if not _IMAGE_REF.fullmatch(text):
        raise UsageError(f"{text!r} is not an image reference")
    return text


_LABELS = {
    "name": contract.LABEL_NAME,
    "format": contract.LABEL_FORMAT,
    "content_hash": contract.LABEL_CONTENT_HASH,
    "notebook": contract.LABEL_NS + "notebook",
    "python": contract.LABEL_NS + "python",
    "cuda": contract.LABEL_NS + "cuda",
    "cudnn": contract.LABEL_NS + "cudnn",
    "version": contract.LABEL_VERSION,
}


def _layers() -> list[dict[str, str]]:
    """The environment's layers in order (data/layers.yaml): fixed, so the Dockerfile is the same
    whatever the environment resolves to."""
    from kbundle.facts import layer_groups

    return [
        {"group": g.name, "holds": g.holds, "folder": contract.layer_dir(i, g.name)}
        for i, g in enumerate(layer_groups().groups)
    ]


def _contract_values() -> dict[str, object]:
    return {
        "prefix": contract.PREFIX,
        "work": contract.WORK,
        "activate": contract.ACTIVATE,
        "user": contract.USER,
        "context_layers": contract.CONTEXT_LAYERS,
        "layers": _layers(),
        "context_work": contract.CONTEXT_WORK,
        "context_activate": contract.CONTEXT_ACTIVATE,
        "labels": _LABELS,
    }


def inputs_for(manifest) -> DockerfileInputs:
    """Everything the template needs comes from the manifest, so anyone holding it can re-render."""
    return DockerfileInputs(
        name=manifest.name,
        kbundle_version=manifest.kbundle_version,
        format_version=manifest.format_version,
        content_hash=manifest.content_hash,
        notebook=manifest.notebook.rpartition("/")[2],
        python=manifest.python,
        cuda=manifest.cuda,
        cudnn=manifest.cudnn,
        runtime_in_env=manifest.cuda_runtime_in_env,
        env_libs=manifest.cuda_env_libs,
        base_image=manifest.base_image,
        base_reason=manifest.base_image_reason,
        require_cuda=manifest.require_cuda,
        pip=bool(manifest.pip),
    )


def render_for(manifest) -> str:
    return render(inputs_for(manifest))


def render(inputs: DockerfileInputs) -> str:
    return template().render(**_contract_values(), **asdict(inputs))


@functools.lru_cache(maxsize=1)
def template():
    """The Dockerfile template, compiled once (pack warms it while pip's resolver runs)."""
    import jinja2

    from kbundle.resources import templates_dir

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Dockerfile, not HTML: the filters below do the escaping
    )
    env.filters.update(dq=double_quoted, comment=comment, image_ref=image_ref)
    return env.get_template(TEMPLATE)
