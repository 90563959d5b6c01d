"""VCS and sdist pip requirements, fetched on the host and built into wheels somewhere safe.

The source is fetched here (git, or a plain download: no package code runs for that); the
build requirements it declares are fetched first as wheels for the target and offered to the
build as its only index. `ContainerBuilder` runs the build (the project's own `setup.py` or
backend: the most dangerous code a bundle carries) in a locked-down container of the base
image; `HostBuilder` runs it on the host for `run --native`, whose consent names each such line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from kbundle.errors import KbundleError
from kbundle.image import sources
from kbundle.image.wheels import _run_pip, cache_root_dir, sha256_file
from kbundle.pipplatform import target_args
from kbundle.specs import PipIndexes, PipPin

BUILD_ROOT = "/kbundle"  # in the build container: src/ (the project), deps/ (its build requirements), out/


class Builder:
    """Build a VCS or sdist requirement into a wheel with the environment's own Python.

    The source is fetched here (git, or a plain HTTP download: no package code runs for that);
    the build requirements the project declares are fetched here first as wheels for the target
    and offered to the build as its only index. Subclasses say where the build runs (`_run`)."""

    def build(self, pin: PipPin, python: str, indexes: PipIndexes, glibc: str | None) -> tuple[Path, str]:
        work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_root_dir("built")))
        try:
            src, source, subdir = sources.fetch_source(pin, work / "src")
            deps = work / "deps"
            deps.mkdir()
            requires = sources.build_requires(src / subdir if subdir else src)
            if requires:
                args = ["download", *target_args(python, glibc), "-d", str(deps)]
                _run_pip(args, requires, indexes, f"building {pin.name}", (python, glibc))
            out = work / "out"
            out.mkdir()
            self._run(pin, work, _inside_src(src, work / "src", subdir))
            wheels = sorted(out.glob("*.whl"))
            if len(wheels) != 1:
                raise KbundleError(f"pip: building {pin.text} made {len(wheels)} wheels, not one")
            final = cache_root_dir("built") / sha256_file(wheels[0])[:16]
            final.mkdir(exist_ok=True)
            wheel = final / wheels[0].name
            os.replace(wheels[0], wheel)
            return wheel, source
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _run(self, pin: PipPin, work: Path, subdir: str) -> None:
        raise NotImplementedError


def _inside_src(root: Path, src: Path, subdir: str) -> str:
    """The project's folder relative to `src`: an sdist unpacks under its own top folder
    (`name-1.0/`), which `fetch_source` returns as `root`; a `#subdirectory=` goes below that."""
    parts = [p for p in root.relative_to(src).parts if p not in ("", ".")]
    return "/".join([*parts, *([subdir] if subdir else [])])


def _wheel_command(python: str, root: str, subdir: str) -> list[str]:
    """`pip wheel` of the source in `root`/src, offline, its build requirements from `root`/deps."""
    return [
        python,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-index",
        "--find-links",
        f"{root}/deps",
        "--wheel-dir",
        f"{root}/out",
        "--disable-pip-version-check",
        "--no-cache-dir",
        "--progress-bar",
        "off",
        f"{root}/src" + (f"/{subdir}" if subdir else ""),
    ]


class HostBuilder(Builder):
    """`run --native`: the build runs here, on the host, as the invoking user, by the environment's
    own Python at `prefix`: its build code runs on this machine (the consent names each such line:
    flows/review.py). pip gets no index but the build requirements fetched beforehand."""

    def __init__(self, prefix: Path, timeout: float = 600):
        self.prefix, self.timeout = prefix, timeout

    def _run(self, pin: PipPin, work: Path, subdir: str) -> None:
        from kbundle.image.pipinstall import host_environment

        command = _wheel_command(str(self.prefix / "bin" / "python"), str(work), subdir)
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=host_environment(self.prefix),
                stdin=subprocess.DEVNULL,
                timeout=self.timeout,
                cwd=work,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KbundleError(f"pip: building {pin.text} into a wheel failed: {exc}") from None
        if done.returncode != 0:
            tail = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()][-1:] or ["no output"]
            raise KbundleError(f"pip: building {pin.text} into a wheel failed: {tail[0].strip()}")


class ContainerBuilder(Builder):
    """Build a VCS or sdist requirement into a wheel without running its code on this host.

    The environment's own Python (`env_dir`, installed for the image's prefix) runs `pip wheel`
    in a throwaway container of the base image (image/sandbox.py), locked down as the other
    throwaway containers (image/policy.py `BUILD`: no network, no capabilities, no new
    privileges, a read-only root, a process limit, a cleared environment; its /tmp allows exec
    for the build requirements pip installs there). Only the source and the wheel folder are
    writable, and only by the container's user: handed over for the build when kbundle runs as
    root (`sandbox.lent`), never opened to every user."""

    def __init__(self, client, base_image: str, env_dir: Path, timeout: float = 600):
        self.client, self.base_image, self.env_dir, self.timeout = client, base_image, env_dir, timeout

    def _run(self, pin: PipPin, work: Path, subdir: str) -> None:
        import docker

        from kbundle import contract
        from kbundle.image import policy, sandbox

        run_as = sandbox.user()
        command = _wheel_command(f"{contract.PREFIX}/bin/python", BUILD_ROOT, subdir)
        try:
            with sandbox.lent(work, run_as):
                outcome = sandbox.run(
                    self.client,
                    self.base_image,
                    command[1:],
                    entrypoint=command[:1],
                    mounts={
                        str(self.env_dir): (contract.PREFIX, "ro"),
                        str(work / "src"): (f"{BUILD_ROOT}/src", "rw"),
                        str(work / "deps"): (f"{BUILD_ROOT}/deps", "ro"),
                        str(work / "out"): (f"{BUILD_ROOT}/out", "rw"),
                    },
                    environment={"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PIP_CONFIG_FILE": "/dev/null"},
                    label=contract.LABEL_WHEEL_BUILD,
                    run_as=run_as,
                    timeout=self.timeout,
                    lockdown=policy.BUILD,
                )
        except docker.errors.DockerException as exc:
            detail = str(getattr(exc, "explanation", None) or exc).splitlines()[0]
            raise KbundleError(f"pip: cannot start the container that builds {pin.text}: {detail}") from None
        if outcome.status != 0:
            lines = (outcome.stdout + "\n" + outcome.stderr).splitlines()
            tail = [ln for ln in lines if ln.strip()][-1:] or ["no output"]
            raise KbundleError(f"pip: building {pin.text} into a wheel failed: {tail[0].strip()}")
