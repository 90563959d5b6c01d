"""Forward the kernel's five ports from 127.0.0.1 on the host to the kernel container's address.

Why not the engine's published ports: Docker's proxy accepts a client's connection at once,
before the kernel inside listens, then drops it when the kernel is not there yet. A ZeroMQ
message already written into that connection is lost, and jupyter_client waits a full
second before asking again: a bridge kernel started about twice as slowly as a host one.
Here a connection that arrives early is held open and joined to the kernel as soon as the
kernel accepts, so nothing written early is lost and nothing waits on a timeout. The local
launcher holds the ports before its first engine call (`target=None`, then `route` once the
container has its bridge address): Jupyter's first connections land at once instead of being
refused and retried on ZeroMQ's 100 ms reconnect interval.

Used where the host can reach the container's bridge address (a local engine on Linux);
elsewhere (Docker Desktop, remote engines) the launcher publishes the ports instead. A
Slurm kernel (kernel/slurm.py) uses it too: the ports are held before the job starts, and
routed to the compute node's address and ports once the node says where the kernel listens.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

CONNECT_RETRY_S = 0.005  # how often an early connection retries the kernel while it starts
CONNECT_DEADLINE_S = 120.0  # a kernel that has not listened by then is not coming
BIND_DEADLINE_S = 5.0  # a restart's previous launcher may still hold the ports for a moment
CHUNK = 1 << 16


class ForwardError(OSError):
    """A port on 127.0.0.1 could not be held for the kernel."""


class Forwarder:
    """Listens on `127.0.0.1:port` for each port and joins every connection to `target:port`
    (or, once `route` is called, to the target's port that `route` maps it to)."""

    def __init__(self, ports: list[int], target: str | None, alive: Callable[[], bool]):
        self.ports = list(ports)
        self.alive = alive
        self.listeners: list[socket.socket] = []
        self.routes: dict[int, tuple[str, int]] = {}
        self.routed = threading.Event()
        if target is not None:
            self.route(target, {p: p for p in self.ports})

    def route(self, target: str, mapping: dict[int, int]) -> None:
        """Where connections go: `mapping` takes each held port to the target's port."""
        self.routes = {port: (target, mapping[port]) for port in self.ports}
        self.routed.set()

    def start(self) -> None:
        for port in self.ports:
            self.listeners.append(_listen(port))
        for listener, port in zip(self.listeners, self.ports, strict=True):
            threading.Thread(target=self._accept, args=(listener, port), daemon=True).start()

    def close(self) -> None:
        for listener in self.listeners:
            try:
                listener.close()
            except OSError:
                pass

    def _accept(self, listener: socket.socket, port: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: the kernel is gone
            threading.Thread(target=self._join, args=(client, port), daemon=True).start()

    def _join(self, client: socket.socket, port: int) -> None:
        backend = self._connect(port)
        if backend is None:
            client.close()
            return
        for sock in (client, backend):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_pump, args=(backend, client), daemon=True).start()
        _pump(client, backend)

    def _connect(self, port: int) -> socket.socket | None:
        """The kernel's side, retried while the kernel starts; None once it has died."""
        deadline = time.monotonic() + CONNECT_DEADLINE_S
        while not self.routed.wait(0.1):  # a connection that came before the kernel's address waits for it
            if time.monotonic() > deadline or not self.alive():
                return None
        while time.monotonic() < deadline and self.alive():
            try:
                sock = socket.create_connection(self.routes[port], timeout=1.0)
                sock.settimeout(None)  # the connect's timeout must not end a connection that is quiet a while
                return sock
            except OSError:
                time.sleep(CONNECT_RETRY_S)
        return None


def _listen(port: int) -> socket.socket:
    deadline = time.monotonic() + BIND_DEADLINE_S
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(16)
            return sock
        except OSError as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise ForwardError(f"cannot hold the kernel's port 127.0.0.1:{port}: {exc.strerror}") from None
            time.sleep(0.05)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy one direction until it ends, then pass the end on (half-close), then let go."""
    try:
        while True:
            data = source.recv(CHUNK)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for action in (lambda: sink.shutdown(socket.SHUT_WR), source.close):
            try:
                action()
            except OSError:
                pass
