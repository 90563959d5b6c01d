"""Render the bundle's Dockerfile from templates/Dockerfile.j2 (the image contract is in
docs/architecture.md). Rendering only: every decision was made before, by the other
pack modules, and arrives here as plain values."""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATE = "Dockerfile.j2"


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


def render(inputs: DockerfileInputs) -> str:
    import jinja2

    from kbundle.resources import templates_dir

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    return env.get_template(TEMPLATE).render(**inputs.__dict__)
