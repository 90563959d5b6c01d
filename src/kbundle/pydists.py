"""The Python distributions the conda side of an environment provides, as pip sees them.

On the sender's machine `pip install` ran inside the conda environment: every conda package
built for Python had put its `*.dist-info` into site-packages, so pip's resolver took those as
installed and left them alone wherever they satisfied a requirement. kbundle's pip resolution
(pack's lock, and run's when pack could not lock) must see the same, or pip would overwrite
conda's absl-py 0.10 with 2.5, or protobuf 3.13 with 4.24, in the friend's image.

So a resolution runs in a stand-in interpreter (`installed_site`): a venv without pip whose
site-packages holds one empty `*.dist-info` per provided distribution, naming it and its
version only. pip then chooses exactly as it would have in the conda environment; its report
lists only what it would install. Which conda package installs which distribution is a sourced
table (data/conda_pypi.yaml); the rest follows the package's own name.

Pack and run both use this module, so it lives at the top (pack/ and image/ do not import each other).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kbundle.specs import canonical

# A conda build string made for Python: py37_0, py_0, pyhd3eb1b0_3, gpu_py37h7db9008_0, cuda112py38h…
_PY_BUILD = re.compile(r"(?:^|[_\d])py(?:\d|_|h[0-9a-f]|$)")


@dataclass(frozen=True, order=True)
class Provided:
    """One distribution the conda side installs: its PyPI name (canonical), version and conda package."""

    name: str
    version: str
    conda: str


def distribution_of(conda_name: str) -> str | None:
    """The distribution pip sees for a conda package built for Python; None when it installs none."""
    from kbundle.facts import conda_pypi

    names = conda_pypi().names
    key = conda_name.lower()
    if key in names:
        return canonical(names[key]) if names[key] else None
    return canonical(conda_name)


def pep440(version: str) -> str | None:
    """A conda version as pip reads it; None when pip could not ('1.0_pre' -> '1.0.pre' is fine)."""
    from packaging.version import InvalidVersion, Version

    for text in (version, version.replace("_", ".")):
        try:
            return str(Version(text))
        except InvalidVersion:
            continue
    return None


def built_for_python(build: str | None, depends: Sequence[str] | None = None) -> bool | None:
    """Whether a conda package is a Python package: its depends name python (a lock record), or its
    build string says so (an export). None: nothing tells (an export without build strings)."""
    if depends is not None:
        return any(re.split(r"[\s=<>!]", d.strip(), maxsplit=1)[0] in ("python", "python_abi") for d in depends)
    if build:
        return bool(_PY_BUILD.search(build.lower()))
    return None


def provided(entries: Iterable[tuple[str, str, bool | None]]) -> tuple[Provided, ...]:
    """(conda name, version, built for Python) -> what pip sees installed. A package whose kind is
    unknown counts when the table or its name make it a distribution."""
    found: dict[str, Provided] = {}
    for conda, version, for_python in entries:
        dist = distribution_of(conda)
        pip_version = pep440(version) if version else None
        if dist is None or pip_version is None or for_python is False:
            continue
        found.setdefault(dist, Provided(dist, pip_version, conda))
    return tuple(sorted(found.values()))


def from_records(records: Sequence) -> tuple[Provided, ...]:
    """From rattler's solved records (pack's lock, run's solve)."""
    return provided(
        (str(r.name.normalized), str(r.version), built_for_python(None, [str(d) for d in r.depends])) for r in records
    )


def from_site_packages(prefix: Path) -> tuple[Provided, ...]:
    """What an installed environment really holds: its `*.dist-info` and `*.egg-info` (run, after conda)."""
    found: dict[str, Provided] = {}
    for site in prefix.glob("lib/python3*/site-packages"):
        for meta in sorted(site.iterdir()):
            parsed = _dist_folder_name(meta.name)
            if parsed is not None:
                name, version = parsed
                found.setdefault(name, Provided(name, version, "installed"))
    return tuple(sorted(found.values()))


def _dist_folder_name(folder: str) -> tuple[str, str] | None:
    # name-version.dist-info; name-version[-pyX.Y[-platform]].egg-info
    match = re.match(r"^(.+?)-([^-]+?)(?:-py\d[\d.]*(?:-.+)?)?\.(?:dist-info|egg-info)$", folder)
    if not match:
        return None
    version = pep440(match.group(2))
    return (canonical(match.group(1)), version) if version else None


