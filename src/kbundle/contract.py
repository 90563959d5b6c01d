"""The image contract: the one place that says what a kbundle image and its build context are.

`pack` renders a Dockerfile against it, `run` assembles a build context that fulfils it,
the kernel launcher and `gc` read images and containers by its labels, and the test
world builds its images through the same code. Change a value here and everything agrees.
"""

from __future__ import annotations

from pathlib import Path

# ----------------------------------------------------------------- inside the image

PREFIX = "/opt/kbundle/env"  # the conda environment; installed on the host with this final prefix
WORK = "/opt/kbundle/work"  # the notebook and the --include'd files
ROOT = "/opt/kbundle"  # nothing may be mounted over this (it would hide the environment)
ACTIVATE = "/usr/local/bin/kbundle-activate"  # the ENTRYPOINT: activates PREFIX, then execs its args
USER = "kbundle"  # the image's unprivileged default user

# ----------------------------------------------------------------- the build context

# Bump when the layout or the meaning of a context file changes: it is part of the image tag.
# 3: activation script shipped as a file; labels under org.kbundle.*
# 4: pip installed on the host; the env split into layers (env-layers/NN-group/)
CONTEXT_VERSION = "4"
CONTEXT_DOCKERFILE = "Dockerfile"
CONTEXT_ENV = "env"  # where the prefix is installed (conda, then pip) before it is split into layers
CONTEXT_LAYERS = "env-layers"  # the installed prefix, one folder per layer group (data/layers.yaml)
CONTEXT_WORK = "work"  # the bundle's work/ members
CONTEXT_ACTIVATE = "kbundle-activate.sh"  # copied from templates/ by run
CONTEXT_MTIME = 946684800  # 2000-01-01: every file's time in the context, so equal files make equal layers


def layer_dir(index: int, group: str) -> str:
    """`env-layers/01-cuda`: a layer group's folder in the context, numbered in the Dockerfile's order."""
    return f"{CONTEXT_LAYERS}/{index + 1:02d}-{group}"


# ----------------------------------------------------------------- labels

LABEL_NS = "org.kbundle."
LABEL_NAME = LABEL_NS + "name"
# The bundle's identity (flows/run.py `bundle_hash`, docs/format.md `bundle_hash`): its content
# hash and the manifest fields that define what is built. The key keeps its name from when it held
# the content hash alone; images labelled so by an older kbundle do not match any bundle now.
LABEL_CONTENT_HASH = LABEL_NS + "content-hash"
LABEL_ENV_HASH = LABEL_NS + "env-hash"
LABEL_ENV_FILES = LABEL_NS + "env-files"  # digest of the prefix's file list (image/integrity.py)
LABEL_BASE_IMAGE = LABEL_NS + "base-image"
LABEL_VERSION = LABEL_NS + "kbundle-version"
LABEL_FORMAT = LABEL_NS + "format"
# Kernel containers (see kernel/labels.py).
LABEL_KERNEL = LABEL_NS + "kernel"
LABEL_KERNEL_NAME = LABEL_NS + "kernel-name"
LABEL_LAUNCHER_PID = LABEL_NS + "launcher-pid"
LABEL_LAUNCHER_START = LABEL_NS + "launcher-start"
LABEL_LAUNCHER_HOST = LABEL_NS + "launcher-host"
LABEL_LAUNCHER_PPID = LABEL_NS + "launcher-ppid"  # who started the launcher: gc spots orphans
LABEL_PROBE = LABEL_NS + "probe"  # preflight's throwaway GPU probe
LABEL_BYTECODE = LABEL_NS + "bytecode"  # the throwaway container that byte-compiles an env
LABEL_PIP_INSTALL = LABEL_NS + "pip-install"  # the throwaway container that installs the pip: section
LABEL_WHEEL_BUILD = LABEL_NS + "wheel-build"  # the throwaway container that builds a VCS/sdist line's wheel
# Every throwaway container kbundle starts: `kbundle gc` removes those a killed run left behind.
THROWAWAY_LABELS = (LABEL_PROBE, LABEL_BYTECODE, LABEL_PIP_INSTALL, LABEL_WHEEL_BUILD)

# Images and containers made before kbundle 0.2 used a `kbundle.` namespace; gc still reads them.
LEGACY_LABEL_CONTENT_HASH = "kbundle.bundle_hash"
LEGACY_LABEL_KERNEL = "kbundle.kernel"
LEGACY_LABEL_KERNEL_NAME = "kbundle.kernel.name"
LEGACY_LABEL_LAUNCHER_PID = "kbundle.launcher.pid"
LEGACY_LABEL_LAUNCHER_START = "kbundle.launcher.start"
LEGACY_LABEL_LAUNCHER_HOST = "kbundle.launcher.host"


def image_content_hash(labels: dict[str, str] | None) -> str | None:
    """The bundle hash an image carries (its bundle's identity; kbundle 0.1's legacy label held a
    content hash), under today's label or the legacy one."""
    labels = labels or {}
    return labels.get(LABEL_CONTENT_HASH) or labels.get(LEGACY_LABEL_CONTENT_HASH)


# ----------------------------------------------------------------- the target platform

PLATFORM = "linux-64"
LINUX_VERSION = "5.4"  # any maintained kernel; only packages needing a newer one are excluded
ARCHSPEC = "x86_64"


def target_virtual_packages(glibc: str, cuda: str | None) -> list[str]:
    """The virtual packages of the image (not of the host that solves): `name=version[=build]`.

    pack records them in the manifest; both pack's lock and an unlocked run solve against them."""
    found = ["__unix=0", f"__linux={LINUX_VERSION}", f"__glibc={glibc}", f"__archspec=1={ARCHSPEC}"]
    if cuda:
        found.append(f"__cuda={cuda}")
    return found


def activate_script() -> Path:
    """The activation script that run copies into every build context."""
    from kbundle.resources import templates_dir

    return templates_dir() / CONTEXT_ACTIVATE
