"""Find the sender's environment: `-e FILE`; else the environment of the kernel the notebook
names (conda, pixi, a uv project, venv, virtualenv, pyenv, the system Python: pack/kernelenv.py);
else the file beside the notebook that describes it (pack/formats.py); else `$CONDA_PREFIX`.
Each way says in a note which kernel or file it read."""

from __future__ import annotations

import os
from pathlib import Path

from kbundle.errors import UsageError
from kbundle.pack.envfile import read_env_file
from kbundle.pack.pipenv import Hints, notebook_python
from kbundle.pack.prefix import is_conda_prefix, read_prefix
from kbundle.pack.records import RawEnv

_HOW = "pass the environment with -e (environment.yml, requirements.txt, pyproject.toml, uv.lock or pixi.lock)"


def kernelspec_prefix(kernel_name: str) -> Path | None:
    """The conda prefix the named kernel's interpreter lives in, if any."""
    from kbundle.pack.kernelenv import kernel_interpreter

    exe, _ = kernel_interpreter(kernel_name)
    if exe is None:
        return None
    for candidate in (exe.parent.parent, exe.parent):  # bin/python on Unix, python.exe on Windows
        if is_conda_prefix(candidate):
            return candidate
    return None


def find_environment(
    kernel_name: str | None,
    env_file: Path | None,
    python: str | None,
    *,
    notebook: Path | None = None,
    extras: tuple[str, ...] | list[str] = (),
) -> RawEnv:
    folder = notebook.resolve().parent if notebook is not None else None
    hints = Hints(python=python, notebook_python=notebook_python(notebook), extras=tuple(extras), notebook_dir=folder)
    if env_file is not None:
        return read_env_file(env_file, python, hints)
    why = "it names no kernel"
    if kernel_name:
        from kbundle.pack.kernelenv import kernel_environment

        env, why = kernel_environment(kernel_name, hints)
        if env is not None:
            return env
    if folder is not None:
        from kbundle.pack.formats import beside

        found = beside(folder)
        if found is not None:
            env = read_env_file(found, python, hints)
            where = "beside the notebook" if found.parent == folder else f"in {found.parent}, above the notebook"
            env.notes.insert(0, f"environment: {found.name} {where} ({why})")
            env.source_path = found
            return env
    active = os.environ.get("CONDA_PREFIX")
    if active and is_conda_prefix(Path(active)):
        if extras:
            raise UsageError(
                "--extra applies to a pyproject.toml or uv.lock; the active conda environment is packed whole"
            )
        env = read_prefix(Path(active), "conda-prefix")
        env.notes.insert(0, f"environment: the active conda environment {active} ({why})")
        return env
    raise UsageError(
        f"cannot find the notebook's environment ({why}, no environment file lies beside it, "
        f"and no conda environment is active); {_HOW}"
    )
