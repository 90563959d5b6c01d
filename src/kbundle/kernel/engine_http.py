"""The kernel launcher's own client for a local engine's unix socket: the handful of calls a kernel needs.

Why not docker-py here: importing it (with requests and urllib3) and making its client took
about 70 ms of a kernel's start, longer than the engine takes to create the container. A
kernel needs eight calls (create, attach, start, wait, inspect, kill, stop, remove), each a
small HTTP/1.1 exchange on the engine's unix socket: this module makes them with the standard
library's socket and json alone. Engines reached over TCP or SSH, GPU kernels (Podman needs
its own API for them, kernel/podman.py) and rootless engines keep docker-py
(kernel/engine_sdk.py); both answer to the launcher through the same methods and errors.

The request bodies are docker-py's own (`create_body` is table-tested against docker-py's
rendering), so the engine sees the same container either way.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any, Optional
from urllib.parse import quote, urlencode

from kbundle.image.engine import API_VERSION

TIMEOUT_S = 60.0  # any single call; a stop gets its grace on top
HEAD_LIMIT = 64 * 1024  # an engine's response head is a few hundred bytes


class EngineError(Exception):
    """The engine refused a call: its HTTP status and its message (docker-py's `explanation`)."""

    def __init__(self, status: Optional[int], explanation: str, image_missing: bool = False):
        super().__init__(explanation)
        self.status = status
        self.explanation = explanation
        self.image_missing = image_missing


class Unreachable(Exception):
    """No engine answered on the socket (none running, a wrong DOCKER_HOST, no permission)."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def socket_path(docker_host: str) -> Optional[str]:
    """The unix socket a DOCKER_HOST names, None for any other transport (tcp, ssh, npipe)."""
    if not docker_host:
        return "/var/run/docker.sock"
    if docker_host.startswith("unix://"):
        return docker_host[len("unix://") :] or None
    return None


def create_body(plan: Any, binds: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The engine's create request for a plan, as docker-py's create_container_config renders it."""
    host_config: dict[str, Any] = {
        **plan.lockdown.engine_api_options(),  # the lockdown, as image/policy.py renders it
        "Binds": [f"{src}:{b['bind']}:{b['mode']}" for src, b in binds.items()],
        "AutoRemove": True,
        "Init": True,
    }
    if plan.group_add:
        host_config["GroupAdd"] = list(plan.group_add)
    if plan.ports:
        host_config["PortBindings"] = {f"{p}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(p)}] for p in plan.ports}
    options = plan.lockdown.create_options(plan.environment)
    body: dict[str, Any] = {
        "Image": plan.image,
        "Cmd": list(plan.command),
        "User": plan.user,
        "Tty": False,
        # Attached stdin that closes when our connection does: the launcher's end is the kernel's.
        "OpenStdin": True,
        "StdinOnce": True,
        "AttachStdin": True,
        "AttachStdout": True,
        "AttachStderr": True,
        "Env": [f"{k}={v}" for k, v in options["environment"].items()],
        "NetworkDisabled": bool(options.get("network_disabled", False)),
        "WorkingDir": plan.working_dir,
        "Labels": dict(plan.labels),
        "HostConfig": host_config,
    }
    if plan.ports:
        body["ExposedPorts"] = {f"{p}/tcp": {} for p in plan.ports}
    return body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """An HTTP/1.x response head (without the blank line): its status and lower-cased headers."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise EngineError(None, f"the engine answered in an unknown way: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body decoded as far as it is complete: (body, whether the last chunk was seen)."""
    out, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return bytes(out), False
        size = int(data[pos:end].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out), True
        start = end + 2
        if len(data) < start + size + 2:
            return bytes(out), False
        out += data[start : start + size]
        pos = start + size + 2


def frames(pending: bytes, recv: Any) -> Iterator[tuple[int, bytes]]:
    """The attach stream's frames, (stream, data): an 8-byte header (stream, 0, 0, 0, size big-endian)
    then the data. `pending`: bytes already read past the response head; `recv()`: more, b"" at the end."""
    buf = bytearray(pending)
    while True:
        while len(buf) >= 8 and len(buf) >= 8 + int.from_bytes(buf[4:8], "big"):
            size = int.from_bytes(buf[4:8], "big")
            yield buf[0], bytes(buf[8 : 8 + size])
            del buf[: 8 + size]
        data = recv()
        if not data:
            return
        buf += data


def error_text(status: int, body: bytes) -> str:
    """The engine's message for a refused call: its JSON `message`, else the body itself."""
    try:
        message = json.loads(body or b"{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or body.decode("utf-8", "replace").strip() or f"HTTP {status}")


def refusal(status: int, body: bytes) -> EngineError:
    text = error_text(status, body)
    return EngineError(status, text, image_missing=status == 404 and "No such image" in text)


class Response:
    """One exchange's answer: the status and headers at once, the body when asked for."""

    def __init__(self, sock: socket.socket, status: int, headers: dict[str, str], rest: bytes):
        self.sock, self.status, self.headers, self.rest = sock, status, headers, rest

    def body(self) -> bytes:
        """The whole body, by its length, its chunks or the connection's end; the connection then closes."""
        data = bytearray(self.rest)
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = "0" if self.status in (204, 304) or self.status < 200 else self.headers.get("content-length")
        try:
            while True:
                if chunked:
                    decoded, complete = dechunk(bytes(data))
                    if complete:
                        return decoded
                elif length is not None and len(data) >= int(length):
                    return bytes(data[: int(length)])
                more = self.sock.recv(65536)
                if not more:
                    return dechunk(bytes(data))[0] if chunked else bytes(data)
                data += more
        except OSError as exc:
            raise Unreachable(exc) from None
        finally:
            self.sock.close()

    def json(self) -> Any:
        return json.loads(self.body() or b"null")


class UnixEngine:
    """A local engine on its unix socket, one connection per call (a connect costs microseconds)."""

    def __init__(self, path: str, version: str = API_VERSION, timeout: float = TIMEOUT_S):
        self.path, self.version, self.timeout = path, version, timeout

    # -- the launcher's calls

    def create(self, plan: Any, binds: dict[str, dict[str, str]]) -> str:
        body = create_body(plan, binds)
        return self._json("POST", "/containers/create", {"name": plan.name}, body)["Id"]

    def attach(self, cid: str) -> tuple[socket.socket, bytes]:
        """The container's stdin, stdout and stderr on one hijacked connection: (socket, bytes read past the head)."""
        params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        upgrade = {"Connection": "Upgrade", "Upgrade": "tcp"}
        response = self._send("POST", f"/containers/{_q(cid)}/attach", params, None, upgrade)
        if response.status not in (101, 200):
            raise self._refused(response)
        response.sock.settimeout(None)
        return response.sock, response.rest

    def start(self, cid: str) -> None:
        self._expect("POST", f"/containers/{_q(cid)}/start")

    def wait(self, cid: str, condition: str = "not-running") -> Response:
        """Register a wait; it returns once the engine sent the head (the wait is in place), the
        body (StatusCode, Error) arrives when the container stops."""
        response = self._send("POST", f"/containers/{_q(cid)}/wait", {"condition": condition}, timeout=None)
        if response.status != 200:
            raise self._refused(response)
        return response

    def address(self, cid: str) -> str:
        info = self._json("GET", f"/containers/{_q(cid)}/json")
        return (info.get("NetworkSettings") or {}).get("IPAddress") or ""

    def kill(self, cid: str, signal: str) -> None:
        self._expect("POST", f"/containers/{_q(cid)}/kill", {"signal": signal})

    def stop(self, cid: str, timeout: int) -> None:
        self._expect("POST", f"/containers/{_q(cid)}/stop", {"t": timeout}, timeout=self.timeout + timeout)

    def remove(self, cid: str, force: bool = False) -> None:
        self._expect("DELETE", f"/containers/{_q(cid)}", {"force": int(force)})

    # -- HTTP on the socket

    def _json(self, method: str, path: str, params: Optional[dict] = None, body: Any = None) -> Any:
        response = self._send(method, path, params, body)
        if response.status >= 300:
            raise self._refused(response)
        return response.json()

    def _expect(self, method: str, path: str, params: Optional[dict] = None, timeout: Any = ...) -> None:
        response = self._send(method, path, params, timeout=timeout)
        data = response.body()
        if response.status >= 300 and response.status != 304:  # 304: already started / stopped
            raise refusal(response.status, data)

    def _refused(self, response: Response) -> EngineError:
        return refusal(response.status, response.body())

    def _send(
        self,
        method: str,
        path: str,
        params: Optional[dict] = None,
        body: Any = None,
        extra: Optional[dict[str, str]] = None,
        timeout: Any = ...,
    ) -> Response:
        payload = b"" if body is None else json.dumps(body).encode()
        target = f"/v{self.version}{path}" + (f"?{urlencode(params)}" if params else "")
        headers = {"Host": "docker", "Content-Length": str(len(payload)), "Connection": "close", **(extra or {})}
        if body is not None:
            headers["Content-Type"] = "application/json"
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock = self._connect(self.timeout if timeout is ... else timeout)
        try:
            sock.sendall(head.encode("latin-1") + payload)
            status, headers_in, rest = _read_head(sock)
        except OSError as exc:
            sock.close()
            raise Unreachable(exc) from None
        except BaseException:
            sock.close()
            raise
        return Response(sock, status, headers_in, rest)

    def _connect(self, timeout: Optional[float]) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise Unreachable(exc) from None
        return sock


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(4096)
        if not more:
            raise ConnectionResetError("the engine closed the connection before answering")
        data += more
        if len(data) > HEAD_LIMIT:
            raise EngineError(None, "the engine's answer has no end of its head")
    head, _, rest = data.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    return status, headers, rest


def _q(cid: str) -> str:
    return quote(cid, safe="")
