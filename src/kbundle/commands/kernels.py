"""`kbundle kernels list|remove` and `kbundle gc`: the kernels kbundle registered, and what they leave.

Listings go to stdout (or one JSON object with `--json`); questions and progress go to
stderr. Without `--yes`, gc asks, and refuses to guess when stdin is not a terminal.
"""

from __future__ import annotations

import json
import sys

import typer

kernels_app = typer.Typer(help="List or remove the kernels kbundle registered.", no_args_is_help=True)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


@kernels_app.command("list")
def kernels_list(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """The kernels kbundle registered, with their images and working directories."""
    from kbundle.kernel.spec import list_kernelspecs

    records = list_kernelspecs()
    if as_json:
        _print_json([r.to_dict() for r in records])
        return
    if not records:
        typer.echo("no kbundle kernels (register one with `kbundle run BUNDLE`)")
        return
    for r in records:
        where = ",".join(r.gpus) if r.gpus else "cpu"
        typer.echo(f"{r.name}\t{r.image}\t{where}\t{r.workdir}")


@kernels_app.command("remove")
def kernels_remove(
    name: str = typer.Argument(..., help="The kernel's name, as `kbundle kernels list` shows it."),
) -> None:
    """Unregister one of kbundle's kernels (its image stays until `kbundle gc`)."""
    from kbundle.kernel.spec import remove_kernelspec

    path = remove_kernelspec(name)
    typer.echo(f"removed kernel {name} ({path})")


def gc(
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: items, removed, failed."),
) -> None:
    """Remove leftover kernel containers, unused kbundle images and stale extracted bundles."""
    from kbundle.errors import KbundleError
    from kbundle.kernel import gc as gcmod

    client = gcmod.connect()
    plan = gcmod.plan_gc(client)
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
    result = gcmod.apply_gc(plan, client)
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
    if not plan.items:
        typer.echo("nothing to remove")
        return
    for item in plan.items:
        size = gcmod.human_size(item.size)
        typer.echo(f"{item.kind:<9} {item.name}  ({item.reason}{', ' + size if size else ''})")
