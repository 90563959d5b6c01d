"""`run --native` decided by data, without an engine: the consent's lines, the kernelspec's env,
the host preflight's GPU table, the wheels' .pth files, and what --native refuses."""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import pytest

from kbundle.errors import KbundleError, UsageError
from kbundle.flows.review import (
    NativeReview,
    consent_native,
    consent_pth,
    native_builds,
    native_review_lines,
    pth_lines,
)
from kbundle.image import env as envmod
from kbundle.image import native
from kbundle.image.preflight import (
    ERROR,
    OK,
    WARN,
    GpuInfo,
    GpuPlan,
    GpuRequest,
    NvmlFacts,
    evaluate_native,
    plan_native_gpus,
    visible_devices,
)
from kbundle.kernel.spec import KernelRequest, build_spec

PREFIX = "/home/me/.cache/kbundle/native/0123456789abcdef"


# ----------------------------------------------------------------- the consent


def _review(**changes) -> NativeReview:
    base = dict(
        sender="unsigned: nobody vouches for this bundle",
        prefix=PREFIX,
        hosts=("127.0.0.1:18765",),
        conda="32 package(s), locked (31.1 MiB to download at most) (the bundle's lock)",
        pip=0,
    )
    base.update(changes)
    return NativeReview(**base)


@pytest.mark.parametrize(
    "changes, present, absent",
    [
        # Always: it runs as you, outside any container, and where it goes.
        (
            {},
            ["ON THIS MACHINE, AS YOU, OUTSIDE ANY CONTAINER", "your files", PREFIX, "127.0.0.1:18765"],
            ["\npip ", ".pth"],
        ),
        # pip lines: the env's own Python runs here; .pth files are named before they are installed.
        (
            {"pip": 2},
            ["pip         2 requirement(s)", "runs on this machine as you", ".pth        a .pth file"],
            ["build "],
        ),
        # A VCS or sdist line: its build code runs here, named.
        (
            {"pip": 1, "builds": ("git+https://example.org/x.git@v1", "https://example.org/y-1.0.tar.gz")},
            [
                "build       git+https://example.org/x.git@v1: its build code runs on this machine",
                "build       https://example.org/y-1.0.tar.gz: its build code runs on this machine",
            ],
            [],
        ),
        ({"disk": "about 96.0 MiB for the environment"}, ["disk        about 96.0 MiB for the environment"], []),
        ({"unusual": ("the environment is not locked",)}, ["unusual     the environment is not locked"], []),
        # Bundle text is escaped: no terminal control reaches the screen.
        ({"pip": 1, "builds": ("git+https://e.org/x\x1b[2K.git",)}, ["\\x1b[2K"], ["\x1b"]),
    ],
)
def test_native_review_lines(changes, present, absent):
    text = "\n".join(native_review_lines(_review(**changes)))
    for needle in present:
        assert needle in text, text
    for needle in absent:
        assert needle not in text, text


@pytest.mark.parametrize(
    "pins, builds",
    [
        (["kbrange==1.5 --hash=sha256:" + "a" * 64], ()),
        (["git+https://example.org/x.git@v1"], ("git+https://example.org/x.git@v1",)),
        (["y @ https://example.org/y-1.0.tar.gz"], ("y @ https://example.org/y-1.0.tar.gz",)),
        (["z @ https://example.org/z-1.0-py3-none-any.whl"], ()),  # a wheel: nothing built
        (["numpy>=1.20"], ()),
    ],
)
def test_native_builds_names_what_runs_build_code(pins, builds):
    assert native_builds(pins) == builds


def test_native_consent_without_a_terminal_says_yes_and_runs_as_you():
    with pytest.raises(KbundleError, match="--yes") as info:
        consent_native(None, yes=False, review=_review(), interactive=False)
    assert "as you, outside any container" in str(info.value)


