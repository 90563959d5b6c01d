"""ROOTLESS Podman: a non-root user's own Podman service, as a laptop or workstation user runs it.

The world makes a plain user, ``kbworld-rootless`` (home ``/home/kbworld-rootless``), with the
subordinate uid/gid ranges a user namespace needs (``/etc/subuid``, ``/etc/subgid``; Debian's
``uidmap`` gives ``newuidmap``), and starts ``podman system service`` AS THAT USER on the socket
logind would give it, ``/run/user/UID/podman/podman.sock`` (made here: this machine has no
logind). Everything the service stores is the user's: ``~/.local/share/containers``.

Its ``~/.config/containers/containers.conf`` says what this machine needs and a desktop would
not: no default ulimits (Podman's exceed a container host's hard limits), ``cgroupfs`` (no systemd
user session to delegate cgroups), ``runc`` and ``catatonit`` (Debian's), events to a file (no
journald). ``storage.conf`` asks for native overlay (an unprivileged mount since Linux 5.13;
without it Podman falls back to vfs, which copies every layer). The containers' bridge is
slirp4netns, which opens ``/dev/net/tun`` as the user: stock Debian leaves that node 0666, and
where it is 0600 (some container hosts) ``up`` opens it as stock Debian has it.

The world's base image is copied into the user's storage (``docker save`` from the main engine,
loaded through the user's socket), as the env image is by ``copy_image`` for the tests. The
stand-in CDI spec is rootful Podman's (``podman_box.py``, /var/run/cdi: rootless Podman reads it
too). ``up`` reports ``podman_rootless_host`` (and the user, uid and home), or
``podman_rootless_error`` with the reason, which makes the rootless tests skip saying so.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

from .base_image import BASE_IMAGE
from .common import log
from .daemons import locked, terminate
from .podman_box import _ensure_image, ensure_service

USER = "kbworld-rootless"
STATE_FILE = "podman-rootless.json"
START_TIMEOUT_S = 60
SUBIDS = (300000, 65536)  # a range no other user of this machine is likely to have
TUN = Path("/dev/net/tun")
CONTAINERS_CONF = """\
# kbundle's test world (tests/world/podman_rootless.py): what this container host needs.
[containers]
default_ulimits = []
init_path = "/usr/bin/catatonit"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
"""
STORAGE_CONF = '[storage]\ndriver = "overlay"\n'


def folder_of(root: Path) -> Path:
    return root / "podman-rootless"


def ensure_podman_rootless(root: Path) -> dict:
    """``{"podman_rootless_host": "unix://…", "podman_rootless_user": …, …}``, or
    ``{"podman_rootless_error": why}`` where this machine cannot run one (its tests skip)."""
    missing = [tool for tool in ("podman", "newuidmap", "slirp4netns", "runuser") if not shutil.which(tool)]
    if missing:
        return {
            "podman_rootless_error": f"{', '.join(missing)} missing (Debian: apt-get install podman uidmap slirp4netns)"
        }
    if os.getuid() != 0:
        return {"podman_rootless_error": "the world makes the rootless user as root; run `up` as root"}
    folder = folder_of(root)
    try:
        with locked(folder / "lock"):
            user = _ensure_user()
            _ensure_tun()
            host = _ensure_service(folder, user)
            _ensure_image(host, BASE_IMAGE)
    except (SystemExit, Exception) as exc:  # optional: the rootless tests skip with this reason
        log(f"no rootless Podman in this world: {exc}")
        return {"podman_rootless_error": str(exc)}
    return {
        "podman_rootless_host": host,
        "podman_rootless_user": USER,
        "podman_rootless_uid": user.pw_uid,
        "podman_rootless_home": user.pw_dir,
    }


def runtime_dir(user: pwd.struct_passwd) -> Path:
    return Path(f"/run/user/{user.pw_uid}")


def user_environment(user: pwd.struct_passwd) -> dict[str, str]:
    """What a login of the user would set, for processes run as them (``runuser -u``)."""
    return {
        "HOME": user.pw_dir,
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "XDG_RUNTIME_DIR": str(runtime_dir(user)),
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    }


def as_user(user: pwd.struct_passwd, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """``argv`` run as the user, with only their login's environment plus ``env``."""
    pairs = [f"{k}={v}" for k, v in {**user_environment(user), **(env or {})}.items()]
    return ["runuser", "-u", user.pw_name, "--", "env", "-i", *pairs, *argv]


