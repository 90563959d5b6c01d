"""The reproduction report's pure core: how a cell's new outputs relate to the ones the sender saved.

- `same`: identical;
- `volatile`: identical once timings, durations, dates, clock times, memory addresses and
  similar run-dependent text are masked;
- `numeric-close`: identical apart from numbers that agree within `RTOL`/`ATOL`;
- `differs`: anything else, with a short diff;
- `no-reference`: the sender saved no outputs for this cell but it produced some now.
(`error` and `not-run` are judged by kernel/execute.py, which ran the cells.)

Two things are left out of every comparison, because they depend on the kernel and the
machine rather than on what the cell computed: how stdout and stderr interleave (two pipes
read by two threads in the kernel), and native libraries' log lines on stderr (TensorFlow's
`2020-10-20 14:03:22.123456: W tensorflow/...cc:59] ...`: CPU features, drivers, host
names; ipykernel 6 captures them into the outputs, ipykernel 5 did not). The executed copy
keeps both as they came.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

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
    (name, re.compile(rx))
    for name, rx in (
        ("timestamp", r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"),
        ("date", rf"\b(?:{_DAY},?\s+)?{_MONTH}\s+\d{{1,2}}(?:,?\s+\d{{2}}:\d{{2}}(?::\d{{2}})?)?(?:,?\s+\d{{4}})?\b"),
        ("clock", r"\b\d{1,2}:\d{2}:\d{2}(?:\.\d+)?\b"),
        ("progress", r"\b\d{1,2}:\d{2}<\d{1,2}:\d{2}|\d+(?:\.\d+)?\s?(?:it/s|s/it)"),
        ("loops", r"\b\d[\d,]*\s+loops?\s+each"),
        (
            "duration",
            r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\s?"
            r"(?:ns|µs|μs|us|ms|s|sec|secs|seconds?|min|mins|minutes?|h|hr|hours?)\b",
        ),
        ("address", r"\b0x[0-9a-fA-F]{6,}\b"),
        ("uuid", r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"),
        ("tmpname", r"/tmp/tmp[\w-]+"),
    )
)
# A log line of a native library, as glog/absl/TensorFlow print them: `2020-10-20 14:03:22.123456:
# W path/file.cc:59] ...` (TensorFlow), `W1020 14:03:22.123456  4321 file.cc:59] ...` (glog, absl).
NATIVE_LOG = re.compile(
    r"^(?:\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d+: [IWEF] |[IWEF]\d{4} \d{2}:\d{2}:\d+\.\d+\s+\d+ )\S+:\d+\] "
)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.])|\b(?:nan|inf)\b")
_IMAGE = re.compile(r"^image/")


@dataclass(frozen=True)
class Comparison:
    status: str
    detail: str = ""


def output_text(outputs: list[dict[str, Any]]) -> str:
    """One comparable text for a cell's outputs.

    Consecutive stream chunks are joined per stream (a kernel splits them differently each
    run, and interleaves stdout and stderr as its threads happen to run), without native log
    lines on stderr; rich outputs compare by text/plain, or by their first other text form;
    images by hash.
    """
    parts: list[str] = []
    streams: dict[str, list[str]] = {}  # the run of stream outputs since the last other output
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream":
            streams.setdefault(out.get("name", "stdout"), []).append(text_of(out.get("text", "")))
            continue
        _flush(parts, streams)
        if kind == "error":
            parts.append(f"[error]\n{out.get('ename', '')}: {out.get('evalue', '')}")
        elif kind in ("execute_result", "display_data"):
            parts.append(f"[{kind}]\n" + _rich_text(out.get("data", {})))
    _flush(parts, streams)
    return "\n".join(parts)


def _flush(parts: list[str], streams: dict[str, list[str]]) -> None:
    for name in sorted(streams):
        text = "".join(streams[name])
        if name == "stderr":
            text = without_native_logs(text)
        if text:
            parts.append(f"[{name}]\n{text}")
    streams.clear()


def without_native_logs(text: str) -> str:
    """`text` without the lines NATIVE_LOG recognises."""
    return "".join(line for line in text.splitlines(keepends=True) if not NATIVE_LOG.match(line))


def text_of(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _rich_text(data: dict[str, Any]) -> str:
    pieces = []
    if "text/plain" in data:
        pieces.append(text_of(data["text/plain"]))
    else:
        for mime in sorted(data):
            if not _IMAGE.match(mime):
                value = data[mime]
                pieces.append(text_of(value) if isinstance(value, (str, list)) else json.dumps(value, sort_keys=True))
                break
    for mime in sorted(m for m in data if _IMAGE.match(m)):
        digest = hashlib.sha256(text_of(data[mime]).encode()).hexdigest()[:16]
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
    for a_text, b_text in zip(old_nums, new_nums, strict=True):
        a, b = float(a_text), float(b_text)
        if a == b or (math.isnan(a) and math.isnan(b)):
            continue
        if not math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL):
            return None
        worst = max(worst, abs(a - b) / max(abs(a), abs(b)))
    return worst


def short_diff(old: str, new: str, limit: int = DIFF_LINES) -> str:
    lines = [
        line
        for line in difflib.unified_diff(old.splitlines(), new.splitlines(), "saved", "now", lineterm="", n=0)
        if not line.startswith("@@")
    ]
    if len(lines) > limit + 2:
        lines = lines[: limit + 2] + [f"... ({len(lines) - limit - 2} more lines)"]
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
        return Comparison(
            NUMERIC_CLOSE, f"numbers agree within rtol={RTOL:g} (largest relative difference {worst:.2g})"
        )
    return Comparison(DIFFERS, short_diff(old_text, new_text))


def _masked_kinds(*texts: str) -> list[str]:
    kinds = [name for name, pattern in VOLATILE_PATTERNS if any(pattern.search(t) for t in texts)]
    return kinds or ["volatile text"]
