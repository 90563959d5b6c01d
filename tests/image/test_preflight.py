"""Preflight decisions, driven by tables of drivers, GPUs and requests (pure, no engine)."""

from __future__ import annotations

import sys

import pytest

from kbundle.errors import KbundleError, UsageError
from kbundle.facts import load_tables
from kbundle.image.engine import describe_docker_error
from kbundle.image.preflight import (
    ERROR,
    OK,
    WARN,
    EngineFacts,
    GpuInfo,
    GpuRequest,
    NvmlFacts,
    check_arch,
    check_driver,
    evaluate,
    plan_gpus,
)

TABLES = load_tables()


def nvml(driver: str, *caps: str, driver_cuda: str | None = None) -> NvmlFacts:
    gpus = tuple(GpuInfo(i, f"GPU{i}", f"GPU-{i}", c) for i, c in enumerate(caps or ("8.6",)))
    return NvmlFacts(True, "", driver, driver_cuda, gpus)


GPU_ENGINE = EngineFacts(True, "unix:///var/run/docker.sock", "24.0", ("nvidia", "runc"))
CPU_ENGINE = EngineFacts(True, "unix:///var/run/docker.sock", "20.10", ("io.containerd.runc.v2", "runc"))
NO_NVML = NvmlFacts(False, "nvidia-ml-py not installed")

# driver, env CUDA → level, words the message must carry
DRIVER_CASES = [
    ("418.39", "11.8", ERROR, ["418.39", "11.8", "520.61.05", "--gpus none"]),
    ("418.87.00", "10.1", OK, ["418.87.00"]),
    ("410.48", "10.1", ERROR, ["too old"]),
    ("440.33.01", "10.2", OK, []),
    ("450.80.02", "11.8", WARN, ["minor-version compatibility", "520.61.05"]),  # CUDA 11 minor compat
    ("470.57.02", "11.2", OK, []),
    ("470.57.02", "12.1", ERROR, ["12.1"]),
    ("525.60.13", "12.4", WARN, ["minor-version"]),
    ("535.104.05", "12.2", OK, []),
    ("550.54.15", "12.4", OK, []),
    ("550.54.15", "12.8", WARN, []),
    ("520.61.05", "11.8", OK, []),
    ("520.61.04", "11.8", WARN, []),
    ("570.86.10", "12.7", OK, []),  # a version the table skips is checked against the next one (12.8)
    ("560.35.03", "12.7", WARN, []),
    ("580.65.06", "13.0", OK, []),
    ("575.51.03", "13.0", ERROR, []),  # CUDA 13 has no older minor-compat driver
    ("600.1", "14.0", WARN, ["does not know CUDA 14.0"]),
]


@pytest.mark.parametrize("driver, cuda, level, words", DRIVER_CASES)
def test_driver_table(driver, cuda, level, words):
    finding = check_driver(nvml(driver), cuda, TABLES)
    assert finding.level == level, finding.message
    for word in words:
        assert word in finding.message


# compute capability, env CUDA → level, words
ARCH_CASES = [
    ("8.6", "10.1", WARN, ["sm_86", "newer than CUDA 10.1", "11.1", "PTX"]),  # RTX 3090 under CUDA 10.1
    ("8.6", "11.1", OK, []),
    ("8.6", "11.0", WARN, ["newer"]),
    ("8.0", "11.0", OK, []),
    ("9.0", "11.7", WARN, ["sm_90"]),
    ("9.0", "12.2", OK, []),
    ("8.9", "11.8", OK, []),
    ("12.0", "12.6", WARN, ["12.8"]),
    ("7.5", "10.0", OK, []),
    ("7.0", "10.1", OK, []),
    ("3.5", "12.0", WARN, ["no longer supported", "11.8"]),
    ("3.5", "11.8", OK, []),
    ("6.1", "13.0", WARN, ["no longer supported"]),
    ("3.0", "11.0", WARN, ["last: CUDA 10.2"]),
    ("99.0", "12.0", WARN, ["does not know compute capability"]),
]


@pytest.mark.parametrize("cap, cuda, level, words", ARCH_CASES)
def test_arch_table(cap, cuda, level, words):
    finding = check_arch(GpuInfo(0, "NVIDIA GeForce RTX 3090", "GPU-x", cap), cuda, TABLES)
    assert finding.level == level, finding.message
    for word in words:
        assert word in finding.message


