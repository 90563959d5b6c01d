"""A GPU kernel's container on Podman: created through Podman's own API (libpod), with CDI names.

kbundle speaks Docker's API, which Podman serves too, but Podman's Docker-compatible API (4.x)
drops a Docker GPU request without a word (the kernel would run on CPU while the user believes
otherwise) and takes a CDI name as `Devices` for a host path. Podman passes GPUs only by CDI
name (`nvidia.com/gpu=0`, `=all`, from NVIDIA's spec in /etc/cdi or /var/run/cdi), and its own
API resolves them. So for a GPU kernel on Podman the launcher creates the container here, from
the same plan (kernel/launch_plan.py) and lockdown (image/policy.py), and drives it through the
Docker-compatible API from then on (attach, start, wait, stop): the container is the same.

Rootless Podman (a user's own `podman system service`; the plan's `rootless`): the kernel gets
`keep-id` (image/userns.py says why), in the Docker-compatible API's words from the launcher and
as `userns` in libpod's here, so that it is the user inside and their notebook folder stays theirs.

GPUs on rootless Podman: a user namespace cannot make device nodes, so the runtime bind-mounts
each CDI node; runc binds it from its path *in the container* (`/dev/nvidia0`), which NVIDIA's
generated spec makes the host's own. A spec whose nodes live elsewhere fails at start, and the
launcher says so in one line (`device_node_message`), never running the kernel on CPU instead.

`spec_generator` is pure (table-tested); `create` makes the one call.
"""

from __future__ import annotations

import json
from typing import Any

from kbundle.image import userns

LIBPOD_VERSION = "v4.0.0"  # libpod's API of Podman 4 (and 5), under the same socket
CDI_KIND = "nvidia.com/gpu"
KEEP_ID = userns.KEEP_ID  # rootless Podman's user namespace in which the user stays themselves


def device_node_message(gpus: str) -> str:
    """The one line for a rootless start whose CDI device nodes could not be bound."""
    return (
        f"this kernel asks for GPUs ({gpus}) but rootless Podman could not bind the CDI spec's device nodes "
        "(a user namespace can only bind a node from the same path on the host, as NVIDIA's generated spec "
        "has it: `nvidia-ctk cdi generate`); run it on rootful Podman, or re-register it with "
        "`kbundle run --gpus none`"
    )


def cdi_devices(gpus: str) -> list[str]:
    """The launcher's `--gpus` (`all`, `0,1`, `device=0`) as CDI names; [] for none."""
    gpus = (gpus or "none").strip()
    if gpus == "none":
        return []
    ids = ["all"] if gpus == "all" else [g for g in gpus.removeprefix("device=").split(",") if g]
    return [f"{CDI_KIND}={i}" for i in ids]


def spec_generator(plan, binds: dict[str, dict[str, str]], environment: dict[str, str]) -> dict[str, Any]:
    """libpod's SpecGenerator for the kernel's container: everything the Docker-compatible create
    says (launcher.py `_create`), the lockdown in libpod's words (image/policy.py
    `libpod_options`), plus the GPUs as CDI devices (pure). `environment`: the plan's own."""
    spec: dict[str, Any] = plan.lockdown.libpod_options(environment)
    spec["mounts"] = [
        {"type": "bind", "source": src, "destination": b["bind"], "options": ["rbind", b["mode"]]}
        for src, b in binds.items()
    ] + spec["mounts"]
    spec.update(
        name=plan.name,
        image=plan.image,
        command=list(plan.command),
        user=plan.user,
        groups=list(plan.group_add),
        work_dir=plan.working_dir,
        labels=dict(plan.labels),
        stdin=True,
        terminal=False,
        init=True,
        remove=True,
        devices=[{"path": name} for name in cdi_devices(plan.gpus)],
    )
    if plan.rootless:
        spec["userns"] = {"nsmode": KEEP_ID}
    if plan.ports:
        spec["portmappings"] = [
            {"host_ip": "127.0.0.1", "host_port": p, "container_port": p, "protocol": "tcp"} for p in plan.ports
        ]
    return spec


def create(api, plan, binds: dict[str, dict[str, str]], environment: dict[str, str]) -> str:
    """Create the kernel's container through libpod; its id. Podman's refusal (an unresolvable CDI
    name: no spec for that GPU) is raised as docker's APIError, as the Docker-compatible create's."""
    url = f"{api.base_url}/{LIBPOD_VERSION}/libpod/containers/create"
    body = json.dumps(spec_generator(plan, binds, environment))
    response = api.post(url, data=body, headers={"Content-Type": "application/json"})
    api._raise_for_status(response)
    return response.json()["Id"]
