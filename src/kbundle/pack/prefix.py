"""Read an environment straight from a conda prefix: `conda-meta/*.json` for the conda
packages and `*.dist-info` folders that no conda package owns for the pip ones. No
`conda` executable is needed, so this works for any prefix that jupyter can see."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from kbundle.errors import UsageError
from kbundle.pack.records import RawEnv
from kbundle.pack.textfiles import write_environment_yml
from kbundle.specs import PipPin, parse_conda_spec, parse_pip_line

_SUBDIR_TAIL = re.compile(r"/(?:noarch|(?:linux|osx|win)-[a-z0-9_]+)/?$")


def is_conda_prefix(path: Path) -> bool:
    return (path / "conda-meta").is_dir()


def channel_name(url: str) -> str:
    """'https://conda.anaconda.org/conda-forge/linux-64' -> 'conda-forge'."""
    base = _SUBDIR_TAIL.sub("", url.rstrip("/"))
    if base.startswith("https://repo.anaconda.com/pkgs/"):
        return "defaults"
    if base.startswith(("https://conda.anaconda.org/", "http://conda.anaconda.org/")):
        return base.split("/", 3)[3]
    return base


def _conda_records(prefix: Path) -> list[dict]:
    records = []
    for meta in sorted((prefix / "conda-meta").glob("*.json")):
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a damaged record should not stop us; the lock will notice gaps
        if isinstance(data, dict) and data.get("name") and data.get("version"):
            records.append(data)
    return records


def _site_packages(prefix: Path) -> list[Path]:
    found = sorted(prefix.glob("lib/python3*/site-packages")) + [prefix / "Lib" / "site-packages"]
    return [p for p in found if p.is_dir()]


def _pip_installed(prefix: Path, conda_files: set[str]) -> list[PipPin]:
    pins = []
    for site in _site_packages(prefix):
        for dist in sorted(site.glob("*.dist-info")):
            rel = dist.relative_to(prefix).as_posix()
            installer = (
                (dist / "INSTALLER").read_text(errors="replace").strip() if (dist / "INSTALLER").exists() else ""
            )
            if installer == "conda" or rel in conda_files:
                continue
            name, version = _metadata(dist)
            line = installed_line(dist, name, version) if name and version else None
            pin = parse_pip_line(line) if line else None
            if pin is not None:
                pins.append(pin)
    return pins


def installed_line(dist: Path, name: str, version: str) -> str:
    """The pip line that reinstalls what the dist-info records (PEP 610's direct_url.json): the
    exact version from an index; the VCS commit; the archive URL; a path stays a local path."""
    try:
        direct = json.loads((dist / "direct_url.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{name}=={version}"
    url = direct.get("url") if isinstance(direct, dict) else None
    if not isinstance(url, str) or not url:
        return f"{name}=={version}"
    if url.startswith("file:") or (direct.get("dir_info") or {}).get("editable"):
        return f"{name} @ {url}"  # a path on the sender's machine: normalisation drops it, saying why
    subdir = direct.get("subdirectory")
    fragment = f"#subdirectory={subdir}" if isinstance(subdir, str) and subdir else ""
    vcs = direct.get("vcs_info")
    if isinstance(vcs, dict) and vcs.get("vcs") and vcs.get("commit_id"):
        return f"{name} @ {vcs['vcs']}+{url}@{vcs['commit_id']}{fragment}"
    archive = direct.get("archive_info")
    if isinstance(archive, dict):
        hashes = archive.get("hashes") or {}
        digest = hashes.get("sha256") if isinstance(hashes, dict) else None
        return f"{name} @ {url}{fragment}" + (f" --hash=sha256:{digest}" if digest else "")
    return f"{name}=={version}"


def _metadata(dist: Path) -> tuple[str | None, str | None]:
    name = version = None
    try:
        with open(dist / "METADATA", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break
                if line.startswith("Name:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("Version:"):
                    version = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name, version


def read_prefix(prefix: Path, source_kind: str) -> RawEnv:
    records = _conda_records(prefix)
    if not records:
        raise UsageError(f"{prefix} has no conda packages in conda-meta/; pass -e environment.yml")
    # The dist-info folders conda packages own; every other one was installed by pip.
    conda_files = {
        f.replace("\\", "/").split(".dist-info/")[0] + ".dist-info"
        for r in records
        for f in r.get("files", [])
        if ".dist-info/" in f.replace("\\", "/")
    }
    records.sort(key=lambda r: r["name"])
    specs = [parse_conda_spec(f"{r['name']}={r['version']}={r.get('build', '')}".rstrip("=")) for r in records]
    counts = Counter(channel_name(r["channel"]) for r in records if r.get("channel"))
    channels = [name for name, _ in counts.most_common()]
    subdirs = Counter(r.get("subdir") for r in records if r.get("subdir") not in (None, "noarch"))
    pip = _pip_installed(prefix, conda_files)
    env = RawEnv(
        name=prefix.name,
        channels=channels,
        conda=specs,
        pip=pip,
        prefix=str(prefix),
        platform=subdirs.most_common(1)[0][0] if subdirs else None,
        source_kind=source_kind,
        source_file="environment.yml",
    )
    env.source_text = export_text(env)
    return env


def export_text(env: RawEnv) -> str:
    """The prefix as `conda env export` would print it, so the bundle keeps an original."""
    header = f"read by kbundle from the conda prefix {env.prefix} ({env.platform or 'unknown platform'})"
    return write_environment_yml(
        header, env.name, env.channels, [s.raw for s in env.conda], [p.raw for p in env.pip], env.prefix
    )
