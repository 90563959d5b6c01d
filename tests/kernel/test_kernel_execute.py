"""The reproduction report: pure comparison rules, and nbclient running a notebook in the container kernel."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from kbundle.errors import UsageError
from kbundle.kernel.compare import compare_outputs, mask_volatile, output_text
from kbundle.kernel.execute import execute_notebook


def stream(text: str, name: str = "stdout") -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def result(text: str, **extra) -> dict:
    return {
        "output_type": "execute_result",
        "execution_count": 1,
        "metadata": {},
        "data": {"text/plain": text, **extra},
    }


# The two forms of a native library's log line: TensorFlow's, and glog's / absl's.
TF_LOG = "2026-11-29 21:22:54.601422: W tensorflow/stream_executor/cuda/cuda_driver.cc:312] "
GLOG = "W1129 21:22:54.601466   4321 cuda_driver.cc:312] "


@pytest.fixture(autouse=True)
def private_kbundle_cache(tmp_path_factory, monkeypatch):
    """Kernels started here (and their launchers) keep bytecode in a throwaway cache, not the user's."""
    cache = tmp_path_factory.mktemp("kbundle-cache")
    cache.chmod(0o777)  # a launcher running as another uid may use it too
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(cache))


# ----------------------------------------------------------------- pure rules


@pytest.mark.parametrize(
    "saved, new, status",
    [
        ([stream("45\n")], [stream("45\n")], "same"),
        ([stream("4"), stream("5\n")], [stream("45\n")], "same"),  # chunking differs, text does not
        ([], [], "same"),
        ([stream("took 0.0123 s\n")], [stream("took 1.5 s\n")], "volatile"),
        (
            [stream("CPU times: user 2.1 ms, sys: 0 ns, total: 2.1 ms\nWall time: 2.5 ms\n")],
            [stream("CPU times: user 3 ms, sys: 12 µs, total: 3.01 ms\nWall time: 3.2 ms\n")],
            "volatile",
        ),
        (
            [stream("1.2 µs ± 3.1 ns per loop (mean ± std. dev. of 7 runs, 1,000,000 loops each)\n")],
            [stream("980 ns ± 10.2 ns per loop (mean ± std. dev. of 7 runs, 100,000 loops each)\n")],
            "volatile",
        ),
        ([result("<Model object at 0x7f3a2b1c9d50>")], [result("<Model object at 0x7ffe01234560>")], "volatile"),
        ([stream("run at 2024-05-01 10:11:12.345\n")], [stream("run at 2026-11-27 15:03:40.001\n")], "volatile"),
        ([stream("Fri Nov 27 15:03:40 2026\n")], [stream("Mon Jan  5 09:00:01 2027\n")], "volatile"),
        ([result("0.3")], [result("0.30000000000000004")], "numeric-close"),
        ([result("array([1.0000001, 2.       ])")], [result("array([1.0000002, 2.       ])")], "numeric-close"),
        ([result("0.3")], [result("0.31")], "differs"),
        ([stream("accuracy 0.91 in 3.2 s\n")], [stream("accuracy 0.87 in 2.9 s\n")], "differs"),
        ([stream("hello\n")], [stream("hello\n", name="stderr")], "differs"),
        ([result("x", **{"image/png": "AAAA"})], [result("x", **{"image/png": "BBBB"})], "differs"),
        ([], [stream("new\n")], "no-reference"),
        # Native log lines on stderr describe the machine and are left out; stdout/stderr interleaving too.
        (
            [
                stream("TensorFlow 2.3.1\n"),
                stream(f"{TF_LOG}Could not load dynamic library 'libcudart.so.10.1'\n", "stderr"),
            ],
            [
                stream(f"{TF_LOG.replace('54.6', '11.1')}Successfully opened libcudart.so.10.1\n", "stderr"),
                stream("TensorFlow 2.3.1\n"),
            ],
            "same",
        ),
        ([stream("GPUs: []\n")], [stream("GPUs: []\n"), stream(f"{GLOG}failed call to cuInit\n", "stderr")], "same"),
        ([stream("a\n"), stream("b\n", "stderr")], [stream("b\n", "stderr"), stream("a\n")], "same"),
        ([stream("a\n"), result("1"), stream("b\n")], [stream("b\n"), result("1"), stream("a\n")], "differs"),
        (
            [stream(f"{TF_LOG}x\nTo enable them, rebuild\n", "stderr")],
            [],
            "differs",
        ),  # a line without the prefix counts
        ([stream(f"{TF_LOG}x\n")], [stream(f"{TF_LOG.replace('54.6', '11.1')}x\n")], "volatile"),  # stdout: not a log
    ],
)
def test_compare_outputs(saved, new, status):
    assert compare_outputs(saved, new).status == status


