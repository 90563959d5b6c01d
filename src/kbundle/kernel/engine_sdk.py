"""The kernel launcher's calls through docker-py, for the engines kernel/engine_http.py leaves to it:
one reached over TCP or SSH (TLS and all), a GPU kernel (Podman creates those through its own API,
kernel/podman.py), a rootless engine (Podman's `keep-id`, image/userns.py).

Same methods and errors as engine_http.UnixEngine, so the launcher drives either one alike.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, TypeVar

import docker
from requests.exceptions import ConnectionError as RequestsConnectionError

from kbundle.image import engine
from kbundle.kernel.engine_http import EngineError, Unreachable
from kbundle.kernel.launch_plan import device_requests

T = TypeVar("T")


def _raw(sock: Any) -> socket.socket:
    """The socket under docker-py's SocketIO wrapper (it is what `sendall` and timeouts need)."""
    return getattr(sock, "_sock", sock)


def translated(call: Callable[[], T]) -> T:
    """docker-py's errors as the launcher's: EngineError for a refusal, Unreachable for no engine."""
    try:
        return call()
    except RequestsConnectionError as exc:
        raise Unreachable(exc) from None
    except docker.errors.APIError as exc:
        image_missing = isinstance(exc, docker.errors.ImageNotFound)
        raise EngineError(exc.status_code, str(exc.explanation or exc), image_missing) from None
    except docker.errors.DockerException as exc:
        raise EngineError(None, str(exc)) from None


class SdkEngine:
    """docker-py's low-level client (image/engine.py `low_level`) behind the launcher's methods."""

    def __init__(self) -> None:
        self.api = translated(engine.low_level)

    def create(self, plan: Any, binds: dict[str, dict[str, str]]) -> str:
        return translated(lambda: self._create(plan, binds))

    def _create(self, plan: Any, binds: dict[str, dict[str, str]]) -> str:
        api = self.api
        host_config = api.create_host_config(
            init=True,
            auto_remove=True,
            binds=binds,
            port_bindings={p: ("127.0.0.1", p) for p in plan.ports} or None,
            device_requests=device_requests(plan.gpus) or None,
            group_add=plan.group_add or None,
            **plan.lockdown.host_options(),
        )
        # Podman's Docker-compatible API would drop the GPUs: its own API gets them (kernel/podman.py).
        # A rootless Podman keeps the user themselves inside (keep-id). One round trip, those kernels only.
        on_podman = (plan.gpus != "none" or plan.rootless) and engine.is_podman(api)
        if on_podman and plan.rootless:
            from kbundle.image import userns

            host_config.update(userns.host_config())
        if on_podman and plan.gpus != "none":
            from kbundle.kernel import podman

            return podman.create(api, plan, binds, plan.environment)
        return api.create_container(
            image=plan.image,
            command=plan.command,
            name=plan.name,
            user=plan.user,
            stdin_open=True,
            detach=False,
            tty=False,  # detach=False makes StdinOnce: our EOF is the kernel's
            working_dir=plan.working_dir,
            labels=plan.labels,
            **plan.lockdown.create_options(plan.environment),
            host_config=host_config,
            ports=plan.ports or None,
        )["Id"]

    def attach(self, cid: str) -> tuple[socket.socket, bytes]:
        params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        sock = _raw(translated(lambda: self.api.attach_socket(cid, params=params)))
        sock.settimeout(None)
        return sock, b""

    def start(self, cid: str) -> None:
        translated(lambda: self.api.start(cid))

    def wait(self, cid: str, condition: str = "not-running") -> Any:
        """`wait?condition=not-running`, returned once the engine registered it (response headers sent)."""

        def register() -> Any:
            url = self.api._url("/containers/{0}/wait", cid)
            response = self.api.post(url, params={"condition": condition}, stream=True, timeout=None)
            self.api._raise_for_status(response)
            return response

        return translated(register)

    def address(self, cid: str) -> str:
        info = translated(lambda: self.api.inspect_container(cid))
        return (info.get("NetworkSettings") or {}).get("IPAddress") or ""

    def kill(self, cid: str, signal: str) -> None:
        translated(lambda: self.api.kill(cid, signal=signal))

    def stop(self, cid: str, timeout: int) -> None:
        translated(lambda: self.api.stop(cid, timeout=timeout))

    def remove(self, cid: str, force: bool = False) -> None:
        translated(lambda: self.api.remove_container(cid, force=force))
