"""A file server on 127.0.0.1 that stalls on purpose: the fault a slow or broken mirror shows.

It serves files from a folder (a conda channel, a pip index's pages and wheels), with HTTP
Range. A request for a file whose name matches `stall` gets its headers (the whole length) and
the first `stall_after` bytes, then nothing more: the connection stays open and silent until
`resume()` is called or the server is closed. After `resume()` (or, with `times`, after a
path's first `times` requests), each request is served whole, so a client that retries with
`Range` heals. A `stall` pattern that matches `index.html` stalls pip's PEP 503 pages instead.
"""

from __future__ import annotations

import http.server
import re
import threading
from pathlib import Path


class StallingServer:
    def __init__(
        self, root: Path, stall: str = r"\.(whl|conda|tar\.bz2)$", stall_after: int = 1024, times: int | None = None
    ):
        self.root = Path(root)
        self.stall = re.compile(stall)
        self.stall_after = stall_after
        self.times = times  # stall only the first `times` requests of each path (None: every one)
        self.healed = threading.Event()
        self.closing = threading.Event()
        self.stalled: list[str] = []  # paths that stalled, in order
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _serve(self, head: bool):
                path = self.path.split("?", 1)[0]
                server.requests.append((self.command, path, self.headers.get("Range")))
                target = server.root / path.lstrip("/")
                if target.is_dir():
                    target = target / "index.html"
                if not target.is_file() or ".." in path:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = target.read_bytes()
                start = _range_start(self.headers.get("Range"))
                if start is not None and start < len(data):
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    data = data[start:]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header(
                    "Content-Type", "text/html" if target.name.endswith(".html") else "application/octet-stream"
                )
                self.end_headers()
                if head:
                    return
                once = server.times is not None and server.stalled.count(path) >= server.times
                if server.stall.search(path) and not server.healed.is_set() and not once:
                    server.stalled.append(path)
                    self.wfile.write(data[: server.stall_after])
                    self.wfile.flush()
                    while not server.healed.is_set() and not server.closing.is_set():
                        server.healed.wait(0.2)  # silent: headers and a few bytes, then nothing
                    self.close_connection = True
                    return
                self.wfile.write(data)

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.port = self.http.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def resume(self) -> None:
        """From now on, every request is served whole (a stalled connection is closed)."""
        self.healed.set()

    def close(self) -> None:
        self.closing.set()
        self.http.shutdown()
        self.http.server_close()


def _range_start(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes=(\d+)-", value or "")
    return int(match.group(1)) if match else None


def simple_index(root: Path, wheels: dict[str, list[tuple[str, bytes]]]) -> Path:
    """`root/simple/<project>/index.html` (PEP 503 with sha256 fragments, no PEP 658 metadata)
    over `root/files/`; returns `root`."""
    import hashlib

    (root / "files").mkdir(parents=True, exist_ok=True)
    for project, files in wheels.items():
        page = root / "simple" / project
        page.mkdir(parents=True, exist_ok=True)
        links = []
        for filename, data in files:
            (root / "files" / filename).write_bytes(data)
            sha = hashlib.sha256(data).hexdigest()
            links.append(f'<a href="../../files/{filename}#sha256={sha}">{filename}</a>')
        (page / "index.html").write_text("<!DOCTYPE html>\n<html><body>\n" + "\n".join(links) + "\n</body></html>\n")
    return root