def test_tables_are_ordered_and_sourced():
    # A newer CUDA never needs an older driver: catches typos in the YAML.
    keys = sorted(TABLES.toolkit_driver)
    drivers = [TABLES.toolkit_driver[k] for k in keys]
    assert drivers == sorted(drivers)
    for arch in TABLES.arches.values():
        assert arch.last is None or arch.last >= arch.first
    import yaml

    from kbundle.resources import data_dir

    for name in ("cuda_drivers.yaml", "gpu_arch.yaml"):
        assert yaml.safe_load((data_dir() / name).read_text())["source"]


# --gpus request, engine, nvml → planned GPUs, level of the runtime finding, words
PLAN_CASES = [
    ("auto", CPU_ENGINE, NO_NVML, (), WARN, ["runs on CPU", "no NVIDIA GPU"]),
    ("auto", CPU_ENGINE, nvml("535.1", "8.6"), (), WARN, ["no NVIDIA runtime", "runs on CPU"]),
    ("auto", GPU_ENGINE, nvml("535.1", "8.6", "8.6"), ("0", "1"), OK, []),
    ("all", CPU_ENGINE, NO_NVML, (), ERROR, ["no NVIDIA runtime", "--gpus none"]),
    ("all", GPU_ENGINE, nvml("535.1", "8.0"), ("0",), OK, []),
    ("all", GPU_ENGINE, NO_NVML, ("all",), OK, []),
    ("none", GPU_ENGINE, nvml("535.1", "8.0"), (), OK, ["CPU"]),
    ("0", GPU_ENGINE, nvml("535.1", "8.0"), (), OK, ["CPU"]),
    ("2", GPU_ENGINE, nvml("535.1", "8.0"), (), ERROR, ["has 1 GPU"]),
    ("1", GPU_ENGINE, nvml("535.1", "8.0", "8.0"), ("0",), OK, []),
    ("device=1", GPU_ENGINE, nvml("535.1", "8.0", "8.0"), ("1",), OK, []),
    ("device=0,3", GPU_ENGINE, nvml("535.1", "8.0", "8.0"), (), ERROR, ["no GPU 3"]),
    ("device=GPU-1", GPU_ENGINE, nvml("535.1", "8.0", "8.0"), ("GPU-1",), OK, []),
    ("device=0", CPU_ENGINE, NO_NVML, (), ERROR, ["NVIDIA Container Toolkit"]),
]


@pytest.mark.parametrize("text, engine, facts, gpus, level, words", PLAN_CASES)
def test_gpu_plan_table(text, engine, facts, gpus, level, words):
    plan, findings = plan_gpus(GpuRequest.parse(text), engine, facts)
    assert plan.gpus == gpus
    assert [f.level for f in findings] == [level]
    assert plan.on_gpu == bool(gpus)
    for word in words:
        assert word in findings[0].message


def test_evaluate_refuses_old_driver_only_when_gpus_are_used():
    old = nvml("418.39", "7.5")
    assert evaluate(GPU_ENGINE, old, "11.8", GpuRequest.parse("auto"), TABLES).errors
    assert not evaluate(GPU_ENGINE, old, "11.8", GpuRequest.parse("none"), TABLES).errors
    with pytest.raises(KbundleError, match="too old"):
        evaluate(GPU_ENGINE, old, "11.8", GpuRequest.parse("all"), TABLES).raise_for_errors()


def test_evaluate_warns_for_each_chosen_gpu():
    report = evaluate(GPU_ENGINE, nvml("535.1", "8.6", "7.5"), "10.1", GpuRequest.parse("device=0"), TABLES)
    assert not report.errors
    assert [f.message for f in report.warnings if f.topic == "gpu"][0].startswith("GPU 0")
    assert len([f for f in report.findings if f.topic == "gpu"]) == 1
    data = report.to_dict()
    assert data["ok"] is True and data["gpus"] == ["0"] and data["cuda"] == "10.1"


def test_cpu_env_on_gpu_host_says_gpus_are_unused():
    report = evaluate(GPU_ENGINE, nvml("535.1"), None, GpuRequest.parse("auto"), TABLES)
    assert any("no CUDA" in f.message for f in report.warnings)


@pytest.mark.parametrize("text", ["gpu", "-1", "device=", "all,none", ""])
def test_bad_gpus_values(text):
    if text == "":
        assert GpuRequest.parse(text).mode == "auto"
        return
    with pytest.raises(UsageError, match="--gpus"):
        GpuRequest.parse(text)


