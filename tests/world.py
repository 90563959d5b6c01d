#!/usr/bin/env python3
"""The offline world: a CUDA-base stand-in image and a real conda channel, built on this machine.

No container registry and no conda channel can be reached from our machines, so the
tests build their own:

* ``base_image``: Debian bookworm from ``debootstrap --variant=minbase``, imported into
  Docker. It stands in for an ``nvidia/cuda`` base (which is also a plain distro image).
* ``channel``: a conda channel served over HTTP on 127.0.0.1, indexed with py-rattler. It
  holds a relocatable CPython repackaged from this machine's interpreter (RPATHs made
  ``$ORIGIN``-relative with patchelf, its shared libraries carried along, text files
  carrying conda's prefix placeholder), and ipykernel, numpy, pip and all their
  dependencies converted from PyPI wheels (pure wheels become ``noarch: python``).

Usage::

    python tests/world.py up     # build or reuse; last stdout line is a JSON object
    python tests/world.py down   # remove what ``up`` made

``up`` is idempotent: a second call only checks that the parts are still there.
Set ``KBUNDLE_WORLD_DIR`` to move the cache (default ``~/.cache/kbundle-world``).
"""

from __future__ import annotations

import email.parser
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# Bump when the recipe changes, so that a cached world is rebuilt.
RECIPE_VERSION = "3"
BASE_IMAGE = "kbundle-world/base:bookworm"
SUITE = "bookworm"
# The packages the channel must carry; pip resolves their whole dependency tree.
TOP_LEVEL = ["ipykernel", "numpy", "pip"]
# conda's own prefix placeholder: rattler replaces it with the env's final prefix.
PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"
# Shared objects every glibc system has; everything else the interpreter needs is carried.
SYSTEM_LIBS = re.compile(r"^(linux-vdso|ld-linux|libc\.|libm\.|libpthread|libdl\.|librt\.|libutil\.)")
# Modules that need libraries a headless kernel never uses (Tk, NIS) or exist only for CPython's tests.
SKIP_DYNLOAD = re.compile(r"^(_tkinter|nis|_test|_ctypes_test|_xxtestfuzz|xxlimited|_xxsubinterpreters)")
SKIP_STDLIB_DIRS = {"site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "__pycache__",
                    "lib2to3", "distutils"}
DEFAULT_PORT = 18765
TIMESTAMP = 1700000000000  # ms; fixed so the channel's bytes do not depend on the day it was built


def log(message: str) -> None:
    print(f"[world] {message}", file=sys.stderr, flush=True)


def world_dir() -> Path:
    base = os.environ.get("KBUNDLE_WORLD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kbundle-world")
    return Path(base)


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


# --------------------------------------------------------------------------- base image

def docker_client():
    import docker

    return docker.from_env(timeout=600)


