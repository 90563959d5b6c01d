"""The kernel's banner (kernel_info, shown by consoles) names the bundle, image, CUDA and the GPUs it sees."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from kbundle.kernel.spec import KernelRequest, install_kernelspec

pytestmark = pytest.mark.docker


async def test_banner_names_bundle_image_cuda_and_gpu(env_image, monkeypatch, docker_client):
    from jupyter_client.manager import AsyncKernelManager

    data = Path(tempfile.mkdtemp(prefix="kbundle-test-jupyter-"))
    work = Path(tempfile.mkdtemp(prefix="kbundle-test-work-"))  # under /tmp: reachable by any uid
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data))
    monkeypatch.setenv("JUPYTER_PATH", str(data))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(data / "runtime"))
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(data / "cache"))
    install_kernelspec(
        KernelRequest("kbundle-banner", "analysis", env_image, str(work), [], "h", extra_metadata={"cuda": "12.1"})
    )
    km = AsyncKernelManager(kernel_name="kbundle-banner")
    await km.start_kernel(cwd=str(work))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        kc.kernel_info()
        reply = await kc.get_shell_msg(timeout=30)
        while reply["msg_type"] != "kernel_info_reply":
            reply = await kc.get_shell_msg(timeout=30)
        banner = reply["content"]["banner"]
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
        subprocess.run(["rm", "-rf", str(data), str(work)])
    line = banner.strip().splitlines()[-1]
    assert line == f"kbundle: analysis | image {env_image} | CUDA 12.1 | no GPU visible (CPU only)", banner
