"""kbundle's kernel logo: the shipped PNGs are the SVG's shapes, and every kernelspec gets all three files.

The PNGs under src/kbundle/data/logo/ are drawn by `raster()` below from the same shapes as
logo-svg.svg (pure Python: no image library). After changing the shapes, regenerate them:

    .venv/bin/python tests/kernel/test_kernel_logo.py
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from pathlib import Path

LOGO_DIR = Path(__file__).resolve().parents[2] / "src" / "kbundle" / "data" / "logo"
BOX = (2.0, 2.0, 62.0, 62.0, 12.0)  # x0, y0, x1, y1, corner radius, in the SVG's 64-unit viewBox
FILL, INK = (0x1B, 0x6C, 0xA8), (0xFF, 0xFF, 0xFF)
HALF_STROKE = 3.0
SEGMENTS = [((15, 14), (15, 50)), ((15, 37), (28, 24)), ((20, 32), (29, 50)), ((37, 14), (37, 50))]
RING = ((45.0, 42.0), 8.0)
SAMPLES = 4  # per axis, per pixel: anti-aliasing by supersampling


def _in_box(x: float, y: float) -> bool:
    x0, y0, x1, y1, r = BOX
    dx = max(x0 + r - x, 0.0, x - (x1 - r))
    dy = max(y0 + r - y, 0.0, y - (y1 - r))
    return x0 <= x <= x1 and y0 <= y <= y1 and dx * dx + dy * dy <= r * r


def _segment_distance(x: float, y: float, a, b) -> float:
    (ax, ay), (bx, by) = a, b
    vx, vy = bx - ax, by - ay
    t = max(0.0, min(1.0, ((x - ax) * vx + (y - ay) * vy) / (vx * vx + vy * vy)))
    return math.hypot(x - ax - t * vx, y - ay - t * vy)


def _in_ink(x: float, y: float) -> bool:
    (cx, cy), r = RING
    if abs(math.hypot(x - cx, y - cy) - r) <= HALF_STROKE:
        return True
    return any(_segment_distance(x, y, a, b) <= HALF_STROKE for a, b in SEGMENTS)


def _pixel(px: int, py: int, scale: float) -> bytes:
    box = ink = 0
    for i in range(SAMPLES):
        for j in range(SAMPLES):
            x, y = (px + (i + 0.5) / SAMPLES) * scale, (py + (j + 0.5) / SAMPLES) * scale
            if _in_box(x, y):
                box += 1
                ink += _in_ink(x, y)
    if not box:
        return b"\0\0\0\0"
    color = bytes(round((FILL[c] * (box - ink) + INK[c] * ink) / box) for c in range(3))
    return color + bytes([round(255 * box / SAMPLES**2)])


def raster(size: int) -> bytes:
    """The logo as an RGBA PNG of size x size pixels."""
    scale = 64.0 / size
    rows = b"".join(b"\0" + b"".join(_pixel(px, py, scale) for px in range(size)) for py in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)  # 8-bit RGBA, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def test_shipped_pngs_are_the_svg_shapes():
    for size in (32, 64):
        shipped = (LOGO_DIR / f"logo-{size}x{size}.png").read_bytes()
        assert shipped == raster(size), f"logo-{size}x{size}.png is stale: run {__file__}"
        width, height = struct.unpack(">II", shipped[16:24])
        assert (width, height) == (size, size)


def test_svg_is_well_formed_and_square():
    import xml.etree.ElementTree as ET

    root = ET.parse(LOGO_DIR / "logo-svg.svg").getroot()
    assert root.tag.endswith("svg") and root.get("viewBox") == "0 0 64 64"


def test_every_kernelspec_carries_the_logo(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    from kbundle.kernel.spec import LOGO_FILES, KernelRequest, install_kernelspec

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "extra"))
    path = install_kernelspec(KernelRequest("kbundle-logo", "logo", "img", str(tmp_path), [], "h"))
    for name in LOGO_FILES:
        assert (path / name).read_bytes() == (LOGO_DIR / name).read_bytes()
    # The directory Jupyter serves the spec's resources from (tests/kernel/test_browser.py sees them served).
    assert Path(KernelSpecManager().get_all_specs()["kbundle-logo"]["resource_dir"]) == path


if __name__ == "__main__":
    for size in (32, 64):
        (LOGO_DIR / f"logo-{size}x{size}.png").write_bytes(raster(size))
    sys.exit(0)
