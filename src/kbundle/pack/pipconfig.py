"""The package indexes an environment's installer was configured with, as `pip config list` and
uv would find them: pip's configuration files (global, user, the environment's own `pip.conf`,
`PIP_CONFIG_FILE`), then `PIP_INDEX_URL`, `PIP_EXTRA_INDEX_URL`, `PIP_FIND_LINKS`; for an
environment uv made or filled, also `UV_DEFAULT_INDEX`/`UV_INDEX_URL`, `UV_INDEX`/
`UV_EXTRA_INDEX_URL`, `UV_FIND_LINKS` and uv.toml. Only what the recipient can reach travels
(http and https URLs), and never a credential: each left-out one is said in a note.

See https://pip.pypa.io/en/stable/topics/configuration/ and
https://docs.astral.sh/uv/configuration/environment/.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path

from kbundle.pack.pipenv import Reading, carried_url

SYSTEM_FILES = (Path("/etc/pip.conf"),)  # after the XDG ones, as pip reads them
UV_SYSTEM_FILES = (Path("/etc/uv/uv.toml"),)
_OPTIONS = (("index-url", "--index-url"), ("extra-index-url", "--extra-index-url"), ("find-links", "--find-links"))


def pip_files(prefix: Path | None) -> list[Path]:
    """pip's configuration files, lowest priority first."""
    env_file = os.environ.get("PIP_CONFIG_FILE")
    if env_file == os.devnull:
        return []
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep)
    home = Path.home()
    xdg_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    files = [Path(d) / "pip" / "pip.conf" for d in reversed(xdg_dirs) if d] + list(SYSTEM_FILES)
    files += [home / ".pip" / "pip.conf", xdg_home / "pip" / "pip.conf"]
    if prefix is not None:
        files.append(prefix / "pip.conf")
    if env_file:
        files.append(Path(env_file))
    return [f for f in files if f.is_file()]


def pip_settings(prefix: Path | None) -> dict[str, tuple[str, str]]:
    """{option: (value, where)} as pip resolves them: later files win, `[install]` over `[global]`,
    environment variables over files."""
    found: dict[str, tuple[str, str]] = {}
    for path in pip_files(prefix):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                for key, value in parser.items(section):
                    key = key.replace("_", "-")
                    if key in dict(_OPTIONS) or key == "no-index":
                        found[key] = (value, str(path))
    for key, _ in _OPTIONS:
        value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            found[key] = (value, "PIP_" + key.upper().replace("-", "_"))
    return found


def uv_settings() -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    user = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "uv" / "uv.toml"
    for path in (*UV_SYSTEM_FILES, user):
        found.update(_uv_toml(path))
    for key, names in (
        ("index-url", ("UV_INDEX_URL", "UV_DEFAULT_INDEX")),
        ("extra-index-url", ("UV_EXTRA_INDEX_URL", "UV_INDEX")),
        ("find-links", ("UV_FIND_LINKS",)),
    ):
        for name in names:
            if os.environ.get(name):
                found[key] = (os.environ[name], name)
    return found


def _uv_toml(path: Path) -> dict[str, tuple[str, str]]:
    from kbundle.pack.pyproject import toml

    try:
        data = toml().loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, toml().TOMLDecodeError):
        return {}
    found = {}
    if isinstance(data.get("index-url"), str):
        found["index-url"] = (data["index-url"], str(path))
    extras = [str(u) for u in data.get("extra-index-url") or []]
    for index in data.get("index") or []:
        if isinstance(index, dict) and isinstance(index.get("url"), str):
            if index.get("default"):
                found["index-url"] = (index["url"], str(path))
            else:
                extras.append(index["url"])
    if extras:
        found["extra-index-url"] = (" ".join(extras), str(path))
    return found


def configured_indexes(prefix: Path | None, uv: bool, reading: Reading) -> None:
    """Add the indexes the environment's installer was configured with to `reading`."""
    settings = pip_settings(prefix)
    if uv:
        settings.update(uv_settings())
    if settings.get("no-index", ("", ""))[0].strip().lower() in ("1", "true", "yes", "on"):
        reading.notes.append(f"pip is configured with no-index ({settings['no-index'][1]}): its find-links alone")
    for key, option in _OPTIONS:
        value, where = settings.get(key, ("", ""))
        urls = value.split() if key != "index-url" else value.split()[:1]
        for url in urls:
            clean = carried_url(url, f"{option} ({where})", reading.notes)
            if clean is not None and not (option == "--index-url" and clean == "https://pypi.org/simple"):
                reading.add_option(option, clean)
