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
            self._run(pin, work, subdir)
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
    in a throwaway container of the base image: no network, every capability dropped, no new
    privileges, an unprivileged user."""

    def __init__(self, client, base_image: str, env_dir: Path, timeout: float = 600):
        self.client, self.base_image, self.env_dir, self.timeout = client, base_image, env_dir, timeout

    def _run(self, pin: PipPin, work: Path, subdir: str) -> None:
        from kbundle import contract

        uid = os.getuid() if hasattr(os, "getuid") and os.getuid() != 0 else 65534
        for path in [work, *work.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o777 if path.is_dir() else 0o666)
        command = _wheel_command(f"{contract.PREFIX}/bin/python", "/kbundle", subdir)
        container = self.client.containers.create(
            self.base_image,
            command=command,
            entrypoint=[],
            user=f"{uid}:{uid}",
            network_disabled=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            environment={"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PIP_CONFIG_FILE": "/dev/null"},
            volumes={
                str(self.env_dir): {"bind": contract.PREFIX, "mode": "ro"},
                str(work / "src"): {"bind": "/kbundle/src", "mode": "rw"},
                str(work / "deps"): {"bind": "/kbundle/deps", "mode": "ro"},
                str(work / "out"): {"bind": "/kbundle/out", "mode": "rw"},
            },
            labels={"org.kbundle.role": "wheel-build"},
        )
        try:
            container.start()
            status = container.wait(timeout=self.timeout)
            logs = container.logs().decode(errors="replace")
        finally:
            container.remove(force=True)
        if status.get("StatusCode") != 0:
            tail = [ln for ln in logs.splitlines() if ln.strip()][-1:] or ["no output"]
            raise KbundleError(f"pip: building {pin.text} into a wheel failed: {tail[0].strip()}")
