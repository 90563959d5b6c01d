"""The Slurm kernel's pure decisions: srun's argv, the agent's request, queue states, the node's argv."""

from __future__ import annotations

import json
import socket

import pytest

from kbundle.kernel import node_agent, slurm
from kbundle.kernel.launcher import PORT_KEYS
from kbundle.kernel.spec import KernelRequest, build_spec, slurm_kernel_name

INFO = {
    "shell_port": 50001,
    "iopub_port": 50002,
    "stdin_port": 50003,
    "control_port": 50004,
    "hb_port": 50005,
    "ip": "127.0.0.1",
    "key": "s3cr3t-key-0123456789",
    "transport": "tcp",
    "signature_scheme": "hmac-sha256",
}


@pytest.mark.parametrize(
    "options, expected",
    [
        (slurm.SlurmOptions(), []),
        (slurm.SlurmOptions(partition="gpu"), ["--partition=gpu"]),
        (
            slurm.SlurmOptions(partition="gpu", gres="gpu:1", time="2:00:00", account="lab"),
            ["--partition=gpu", "--gres=gpu:1", "--time=2:00:00", "--account=lab"],
        ),
        (slurm.SlurmOptions(extra=("--qos=short", "--mem=8G")), ["--qos=short", "--mem=8G"]),
    ],
)
def test_srun_argv_carries_the_options_and_no_secret(options, expected):
    argv = slurm.srun_argv(options, "kbundle-abc", "print(1)")
    assert argv[:2] == ["srun", "--job-name=kbundle-abc"]
    assert argv[-4:] == ["python3", "-u", "-c", "print(1)"]
    middle = argv[2:-4]
    assert [a for a in middle if a in expected] == expected
    assert "--ntasks=1" in middle and "--nodes=1" in middle


def test_the_key_goes_only_in_the_stdin_request():
    options = slurm.SlurmOptions(partition="debug", login_address="10.1.2.3")
    argv = slurm.srun_argv(options, slurm.job_name("/tmp/kernel-1.json"), slurm.agent_script())
    assert not any(INFO["key"] in a for a in argv)
    request = json.loads(slurm.node_request("r@sha256:" + "a" * 64, "h" * 64, INFO, options, name="n"))
    assert request["connection"]["key"] == INFO["key"]
    assert "ip" not in request["connection"]  # the node decides where the kernel binds
    assert request["login"] == "10.1.2.3"
    assert request["label"] == "org.kbundle.content-hash"


def test_job_names_are_per_connection_file_and_stable():
    assert slurm.job_name("/tmp/a.json") == slurm.job_name("/tmp/a.json")
    assert slurm.job_name("/tmp/a.json") != slurm.job_name("/tmp/b.json")
    assert slurm.job_name("/tmp/a.json").startswith("kbundle-")


@pytest.mark.parametrize(
    "output, phrase",
    [
        ("", "not in the queue yet"),
        ("42 PENDING Resources\n", "job 42 PENDING (Resources)"),
        ("42 PENDING Priority\n", "job 42 PENDING (Priority)"),
        ("43 RUNNING None\n", "job 43 RUNNING"),
        ("44 CONFIGURING\n", "job 44 CONFIGURING"),
        (
            "45 PENDING ReqNodeNotAvail, Reserved for maintenance\n",
            "job 45 PENDING (ReqNodeNotAvail, Reserved for maintenance)",
        ),
    ],
)
def test_queue_state(output, phrase):
    assert slurm.queue_state(output) == phrase


@pytest.mark.parametrize(
    "shown, host",
    [
        ("SlurmctldHost[0]       = head\n", "head"),
        ("ClusterName = x\nSlurmctldHost[0]       = head(10.0.0.5)\nSlurmctldHost[1] = b\n", "10.0.0.5"),
        ("nothing here", ""),
    ],
)
def test_controller_host(shown, host):
    assert slurm.controller_host(shown) == host


def test_login_address_honours_the_variable():
    assert slurm.login_address({"KBUNDLE_SLURM_LOGIN_ADDRESS": "192.0.2.7"}) == "192.0.2.7"


def test_ready_line_round_trip():
    line = node_agent.READY + json.dumps({"address": "127.0.0.1", "ports": {"shell_port": 1, "hb_port": 2}})
    assert slurm.parse_ready(line) == ("127.0.0.1", {"shell_port": 1, "hb_port": 2})
    assert slurm.parse_ready("some kernel log line") is None
    assert slurm.READY == node_agent.READY and slurm.ERROR == node_agent.ERROR


