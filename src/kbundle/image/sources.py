"""The source of a VCS or sdist pip requirement, fetched on the host without running any of its code.

git clones and checks out (no hooks travel with a clone); an sdist is downloaded, checked
against the bundle's hash when it has one, and unpacked safely. Its pyproject.toml is read as
data for the build requirements. The build itself is image/sourcebuild.py's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from kbundle.display import safe
from kbundle.errors import KbundleError
from kbundle.image.wheels import _matches_hash, _sha256s
from kbundle.specs import PipPin

_GIT_PROTOCOLS = ("https", "http", "ssh", "git")


def fetch_source(pin: PipPin, dest: Path) -> tuple[Path, str, str]:
    """The requirement's source tree in `dest`, what it was (`git+URL@commit`), its subdirectory."""
    from urllib.parse import parse_qs, urlsplit

    url, _, fragment = pin.url.partition("#")
    subdir = (parse_qs(fragment).get("subdirectory") or [""])[0].strip("/")
    if ".." in subdir.split("/"):
        raise KbundleError(f"pip: {pin.text} names a subdirectory outside its source")
    if pin.vcs:
        vcs, _, rest = url.partition("+")
        if vcs.lower() != "git":
            raise KbundleError(f"pip: {pin.text}: kbundle builds git requirements only, not {vcs}")
        parts = urlsplit(rest)
        ref = None
        if "@" in parts.path:
            path, ref = parts.path.rsplit("@", 1)
            parts = parts._replace(path=path)
        if parts.scheme.lower() not in _GIT_PROTOCOLS or (ref or "").startswith("-"):
            raise KbundleError(f"pip: {pin.text} is not a git URL kbundle fetches (https, http, ssh or git)")
        commit = _git_checkout(parts.geturl(), ref, dest)
        return dest, f"git+{parts.geturl()}@{commit}", subdir
    return _download_sdist(pin, url, dest), url, subdir


def _git_checkout(repo: str, ref: str | None, dest: Path) -> str:
    """Clone and check out on the host: git runs no code of the repository's (no hooks travel)."""
    import base64

    from kbundle.net import pip_environment
    from kbundle.specs import strip_credentials

    bare, had = strip_credentials(repo)
    env = dict(pip_environment(), GIT_TERMINAL_PROMPT="0", GIT_ALLOW_PROTOCOL=":".join(_GIT_PROTOCOLS))
    if had:  # a token in the URL goes in git's environment, never in argv
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(repo)
        auth = base64.b64encode(f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()).decode()
        count = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
        env.update(
            {
                "GIT_CONFIG_COUNT": str(count + 1),
                f"GIT_CONFIG_KEY_{count}": "http.extraHeader",
                f"GIT_CONFIG_VALUE_{count}": f"Authorization: Basic {auth}",
            }
        )

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or [f"git exited with {result.returncode}"])[-1]
            raise KbundleError(f"pip: cannot fetch {bare}: {detail}")
        return result.stdout.strip()

    if not shutil.which("git"):
        raise KbundleError(f"pip: fetching {bare} needs git on this machine (install git)")
    git("clone", "--quiet", "--no-checkout", "--", bare, str(dest))
    git("-C", str(dest), "-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", ref or "HEAD", "--")
    commit = git("-C", str(dest), "rev-parse", "HEAD")
    shutil.rmtree(dest / ".git", ignore_errors=True)
    return commit


def _download_sdist(pin: PipPin, url: str, dest: Path) -> Path:
    """Download a source archive next to `dest` (a folder of kbundle's cache) with the one
    downloader (image/download.py: proxies, CA, `.part`, sha256), check it against the bundle's
    hash when it has one, and unpack it safely."""
    import tarfile

    from kbundle.image import download
    from kbundle.specs import bundle_url, url_filename

    bundle_url(url)
    name = url_filename(url)
    dest.mkdir(parents=True)
    hashes = _sha256s(pin.hashes)
    archive = download.fetch_url(url, dest.parent / name, hashes[0] if len(hashes) == 1 else "", dest.parent)
    if not _matches_hash(archive, pin.hashes):
        raise KbundleError(f"pip: {safe(url)} does not match the bundle's hash")
    if name.endswith(".zip"):
        _unzip(archive, dest, url)
    else:
        try:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise KbundleError(f"pip: cannot unpack {safe(url)}: {exc}") from None
    roots = [p for p in dest.iterdir()]
    return roots[0] if len(roots) == 1 and roots[0].is_dir() else dest


def _unzip(archive: Path, dest: Path, url: str) -> None:
    """A zip sdist into `dest`: every member's every part a plain name (`specs.safe_filename`)."""
    import zipfile

    from kbundle.specs import safe_filename

    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if member.startswith("/"):
                    raise KbundleError(f"pip: {safe(url)} holds an unsafe path {safe(member)!r}")
                for part in member.rstrip("/").split("/"):
                    safe_filename(part, f"{safe(url)} member {safe(member)!r}")
            zf.extractall(dest)
    except (zipfile.BadZipFile, OSError) as exc:
        raise KbundleError(f"pip: cannot unpack {safe(url)}: {exc}") from None


def build_requires(src: Path) -> list[str]:
    """What the project's build backend needs (pyproject.toml, read as data), as pip lines."""
    default = ["setuptools>=40.8.0", "wheel"]
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return default
    try:
        data = tomllib.loads((src / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
    system = data.get("build-system") if isinstance(data, dict) else None
    if not isinstance(system, dict) or "requires" not in system:
        return default
    requires = [str(r) for r in system.get("requires") or [] if not str(r).startswith("-")]
    if any(r.lower().startswith("setuptools") for r in requires) and not any(r.startswith("wheel") for r in requires):
        requires.append("wheel")  # older setuptools asks for it at build time
    return requires
