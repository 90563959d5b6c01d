"""kbundle on ROOTLESS Podman: a plain user's own Podman service (tests/world/podman_rootless.py).

Everything runs AS THAT USER (`runuser`, with their HOME, XDG_RUNTIME_DIR, Jupyter data dir and
kbundle cache): `kbundle run` builds the bundle's image in the user's own storage through their
socket, and jupyter_client, in a script of the user's, starts the kernel. The user's Python is a
venv of Debian's python3 over this checkout's kbundle and packages (the test venv's interpreter
lives in root's home, which the user cannot enter).

What it proves: the kernel runs as the user's own uid inside (Podman's `keep-id`: without it the
user's uid is root in the container and the kernel's uid a subordinate one), a file the kernel
writes in the notebook folder is the user's on the host, the kernel's ports answer on 127.0.0.1
(published by the engine: slirp4netns keeps the container's bridge out of the host's reach), and
`--gpus all` with the world's STAND-IN CDI spec is one `error:` line. That refusal is what rootless
Podman with runc does for a spec whose nodes live elsewhere than their container path: a user
namespace cannot make device nodes, so runc binds each from its container path on the host
(`/dev/nvidia0`), where NVIDIA's generated spec has the real ones and the stand-in has none.
The Slurm node agent, run as the user, gives its `podman run` the same `keep-id`.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from pathlib import Path

import pytest

import world as world_module
from helpers import pack_world_bundle
from world.daemons import free_port
from world.podman_rootless import as_user

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"

# Who the kernel is, and a file it writes in the notebook folder (its working directory).
PROBE = (
    "import json, os\n"
    "open('written-by-kernel', 'w').write('x')\n"
    "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'cwd': os.getcwd()}))"
)

# The user's Jupyter: start the kernel, run the code, print what it printed and where it answered.
START = """\
import json, sys
from jupyter_client.manager import KernelManager

km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel()
try:
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        out = []
        reply = kc.execute_interactive(sys.argv[2], timeout=60, output_hook=out.append)
        printed = "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream")
        print(json.dumps({"status": reply["content"]["status"], "printed": printed, "ip": km.ip}))
    finally:
        kc.stop_channels()
finally:
    km.shutdown_kernel(now=True)
"""

LAUNCHER = "#!{python}\nimport sys\nfrom kbundle.{module} import main\nsys.exit(main())\n"


def _user_venv(folder: Path) -> Path:
    """A venv of Debian's python3 that sees this checkout's kbundle and the test venv's packages."""
    venv = folder / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / version / "site-packages"
    (site / "kbundle-checkout.pth").write_text(f"{REPO / 'src'}\n{sysconfig.get_paths()['purelib']}\n")
    for name, module in (("kbundle", "cli"), ("kbundle-kernel", "kernel.launcher")):
        script = venv / "bin" / name
        script.write_text(LAUNCHER.format(python=venv / "bin" / "python", module=module))
        script.chmod(0o755)
    return venv


@pytest.fixture(scope="module")
def rootless(world, env_image):
    """(the user's socket, their passwd entry, a folder of theirs with a venv, Jupyter data, cache, notebooks)."""
    if "podman_rootless_host" not in world:
        pytest.skip(f"the world has no rootless Podman: {world.get('podman_rootless_error', 'unknown')}")
    probe = f"import sys; print(sys.version_info[:2] == {tuple(sys.version_info[:2])})"
    if subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True).stdout.strip() != "True":
        pytest.skip(f"{SYSTEM_PYTHON} is not Python {sys.version_info.major}.{sys.version_info.minor} like the tests'")
    user = pwd.getpwnam(world["podman_rootless_user"])
    world_module.copy_image_rootless(env_image)
    folder = Path(tempfile.mkdtemp(prefix="kbundle-test-rootless-"))
    venv = _user_venv(folder)
    for sub in ("jupyter", "cache", "notebooks"):
        (folder / sub).mkdir()
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(folder)], check=True)
    can = subprocess.run(as_user(user, [str(venv / "bin" / "python"), "-c", "import kbundle, jupyter_client"]))
    if can.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"{user.pw_name} cannot read this checkout ({REPO}) or the test venv's packages")
    yield world["podman_rootless_host"], user, folder
    shutil.rmtree(folder, ignore_errors=True)


