"""`kbundle kernels list|remove` and `kbundle gc`: the kernels kbundle registered, and what they leave.

Listings go to stdout (or one JSON object with `--json`); questions and progress go to
stderr. Without `--yes`, gc asks, and refuses to guess when stdin is not a terminal.
"""

from __future__ import annotations

import json
import os
import sys

import typer

kernels_app = typer.Typer(help="List or remove the kernels kbundle registered.", no_args_is_help=True)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


@kernels_app.command("list")
def kernels_list(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """The kernels kbundle registered: image, GPUs, health (image and workdir still there) and workdir."""
    from kbundle.kernel.spec import list_kernelspecs

    records = list_kernelspecs()
    # Each kernel's image is looked for on the engine it was registered against (DOCKER_HOST then).
    engines = {r.docker_host: _engine_or_none(r.docker_host) for r in records if not r.native}
    health = {r.name: kernel_health(r, engines.get(r.docker_host)) for r in records}
    if as_json:
        _print_json([dict(r.to_dict(), health=health[r.name]) for r in records])
        return
    if not records:
        typer.echo("no kbundle kernels (register one with `kbundle run BUNDLE`)")
        return
    rows = [("NAME", "IMAGE", "GPUS", "HEALTH", "WORKDIR")]
    rows += [(r.name, _runs(r), ",".join(r.gpus) or "cpu", health[r.name], r.workdir) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4])


def _runs(record) -> str:
    """What a kernel runs: its image, or `native <prefix>` for a kernel of `run --native`."""
    return f"native {record.native}" if record.native else record.image


def _engine_or_none(host: str = ""):
    """The Docker engine (DOCKER_HOST's, or `host`), or None when none answers (list still shows what it knows)."""
    from kbundle.image.engine import connect_or_none

    return connect_or_none(host=host)


def kernel_health(record, client) -> str:
    """`ok`, or what is broken: `image missing` (a native kernel's `prefix missing`, `prefix incomplete`),
    `workdir missing`; `unknown` when the image cannot be checked."""
    problems = [] if record.workdir and os.path.isdir(record.workdir) else ["workdir missing"]
    if record.native:
        from pathlib import Path

        from kbundle.image import native

        prefix = Path(record.native)
        if not prefix.is_dir():
            problems.insert(0, "prefix missing")
        elif not native.is_complete(prefix):
            problems.insert(0, "prefix incomplete")
        return ", ".join(problems) or "ok"
    image = _image_present(client, record.image)
    if image is False:
        problems.insert(0, "image missing")
    elif image and _damaged(client, record.image):
        problems.insert(0, "image damaged (kbundle run BUNDLE --rebuild)")
    if problems:
        return ", ".join(problems)
    return "ok" if image else "unknown"


def _damaged(client, image: str) -> bool:
    """Whether the image's environment no longer matches the file list recorded at its build
    (image/integrity.py; checked once per image, then remembered)."""
    from kbundle.image import integrity

    return integrity.check(client, image).state == integrity.DAMAGED


def _image_present(client, image: str):
    """True or False from the engine; None without one, or when it cannot say."""
    if client is None:
        return None
    import docker

    from kbundle.image import engine

    try:
        return engine.image_id(client, image) is not None
    except docker.errors.APIError:
        return None
    import docker

    try:
        client.api.inspect_image(image)
        return True
    except docker.errors.ImageNotFound:
        return False
    except docker.errors.APIError:
        return None


