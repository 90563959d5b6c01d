"""The channel: a real conda channel, indexed with py-rattler, built from this machine's Pythons.

For each of the world's CPythons (``common.world_pythons``: the running one and those
``KBUNDLE_WORLD_PYTHONS`` asks for, 3.7 by default) it holds that interpreter repackaged
as a relocatable ``python`` (RPATHs made ``$ORIGIN``-relative with patchelf, its shared
libraries carried along, its sysconfig data carrying conda's prefix placeholder), and
ipykernel, numpy, pip and all their dependencies converted from the PyPI wheels pip picks
for that Python. Binary wheels become ``pyXY_kbundle_0`` builds pinned to their Python;
pure wheels become ``noarch: python``, one ``pyh_kbundle_0`` build shared when every
Python got the same version with the same dependencies, else one ``pyh_pyXY_kbundle_0``
build per Python, pinned to it.

Cached under the world's directory: ``channel.stamp`` holds the recipe's fingerprint (the
Pythons included), and a channel whose stamp matches is reused as it is.
"""

from __future__ import annotations

import email.parser
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from kbundle import contract

from .common import WorldPython, log, running_python, world_dir, world_pythons

# Bump when the channel's recipe changes, so that a cached channel is rebuilt.
RECIPE_VERSION = "4"
# The packages the channel must carry; pip resolves their whole dependency tree.
TOP_LEVEL = ["ipykernel", "numpy", "pip"]
# conda's own prefix placeholder: rattler replaces it with the env's final prefix.
PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"
# Shared objects every glibc system has; everything else the interpreter needs is carried.
SYSTEM_LIBS = re.compile(r"^(linux-vdso|ld-linux|libc\.|libm\.|libpthread|libdl\.|librt\.|libutil\.)")
# Modules that need libraries a headless kernel never uses (Tk, NIS) or exist only for CPython's tests.
SKIP_DYNLOAD = re.compile(r"^(_tkinter|nis|_test|_ctypes_test|_xxtestfuzz|xxlimited|_xxsubinterpreters)")
SKIP_STDLIB_DIRS = {
    "site-packages",
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "lib2to3",
    "EXTERNALLY-MANAGED",  # Debian's PEP 668 marker: it would make pip refuse the env
}
# pip reads its install locations from distutils before Python 3.10, from sysconfig after.
DISTUTILS_UNTIL = (3, 10)
TIMESTAMP = 1700000000000  # ms; fixed so the channel's bytes do not depend on the day it was built


# --------------------------------------------------------------------------- conda packages


@dataclass
class PackageFile:
    path: str  # inside the package
    data: bytes
    mode: int = 0o644
    placeholder: bool = False
    link_target: str | None = None  # a symlink


@dataclass
class CondaPackage:
    name: str
    version: str
    build: str
    subdir: str
    depends: list[str]
    files: list[PackageFile] = field(default_factory=list)
    noarch: str | None = None
    entry_points: list[str] = field(default_factory=list)

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{self.build}.tar.bz2"


_SUBDIR_PLATFORM = {
    "linux-64": ("linux", "x86_64"),
    "win-64": ("win", "x86_64"),
    "osx-64": ("osx", "x86_64"),
    "osx-arm64": ("osx", "arm64"),
}