def ensure_base_image() -> str:
    client = docker_client()
    try:
        client.images.get(BASE_IMAGE)
        return BASE_IMAGE
    except Exception:
        pass
    if not shutil.which("debootstrap"):
        raise SystemExit("error: debootstrap is not installed (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="kbundle-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"debootstrap --variant=minbase {SUITE} (about 40 s)")
        subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(rootfs)], check=True,
                       stdout=subprocess.DEVNULL)
        # Keep the image small: package lists and docs are not needed to run a kernel.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(rootfs / sub, ignore_errors=True)
        log(f"docker import → {BASE_IMAGE}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        data = tar.stdout.read()
        tar.wait()
        client.api.import_image_from_data(data, repository=BASE_IMAGE.split(":")[0], tag=BASE_IMAGE.split(":")[1],
                                          changes=['CMD ["/bin/bash"]'])
    return BASE_IMAGE


# --------------------------------------------------------------------------- conda packages

@dataclass
class PackageFile:
    path: str          # inside the package
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
    index = {"name": pkg.name, "version": pkg.version, "build": pkg.build, "build_number": 0,
             "depends": sorted(pkg.depends), "subdir": pkg.subdir, "license": "see upstream",
             "timestamp": TIMESTAMP}
    if pkg.noarch:
        index["noarch"] = pkg.noarch
    else:
        index.update(platform="linux", arch="x86_64")
    info_files = {
        "info/index.json": json.dumps(index, indent=2, sort_keys=True),
        "info/paths.json": json.dumps({"paths": paths, "paths_version": 1}, indent=2),
        "info/files": "\n".join(f.path for f in sorted(pkg.files, key=lambda f: f.path)) + "\n",
    }
    if pkg.noarch == "python":
        info_files["info/link.json"] = json.dumps(
            {"noarch": {"type": "python", "entry_points": pkg.entry_points}, "package_metadata_version": 1})
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
        shutil.copytree(stdlib_src, libdir / f"python{ver}", symlinks=True,
                        ignore=lambda d, names: [n for n in names if n in SKIP_STDLIB_DIRS
                                                 or n.startswith("config-") or SKIP_DYNLOAD.match(n)
                                                 or n.endswith((".pyc", ".a"))])
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
        files += [PackageFile("bin/python3", b"", link_target=f"python{ver}"),
                  PackageFile("bin/python", b"", link_target=f"python{ver}")]
        for lib in src.glob("lib/libpython3*.so*"):
            if lib.is_symlink():
                files.append(PackageFile(f"lib/{lib.name}", b"", link_target=os.readlink(lib)))
    full = ".".join(str(x) for x in sys.version_info[:3])
    return CondaPackage("python", full, "h_kbundle_world_0", "linux-64", [], files)


# --------------------------------------------------------------------------- wheels → conda

def download_wheels(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    log(f"pip download {' '.join(TOP_LEVEL)} (wheels for CPython {python_version()}, linux x86_64)")
    subprocess.run([sys.executable, "-m", "pip", "download", "-qq", "--only-binary=:all:", "--dest", str(dest),
                    "--python-version", python_version(), "--implementation", "cp",
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux_2_28_x86_64", *TOP_LEVEL], check=True)
    return sorted(dest.glob("*.whl"))


def conda_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _marker_env() -> dict[str, str]:
    return {"python_version": python_version(), "python_full_version": platform_full(),
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "platform_machine": "x86_64", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "extra": ""}


def platform_full() -> str:
    return ".".join(str(x) for x in sys.version_info[:3])


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
                target = {"purelib": f"{sp}/{rest}", "platlib": f"{sp}/{rest}", "data": rest,
                          "scripts": f"{'python-scripts' if pure else 'bin'}/{rest}"}.get(kind)
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
        return CondaPackage(name, version, "pyh_kbundle_0", "noarch", depends, files, noarch="python",
                            entry_points=entry_points)
    ver = python_version()
    major, minor = sys.version_info[:2]
    depends.append(f"python >={ver},<{major}.{minor + 1}.0a0")
    for ep in entry_points:  # binary packages carry their scripts, shebang set through the placeholder
        script, target = (s.strip() for s in ep.split("="))
        module, func = target.split(":")
        body = (f"#!{PLACEHOLDER}/bin/python\nimport sys\nfrom {module} import {func.split('.')[0]}\n"
                f"sys.exit({func}())\n")
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


# --------------------------------------------------------------------------- channel + server

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
    from rattler.index import index_fs

    import asyncio

    result = index_fs(channel, write_zst=False, write_shards=False)
    if asyncio.iscoroutine(result):
        asyncio.run(result)
    return channel


def _server_alive(state: dict) -> bool:
    try:
        os.kill(state["pid"], 0)
        with urllib.request.urlopen(f"{state['url']}noarch/repodata.json", timeout=2) as resp:
            return resp.status == 200
    except Exception:
        return False


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port")


def ensure_server(root: Path, channel: Path) -> str:
    state_file = root / "server.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if _server_alive(state):
            return state["url"]
    port = _free_port(int(os.environ.get("KBUNDLE_WORLD_PORT", DEFAULT_PORT)))
    logf = open(root / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(channel)], stdout=logf, stderr=logf,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    state = {"pid": proc.pid, "url": f"http://127.0.0.1:{port}/"}
    deadline = time.monotonic() + 10
    while not _server_alive(state):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("error: the channel's HTTP server did not start; see " + str(root / "server.log"))
        time.sleep(0.1)
    state_file.write_text(json.dumps(state))
    return state["url"]


# --------------------------------------------------------------------------- an env image for tests

ENV_PREFIX = "/opt/kbundle/env"
ENV_SPECS = [f"python {python_version()}.*", "ipykernel", "numpy"]
# What `conda activate` would do, for images built by the tests themselves.
ENTRYPOINT_SH = """#!/bin/sh
export CONDA_PREFIX=/opt/kbundle/env PATH=/opt/kbundle/env/bin:$PATH
for f in /opt/kbundle/env/etc/conda/activate.d/*.sh; do [ -r "$f" ] && . "$f"; done
exec "$@"
"""


def linux_virtual_packages():
    from rattler import BuildString, GenericVirtualPackage, PackageName, Version

    return [GenericVirtualPackage(PackageName(name), Version(version), BuildString("0"))
            for name, version in (("__unix", "0"), ("__linux", "6.1"), ("__glibc", "2.36"))]


def solve_and_install(channel: str, specs: list[str], staging: Path, final_prefix: str = ENV_PREFIX) -> list:
    """Solve ``specs`` for linux-64 from ``channel`` and install into ``staging``, relocated for ``final_prefix``."""
    import asyncio

    import rattler

    async def run():
        records = await rattler.solve([rattler.Channel(channel)], specs, platforms=["linux-64", "noarch"],
                                      virtual_packages=linux_virtual_packages())
        await rattler.install(records, target_prefix=str(staging), alternative_target_prefix=final_prefix,
                              cache_dir=str(world_dir() / "pkgs"), show_progress=False)
        return records

    return asyncio.run(run())


def build_image(context: Path, tag: str, labels: dict[str, str] | None = None) -> str:
    client = docker_client()
    client.images.build(path=str(context), tag=tag, rm=True, forcerm=True, labels=labels or {})
    return tag


def write_env_context(context: Path, base_image: str, staging_env: Path) -> None:
    """A build context that COPYs an installed prefix into the base image at ENV_PREFIX."""
    context.mkdir(parents=True, exist_ok=True)
    if (context / "env").exists():
        shutil.rmtree(context / "env")
    shutil.copytree(staging_env, context / "env", symlinks=True)
    (context / "entrypoint.sh").write_text(ENTRYPOINT_SH)
    (context / "entrypoint.sh").chmod(0o755)
    (context / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        f"COPY env/ {ENV_PREFIX}/\n"
        "COPY entrypoint.sh /opt/kbundle/entrypoint.sh\n"
        f"ENV PATH={ENV_PREFIX}/bin:$PATH CONDA_PREFIX={ENV_PREFIX}\n"
        'ENTRYPOINT ["/opt/kbundle/entrypoint.sh"]\n'
        'CMD ["python"]\n')


def ensure_env_image(info: dict) -> str:
    """An image FROM the world's base with python, ipykernel and numpy at ENV_PREFIX; cached by tag."""
    repodata = b"".join((Path(info["channel_path"]) / sub / "repodata.json").read_bytes()
                        for sub in ("linux-64", "noarch"))
    digest = hashlib.sha256(repodata + ENTRYPOINT_SH.encode() + _fingerprint().encode()).hexdigest()[:12]
    tag = f"kbundle-world/env:{digest}"
    client = docker_client()
    try:
        client.images.get(tag)
        return tag
    except Exception:
        pass
    with tempfile.TemporaryDirectory(prefix="kbundle-envctx-") as tmp:
        staging = Path(tmp) / "stage"
        log(f"installing {' '.join(ENV_SPECS)} for {ENV_PREFIX}")
        solve_and_install(info["channel"], ENV_SPECS, staging)
        write_env_context(Path(tmp) / "ctx", info["base_image"], staging)
        log(f"building {tag}")
        build_image(Path(tmp) / "ctx", tag, {"kbundle.world": "1"})
    return tag


# --------------------------------------------------------------------------- up / down

def _fingerprint() -> str:
    return f"{RECIPE_VERSION}:{sys.base_prefix}:{platform_full()}:{','.join(TOP_LEVEL)}"


def up() -> dict:
    root = world_dir()
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / "channel.stamp"
    channel = root / "channel"
    if not (stamp.exists() and stamp.read_text() == _fingerprint() and (channel / "noarch/repodata.json").exists()):
        build_channel(root)
        stamp.write_text(_fingerprint())
    base = ensure_base_image()
    url = ensure_server(root, channel)
    return {"base_image": base, "channel": url, "channel_path": str(channel),
            "channel_file_url": channel.as_uri(), "python": python_version(), "world_dir": str(root)}


def down() -> None:
    root = world_dir()
    state_file = root / "server.json"
    if state_file.exists():
        try:
            os.kill(json.loads(state_file.read_text())["pid"], signal.SIGTERM)
        except (ProcessLookupError, KeyError, ValueError):
            pass
    try:
        client = docker_client()
        for image in client.images.list(filters={"label": "kbundle.world=1"}):
            client.images.remove(image.id, force=True)
        client.images.remove(BASE_IMAGE, force=True)
    except Exception:
        pass
    shutil.rmtree(root, ignore_errors=True)
    log(f"removed {BASE_IMAGE} and {root}")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down"):
        print("usage: python tests/world.py up|down", file=sys.stderr)
        return 2
    if argv[0] == "down":
        down()
        return 0
    info = up()
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # rattler can crash an interpreter at exit
