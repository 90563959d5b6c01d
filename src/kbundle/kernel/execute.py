"""Headless execution in a named kernel, and the reproduction report.

Public function (the `run --execute` command calls it):

    execute_notebook(notebook_path, kernel_name, output_path, *, timeout=None, cwd=None) -> Report

It runs every code cell with nbclient in the kernel `kernel_name` (stopping at the first
cell that raises, as `jupyter nbconvert --execute` does), writes the executed copy to
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
`Report.to_dict()` is the `--json` form, `Report.summary_lines()` / `Report.render()` the human one. `compare_outputs(saved, new)` is the pure core.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from kbundle.atomic import write_atomic
from kbundle.errors import KbundleError, UsageError

SAME, DIFFERS, NUMERIC_CLOSE, VOLATILE = "same", "differs", "numeric-close", "volatile"
ERROR, NOT_RUN, NO_REFERENCE = "error", "not-run", "no-reference"
# numpy.isclose's defaults: float noise from another BLAS or CPU passes, a changed result does not.
RTOL, ATOL = 1e-5, 1e-8
DIFF_LINES = 8

# Text that changes from run to run without meaning anything. Order matters: longer
# shapes (timestamps) are masked before their parts (times, numbers with units).
_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*"
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)[a-z]*"
VOLATILE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(rx)) for name, rx in (
        ("timestamp", r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"),
        ("date", rf"\b(?:{_DAY},?\s+)?{_MONTH}\s+\d{{1,2}}(?:,?\s+\d{{2}}:\d{{2}}(?::\d{{2}})?)?(?:,?\s+\d{{4}})?\b"),
        ("clock", r"\b\d{1,2}:\d{2}:\d{2}(?:\.\d+)?\b"),
        ("progress", r"\b\d{1,2}:\d{2}<\d{1,2}:\d{2}|\d+(?:\.\d+)?\s?(?:it/s|s/it)"),
        ("loops", r"\b\d[\d,]*\s+loops?\s+each"),
        ("duration", r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\s?"
                     r"(?:ns|µs|μs|us|ms|s|sec|secs|seconds?|min|mins|minutes?|h|hr|hours?)\b"),
        ("address", r"\b0x[0-9a-fA-F]{6,}\b"),
        ("uuid", r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"),
        ("tmpname", r"/tmp/tmp[\w-]+"),
    )
)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.])|\b(?:nan|inf)\b")
_IMAGE = re.compile(r"^image/")


@dataclass(frozen=True)
class Comparison:
    status: str
    detail: str = ""


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
        return {"notebook": self.notebook, "output": self.output, "kernel_name": self.kernel_name,
                "errored": self.errored, "seconds": round(self.seconds, 3), "counts": self.counts(),
                "cells": [c.to_dict() for c in self.cells]}

    def summary_lines(self) -> list[str]:
        lines = []
        for cell in self.cells:
            label = f"cell {cell.index:>3} [{cell.execution_count if cell.execution_count is not None else ' '}]"
            lines.append(f"{label} {cell.status:<13} {cell.source[:50]}")
            for detail in cell.detail.splitlines()[:DIFF_LINES + 2]:
                lines.append(f"{'':>19}{detail}")
        tally = ", ".join(f"{n} {status}" for status, n in sorted(self.counts().items()))
        lines.append(f"{len(self.cells)} code cells: {tally}; executed copy: {self.output}")
        return lines


# ----------------------------------------------------------------- comparison (pure)


def output_text(outputs: list[dict[str, Any]]) -> str:
    """One comparable text for a cell's outputs.

    Consecutive stream chunks are joined (a kernel splits them differently each run);
    rich outputs compare by text/plain, or by their first other text form; images by hash.
    """
    parts: list[str] = []
    stream: Optional[tuple[str, list[str]]] = None
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream":
            name, text = out.get("name", "stdout"), _text(out.get("text", ""))
            if stream and stream[0] == name:
                stream[1].append(text)
                continue
            _flush(parts, stream)
            stream = (name, [text])
            continue
        _flush(parts, stream)
        stream = None
        if kind == "error":
            parts.append(f"[error]\n{out.get('ename', '')}: {out.get('evalue', '')}")
        elif kind in ("execute_result", "display_data"):
            parts.append(f"[{kind}]\n" + _rich_text(out.get("data", {})))
    _flush(parts, stream)
    return "\n".join(parts)


def _flush(parts: list[str], stream: Optional[tuple[str, list[str]]]) -> None:
    if stream:
        parts.append(f"[{stream[0]}]\n" + "".join(stream[1]))


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _rich_text(data: dict[str, Any]) -> str:
    pieces = []
    if "text/plain" in data:
        pieces.append(_text(data["text/plain"]))
    else:
        for mime in sorted(data):
            if not _IMAGE.match(mime):
                value = data[mime]
                pieces.append(_text(value) if isinstance(value, (str, list)) else json.dumps(value, sort_keys=True))
                break
    for mime in sorted(m for m in data if _IMAGE.match(m)):
        digest = hashlib.sha256(_text(data[mime]).encode()).hexdigest()[:16]
        pieces.append(f"<{mime} {digest}>")
    return "\n".join(pieces)


def mask_volatile(text: str) -> str:
    for name, pattern in VOLATILE_PATTERNS:
        text = pattern.sub(f"<{name}>", text)
    return text


def _numbers_close(old: str, new: str) -> Optional[float]:
    """The largest relative difference when the texts differ only in close numbers, else None."""
    old_nums, new_nums = _NUMBER.findall(old), _NUMBER.findall(new)
    if len(old_nums) != len(new_nums) or _NUMBER.sub("#", old) != _NUMBER.sub("#", new):
        return None
    worst = 0.0
    for a_text, b_text in zip(old_nums, new_nums):
        a, b = float(a_text), float(b_text)
        if a == b or (math.isnan(a) and math.isnan(b)):
            continue
        if not math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL):
            return None
        worst = max(worst, abs(a - b) / max(abs(a), abs(b)))
    return worst


def short_diff(old: str, new: str, limit: int = DIFF_LINES) -> str:
    lines = [line for line in difflib.unified_diff(old.splitlines(), new.splitlines(), "saved", "now", lineterm="",
                                                   n=0) if not line.startswith("@@")]
    if len(lines) > limit + 2:
        lines = lines[:limit + 2] + [f"... ({len(lines) - limit - 2} more lines)"]
    return "\n".join(lines)


def compare_outputs(saved: list[dict[str, Any]], new: list[dict[str, Any]]) -> Comparison:
    """How a cell's new outputs relate to the saved ones (errors are judged by the caller)."""
    old_text, new_text = output_text(saved), output_text(new)
    if old_text == new_text:
        return Comparison(SAME)
    if not saved:
        return Comparison(NO_REFERENCE, "the sender saved no output for this cell")
    old_masked, new_masked = mask_volatile(old_text), mask_volatile(new_text)
    if old_masked == new_masked:
        return Comparison(VOLATILE, "differs only in " + ", ".join(_masked_kinds(old_text, new_text)))
    worst = _numbers_close(old_masked, new_masked)
    if worst is not None:
        return Comparison(NUMERIC_CLOSE, f"numbers agree within rtol={RTOL:g} (largest relative difference {worst:.2g})")
    return Comparison(DIFFERS, short_diff(old_text, new_text))