def _tarinfo(name: str, size: int = 0, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, TIMESTAMP // 1000
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_conda_package(pkg: CondaPackage, subdir_dir: Path) -> Path:
    """Write ``pkg`` as a v1 (.tar.bz2) conda package with info/index.json and info/paths.json."""
    paths = []
    for f in sorted(pkg.files, key=lambda f: f.path):
        entry = {"_path": f.path}
        if f.link_target is not None:
            entry.update(path_type="softlink")
        else:
            entry.update(path_type="hardlink", sha256=hashlib.sha256(f.data).hexdigest(), size_in_bytes=len(f.data))
            if f.placeholder:
                entry.update(prefix_placeholder=PLACEHOLDER, file_mode="text")
        paths.append(entry)
    index = {
        "name": pkg.name,
        "version": pkg.version,
        "build": pkg.build,
        "build_number": 0,
        "depends": sorted(pkg.depends),
        "subdir": pkg.subdir,
        "license": "see upstream",
        "timestamp": TIMESTAMP,
    }
    if pkg.noarch:
        index["noarch"] = pkg.noarch
    else:
        platform, arch = _SUBDIR_PLATFORM[pkg.subdir]
        index.update(platform=platform, arch=arch)
    info_files = {
        "info/index.json": json.dumps(index, indent=2, sort_keys=True),
        "info/paths.json": json.dumps({"paths": paths, "paths_version": 1}, indent=2),
        "info/files": "\n".join(f.path for f in sorted(pkg.files, key=lambda f: f.path)) + "\n",
    }
    if pkg.noarch == "python":
        info_files["info/link.json"] = json.dumps(
            {"noarch": {"type": "python", "entry_points": pkg.entry_points}, "package_metadata_version": 1}
        )
    placeholders = [f"{PLACEHOLDER} text {f.path}" for f in pkg.files if f.placeholder]
    if placeholders:
        info_files["info/has_prefix"] = "\n".join(placeholders) + "\n"
    subdir_dir.mkdir(parents=True, exist_ok=True)
    target = subdir_dir / pkg.filename
    tmp = target.with_suffix(".partial")
    with tarfile.open(tmp, "w:bz2", compresslevel=6) as tar:
        for name, text in info_files.items():
            data = text.encode()
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        for f in sorted(pkg.files, key=lambda f: f.path):
            if f.link_target is not None:
                info = _tarinfo(f.path, mode=0o777)
                info.type, info.linkname = tarfile.SYMTYPE, f.link_target
                tar.addfile(info)
            else:
                tar.addfile(_tarinfo(f.path, len(f.data), f.mode), io.BytesIO(f.data))
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------- CPython


def _ldd(path: Path) -> dict[str, str]:
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (\S+)", line)
        if m and m.group(2).startswith("/"):
            found[m.group(1)] = m.group(2)
    return found


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"\x7fELF"


def _set_rpath(path: Path, rpath: str) -> None:
    subprocess.run(["patchelf", "--set-rpath", rpath, str(path)], check=True)


def _stdlib_skipped(python: WorldPython):
    keep_distutils = tuple(int(x) for x in python.version.split(".")) < DISTUTILS_UNTIL

    def ignore(_folder: str, names: list[str]) -> list[str]:
        return [
            n
            for n in names
            if (n in SKIP_STDLIB_DIRS or (n == "distutils" and not keep_distutils))
            or n.startswith("config-")
            or SKIP_DYNLOAD.match(n)
            or n.endswith((".pyc", ".a"))
        ]

    return ignore


# Debian's site.py reads only dist-packages folders; conda's packages install into site-packages.
SITECUSTOMIZE = """\
# Added by kbundle's test world: this CPython's site.py (Debian's) reads only dist-packages.
import os
import site
import sys

site.addsitedir(os.path.join(sys.prefix, "lib", "python%d.%d" % sys.version_info[:2], "site-packages"))
"""


def _add_site_packages(stdlib: Path) -> None:
    """Make a Debian-patched stdlib read the env's site-packages (and not Debian's apport hook)."""
    if b"dist-packages" in (stdlib / "site.py").read_bytes():
        target = stdlib / "sitecustomize.py"
        target.unlink(missing_ok=True)  # Debian's is a symlink into /etc
        target.write_text(SITECUSTOMIZE)


def build_python_package(python: WorldPython | None = None) -> CondaPackage:
    """Repackage a CPython of this machine (the running one by default) as a relocatable conda
    package (libpython comes along if shared)."""
    if not shutil.which("patchelf"):
        raise SystemExit("error: patchelf is not installed (apt-get install patchelf)")
    python = python or running_python()
    src, ver = python.prefix, python.version
    with tempfile.TemporaryDirectory(prefix="kbundle-python-") as tmp:
        stage = Path(tmp)
        (stage / "bin").mkdir()
        shutil.copy2(src / "bin" / f"python{ver}", stage / "bin" / f"python{ver}")
        libdir = stage / "lib"
        libdir.mkdir()
        for lib in src.glob("lib/libpython3*.so*"):
            if not lib.is_symlink():
                shutil.copy2(lib, libdir / lib.name)
        shutil.copytree(
            src / "lib" / f"python{ver}", libdir / f"python{ver}", symlinks=True, ignore=_stdlib_skipped(python)
        )
        _add_site_packages(libdir / f"python{ver}")
        # RPATHs relative to each ELF file, and carry every non-glibc library along.
        elves = [p for p in stage.rglob("*") if p.is_file() and not p.is_symlink() and _is_elf(p)]
        carried: dict[str, str] = {}
        for elf in elves:
            for soname, real in _ldd(elf).items():
                if not SYSTEM_LIBS.match(soname) and not soname.startswith("libpython"):
                    carried[soname] = real
        for soname, real in carried.items():
            shutil.copyfile(real, libdir / soname)
            elves.append(libdir / soname)
        for elf in elves:
            rel = os.path.relpath(libdir, elf.parent)
            _set_rpath(elf, "$ORIGIN" if rel == "." else f"$ORIGIN/{rel}")
        files = []
        for p in sorted(stage.rglob("*")):
            rel = p.relative_to(stage).as_posix()
            if p.is_dir():
                continue
            data = p.read_bytes()
            # Only the sysconfig data names the prefix (pyenv's and conda's alike); a prefix such as
            # /usr also starts /usr/bin/env and /usr/share/zoneinfo, which must stay as they are.
            placeholder = p.name.startswith("_sysconfigdata") and p.suffix == ".py" and str(src).encode() in data
            if placeholder:
                data = data.replace(str(src).encode(), PLACEHOLDER.encode())
            files.append(PackageFile(rel, data, 0o755 if os.access(p, os.X_OK) else 0o644, placeholder))
        files += [
            PackageFile("bin/python3", b"", link_target=f"python{ver}"),
            PackageFile("bin/python", b"", link_target=f"python{ver}"),
        ]
        for lib in src.glob("lib/libpython3*.so*"):
            if lib.is_symlink():
                files.append(PackageFile(f"lib/{lib.name}", b"", link_target=os.readlink(lib)))
    return CondaPackage("python", python.full, "h_kbundle_world_0", "linux-64", [], files)


# --------------------------------------------------------------------------- wheels → conda


def download_wheels(dest: Path, python: WorldPython) -> list[Path]:
    """The wheels pip picks for ``python`` (versions that fit it: ipykernel 6.16 and numpy 1.21 for 3.7)."""
    shutil.rmtree(dest, ignore_errors=True)  # exactly what pip picks now: no stale versions from an earlier build
    dest.mkdir(parents=True)
    log(f"pip download {' '.join(TOP_LEVEL)} (wheels for CPython {python.version}, linux x86_64)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-qq",
            "--only-binary=:all:",
            "--dest",
            str(dest),
            "--python-version",
            python.version,
            "--implementation",
            "cp",
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "--platform",
            "manylinux_2_28_x86_64",
            *TOP_LEVEL,
        ],
        check=True,
    )
    return sorted(dest.glob("*.whl"))


