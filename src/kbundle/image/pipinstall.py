"""Install the pip: section's wheels into the environment before the build, not in it.

Why not a `RUN pip install` in the Dockerfile: the wheels would have to be COPYed into the
image first, and their bytes would stay in that layer under the installed one (an image of
env + wheels: 10 GB for a 7 GB PyTorch environment); and the installed packages would be one
more layer that no other bundle shares.

So the env's own pip installs them into the env on the host (in `<context>/env`, mounted
read-write at its final prefix, so scripts name the image's interpreter), in a throwaway
container of the base image (image/sandbox.py): no network, `--no-index --no-deps` from the
checked wheels (mounted read-only) and the exact resolution with every sha256, which pip
checks. `--no-compile`: image/bytecode.py compiles afterwards, through its shared cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kbundle import contract
from kbundle.display import safe
from kbundle.errors import KbundleError

WHEELS_IN_CONTAINER = "/kbundle-wheels"
REQUIREMENTS = "requirements.txt"
TIMEOUT = 3600  # seconds: a 3 GB PyTorch unpacks in about a minute


@dataclass(frozen=True)
class Installed:
    lines: tuple[str, ...]  # the exact resolution pip installed from
    log: str  # pip's own words, for the build log
    warnings: tuple[str, ...] = ()  # what the after-install check found that is not an error


def command(requirements: str) -> list[str]:
    """pip's arguments: offline, exactly these wheels, nothing compiled, no cache, no questions."""
    return [
        "-I",
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        "--no-warn-script-location",
        "--progress-bar",
        "off",
        "--find-links",
        WHEELS_IN_CONTAINER,
        "-r",
        f"{WHEELS_IN_CONTAINER}/{requirements}",
    ]


def has_pip(prefix: Path) -> bool:
    return any(prefix.glob("lib/python3*/site-packages/pip/__init__.py"))


def install(
    client, image: str, prefix: Path, files: Sequence[Path], lines: Sequence[str], judged: Sequence[str] = ()
) -> Installed:
    """pip install `files` (the exact resolution `lines`) into the env at `prefix`, in a container of
    `image`. `judged`: the whole resolution pip check judges, when `lines` is only part of it (the
    rest already in place: image/partial.py)."""
    import docker

    from kbundle.image import env as envmod
    from kbundle.image import sandbox

    if not lines and not judged:
        return Installed((), "")
    if not has_pip(prefix):
        raise KbundleError("the bundle has pip: requirements, but its environment has no pip to install them with")
    run_as = sandbox.user()
    said = _run_install(client, image, prefix, files, lines, run_as) if lines else ""
    envmod.check_prefix(prefix)  # the bundle's pip wrote there: no symlink may lead out of it
    try:
        warnings = _check(client, image, prefix, run_as, judged or lines)
    except docker.errors.DockerException as exc:
        detail = str(getattr(exc, "explanation", None) or exc).splitlines()[0]
        raise KbundleError(f"cannot start the container that checks the environment: {detail}") from None
    return Installed(tuple(lines), said, warnings)


def _run_install(client, image: str, prefix: Path, files: Sequence[Path], lines: Sequence[str], run_as: str) -> str:
    """The env's own pip installs the wheels, offline, in a throwaway container; what it said."""
    import docker

    from kbundle.image import sandbox

    with tempfile.TemporaryDirectory(prefix=".kbundle-wheels-", dir=prefix.parent) as tmp:
        folder = Path(tmp)
        _gather(files, folder, lines)
        os.chmod(folder, 0o755)  # readable by the container's user
        try:
            with sandbox.lent(prefix, run_as):
                outcome = sandbox.run(
                    client,
                    image,
                    command(REQUIREMENTS),
                    entrypoint=[f"{contract.PREFIX}/bin/python"],
                    mounts={str(prefix): (contract.PREFIX, "rw"), str(folder): (WHEELS_IN_CONTAINER, "ro")},
                    environment={
                        "HOME": "/tmp",
                        "PIP_CONFIG_FILE": os.devnull,  # no pip.conf of the base image: the wheels and hashes say it all
                        "PYTHONDONTWRITEBYTECODE": "1",
                    },
                    label=contract.LABEL_PIP_INSTALL,
                    run_as=run_as,
                    timeout=TIMEOUT,
                )
        except docker.errors.DockerException as exc:
            detail = str(getattr(exc, "explanation", None) or exc).splitlines()[0]
            raise KbundleError(f"cannot start the container that installs the pip: section: {detail}") from None
    if outcome.status != 0:
        tail = [ln.strip() for ln in outcome.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in tail if ln.startswith("ERROR")] or tail[-1:] or [f"exit {outcome.status}"]
        raise KbundleError(f"installing the pip: section into the environment failed: {safe(errors[0])}")
    return outcome.stdout + outcome.stderr