def _user_run(user, folder: Path, argv: list[str], host: str | None, cwd: Path, timeout: float = 300):
    env = {"JUPYTER_DATA_DIR": str(folder / "jupyter"), "KBUNDLE_CACHE_DIR": str(folder / "cache")}
    if host:
        env["DOCKER_HOST"] = host
    return subprocess.run(
        as_user(user, argv, env), cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def registered(world, rootless, tmp_path_factory):
    """`kbundle run` of a world bundle, as the user, against their rootless socket: (kernel, image)."""
    host, user, folder = rootless
    sender = tmp_path_factory.mktemp("rootless-sender")
    env = dict(os.environ, KBUNDLE_CACHE_DIR=str(sender / "cache"))
    env.pop("DOCKER_HOST", None)
    bundle = pack_world_bundle(world, env, sender / "b", f"kbrootless-{uuid.uuid4().hex[:8]}")
    mine = folder / bundle.name
    shutil.copy(bundle, mine)
    os.chown(mine, user.pw_uid, user.pw_gid)
    kbundle = str(folder / "venv" / "bin" / "kbundle")
    proc = _user_run(user, folder, [kbundle, "run", str(mine), "--yes", "--json"], host, folder / "notebooks")
    assert proc.returncode == 0, proc.stderr
    ran = json.loads(proc.stdout)
    assert ran["built"] is True, ran
    return ran["kernel_name"], ran["image"]


def test_a_rootless_kernel_is_the_user_writes_their_folder_and_answers_on_loopback(rootless, registered):
    host, user, folder = rootless
    kernel, _ = registered
    (folder / "start.py").write_text(START)
    notebooks = folder / "notebooks"
    # The user's Jupyter, started without DOCKER_HOST (a desktop launcher): the kernelspec names the engine.
    python = str(folder / "venv" / "bin" / "python")
    proc = _user_run(user, folder, [python, str(folder / "start.py"), kernel, PROBE], None, notebooks, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["status"] == "ok" and answer["ip"] == "127.0.0.1", answer
    seen = json.loads(answer["printed"])
    assert (seen["uid"], seen["gid"]) == (user.pw_uid, user.pw_gid), seen  # keep-id: the user, not a subuid
    assert seen["cwd"] == str(notebooks)
    written = notebooks / "written-by-kernel"
    assert (written.stat().st_uid, written.stat().st_gid) == (user.pw_uid, user.pw_gid)


def test_a_rootless_gpu_kernel_with_the_standin_spec_is_one_error_line(rootless, registered):
    host, user, folder = rootless
    _, image = registered
    conn = folder / "gpu-kernel.json"
    # Real ports: the rootless engine publishes them (a port of 0 is refused before any GPU is looked at).
    ports = {k: free_port(0) for k in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")}
    conn.write_text(json.dumps({"ip": "127.0.0.1", "transport": "tcp", "key": "k", **ports}))
    os.chown(conn, user.pw_uid, user.pw_gid)
    launcher = str(folder / "venv" / "bin" / "kbundle-kernel")
    argv = [launcher, "--image", image, "--gpus", "all", "--docker-host", host, "-f", str(conn)]
    proc = _user_run(user, folder, argv, None, folder / "notebooks", timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: this kernel asks for GPUs (all) but rootless Podman could not bind"), lines
    assert "nvidia-ctk cdi generate" in lines[0] and "--gpus none" in lines[0]


# The Slurm node agent as the job's user: it runs `podman run` itself, with the kernel's shim swapped for PROBE.
AGENT = """\
import json, subprocess, sys
from kbundle.image import policy
from kbundle.kernel import node_agent

folder, image, probe = sys.argv[1:4]
request = {"name": "kbundle-node-rootless", "image": image, "shim": "unused", "user": sys.argv[4],
           "mounts": [folder], "working_dir": folder, "policy": policy.kernel("host").request({"HOME": "/tmp"})}
cmd = node_agent.container_command("podman", request, "127.0.0.1", {})
assert cmd[-3:] == ["python", "-c", "unused"], cmd
cmd = [a for a in cmd[:-3] if a != "-i"] + ["python", "-c", probe]
print(json.dumps({"argv": cmd, "out": subprocess.run(cmd, capture_output=True, text=True).stdout}))
"""


def test_the_node_agent_as_a_rootless_podman_user_keeps_the_user(rootless, env_image):
    host, user, folder = rootless
    work = folder / "node-work"
    work.mkdir(exist_ok=True)
    os.chown(work, user.pw_uid, user.pw_gid)
    (folder / "agent.py").write_text(AGENT)
    python = str(folder / "venv" / "bin" / "python")
    argv = [python, str(folder / "agent.py"), str(work), env_image, PROBE, f"{user.pw_uid}:{user.pw_gid}"]
    proc = _user_run(user, folder, argv, None, work, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = json.loads(proc.stdout)
    assert ran["argv"][ran["argv"].index("--userns") + 1] == "keep-id"
    seen = json.loads(ran["out"].strip().splitlines()[-1])
    assert (seen["uid"], seen["gid"], seen["cwd"]) == (user.pw_uid, user.pw_gid, str(work)), seen
    written = work / "written-by-kernel"
    assert (written.stat().st_uid, written.stat().st_gid) == (user.pw_uid, user.pw_gid)
