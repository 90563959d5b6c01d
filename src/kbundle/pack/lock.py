"""Lock the normalised environment for linux-64 with py-rattler.

The solve uses virtual packages for the image the bundle will run in (__unix,
__linux, __glibc of the base image, __archspec, and __cuda when CUDA is chosen), so
the lock says what will really be installed there. Before solving, every channel is
probed with a short timeout, so an offline sender gets a one-line answer in seconds
rather than a hang. rattler is imported only here, and only when a lock is wanted.
"""

from __future__ import annotations

import re
from pathlib import Path

from kbundle import contract
from kbundle.errors import KbundleError, UsageError
from kbundle.facts import normalise_facts
from kbundle.pack.records import CudaChoice, LockResult, NormalisedEnv

PROBE_TIMEOUT_S = 3.0


class LockError(KbundleError):
    """The environment cannot be solved for linux-64."""


def channel_urls(channels: list[str]) -> list[str]:
    """Resolve channel names the way conda does ('defaults', 'conda-forge', URLs, paths)."""
    facts = normalise_facts()
    urls: list[str] = []
    for channel in channels:
        if re.match(r"^[a-z][a-z0-9+.-]*://", channel):
            found = [channel.rstrip("/")]
        elif channel.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", channel):
            found = [Path(channel).resolve().as_uri()]
        elif channel in facts.channel_aliases:
            found = list(facts.channel_aliases[channel])
        else:
            found = [f"{facts.channel_alias}/{channel}"]
        urls.extend(u for u in found if u not in urls)
    return urls


def _reachable(url: str, timeout: float) -> bool:
    import urllib.error
    import urllib.request

    if url.startswith("file://"):
        return Path(urllib.request.url2pathname(url[len("file://") :])).is_dir()
    # Every conda channel has noarch/repodata.json. Only a real answer counts: an
    # intercepting proxy answers 404/403 for hosts it will not reach.
    request = urllib.request.Request(f"{url}/noarch/repodata.json", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code in (401, 405)  # needs a login (rattler has one), or refuses HEAD
    except (urllib.error.URLError, OSError, ValueError):
        return False


def unreachable(urls: list[str], timeout: float = PROBE_TIMEOUT_S) -> list[str]:
    """The channels that do not answer within `timeout` seconds (probed in parallel).

    The deadline covers name resolution too, which socket timeouts do not: a probe
    still running at the deadline counts as unreachable and is left behind."""
    from concurrent.futures import ThreadPoolExecutor, wait

    if not urls:
        return []
    pool = ThreadPoolExecutor(max_workers=min(8, len(urls)))
    futures = {pool.submit(_reachable, u, timeout): u for u in urls}
    done, _ = wait(futures, timeout=timeout + 0.5)
    pool.shutdown(wait=False, cancel_futures=True)
    return [u for f, u in futures.items() if f not in done or not f.result()]


def target(choice: CudaChoice) -> list[str]:
    """The image's virtual packages: its base's glibc, and CUDA when one was chosen."""
    return contract.target_virtual_packages(choice.glibc, choice.cuda)


def lock(env: NormalisedEnv, choice: CudaChoice, mode: str) -> LockResult:
    """Solve and return the lock text, or an unlocked result with a one-line note."""
    if mode not in ("auto", "always", "never"):
        raise UsageError(f"unknown --lock {mode!r}: use auto, always or never")
    if mode == "never":
        return LockResult(False, None, note="not locked (--lock never); the recipient will resolve the environment")
    urls = channel_urls(env.channels)
    # Asked once already when pack looked the packages up: do not wait for silent channels twice.
    down = env.channels_down if env.channels_down is not None else unreachable(urls)
    if down:
        message = f"channels unreachable ({', '.join(down)} did not answer with a conda index)"
        if mode == "always":
            raise LockError(f"cannot lock: {message}; use --channel to point at a mirror, or --lock auto")
        return LockResult(False, None, note=f"{message}: wrote an unlocked bundle; the recipient will resolve it")
    return _solve(env, choice, urls, mode)


def _solve(env: NormalisedEnv, choice: CudaChoice, urls: list[str], mode: str) -> LockResult:
    import asyncio

    from kbundle import solve

    vps = target(choice)
    try:
        records = asyncio.run(solve.solve(urls, [d.text for d in env.dependencies], vps))
    except solve.ChannelsDown as exc:
        if mode == "always":
            raise LockError(f"cannot lock: channels unreachable ({exc})") from None
        return LockResult(
            False, None, note=f"channels unreachable ({exc}): wrote an unlocked bundle; the recipient will resolve it"
        )
    except solve.Unsolvable as exc:
        raise LockError(f"cannot lock the environment for {contract.PLATFORM}: {exc} (or pass --lock never)") from None
    from kbundle import pydists

    python = next((str(r.version) for r in records if str(r.name.normalized) == "python"), None)
    text = solve.lock_text(records, urls, vps)
    return LockResult(True, text, tuple(vps), note=None, python=python, provided=pydists.from_records(records))
