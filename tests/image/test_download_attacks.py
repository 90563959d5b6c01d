"""Issue 18 (findings 1, 2, 7a and "one verified downloader"), below the CLI: file names made
from URLs, the `.part` written without following links, the wheel cache keyed by content and
by index, resolutions keyed by what decides them, and the sdist download with net.py's CA rules.
The CLI-level attacks are in tests/flows/test_run_download_attacks.py."""

from __future__ import annotations

import hashlib
import http.server
import os
import ssl
import subprocess
import threading
from functools import partial
from pathlib import Path

import pytest

from kbundle import net, pipplatform
from kbundle.errors import KbundleError, UnsafeName
from kbundle.image import download, pipreport, sources, wheels
from kbundle.specs import PipIndexes, bundle_url, parse_pip_line, safe_filename, url_filename

# ----------------------------------------------------------------- names and URLs


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "x\x00y"])
def test_safe_filename_refuses_what_is_not_one_plain_name(name):
    with pytest.raises(UnsafeName) as info:
        safe_filename(name)
    assert info.value.exit_code == 3


@pytest.mark.parametrize(
    "url",
    [
        "http://h/a/..%2F..%2Ftmp%2FX.tar.gz",  # the finding: encoded slashes climb
        "http://h/a/%2e%2E/x-1.0-py3-none-any.whl",
        "http://h/a/../x-1.0.tar.gz",
        "http://h/a/..%5Cx.whl",
        "file:///etc/passwd#egg=x",
        "git+file:///srv/repo.git",
        "ftp://h/x-1.0.tar.gz",
        "http:///no-host.whl",
    ],
)
def test_a_bundle_url_that_climbs_or_reads_this_host_is_refused(url):
    with pytest.raises(UnsafeName):
        bundle_url(url)


@pytest.mark.parametrize(
    "url", ["https://h/f/x-1.0-py3-none-any.whl", "git+https://h/x.git@v1", "git+ssh://git@h/x.git", "http://h:8/a%20b"]
)
def test_http_and_git_urls_pass(url):
    assert bundle_url(url) == url


def test_url_filename_unquotes_then_splits():
    assert url_filename("http://h/a/x%2B1-1.0.tar.gz?t=1#sha256=ab") == "x+1-1.0.tar.gz"
    with pytest.raises(UnsafeName):
        url_filename("http://h/a/x%5C..")


@pytest.mark.parametrize(
    "indexes",
    [
        {"index_url": "file:///srv/simple"},
        {"extra_index_urls": ["https://ok/simple", "file:///srv/simple"]},
        {"find_links": ["file:///opt/wheels"]},
        {"find_links": ["/opt/wheels"]},
    ],
)
def test_a_bundles_file_index_is_refused(indexes):
    with pytest.raises(UnsafeName, match="not a URL kbundle fetches"):
        PipIndexes.from_dict(indexes)


def test_the_users_own_find_links_are_not_the_bundles():
    # Only what a bundle carries goes through from_dict; the recipient's PIP_FIND_LINKS is pip's own.
    env = PipIndexes.from_dict({"index_url": "https://ok/simple"}).environment({"PIP_FIND_LINKS": "/opt/wheels"})
    assert env["PIP_FIND_LINKS"] == "/opt/wheels" and env["PIP_INDEX_URL"] == "https://ok/simple"


@pytest.mark.parametrize("line", ["e @ file:///tmp/e-1.0-py3-none-any.whl", "e @ http://h/a/..%2F..%2Fe-1.0.tar.gz"])
def test_a_refused_pip_line_is_exit_3(line):
    with pytest.raises(UnsafeName) as info:
        wheels.parse_pins([line])
    assert info.value.exit_code == 3


def test_a_report_sha256_that_is_not_hex_is_refused():
    report = {
        "install": [
            {
                "download_info": {"url": "https://h/x-1.0-py3-none-any.whl", "archive_info": {"hash": "sha256=../x"}},
                "metadata": {"name": "x", "version": "1.0"},
            }
        ]
    }
    with pytest.raises(KbundleError, match="not one"):
        pipreport.parse(report)