def installed_site(provided_dists: Sequence[Provided], folder: Path) -> Path:
    """A stand-in interpreter in `folder` whose site-packages holds a stand-in for each provided
    distribution, and through which pip itself (kbundle's own, not installed there) can run:
    `[that python, "-m", "pip", ...]` resolves as if in the conda environment.

    Made by hand as `venv` would make it (pyvenv.cfg, a link to this interpreter, an empty
    site-packages), in milliseconds; pip's package is reached through a `.pth` file naming a
    folder that holds only a link to it, so no other distribution of kbundle's own environment
    is seen as installed."""
    import pip

    root = folder / "installed"
    base = Path(getattr(sys, "_base_executable", None) or sys.executable).resolve()
    version = ".".join(str(part) for part in sys.version_info[:3])
    site = root / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site.mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "pyvenv.cfg").write_text(
        f"home = {base.parent}\ninclude-system-site-packages = false\nversion = {version}\n", encoding="utf-8"
    )
    python = root / "bin" / "python"
    python.symlink_to(base)
    only_pip = root / "pip-only"
    only_pip.mkdir()
    (only_pip / "pip").symlink_to(Path(pip.__file__).resolve().parent)
    (site / "_kbundle_pip.pth").write_text(f"{only_pip}\n", encoding="utf-8")
    add_stand_ins(python, provided_dists)
    return python


def add_stand_ins(interpreter: Path, provided_dists: Sequence[Provided]) -> None:
    """Put stand-ins for `provided_dists` into the stand-in interpreter's site-packages. pip reads
    site-packages when it resolves, so they may come after the interpreter has started."""
    site = next(interpreter.parent.parent.glob("lib/python3*/site-packages"))
    for dist in provided_dists:
        _stand_in(site, dist)


# A stand-in interpreter started before pack knows what to resolve: it imports pip (a third of
# a second) while pack reads the environment, then runs the one pip command it is sent.
_WARM = """
import json, os, sys
from pip._internal.cli.main import main
from pip._internal.commands import install  # noqa: F401  the resolver's imports, done while waiting
request = json.loads(sys.stdin.readline() or "null")
if request is None:
    sys.exit(0)
os.environ.clear()
os.environ.update(request["env"])
sys.exit(main(request["args"]))
"""


class WarmPip:
    """pip, started early in a stand-in interpreter, for one command (`run`); `close` if unused."""

    def __init__(self, folder: Path):
        self._used = False
        self.interpreter = installed_site((), folder)
        self._proc = subprocess.Popen(
            [str(self.interpreter), "-c", _WARM],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @property
    def fresh(self) -> bool:
        """Not used yet, and still waiting (it serves one command)."""
        return not self._used and self._proc.poll() is None

    def run(self, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        import json

        self._used = True
        request = json.dumps({"args": args, "env": env}) + "\n"
        stdout, stderr = self._proc.communicate(request)
        return subprocess.CompletedProcess(args, self._proc.returncode, stdout, stderr)

    def close(self) -> None:
        """End it, used or not (a lock still running in its thread then fails, unheard)."""
        if self._proc.poll() is None:
            self._proc.kill()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a killed process is reaped at once
            pass


def pip_command(interpreter: Path) -> list[str]:
    """pip's command line, run by the stand-in interpreter."""
    return [str(interpreter), "-m", "pip"]


def _stand_in(site: Path, dist: Provided) -> None:
    info = site / f"{dist.name.replace('-', '_')}-{dist.version}.dist-info"
    info.mkdir(exist_ok=True)
    # Name and version only: conda, not pip, answers for the package's own dependencies.
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist.name}\nVersion: {dist.version}\n", encoding="utf-8"
    )
    (info / "INSTALLER").write_text("conda\n", encoding="utf-8")
    (info / "RECORD").write_text("", encoding="utf-8")


def from_pinned_specs(specs: Sequence, builds: dict[str, str | None]) -> tuple[Provided, ...] | None:
    """From an environment file whose every conda line names one version (a full `conda env
    export`); None when one does not, since only a solve can then say what conda installs.
    `builds`: the build string the export gave each package, which tells a Python package apart."""
    entries = []
    for spec in specs:
        if spec.name == "python":
            continue
        if not spec.version or spec.constraint or "*" in spec.version:
            return None
        entries.append((spec.name, spec.version, built_for_python(builds.get(spec.name))))
    return provided(entries)