def _masked_kinds(*texts: str) -> list[str]:
    kinds = [name for name, pattern in VOLATILE_PATTERNS if any(pattern.search(t) for t in texts)]
    return kinds or ["volatile text"]


def cell_report(index: int, cell: dict[str, Any], saved: list[dict[str, Any]], ran: bool) -> CellReport:
    source = _text(cell.get("source", "")).strip().splitlines()
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


def execute_notebook(notebook_path: os.PathLike | str, kernel_name: str, output_path: os.PathLike | str, *,
                     timeout: Optional[int] = None, cwd: Optional[os.PathLike | str] = None,
                     startup_timeout: int = 120) -> Report:
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
    saved = {i: [dict(o) for o in cell.get("outputs", [])] for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code"}
    started: list[int] = []
    client = NotebookClient(
        nb, kernel_name=kernel_name, timeout=timeout, startup_timeout=startup_timeout, allow_errors=False,
        resources={"metadata": {"path": str(Path(cwd) if cwd else source.resolve().parent)}},
        on_cell_start=lambda cell, cell_index: started.append(cell_index),
    )
    t0 = time.perf_counter()
    try:
        client.execute()
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
        raise UsageError(f"the executed copy would overwrite {source}, whose saved outputs are the reference; "
                         "pass another output path")
    if not target.parent.is_dir():
        raise UsageError(f"the output folder {target.parent} does not exist")
