"""The build context `run` assembles for the image contract (kbundle/contract.py).

    context/
      Dockerfile            what gets built
      kbundle-activate.sh   the ENTRYPOINT script, copied from templates/
      env/                  while it is assembled: the prefix, installed on the host (image/env.py),
                            with the pip section installed over it (image/pipinstall.py) and
                            byte-compiled (image/bytecode.py)
      env-layers/NN-group/  then: the same files, moved into one folder per layer (image/layers.py)
      work/                 the bundle's notebook and included files

Contexts live in kbundle's cache while a build runs; `kbundle gc` sweeps what a killed
build left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from kbundle import contract
from kbundle.cache import contexts_dir


@contextmanager
def temporary_context(prefix: str) -> Iterator[Path]:
    """A fresh, empty context directory that is removed afterwards, whatever happens."""
    root = contexts_dir()
    root.mkdir(parents=True, exist_ok=True)
    context = Path(tempfile.mkdtemp(prefix=prefix + "-", dir=root))
    try:
        yield context
    finally:
        shutil.rmtree(context, ignore_errors=True)


def write_static(context: Path, dockerfile: str) -> None:
    """The Dockerfile and the activation script: the parts of the context no bundle changes."""
    (context / contract.CONTEXT_DOCKERFILE).write_text(dockerfile, encoding="utf-8")
    script = context / contract.CONTEXT_ACTIVATE
    shutil.copyfile(contract.activate_script(), script)
    os.chmod(script, 0o755)  # the legacy builder's COPY keeps the context's mode


def layout_problem(dockerfile: str) -> Optional[str]:
    """Why `dockerfile` cannot be built from the context kbundle assembles, or None.

    Bundles packed before the environment was split into layers COPY `env/` and `pip/`: their
    shipped Dockerfile (--use-bundled-dockerfile) names folders today's context does not have."""
    if re.search(rf"^\s*COPY\s+{re.escape(contract.CONTEXT_LAYERS)}/", dockerfile, re.MULTILINE | re.IGNORECASE):
        return None
    if re.search(r"^\s*COPY\s+(?:env|pip)/", dockerfile, re.MULTILINE | re.IGNORECASE):
        return (
            "this Dockerfile was written for an older kbundle's build context (COPY env/, pip/); "
            "build kbundle's own rendering of the manifest instead (leave out --use-bundled-dockerfile)"
        )
    return None


def env_dir(context: Path) -> Path:
    return context / contract.CONTEXT_ENV


def stage_layers(context: Path):
    """Split the installed `env/` into the Dockerfile's layer folders (data/layers.yaml); the layers."""
    from kbundle.facts import layer_groups
    from kbundle.image import layers

    return layers.stage(context, layer_groups())