def test_differs_gives_a_short_diff():
    comparison = compare_outputs(
        [stream("".join(f"line {i}\n" for i in range(40)))], [stream("".join(f"line {i * 2}\n" for i in range(40)))]
    )
    assert comparison.status == "differs"
    lines = comparison.detail.splitlines()
    assert lines[0] == "--- saved" and lines[1] == "+++ now"
    assert len(lines) <= 11 and lines[-1].startswith("... (")


def test_volatile_detail_names_what_was_masked():
    detail = compare_outputs([stream("took 1 s\n")], [stream("took 2 s\n")]).detail
    assert "duration" in detail


def test_masking_leaves_plain_numbers_alone():
    assert mask_volatile("mean 0.5, n=300, seed 42") == "mean 0.5, n=300, seed 42"
    assert output_text([result("3", **{"text/html": "<b>3</b>"})]) == "[execute_result]\n3"


# ----------------------------------------------------------------- nbclient through the container kernel


def _notebook(cells: list[tuple[str, str, list]]) -> dict:
    import nbformat

    nb = nbformat.v4.new_notebook()
    for kind, source, outputs in cells:
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            cell = nbformat.v4.new_code_cell(source)
            cell.outputs = [nbformat.from_dict(o) for o in outputs]
            nb.cells.append(cell)
    return nb


@pytest.fixture
def kernel(env_image, monkeypatch):
    from kbundle.kernel.spec import KernelRequest, install_kernelspec

    data = tempfile.mkdtemp(prefix="kbundle-test-jupyter-")
    work = Path(tempfile.mkdtemp(prefix="kbundle-test-work-"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", data)
    monkeypatch.setenv("JUPYTER_PATH", data)
    install_kernelspec(KernelRequest("kbundle-exec", "exec", env_image, str(work), [], "sha256:exec"))
    yield "kbundle-exec", work
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.docker
def test_execute_notebook_reports_each_cell(kernel):
    import nbformat

    kernel_name, work = kernel
    nb = _notebook(
        [
            ("code", "total = sum(range(10))\nprint(total)", [stream("45\n")]),
            ("md", "# timing", []),
            (
                "code",
                "import time\nt0 = time.perf_counter(); time.sleep(0.01)\nprint(f'took {time.perf_counter() - t0:.4f} s')",
                [stream("took 0.0123 s\n")],
            ),
            ("code", "0.1 + 0.2", [result("0.3")]),
            ("code", "import numpy as np\nnp.arange(3) * total", [result("array([ 0, 45, 90])")]),
            ("code", "print('changed')", [stream("original\n")]),
            ("code", "import os\nprint(os.path.basename(os.getcwd()))", [stream(work.name + "\n")]),
            ("code", "1 / 0", []),
            ("code", "print('after')", [stream("after\n")]),
        ]
    )
    source = work / "demo.ipynb"
    nbformat.write(nb, str(source))
    out = work / "demo.executed.ipynb"

    report = execute_notebook(source, kernel_name, out)

    statuses = [(c.index, c.status) for c in report.cells]
    assert statuses == [
        (0, "same"),
        (2, "volatile"),
        (3, "numeric-close"),
        (4, "same"),
        (5, "differs"),
        (6, "same"),
        (7, "error"),
        (8, "not-run"),
    ]
    assert report.errored and report.exit_code == 1
    rendered = str(report.render())
    assert "ZeroDivisionError: division by zero" in rendered and "+changed" in rendered
    assert report.cells[6].detail == "ZeroDivisionError: division by zero"
    assert "+changed" in report.cells[4].detail
    executed = nbformat.read(str(out), as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "45\n" and executed.cells[0].execution_count == 1
    assert executed.cells[8].outputs == [] and executed.cells[8].execution_count is None
    assert nbformat.read(str(source), as_version=4).cells[8].outputs[0]["text"] == "after\n"  # input untouched
    data = report.to_dict()
    assert json.loads(json.dumps(data))["counts"] == {
        "same": 3,
        "volatile": 1,
        "numeric-close": 1,
        "differs": 1,
        "error": 1,
        "not-run": 1,
    }
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.docker
def test_clean_notebook_is_not_errored(kernel):
    import nbformat

    kernel_name, work = kernel
    source = work / "ok.ipynb"
    nbformat.write(_notebook([("code", "print('hi')", [stream("hi\n")])]), str(source))
    report = execute_notebook(source, kernel_name, work / "ok.out.ipynb")
    assert not report.errored and [c.status for c in report.cells] == ["same"]
    assert report.summary_lines()[-1].startswith("1 code cells: 1 same") and report.exit_code == 0


def test_refuses_to_overwrite_the_reference(tmp_path):
    import nbformat

    source = tmp_path / "n.ipynb"
    nbformat.write(_notebook([("code", "1", [result("1")])]), str(source))
    before = source.read_bytes()
    with pytest.raises(UsageError, match="saved outputs are the reference"):
        execute_notebook(source, "whatever", source)
    with pytest.raises(UsageError, match="does not exist"):
        execute_notebook(source, "whatever", tmp_path / "missing" / "out.ipynb")
    assert source.read_bytes() == before
