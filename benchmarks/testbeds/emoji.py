"""Colour emoji at 32x32 RGB in 8 coarse classes: the data of the emoji FLUX testbed.

The images are the glyphs of Noto Color Emoji (Debian's ``fonts-noto-color-emoji``), rendered
by PIL at the font's bitmap size (109 px) on a 136x128 canvas, composited on white and box-resized
to 32x32. Every single code point of the font's character map counts, plus the skin-tone variants
the font ligates (base + U+1F3FB..U+1F3FF) and the flags (pairs of regional indicators the font
ligates into one glyph). Each emoji gets one of :data:`CLASS_NAMES` from its code point (Unicode
blocks and sub-ranges; see :func:`coarse_class`): a weak condition, with many very different
images per class.

The rendered set is cached as ``benchmarks/checkpoints/emoji_flux/emoji32.npz`` (uint8, committed);
:func:`load_emoji_images` reads it. To rebuild it (needs the font, never fetched in CI)::

    cd /tmp && apt-get download fonts-noto-color-emoji && dpkg -x fonts-noto-color-emoji_*.deb emoji
    python -m benchmarks.testbeds.emoji --font /tmp/emoji/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf

The split is deterministic: every 10th emoji (in code-point order) is the test split.
"""

from __future__ import annotations

import argparse
import unicodedata
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 32
"""Side of the images."""
CLASS_NAMES = ("faces", "people", "animals_nature", "food", "travel_places", "objects", "symbols", "flags")
"""The coarse classes (the condition)."""
NUM_CLASSES = len(CLASS_NAMES)
DEFAULT_FONT = "/tmp/emoji/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
"""Where the documented ``apt-get download`` + ``dpkg -x`` command puts the font."""
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "checkpoints" / "emoji_flux" / "emoji32.npz"
"""The committed rendered set."""

SKIN_TONES = tuple(range(0x1F3FB, 0x1F400))
_ANIMAL_WORDS = (
    "DOG", "CAT", "MONKEY", "PIG", "COW", "TIGER", "RABBIT", "MOUSE", "HORSE", "BEAR", "FROG",
    "DRAGON", "HAMSTER", "WOLF", "FOX", "PANDA", "UNICORN", "CHICKEN", "MOON",
)  # fmt: skip
# (first, last, class) in priority order; the first match wins
_RANGES = (
    (0x1F466, 0x1F487, 1),  # people
    (0x1F4AA, 0x1F4AA, 1),
    (0x1F574, 0x1F57A, 1),
    (0x1F645, 0x1F64F, 1),
    (0x1F6B4, 0x1F6B6, 1),
    (0x1F9B5, 0x1F9BB, 1),
    (0x1F9CD, 0x1F9DF, 1),
    (0x1F90C, 0x1F90F, 1),
    (0x1F918, 0x1F91F, 1),
    (0x1F926, 0x1F926, 1),
    (0x1F930, 0x1F93E, 1),
    (0x1F440, 0x1F465, 1),
    (0x1FAC3, 0x1FAC5, 1),
    (0x1FAF0, 0x1FAF8, 1),
    (0x1F300, 0x1F321, 2),  # weather, sky, nature
    (0x1F324, 0x1F32C, 2),
    (0x1F330, 0x1F344, 2),  # plants
    (0x1F400, 0x1F43F, 2),  # animals
    (0x1F980, 0x1F9AE, 2),
    (0x1FAB0, 0x1FABF, 2),
    (0x1F490, 0x1F490, 2),
    (0x1F4AE, 0x1F4AE, 2),
    (0x1F940, 0x1F940, 2),
    (0x1FAB7, 0x1FABF, 2),
    (0x2600, 0x2604, 2),
    (0x2618, 0x2618, 2),
    (0x26A1, 0x26A1, 2),
    (0x26C4, 0x26C8, 2),
    (0x1F32D, 0x1F32F, 3),  # food
    (0x1F345, 0x1F37F, 3),
    (0x1F950, 0x1F96F, 3),
    (0x1F9C0, 0x1F9CB, 3),
    (0x1FAD0, 0x1FADF, 3),
    (0x1F942, 0x1F944, 3),
    (0x2615, 0x2615, 3),
    (0x1F680, 0x1F6C5, 4),  # transport and places
    (0x1F6E0, 0x1F6FF, 4),
    (0x1F3D4, 0x1F3F0, 4),
    (0x1F5FA, 0x1F5FF, 4),
    (0x1F301, 0x1F301, 4),
    (0x1F303, 0x1F309, 4),
    (0x1F30B, 0x1F30B, 4),
    (0x26EA, 0x26FD, 4),
    (0x2708, 0x2708, 4),
    (0x1F6D0, 0x1F6DF, 4),
    (0x1F500, 0x1F53D, 6),  # symbols
    (0x1F170, 0x1F251, 6),
    (0x1F7E0, 0x1F7F0, 6),
    (0x1F549, 0x1F549, 6),
    (0x1F6AB, 0x1F6AD, 6),
    (0x1F6AE, 0x1F6BF, 6),
    (0x1F4AF, 0x1F4AF, 6),
    (0x1F4A0, 0x1F4A2, 6),
    (0x0000, 0x2BFF, 6),
    (0x3000, 0x33FF, 6),
)