@pytest.mark.parametrize("answer", [True, False])
def test_native_consent_on_a_terminal_shows_the_review_then_asks(answer):
    from rich.console import Console

    out = io.StringIO()
    asked = []

    def ask(console, question):
        asked.append(question)
        return answer

    console = Console(file=out, force_terminal=False, width=400)
    if answer:
        consent_native(console, yes=False, review=_review(pip=1), ask=ask, interactive=True)
    else:
        with pytest.raises(KbundleError, match="declined"):
            consent_native(console, yes=False, review=_review(pip=1), ask=ask, interactive=True)
    assert asked == ["Install it on this machine and register the kernel? [y/N] "]
    assert "OUTSIDE ANY CONTAINER" in out.getvalue() and ".pth" in out.getvalue()


def test_yes_asks_nothing():
    consent_native(None, yes=True, review=_review(), ask=lambda c, q: pytest.fail("asked"), interactive=False)


def _wheel(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name, "import os\n" if name.endswith(".pth") else "")
    return path


def test_pth_files_are_read_from_the_wheels_file_lists(tmp_path):
    from kbundle.image.wheels import pth_files

    hook = _wheel(
        tmp_path / "hook-1.0-py3-none-any.whl", ["hook/__init__.py", "hook-init.pth", "hook-1.0.dist-info/RECORD"]
    )
    data = _wheel(tmp_path / "deep-1.0-py3-none-any.whl", ["deep-1.0.data/purelib/deep.pth", "deep/x.pth"])
    plain = _wheel(tmp_path / "plain-1.0-py3-none-any.whl", ["plain/__init__.py", "plain/notes.pth.txt"])
    assert pth_files([hook, data, plain]) == [
        (hook.name, "hook-init.pth"),
        (data.name, "deep.pth"),
    ]  # deep/x.pth: never read
    (tmp_path / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(KbundleError, match="not a readable wheel"):
        pth_files([tmp_path / "broken-1.0-py3-none-any.whl"])


def test_pth_lines_name_each_wheel_and_file():
    lines = pth_lines([("a-1.whl", "a.pth"), ("a-1.whl", "b.pth"), ("c-2.whl", "c\x1b.pth")])
    assert lines[0].startswith("a-1.whl installs a.pth, b.pth: it runs at every start of the environment's Python")
    assert "\\x1b" in lines[1] and "\x1b" not in lines[1]


def test_pth_consent_warns_with_yes_asks_without_and_a_no_stops():
    found = [("hook-1.0-py3-none-any.whl", "hook.pth")]
    assert consent_pth(None, yes=False, found=[], interactive=False) == []  # nothing to say
    assert consent_pth(None, yes=True, found=found) == pth_lines(found)  # --yes: warnings
    with pytest.raises(KbundleError, match="hook.pth"):
        consent_pth(None, yes=False, found=found, interactive=False)
    from rich.console import Console

    console = Console(file=io.StringIO())
    with pytest.raises(KbundleError, match="declined the wheels' .pth files"):
        consent_pth(console, yes=False, found=found, ask=lambda c, q: False, interactive=True)
    assert consent_pth(console, yes=False, found=found, ask=lambda c, q: True, interactive=True) == []


# ----------------------------------------------------------------- the kernelspec


@pytest.mark.parametrize(
    "env_libs, nvidia, expected_libs",
    [
        (False, [], None),  # nothing of CUDA in the env: LD_LIBRARY_PATH untouched
        (True, [], f"{PREFIX}/lib"),  # a conda CUDA runtime (cuda_env_libs)
        (
            False,
            [f"{PREFIX}/lib/python3.11/site-packages/nvidia/cublas/lib"],
            f"{PREFIX}/lib/python3.11/site-packages/nvidia/cublas/lib",
        ),
        (
            True,
            [f"{PREFIX}/lib/python3.11/site-packages/nvidia/cudnn/lib"],
            f"{PREFIX}/lib:{PREFIX}/lib/python3.11/site-packages/nvidia/cudnn/lib",
        ),
    ],
)
def test_activation_is_the_images(env_libs, nvidia, expected_libs):
    env = native.activation(Path(PREFIX), env_libs, [Path(p) for p in nvidia])
    assert env["PATH"] == f"{PREFIX}/bin:${{PATH}}"  # Jupyter fills ${PATH} in when the kernel starts
    assert env["CONDA_PREFIX"] == PREFIX
    assert env.get("LD_LIBRARY_PATH") == expected_libs
    # The starting process's PYTHONPATH/PYTHONHOME (emptied: read as unset) and the user's site do not leak in.
    assert (env["PYTHONPATH"], env["PYTHONHOME"], env["PYTHONNOUSERSITE"]) == ("", "", "1")


def test_nvidia_lib_dirs_are_found_like_the_activation_script(tmp_path):
    for part in ("cublas", "cudnn"):
        (tmp_path / "lib/python3.11/site-packages/nvidia" / part / "lib").mkdir(parents=True)
    (tmp_path / "lib/python3.11/site-packages/nvidia/empty").mkdir()
    assert [p.parent.name for p in native.nvidia_lib_dirs(tmp_path)] == ["cublas", "cudnn"]


def test_the_native_kernelspec_is_a_plain_ipykernel_of_the_prefix(tmp_path):
    env = native.activation(Path(PREFIX), True) | {"CUDA_VISIBLE_DEVICES": "-1"}
    request = KernelRequest(
        "kbundle-demo", "demo", "", str(tmp_path), [], "ab" * 32, {"cuda": "12.1"}, native=PREFIX, env=env
    )
    spec = build_spec(request)
    assert spec["argv"] == [f"{PREFIX}/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert spec["display_name"] == "demo (kbundle, native)"
    assert spec["env"]["PATH"].startswith(f"{PREFIX}/bin:") and spec["env"]["CONDA_PREFIX"] == PREFIX
    assert spec["env"]["LD_LIBRARY_PATH"] == f"{PREFIX}/lib" and spec["env"]["CUDA_VISIBLE_DEVICES"] == "-1"
    assert spec["env"]["KBUNDLE_BUNDLE"] == "demo"
    assert spec["metadata"]["kbundle"] == {
        "cuda": "12.1",
        "native": PREFIX,
        "bundle_hash": "ab" * 32,
        "gpus": [],
        "workdir": str(tmp_path),
    }
    with pytest.raises(UsageError, match="absolute"):
        build_spec(replace(request, native="relative/prefix"))


def test_a_native_kernel_lists_as_native_with_its_prefixs_health(tmp_path, monkeypatch):
    from kbundle.commands.kernels import kernel_health
    from kbundle.kernel.spec import install_kernelspec, list_kernelspecs

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "data"))
    prefix = tmp_path / "native" / "0123456789abcdef"
    request = KernelRequest("kbundle-n", "n", "", str(tmp_path), [], "ab" * 32, {}, native=str(prefix))
    install_kernelspec(request)
    (record,) = list_kernelspecs()
    assert record.native == str(prefix) and record.image == "" and record.network == "host"
    assert kernel_health(record, None) == "prefix missing"
    (prefix / "conda-meta").mkdir(parents=True)
    assert kernel_health(record, None) == "prefix incomplete"
    native.write_stamp(prefix, bundle_hash="ab" * 32)
    assert kernel_health(record, None) == "ok"  # no engine needed