def conda_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _marker_env(python: WorldPython) -> dict[str, str]:
    return {
        "python_version": python.version,
        "python_full_version": python.full,
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


def wheel_depends(metadata, available: set[str], python: WorldPython) -> list[str]:
    from packaging.requirements import Requirement

    depends = []
    for raw in metadata.get_all("Requires-Dist") or []:
        req = Requirement(raw)
        if req.marker and not req.marker.evaluate(_marker_env(python)):
            continue
        name = conda_name(req.name)
        if name not in available:
            # pip judged the markers by the interpreter running it, not by --python-version's.
            log(f"warning: {metadata['Name']} needs {raw!r} on CPython {python.version}; pip did not download it")
            continue
        spec = ",".join(str(s) for s in req.specifier)
        depends.append(f"{name} {spec}".strip())
    return depends


def wheel_to_conda(wheel: Path, available: set[str], python: WorldPython) -> CondaPackage:
    """A conda package of a wheel pip picked for ``python``: noarch when pure (build ``pyh_kbundle_0``,
    shared or not is ``noarch_builds``' choice), else linux-64 and pinned to ``python``."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
        wheel_meta = email.parser.Parser().parsestr(zf.read(f"{dist_info}/WHEEL").decode())
        pure = wheel_meta.get("Root-Is-Purelib", "").lower() == "true" and wheel.name.endswith("-none-any.whl")
        sp = "site-packages" if pure else f"lib/python{python.version}/site-packages"
        entry_points = _console_scripts(zf, dist_info)
        files = []
        for name in names:
            if name.endswith("/"):
                continue
            data = zf.read(name)
            mode = ((zf.getinfo(name).external_attr >> 16) & 0o777) or 0o644
            parts = name.split("/")
            if parts[0].endswith(".data"):
                kind, rest = parts[1], "/".join(parts[2:])
                target = {
                    "purelib": f"{sp}/{rest}",
                    "platlib": f"{sp}/{rest}",
                    "data": rest,
                    "scripts": f"{'python-scripts' if pure else 'bin'}/{rest}",
                }.get(kind)
                if target is None:
                    continue
            elif name == f"{dist_info}/RECORD":
                continue  # pip's RECORD names wheel paths, not the env's; conda-meta tracks the files
            elif name == f"{dist_info}/INSTALLER":
                continue
            else:
                target = f"{sp}/{name}"
            files.append(PackageFile(target, data, mode | 0o644))
        files.append(PackageFile(f"{sp}/{dist_info}/INSTALLER", b"conda\n"))
    name, version = conda_name(metadata["Name"]), metadata["Version"]
    depends = wheel_depends(metadata, available, python)
    if pure:
        requires_python = metadata.get("Requires-Python")
        depends.append(f"python {requires_python}".strip() if requires_python else "python")
        return CondaPackage(
            name, version, "pyh_kbundle_0", "noarch", depends, files, noarch="python", entry_points=entry_points
        )
    depends.append(python.pin)
    for ep in entry_points:  # binary packages carry their scripts, shebang set through the placeholder
        script, target = (s.strip() for s in ep.split("="))
        module, func = target.split(":")
        body = (
            f"#!{PLACEHOLDER}/bin/python\nimport sys\nfrom {module} import {func.split('.')[0]}\nsys.exit({func}())\n"
        )
        files.append(PackageFile(f"bin/{script}", body.encode(), 0o755, placeholder=True))
    return CondaPackage(name, version, f"{python.tag}_kbundle_0", "linux-64", depends, files)


def _console_scripts(zf: zipfile.ZipFile, dist_info: str) -> list[str]:
    try:
        text = zf.read(f"{dist_info}/entry_points.txt").decode()
    except KeyError:
        return []
    scripts, section = [], None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "console_scripts" and "=" in line:
            scripts.append(re.sub(r"\s+", " ", line).replace(" = ", " = "))
    return scripts


# --------------------------------------------------------------------------- the channel


def noarch_builds(made: list[tuple[WorldPython, CondaPackage]], every: list[WorldPython]) -> list[CondaPackage]:
    """The packages to write for one pure wheel (one name and version) converted for each Python in
    ``made``: one shared build when every Python of ``every`` got it alike, else one per Python,
    pinned to it (its dependencies were judged by that Python's markers)."""
    first = made[0][1]
    same = all(pkg.depends == first.depends and _contents(pkg) == _contents(first) for _, pkg in made)
    if same and {p.full for p, _ in made} == {p.full for p in every}:
        return [first]
    return [
        CondaPackage(
            pkg.name,
            pkg.version,
            f"pyh_{python.tag}_kbundle_0",
            pkg.subdir,
            [*pkg.depends, python.pin],
            pkg.files,
            noarch=pkg.noarch,
            entry_points=pkg.entry_points,
        )
        for python, pkg in made
    ]


def _contents(pkg: CondaPackage) -> list[tuple[str, bytes]]:
    return sorted((f.path, f.data) for f in pkg.files)


def build_channel(root: Path, pythons: list[WorldPython] | None = None) -> Path:
    pythons = pythons or world_pythons()
    channel = root / "channel"
    if channel.exists():
        shutil.rmtree(channel)
    pure: dict[str, list[tuple[WorldPython, CondaPackage]]] = {}
    for python in pythons:
        wheels = download_wheels(root / "wheels" / python.tag, python)
        available = {conda_name(w.name.split("-")[0]) for w in wheels} | {"python"}
        log(f"repackaging CPython {python.full} ({python.prefix}) as a relocatable conda package")
        write_conda_package(build_python_package(python), channel / "linux-64")
        for wheel in wheels:
            pkg = wheel_to_conda(wheel, available, python)
            if pkg.noarch:
                pure.setdefault(pkg.filename, []).append((python, pkg))
            else:
                write_conda_package(pkg, channel / pkg.subdir)
    for made in pure.values():
        for pkg in noarch_builds(made, pythons):
            write_conda_package(pkg, channel / pkg.subdir)
    (channel / "noarch").mkdir(exist_ok=True)
    log("indexing the channel with rattler")
    _index(channel)
    return channel


# Empty packages for other OSes (and a Linux libgfortran of another version line), as the real
# channels publish them, so that pack's "no linux-64 build" decision reads real repodata:
# (name, version, build, subdir).
STUBS = [
    ("vc", "14.3", "h2eaa2aa_17", "win-64"),
    ("vs2015_runtime", "14.36.32532", "h05e6639_17", "win-64"),
    ("icc_rt", "2022.1.0", "h6049295_2", "win-64"),
    ("appnope", "0.1.3", "py311h0_0", "osx-64"),
    ("appnope", "0.1.3", "py311h1_0", "osx-arm64"),
    ("libgfortran", "5.0.0.dev0", "11_0_1_hf114ba7_23", "osx-64"),
    ("libgfortran", "5.0.0", "13_2_0_h97931a8_3", "osx-arm64"),
    ("libgfortran", "14.2.0", "h69a702a_1", "linux-64"),
    # libcxx: the static table calls it macOS-only; the channel, which decides, has a Linux build.
    ("libcxx", "16.0.6", "h4653b0c_0", "osx-arm64"),
    ("libcxx", "16.0.6", "h59595ed_0", "linux-64"),
]


# Python packages the channel publishes beside the indexes' own, so that a conda side and a pip
# side can meet on one distribution: conda's kbdep 0.4 against the index's 0.3 (issue 17, "one
# environment"). (name, version, ORIGIN its module reports).
CONDA_DISTS = [("kbdep", "0.4", "conda")]


def ensure_conda_dists(channel: Path) -> bool:
    """Add the CONDA_DISTS the channel lacks (noarch, made from a wheel as every package here is)."""
    from .pypi import _module, wheel_bytes

    python = world_pythons()[0]
    added = False
    for name, version, origin in CONDA_DISTS:
        if list((channel / "noarch").glob(f"{name}-{version}-*.tar.bz2")):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            wheel = Path(tmp) / f"{name}-{version}-py3-none-any.whl"
            wheel.write_bytes(wheel_bytes(name, version, _module(name, version, origin)))
            write_conda_package(wheel_to_conda(wheel, set(), python), channel / "noarch")
        added = True
    if added:
        log("adding conda builds of the indexes' distributions and re-indexing")
        _index(channel)
    return added


def ensure_stubs(channel: Path) -> bool:
    """Add the STUBS the channel lacks and re-index it; True when something was added.

    A separate step, so a new stub does not rebuild the whole channel (the Python and the wheels)."""
    missing = [
        CondaPackage(name, version, build, subdir, [])
        for name, version, build, subdir in STUBS
        if not (channel / subdir / f"{name}-{version}-{build}.tar.bz2").exists()
    ]
    for pkg in missing:
        write_conda_package(pkg, channel / pkg.subdir)
    if missing:
        log(f"adding {len(missing)} stub packages for other platforms and re-indexing")
        _index(channel)
    return bool(missing)


def _index(channel: Path) -> None:
    import asyncio

    from rattler.index import index_fs

    result = index_fs(channel, write_zst=False, write_shards=False)
    if asyncio.iscoroutine(result):
        asyncio.run(result)


def fingerprint(pythons: list[WorldPython] | None = None) -> str:
    """The channel's recipe, its Pythons included: a cached channel whose stamp differs is rebuilt."""
    found = ";".join(f"{p.prefix}:{p.full}" for p in pythons or world_pythons())
    return f"{RECIPE_VERSION}:{found}:{','.join(TOP_LEVEL)}"


def ensure_channel(root: Path, pythons: list[WorldPython] | None = None) -> Path:
    """The channel under ``root``, built unless its stamp matches this recipe."""
    pythons = pythons or world_pythons()
    stamp = root / "channel.stamp"
    channel = root / "channel"
    recipe = fingerprint(pythons)
    if not (stamp.exists() and stamp.read_text() == recipe and (channel / "noarch/repodata.json").exists()):
        build_channel(root, pythons)
        stamp.write_text(recipe)
    ensure_stubs(channel)
    ensure_conda_dists(channel)
    return channel


# --------------------------------------------------------------------------- a plain rattler consumer


def linux_virtual_packages():
    from rattler import BuildString, GenericVirtualPackage, PackageName, Version

    return [
        GenericVirtualPackage(PackageName(name), Version(version), BuildString("0"))
        for name, version in (("__unix", "0"), ("__linux", "6.1"), ("__glibc", "2.36"))
    ]


def solve_and_install(channel: str, specs: list[str], staging: Path, final_prefix: str = contract.PREFIX) -> list:
    """Solve ``specs`` for linux-64 from ``channel`` with rattler alone (no kbundle code) and install
    into ``staging``, relocated for ``final_prefix``."""
    import asyncio

    import rattler

    async def run():
        records = await rattler.solve(
            [rattler.Channel(channel)],
            specs,
            platforms=["linux-64", "noarch"],
            virtual_packages=linux_virtual_packages(),
        )
        await rattler.install(
            records,
            target_prefix=str(staging),
            alternative_target_prefix=final_prefix,
            cache_dir=str(world_dir() / "pkgs"),
            show_progress=False,
        )
        return records

    return asyncio.run(run())
