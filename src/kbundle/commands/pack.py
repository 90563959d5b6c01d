"""`kbundle pack`: the sender's command.

Thin: parse options, call the pack flow (kbundle/flows/pack.py), print. Heavy imports stay
inside the functions so `kbundle pack --lock never` starts fast.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from kbundle.display import safe, size


def pack(
    notebook: Path = typer.Argument(..., help="The notebook (.ipynb) to pack."),
    env_file: Optional[Path] = typer.Option(
        None,
        "-e",
        "--env",
        help=(
            "The environment, when pack should not find it from the notebook's kernel: environment.yml (any OS), "
            "conda-lock.yml, pixi.lock or pixi.toml, uv.lock, pyproject.toml, or a requirements file."
        ),
    ),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Where to write the bundle (default: ./NOTEBOOK.kbundle)."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="The bundle's (and kernel's) name; default: the notebook's name."
    ),
    cuda: str = typer.Option("auto", "--cuda", help="auto, none (CPU image), or a CUDA version X.Y to force."),
    base_image: Optional[str] = typer.Option(
        None, "--base-image", help="Use this base image instead of the chosen nvidia/cuda tag."
    ),
    include: list[Path] = typer.Option(
        [], "--include", help="A file or folder beside the notebook to carry along (repeatable)."
    ),
    lock: str = typer.Option("auto", "--lock", help="auto (lock if the channels answer), always, or never."),
    channel: list[str] = typer.Option(
        [],
        "--channel",
        help="Channel URL or name to solve against; replaces the environment's channels (repeatable, in priority order).",
    ),
    add_channel: list[str] = typer.Option(
        [],
        "--add-channel",
        help="Channel URL or name to solve against before the environment's own channels (repeatable).",
    ),
    python: Optional[str] = typer.Option(
        None,
        "--python",
        help="Python version X.Y, when neither the environment nor the notebook's metadata says which.",
    ),
    extra: list[str] = typer.Option(
        [],
        "--extra",
        help="An optional-dependencies group (or dependency group) of a pyproject.toml or uv.lock to add (repeatable).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the bundle's manifest as JSON instead of a summary."),
    sign: Optional[Path] = typer.Option(
        None, "--sign", help="Sign the bundle with this SSH private key (its .pub comment names you)."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Refuse to write the bundle if anything is dropped, unreadable or in CUDA conflict."
    ),
    strip_outputs: bool = typer.Option(
        False,
        "--strip-outputs",
        help="Carry the notebook with its outputs and execution counts cleared (the code stays; your file is unchanged).",
    ),
) -> None:
    """Pack a notebook, its environment (cleaned for linux-64 and locked) and a Dockerfile into one file."""
    from kbundle.bundle.limits import MAIL_LIMIT
    from kbundle.flows.pack import PackOptions, StrictError
    from kbundle.flows.pack import pack as run_pack

    options = PackOptions(
        notebook=notebook,
        env_file=env_file,
        output=output,
        name=name,
        cuda=cuda,
        base_image=base_image,
        includes=list(include),
        lock=lock,
        channels=list(channel),
        add_channels=list(add_channel),
        python=python,
        sign=sign,
        strict=strict,
        strip_outputs=strip_outputs,
        extras=list(extra),
    )
    try:
        result = run_pack(options, progress=_progress)
    except StrictError as exc:
        # --strict: every problem on its own line, then a non-zero exit; no bundle was written.
        for problem in exc.problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(exc.exit_code) from None
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if result.size > MAIL_LIMIT:
        typer.echo(
            f"warning: {result.path.name} is {size(result.size)}; mail servers often refuse attachments over 20 MiB",
            err=True,
        )
    if as_json:  # the same object `kbundle inspect --json` prints: the manifest and its signature
        typer.echo(json.dumps({**result.manifest.to_dict(), "signature": _signature(result.path).to_dict()}, indent=2))
        return
    _summary(result, _signature(result.path).describe() if sign is not None else None)


def _signature(path: Path):
    """The written bundle's signature, as a recipient will see it (read back and verified)."""
    from kbundle.bundle import open_bundle
    from kbundle.trust import read_signature

    return read_signature(open_bundle(path))


def _progress(message: str):
    """A spinner on stderr while a slow step runs; nothing when stderr is not a terminal."""
    import contextlib

    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message)


