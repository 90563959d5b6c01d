"""Which layer each installed file goes to (image/layers.py, data/layers.yaml), and the staging of
an installed env into the context's layer folders."""

from __future__ import annotations

import json
import os
import random
import stat

import pytest

from kbundle import contract
from kbundle.errors import KbundleError
from kbundle.facts import DataError, layer_groups, layer_groups_from
from kbundle.image import layers
from kbundle.image.layers import Owner
from kbundle.pack.dockerfile import DockerfileInputs, render

SP = "lib/python3.11/site-packages"
OWNERS = {
    f"{SP}/nvidia/cublas/lib/libcublas.so.12": Owner("pip", "nvidia-cublas-cu12"),
    "lib/libcublas.so.12": Owner("conda", "libcublas"),
    "lib/libcudnn.so.9": Owner("conda", "libcudnn"),
    f"{SP}/torch/__init__.py": Owner("pip", "torch"),
    f"{SP}/torch/lib/libtorch_cuda.so": Owner("pip", "torch"),
    "lib/libtorch_cpu.so": Owner("conda", "libtorch"),
    f"{SP}/torchvision/__init__.py": Owner("pip", "torchvision"),
    f"{SP}/torchvision_conda/__init__.py": Owner("conda", "torchvision"),
    "bin/python3.11": Owner("conda", "python"),
    "lib/python3.11/os.py": Owner("conda", "python"),
    f"{SP}/tabulate.py": Owner("pip", "tabulate"),
    "bin/torchrun": Owner("pip", "torch"),
}


@pytest.mark.parametrize(
    "path, group",
    [
        (f"{SP}/nvidia/cublas/lib/libcublas.so.12", "cuda"),  # an nvidia-* wheel
        ("lib/libcublas.so.12", "cuda"),  # conda's CUDA packages
        ("lib/libcudnn.so.9", "cuda"),
        (f"{SP}/torch/lib/libtorch_cuda.so", "framework"),
        ("bin/torchrun", "framework"),  # a script goes with its distribution
        ("lib/libtorch_cpu.so", "framework"),  # conda's libtorch
        (f"{SP}/torchvision/__init__.py", "packages"),  # an add-on stays with the rest of pip
        (f"{SP}/torchvision_conda/__init__.py", "python"),  # and of conda
        ("bin/python3.11", "python"),
        (f"{SP}/tabulate.py", "packages"),
        # bytecode goes with its source's owner, optimised or not
        (f"{SP}/torch/__pycache__/__init__.cpython-311.pyc", "framework"),
        (f"{SP}/torch/__pycache__/__init__.cpython-311.opt-1.pyc", "framework"),
        ("lib/python3.11/__pycache__/os.cpython-311.pyc", "python"),
        (f"{SP}/__pycache__/tabulate.cpython-311.pyc", "packages"),
        # conda's records go with the rest of conda, whichever package they describe
        ("conda-meta/libcublas-12.4.5.8-0.json", "python"),
        ("conda-meta/history", "python"),
        # nobody's: the last group
        ("CACHEDIR.TAG", "packages"),
        (f"{SP}/orphan/__pycache__/x.cpython-311.pyc", "packages"),
        ("etc/made-by-nobody.conf", "packages"),
    ],
)
def test_group_for(path, group):
    assert layers.group_for(path, OWNERS, layer_groups()) == group


def test_assignment_does_not_depend_on_the_order_of_the_files():
    paths = [*OWNERS, "CACHEDIR.TAG", "conda-meta/history", f"{SP}/torch/__pycache__/__init__.cpython-311.pyc"]
    first = layers.assign(paths, OWNERS, layer_groups())
    for seed in range(5):
        shuffled = list(paths)
        random.Random(seed).shuffle(shuffled)
        owners = dict(OWNERS.items())
        assert layers.assign(shuffled, owners, layer_groups()) == first
        assert list(layers.assign(shuffled, owners, layer_groups())) == sorted(paths)


def test_pip_wins_where_it_installed_over_conda():
    conda = {f"{SP}/numpy/__init__.py": Owner("conda", "numpy"), "bin/f2py": Owner("conda", "numpy")}
    pip = {f"{SP}/numpy/__init__.py": Owner("pip", "numpy")}
    merged = layers.merged(conda, pip)
    assert merged[f"{SP}/numpy/__init__.py"] == Owner("pip", "numpy")
    assert merged["bin/f2py"] == Owner("conda", "numpy")


