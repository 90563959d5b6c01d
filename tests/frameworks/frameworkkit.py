"""What the heavy framework tests share: a sender who packs, a recipient who runs `--execute`.

These tests download real frameworks from PyPI (TensorFlow's wheel is 320 MB, PyTorch's with its
nvidia-* CUDA wheels about 4 GB). kbundle keeps the wheels it fetches in its cache, so every
heavy test uses one cache under the world's directory (``<world_dir>/heavy-cache``), which
outlives a test run: a warm CI downloads nothing again. The images they build keep their names
(``kbundle/kbheavy-*``) and the newest tag of each stays, so a warm CI does not rebuild them
either; an older tag of the same name is removed, so the disk holds one image per test.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import run_kbundle

# A cold torch run downloads about 4 GB and builds a 7 GB image on two cores (5 minutes here);
# a warm one takes under a minute. A hang (no kernel reply) must still end within CI's budget.
PACK_TIMEOUT_S = 600
RUN_TIMEOUT_S = 1500


def heavy_cache(world: dict) -> Path:
    """kbundle's cache for the heavy tests: it survives between test runs, as the world does."""
    path = Path(world["world_dir"]) / "heavy-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def heavy_environment(world: dict, root: Path) -> dict[str, str]:
    """The environment for `kbundle`: the shared cache, a private Jupyter, and pip as a plain
    recipient has it (PyPI, none of this machine's pip.conf: its local indexes, find-links and
    constraints would change what gets resolved). Proxy and CA variables stay."""
    env = dict(os.environ)
    for key in ("JUPYTER_PATH", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(key, None)
    env.update(
        KBUNDLE_CACHE_DIR=str(heavy_cache(world)),
        JUPYTER_DATA_DIR=str(root / "jupyter"),
        PIP_CONFIG_FILE=os.devnull,
        PIP_FIND_LINKS="",
    )
    return env


kbundle = run_kbundle


@dataclass
class Mirror:
    """A PyPI mirror on 127.0.0.1 whose pages carry no `data-requires-python`, as many corporate
    mirrors serve them: pip then learns which Python a file needs only from its metadata."""

    url: str
    projects: list[str] = field(default_factory=list)  # every project page it served


_REQUIRES_PYTHON = re.compile(rb'\sdata-requires-python="[^"]*"')


@contextlib.contextmanager
def stripped_mirror(upstream: str = "https://pypi.org/simple") -> Iterator[Mirror]:
    """Serve `upstream`'s PEP 503 pages (HTML) without their data-requires-python attributes; the
    files stay where the pages point (files.pythonhosted.org)."""
    mirror = Mirror("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            project = self.path.strip("/").split("/")[-1]
            request = urllib.request.Request(f"{upstream}/{project}/", headers={"Accept": "text/html"})
            try:
                with urllib.request.urlopen(request, timeout=60) as resp:
                    body = _REQUIRES_PYTHON.sub(b"", resp.read())
            except OSError:
                self.send_error(502)
                return
            mirror.projects.append(project)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}/simple"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield mirror
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Executed:
    """What the recipient got from `kbundle run --execute --json`."""

    data: dict  # the --json object
    stderr: str  # what run said on stderr (progress, notes, the kernel's stderr)
    notebook: dict  # the executed copy

    @property
    def statuses(self) -> list[str]:
        return [c["status"] for c in self.data["execute"]["cells"]]

    def stream(self, code_cell: int, name: str = "stdout") -> str:
        """All the text one code cell (counted among code cells) wrote to one stream."""
        cells = [c for c in self.notebook["cells"] if c["cell_type"] == "code"]
        outputs = cells[code_cell]["outputs"]
        return "".join(_text(o["text"]) for o in outputs if o["output_type"] == "stream" and o["name"] == name)


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else value


def pack_and_execute(
    world: dict,
    root: Path,
    name: str,
    notebook: Path,
    environment: str,
    index_url: str | None = None,
    native: bool = False,
) -> Executed:
    """The sender packs `notebook` with `environment` (an environment.yml's text) against the
    world's channel and base image; the recipient runs it with --execute, without a GPU.
    `index_url`: the package index both use (their pip configuration), instead of PyPI.
    `native`: the recipient has no container engine (DOCKER_HOST points nowhere) and runs
    `run --native`."""
    env = heavy_environment(world, root)
    if index_url:
        env["PIP_INDEX_URL"] = index_url
    sender, recipient = root / "sender", root / "recipient"
    sender.mkdir()
    recipient.mkdir()
    (sender / f"{name}.ipynb").write_bytes(notebook.read_bytes())
    (sender / "environment.yml").write_text(environment)
    bundle = sender / f"{name}.kbundle"
    base = ["--base-image", world["base_image"]]
    packed = kbundle(
        ["pack", f"{name}.ipynb", "-e", "environment.yml", "--channel", world["channel"], *base, "-o", bundle],
        env,
        sender,
        PACK_TIMEOUT_S,
    )
    assert packed.returncode == 0, packed.stderr
    how = ["--native"] if native else [*base, "--gpus", "none"]
    run_env = dict(env, DOCKER_HOST="unix:///nonexistent/docker.sock") if native else env
    ran = kbundle(
        ["run", bundle, *how, "--yes", "--json", "--execute", "--progress", "plain"],
        run_env,
        recipient,
        RUN_TIMEOUT_S,
    )
    assert ran.returncode == 0, ran.stderr[-5000:]
    data = json.loads(ran.stdout)
    return Executed(data, ran.stderr, json.loads(Path(data["execute"]["output"]).read_text()))


def keep_newest_only(docker_client, image: str) -> None:
    """Keep `image` for the next run; remove the older tags of its name, and any container left."""
    repository = image.rsplit(":", 1)[0]
    for container in docker_client.containers.list(all=True, filters={"ancestor": image}):
        container.remove(force=True)
    for old in docker_client.images.list(name=repository):
        for tag in old.tags:
            if tag.rsplit(":", 1)[0] == repository and tag != image:
                docker_client.images.remove(tag, force=True)
