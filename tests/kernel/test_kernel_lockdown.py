"""The kernel container gets image/policy.py's kernel lockdown: a read-only root with a writable
tmpfs /tmp (HOME), a process limit, and the base image's LD_PRELOAD and PYTHONPATH neutralised.
A kernel started by jupyter_client through the registered kernelspec probes its own container."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from kbundle.kernel.spec import KernelRequest, install_kernelspec

pytestmark = pytest.mark.docker

POISONED = "kbundle-test/poisoned-env:1"

PROBE = """
import json, os
def attempt(path):
    try:
        with open(path, "w") as fh:
            fh.write("x")
        return "written"
    except OSError as exc:
        return "%s:%s" % (type(exc).__name__, exc.errno)
def pids():
    for path in ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"):
        try:
            return open(path).read().strip()
        except OSError:
            pass
    return "unreadable"
print(json.dumps({
    "etc": attempt("/etc/kbundle-probe"), "var_tmp": attempt("/var/tmp/kbundle-probe"),
    "env": attempt("/opt/kbundle/env/kbundle-probe"), "tmp": attempt("/tmp/kbundle-probe"),
    "home": attempt(os.path.expanduser("~/kbundle-probe")), "pids": pids(),
    "ld_preload": os.environ.get("LD_PRELOAD"), "pythonpath": os.environ.get("PYTHONPATH"),
}))
"""


@pytest.fixture(scope="module")
def poisoned_image(env_image, docker_client):
    """The world's env image with what a hostile base image's ENV could hold."""
    dockerfile = (
        f"FROM {env_image}\nENV LD_PRELOAD=/nonexistent/evil.so PYTHONPATH=/nonexistent/evil\nLABEL kbundle.test=1\n"
    )
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=POISONED, rm=True)
    yield POISONED
    docker_client.images.remove(POISONED, force=True)


async def test_the_kernel_root_is_read_only_and_its_environment_cleared(poisoned_image, monkeypatch, tmp_path_factory):
    from jupyter_client.manager import AsyncKernelManager

    data = tempfile.mkdtemp(prefix="kbundle-test-jupyter-")
    monkeypatch.setenv("JUPYTER_DATA_DIR", data)
    monkeypatch.setenv("JUPYTER_PATH", data)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", os.path.join(data, "runtime"))
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path_factory.mktemp("kbundle-cache")))
    work = Path(tempfile.mkdtemp(prefix="kbundle-test-work-"))
    out: list[str] = []
    try:
        install_kernelspec(KernelRequest("kbundle-lockdown", "lockdown", poisoned_image, str(work), [], "h"))
        km = AsyncKernelManager(kernel_name="kbundle-lockdown")
        await km.start_kernel(cwd=str(work))
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            reply = await kc.execute_interactive(
                PROBE, timeout=60, output_hook=lambda m: out.append(m["content"].get("text", ""))
            )
            assert reply["content"]["status"] == "ok", reply["content"]
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()
    finally:
        subprocess.run(["rm", "-rf", data, str(work)])
    facts = json.loads("".join(out))
    assert facts["etc"].endswith(":30") and facts["var_tmp"].endswith(":30") and facts["env"].endswith(":30"), facts
    assert facts["tmp"] == facts["home"] == "written", facts  # Jupyter and IPython write under HOME=/tmp
    assert facts["pids"].isdigit(), facts
    assert not facts["ld_preload"] and not facts["pythonpath"], facts