def _summary(result, signature: str | None = None) -> None:
    """What was written, what the recipient runs and needs, and last the lock status line."""
    m = result.manifest
    stripped = (
        f" (outputs cleared: {size(result.stripped[1])}, was {size(result.stripped[0])})" if result.stripped else ""
    )
    lines = [
        f"wrote {result.path} ({size(result.size)})",
        f"  name       {m.name}",
        f"  notebook   {m.notebook}{stripped}",
        f"  python     {m.python or 'unpinned'}",
        f"  cuda       {m.cuda or 'none'}"
        + (f", cuDNN {m.cudnn}" if m.cudnn else "")
        + (" (runtime inside the environment)" if m.cuda and m.cuda_runtime_in_env else ""),
        f"  base image {m.base_image}",
        f"  because    {m.base_image_reason}",
        f"  channels   {', '.join(m.channels)}" + _channels_note(m),
        f"  packages   {len(m.dependencies)} conda, {len(m.pip)} pip",
        f"  locked     {'yes (linux-64)' if m.locked else 'no'}",
    ]
    for d in m.dropped:
        lines.append(f"  dropped    {d.spec}: {d.reason}")
    for c in m.changed:
        lines.append(f"  changed    {c.spec} -> {c.to}: {c.reason}")
    for v in m.variants:
        lines.append(f"  kept       {v.spec} ({v.intent})")
    if signature is not None:
        lines.append(f"  signature  {signature}")
    lines += recipient_lines(result.path.name, m)
    lines.append(lock_status(m))  # last, always: scripts and tests read the lock status there
    typer.echo("\n".join(lines))


def recipient_lines(filename: str, m) -> list[str]:
    """What the person who gets the bundle runs, and what their machine needs for it."""
    needs = ["Docker or Podman (without one: kbundle run --native, outside any container)"]
    if m.cuda:
        needs.append(
            f"an NVIDIA GPU, its driver{_driver(m.cuda)} for CUDA {m.cuda} and the NVIDIA Container Toolkit "
            "(not with --native)"
        )
    needs.append('kbundle (its README, "For the recipient", says how to install it)')
    needs.append("JupyterLab only for `kbundle run --lab`")
    return [
        f"  next       the recipient runs: kbundle run {safe(shlex.quote(filename))}",
        f"  they need  {'; '.join(needs)}",
    ]


def _driver(cuda: str) -> str:
    """` (>= 520.61.05)`: the oldest driver with full support for `cuda`, from kbundle's tables."""
    from kbundle.facts import load_tables

    try:
        need = load_tables().min_driver(cuda)
    except Exception:  # a version the table cannot read: the sentence stands without the number
        return ""
    return f" (>= {need[1]})" if need else ""


def _channels_note(m) -> str:
    added = [a for a in m.added if a.spec.startswith("channel ")]
    if len(added) == 1:
        return f" ({added[0].reason})"
    # Several: each reason says which channel it is for (two spec-only channels, say).
    return " (" + "; ".join(f"{a.spec.removeprefix('channel ')}: {a.reason}" for a in added) + ")" if added else ""


def lock_status(m) -> str:
    """The summary's last line: which side is locked, and what the recipient will still resolve."""
    from kbundle.specs import parse_pip_line

    pip_locked = bool(m.pip) and getattr(m, "pip_locked", False)
    # Exact pins that pip could not lock are the sender's top level only: their dependencies
    # are still the recipient's pip's to resolve.
    loose = [] if pip_locked else list(m.pip)
    # The note was printed above in full; this line keeps its cause, not its "the recipient will
    # resolve it", which the line itself says.
    why_conda = f": {re.split(r': wrote |; the recipient ', m.lock_note, maxsplit=1)[0]}" if m.lock_note else ""
    if not m.locked:
        if pip_locked:
            return f"pip locked, conda unlocked{why_conda}"
        if m.pip:
            return f"unlocked: the recipient will resolve the whole environment, conda and pip{why_conda}"
        return f"unlocked: the recipient will resolve the whole environment{why_conda}"
    if loose:
        exact = all(_exact(parse_pip_line, p) for p in loose)
        what = "the dependencies of the pip pins" if exact else "the pip lines"
        return f"conda locked, pip unlocked: the recipient will resolve {what} {', '.join(loose)}"
    return "fully locked: every conda package" + (" and pip pin" if m.pip else "") + " is fixed"


def _exact(parse, line: str) -> bool:
    try:
        pin = parse(line)
    except Exception:  # a line the reader refuses is, for this summary, not an exact pin
        return False
    return pin is not None and pin.exact
