"""Which host folders a kernel container sees, and how: the kernel runs a stranger's code as you.

The kernel gets the notebook's own folder (where Jupyter says the notebook is, else the folder
it starts the kernel in) and the kernelspec's workdir (the bundle's files), read-write, at the
same paths. A folder whose files would let the kernel reach beyond itself is left out instead,
and the banner says so with what to do:

- a home folder, or one that holds one (`~/.bashrc`, `~/.ssh`, `~/.local/share/jupyter/kernels`
  are code the host runs, or keys it uses);
- a folder holding the files a home holds (DOTFILES), or inside a home's dot-folder;
- Jupyter's data, config and runtime folders and kbundle's cache (a kernelspec there is a
  command the host runs; the cache holds other bundles' bytecode), or a folder holding them;
- a folder inside a git repository's `.git`.

A mounted folder's own `.git` is mounted again read-only over it: its hooks and config run on
the user's next git command. Reading (pure, apart from looking at the folders): local and Slurm
kernels alike.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field

from kbundle import contract

# A bind mount at (or above) these paths would hide the container's own system or environment.
RESERVED = (
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    contract.ROOT,
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var",
)
# What marks a folder as someone's home: shell start-up files, keys, credentials, per-user config.
DOTFILES = (
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".bash_logout",
    ".profile",
    ".zshrc",
    ".zshenv",
    ".zprofile",
    ".zlogin",
    ".cshrc",
    ".tcshrc",
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".kube",
    ".docker",
    ".netrc",
    ".pypirc",
    ".gitconfig",
    ".git-credentials",
    ".config",
    ".local",
    ".jupyter",
    ".ipython",
    ".condarc",
)
ADVICE = "move the notebook into a folder of its own"


class MountError(Exception):
    """A folder that cannot be mounted at all (the launcher's one `error:` line)."""


@dataclass(frozen=True)
class Guard:
    """What must stay out of a kernel's reach: home folders and Jupyter's and kbundle's own."""

    homes: tuple[str, ...] = ()
    protected: tuple[tuple[str, str], ...] = ()  # (folder, what it is)


@dataclass(frozen=True)
class Mounts:
    writable: list[str]
    readonly: list[str]  # a writable mount's .git, mounted again over it
    working_dir: str
    notes: list[str] = field(default_factory=list)  # for the banner: what is mounted, how, and what is not


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def hidden_by(mount: str) -> str:
    """The reserved path that mounting `mount` would cover ("" when none)."""
    prefix = mount.rstrip("/") + "/"
    for reserved in RESERVED:
        if mount == reserved or reserved.startswith(prefix):
            return reserved
    return contract.ROOT if mount.startswith(contract.ROOT + "/") else ""


def guard_for(environ: Mapping[str, str], uid: int) -> Guard:
    """The folders to keep out for this invoker: their home (and $HOME), Jupyter's, kbundle's cache."""
    homes = {environ.get("HOME", "")}
    try:
        homes.add(pwd.getpwuid(uid).pw_dir)
    except KeyError:
        pass
    homes = {os.path.realpath(h) for h in homes if h and h != "/"}
    home = environ.get("HOME") or next(iter(sorted(homes)), "")
    data = environ.get("JUPYTER_DATA_DIR") or os.path.join(home, ".local", "share", "jupyter")
    protected = [
        (data, "Jupyter's data folder"),
        (environ.get("JUPYTER_CONFIG_DIR") or os.path.join(home, ".jupyter"), "Jupyter's config folder"),
        (environ.get("JUPYTER_RUNTIME_DIR") or os.path.join(data, "runtime"), "Jupyter's runtime folder"),
        *[(p, "a Jupyter kernelspec folder") for p in environ.get("JUPYTER_PATH", "").split(os.pathsep) if p],
    ]
    from kbundle.cache import cache_root

    protected.append((str(cache_root(environ)), "kbundle's cache"))
    kept = tuple((os.path.realpath(p), what) for p, what in protected if p and os.path.isabs(p))
    return Guard(tuple(sorted(homes)), kept)


def exposure(path: str, guard: Guard) -> str:
    """Why mounting `path` would hand the kernel something of the host's ("" when nothing)."""
    for home in guard.homes:
        if _inside(home, path):
            return "it is a home folder" if home == path else f"it holds the home folder {home}"
        if _inside(path, home):
            below = path[len(home) :].strip("/").split("/")
            if below and below[0].startswith("."):
                return f"it is inside {home}/{below[0]}"
    for folder, what in guard.protected:
        if _inside(path, folder) or _inside(folder, path):
            return (
                f"it is {what}" if path == folder else f"it {'is inside' if _inside(path, folder) else 'holds'} {what}"
            )
    if ".git" in path.split("/"):
        return "it is inside a git repository's .git"
    held = [name for name in DOTFILES if os.path.lexists(os.path.join(path, name))]
    if held:
        return f"it holds {', '.join(held[:3])}, as a home folder does"
    return ""


def notebook_folder(environ: Mapping[str, str], cwd: str) -> str:
    """The notebook's own folder: from JPY_SESSION_NAME when Jupyter gives the notebook's absolute
    path there, else the folder Jupyter starts the kernel in (the notebook's, for Jupyter Server)."""
    session = environ.get("JPY_SESSION_NAME", "")
    if os.path.isabs(session) and os.path.isfile(session):
        return os.path.realpath(os.path.dirname(session))
    return os.path.realpath(cwd)


def plan_mounts(workdir: str, folder: str, guard: Guard) -> Mounts:
    """The kernel's mounts for the kernelspec's `workdir` and the notebook's `folder` (both real paths).

    A workdir that would hide part of the image, or is missing, is an error. A notebook folder
    that would (Jupyter started from `/`) is left out, and the kernel starts in the workdir. A
    folder `exposure` names is left out with a note; with nothing left the kernel starts in the
    image's own copy of the bundle's files (read-only)."""
    base = os.path.realpath(workdir) if workdir else folder
    hidden = hidden_by(base)
    if hidden:
        raise MountError(
            f"refusing to mount {base} into the kernel: it would hide the image's {hidden}; "
            "start the kernel from your notebook's folder"
        )
    if not os.path.isdir(base):
        raise MountError(f"the kernel's working directory {base} does not exist")
    wanted = [base] + ([folder] if folder != base and not hidden_by(folder) else [])
    kept, notes = [], []
    for path in wanted:
        why = exposure(path, guard)
        if why:
            notes.append(f"not mounted: {path} ({why}); {ADVICE}")
        else:
            kept.append(path)
    writable = [p for p in kept if not any(q != p and _inside(p, q) for q in kept)]
    working = folder if any(_inside(folder, m) for m in writable) else (writable[0] if writable else contract.WORK)
    readonly = [os.path.join(m, ".git") for m in writable if os.path.isdir(os.path.join(m, ".git"))]
    said = [f"mounted read-write: {m}" for m in writable]
    said += [f"mounted read-only: {g} (its hooks and config would run on your next git command)" for g in readonly]
    if not writable:
        said.append(
            f"no folder of yours is mounted: the kernel starts in the image's copy of the bundle's files, {working}"
        )
    return Mounts(writable, readonly, working, said + notes)


def notes_text(notes: list[str]) -> str:
    """The notes as the banner's lines (the shim prints them before its own)."""
    return "\n".join(f"kbundle: {note}" for note in notes)
