"""An early pip lock, made with nothing installed, adapted to the conda side that pack's conda
lock found afterwards, without running pip's resolver again.

pack starts pip beside rattler's solve, before it knows which Python packages conda will
install. When pip's choice then reaches some of them (`six`, `packaging`, `python-dateutil`
under ipykernel), pip with those installed would have kept conda's version wherever it
satisfies every requirement on it (pip never upgrades an installed package it does not have
to), and not looked at what only pip's own version of it needed. So: where conda's version
satisfies every requirement pip's report names on it, conda's is kept, and the packages that
nothing else reaches any more are left out. Where conda's version does not satisfy one, pip
itself must decide (it would replace conda's): `adapt` says None, and pack runs pip again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kbundle.pipplatform import target_markers
from kbundle.pydists import Provided
from kbundle.specs import PipPin, canonical


def adapt(
    report: dict, pins: Sequence[PipPin], provided: Sequence[Provided], python: str, top_level: Sequence[str]
) -> list[PipPin] | None:
    """`pins` (the report's exact pins) with conda's distributions kept where they satisfy every
    requirement on them (`top_level`: the pip lines as pip read them); None when one does not,
    so that only pip can say what it would do."""
    from packaging.requirements import InvalidRequirement, Requirement

    items = {canonical(str((i.get("metadata") or {}).get("name", ""))): i for i in report.get("install") or []}
    conda = {p.name: p for p in provided}
    env = target_markers(python)
    try:
        wanted = [Requirement(t) for t in top_level]
        wanted += [Requirement(t) for i in items.values() for t in (i.get("metadata") or {}).get("requires_dist") or []]
    except InvalidRequirement:
        return None
    extras: dict[str, set[str]] = {name: set(item.get("requested_extras") or []) for name, item in items.items()}
    for req in wanted:
        extras.setdefault(canonical(req.name), set()).update(req.extras)
    every_extra = set().union(*extras.values())
    kept = set(items) & set(conda)
    for req in wanted:
        name = canonical(req.name)
        if name in kept and _holds(req, env, every_extra) and not _accepts(req, conda[name].version):
            return None
    reached = _reached(items, kept, extras, env)
    return [pin for pin in pins if pin.name in reached]


def _accepts(req, version: str) -> bool:
    return req.specifier.contains(version, prereleases=True)


def _reached(items: dict, kept: set[str], extras: dict, env: dict) -> set[str]:
    """The names pip installs: from the top-level lines through each chosen package's
    requirements, stopping at conda's kept packages (their own needs are conda's)."""
    from packaging.requirements import Requirement

    todo = [name for name, item in items.items() if item.get("requested") and name not in kept]
    reached: set[str] = set()
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        for text in (items[name].get("metadata") or {}).get("requires_dist") or []:
            req = Requirement(text)
            target = canonical(req.name)
            if target in items and target not in kept and _holds(req, env, extras.get(name, set())):
                todo.append(target)
    return reached


def _holds(req, env: dict, extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in {"", *extras})
