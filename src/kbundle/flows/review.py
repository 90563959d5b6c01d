"""The review `kbundle run` shows before it builds a stranger's bundle, and the consent question.

Everything here is gathered offline (pure, apart from reading the bundle's signature) and
every bundle-supplied string is escaped for the terminal: without --yes nothing touches
the network before the recipient says yes (docs/security.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from rich.markup import escape

from kbundle.display import safe, size
from kbundle.errors import KbundleError

DIFF_LINES = 80  # the review shows at most this much of a Dockerfile diff
DEFAULT_PIP_HOSTS = ("pypi.org", "files.pythonhosted.org")
DOCKER_HUB = "registry-1.docker.io"


def _ask(console, question: str) -> bool:
    console.print(escape(question), end="")  # "[y/N]" is not markup
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


# ----------------------------------------------------------------- the review (pure)


@dataclass(frozen=True)
class Review:
    """What the recipient agrees to, gathered without touching the network."""

    sender: str  # Signature.describe()
    base_image: str
    base_local: bool
    hosts: tuple[str, ...]  # every host that will be contacted
    conda: str  # "12 packages (34.5 MiB)" or "solved here from 3 specs"
    pip: int
    unusual: tuple[str, ...] = ()
    diff: tuple[str, ...] = ()  # unified diff, shipped -> rendered, each line escaped
    dockerfile: str = ""  # where the Dockerfile that will be built was written for reading
    disk: str = ""  # the disk the image and the build will take (flows/checks.py)


def review_lines(review: Review) -> list[str]:
    """The review as plain lines (every bundle-supplied string already escaped)."""
    pulled = "on this engine" if review.base_local else "will be pulled"
    lines = [
        f"sender      {review.sender}",
        f"base image  {safe(review.base_image)} ({pulled})",
        f"contacts    {', '.join(safe(h) for h in review.hosts) or 'nothing (all local)'}",
        f"conda       {review.conda}",
        f"pip         {review.pip} wheel(s)",
    ]
    if review.disk:
        lines.append(f"disk        {review.disk}")
    lines += [f"unusual     {u}" for u in review.unusual]
    if review.diff:
        lines.append("the bundle's Dockerfile differs from kbundle's rendering of its manifest:")
        lines += [f"  {d}" for d in review.diff]
    if review.dockerfile:
        lines.append(f"Dockerfile  {safe(review.dockerfile)}")
    return lines


def dockerfile_diff(shipped: str, rendered: str, limit: int = DIFF_LINES) -> tuple[str, ...]:
    """shipped -> rendered as a unified diff, each line escaped for the terminal; () when equal."""
    import difflib

    if shipped == rendered:
        return ()
    lines = [
        safe(line.rstrip("\n"))
        for line in difflib.unified_diff(
            shipped.splitlines(keepends=True),
            rendered.splitlines(keepends=True),
            "bundle's Dockerfile",
            "kbundle's rendering",
        )
    ]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... {len(lines) - limit} more line(s)"]
    return tuple(lines)


def url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url


def registry_of(image: str) -> str:
    """The registry a `docker pull` of `image` contacts (Docker Hub for plain names)."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return DOCKER_HUB


def pip_hosts(manifest) -> tuple[str, ...]:
    """Every host the pip: section contacts: its indexes (pip's defaults when it sets no
    `--index-url`), and the host of each direct (`name @ https://…`) and git (`git+https://…`)
    requirement. Offline, before consent: a line or index kbundle would refuse to fetch (an
    option, a local path, a URL that is not http(s) or has `..` in its path) refuses the bundle
    here, exit 3, before any request (`wheels.parse_pins`, `PipIndexes.from_dict`)."""
    from kbundle.image.wheels import parse_pins
    from kbundle.specs import PipIndexes

    indexes = PipIndexes.from_dict(getattr(manifest, "pip_indexes", None))
    found = [_pip_url_host(url) for url in indexes.urls()]
    if not indexes.index_url:
        found += DEFAULT_PIP_HOSTS
    found += [_pip_url_host(pin.url) for pin in parse_pins(getattr(manifest, "pip", None) or ()) if pin.url]
    return tuple(dict.fromkeys(found))


