"""A STAND-IN for NVIDIA's ``nvidia-container-runtime-hook``: the GPU box's two "GPUs", without a GPU.

dockerd registers its ``nvidia`` device driver when a program of that name is on its PATH at
start (moby ``daemon/nvidia_linux.go``). For every ``--gpus`` request it then sets
``NVIDIA_VISIBLE_DEVICES`` (and ``NVIDIA_DRIVER_CAPABILITIES`` for the capabilities asked) in
the container's environment and adds the program as an OCI prestart hook, argv
``[nvidia-container-runtime-hook, prestart]``, with the OCI state on stdin. This stand-in does
what the real hook does with that, minus the driver:

* reads the state (container id, pid, bundle) and the bundle's ``config.json``;
* takes ``NVIDIA_VISIBLE_DEVICES`` from the container's environment (``all``, ``none``/``void``,
  or indices and stand-in UUIDs); an unknown device fails the start, as the real one does;
* makes, for each visible GPU, a stand-in device node named as NVIDIA's are (``/dev/nvidia0``,
  ``/dev/nvidia1``: the box has ``KBUNDLE_GPU_BOX_GPUS`` GPUs, default 2), plus ``/dev/nvidiactl``,
  inside the container. At prestart, runc has mounted the container's ``/dev`` in the container's
  mount namespace but not yet switched root, so ``/proc/PID/root`` + the rootfs path reaches it;
* appends one JSON line of what it was asked to ``KBUNDLE_GPU_BOX_LOG`` (the world's log).

It proves the requests and the engine's plumbing, not CUDA: nothing can open these nodes.
It runs with the host's python3 from dockerd's environment (standard library only).
"""

import json
import os
import stat
import sys
import time

NVIDIA_MAJOR = 195  # the real driver's major number; minor N is GPU N, 255 is nvidiactl
CTL_MINOR = 255


def gpu_count():
    try:
        return int(os.environ.get("KBUNDLE_GPU_BOX_GPUS", "2"))
    except ValueError:
        return 2


def uuid_of(index):
    """The stand-in GPU's UUID, in NVIDIA's form."""
    return f"GPU-57a4d1e0-0000-4000-8000-{index:012d}"


def visible(value, count):
    """Indices of the GPUs `value` (NVIDIA_VISIBLE_DEVICES) names; ValueError for an unknown one."""
    value = (value or "").strip()
    if value in ("", "none", "void"):
        return []
    if value == "all":
        return list(range(count))
    chosen = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        index = next((i for i in range(count) if item in (str(i), uuid_of(i))), None)
        if index is None:
            raise ValueError(f"unknown device id: {item}")
        if index not in chosen:
            chosen.append(index)
    return chosen


def make_node(path, minor):
    """A character device with NVIDIA's numbers; a plain file where mknod is not allowed."""
    if os.path.lexists(path):
        return
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(NVIDIA_MAJOR, minor))
    except PermissionError:
        with open(path, "w"):
            pass
    os.chmod(path, 0o666)


def record(entry):
    target = os.environ.get("KBUNDLE_GPU_BOX_LOG")
    if not target:
        return
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of one line: concurrent hooks never interleave
    finally:
        os.close(fd)


def prestart():
    state = json.load(sys.stdin)
    bundle = state.get("bundle") or state.get("bundlePath") or "."
    with open(os.path.join(bundle, "config.json")) as fh:
        config = json.load(fh)
    env = dict(e.split("=", 1) for e in config.get("process", {}).get("env", []) if "=" in e)
    asked = env.get("NVIDIA_VISIBLE_DEVICES", "")
    entry = {
        "time": time.time(),
        "hook": "prestart",
        "argv": sys.argv,
        "id": state.get("id", ""),
        "pid": state.get("pid"),
        "hostname": config.get("hostname", ""),
        "NVIDIA_VISIBLE_DEVICES": asked,
        "NVIDIA_DRIVER_CAPABILITIES": env.get("NVIDIA_DRIVER_CAPABILITIES"),
        "devices": [],
    }
    try:
        indices = visible(asked, gpu_count())
    except ValueError as exc:
        entry["error"] = str(exc)
        record(entry)
        sys.stderr.write(f"nvidia-container-cli (stand-in): device error: {exc}\n")
        return 1
    root = config.get("root", {}).get("path", "rootfs")
    root = root if os.path.isabs(root) else os.path.join(bundle, root)
    dev = f"/proc/{state['pid']}/root{root}/dev"
    for index in indices:
        make_node(os.path.join(dev, f"nvidia{index}"), index)
        entry["devices"].append(f"/dev/nvidia{index}")
    if indices:
        make_node(os.path.join(dev, "nvidiactl"), CTL_MINOR)
    record(entry)
    return 0


def main():
    if len(sys.argv) < 2 or sys.argv[-1] != "prestart":
        return 0  # poststart, poststop, or a probe of the program: nothing to do, as the real hook
    return prestart()


if __name__ == "__main__":
    sys.exit(main())
