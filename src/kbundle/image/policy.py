"""The one container policy: how every container kbundle starts is locked down, and as whom it runs.

Every container runs a stranger's code: the byte-compiler and pip run the bundle's own
interpreter (image/bytecode.py, image/pipinstall.py), a VCS or sdist build runs the project's
build code (image/sourcebuild.py), and the kernel runs the notebook (kernel/launcher.py, and
kernel/node_agent.py on a Slurm node, which renders the same policy as `docker run` flags
from the launcher's request). So each of them gets, from here and nowhere else:

- no capabilities and no new privileges (a setuid binary does not raise them);
- a read-only root file system, with tmpfs where something must write (`/tmp`, also HOME);
- a limit on processes (a fork bomb stops at the container);
- no network unless the policy says which (the kernel's: a bridge or, asked for, the host's);
- an environment cleared of what the base image's ENV could use to run code before ours
  (LD_PRELOAD, PYTHONPATH, ...): those are set empty, which the loader and Python read as unset;
- a user that is never root (`container_user`).

Variants differ only where their work needs it: the build's /tmp allows exec (a build loads
compiled build requirements from pip's isolated environment there), and the kernel keeps
LD_LIBRARY_PATH (the CUDA base images point it at the driver's libraries) and its network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

NOBODY = "65534:65534"  # the container's user when kbundle itself runs as root and nobody else fits
NOBODY_ID = 65534

# What a base image's ENV may hold that would run code, or load a library, before the command's own.
CLEARED = (
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "PYTHONINSPECT",
    "PYTHONBREAKPOINT",
    "PYTHONEXECUTABLE",
    "BASH_ENV",
    "ENV",
)
SCRATCH = "rw,nosuid,nodev,noexec"  # a tmpfs nothing is run from
SCRATCH_EXEC = "rw,nosuid,nodev,exec"  # a tmpfs code may be loaded from (builds, a kernel's JIT caches)


@dataclass(frozen=True)
class Lockdown:
    """One container's lockdown. Read through `sdk_options` (docker-py's high-level create),
    `host_options`/`create_options` (its low-level API) or `request` (the Slurm node agent)."""

    network: str = "none"  # "none", "bridge" or "host"
    tmpfs: tuple[tuple[str, str], ...] = (("/tmp", SCRATCH),)
    pids: int = 512
    cleared: tuple[str, ...] = CLEARED
    capabilities_dropped: tuple[str, ...] = ("ALL",)
    options: tuple[str, ...] = ("no-new-privileges",)

    def environment(self, extra: Mapping[str, str] = {}) -> dict[str, str]:
        """The container's environment: the cleared names set empty, then the caller's own."""
        return {**{name: "" for name in self.cleared}, **extra}

    def host_options(self) -> dict[str, Any]:
        """The engine's host configuration (docker-py `create_host_config` keywords)."""
        return {
            "cap_drop": list(self.capabilities_dropped),
            "security_opt": list(self.options),
            "read_only": True,
            "tmpfs": dict(self.tmpfs),
            "pids_limit": self.pids,
            "network_mode": self.network,
        }

    def engine_api_options(self) -> dict[str, Any]:
        """`host_options` as the Engine API's own HostConfig fields (what docker-py renders them
        into): for the launcher's own client of a local socket (kernel/engine_http.py)."""
        return {
            "CapDrop": list(self.capabilities_dropped),
            "SecurityOpt": list(self.options),
            "ReadonlyRootfs": True,
            "Tmpfs": dict(self.tmpfs),
            "PidsLimit": self.pids,
            "NetworkMode": self.network,
        }

    def create_options(self, extra: Mapping[str, str] = {}) -> dict[str, Any]:
        """The container's own settings (docker-py `create_container` keywords)."""
        options: dict[str, Any] = {"environment": self.environment(extra)}
        if self.network == "none":
            options["network_disabled"] = True
        return options

    def sdk_options(self, extra: Mapping[str, str] = {}) -> dict[str, Any]:
        """Both, for docker-py's `containers.create`, which sorts them itself."""
        return {**self.host_options(), **self.create_options(extra)}

    def libpod_options(self, extra: Mapping[str, str] = {}) -> dict[str, Any]:
        """The policy in Podman's own API (libpod's SpecGenerator): for a GPU kernel on Podman,
        whose Docker-compatible API drops GPU requests (kernel/podman.py)."""
        tmpfs = [
            {"type": "tmpfs", "source": "tmpfs", "destination": path, "options": opts.split(",")}
            for path, opts in self.tmpfs
        ]
        return {
            "cap_drop": list(self.capabilities_dropped),
            "no_new_privileges": "no-new-privileges" in self.options,
            "read_only_filesystem": True,
            "resource_limits": {"pids": {"limit": self.pids}},
            "netns": {"nsmode": self.network},
            "mounts": tmpfs,
            "env": self.environment(extra),
        }

    def request(self, extra: Mapping[str, str] = {}) -> dict[str, Any]:
        """The policy as JSON for the Slurm node agent, which renders it as `docker run` flags."""
        host = self.host_options()
        return {**host, "tmpfs": [[path, opts] for path, opts in self.tmpfs], "environment": self.environment(extra)}


SANDBOX = Lockdown()  # byte-compiling, installing wheels, `pip check`: nothing is run from /tmp
BUILD = Lockdown(tmpfs=(("/tmp", SCRATCH_EXEC),), pids=1024)  # a project's build: compilers, its build env
KERNEL_PIDS = 8192  # threads count too: a kernel's BLAS, DataLoader workers and JIT pools


def kernel(network: str) -> Lockdown:
    """The kernel's lockdown: its network (`bridge` or `host`), an exec-able /tmp (HOME lives
    there: IPython's profile, JIT caches), room for threads, and the base image's LD_LIBRARY_PATH
    kept (CUDA images point it at the driver's libraries)."""
    cleared = tuple(name for name in CLEARED if name != "LD_LIBRARY_PATH")
    return replace(SANDBOX, network=network, tmpfs=(("/tmp", SCRATCH_EXEC),), pids=KERNEL_PIDS, cleared=cleared)


@dataclass(frozen=True)
class User:
    """Who a container runs as: `uid:gid` (or a name the image knows) and supplementary groups."""

    user: str
    groups: list[str] = field(default_factory=list)


def container_user(
    uid: int, gid: int, groups: Sequence[int] = (), owner: Optional[tuple[int, int]] = None, fallback: str = NOBODY
) -> User:
    """The one rule for every container's user: never root (pure).

    A non-root invoker is the container's user, with their groups (never group 0), so that files
    the container writes are theirs. A root invoker (sudo, a root Jupyter) gets the owner of the
    folder the container writes into (`owner`), or `fallback` when root owns that too or there is
    none: nobody for throwaway containers, the image's unprivileged user for a kernel. Root's
    groups never follow."""
    if uid != 0:
        return User(f"{uid}:{gid}", [str(g) for g in sorted(set(groups)) if g != gid and g != 0])
    if owner is not None and owner[0] != 0:
        return User(f"{owner[0]}:{owner[1]}")
    return User(fallback)


def invoker(owner: Optional[tuple[int, int]] = None, fallback: str = NOBODY) -> User:
    """`container_user` for this process."""
    return container_user(os.getuid(), os.getgid(), os.getgroups(), owner, fallback)


def is_root(user: str) -> bool:
    """Whether a container user string means root (a uid of 0, or the name)."""
    return user.split(":", 1)[0] in ("0", "root", "")
