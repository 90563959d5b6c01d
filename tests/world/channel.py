"""The channel: a real conda channel, indexed with py-rattler, built from this machine's Python.

It holds a relocatable CPython repackaged from this machine's interpreter (RPATHs made
``$ORIGIN``-relative with patchelf, its shared libraries carried along, text files
carrying conda's prefix placeholder), and ipykernel, numpy, pip and all their
dependencies converted from PyPI wheels (pure wheels become ``noarch: python``).

Cached under the world's directory: ``channel.stamp`` holds the recipe's fingerprint, and
a channel whose stamp matches is reused as it is.
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

from .common import log, platform_full, python_version, world_dir

# Bump when the channel's recipe changes, so that a cached channel is rebuilt.
RECIPE_VERSION = "3"
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
    "distutils",
}
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


def build_python_package() -> CondaPackage:
    """Repackage this machine's CPython as a relocatable conda package (libpython comes along if shared)."""
    if not shutil.which("patchelf"):
        raise SystemExit("error: patchelf is not installed (apt-get install patchelf)")
    src = Path(sys.base_prefix)
    ver = python_version()
    with tempfile.TemporaryDirectory(prefix="kbundle-python-") as tmp:
        stage = Path(tmp)
        (stage / "bin").mkdir()
        shutil.copy2(src / "bin" / f"python{ver}", stage / "bin" / f"python{ver}")
        libdir = stage / "lib"
        libdir.mkdir()
        for lib in src.glob("lib/libpython3*.so*"):
            if not lib.is_symlink():
                shutil.copy2(lib, libdir / lib.name)
        stdlib_src = src / "lib" / f"python{ver}"
        shutil.copytree(
            stdlib_src,
            libdir / f"python{ver}",
            symlinks=True,
            ignore=lambda d, names: [
                n
                for n in names
                if n in SKIP_STDLIB_DIRS
                or n.startswith("config-")
                or SKIP_DYNLOAD.match(n)
                or n.endswith((".pyc", ".a"))
            ],
        )
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
            is_text = b"\0" not in data[:8192]
            placeholder = is_text and str(src).encode() in data
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
    full = ".".join(str(x) for x in sys.version_info[:3])
    return CondaPackage("python", full, "h_kbundle_world_0", "linux-64", [], files)


# --------------------------------------------------------------------------- wheels → conda


def download_wheels(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    log(f"pip download {' '.join(TOP_LEVEL)} (wheels for CPython {python_version()}, linux x86_64)")
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
            python_version(),
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


def _marker_env() -> dict[str, str]:
    return {
        "python_version": python_version(),
        "python_full_version": platform_full(),
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


def wheel_depends(metadata, available: set[str]) -> list[str]:
    from packaging.requirements import Requirement

    depends = []
    for raw in metadata.get_all("Requires-Dist") or []:
        req = Requirement(raw)
        if req.marker and not req.marker.evaluate(_marker_env()):
            continue
        name = conda_name(req.name)
        if name not in available:
            continue
        spec = ",".join(str(s) for s in req.specifier)
        depends.append(f"{name} {spec}".strip())
    return depends


def wheel_to_conda(wheel: Path, available: set[str]) -> CondaPackage:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
        wheel_meta = email.parser.Parser().parsestr(zf.read(f"{dist_info}/WHEEL").decode())
        pure = wheel_meta.get("Root-Is-Purelib", "").lower() == "true" and wheel.name.endswith("-none-any.whl")
        sp = "site-packages" if pure else f"lib/python{python_version()}/site-packages"
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
    depends = wheel_depends(metadata, available)
    if pure:
        requires_python = metadata.get("Requires-Python")
        depends.append(f"python {requires_python}".strip() if requires_python else "python")
        return CondaPackage(
            name, version, "pyh_kbundle_0", "noarch", depends, files, noarch="python", entry_points=entry_points
        )
    ver = python_version()
    major, minor = sys.version_info[:2]
    depends.append(f"python >={ver},<{major}.{minor + 1}.0a0")
    for ep in entry_points:  # binary packages carry their scripts, shebang set through the placeholder
        script, target = (s.strip() for s in ep.split("="))
        module, func = target.split(":")
        body = (
            f"#!{PLACEHOLDER}/bin/python\nimport sys\nfrom {module} import {func.split('.')[0]}\nsys.exit({func}())\n"
        )
        files.append(PackageFile(f"bin/{script}", body.encode(), 0o755, placeholder=True))
    tag = f"py{major}{minor}"
    return CondaPackage(name, version, f"{tag}_kbundle_0", "linux-64", depends, files)


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


def build_channel(root: Path) -> Path:
    channel = root / "channel"
    if channel.exists():
        shutil.rmtree(channel)
    wheels = download_wheels(root / "wheels")
    available = {conda_name(w.name.split("-")[0]) for w in wheels} | {"python"}
    log("repackaging CPython as a relocatable conda package")
    write_conda_package(build_python_package(), channel / "linux-64")
    for wheel in wheels:
        pkg = wheel_to_conda(wheel, available)
        write_conda_package(pkg, channel / pkg.subdir)
    (channel / "noarch").mkdir(exist_ok=True)
    log("indexing the channel with rattler")
    import asyncio

    from rattler.index import index_fs

    result = index_fs(channel, write_zst=False, write_shards=False)
    if asyncio.iscoroutine(result):
        asyncio.run(result)
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


def fingerprint() -> str:
    """The channel's recipe: a cached channel whose stamp differs is rebuilt."""
    return f"{RECIPE_VERSION}:{sys.base_prefix}:{platform_full()}:{','.join(TOP_LEVEL)}"


def ensure_channel(root: Path) -> Path:
    """The channel under ``root``, built unless its stamp matches this recipe."""
    stamp = root / "channel.stamp"
    channel = root / "channel"
    if not (stamp.exists() and stamp.read_text() == fingerprint() and (channel / "noarch/repodata.json").exists()):
        build_channel(root)
        stamp.write_text(fingerprint())
    ensure_stubs(channel)
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