@kernels_app.command("remove")
def kernels_remove(
    ref: str = typer.Argument(
        ..., metavar="NAME", help="The kernel's name (with or without `kbundle-`) or the .kbundle it came from."
    ),
    image: bool = typer.Option(False, "--image", help="Remove the kernel's Docker image too."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: kernel, path, image, image_removed."),
) -> None:
    """Unregister one of kbundle's kernels; its image stays (until `kbundle gc`) unless --image.
    A native kernel's environment goes with it, unless another kernel uses it."""
    from kbundle.kernel.spec import find_kernel, list_kernelspecs, remove_kernelspec

    record = find_kernel(ref)
    if record.native:
        return _remove_native(record, as_json)
    client = None
    if image:
        from kbundle.kernel import gc as gcmod

        # On the engine the kernel was registered against (its kernelspec's), before anything is
        # removed: no half-done removal without an engine.
        client = gcmod.connect(record.docker_host)
        _refuse_while_running(client, record)
    path = remove_kernelspec(record.name)
    lines = [f"removed kernel {record.name} ({path})"]
    removed = False
    if not image:
        lines.append(
            f"its image {record.image} stays (`kbundle gc` removes unused images; --image removes it with the kernel)"
        )
    elif sharing := [k.name for k in list_kernelspecs() if k.image == record.image]:
        lines.append(f"its image {record.image} stays: kernel {', '.join(sharing)} uses it too")
    else:
        message = _remove_image(client, record.image)
        removed = message.startswith("removed")
        lines.append(message)
    if as_json:
        data = {"kernel": record.name, "path": str(path), "image": record.image, "image_removed": removed}
        _print_json(data)
        return
    typer.echo("\n".join(lines))


def _remove_native(record, as_json: bool) -> None:
    """A native kernel: the kernelspec, then its prefix unless another kernel uses it (or a run is installing it)."""
    from kbundle.kernel.spec import remove_kernelspec

    path = remove_kernelspec(record.name)
    message, removed = remove_native_prefix(record.native)
    if as_json:
        _print_json({"kernel": record.name, "path": str(path), "native": record.native, "native_removed": removed})
        return
    typer.echo(f"removed kernel {record.name} ({path})\n{message}")


def remove_native_prefix(prefix_text: str) -> tuple[str, bool]:
    """Remove a native prefix no registered kernel uses: (what happened, in words; removed)."""
    from pathlib import Path

    from kbundle.display import size
    from kbundle.image import native
    from kbundle.kernel.spec import list_kernelspecs

    prefix = Path(prefix_text)
    if sharing := [k.name for k in list_kernelspecs() if k.native == prefix_text]:
        return f"its environment {prefix} stays: kernel {', '.join(sharing)} uses it too", False
    if not prefix.exists():
        return f"its environment {prefix} was already gone", False
    if not native.is_ours(prefix):
        return f"its environment {prefix} stays: it holds no kbundle stamp, so kbundle leaves it alone", False
    if native.busy(prefix):
        return (
            f"its environment {prefix} stays: a kbundle run is installing it now (`kbundle gc` removes it later)",
            False,
        )
    freed = native.size_of(prefix)
    native.remove(prefix)
    return f"removed its environment {prefix} ({size(freed)})", True


def _refuse_while_running(client, record) -> None:
    """Removing the image of a kernel that runs would leave a live kernel on an image that is gone."""
    from kbundle.errors import KbundleError
    from kbundle.kernel.gc import running_on

    running = running_on(client, record.image)
    if running:
        names = ", ".join(running)
        raise KbundleError(
            f"kernel {record.name} is running on {record.image} (container {names}): shut it down from Jupyter "
            f"(Kernel > Shut Down Kernel) or with `docker stop {running[0]}`, then run this again; nothing removed"
        )


def _remove_image(client, image: str) -> str:
    import docker

    from kbundle.errors import KbundleError

    try:
        client.api.remove_image(image)
    except docker.errors.ImageNotFound:
        return f"its image {image} was already gone"
    except docker.errors.APIError as exc:
        raise KbundleError(f"could not remove the image {image}: {exc.explanation or exc}") from None
    return f"removed image {image}"


def gc(
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: items, removed, failed."),
    caches: bool = typer.Option(
        False, "--cache", help="Also empty kbundle's package, wheel and bytecode caches (refetched when needed)."
    ),
    pushed: bool = typer.Option(
        False, "--pushed", help="Also remove unused images of yours that carry a registry tag (pushed or pulled)."
    ),
) -> None:
    """Remove what kbundle made for you and nothing uses: leftover kernel containers, unused kbundle
    images, native environments, step images and temporary folders of killed runs (--cache: and caches).
    Images other users made on a shared engine, and images with a registry tag, are kept."""
    from kbundle.errors import KbundleError, MachineError
    from kbundle.kernel import gc as gcmod

    try:
        client = gcmod.connect()
    except MachineError as exc:  # what needs no engine (native environments, folders) is still swept
        client = None
        typer.echo(f"warning: {exc}: kernel containers and images are not checked", err=True)
    from kbundle.kernel.spec import list_kernelspecs

    kernels = list_kernelspecs()
    # The kernels' own engines too (Podman's socket, a rootless one, a GPU box), as they recorded them.
    others = {h: _engine_or_none(h) for h in gcmod.recorded_engines(kernels, os.environ.get("DOCKER_HOST", ""))}
    plan = gcmod.plan_gc(client, kernels=kernels, caches=caches, pushed=pushed, others=others)
    if not as_json:
        _print_plan(plan, gcmod)
    if not plan.items or dry_run:
        if as_json:
            typer.echo(json.dumps(dict(plan.to_dict(), removed=[], failed=[], dry_run=dry_run), indent=2))
        return
    if not yes:
        if not sys.stdin.isatty():
            raise KbundleError(
                f"{len(plan.items)} item(s) to remove; pass --yes to remove them "
                "(stdin is not a terminal, so kbundle cannot ask), or --dry-run to only list"
            )
        typer.echo(f"Remove these {len(plan.items)} item(s)? [y/N] ", err=True, nl=False)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise KbundleError("nothing removed: you declined")
    result = gcmod.apply_gc(plan, client, others)
    if as_json:
        typer.echo(json.dumps(dict(plan.to_dict(), **result.to_dict(), dry_run=False), indent=2))
    else:
        freed = sum(i.size or 0 for i in result.removed)
        typer.echo(f"removed {len(result.removed)} item(s)" + (f", {gcmod.human_size(freed)}" if freed else ""))
        for item, error in result.failed:
            typer.echo(f"could not remove {item.kind} {item.name}: {error}", err=True)
    if result.failed:
        raise typer.Exit(1)


def _print_plan(plan, gcmod) -> None:
    for line in plan.kept:
        typer.echo(f"kept: {line}")
    if not plan.items:
        typer.echo("nothing to remove")
        return
    for item in plan.items:
        size = gcmod.human_size(item.size)
        where = f", on {item.engine}" if item.engine else ""
        typer.echo(f"{item.kind:<9} {item.name}  ({item.reason}{', ' + size if size else ''}{where})")