def _pip_url_host(url: str) -> str:
    """`host[:port]` of a pip URL, its `git+` prefix and any `user:token@` left out."""
    from urllib.parse import urlsplit

    body = url.split("+", 1)[1] if "+" in url.split("://", 1)[0] else url
    try:
        parts = urlsplit(body)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return url_host(body)
    return f"{host}:{port}" if port else host or url_host(body)


def unpinned(specs) -> list[str]:
    """Conda specs that name no version: what a solve here picks is anyone's guess."""
    return [s for s in specs if not any(c in s for c in "=<>~!") and len(s.split()) < 2]


def conda_summary(records, specs) -> str:
    if records is None:
        return f"not locked: solved here from {len(specs)} spec(s)"
    sizes = [r.size for r in records]
    total = f" ({size(sum(sizes))} to download at most)" if sizes and all(sizes) else ""
    return f"{len(records)} package(s), locked{total}"


# ----------------------------------------------------------------- the signature


def read_sender(bundle):
    """Who signed the bundle, and whether this recipient trusts them (kbundle/trust.py); a bad
    signature already made the bundle damaged when it was opened."""
    from kbundle.trust import read_signature

    return read_signature(bundle)


def trust(signature) -> None:
    from kbundle.trust import trust_signer

    trust_signer(signature)


def check_signature(signature, require: bool) -> None:
    """`--require-signature` means signed by someone this recipient trusts (allowed_signers), before
    anything is placed, pulled or asked. A valid signature by an unknown key proves only that its
    sender has a key (anyone can make one in a second), so it is refused too, `--yes` or not; the
    line names the command that would trust that key, for a recipient who knows it is the sender's."""
    if not require or signature.state == "trusted":
        return
    if signature.state == "unsigned":
        raise KbundleError("this bundle is not signed and --require-signature was given")
    advice = signature.trust_command()
    raise KbundleError(
        f"this bundle is {signature.describe()}, and --require-signature accepts only signers you trust; "
        + (f"if that key is the sender's, trust it with: {advice}" if advice else "the signer cannot be named")
    )


# ----------------------------------------------------------------- consent


def consent(
    console,
    *,
    yes: bool,
    review: Review,
    signature=None,
    ask: Callable[[Any, str], bool] = _ask,
    interactive: Optional[bool] = None,
) -> None:
    """A bundle is someone else's code: show what will happen and ask, unless --yes.

    An unknown signer gets a trust-on-first-use question in the same review."""
    if yes:
        return
    interactive = sys.stdin.isatty() if interactive is None else interactive
    if not interactive:
        raise KbundleError(
            "this bundle builds and runs someone else's code; review it (kbundle inspect, "
            "or run kbundle on a terminal to see the review) and pass --yes to build it "
            "(stdin is not a terminal, so kbundle cannot ask)"
        )
    console.print("[bold]About to build an image and register a kernel:[/]", soft_wrap=True)
    for line in review_lines(review):
        console.print(escape(line), soft_wrap=True, markup=True, highlight=False)
    if signature is not None and signature.state == "unknown":
        if ask(console, "Trust this signer for the bundles it signs from now on? [y/N] "):
            trust(signature)
    if not ask(console, "Build it and register the kernel? [y/N] "):
        raise KbundleError("not built: you declined (pass --yes to skip the question)")


# ----------------------------------------------------------------- run --native


@dataclass(frozen=True)
class NativeReview:
    """What `run --native` asks the recipient to agree to, gathered offline."""

    sender: str  # Signature.describe()
    prefix: str  # where the environment goes
    hosts: tuple[str, ...]
    conda: str
    pip: int
    builds: tuple[str, ...] = ()  # pip lines whose build code runs here: VCS and sdist requirements
    disk: str = ""
    unusual: tuple[str, ...] = ()
    workdir: str = ""
    slurm: str = ""  # `--slurm`: where the kernel runs (flows/native.py `_slurm_words`)


