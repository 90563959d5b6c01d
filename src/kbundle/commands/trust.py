"""`kbundle trust add|list`: the senders whose signed bundles this recipient trusts.

They live in an `allowed_signers` file (git's format) in kbundle's config folder; see kbundle/trust.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

trust_app = typer.Typer(help="Add or list the senders whose signed bundles you trust.", no_args_is_help=True)


@trust_app.command("add")
def trust_add(
    identity: str = typer.Argument(..., help="Who the key belongs to, as they sign: e.g. alice@example.com."),
    key: str = typer.Argument(..., help="Their SSH public key (`ssh-ed25519 AAAA…`) or the path of their .pub file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: identity, fingerprint, type, file."),
) -> None:
    """Trust bundles that IDENTITY signs with KEY."""
    from kbundle.trust import add_signer, allowed_signers_path

    entry = add_signer(identity, _key_text(key))
    if as_json:
        data = {"identity": entry.identity, "fingerprint": entry.fingerprint, "type": entry.key_type}
        typer.echo(json.dumps(data | {"file": str(allowed_signers_path())}, indent=2))
        return
    typer.echo(f"trusted {entry.identity} ({entry.fingerprint}) in {allowed_signers_path()}")


@trust_app.command("list")
def trust_list(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """The senders you trust: identity, key fingerprint and key type."""
    from kbundle.display import safe
    from kbundle.trust import allowed_signers_path, list_signers

    signers = list_signers()
    if as_json:
        typer.echo(
            json.dumps(
                [{"identity": s.identity, "fingerprint": s.fingerprint, "type": s.key_type} for s in signers], indent=2
            )
        )
        return
    if not signers:
        typer.echo(f"no trusted signers yet ({allowed_signers_path()}); add one with `kbundle trust add IDENTITY KEY`")
        return
    for s in signers:
        typer.echo(f"{safe(s.identity, 100)}\t{s.fingerprint}\t{s.key_type}")


def _key_text(key: str) -> str:
    """A key given inline, or read from a file when KEY names one."""
    from kbundle.errors import UsageError

    if key.split(None, 1)[0].startswith(("ssh-", "ecdsa-", "sk-")):
        return key
    path = Path(key).expanduser()
    if not path.is_file():
        raise UsageError(f"{key!r} is neither an SSH public key nor a .pub file")
    if path.stat().st_size > 64 * 1024:
        raise UsageError(f"{path} is too large to be an SSH public key")
    return path.read_text(encoding="utf-8", errors="replace")
