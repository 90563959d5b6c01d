"""The launcher's own unix-socket engine client (kernel/engine_http.py), table-driven: no engine.

The create body is checked against docker-py's own rendering, so that the raw client asks the
engine for exactly the container the SDK path asks for. The HTTP side is checked on a socketpair
fed with engine-shaped answers (bodies by length, chunked, none; a hijacked attach stream).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

import docker
import pytest
from test_launcher_plan import INFO, _plan

from kbundle.kernel import engine_http as H
from kbundle.kernel import launcher as L
from kbundle.kernel import node_agent
from kbundle.kernel.launch_plan import PORT_KEYS, _binds


@pytest.mark.parametrize(
    "docker_host, expected",
    [
        ("", "/var/run/docker.sock"),
        ("unix:///var/run/docker.sock", "/var/run/docker.sock"),
        ("unix:///run/podman/podman.sock", "/run/podman/podman.sock"),
        ("unix://", None),
        ("tcp://10.0.0.2:2376", None),
        ("ssh://me@box", None),
        ("npipe:////./pipe/docker_engine", None),
    ],
)
def test_socket_path(docker_host, expected):
    assert H.socket_path(docker_host) == expected


def test_port_keys_are_the_node_agents():
    assert PORT_KEYS == node_agent.PORT_KEYS


def _sdk_body(plan) -> dict:
    api = docker.APIClient(version="1.40")
    host_config = api.create_host_config(
        init=True,
        auto_remove=True,
        binds=_binds(plan),
        port_bindings={p: ("127.0.0.1", p) for p in plan.ports} or None,
        group_add=plan.group_add or None,
        **plan.lockdown.host_options(),
    )
    config = api.create_container_config(
        plan.image,
        plan.command,
        user=plan.user,
        stdin_open=True,
        detach=False,
        tty=False,
        working_dir=plan.working_dir,
        labels=plan.labels,
        **plan.lockdown.create_options(plan.environment),
        host_config=host_config,
        ports=plan.ports or None,
    )
    return _without_nulls(config)


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


@pytest.mark.parametrize(
    "environ, platform, kw",
    [
        ({}, "linux", {}),  # a local engine: the launcher forwards, nothing published
        ({"DOCKER_HOST": "unix:///home/me/.docker/desktop/docker.sock"}, "linux", {}),  # published ports
        ({"KBUNDLE_KERNEL_NETWORK": "host"}, "linux", {}),
        ({"KBUNDLE_KERNEL_PYCACHE": "0"}, "linux", {"network": "bridge"}),
    ],
)
def test_create_body_is_docker_pys(tmp_path, environ, platform, kw):
    plan = _plan(tmp_path, environ=environ, platform=platform, **kw)
    ours = H.create_body(plan, _binds(plan))
    assert _without_nulls(ours) == _sdk_body(plan)
    assert INFO["key"] not in json.dumps(ours)  # the key travels on stdin only


@pytest.mark.parametrize(
    "gpus, environ, expected",
    [
        ("none", {}, "UnixEngine"),
        ("none", {"DOCKER_HOST": "unix:///run/podman/podman.sock"}, "UnixEngine"),
        ("all", {}, "SdkEngine"),  # Podman would need libpod for GPUs: docker-py's path decides
        ("none", {"DOCKER_HOST": "tcp://10.0.0.2:2375"}, "SdkEngine"),
    ],
)
def test_engine_for(tmp_path, monkeypatch, gpus, environ, expected):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    plan = _plan(tmp_path, environ=environ, gpus=gpus)
    assert type(L.engine_for(plan, environ.get("DOCKER_HOST", ""))).__name__ == expected


@pytest.mark.parametrize(
    "head, status, headers",
    [
        (b"HTTP/1.1 204 No Content\r\nApi-Version: 1.45", 204, {"api-version": "1.45"}),
        (
            b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp",
            101,
            {"connection": "Upgrade", "upgrade": "tcp"},
        ),
        (b"HTTP/1.0 404 Not Found\r\nContent-Length: 29", 404, {"content-length": "29"}),
    ],
)
def test_parse_head(head, status, headers):
    assert H.parse_head(head) == (status, headers)


@pytest.mark.parametrize("head", [b"SSH-2.0-OpenSSH", b"HTTP/1.1 abc", b""])
def test_parse_head_refuses_what_is_no_http(head):
    with pytest.raises(H.EngineError):
        H.parse_head(head)


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"5\r\nhello\r\n0\r\n\r\n", (b"hello", True)),
        (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", (b"hello world", True)),
        (b"5\r\nhel", (b"", False)),
        (b"5\r\nhello\r\n", (b"hello", False)),
        (b"a;ext=1\r\n0123456789\r\n0\r\n\r\n", (b"0123456789", True)),
    ],
)
def test_dechunk(data, expected):
    assert H.dechunk(data) == expected


def _frame(stream: int, data: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data


OUT, ERR = _frame(1, b"out"), _frame(2, b"err")


@pytest.mark.parametrize(
    "pending, pieces, expected",
    [
        (b"", [OUT + ERR], [(1, b"out"), (2, b"err")]),
        (OUT[:5], [OUT[5:], ERR], [(1, b"out"), (2, b"err")]),  # a header split across reads
        (OUT + ERR[:9], [ERR[9:]], [(1, b"out"), (2, b"err")]),  # bytes read past the head, a frame split
        (_frame(1, b""), [], [(1, b"")]),
        (OUT[:3], [], []),  # the stream ended mid-header: nothing made up
    ],
)
def test_frames(pending, pieces, expected):
    chunks = iter(pieces)
    assert list(H.frames(pending, lambda: next(chunks, b""))) == expected


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (404, b'{"message":"No such image: img:1"}', "No such image: img:1"),
        (500, b"plain words\n", "plain words"),
        (409, b"", "HTTP 409"),
    ],
)
def test_error_text(status, body, expected):
    assert H.error_text(status, body) == expected


class Engine:
    """An engine-shaped HTTP peer on a unix socket: answers each connection with the next canned reply."""

    def __init__(self, path: str, replies: list[bytes]):
        self.requests: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        threading.Thread(target=self._serve, args=(list(replies),), daemon=True).start()

    def _serve(self, replies: list[bytes]) -> None:
        for reply in replies:
            conn, _ = self.server.accept()
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(dict(_header(line) for line in head.split(b"\r\n")[1:]).get(b"content-length", b"0"))
            while len(body) < length:
                body += conn.recv(4096)
            self.requests.append(head + b"\r\n\r\n" + body)
            conn.sendall(reply)
            conn.close()


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name.strip().lower(), value.strip()


@pytest.fixture
def sock_path(tmp_path):
    path = os.path.join(f"/tmp/kb-http-{os.getpid()}-{id(tmp_path)}.sock")
    yield path
    if os.path.exists(path):
        os.unlink(path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="unix sockets of Linux")
def test_calls_and_answers(sock_path):
    created = b'{"Id":"abc123","Warnings":[]}'
    engine = Engine(
        sock_path,
        [
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(created), created),
            b"HTTP/1.1 204 No Content\r\n\r\n",  # start: no body, and the connection may stay open
            b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1d\r\n{"StatusCode":3,"Error":null}\r\n0\r\n\r\n',
            b'HTTP/1.1 404 Not Found\r\nContent-Length: 33\r\n\r\n{"message":"No such image: img"}\n',
            b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n" + _frame(1, b"hi"),
        ],
    )
    client = H.UnixEngine(sock_path, timeout=5)

    class Plan:
        name, image, command, user, working_dir = "kbundle-kernel-x", "img", ["python"], "1:1", "/w"
        labels, ports, group_add, environment = {"a": "b"}, [], [], {}
        lockdown = _plan_lockdown()

    assert client.create(Plan(), {}) == "abc123"
    client.start("abc123")
    assert client.wait("abc123").json() == {"StatusCode": 3, "Error": None}
    with pytest.raises(H.EngineError) as refused:
        client.start("abc123")
    assert refused.value.status == 404 and refused.value.image_missing
    sock, pending = client.attach("abc123")
    assert list(H.frames(pending, lambda: sock.recv(4096))) == [(1, b"hi")]
    first = engine.requests[0].decode()
    assert first.startswith("POST /v1.40/containers/create?name=kbundle-kernel-x HTTP/1.1\r\n")
    assert json.loads(first.partition("\r\n\r\n")[2])["HostConfig"]["AutoRemove"] is True
    assert b"condition=not-running" in engine.requests[2]
    assert b"Upgrade: tcp" in engine.requests[4]


def _plan_lockdown():
    from kbundle.image import policy

    return policy.kernel("bridge")


def test_no_engine_is_unreachable(sock_path):
    with pytest.raises(H.Unreachable) as missing:
        H.UnixEngine(sock_path, timeout=1).start("abc")
    assert isinstance(missing.value.cause, FileNotFoundError)


@pytest.mark.parametrize(
    "error, expected",
    [
        (H.EngineError(404, "No such image: img:1", image_missing=True), "the kernel's image img is missing"),
        (H.EngineError(500, 'could not select device driver "" with capabilities: [[gpu]]'), "no NVIDIA runtime"),
        (H.EngineError(500, "unresolvable CDI devices nvidia.com/gpu=0"), "no CDI spec"),
        (H.EngineError(409, "Conflict. The container name is in use"), "Docker refused to run the kernel: Conflict"),
    ],
)
def test_docker_message_from_the_raw_client(tmp_path, error, expected):
    assert expected in L._docker_message(error, _plan(tmp_path))


@pytest.mark.parametrize(
    "cause, expected",
    [
        (FileNotFoundError(2, "No such file"), "cannot reach the Docker engine at unix:///x.sock (FileNotFoundError)"),
        (ConnectionRefusedError(111, "refused"), "cannot reach the Docker engine at unix:///x.sock"),
        (PermissionError(13, "denied"), "permission denied on the Docker socket unix:///x.sock"),
    ],
)
def test_unreachable_message(cause, expected):
    assert L._unreachable_message(H.Unreachable(cause), "unix:///x.sock").startswith(expected)


def test_a_local_kernel_start_does_not_import_docker_py(tmp_path):
    """docker-py and requests cost a local kernel's start about 70 ms: the common path goes without."""
    import subprocess

    conn = tmp_path / "kernel.json"
    conn.write_text(json.dumps(INFO))
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('loaded: %s\\n' % sorted({'docker', 'requests'} & set(sys.modules))))\n"
        "from kbundle.kernel.launcher import main\n"
        f"main(['--image', 'img:1', '-f', {str(conn)!r}])\n"
    )
    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: cannot reach the Docker engine at unix://{tmp_path}/no-engine.sock")
    assert "loaded: []" in proc.stderr