def test_group_names_and_order_are_fixed_whatever_the_env_holds():
    groups = layer_groups()
    assert groups.names == ("cuda", "framework", "python", "packages")
    assert groups.rest_of("conda") == "python" and groups.rest_of("pip") == "packages" and groups.last == "packages"


def _dockerfile(pip: bool) -> str:
    return render(
        DockerfileInputs("n", "0", 1, "h", "n.ipynb", "3.11", None, None, False, False, "debian:12", "why", None, pip)
    )


def test_the_dockerfile_copies_every_layer_in_order_whatever_the_bundle():
    copies = [ln for ln in _dockerfile(True).splitlines() if ln.startswith("COPY ")]
    assert copies[1:5] == [
        f"COPY {contract.layer_dir(i, g)}/ {contract.PREFIX}/" for i, g in enumerate(layer_groups().names)
    ]
    assert copies[-1] == f"COPY {contract.CONTEXT_WORK}/ {contract.WORK}/"
    # no step runs pip, and no wheel is copied into the image
    steps = [ln for ln in _dockerfile(True).splitlines() if ln.strip() and not ln.startswith("#")]
    assert not [ln for ln in steps if "pip" in ln or "wheel" in ln], steps
    assert [ln for ln in _dockerfile(False).splitlines() if ln.startswith("COPY ")] == copies


@pytest.mark.parametrize(
    "groups, problem",
    [
        ([{"name": "a", "holds": "x", "rest": "conda"}], "exactly one group `rest: pip`"),
        (
            [{"name": "a", "holds": "x", "rest": "conda"}, {"name": "a", "holds": "y", "rest": "pip"}],
            "must not name a group twice",
        ),
        (
            [
                {"name": "a", "holds": "x", "pip": ["Torch"], "rest": "conda"},
                {"name": "b", "holds": "y", "rest": "pip"},
            ],
            "lower case",
        ),
        (
            [{"name": "A b", "holds": "x", "rest": "conda"}, {"name": "b", "holds": "y", "rest": "pip"}],
            "lower-case word",
        ),
        ([{"name": "a", "holds": "x", "rest": "npm"}, {"name": "b", "holds": "y", "rest": "pip"}], "one of conda, pip"),
        ([{"name": "a", "rest": "conda"}, {"name": "b", "holds": "y", "rest": "pip"}], "holds is missing"),
    ],
)
def test_a_broken_layers_table_is_named(groups, problem):
    with pytest.raises(DataError, match="layers.yaml") as info:
        layer_groups_from({"source": "test", "groups": groups})
    assert problem in str(info.value)


# ----------------------------------------------------------------- reading owners and staging a real folder


def _file(root, rel: str, data: bytes = b"x", mode: int = 0o644):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _env(tmp_path):
    """An installed env: conda's python and libcublas, pip's torch and tabulate (over a dist-info RECORD)."""
    env = tmp_path / "ctx" / contract.CONTEXT_ENV
    for name, files in {
        "python": ["bin/python3.11", "lib/python3.11/os.py"],
        "libcublas": ["lib/libcublas.so.12"],
    }.items():
        for rel in files:
            _file(env, rel, name.encode(), 0o755 if rel.startswith("bin/") else 0o644)
        (env / "conda-meta").mkdir(exist_ok=True)
        (env / "conda-meta" / f"{name}-1-0.json").write_text(json.dumps({"name": name, "files": files}))
    (env / "bin" / "python").symlink_to("python3.11")
    _file(env, "lib/python3.11/__pycache__/os.cpython-311.pyc")
    # conda's own dist-info: its RECORD is conda's, not pip's
    _file(env, f"{SP}/conda_pkg-1.0.dist-info/RECORD", f"{SP}/conda_pkg/x.py,,\n".encode())
    meta = json.loads((env / "conda-meta" / "python-1-0.json").read_text())
    meta["files"].append(f"{SP}/conda_pkg-1.0.dist-info/RECORD")
    (env / "conda-meta" / "python-1-0.json").write_text(json.dumps(meta))
    for dist, files in {
        "torch-2.9.1": ["torch/__init__.py", "../../../bin/torchrun"],
        "tabulate-0.9.0": ["tabulate.py"],
    }.items():
        record = "".join(f"{f},sha256=abc,1\n" for f in files) + f"{dist}.dist-info/RECORD,,\n"
        _file(env, f"{SP}/{dist}.dist-info/RECORD", record.encode())
        for rel in files:
            _file(env, os.path.normpath(f"{SP}/{rel}"), dist.encode())
    _file(env, f"{SP}/torch/__pycache__/__init__.cpython-311.pyc")
    (env / "share" / "empty").mkdir(parents=True)
    (env / "share" / "closed").mkdir()
    _file(env, "share/closed/readme", b"r")
    (env / "share" / "closed").chmod(0o555)
    _file(env, "CACHEDIR.TAG")
    return env