def native_review_lines(review: NativeReview) -> list[str]:
    """The native review as plain lines (pure; every bundle-supplied string escaped here)."""
    lines = [
        f"sender      {review.sender}",
        "runs        ON THIS MACHINE, AS YOU, OUTSIDE ANY CONTAINER: when the kernel runs, the bundle's "
        "code (its notebook, its conda and pip packages) can read and change your files, use your "
        "network and your credentials; nothing isolates it",
        f"prefix      {safe(review.prefix)} (the environment, installed here; `kbundle kernels remove` removes it)",
        f"contacts    {', '.join(safe(h) for h in review.hosts) or 'nothing (all local)'}",
        f"conda       {review.conda}",
    ]
    if review.pip:
        lines.append(
            f"pip         {review.pip} requirement(s), installed as wheels by the environment's own pip, "
            "whose Python runs on this machine as you"
        )
        lines += [
            f"build       {safe(line)}: its build code runs on this machine, as you, to make a wheel (no container)"
            for line in review.builds
        ]
        lines.append(
            ".pth        a .pth file in a wheel runs at every start of the environment's Python: kbundle "
            "reads the wheels' file lists and names any before installing it"
        )
    if review.slurm:  # the prefix is installed here; the kernel's code runs on the node
        lines.append(f"kernel      runs on {safe(review.slurm)}: every node must see the prefix at this path")
    if review.disk:
        lines.append(f"disk        {review.disk}")
    lines += [f"unusual     {u}" for u in review.unusual]
    if review.workdir:
        lines.append(f"workdir     {safe(review.workdir)}")
    return lines


def native_builds(pins) -> tuple[str, ...]:
    """The pip lines whose build code runs on the host under `--native`: VCS and sdist requirements (pure)."""
    from kbundle.specs import parse_pip_line

    found = []
    for text in pins:
        try:
            pin = parse_pip_line(text)
        except KbundleError:
            continue
        if pin is not None and (pin.vcs or (pin.url and not pin.wheel_url)):
            found.append(pin.text)
    return tuple(found)


def pth_lines(found) -> list[str]:
    """One line per wheel that carries `.pth` files (pure): what runs at every interpreter start."""
    by_wheel: dict[str, list[str]] = {}
    for wheel, pth in found:
        by_wheel.setdefault(wheel, []).append(pth)
    return [
        f"{safe(wheel)} installs {', '.join(safe(p) for p in names)}: it runs at every start of the "
        "environment's Python, the kernel's included"
        for wheel, names in sorted(by_wheel.items())
    ]


def consent_native(
    console,
    *,
    yes: bool,
    review: NativeReview,
    signature=None,
    ask: Callable[[Any, str], bool] = _ask,
    interactive: Optional[bool] = None,
) -> None:
    """`run --native` installs a stranger's environment on this machine: show it and ask, unless --yes."""
    if yes:
        return
    interactive = sys.stdin.isatty() if interactive is None else interactive
    if not interactive:
        raise KbundleError(
            "--native installs this bundle on this machine, where its code runs as you, outside any container; "
            "review it (kbundle inspect, or run kbundle on a terminal to see the review) and pass --yes to "
            "install it (stdin is not a terminal, so kbundle cannot ask)"
        )
    console.print("[bold]About to install an environment on this machine and register a kernel:[/]", soft_wrap=True)
    for line in native_review_lines(review):
        console.print(escape(line), soft_wrap=True, highlight=False)
    if signature is not None and signature.state == "unknown":
        if ask(console, "Trust this signer for the bundles it signs from now on? [y/N] "):
            trust(signature)
    if not ask(console, "Install it on this machine and register the kernel? [y/N] "):
        raise KbundleError("not installed: you declined (pass --yes to skip the question)")


def consent_pth(
    console, *, yes: bool, found, ask: Callable[[Any, str], bool] = _ask, interactive: Optional[bool] = None
) -> list[str]:
    """Wheels carrying `.pth` files, named before they are installed. With --yes they are warnings
    (returned); otherwise a question, whose "no" stops the run before pip installs anything."""
    lines = pth_lines(found)
    if not lines or yes:
        return lines
    interactive = sys.stdin.isatty() if interactive is None else interactive
    if not interactive:
        raise KbundleError(
            f"{lines[0]}; pass --yes to install it anyway (stdin is not a terminal, so kbundle cannot ask)"
        )
    for line in lines:
        console.print(f"[yellow].pth[/]        {escape(line)}", soft_wrap=True, highlight=False)
    if not ask(console, "Install these wheels all the same? [y/N] "):
        raise KbundleError("not installed: you declined the wheels' .pth files (pass --yes to skip the question)")
    return []