# ----------------------------------------------------------------- preflight on the host


def _gpu(i: int, cap: str = "8.6") -> GpuInfo:
    return GpuInfo(i, "NVIDIA A10", f"GPU-{i}", cap)


NO_NVML = NvmlFacts(False, "nvidia-ml-py is not installed")
TWO = NvmlFacts(True, "", "535.104.05", "12.2", (_gpu(0), _gpu(1)))
OLD = NvmlFacts(True, "", "450.80.02", "11.0", (_gpu(0),))


@pytest.mark.parametrize(
    "request_text, nvml, gpus, level, words",
    [
        ("auto", NO_NVML, (), WARN, "no NVIDIA GPU found (nvidia-ml-py is not installed): the kernel runs on CPU"),
        ("none", TWO, (), OK, "GPUs off"),
        ("auto", TWO, ("0", "1"), OK, "straight from the driver"),
        ("all", NO_NVML, (), ERROR, "--gpus none"),
        ("1", TWO, ("0",), OK, "GPUs 0"),
        ("3", TWO, (), ERROR, "has 2 GPU(s)"),
        ("device=1", TWO, ("1",), OK, "GPUs 1"),
        ("device=7", TWO, (), ERROR, "no GPU 7"),
    ],
)
def test_native_gpu_plan(request_text, nvml, gpus, level, words, monkeypatch):
    from kbundle.image import preflight

    monkeypatch.setattr(preflight, "_device_nodes", lambda: False)
    plan, findings = plan_native_gpus(GpuRequest.parse(request_text), nvml)
    assert plan.gpus == gpus
    assert findings[0].level == level and words in findings[0].message, findings


