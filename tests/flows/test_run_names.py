"""Kernel names never collide: a second bundle with a taken name is refused with advice.

Real `kbundle run` subprocesses against the offline world. The two bundles differ only in
their notebook (so their content hashes differ) and share one image, built once.
"""

from __future__ import annotations

import json
import uuid

import pytest

from helpers import kbundle, pack_world_bundle, run_env_for
from kbundle.errors import KbundleError
from kbundle.kernel.spec import KernelRecord, claim_name, suggest_name

# ----------------------------------------------------------------- pure decisions


def record(bundle_hash: str) -> KernelRecord:
    return KernelRecord("kbundle-analysis", "analysis (kbundle)", None, "kbundle/analysis:abc", bundle_hash)


@pytest.mark.parametrize(
    ("existing", "replace", "expected"),
    [
        (None, False, None),  # a free name
        (record("sha256:a"), False, None),  # the same bundle again
        (record("sha256:a"), True, None),
        (record("sha256:b"), True, "replaced kernel kbundle-analysis, which ran another bundle (kbundle/analysis:abc)"),
        (record("sha256:b"), False, KbundleError),  # another bundle: refused
        (record(""), False, KbundleError),  # a kernel whose bundle is unknown is another's too
    ],
)
def test_claim_name(existing, replace, expected):
    taken = {"kbundle-analysis"}
    if expected is KbundleError:
        with pytest.raises(KbundleError) as caught:
            claim_name("kbundle-analysis", "sha256:a", existing, replace, taken)
        assert "`--name analysis-2`" in str(caught.value) and "`--replace`" in str(caught.value)
    else:
        assert claim_name("kbundle-analysis", "sha256:a", existing, replace, taken) == expected


@pytest.mark.parametrize(
    ("name", "taken", "expected"),
    [
        ("kbundle-analysis", {"kbundle-analysis"}, "analysis-2"),
        ("kbundle-analysis", {"kbundle-analysis", "kbundle-analysis-2"}, "analysis-3"),
        ("kbundle-analysis-2", {"kbundle-analysis-2"}, "analysis-2-2"),
    ],
)
def test_suggest_name(name, taken, expected):
    assert suggest_name(name, taken) == expected


# ----------------------------------------------------------------- real runs


def run(bundle, env, cwd, *extra):
    return kbundle("run", bundle, "--yes", "--json", *extra, cwd=cwd, env=env, timeout=900)


def kernels(env) -> dict[str, dict]:
    proc = kbundle("kernels", "list", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return {k["name"]: k for k in json.loads(proc.stdout)}


@pytest.mark.docker
def test_a_second_bundle_with_a_taken_name_is_refused_with_advice(world, docker_client, tmp_path):
    from kbundle.bundle import open_bundle

    env = run_env_for(tmp_path)
    name = f"kbt-names-{uuid.uuid4().hex[:8]}"
    first = pack_world_bundle(world, env, tmp_path / "alice", name)
    second = pack_world_bundle(world, env, tmp_path / "bob", name, source="print('another analysis')")
    hashes = [open_bundle(b).identity for b in (first, second)]
    assert hashes[0] != hashes[1]
    kernel = f"kbundle-{name}"
    for folder in ("one", "two", "three", "four"):
        (tmp_path / folder).mkdir()
    image = None
    try:
        proc = run(first, env, tmp_path / "one")
        assert proc.returncode == 0, proc.stderr
        image = json.loads(proc.stdout)["image"]
        assert kernels(env)[kernel]["bundle_hash"] == hashes[0]

        # The same bundle again is not a collision.
        again = run(first, env, tmp_path / "one")
        assert again.returncode == 0, again.stderr
        assert "replaced" not in again.stderr and "already runs" not in again.stderr

        # Another bundle of that name: one error line with the advice; nothing written, nothing taken over.
        refused = run(second, env, tmp_path / "two")
        assert refused.returncode == 1, refused.stderr
        errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert f"a kernel named {kernel} already runs another bundle" in errors[0]
        assert f"`--name {name}-2`" in errors[0] and "`--replace`" in errors[0]
        assert not (tmp_path / "two" / name).exists()
        assert kernels(env)[kernel]["bundle_hash"] == hashes[0]

        bad = run(second, env, tmp_path / "two", "--name", "!!!")
        assert bad.returncode == 2 and bad.stderr.startswith("error: --name '!!!'"), bad.stderr

        # --name registers it beside the first, under a name of its own.
        beside = run(second, env, tmp_path / "three", "--name", f"{name}-2")
        assert beside.returncode == 0, beside.stderr
        data = json.loads(beside.stdout)
        assert data["kernel_name"] == f"{kernel}-2" and data["display_name"] == f"{name}-2 (kbundle)"
        notebook = json.loads((tmp_path / "three" / f"{name}-2" / f"{name}.ipynb").read_text())
        assert notebook["metadata"]["kernelspec"]["name"] == f"{kernel}-2"
        listed = kernels(env)
        assert listed[kernel]["bundle_hash"] == hashes[0] and listed[f"{kernel}-2"]["bundle_hash"] == hashes[1]
        assert listed[f"{kernel}-2"]["display_name"] == f"{name}-2 (kbundle)"

        # --replace takes the name over, and says so.
        replaced = run(second, env, tmp_path / "four", "--replace")
        assert replaced.returncode == 0, replaced.stderr
        assert any(
            ln.startswith("warning:") and f"replaced kernel {kernel}" in ln for ln in replaced.stderr.splitlines()
        )
        assert kernels(env)[kernel]["bundle_hash"] == hashes[1]
        assert kernels(env)[kernel]["workdir"] == str((tmp_path / "four" / name).resolve())
    finally:
        if image:
            docker_client.images.remove(image, force=True)
