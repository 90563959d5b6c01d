"""The environment of the kernel a notebook names (`metadata.kernelspec.name`, looked up in the
Jupyter kernelspecs with jupyter_client), whatever made it:

- a conda, mamba or micromamba environment (`conda-meta/`), also behind `conda run -p/-n`;
- a pixi environment (`.pixi/envs/NAME`): its workspace's pixi.lock, that environment;
- a uv project (`.venv` with uv.lock beside it, or in a folder above the notebook): the lock,
  plus what the .venv has that the lock does not;
- a venv, virtualenv, pyenv or the system Python: the distributions installed where it imports
  from, without the environment's own packaging tools (pip, setuptools, wheel) when no installed
  package requires them, each said in a note, and the indexes its installer was configured with.

`kernel_environment` gives (None, why) when the kernel cannot be read, so that pack can look
beside the notebook instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from kbundle.pack.pipenv import Hints, Reading, choose_python, major_minor, pip_env
from kbundle.pack.records import RawEnv
from kbundle.specs import canonical

_WRAPPERS = ("conda", "mamba", "micromamba")


def kernel_interpreter(kernel_name: str) -> tuple[Path | None, str]:
    """The interpreter the named kernel runs (or a conda prefix behind `conda run`), or why not."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        return None, f"no kernel named {kernel_name!r} is installed here"
    except Exception as exc:  # a broken kernel.json: jupyter's words
        return None, f"its kernelspec cannot be read ({exc})"
    language = (spec.language or "").lower()
    if language and not language.startswith("python"):
        return None, f"the kernel {kernel_name!r} is a {spec.language} kernel"
    if not spec.argv:
        return None, f"the kernel {kernel_name!r} has no command"
    argv = list(spec.argv)
    if Path(argv[0]).name in _WRAPPERS and "run" in argv:
        prefix = _conda_run_prefix(argv)
        if prefix is not None:
            return prefix / "bin" / "python", ""
        return None, f"the kernel {kernel_name!r} runs `{' '.join(argv[:4])} …`, whose environment kbundle cannot find"
    exe = argv[0]
    # jupyter_client runs the stock `python3` kernel, and any "python", with its own interpreter.
    if exe in ("python", "python3", f"python{sys.version_info[0]}", "{python}"):
        return Path(sys.executable), ""
    path = Path(exe) if os.path.isabs(exe) else Path(shutil.which(exe) or exe)
    if not path.exists():
        return None, f"the kernel {kernel_name!r} runs {exe}, which does not exist here"
    return path, ""


def _conda_run_prefix(argv: list[str]) -> Path | None:
    for flag in ("-p", "--prefix"):
        if flag in argv[:-1]:
            return Path(argv[argv.index(flag) + 1])
    for flag in ("-n", "--name"):
        if flag in argv[:-1]:
            name = argv[argv.index(flag) + 1]
            tool = Path(shutil.which(argv[0]) or argv[0])
            roots = [tool.resolve().parent.parent, Path.home() / ".conda"]
            roots += [Path(v) for v in (os.environ.get("MAMBA_ROOT_PREFIX"), os.environ.get("CONDA_ROOT")) if v]
            dirs = [Path(d) for d in os.environ.get("CONDA_ENVS_PATH", "").split(os.pathsep) if d]
            for candidate in [d / name for d in dirs] + [r / "envs" / name for r in roots]:
                if (candidate / "conda-meta").is_dir():
                    return candidate
    return None


def kernel_environment(kernel_name: str, hints: Hints) -> tuple[RawEnv | None, str]:
    from kbundle.pack.prefix import is_conda_prefix, read_prefix

    exe, why = kernel_interpreter(kernel_name)
    if exe is None:
        return None, why
    for prefix in (exe.parent.parent, exe.parent):
        if is_conda_prefix(prefix):
            pixi = _pixi_workspace(prefix)
            if pixi is not None:
                return _from_pixi(pixi, prefix, kernel_name, hints), ""
            if hints.extras:
                _no_extras(f"the kernel {kernel_name!r} is a conda environment")
            env = read_prefix(prefix, "kernelspec-prefix")
            env.notes.insert(0, f"environment: the kernel {kernel_name!r}, the conda environment {prefix}")
            return env, ""
    from kbundle.pack.interpreter import inspect

    interpreter = inspect(exe, hints.notebook_dir)
    if interpreter is None:
        return None, f"the kernel {kernel_name!r} runs {exe}, which kbundle cannot ask or read here"
    lock = _uv_lock(interpreter, hints.notebook_dir)
    if lock is not None:
        return _from_uv(lock, interpreter, kernel_name, hints), ""
    return _from_site(interpreter, kernel_name, hints), ""