@pytest.mark.parametrize(
    "request_text, gpus, expected",
    [
        ("none", (), "-1"),
        ("auto", (), None),
        ("auto", ("0", "1"), None),
        ("all", ("0",), None),
        ("2", ("0", "1"), "0,1"),
        ("device=GPU-1", ("GPU-1",), "GPU-1"),
    ],
)
def test_visible_devices(request_text, gpus, expected):
    assert visible_devices(GpuRequest.parse(request_text), GpuPlan(gpus)) == expected


def test_native_preflight_checks_the_driver_and_arch_from_nvml(monkeypatch):
    from kbundle.image import preflight

    monkeypatch.setattr(preflight, "_device_nodes", lambda: False)
    refused = evaluate_native(OLD, "12.1", GpuRequest.parse("auto"))
    assert [f.topic for f in refused.errors] == ["driver"] and "too old" in refused.errors[0].message
    fine = evaluate_native(TWO, "12.1", GpuRequest.parse("auto"))
    assert not fine.errors and [f.topic for f in fine.findings].count("gpu") == 2
    newer = evaluate_native(NvmlFacts(True, "", "560.1", "12.6", (_gpu(0, "12.0"),)), "11.8", GpuRequest.parse("auto"))
    assert any(f.topic == "gpu" and f.level == WARN for f in newer.findings)
    cpu = evaluate_native(NO_NVML, "12.1", GpuRequest.parse("auto"))
    assert not cpu.errors and cpu.plan.gpus == () and "runs on CPU" in cpu.warnings[0].message
    assert cpu.to_dict()["docker"]["reachable"] is False  # no engine, none needed


# ----------------------------------------------------------------- what --native refuses, and its prefix


@dataclass(frozen=True)
class _Options:
    native: bool = True
    slurm: Any = None
    image: Optional[str] = None
    base_image: Optional[str] = None
    use_bundled_dockerfile: bool = False
    network: str = "bridge"
    prefix_root: Optional[Path] = None


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"slurm": object()}, "--native with --slurm needs --prefix-root DIR"),
        ({"image": "r/x@sha256:" + "a" * 64}, "--image does not apply"),
        ({"base_image": "debian"}, "--base-image does not apply"),
        ({"use_bundled_dockerfile": True}, "--use-bundled-dockerfile"),
        ({"network": "host"}, "--network host"),
        ({"native": False, "prefix_root": Path("/shared")}, "--prefix-root goes with --native"),
    ],
)
def test_what_native_refuses(changes, words):
    from kbundle.flows.native import check_options

    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace("+", r"\+")):
        check_options(replace(_Options(), **changes))
    check_options(_Options())  # plain --native is fine
    check_options(_Options(slurm=object(), prefix_root=Path("/shared")))  # and on a shared root, for Slurm


