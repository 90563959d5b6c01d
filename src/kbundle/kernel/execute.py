"""Headless execution in a named kernel, and the reproduction report.

Public function (the `run --execute` command calls it):

    execute_notebook(notebook_path, kernel_name, output_path, *, timeout=None, cwd=None) -> Report

It runs every code cell with nbclient in the kernel `kernel_name` (stopping at the first
cell that raises, as `jupyter nbconvert --execute` does), with the kernel's stderr passed on
through kernel/noise.py (a framework's no-GPU dlerrors folded into one line), writes the executed copy to
`output_path` atomically, and compares each code cell's new outputs with the outputs the
sender saved:

- `same`: identical;
- `volatile`: identical once timings, durations, dates, clock times, memory addresses and
  similar run-dependent text are masked;
- `numeric-close`: identical apart from numbers that agree within `RTOL`/`ATOL`;
- `differs`: anything else, with a short diff;
- `error`: the cell raised (detail: `Name: message`); `not-run`: after an error;
- `no-reference`: the sender saved no outputs for this cell but it produced some now.

`Report.errored` is true when a cell raised (`Report.exit_code` is then 1);
`Report.to_dict()` is the `--json` form, `Report.summary_lines()` / `Report.render()` the human one. The comparison itself is kernel/compare.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from kbundle.atomic import write_atomic
from kbundle.errors import KbundleError, UsageError
from kbundle.kernel.compare import DIFF_LINES, ERROR, NOT_RUN, compare_outputs, text_of
from kbundle.kernel.noise import folded_stderr


@dataclass(frozen=True)
class CellReport:
    index: int  # position among all cells of the notebook
    execution_count: Optional[int]
    status: str
    detail: str
    source: str  # the cell's first line, to recognise it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    notebook: str
    output: str
    kernel_name: str
    cells: list[CellReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errored(self) -> bool:
        return any(c.status == ERROR for c in self.cells)

    @property
    def exit_code(self) -> int:
        """What `kbundle run --execute` exits with: non-zero when a cell raised."""
        return 1 if self.errored else 0

    def render(self) -> Any:
        """The summary as a rich Text (printed literally: outputs may contain `[...]`)."""
        from rich.text import Text

        return Text("\n".join(self.summary_lines()))

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for cell in self.cells:
            counts[cell.status] = counts.get(cell.status, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "notebook": self.notebook,
            "output": self.output,
            "kernel_name": self.kernel_name,
            "errored": self.errored,
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "cells": [c.to_dict() for c in self.cells],
        }

    def summary_lines(self) -> list[str]:
        lines = []
        for cell in self.cells:
            label = f"cell {cell.index:>3} [{cell.execution_count if cell.execution_count is not None else ' '}]"
            lines.append(f"{label} {cell.status:<13} {cell.source[:50]}")
            for detail in cell.detail.splitlines()[: DIFF_LINES + 2]:
                lines.append(f"{'':>19}{detail}")
        tally = ", ".join(f"{n} {status}" for status, n in sorted(self.counts().items()))
        lines.append(f"{len(self.cells)} code cells: {tally}; executed copy: {self.output}")
        return lines


def cell_report(index: int, cell: dict[str, Any], saved: list[dict[str, Any]], ran: bool) -> CellReport:
    source = text_of(cell.get("source", "")).strip().splitlines()
    first = source[0] if source else ""
    count = cell.get("execution_count") if ran else None
    if not ran:
        return CellReport(index, None, NOT_RUN, "", first)
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    if errors:
        return CellReport(index, count, ERROR, f"{errors[0].get('ename', '')}: {errors[0].get('evalue', '')}", first)
    comparison = compare_outputs(saved, cell.get("outputs", []))
    return CellReport(index, count, comparison.status, comparison.detail, first)


# ----------------------------------------------------------------- execution


def execute_notebook(
    notebook_path: os.PathLike | str,
    kernel_name: str,
    output_path: os.PathLike | str,
    *,
    timeout: Optional[int] = None,
    cwd: Optional[os.PathLike | str] = None,
    startup_timeout: int = 120,
) -> Report:
    """Run the notebook in `kernel_name`, write the executed copy, and return the report."""
    import nbformat
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient import NotebookClient
    from nbclient.exceptions import CellControlSignal, DeadKernelError

    source, target = Path(notebook_path), Path(output_path)
    _check_paths(source, target)
    try:
        nb = nbformat.read(str(source), as_version=4)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read notebook {source}: {exc}") from None
    saved = {
        i: [dict(o) for o in cell.get("outputs", [])] for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
    }
    started: list[int] = []
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=timeout,
        startup_timeout=startup_timeout,
        allow_errors=False,
        resources={"metadata": {"path": str(Path(cwd) if cwd else source.resolve().parent)}},
        on_cell_start=lambda cell, cell_index: started.append(cell_index),
    )
    t0 = time.perf_counter()
    try:
        # The kernel's stderr goes through kernel/noise.py: a GPU-less machine's dlerrors become one line.
        with folded_stderr() as stderr:
            client.execute(stderr=stderr)  # passed on to the kernel's Popen
    except CellControlSignal:
        pass  # the errored cell carries its error output; the report tells which
    except NoSuchKernel:
        raise KbundleError(f"no kernel named {kernel_name!r} (see `kbundle kernels list`)") from None
    except DeadKernelError as exc:
        raise KbundleError(f"the kernel {kernel_name!r} died: {exc}") from None
    except RuntimeError as exc:  # jupyter_client: "Kernel died before replying to kernel_info"
        raise KbundleError(f"the kernel {kernel_name!r} did not start: {exc}") from None
    seconds = time.perf_counter() - t0

    ran = set(started)
    report = Report(str(source), str(target), kernel_name, seconds=seconds)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if index not in ran:  # keep no sender outputs in the copy: they would pass for ours
            cell.outputs, cell.execution_count = [], None
        report.cells.append(cell_report(index, cell, saved[index], index in ran))
    write_atomic(target, nbformat.writes(nb) + "\n")
    return report


def _check_paths(source: Path, target: Path) -> None:
    if not source.is_file():
        raise UsageError(f"no notebook at {source}")
    if target.exists() and target.resolve() == source.resolve():
        raise UsageError(
            f"the executed copy would overwrite {source}, whose saved outputs are the reference; "
            "pass another output path"
        )
    if not target.parent.is_dir():
        raise UsageError(f"the output folder {target.parent} does not exist")
