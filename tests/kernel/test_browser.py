"""The recipient's view, in a real browser: JupyterLab (from its cached venv) in Debian's chromium, driven by Playwright.

The launcher shows the kbundle kernel with its logo; a console on it opens with kbundle's
banner; a notebook on it runs all its cells, a
`time.sleep(60)` cell is interrupted (KeyboardInterrupt), and a restart gives a new container.
Screenshots of each step go to `$KBUNDLE_TEST_ARTIFACTS` (default: a folder under pytest's
tmp dir, printed). Skipped, saying why, only when chromium is not installed (scripts/test
installs Debian's; Playwright's own browser downloads are not used).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import labkit  # tests/kernel/labkit.py
import pytest

from kbundle import contract
from kbundle.kernel.spec import KernelRequest, install_kernelspec
from kbundle.resources import data_dir

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KERNEL, SHOWN = "kbundle-browser", "browser (kbundle)"
MARKER = "kbundle-browser-marker"
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.docker,
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason="Debian's chromium is not installed (scripts/test installs it: apt-get install chromium)",
    ),
]


def notebook_json() -> str:
    cells = [
        f"import uuid; print('{MARKER}', uuid.uuid4().hex)",
        "import time; time.sleep(60)",
    ]
    return json.dumps(
        {
            "cells": [
                {"cell_type": "code", "source": c, "metadata": {}, "outputs": [], "execution_count": None}
                for c in cells
            ],
            "metadata": {"kernelspec": {"name": KERNEL, "display_name": SHOWN, "language": "python"}},
            "nbformat": 4,
            "nbformat_minor": 5,
        }
    )


@pytest.fixture
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("KBUNDLE_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts")) / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"browser screenshots: {folder}")
    return folder


@pytest.fixture
def lab_env(env_image, monkeypatch, tmp_path):
    """A workdir with the notebook, a kbundle kernel on the world's image, and JupyterLab's private dirs."""
    work = Path(tempfile.mkdtemp(prefix="kbundle-test-browser-"))  # under /tmp: any kernel uid reaches it
    (work / "analysis.ipynb").write_text(notebook_json())
    for name, sub in (("DATA", "data"), ("CONFIG", "config"), ("RUNTIME", "runtime")):
        monkeypatch.setenv(f"JUPYTER_{name}_DIR", str(tmp_path / sub))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "data"))
    monkeypatch.setenv("JUPYTERLAB_WORKSPACES_DIR", str(tmp_path / "workspaces"))
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(work / ".cache"))
    monkeypatch.setenv("BROWSER", "true")  # open_lab's own "open" is a no-op: Playwright is the browser
    monkeypatch.setenv("PATH", f"{labkit.jupyterlab_venv()}{os.pathsep}{os.environ['PATH']}")
    install_kernelspec(KernelRequest(KERNEL, SHOWN, env_image, str(work), [], "h", {"cuda": None}))
    yield work
    subprocess.run(["rm", "-rf", str(work)])


def kernel_containers(client) -> list[str]:
    label = f"{contract.LABEL_KERNEL_NAME}={KERNEL}"
    return [c["Id"] for c in client.api.containers(filters={"label": label})]


def test_jupyterlab_in_chromium(lab_env, artifacts, docker_client):
    from playwright.sync_api import expect, sync_playwright

    token = "kbundle-browser-token"
    with labkit.running_lab(lab_env, lab_env / "analysis.ipynb", KERNEL, token) as (base, _proc):
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(TIMEOUT_MS)
                expect.set_options(timeout=TIMEOUT_MS)
                check_launcher(page, base, token, artifacts)
                check_console_banner(page, artifacts, docker_client)
                check_notebook(page, base, artifacts, docker_client)
            finally:
                browser.close()


def check_launcher(page, base: str, token: str, artifacts: Path) -> None:
    """The launcher's card for the kernel shows the logo JupyterLab serves from the kernelspec's directory."""
    from playwright.sync_api import expect

    served = {}  # kernelspec resources the page loaded: file name -> response
    prefix = f"/kernelspecs/{KERNEL}/"
    page.on("response", lambda r: served.setdefault(r.url.split(prefix)[-1], r) if prefix in r.url else None)
    page.goto(f"{base}/lab?token={token}&reset")
    icon = page.locator(f'.jp-LauncherCard[title="{SHOWN}"] img').first
    expect(icon).to_be_visible()
    # JupyterLab 4 shows the SVG; it must have been fetched and drawn, not a broken image.
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=icon.element_handle())
    page.screenshot(path=str(artifacts / "1-launcher.png"))
    name = icon.get_attribute("src").split(prefix)[-1]
    assert name in ("logo-svg.svg", "logo-64x64.png"), name
    assert served[name].status == 200 and served[name].body() == logo(name)
    # The PNG the older frontends (Notebook 6, nbclassic, VS Code) use, through the page's session.
    png = page.request.get(f"{base}{prefix}logo-64x64.png")
    assert png.status == 200 and png.headers["content-type"].startswith("image/png")
    assert png.body() == logo("logo-64x64.png") and png.body()[:8] == b"\x89PNG\r\n\x1a\n"


def logo(name: str) -> bytes:
    return (data_dir() / "logo" / name).read_bytes()


def check_console_banner(page, artifacts: Path, client) -> None:
    """A console on the kernel opens with kbundle's banner line: bundle, image, CUDA, GPU."""
    from playwright.sync_api import expect

    page.locator(f'.jp-LauncherCard[data-category="Console"][title="{SHOWN}"]').click()
    image = client.api.inspect_container(wait_for_container(client))["Config"]["Image"]
    banner = f"kbundle: browser | image {image} | CUDA none | no GPU visible (CPU only)"
    expect(page.locator(".jp-CodeConsole-banner", has_text=banner).first).to_be_visible()
    page.screenshot(path=str(artifacts / "2-console-banner.png"))


