"""Render a benchmark ``report.html`` to a PNG in headless Chromium, to see how it reads.

Chromium's ``--screenshot`` captures the window, not the page: the window is made tall
(``--height``), and the blank space below the page's end is cropped away. The PNG is then
reduced to a palette image (and, if still above ``--max-kb``, scaled down) so that it can be
committed next to the docs.

Usage::

    python -m benchmarks.screenshot /tmp/q/report.html --out docs/benchmarks/report_screenshot.png
    python -m benchmarks.screenshot report.html --width 1300 --height 9000 --chromium /usr/bin/chromium

Needs a Chromium (``apt-get install chromium``); CI has none and does not run this.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium executable: ``explicit``, else the first of :data:`CANDIDATES` on ``PATH``."""
    if explicit:
        return explicit
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: apt-get install chromium, or pass --chromium PATH")


def render(html: Path, png: Path, *, width: int, height: int, chromium: str, timeout: float = 120) -> None:
    """Screenshot ``html`` at ``width`` x ``height`` CSS pixels into ``png`` (uncropped)."""
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no state from other runs
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",  # running as root in a container needs it
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            html.resolve().as_uri(),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not png.is_file():
        raise SystemExit(f"chromium failed ({done.returncode}):\n{done.stderr[-2000:]}")


def crop_and_shrink(png: Path, max_kb: int, margin: int = 16) -> tuple[int, int, int]:
    """Crop the blank bottom (the window is taller than the page), convert to a 256-colour
    palette, and scale down until the file is under ``max_kb``. Returns (width, height, bytes)."""
    from PIL import Image, ImageChops

    im = Image.open(png).convert("RGB")
    bg = Image.new("RGB", im.size, im.getpixel((im.width - 1, im.height - 1)))
    box = ImageChops.difference(im, bg).getbbox()
    if box:
        im = im.crop((0, 0, im.width, min(im.height, box[3] + margin)))
    scale = 1.0
    while True:
        out = (
            im if scale == 1.0 else im.resize((int(im.width * scale), int(im.height * scale)), Image.LANCZOS)
        )
        out.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
        size = png.stat().st_size
        if size <= max_kb * 1024 or scale < 0.3:
            return out.width, out.height, size
        scale *= 0.85


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.screenshot", description=__doc__.split("\n\n")[0])
    p.add_argument("html", type=Path, help="the report.html to render")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: next to the HTML)")
    p.add_argument("--width", type=int, default=1400, help="window width in CSS pixels (default 1400)")
    p.add_argument(
        "--height", type=int, default=8000, help="window height; the blank bottom is cropped (default 8000)"
    )
    p.add_argument("--max-kb", type=int, default=480, help="scale down until the PNG is under this size")
    p.add_argument("--chromium", default=None, help=f"Chromium executable (default: first of {CANDIDATES})")
    return p


def main(argv: list[str] | None = None) -> int:
    """Render, crop, shrink; print where the PNG went and its size."""
    args = build_parser().parse_args(argv)
    if not args.html.is_file():
        raise SystemExit(f"no such file: {args.html}")
    out: Path = args.out or args.html.with_name(args.html.stem + "_screenshot.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    render(args.html, out, width=args.width, height=args.height, chromium=find_chromium(args.chromium))
    w, h, size = crop_and_shrink(out, args.max_kb)
    print(f"wrote {out}: {w} x {h} px, {size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