def _ensure_user() -> pwd.struct_passwd:
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        log(f"making the rootless Podman user {USER}")
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True, capture_output=True)
        user = pwd.getpwnam(USER)
    for table, flag in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        lines = Path(table).read_text().splitlines() if Path(table).exists() else []
        if not any(line.split(":")[0] in (USER, str(user.pw_uid)) for line in lines):
            first, count = SUBIDS
            subprocess.run(["usermod", flag, f"{first}-{first + count - 1}", USER], check=True, capture_output=True)
    conf = Path(user.pw_dir) / ".config" / "containers"
    conf.mkdir(parents=True, exist_ok=True)
    for name, text in (("containers.conf", CONTAINERS_CONF), ("storage.conf", STORAGE_CONF)):
        path = conf / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    _chown_tree(Path(user.pw_dir) / ".config", user)
    run = runtime_dir(user)
    (run / "podman").mkdir(parents=True, exist_ok=True)
    for path in (run, run / "podman"):
        os.chown(path, user.pw_uid, user.pw_gid)
    run.chmod(0o700)
    return user


def _chown_tree(top: Path, user: pwd.struct_passwd) -> None:
    for folder, dirs, files in os.walk(top):
        for name in [".", *dirs, *files]:
            os.chown(os.path.join(folder, name), user.pw_uid, user.pw_gid)


def _ensure_tun() -> None:
    """slirp4netns opens /dev/net/tun as the user: stock Debian's 0666, which some container hosts narrow."""
    mode = TUN.stat().st_mode
    if mode & 0o006 != 0o006:
        log(f"{TUN} is {stat.filemode(mode)}: opening it to users as stock Debian has it (0666), for slirp4netns")
        TUN.chmod(0o666)


def _ensure_service(folder: Path, user: pwd.struct_passwd) -> str:
    sock = runtime_dir(user) / "podman" / "podman.sock"
    command = as_user(user, ["podman", "system", "service", "--time=0", f"unix://{sock}"])
    return ensure_service(folder / STATE_FILE, sock, command, f"{USER}'s rootless Podman service")


def copy_image_rootless(tag: str) -> None:
    """An image of the main engine (the world's env image, say) into the user's own storage."""
    _ensure_image(f"unix://{runtime_dir(pwd.getpwnam(USER)) / 'podman' / 'podman.sock'}", tag)


def stop_podman_rootless(root: Path) -> None:
    """Stop the user's service and remove what it stored, the user and their home."""
    folder = folder_of(root)
    state_file = folder / STATE_FILE
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        shutil.rmtree(folder, ignore_errors=True)
        return
    sock = runtime_dir(user) / "podman" / "podman.sock"
    if state_file.exists():
        try:
            terminate(json.loads(state_file.read_text())["pid"], str(sock))
        except (KeyError, ValueError):
            pass
    subprocess.run(as_user(user, ["podman", "system", "reset", "--force"]), capture_output=True, timeout=120)
    # Rootless Podman keeps a pause process holding the user's namespaces; userdel refuses while it lives.
    try:
        terminate(int((runtime_dir(user) / "libpod" / "tmp" / "pause.pid").read_text()), "catatonit")
    except (OSError, ValueError):
        pass
    subprocess.run(["userdel", "--remove", USER], capture_output=True, timeout=60)
    shutil.rmtree(runtime_dir(user), ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
