"""A loopback HTTPS proxy that counts the bytes each host sends, for benches that must show what
was downloaded and how often.

pip, requests (kbundle's downloader) and rattler all honour `https_proxy`, so a run given
`proxy.environ()` sends every HTTPS request through here, pip's resolver included. The proxy
only tunnels (`CONNECT`): it never sees the TLS content, only its size, which is what a
"downloaded once" check needs: the bytes a host sent, against the bytes of the files wanted.
Loopback addresses bypass it (`no_proxy`), so the world's channel and index are not counted.
"""

from __future__ import annotations

import select
import socket
import socketserver
import threading
from collections import defaultdict


class _Tunnel(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            head += chunk
        method, target = (head.split(b"\r\n", 1)[0].split(b" ") + [b"", b""])[:2]
        if method != b"CONNECT":
            self.request.sendall(b"HTTP/1.1 501 Only CONNECT\r\nContent-Length: 0\r\n\r\n")
            return
        host, _, port = target.decode("ascii", "replace").rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=30)
        except OSError:
            self.request.sendall(b"HTTP/1.1 502 Unreachable\r\nContent-Length: 0\r\n\r\n")
            return
        self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.server.tally(host, tunnels=1)
        with upstream:
            self._pump(upstream, host)

    def _pump(self, upstream: socket.socket, host: str) -> None:
        ends = [self.request, upstream]
        while True:
            ready, _, _ = select.select(ends, [], [], 120)
            if not ready:
                return
            for end in ready:
                data = end.recv(1 << 16)
                if not data:
                    return
                other = upstream if end is self.request else self.request
                other.sendall(data)
                self.server.tally(
                    host, down=len(data) if end is upstream else 0, up=len(data) if end is not upstream else 0
                )


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Tunnel)
        self._lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0, "tunnels": 0})

    def tally(self, host: str, down: int = 0, up: int = 0, tunnels: int = 0) -> None:
        with self._lock:
            row = self.counts[host]
            row["down"] += down
            row["up"] += up
            row["tunnels"] += tunnels


class CountingProxy:
    """`with CountingProxy() as proxy: run(env=proxy.environ(env)); proxy.take()` → bytes per host."""

    def __enter__(self) -> CountingProxy:
        self._server = _Server()
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def environ(self, env: dict) -> dict:
        """`env` with every HTTPS request through the proxy, loopback excepted."""
        out = {k: v for k, v in env.items() if k.lower() not in ("https_proxy", "http_proxy", "no_proxy", "all_proxy")}
        out.update(
            https_proxy=self.url,
            HTTPS_PROXY=self.url,
            no_proxy="127.0.0.1,localhost,::1",
            NO_PROXY="127.0.0.1,localhost,::1",
        )
        return out

    def take(self) -> dict[str, dict[str, int]]:
        """The counts since the last take, per host; the counters start again from zero."""
        with self._server._lock:
            counts = {host: dict(row) for host, row in self._server.counts.items()}
            self._server.counts.clear()
        return counts


def downloaded(counts: dict[str, dict[str, int]], host_suffix: str = "") -> int:
    """The bytes the hosts ending in `host_suffix` sent (all hosts when empty)."""
    return sum(row["down"] for host, row in counts.items() if host.endswith(host_suffix))
