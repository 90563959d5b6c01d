"""Wheel downloads (image/download.py): resumed with Range, restarted when a server ignores it,
refused on a hash mismatch, several at a time; against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kbundle.errors import KbundleError
from kbundle.image import download, pipreport
from kbundle.progress import Meter
from kbundle.specs import PipIndexes

PAYLOAD = os.urandom(3 * download.CHUNK + 12345)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """Serves PAYLOAD at every path. `ranges`: honour Range; `break_after`: the first GET with no
    Range sends that many bytes, then drops the connection; `auth`: the Authorization it wants."""

    def __init__(self, ranges: bool = True, break_after: int | None = None, auth: str | None = None):
        self.ranges, self.break_after, self.auth = ranges, break_after, auth
        self.seen: list[tuple[str, str | None]] = []  # (method, Range header)
        self.sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _start(self, method: str) -> tuple[int, int] | None:
                wanted = self.headers.get("Range")
                server.seen.append((method, wanted))
                if server.auth and self.headers.get("Authorization") != server.auth:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                start = int(wanted[6:].split("-")[0]) if wanted and server.ranges else 0
                if start >= len(PAYLOAD) and wanted and server.ranges:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                self.send_header("Content-Length", str(len(PAYLOAD) - start))
                self.end_headers()
                return start, len(PAYLOAD)

            def do_HEAD(self):
                self._start("HEAD")

            def do_GET(self):
                span = self._start("GET")
                if span is None:
                    return
                start, end = span
                if server.break_after is not None and start == 0:
                    end, server.break_after = server.break_after, None
                    self.close_connection = True
                body = PAYLOAD[start:end]
                server.sent += len(body)  # counted first: the client may check as soon as the bytes arrive
                self.wfile.write(body)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/x-1.0-py3-none-any.whl"

    def gets(self) -> list[str | None]:
        return [r for m, r in self.seen if m == "GET"]

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def serve():
    servers = []

    def make(**kwargs) -> Server:
        servers.append(Server(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _wanted(server: Server, tmp_path, sha: str = SHA, auth=None) -> download.Wanted:
    return download.Wanted(server.url, tmp_path / "x-1.0-py3-none-any.whl", sha, auth)


def _fetch(item, meter=None):
    return download.fetch(download.session(), item, meter)


@pytest.mark.parametrize(
    "status, content_range, have, action",
    [
        (206, "bytes 100-999/1000", 100, "append"),
        (206, "bytes 0-999/1000", 100, "fail"),  # not where the .part stops
        (206, None, 100, "fail"),
        (200, None, 100, "restart"),  # the server ignores Range: the whole file follows
        (416, "bytes */1000", 1000, "complete"),  # the .part holds it all already
        (416, None, 0, "fail"),
        (404, None, 100, "fail"),
        (500, None, 100, "fail"),
    ],
)
def test_resume_action(status, content_range, have, action):
    assert download.resume_action(status, content_range, have) == action


@pytest.mark.parametrize(
    "url, indexes, expected",
    [
        ("https://pkgs.corp/files/x.whl", ["https://u:t%40k@pkgs.corp/simple"], ("u", "t@k")),
        ("https://pkgs.corp:443/files/x.whl", ["https://u:t@pkgs.corp/simple"], ("u", "t")),  # default port
        ("https://files.pythonhosted.org/x.whl", ["https://u:t@pkgs.corp/simple"], None),  # another host
        ("https://pkgs.corp:8443/x.whl", ["https://u:t@pkgs.corp/simple"], None),  # another port
        ("http://pkgs.corp/x.whl", ["https://u:t@pkgs.corp/simple"], None),  # another scheme's port
        ("https://pkgs.corp/x.whl", ["https://pkgs.corp/simple"], None),  # no credentials to give
    ],
)
def test_credentials_go_only_to_their_indexs_host(url, indexes, expected):
    assert download.credentials_for(url, indexes) == expected


def test_a_part_file_is_continued_with_range(serve, tmp_path):
    server = serve()
    item = _wanted(server, tmp_path)
    have = 2 * download.CHUNK + 7
    (tmp_path / "x-1.0-py3-none-any.whl.part").write_bytes(PAYLOAD[:have])
    meter = Meter("downloading wheels")
    assert _fetch(item, meter) == item.dest
    assert item.dest.read_bytes() == PAYLOAD
    assert server.gets() == [f"bytes={have}-"]
    assert server.sent == len(PAYLOAD) - have == meter.bytes  # only the rest came over the network
    assert not (tmp_path / "x-1.0-py3-none-any.whl.part").exists()


def test_a_server_that_ignores_range_starts_the_part_over(serve, tmp_path):
    server = serve(ranges=False)
    item = _wanted(server, tmp_path)
    (tmp_path / "x-1.0-py3-none-any.whl.part").write_bytes(b"stale bytes that are not the file")
    assert _fetch(item).read_bytes() == PAYLOAD
    assert server.sent == len(PAYLOAD)


def test_a_broken_connection_is_continued_where_it_stopped(serve, tmp_path):
    server = serve(break_after=download.CHUNK + 100)
    item = _wanted(server, tmp_path)
    assert _fetch(item).read_bytes() == PAYLOAD
    gets = server.gets()
    assert gets[0] is None and len(gets) == 2 and gets[1].startswith("bytes=") and gets[1] != "bytes=0-", gets
    assert int(gets[1][6:-1]) >= download.CHUNK  # what had arrived was kept
    assert server.sent - len(PAYLOAD) <= download.CHUNK  # only the piece that was on its way came twice


def test_a_complete_part_is_checked_not_fetched_again(serve, tmp_path):
    server = serve()
    item = _wanted(server, tmp_path)
    (tmp_path / "x-1.0-py3-none-any.whl.part").write_bytes(PAYLOAD)
    assert _fetch(item).read_bytes() == PAYLOAD
    assert server.sent == 0


def test_a_hash_mismatch_fails_and_leaves_nothing(serve, tmp_path):
    server = serve()
    item = _wanted(server, tmp_path, sha="0" * 64)
    with pytest.raises(KbundleError, match="does not match the sha256"):
        _fetch(item)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part


def test_a_server_that_is_not_there_is_named_and_leaves_no_part(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    item = download.Wanted(f"http://127.0.0.1:{port}/x-1.0-py3-none-any.whl", tmp_path / "x-1.0-py3-none-any.whl", SHA)
    with pytest.raises(KbundleError, match=f"cannot download http://127.0.0.1:{port}/x-1.0-py3-none-any.whl"):
        _fetch(item)
    assert list(tmp_path.iterdir()) == []


def test_an_index_that_wants_credentials_gets_them_or_refuses(serve, tmp_path):
    import base64

    server = serve(auth="Basic " + base64.b64encode(b"me:secret").decode())
    with pytest.raises(download.Refused) as info:
        _fetch(_wanted(server, tmp_path))
    assert "secret" not in str(info.value)
    assert _fetch(_wanted(server, tmp_path, auth=("me", "secret"))).read_bytes() == PAYLOAD


def test_several_files_at_once_with_bytes_and_items_on_the_meter(serve, tmp_path):
    servers = [serve() for _ in range(4)]
    items = [download.Wanted(s.url, tmp_path / f"w{i}-1.0-py3-none-any.whl", SHA) for i, s in enumerate(servers)]
    lines = []
    meter = Meter("downloading wheels", on_change=lines.append)
    assert download.fetch_all(items, meter) == [i.dest for i in items]
    assert all(i.dest.read_bytes() == PAYLOAD for i in items)
    assert meter.bytes == meter.total_bytes == 4 * len(PAYLOAD)  # sizes asked first: the ETA is right
    assert meter.done == meter.total == 4
    assert "downloading wheels: 4/4" in lines[-1] and "of" in lines[-1]


def test_one_failure_stops_the_others_and_keeps_no_file(serve, tmp_path):
    good, bad = serve(), serve()
    items = [_wanted(good, tmp_path), download.Wanted(bad.url, tmp_path / "y-1.0-py3-none-any.whl", "f" * 64)]
    with pytest.raises(KbundleError, match="does not match"):
        download.fetch_all(items)
    assert not (tmp_path / "y-1.0-py3-none-any.whl").exists()


def test_a_file_url_is_linked_into_the_cache_once_checked(tmp_path):
    source = tmp_path / "found" / "x-1.0-py3-none-any.whl"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    cache.mkdir()
    item = download.Wanted(source.as_uri(), cache / source.name, SHA)
    assert _fetch(item).read_bytes() == PAYLOAD
    with pytest.raises(KbundleError, match="does not match"):
        _fetch(download.Wanted(source.as_uri(), cache / "other-1.0-py3-none-any.whl", "0" * 64))


# ----------------------------------------------------------------- pip's report


REPORT = {
    "version": "1",
    "install": [
        {
            "download_info": {
                "url": "https://files.example/torch-2.9.1-cp311-cp311-manylinux_2_28_x86_64.whl",
                "archive_info": {"hash": "sha256=AB12", "hashes": {"sha256": "ab12"}},
            },
            "metadata": {"name": "torch", "version": "2.9.1"},
        },
        {
            "download_info": {
                "url": "https://pkgs.corp/f/tabulate-0.9.0-py3-none-any.whl",
                "archive_info": {"hash": "sha256=CD34"},
            },
            "metadata": {"name": "tabulate", "version": "0.9.0"},
        },
        {
            "download_info": {"url": "file:///tmp/built/kbgit-0.1-py3-none-any.whl", "archive_info": {}},
            "metadata": {"name": "kbgit", "version": "0.1"},
        },
    ],
}


def test_the_report_names_each_file_its_hash_and_the_pin_for_pip():
    chosen = pipreport.parse(REPORT)
    assert [(c.name, c.version, c.sha256, c.filename) for c in chosen] == [
        ("torch", "2.9.1", "ab12", "torch-2.9.1-cp311-cp311-manylinux_2_28_x86_64.whl"),
        ("tabulate", "0.9.0", "cd34", "tabulate-0.9.0-py3-none-any.whl"),
        ("kbgit", "0.1", "", "kbgit-0.1-py3-none-any.whl"),
    ]
    assert chosen[0].line == "torch==2.9.1 --hash=sha256:ab12" and chosen[2].line == "kbgit==0.1"


@pytest.mark.parametrize("broken", [{}, {"install": [{"metadata": {}}]}, {"install": None}])
def test_a_report_kbundle_cannot_read_is_one_error(broken):
    with pytest.raises(KbundleError, match="report"):
        pipreport.parse(broken)


def test_downloads_carry_the_credentials_of_their_index_only(tmp_path):
    indexes = PipIndexes("https://me:tok@pkgs.corp/simple")
    wanted = pipreport.wanted(pipreport.parse(REPORT), tmp_path, indexes, environ={})
    assert [w.auth for w in wanted] == [None, ("me", "tok"), None]
    assert all("tok" not in w.url for w in wanted)
    assert wanted[1].dest == tmp_path / "tabulate-0.9.0-py3-none-any.whl"
    env = {"PIP_EXTRA_INDEX_URL": "https://you:k@files.example/simple"}
    assert pipreport.wanted(pipreport.parse(REPORT), tmp_path, indexes, environ=env)[0].auth == ("you", "k")