def test_owners_are_read_from_conda_meta_and_records(tmp_path):
    env = _env(tmp_path)
    conda = layers.conda_owners(env)
    pip = layers.pip_owners(env, conda)
    assert conda["lib/libcublas.so.12"] == Owner("conda", "libcublas")
    assert pip["bin/torchrun"] == Owner("pip", "torch")  # ../../../bin/torchrun, from site-packages
    assert pip[f"{SP}/torch-2.9.1.dist-info/RECORD"] == Owner("pip", "torch")
    assert f"{SP}/conda_pkg/x.py" not in pip  # conda installed that distribution


def test_stage_moves_every_file_into_its_layer_folder(tmp_path):
    env = _env(tmp_path)
    ctx = env.parent
    before = {p.relative_to(env).as_posix(): os.lstat(p) for p in env.rglob("*")}
    staged = layers.stage(ctx, layer_groups())
    assert [(s.group, s.folder) for s in staged] == [
        ("cuda", "env-layers/01-cuda"),
        ("framework", "env-layers/02-framework"),
        ("python", "env-layers/03-python"),
        ("packages", "env-layers/04-packages"),
    ]
    assert not env.exists()
    where = {}
    for layer in staged:
        root = ctx / layer.folder
        assert root.is_dir()  # every group's folder, even an empty one
        for path in root.rglob("*"):
            where.setdefault(path.relative_to(root).as_posix(), []).append(layer.group)
    files = {rel: groups for rel, groups in where.items() if not stat.S_ISDIR(before[rel].st_mode)}
    assert set(files) == {rel for rel, info in before.items() if not stat.S_ISDIR(info.st_mode)}  # all, once
    assert all(len(groups) == 1 for groups in files.values())
    assert files["lib/libcublas.so.12"] == ["cuda"]
    assert files[f"{SP}/torch/__pycache__/__init__.cpython-311.pyc"] == ["framework"]
    assert files["bin/torchrun"] == ["framework"]
    assert files["bin/python3.11"] == ["python"] and files[f"{SP}/tabulate.py"] == ["packages"]
    assert files["bin/python"] == ["packages"]  # a link no package lists: nobody's, like any other file
    assert where["share/empty"] == ["packages"]  # an empty folder still exists in the image
    python = ctx / "env-layers/03-python"
    link = ctx / "env-layers/04-packages/bin/python"
    assert link.is_symlink() and os.readlink(link) == "python3.11"  # moved as a link, never followed
    moved = os.lstat(python / "bin/python3.11")
    assert moved.st_ino == before["bin/python3.11"].st_ino  # moved, not copied
    assert stat.S_IMODE(moved.st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(ctx / "env-layers/04-packages/share/closed").st_mode) == 0o555  # modes kept
    sizes = {s.group: (s.files, s.bytes) for s in staged}
    assert sizes["cuda"] == (1, len(b"libcublas")) and sizes["framework"][0] == 4


def test_stage_without_an_env_makes_the_empty_folders(tmp_path):
    staged = layers.stage(tmp_path, layer_groups())
    assert all((tmp_path / s.folder).is_dir() and s.files == 0 for s in staged)


def test_a_context_entry_that_is_no_file_folder_or_link_is_refused(tmp_path):
    from kbundle.image import tarstream

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(KbundleError, match="neither a file, a folder nor a symbolic link"):
        b"".join(tarstream.stream(tmp_path))


@pytest.mark.parametrize(
    "dockerfile, refused",
    [
        (_dockerfile(True), False),  # today's rendering
        ("FROM x\nCOPY env/ /opt/kbundle/env/\nCOPY work/ /opt/kbundle/work/\n", True),  # an older kbundle's
        ("FROM x\ncopy pip/ /tmp/kbundle-pip/\n", True),
        ("FROM x\nRUN echo hi\nCOPY work/ /opt/kbundle/work/\n", False),  # nothing of the env: nothing to say
        ("FROM x\n# COPY env/ /opt/kbundle/env/ (a comment)\n", False),
    ],
)
def test_a_dockerfile_for_the_old_context_layout_is_named(dockerfile, refused):
    from kbundle.image.context import layout_problem

    problem = layout_problem(dockerfile)
    assert (problem is not None) == refused
    if refused:
        assert "--use-bundled-dockerfile" in problem