def coarse_class(cps: tuple[int, ...]) -> int:
    """The class (index into :data:`CLASS_NAMES`) of an emoji given by its code points."""
    first = cps[0]
    if 0x1F1E6 <= first <= 0x1F1FF or first in (0x1F3F3, 0x1F3F4, 0x1F6A9, 0x1F38C):
        return 7
    if len(cps) > 1 and cps[1] in SKIN_TONES:
        return 1
    try:
        name = unicodedata.name(chr(first))
    except ValueError:
        name = ""
    if "FACE" in name and not any(w in name for w in _ANIMAL_WORDS) and "CLOCK" not in name:
        return 0
    for lo, hi, cls in _RANGES:
        if lo <= first <= hi:
            return cls
    return 5  # objects


def _emoji_list(font_path: str) -> list[tuple[int, ...]]:
    """Candidate emoji (code-point tuples): the character map's, skin-tone pairs, flag pairs."""
    from fontTools.ttLib import TTFont

    cmap = TTFont(font_path).getBestCmap()
    singles = sorted(c for c in cmap if c >= 0x2000 and not 0x1F3FB <= c <= 0x1F3FF and not 0xE0000 <= c)
    singles = [c for c in singles if not 0x1F1E6 <= c <= 0x1F1FF and c not in (0x200D, 0x20E3, 0xFE0F)]
    cands: list[tuple[int, ...]] = [(c,) for c in singles]
    cands += [(c, t) for c in singles if 0x1F000 <= c for t in SKIN_TONES]
    ri = range(0x1F1E6, 0x1F200)
    cands += [(a, b) for a in ri for b in ri]
    return cands


def render_emoji(font_path: str = DEFAULT_FONT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render every emoji of the font: ``(images (N, 32, 32, 3) uint8, labels (N,), codepoints (N, 2))``.

    Sequences (skin tones, flags) are kept only where the font draws them as ONE glyph (ink no
    wider than a single emoji); glyphs with almost no ink, images drawn 3 times or more (the "?"
    flag of unknown regional-indicator pairs) and exact duplicates are dropped.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, 109)
    images, labels, cps_out = [], [], []
    for cps in _emoji_list(font_path):
        text = "".join(chr(c) for c in cps)
        canvas = Image.new("RGBA", (136 * len(cps), 128), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
        alpha = np.asarray(canvas)[..., 3]
        cols = np.nonzero(alpha.max(0) > 0)[0]
        if cols.size == 0 or (alpha > 0).mean() * len(cps) < 0.02:
            continue
        if len(cps) > 1 and cols.max() >= 136:  # not ligated: two glyphs side by side
            continue
        tile = canvas.crop((0, 0, 136, 128))
        white = Image.new("RGBA", tile.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, tile).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
        images.append(np.asarray(rgb, dtype=np.uint8))
        labels.append(coarse_class(cps))
        cps_out.append(list(cps) + [0] * (2 - len(cps)))
    # unknown flag pairs all render as the same "?" flag: drop images seen 3 times or more, and
    # keep the first of exact duplicates
    keys = [im.tobytes() for im in images]
    counts: dict[bytes, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    seen: set[bytes] = set()
    keep = []
    for i, k in enumerate(keys):
        if counts[k] < 3 and k not in seen:
            keep.append(i)
            seen.add(k)
    images, labels, cps_out = ([v[i] for i in keep] for v in (images, labels, cps_out))
    return np.stack(images), np.asarray(labels, dtype=np.int64), np.asarray(cps_out, dtype=np.int64)


def load_emoji_images(split: str = "train", path: Path = DEFAULT_CACHE) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached set as ``(images (N, 3, 32, 32) float32 in [-1, 1], labels (N,) int64)``.

    Args:
        split: ``"train"`` (9 in 10), ``"test"`` (every 10th) or ``"all"``.
        path: The ``.npz`` written by :func:`main`.
    """
    data = np.load(path)
    x = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = torch.from_numpy(data["labels"]).long()
    test = torch.arange(len(y)) % 10 == 9
    if split == "train":
        return x[~test], y[~test]
    if split == "test":
        return x[test], y[test]
    if split == "all":
        return x, y
    raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def main(argv: list[str] | None = None) -> None:
    """Render the font's emoji and write the ``.npz`` cache."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--font", default=DEFAULT_FONT, help="NotoColorEmoji.ttf")
    p.add_argument("--out", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    images, labels, cps = render_emoji(args.font)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels, codepoints=cps)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    print(f"{len(labels)} emoji -> {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    print(", ".join(f"{n} {c}" for n, c in zip(CLASS_NAMES, counts, strict=True)))


if __name__ == "__main__":
    main()