def wait_for_container(client, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not kernel_containers(client):
        assert time.monotonic() < deadline, "no kernel container started"
        time.sleep(0.2)
    return kernel_containers(client)[0]


def check_notebook(page, base: str, artifacts: Path, client) -> None:
    from playwright.sync_api import expect

    page.goto(f"{base}/lab/tree/analysis.ipynb")
    notebook = page.locator(".jp-NotebookPanel").first
    expect(notebook).to_be_visible()
    expect(page.locator(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus").first).to_be_visible()
    wait_idle(page)
    menu(page, "Run", "Run All Cells")
    output = notebook.locator(".jp-OutputArea-output", has_text=MARKER).first
    expect(output).to_be_visible()
    first_marker = output.inner_text()
    page.wait_for_timeout(1000)  # the sleep cell is running now
    page.screenshot(path=str(artifacts / "3-run-all.png"))

    menu(page, "Kernel", "Interrupt Kernel")
    expect(notebook.locator(".jp-OutputArea-output", has_text="KeyboardInterrupt").first).to_be_visible()
    page.screenshot(path=str(artifacts / "4-interrupted.png"))

    before = set(kernel_containers(client))  # the console's kernel and the notebook's
    menu(page, "Kernel", "Restart Kernel…")
    page.locator(".jp-Dialog button", has_text="Restart").click()
    wait_idle(page)
    after = set(kernel_containers(client))
    assert len(before - after) == len(after - before) == 1, (before, after)  # a new container for the notebook
    notebook.locator(".jp-Cell").first.click()
    page.keyboard.press("Shift+Enter")
    again = notebook.locator(".jp-OutputArea-output", has_text=MARKER).first
    expect(again).not_to_have_text(first_marker)
    page.screenshot(path=str(artifacts / "5-restarted.png"))


def menu(page, top: str, item: str) -> None:
    page.locator(".lm-MenuBar-item", has_text=top).first.click()
    page.locator(".lm-Menu-item", has_text=item).first.click()


def wait_idle(page) -> None:
    """Until the kernel is idle (JupyterLab's status bar says so)."""
    from playwright.sync_api import expect

    expect(page.locator(".jp-StatusBar-Widget", has_text="Idle").first).to_be_visible()
