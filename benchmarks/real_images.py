"""Build "photo-quadrants", a class-per-folder dataset of real photographs, from Debian wallpaper packages.

No image here is synthetic: the source is 22 real photographs (flowers, grass, leaves, wood, water, a storm,
boats, a pier, a forest path, cups, a building facade, ...) shipped by two Debian packages:

    apt-get install mate-backgrounds plasma-workspace-wallpapers

(12 from mate-backgrounds' "nature" set, 10 from plasma-workspace-wallpapers; the illustrations and renders
of both packages are left out). This script installs nothing; it stops with that command when a photograph
is missing.

Classes and instances: every photograph is cut into its 4 quadrants and each quadrant is one class
(`<photo>_<quadrant>`, 88 classes). The instances of a class are 32 distinct, non-overlapping square crops
of its quadrant (an 8 x 4 grid of cells as large as the quadrant allows, centred), each resized to `--size`
pixels (64 by default) and written as PNG. So a query is a patch of a real photo and its matches are the other
patches of the same quadrant; the nearest confusers are the other quadrants of the same photo.

    .venv/bin/python benchmarks/real_images.py [--out data/photo-quadrants] [--size 64] [--overwrite]

Then use the folder as any image folder: `labkit.data.load_dataset("data/photo-quadrants")` (the folder
importer splits the classes into train and validation by seed) or `labkit run --dataset data/photo-quadrants`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image

MATE = "/usr/share/backgrounds/mate/nature"
PLASMA = "/usr/share/wallpapers"
PHOTOS: dict[str, tuple[str, str]] = {  # class prefix -> (Debian package, file)
    **{
        name.lower(): ("mate-backgrounds", f"{MATE}/{name}.jpg")
        for name in (
            "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow",
            "LadyBird", "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower",
        )
    },
    **{
        name.lower(): ("plasma-workspace-wallpapers", f"{PLASMA}/{name}/contents/images/2560x1600.jpg")
        for name in (
            "BytheWater", "ColdRipple", "ColorfulCups", "EveningGlow", "FallenLeaf",
            "Grey", "Kite", "OneStandsOut", "Path", "summer_1am",
        )
    },
}  # fmt: skip
QUADRANTS = {"tl": (0, 0), "tr": (1, 0), "bl": (0, 1), "br": (1, 1)}
GRID = (8, 4)  # crops per quadrant: columns x rows


class MissingSourceError(RuntimeError):
    """A source photograph is not installed."""


def check_sources() -> None:
    """Raise `MissingSourceError` naming the packages to install when any source photograph is missing."""
    missing = {package for package, path in PHOTOS.values() if not Path(path).is_file()}
    if missing:
        raise MissingSourceError(
            f"the source photographs of packages {', '.join(sorted(missing))} are not installed; install "
            f"them with `apt-get install {' '.join(sorted(missing))}` (Debian) and run this script again."
        )


def quadrant_crops(photo: Image.Image, quadrant: tuple[int, int], size: int) -> list[Image.Image]:
    """The GRID crops of one quadrant of `photo`: non-overlapping squares, row by row, resized to `size`."""
    width, height = photo.size
    qw, qh = width // 2, height // 2
    left0, top0 = quadrant[0] * qw, quadrant[1] * qh
    cols, rows = GRID
    cell = min(qw // cols, qh // rows)
    left0 += (qw - cell * cols) // 2
    top0 += (qh - cell * rows) // 2
    crops = []
    for r in range(rows):
        for c in range(cols):
            box = (left0 + c * cell, top0 + r * cell, left0 + (c + 1) * cell, top0 + (r + 1) * cell)
            crops.append(photo.crop(box).resize((size, size), Image.Resampling.LANCZOS))
    return crops


def build(out: str | Path = "data/photo-quadrants", *, size: int = 64, overwrite: bool = False) -> Path:
    """Write the dataset to `out/<class>/<nn>.png` and return `out`; refuses a non-empty `out` unless
    overwrite=True (then it is replaced)."""
    check_sources()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to rebuild it")
        shutil.rmtree(out)
    for prefix, (_, path) in PHOTOS.items():
        photo = Image.open(path).convert("RGB")
        for qname, quadrant in QUADRANTS.items():
            folder = out / f"{prefix}_{qname}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(quadrant_crops(photo, quadrant, size)):
                crop.save(folder / f"{i:02d}.png")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/photo-quadrants")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = build(args.out, size=args.size, overwrite=args.overwrite)
    except (MissingSourceError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    n_classes = sum(1 for p in out.iterdir() if p.is_dir())
    print(f"{out}: {n_classes} classes x {GRID[0] * GRID[1]} images of {args.size} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
