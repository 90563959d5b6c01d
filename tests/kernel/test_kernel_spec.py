"""kbundle's kernelspecs: install, list and remove through jupyter_client, and VS Code's rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kbundle.errors import KbundleError, UsageError
from kbundle.kernel.spec import (
    LOGO_FILES,
    KernelRequest,
    build_spec,
    install_kernelspec,
    launcher_path,
    list_kernelspecs,
    remove_kernelspec,
    vscode_problems,
)


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "extra"))
    return tmp_path / "data"


def test_install_writes_a_user_spec_jupyter_client_finds(data_dir, tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    monkeypatch.delenv("DOCKER_HOST", raising=False)  # the engine is recorded only when it was named

    path = install_kernelspec(
        KernelRequest(
            "kbundle-demo",
            "demo",
            "kbundle/demo:abc",
            str(tmp_path),
            ["0", "1"],
            "sha256:42",
            extra_metadata={"cuda": "12.1"},
        )
    )
    assert path == data_dir / "kernels" / "kbundle-demo"
    spec = KernelSpecManager().get_kernel_spec("kbundle-demo")
    assert spec.display_name == "demo (kbundle)"
    assert spec.language == "python" and spec.interrupt_mode == "signal"
    assert spec.argv[0] == str(launcher_path()) and os.path.isabs(spec.argv[0])
    assert spec.argv[-2:] == ["-f", "{connection_file}"]
    assert spec.argv[spec.argv.index("--gpus") + 1] == "0,1"
    assert spec.metadata["kbundle"] == {
        "image": "kbundle/demo:abc",
        "bundle_hash": "sha256:42",
        "gpus": ["0", "1"],
        "workdir": str(tmp_path),
        "network": "bridge",
        "cuda": "12.1",
    }
    assert "kernel_provisioner" not in spec.metadata
    assert spec.env == {"KBUNDLE_BUNDLE": "demo", "KBUNDLE_CUDA": "12.1"}  # for the kernel's banner
    assert sorted(p.name for p in path.iterdir()) == sorted(["kernel.json", *LOGO_FILES])  # no temp file left


def test_display_name_is_not_suffixed_twice(tmp_path):
    spec = build_spec(
        KernelRequest("k", "demo (kbundle)", "img", str(tmp_path), [], "h"), launcher=Path("/x/kbundle-kernel")
    )
    assert spec["display_name"] == "demo (kbundle)"


def test_list_shows_only_kbundle_kernels_across_jupyter_path(data_dir, tmp_path):
    install_kernelspec(KernelRequest("kbundle-b", "b", "img:b", str(tmp_path), [], "hb"))
    other = tmp_path / "extra" / "kernels" / "plain"
    other.mkdir(parents=True)
    (other / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Plain",
                "language": "python",
            }
        )
    )
    extra = tmp_path / "extra" / "kernels" / "kbundle-a"
    extra.mkdir(parents=True)
    spec = build_spec(KernelRequest("kbundle-a", "a", "img:a", str(tmp_path), ["all"], "ha"))
    (extra / "kernel.json").write_text(json.dumps(spec))
    records = list_kernelspecs()
    assert [(r.name, r.image, r.gpus) for r in records] == [("kbundle-a", "img:a", ["all"]), ("kbundle-b", "img:b", [])]
    assert records[1].to_dict()["resource_dir"] == str(data_dir / "kernels" / "kbundle-b")


def test_remove_only_kbundle_kernels(data_dir, tmp_path):
    path = install_kernelspec(KernelRequest("kbundle-gone", "gone", "img", str(tmp_path), [], "h"))
    assert remove_kernelspec("kbundle-gone") == path and not path.exists()
    with pytest.raises(KbundleError, match="no kbundle kernel named 'kbundle-gone'"):
        remove_kernelspec("kbundle-gone")
    plain = data_dir / "kernels" / "python3"
    plain.mkdir(parents=True)
    (plain / "kernel.json").write_text(json.dumps({"argv": ["python"], "display_name": "P", "language": "python"}))
    with pytest.raises(KbundleError):
        remove_kernelspec("python3")
    assert plain.exists()


def test_never_overwrites_a_kernel_kbundle_did_not_install(data_dir, tmp_path):
    plain = data_dir / "kernels" / "mine"
    plain.mkdir(parents=True)
    original = json.dumps({"argv": ["python"], "display_name": "Mine", "language": "python"})
    (plain / "kernel.json").write_text(original)
    with pytest.raises(KbundleError, match="did not install"):
        install_kernelspec(KernelRequest("mine", "x", "img", str(tmp_path), [], "h"))
    assert (plain / "kernel.json").read_text() == original


def test_reinstall_replaces_kbundle_spec(data_dir, tmp_path):
    install_kernelspec(KernelRequest("kbundle-r", "r", "img:1", str(tmp_path), [], "h1"))
    install_kernelspec(KernelRequest("kbundle-r", "r", "img:2", str(tmp_path), [], "h2"))
    assert [(r.image, r.bundle_hash) for r in list_kernelspecs()] == [("img:2", "h2")]


@pytest.mark.parametrize("name", ["", "Upper", "has space", "../up", "-dash", "a/b"])
def test_bad_names_are_usage_errors(data_dir, tmp_path, name):
    with pytest.raises(UsageError):
        install_kernelspec(KernelRequest(name, "x", "img", str(tmp_path), [], "h"))


def test_vscode_accepts_kbundle_spec(data_dir, tmp_path):
    path = install_kernelspec(KernelRequest("kbundle-vs", "vs", "img", str(tmp_path), [], "h"))
    assert vscode_problems(json.loads((path / "kernel.json").read_text())) == []


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"argv": ["kbundle-kernel", "-f", "{connection_file}"], "language": "python"}, "not an absolute path"),
        ({"argv": ["/nonexistent/kbundle-kernel", "-f", "{connection_file}"], "language": "python"}, "not an existing"),
        ({"argv": [os.path.realpath("/bin/sh"), "-f", "x.json"], "language": "python"}, "no {connection_file}"),
        (
            {"argv": ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"], "language": "python"},
            "VS Code replaces",
        ),
    ],
)
def test_vscode_rules_catch_bad_specs(spec, problem):
    problems = vscode_problems(spec)
    assert any(problem in p for p in problems), problems