def _no_extras(what: str):
    from kbundle.errors import UsageError

    raise UsageError(f"--extra applies to a pyproject.toml or uv.lock; {what}, packed as it is installed")


# ---------------------------------------------------------------- pixi


def _pixi_workspace(prefix: Path) -> Path | None:
    """The pixi.lock of `<workspace>/.pixi/envs/<name>`, when there is one."""
    if prefix.parent.name == "envs" and prefix.parent.parent.name == ".pixi":
        lock = prefix.parent.parent.parent / "pixi.lock"
        return lock if lock.is_file() else None
    return None


def _from_pixi(lock: Path, prefix: Path, kernel_name: str, hints: Hints) -> RawEnv:
    from kbundle.pack.pixilock import read_lock

    env = read_lock(lock, hints, env_name=prefix.name)
    env.notes.insert(0, f"environment: the kernel {kernel_name!r}, the pixi environment {prefix.name} ({lock})")
    return env


# ---------------------------------------------------------------- uv projects


def _uv_lock(interpreter, notebook_dir: Path | None) -> Path | None:
    """The uv.lock of a uv project's .venv: beside the .venv, or in the notebook's folder or one above."""
    if not interpreter.venv:
        return None
    beside = interpreter.prefix.parent / "uv.lock"
    if beside.is_file():
        return beside
    if interpreter.prefix.name != ".venv" or notebook_dir is None:
        return None
    for folder in (notebook_dir, *notebook_dir.parents):
        if (folder / "uv.lock").is_file() and (folder / ".venv").resolve() == interpreter.prefix.resolve():
            return folder / "uv.lock"
    return None


def _from_uv(lock: Path, interpreter, kernel_name: str, hints: Hints) -> RawEnv:
    from kbundle.pack.interpreter import distributions, without_tooling
    from kbundle.pack.uvlock import read_uv_lock

    env = read_uv_lock(lock, hints, python_full=interpreter.version)
    env.notes.insert(0, f"environment: the kernel {kernel_name!r}, the uv project {lock.parent} (its uv.lock)")
    locked = {p.name for p in env.pip}
    kept, _ = without_tooling(distributions(interpreter.site_dirs), major_minor(interpreter.version))
    extra = [d for d in kept if canonical(d.name) not in locked and d.pin is not None and not d.pin.local]
    if extra:
        env.pip += [d.pin for d in extra]
        shown = ", ".join(f"{d.name} {d.version}" for d in extra)
        env.notes.append(f"installed in {interpreter.prefix} but not in uv.lock, so carried as installed: {shown}")
        env.source_text += "".join(f"{d.pin.text}\n" for d in extra)
    return env


# ---------------------------------------------------------------- venv, virtualenv, pyenv, system


def _from_site(interpreter, kernel_name: str, hints: Hints) -> RawEnv:
    from kbundle.pack.interpreter import distributions, without_tooling
    from kbundle.pack.pipconfig import configured_indexes

    if hints.extras:
        _no_extras(f"the kernel {kernel_name!r} runs a Python environment")
    what = _kind(interpreter)
    python, where = choose_python(hints, f"the kernel {kernel_name!r}", (interpreter.version, "the kernel's Python"))
    dists = distributions(interpreter.site_dirs)
    kept, left_out = without_tooling(dists, python)
    reading = Reading(
        notes=[f"environment: the kernel {kernel_name!r}, {what} {interpreter.prefix} (Python {interpreter.version})"]
    )
    if left_out:
        shown = ", ".join(f"{d.name} {d.version}" for d in left_out)
        reading.notes.append(
            f"left out {shown}: the environment's own packaging tools, which no installed package requires "
            "(the image has its own pip)"
        )
    reading.pins = [d.pin for d in kept if d.pin is not None]
    uv = interpreter.made_by == "uv" or any(d.installer == "uv" for d in dists)
    configured_indexes(interpreter.prefix if interpreter.venv else None, uv, reading)
    if python != major_minor(interpreter.version):
        reading.notes.append(f"python {python} from {where}, not the kernel's {interpreter.version}")
    header = (
        f"read by kbundle from the kernel {kernel_name!r}: {what} {interpreter.prefix} (Python {interpreter.version})"
    )
    name = interpreter.prefix.name if interpreter.venv else kernel_name
    return pip_env(python, reading, name=name, source_file="requirements.txt", header=header)


def _kind(interpreter) -> str:
    if interpreter.venv:
        return {"uv": "the uv venv", "virtualenv": "the virtualenv"}.get(interpreter.made_by, "the venv")
    if ".pyenv" in interpreter.prefix.parts:
        return "the pyenv Python"
    return "the Python installation"
