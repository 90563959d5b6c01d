"""Concurrent `kbundle run`s of one bundle: one build, one image, one kernel.

The run that takes the image's lock first builds; the others wait for it and reuse the
image. Registration happens under that lock too, so the builder's workdir is the kernel's
and the other runs are told so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from helpers import pack_world_bundle, run_env_for
from kbundle.flows.run import kernel_workdir

# ----------------------------------------------------------------- pure decision


@pytest.mark.parametrize(
    ("previous", "same", "exists", "replace", "chosen", "warns"),
    [
        (None, False, False, False, "/b", False),  # first registration
        ("/b", True, True, False, "/b", False),  # the same folder again
        ("/a", True, True, False, "/a", True),  # another run of this bundle placed it: it stays
        ("/a", True, False, False, "/b", False),  # ... unless that folder is gone
        ("/a", True, True, True, "/b", False),  # --replace points it here
        ("/a", False, True, False, "/b", False),  # another bundle's kernel (--replace): ours
    ],
)
def test_kernel_workdir(previous, same, exists, replace, chosen, warns):
    workdir, warning = kernel_workdir("/b", previous, same, exists, replace)
    assert workdir == chosen and (warning is not None) is warns
    if warns:
        assert "/a" in warning and "/b" in warning and "--replace" in warning


# ----------------------------------------------------------------- real runs

RUNS = 4


@pytest.mark.docker
def test_four_runs_at_once_build_once(world, docker_client, tmp_path):
    from kbundle import contract
    from kbundle.bundle import open_bundle

    env = run_env_for(tmp_path)
    name = f"kbt-conc-{uuid.uuid4().hex[:8]}"
    bundle = pack_world_bundle(world, env, tmp_path / "sender", name)
    digest = open_bundle(bundle).identity
    folders = [tmp_path / f"r{i}" for i in range(RUNS)]
    for folder in folders:
        folder.mkdir()
    procs = [
        subprocess.Popen(
            [str(Path(sys.executable).parent / "kbundle"), "run", str(bundle), "--yes", "--json"],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in folders
    ]
    results = [p.communicate(timeout=1500) for p in procs]
    ours = {"label": f"{contract.LABEL_CONTENT_HASH}={digest}"}
    try:
        for proc, (_, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, err
        data = [json.loads(out) for out, _ in results]
        assert sorted(d["built"] for d in data) == [False] * (RUNS - 1) + [True]
        assert len({d["image"] for d in data}) == 1 and len({d["image_id"] for d in data}) == 1

        # One image, tagged; no untagged leftovers of duplicate builds.
        images = docker_client.api.images(filters=ours)
        assert [i["RepoTags"] for i in images] == [[data[0]["image"]]]
        assert not docker_client.api.images(filters=dict(ours, dangling=True))

        # One kernel, pointing at the builder's workdir; every other run says so.
        builder = next(d for d in data if d["built"])
        listed = subprocess.run(
            [str(Path(sys.executable).parent / "kbundle"), "kernels", "list", "--json"],
            env=env,
            capture_output=True,
            text=True,
        )
        kernels = [k for k in json.loads(listed.stdout) if k["name"] == f"kbundle-{name}"]
        assert len(kernels) == 1 and kernels[0]["workdir"] == builder["workdir"]
        assert kernels[0]["metadata"]["notebook"] == builder["notebook"]
        for d, (_, err) in zip(data, results, strict=True):
            told = [ln for ln in err.splitlines() if ln.startswith("warning:") and "keeps its workdir" in ln]
            assert bool(told) is (d is not builder), err
    finally:
        for image in docker_client.api.images(filters=ours):
            docker_client.api.remove_image(image["Id"], force=True)