def test_options_recorded_in_the_kernelspec_parse_back():
    from kbundle.kernel.launcher import parse_args

    options = slurm.SlurmOptions(partition="gpu", gres="gpu:2", extra=("--qos=long",), start_timeout=60)
    args = parse_args(["--image", "x@sha256:" + "b" * 64, *options.argv(), "-f", "c.json"])
    assert args.slurm and args.partition == "gpu" and args.gres == "gpu:2"
    assert args.slurm_arg == ["--qos=long"] and args.start_timeout == 60
    assert args.login_address == "127.0.0.1" and args.engine == "auto"


def test_slurm_kernelspec(tmp_path):
    request = KernelRequest(
        slurm_kernel_name("kbundle-demo"),
        "demo",
        "127.0.0.1:5000/lab/demo@sha256:" + "c" * 64,
        str(tmp_path),
        [],
        "h" * 64,
        slurm=slurm.SlurmOptions(partition="debug"),
    )
    spec = build_spec(request, launcher=tmp_path / "kbundle-kernel")
    assert spec["display_name"] == "demo (kbundle, Slurm)"
    assert spec["argv"][-2:] == ["-f", "{connection_file}"]
    assert "--slurm" in spec["argv"] and "--partition" in spec["argv"]
    assert spec["argv"][spec["argv"].index("--content-hash") + 1] == "h" * 64
    assert spec["metadata"]["kbundle"]["slurm"]["partition"] == "debug"
    assert spec["env"]["KBUNDLE_BUNDLE"] == "demo"
    assert slurm_kernel_name("kbundle-demo") == "kbundle-demo-slurm" == slurm_kernel_name("kbundle-demo-slurm")


# ---------------------------------------------------------------- the node agent


def test_route_source_of_loopback_is_loopback():
    assert node_agent.route_source("127.0.0.1") == "127.0.0.1"


def test_free_ports_keeps_free_wanted_ports_and_moves_taken_ones():
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    taken = held.getsockname()[1]
    try:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()
        wanted = dict.fromkeys(PORT_KEYS, 0) | {"shell_port": taken, "hb_port": free}
        chosen = node_agent.free_ports("127.0.0.1", wanted)
    finally:
        held.close()
    assert set(chosen) == set(PORT_KEYS)
    assert chosen["shell_port"] != taken
    assert chosen["hb_port"] == free
    assert len(set(chosen.values())) == 5


@pytest.mark.parametrize(
    "engine, environ, expected",
    [
        ("/usr/bin/docker", {}, []),
        ("/usr/bin/docker", {"SLURM_STEP_GPUS": "0,1"}, ["--gpus", '"device=0,1","capabilities=gpu,compute,utility"']),
        ("/usr/bin/docker", {"SLURM_JOB_GPUS": "3"}, ["--gpus", '"device=3","capabilities=gpu,compute,utility"']),
        (
            "/usr/bin/podman",
            {"SLURM_STEP_GPUS": "0,1"},
            ["--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=1"],
        ),
    ],
)
def test_gpu_arguments(engine, environ, expected):
    assert node_agent.gpu_arguments(engine, environ) == expected


def test_container_command_is_unprivileged_and_keyless(tmp_path):
    request = {
        "name": "kbundle-abc",
        "image": "r@sha256:" + "d" * 64,
        "shim": "print(1)",
        "mounts": [str(tmp_path), "/no/such/folder"],
        "working_dir": str(tmp_path),
        "labels": {"org.kbundle.kernel": "1"},
        "environment": {"KBUNDLE_BANNER_IMAGE": "r"},
    }
    cmd = node_agent.container_command("/usr/bin/docker", request, "127.0.0.1", {})
    joined = " ".join(cmd)
    assert cmd[:5] == ["/usr/bin/docker", "run", "--rm", "-i", "--init"]
    assert "--cap-drop ALL" in joined and "--security-opt no-new-privileges" in joined
    assert "--network host" in joined
    assert f"-v {tmp_path}:{tmp_path}" in joined and "/no/such/folder" not in joined
    assert cmd[cmd.index("-w") + 1] == str(tmp_path)
    assert cmd[-4:] == [request["image"], "python", "-c", "print(1)"]
    assert "--privileged" not in cmd and "key" not in joined