@pytest.mark.parametrize(
    "exc, words",
    [
        (PermissionError(13, "Permission denied"), ["permission denied", "docker' group"]),
        (
            Exception(
                "Error while fetching server API version: ('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))"
            ),
            ["cannot reach", "is it running"],
        ),
        (Exception("Connection refused"), ["cannot reach"]),
        (Exception("weird\nsecond line"), ["cannot use", "weird"]),
    ],
)
def test_docker_error_messages_are_one_actionable_line(exc, words):
    message = describe_docker_error(exc, "unix:///x.sock")
    assert "\n" not in message and "unix:///x.sock" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "text, engine, facts, probe",
    [
        ("all", CPU_ENGINE, NO_NVML, True),  # asked for GPUs, host says no: ask the engine itself
        ("device=0", CPU_ENGINE, NO_NVML, True),
        ("auto", CPU_ENGINE, NO_NVML, False),  # no GPU here: nothing to ask
        ("auto", CPU_ENGINE, nvml("535.1", "8.6"), True),  # GPUs here, runtime unknown to the host checks
        ("auto", EngineFacts(True, "tcp://gpu-box:2376", "24.0", ("runc",), local=False), NO_NVML, True),
        ("all", GPU_ENGINE, NO_NVML, False),  # the host checks already say yes
        ("none", CPU_ENGINE, nvml("535.1", "8.6"), False),
    ],
)
def test_when_to_ask_the_engine(text, engine, facts, probe):
    from kbundle.image.preflight import should_probe

    assert should_probe(engine, facts, GpuRequest.parse(text)) is probe


def test_the_engines_answer_overrides_the_host_checks():
    from dataclasses import replace

    refused = replace(
        CPU_ENGINE, gpu_probe=False, gpu_probe_error='could not select device driver "" with capabilities: [[gpu]]'
    )
    report = evaluate(refused, NO_NVML, "12.2", GpuRequest.parse("all"), TABLES)
    assert "could not select device driver" in report.errors[0].message and "--gpus none" in report.errors[0].message
    accepted = replace(CPU_ENGINE, gpu_probe=True)
    report = evaluate(accepted, NO_NVML, "12.2", GpuRequest.parse("all"), TABLES)
    assert not report.errors and report.plan.gpus == ("all",)
    assert any("cannot check the NVIDIA driver" in f.message for f in report.warnings)


def test_unreachable_engine_is_an_error_finding():
    report = evaluate(
        EngineFacts(False, "unix:///x.sock", error="cannot reach the Docker daemon at unix:///x.sock"),
        NO_NVML,
        None,
        GpuRequest.parse("auto"),
        TABLES,
    )
    assert [f.topic for f in report.errors] == ["docker"] and report.to_dict()["ok"] is False


class FakeNvml:
    """Stands in for nvidia-ml-py's module on a machine without GPUs (only its reading is tested)."""

    def __init__(self, fail_init: bool = False):
        self.fail_init = fail_init
        self.shut = False

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shut = True

    def nvmlSystemGetDriverVersion(self):
        return b"418.87.00"  # old bindings return bytes

    def nvmlSystemGetCudaDriverVersion(self):
        return 10010

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return (8, 6) if h == 0 else (7, 5)

    def nvmlDeviceGetName(self, h):
        return "NVIDIA GeForce RTX 3090" if h == 0 else "Tesla T4"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h:04d}"


def test_nvml_reading_and_the_decision_it_feeds(monkeypatch):
    from kbundle.image.preflight import probe_nvml

    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    facts = probe_nvml()
    assert fake.shut
    assert (facts.available, facts.driver_version, facts.driver_cuda) == (True, "418.87.00", "10.1")
    assert [(g.index, g.capability, g.uuid) for g in facts.gpus] == [(0, "8.6", "GPU-0000"), (1, "7.5", "GPU-0001")]
    report = evaluate(GPU_ENGINE, facts, "10.1", GpuRequest.parse("auto"), TABLES)
    assert not report.errors and report.plan.gpus == ("0", "1")
    assert [f.message.split(" (")[0] for f in report.warnings] == ["GPU 0"]  # the 3090 under CUDA 10.1
    assert (
        "supports CUDA up to 10.1"
        in evaluate(GPU_ENGINE, facts, "11.8", GpuRequest.parse("all"), TABLES).errors[0].message
    )


def test_nvml_that_cannot_start_is_no_gpu(monkeypatch):
    from kbundle.image.preflight import probe_nvml

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))
    facts = probe_nvml()
    assert not facts.available and "Shared Library Not Found" in facts.reason