def _check(client, image: str, prefix: Path, run_as: str, lines: Sequence[str]) -> tuple[str, ...]:
    """The environment as its users will see it (image/envcheck.py): `pip check` by the env's own
    pip, and conda's records against the files. A requirement pip broke is one error."""
    from kbundle.image import envcheck, sandbox

    with sandbox.lent(prefix, run_as):
        outcome = sandbox.run(
            client,
            image,
            ["-I", *envcheck.PIP_CHECK],
            entrypoint=[f"{contract.PREFIX}/bin/python"],
            mounts={str(prefix): (contract.PREFIX, "ro")},
            environment={"HOME": "/tmp", "PIP_CONFIG_FILE": os.devnull, "PYTHONDONTWRITEBYTECODE": "1"},
            label=contract.LABEL_PIP_INSTALL,
            run_as=run_as,
            timeout=TIMEOUT,
        )
    return envcheck.verdict(outcome.stdout + outcome.stderr, prefix, lines)


def install_on_host(prefix: Path, files: Sequence[Path], lines: Sequence[str], check: bool = True) -> Installed:
    """`run --native`: pip install `files` (the exact resolution `lines`) into the env at `prefix`
    by the env's own pip, here on the host, as the invoking user: the same wheels, hashes and
    options as in the image's sandbox (`--no-index --no-deps --no-compile`), then the same checks
    (image/envcheck.py). A wheel runs no code when it is installed; the env's own interpreter
    does (the consent says so: flows/review.py). `check=False` leaves the checks to the caller
    (`check_on_host`), for a pip that ran while conda's last packages were still being linked."""
    import subprocess

    if not lines:
        return Installed((), "")
    if not has_pip(prefix):
        raise KbundleError("the bundle has pip: requirements, but its environment has no pip to install them with")
    python = str(prefix / "bin" / "python")
    environment = host_environment(prefix)
    with tempfile.TemporaryDirectory(prefix=".kbundle-wheels-", dir=prefix.parent) as tmp:
        folder = Path(tmp)
        _gather(files, folder, lines)
        args = [a.replace(WHEELS_IN_CONTAINER, str(folder)) for a in command(REQUIREMENTS)]
        try:
            done = subprocess.run(
                [python, *args],
                capture_output=True,
                text=True,
                env=environment,
                stdin=subprocess.DEVNULL,
                timeout=TIMEOUT,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KbundleError(f"cannot run the environment's pip ({python}): {exc}") from None
    if done.returncode != 0:
        tail = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in tail if ln.startswith("ERROR")] or tail[-1:] or [f"exit {done.returncode}"]
        raise KbundleError(f"installing the pip: section into the environment failed: {safe(errors[0])}")
    warnings = check_on_host(prefix, lines) if check else ()
    return Installed(tuple(lines), done.stdout + done.stderr, warnings)


def check_on_host(prefix: Path, lines: Sequence[str]) -> tuple[str, ...]:
    """The checks after the pip: section is in a native prefix: `pip check` (image/envcheck.py)
    and no symlink leading out of the prefix. The warnings; an error raises."""
    import subprocess

    from kbundle.image import env as envmod
    from kbundle.image import envcheck

    python = str(prefix / "bin" / "python")
    # pip check reads only metadata: it runs while kbundle walks the prefix for links.
    checking = subprocess.Popen(
        [python, "-I", *envcheck.PIP_CHECK],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=host_environment(prefix),
        stdin=subprocess.DEVNULL,
    )
    try:
        envmod.check_prefix(prefix, str(prefix))  # the bundle's pip wrote there: no symlink may lead out of it
        said, _ = checking.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise KbundleError(f"the environment's `pip check` did not finish in {TIMEOUT} s ({python})") from None
    finally:
        if checking.poll() is None:
            checking.kill()
            checking.wait()
    return tuple(envcheck.verdict(said, prefix, lines))


def host_environment(prefix: Path) -> dict[str, str]:
    """What the env's pip runs with on the host: the user's environment minus anything that would
    point pip or the interpreter elsewhere (pip configuration, PYTHON* variables, a venv)."""
    drop = ("PIP_", "PYTHON", "VIRTUAL_ENV", "CONDA_", "LD_PRELOAD", "LD_LIBRARY_PATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    # Bytecode is written: the prefix is the user's own, and pip's second run (pip check) then
    # starts in a fraction of the first's time, as every later start of the kernel does.
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1")
    env["PATH"] = f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _gather(files: Sequence[Path], folder: Path, lines: Sequence[str]) -> None:
    """The wheels (hard links: no copy) and requirements.txt in one folder for the container."""
    for path in files:
        dest = folder / path.name
        try:
            os.link(path, dest)
        except OSError:
            shutil.copyfile(path, dest)
        os.chmod(dest, 0o644)
    (folder / REQUIREMENTS).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.chmod(folder / REQUIREMENTS, 0o644)
