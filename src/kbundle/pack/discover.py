"""Find the sender's environment: `-e FILE`, else the notebook's own kernel (via its
kernelspec, when the kernel's interpreter lives in a conda prefix), else `$CONDA_PREFIX`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kbundle.errors import UsageError
from kbundle.pack.envfile import read_env_file
from kbundle.pack.prefix import is_conda_prefix, read_prefix
from kbundle.pack.records import RawEnv

_HOW = "pass the environment with -e environment.yml (from `conda env export`)"


def kernelspec_prefix(kernel_name: str) -> Path | None:
    """The conda prefix the named kernel's interpreter lives in, if any."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        return None
    if not spec.argv:
        return None
    exe = spec.argv[0]
    # The stock `python3` kernel runs "python", i.e. the interpreter jupyter itself uses.
    path = Path(sys.executable) if exe in ("python", "python3", "{python}") else Path(exe)
    for candidate in (path.parent.parent, path.parent):  # bin/python on Unix, python.exe on Windows
        if is_conda_prefix(candidate):
            return candidate
    return None


def find_environment(kernel_name: str | None, env_file: Path | None, python: str | None) -> RawEnv:
    if env_file is not None:
        return read_env_file(env_file, python)
    if kernel_name:
        prefix = kernelspec_prefix(kernel_name)
        if prefix is not None:
            return read_prefix(prefix, "kernelspec-prefix")
    active = os.environ.get("CONDA_PREFIX")
    if active and is_conda_prefix(Path(active)):
        return read_prefix(Path(active), "conda-prefix")
    named = f"its kernel {kernel_name!r} is not a conda environment here" if kernel_name else "it names no kernel"
    raise UsageError(f"cannot find the notebook's environment ({named} and no conda environment is active); {_HOW}")
