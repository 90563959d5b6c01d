"""Rootless Podman's user namespace: every container kbundle starts there keeps the user themselves.

A user's own Podman service (rootless) runs containers in a user namespace where the user's uid is
root and every other uid a subordinate one (/etc/subuid). kbundle runs its containers as the
invoking uid:gid (image/policy.py `container_user`), which there is a stranger on the host: a
folder the user owns (the env being installed, the notebook's folder) reads as root's inside and
cannot be written, and what the container writes belongs to a subuid. Podman's `keep-id` maps the
user's own uid:gid to themselves inside; rootful Podman and Docker refuse it, and Docker's
rootless engine has no such mode, so it is asked for only from a rootless *Podman*.

An engine is the invoker's own when its unix socket is theirs (a root engine's belongs to root,
whatever group lets users in), wherever the socket lives: /run/user/UID or a folder of their
choosing. `engine_owner` and `is_rootless` are the pure part; `keep_id` asks the engine once.
"""

from __future__ import annotations

import os
from typing import Any, Optional

KEEP_ID = "keep-id"
_asked: dict[str, bool] = {}  # engine -> whether it is a rootless Podman (one round trip per engine)


def engine_owner(host: str) -> Optional[int]:
    """The uid that owns the engine's unix socket (None: not a local socket, or none there)."""
    host = host or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        return None
    try:
        return os.stat(host.removeprefix("unix://")).st_uid
    except OSError:
        return None


def is_rootless(owner: Optional[int], uid: int) -> bool:
    """Whether an engine whose socket `owner` owns is the non-root invoker `uid`'s own."""
    return uid != 0 and owner == uid


def host_config() -> dict[str, str]:
    """Docker's HostConfig words for keep-id (docker-py's `create_host_config` takes only `host`
    for UsernsMode, so this is merged into its dict)."""
    return {"UsernsMode": KEEP_ID}


def keep_id(api: Any, host: str) -> bool:
    """Whether containers on this engine (docker-py's low-level API, reached at `host`) need keep-id:
    a rootless Podman of the invoking user. The socket is looked at first: a root engine costs
    nothing, a user's own one round trip, once."""
    if not is_rootless(engine_owner(host), os.getuid()):
        return False
    if host not in _asked:
        from kbundle.image.engine import is_podman

        _asked[host] = is_podman(api)
    return _asked[host]
