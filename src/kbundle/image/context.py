"""The build context `run` assembles for the image contract (kbundle/contract.py).

    context/
      Dockerfile            what gets built
      kbundle-activate.sh   the ENTRYPOINT script, copied from templates/
      env/                  the conda prefix, installed on the host (image/env.py)
      pip/                  requirements.txt + wheels/, when the bundle has pip pins (image/wheels.py)
      work/                 the bundle's notebook and included files

Contexts live in kbundle's cache while a build runs; `kbundle gc` sweeps what a killed
build left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def env_dir(context: Path) -> Path:
    return context / contract.CONTEXT_ENV