def test_the_prefix_is_keyed_by_the_bundle_identity_and_complete_only_with_its_stamp(tmp_path, monkeypatch):
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path / "cache"))
    root = native.native_root()
    assert root == tmp_path / "cache" / "native"
    assert native.native_root(Path("rel")) == Path.cwd() / "rel"
    prefix = native.prefix_for("0123456789ABCDEF" + "0" * 48, root)
    assert prefix == root / "0123456789abcdef"
    with pytest.raises(KbundleError):
        native.key_of("../../etc")
    (prefix / "conda-meta").mkdir(parents=True)
    assert not native.is_complete(prefix) and native.is_ours(prefix)  # half-made, in a native root
    native.write_stamp(prefix, bundle_hash="x", packages=3)
    assert native.is_complete(prefix) and json.loads((prefix / native.STAMP).read_text())["packages"] == 3
    with native.locked(prefix):
        assert native.busy(prefix)
    assert not native.busy(prefix)
    native.remove(prefix)
    assert not prefix.exists()
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    assert not native.is_ours(elsewhere)  # no stamp, not in a native root: never removed


def test_described_virtual_packages():
    assert native.described(["__glibc=2.36=0", "__cuda=12.2=0"]) == "glibc 2.36, CUDA 12.2"
    assert native.described(["__glibc=2.28=0"]) == "glibc 2.28, CUDA none"


def test_host_virtual_packages_are_strings_rattler_reads_back(monkeypatch):
    from kbundle.solve import virtual_packages

    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.2")
    found = native.host_virtual_packages()
    assert any(v.startswith("__glibc=") for v in found) and "__cuda=12.2=0" in found
    assert len(virtual_packages(found)) == len(found)


def test_gc_plans_unused_native_prefixes_and_skips_used_busy_and_foreign(tmp_path):
    from kbundle.kernel import gc as G

    root = tmp_path / "native"
    used, unused, half, busy = (root / f"{c * 16}" for c in "abcd")
    for prefix in (used, unused, busy):
        (prefix / "conda-meta").mkdir(parents=True)
        native.write_stamp(prefix, bundle_hash=prefix.name * 4, name="demo")
    (half / "lib").mkdir(parents=True)
    (root / "not-ours").mkdir()

    @dataclass
    class K:
        native: str

    with native.locked(busy):
        items = G._unused_native([K(str(used))], root)
    assert {Path(i.ref).name: i.reason for i in items} == {
        unused.name: f"native environment of demo ({(unused.name * 4)[:12]}), which no registered kernel uses",
        half.name: "unfinished native environment: no run is installing it",
    }
    result = G.apply_gc(G.GcPlan(items), None)
    assert not result.failed and not unused.exists() and not half.exists() and used.exists() and busy.exists()
    assert os.path.isdir(root / "not-ours")


class _Record:
    """What dependency_closure reads of a rattler record: its normalised name and its depends."""

    def __init__(self, name: str, *depends: str):
        self.name = type("Name", (), {"normalized": name})()
        self.depends = list(depends)


@pytest.mark.parametrize(
    "records, roots, expected",
    [
        (
            [_Record("python", "openssl >=3", "__glibc >=2.17"), _Record("openssl"), _Record("numpy")],
            ["python"],
            {"python", "openssl"},
        ),  # a virtual package is no record; numpy is not needed
        (
            [_Record("pip", "python >=3.8"), _Record("python", "libffi"), _Record("libffi")],
            ["pip"],
            {"pip", "python", "libffi"},
        ),
        ([_Record("python"), _Record("kbdep", "python")], ["python", "pip", "kbdep"], {"python", "kbdep"}),
        ([_Record("a", "b"), _Record("b", "a")], ["a"], {"a", "b"}),  # a cycle ends
        (
            [_Record("typing-extensions"), _Record("x", "typing-extensions[version='>=4']")],
            ["x"],
            {"x", "typing-extensions"},
        ),
    ],
)
def test_what_the_early_link_needs_is_the_roots_and_their_dependencies(records, roots, expected):
    """run --native links python, pip and what they need first, so that pip installs beside the rest."""
    assert envmod.dependency_closure(records, roots) == expected
