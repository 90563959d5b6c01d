"""pack never writes what run refuses: every member is checked against the reader's own limits
(bundle/limits.py) before anything is written, and a notebook over the budget is refused with the
two ways out (--strip-outputs, --include). Through the real CLI, in subprocesses."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from helpers import assert_one_error_line, kbundle, notebook
from kbundle.bundle.limits import MAX_MEMBERS, TEXT_BUDGET

ROOT = Path(__file__).resolve().parents[2]
ENVFILE = ROOT / "examples" / "warp-speed" / "environment.yml"


def _plots_notebook(path: Path, megabytes: int) -> Path:
    """A notebook whose code cells carry `megabytes` MB of PNG outputs (random, so it barely deflates)."""
    cells = [
        {
            "cell_type": "code",
            "execution_count": i + 1,
            "id": f"plot{i}",
            "metadata": {},
            "source": f"plt.plot(data[{i}])",
            "outputs": [
                {
                    "output_type": "display_data",
                    "data": {"image/png": base64.b64encode(os.urandom(750_000)).decode(), "text/plain": "<Figure>"},
                    "metadata": {},
                }
            ],
        }
        for i in range(megabytes)
    ]
    cells.append({"cell_type": "markdown", "id": "notes", "metadata": {}, "source": "# Results"})
    doc = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(doc))
    return path


def _padded_notebook(path: Path, size: int) -> Path:
    """A valid notebook of exactly `size` bytes."""
    head = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5, "pad": ""}
    path.write_text(json.dumps({**head, "pad": "x" * (size - len(json.dumps(head)))}))
    assert path.stat().st_size == size
    return path


def _bundles(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.suffix == ".kbundle" or p.name.endswith(".tmp")]


def _pack(nb: Path, *args) -> object:
    return kbundle("pack", nb, "-e", ENVFILE, "--lock", "never", *args, cwd=nb.parent, timeout=180)


def test_a_40mb_notebook_is_refused_at_pack_and_packs_with_strip_outputs(tmp_path):
    nb = _plots_notebook(tmp_path / "plots.ipynb", 40)
    assert nb.stat().st_size > 40 * 10**6
    before = hashlib.sha256(nb.read_bytes()).hexdigest()

    refused = _pack(nb)
    assert_one_error_line(refused, "plots.ipynb is", "more than the 16.0 MiB", "--strip-outputs", "--include")
    assert not _bundles(tmp_path)

    out = tmp_path / "plots.kbundle"
    packed = _pack(nb, "--strip-outputs", "-o", out)
    assert packed.returncode == 0, packed.stderr
    note = [line for line in packed.stderr.splitlines() if line.startswith("note: --strip-outputs")]
    assert len(note) == 1 and "40 code cells" in note[0] and "MiB saved" in note[0], packed.stderr
    assert "outputs cleared" in packed.stdout
    assert hashlib.sha256(nb.read_bytes()).hexdigest() == before  # the sender's file is untouched

    for command in ("verify", "inspect"):
        result = kbundle(command, out)
        assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(out) as zf:
        carried = json.loads(zf.read("work/plots.ipynb"))
    code = [c for c in carried["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert ["".join(c["source"]) for c in code] == [f"plt.plot(data[{i}])" for i in range(40)]
    assert [c["id"] for c in carried["cells"]][-1] == "notes"  # markdown and ids kept

    again = tmp_path / "again.kbundle"
    assert _pack(nb, "--strip-outputs", "-o", again).returncode == 0
    assert again.read_bytes() == out.read_bytes()  # stripping is deterministic too


def _texts_besides_the_notebook(tmp_path: Path, name: str) -> int:
    """The Dockerfile and environment pack writes for a notebook called `name` and ENVFILE."""
    probe = tmp_path / "probe"
    probe.mkdir()
    nb = notebook(probe, name=name)
    out = probe / "probe.kbundle"
    assert _pack(nb, "-o", out).returncode == 0
    doc = json.loads(kbundle("inspect", out, "--json").stdout)
    return sum(f["size"] for f in doc["files"] if f["path"] in (doc["dockerfile"], doc["environment"]))


def test_packs_at_the_limits_and_verifies(tmp_path):
    """The texts at exactly the budget and --include at exactly the member limit: written, verified."""
    others = _texts_besides_the_notebook(tmp_path, "edge.ipynb")
    nb = _padded_notebook(tmp_path / "edge.ipynb", TEXT_BUDGET - others)
    data = tmp_path / "data"
    data.mkdir()
    room = MAX_MEMBERS - 5  # the notebook, both environments, the Dockerfile and a lock
    for i in range(room):
        (data / f"{i:05}.csv").write_text(f"{i}\n")
    out = tmp_path / "edge.kbundle"
    result = _pack(nb, "-o", out, "--include", data)
    assert result.returncode == 0, result.stderr
    verified = kbundle("verify", out, timeout=180)
    assert verified.returncode == 0, verified.stderr
    assert f"{room + 4} members" in verified.stdout

    (data / "one-more.csv").write_text("x\n")
    refused = _pack(nb, "-o", tmp_path / "over.kbundle", "--include", data)
    assert_one_error_line(refused, f"more than {room:,} files", "archive")
    assert not (tmp_path / "over.kbundle").exists()


def test_a_notebook_under_the_budget_alone_is_refused_when_the_texts_pass_it(tmp_path):
    nb = _padded_notebook(tmp_path / "nb.ipynb", TEXT_BUDGET - 100)
    result = _pack(nb)
    assert_one_error_line(result, "with the bundle's Dockerfile, environment and lock", "--strip-outputs")
    assert not _bundles(tmp_path)


def test_strip_outputs_says_so_when_it_is_not_enough(tmp_path):
    nb = _padded_notebook(tmp_path / "nb.ipynb", TEXT_BUDGET + 1)  # the size is in metadata, not outputs
    result = _pack(nb, "--strip-outputs")
    assert_one_error_line(result, "even with its outputs cleared", "--include")
    assert "--strip-outputs to" not in result.stderr
    assert not _bundles(tmp_path)


@pytest.mark.parametrize(
    "doc, args, needle",
    [
        ({"cells": [], "nbformat": 4, "metadata": []}, [], "not a Jupyter notebook"),
        (
            {"cells": [{"cell_type": "code", "source": "x"}], "nbformat": 4, "metadata": {}},
            ["--strip-outputs"],
            "nbformat cannot read",
        ),
    ],
)
def test_notebooks_the_reader_or_nbformat_refuse_are_one_line(tmp_path, doc, args, needle):
    nb = tmp_path / "nb.ipynb"
    nb.write_text(json.dumps(doc))
    assert_one_error_line(_pack(nb, *args), needle)
    assert not _bundles(tmp_path)