# ----------------------------------------------------------------- the .part, without links


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def files(tmp_path):
    """An HTTP server for `tmp_path/served` on 127.0.0.1: (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Files, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_link_planted_as_the_part_is_refused_not_followed(files, tmp_path):
    folder, url = files
    (folder / "x-1.0-py3-none-any.whl").write_bytes(b"wheel")
    cache = tmp_path / "cache"
    cache.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (cache / "x-1.0-py3-none-any.whl.part").symlink_to(victim)
    with pytest.raises(KbundleError, match="symbolic link"):
        download.fetch_url(f"{url}/x-1.0-py3-none-any.whl", cache / "x-1.0-py3-none-any.whl", root=cache)
    assert victim.read_bytes() == b"untouched"


def test_a_linked_folder_below_the_cache_is_refused(files, tmp_path):
    folder, url = files
    (folder / "x-1.0-py3-none-any.whl").write_bytes(b"wheel")
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    cache.mkdir()
    outside.mkdir()
    (cache / "sha256").symlink_to(outside)
    dest = cache / "sha256" / "ab" / "x-1.0-py3-none-any.whl"
    with pytest.raises(KbundleError, match="symbolic link"):
        download.fetch_url(f"{url}/x-1.0-py3-none-any.whl", dest, root=cache)
    assert list(outside.iterdir()) == []


def test_a_damaged_file_in_place_is_fetched_again(files, tmp_path):
    folder, url = files
    data = b"the real wheel"
    (folder / "x-1.0-py3-none-any.whl").write_bytes(data)
    dest = tmp_path / "x-1.0-py3-none-any.whl"
    dest.write_bytes(b"damaged")
    sha = hashlib.sha256(data).hexdigest()
    assert download.fetch_url(f"{url}/x-1.0-py3-none-any.whl", dest, sha).read_bytes() == data


# ----------------------------------------------------------------- the wheel cache


@pytest.fixture
def target(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path / "cache"))
    return wheels.cache_dir("3.11")


def _store(directory: Path, name: str, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    path = wheels.stored(directory, sha, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return sha


def test_a_cached_wheel_is_found_by_its_hash_not_its_name(target):
    tags = pipplatform.target_tags("3.11")
    trojan = _store(target, "kbdemo-1.0-py3-none-any.whl", b"trojan")
    honest = hashlib.sha256(b"honest").hexdigest()
    assert wheels.find_cached(parse_pip_line(f"kbdemo==1.0 --hash=sha256:{honest}"), target, tags) is None
    found = wheels.find_cached(parse_pip_line(f"kbdemo==1.0 --hash=sha256:{trojan}"), target, tags)
    assert found is not None and found.read_bytes() == b"trojan"  # that content is what this pin asks for
    # Without a hash, a pin is served only what its own indexes served.
    stranger = wheels.index_key(PipIndexes("http://evil/simple"), environ={})
    honest_key = wheels.index_key(PipIndexes("http://good/simple"), environ={})
    wheels._remember_served(target, stranger, "kbdemo-1.0-py3-none-any.whl", trojan)
    assert wheels.find_cached(parse_pip_line("kbdemo==1.0"), target, tags) is None
    assert wheels.find_cached(parse_pip_line("kbdemo==1.0"), target, tags, honest_key) is None
    assert wheels.find_cached(parse_pip_line("kbdemo==1.0"), target, tags, stranger) == found


def test_a_wheel_kept_by_name_alone_is_never_served_by_name(target):
    tags = pipplatform.target_tags("3.11")
    (target / "kbdemo-1.0-py3-none-any.whl").write_bytes(b"left by an older kbundle, or a stranger")
    key = wheels.index_key(PipIndexes(), environ={})
    assert wheels.find_cached(parse_pip_line("kbdemo==1.0"), target, tags, key) is None
    sha = hashlib.sha256(b"left by an older kbundle, or a stranger").hexdigest()
    adopted = wheels.find_cached(parse_pip_line(f"kbdemo==1.0 --hash=sha256:{sha}"), target, tags)
    assert adopted == wheels.stored(target, sha, "kbdemo-1.0-py3-none-any.whl")  # its hash proves it


def test_a_damaged_cached_wheel_is_removed_so_that_it_is_fetched_again(target):
    tags = pipplatform.target_tags("3.11")
    sha = _store(target, "kbdemo-1.0-py3-none-any.whl", b"honest")
    path = wheels.stored(target, sha, "kbdemo-1.0-py3-none-any.whl")
    path.write_bytes(b"flipped bits")
    assert wheels.find_cached(parse_pip_line(f"kbdemo==1.0 --hash=sha256:{sha}"), target, tags) is None
    assert not path.exists()


def test_the_cache_matches_only_the_target_platform(target):
    # tests/image/test_image_unit.py's platform table, in the cache's new layout
    tags = pipplatform.target_tags("3.11")
    key = wheels.index_key(PipIndexes(), environ={})
    for name in (
        "numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "numpy-1.26.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "numpy-1.26.4-cp311-cp311-macosx_11_0_arm64.whl",
        "tabulate-0.9.0-py3-none-any.whl",
    ):
        wheels._remember_served(target, key, name, _store(target, name, name.encode()))
    found = wheels.find_cached(parse_pip_line("numpy==1.26.4"), target, tags, key)
    assert found.name.startswith("numpy-1.26.4-cp311-cp311-manylinux_2_17")
    assert wheels.find_cached(parse_pip_line("Tabulate==0.9.0"), target, tags, key).name.startswith("tabulate-0.9.0")
    assert wheels.find_cached(parse_pip_line("tabulate==0.8.0"), target, tags, key) is None
    assert wheels.find_cached(parse_pip_line("tabulate>=0.9"), target, tags, key) is None
    assert wheels.find_cached(parse_pip_line("numpy==1.26.4"), target, pipplatform.target_tags("3.10"), key) is None


def test_a_resolution_is_keyed_by_everything_that_decides_it():
    base = (["kbdemo==1.0"], "3.11", PipIndexes("http://good/simple"), "2.36")
    key = wheels.resolution_key(*base, environ={})
    assert key == wheels.resolution_key(*base, environ={})
    assert key == wheels.resolution_key(*base[:2], PipIndexes("http://u:tok@good/simple"), "2.36", environ={})
    others = [
        (["kbdemo==1.1"], "3.11", PipIndexes("http://good/simple"), "2.36"),
        (["kbdemo==1.0"], "3.12", PipIndexes("http://good/simple"), "2.36"),
        (["kbdemo==1.0"], "3.11", PipIndexes("http://evil/simple"), "2.36"),
        (["kbdemo==1.0"], "3.11", PipIndexes("http://good/simple", ("http://evil/simple",)), "2.36"),
        (["kbdemo==1.0"], "3.11", PipIndexes("http://good/simple"), "2.17"),
    ]
    assert all(wheels.resolution_key(*o, environ={}) != key for o in others)
    assert wheels.resolution_key(*base, environ={"PIP_EXTRA_INDEX_URL": "http://mine/simple"}) != key


# ----------------------------------------------------------------- one downloader, net.py's CA rules


def test_ca_for_requests_follows_pip_then_the_usual_variables(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert net.ca_for_requests({"PIP_CERT": str(ca), "SSL_CERT_FILE": "/nope"}) == str(ca)
    assert net.ca_for_requests({"REQUESTS_CA_BUNDLE": str(ca)}) == str(ca)
    assert net.ca_for_requests({"PIP_CERT": str(tmp_path / "missing")}) is True


@pytest.fixture
def tls_files(tmp_path):
    """An HTTPS server on 127.0.0.1 with a certificate of a CA only PIP_CERT names: (folder, URL, CA file)."""
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-days",
        "2",
        "-subj",
        "/CN=kbundle test CA",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "2",
        "-extfile",
        ext,
    )
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Files, directory=str(folder)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"https://127.0.0.1:{server.server_address[1]}", ca
    server.shutdown()
    server.server_close()


def _sdist(folder: Path) -> tuple[str, str]:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"[build-system]\nrequires = []\n"
        info = tarfile.TarInfo("kbs-1.0/pyproject.toml")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (folder / "kbs-1.0.tar.gz").write_bytes(buf.getvalue())
    return "kbs-1.0.tar.gz", hashlib.sha256(buf.getvalue()).hexdigest()


def test_an_sdist_is_fetched_with_the_ca_pip_trusts(tls_files, tmp_path, monkeypatch):
    folder, url, ca = tls_files
    name, sha = _sdist(folder)
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("PIP_CERT", str(ca))  # a corporate CA: trusted by pip, and so by kbundle
    pin = parse_pip_line(f"kbs @ {url}/{name} --hash=sha256:{sha}")
    work = tmp_path / "work"
    work.mkdir()
    src = sources._download_sdist(pin, pin.url, work / "src")
    assert (src / "pyproject.toml").is_file()
    assert sorted(p.name for p in work.iterdir()) == [name, "src"]  # no .part left

    monkeypatch.setenv("PIP_CERT", str(tmp_path / "missing.pem"))  # without it: refused, not trusted
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(KbundleError, match="cannot download"):
        sources._download_sdist(pin, pin.url, other / "src")


def test_an_sdist_with_another_hash_is_refused_and_not_kept(files, tmp_path):
    folder, url = files
    name, _sha = _sdist(folder)
    pin = parse_pip_line(f"kbs @ {url}/{name} --hash=sha256:{'0' * 64}")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(KbundleError, match="does not match"):
        sources._download_sdist(pin, pin.url, work / "src")
    assert not (work / name).exists() and not (work / f"{name}.part").exists()


def test_session_verifies_with_net_rules(monkeypatch, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    monkeypatch.setenv("PIP_CERT", str(ca))
    assert download.session().verify == str(ca)
    monkeypatch.delenv("PIP_CERT")
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    assert download.session().verify is True
    assert os.environ.get("PIP_CERT") is None
