"""The embedded "figures" dataset: coloured geometric figures generated offline from a seed.

Classes are shape x colour x style (filled / outline / striped); the `category` column is the shape
family. Every image varies position, scale, rotation, stroke width, background, clutter (distractor
lines and blobs in the same palette) and noise, so that an untrained network retrieves poorly while a
trained one can still tell the shapes and colours apart. Classes are split half train, half validation
(disjoint, balanced per category, chosen by the seed); every validation image is query and gallery.

The output folder holds `images/`, `figures.csv` (OML format, relative paths) and `figures.json`, the
manifest. By default every distinct generation has its own folder, named after its parameters
(`<data dir>/figures-32x40-64px-seed0-v1/`, see `generation_dir`), so asking for other parameters never
changes the images that earlier runs point at; an explicitly given folder is regenerated when its
parameters differ. The manifest is written first with `"complete": false` (claiming the folder) and rewritten
with `"complete": true` last, so an interrupted generation is detected and redone. A non-empty folder
without a labkit manifest is never written into. Checking and generating happen under a lock file next to
the folder (`<folder>.lock`), so processes that ask for the same folder at once (parallel notebooks,
several kernels) wait for one generation instead of writing over each other.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock
from PIL import Image, ImageDraw

from labkit import data as _data

GENERATOR = "labkit.figures"
VERSION = 1
CSV_NAME = "figures.csv"
MANIFEST_NAME = "figures.json"
IMAGES_DIR = "images"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (35, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 195, 25),
    "magenta": (195, 45, 195),
    "cyan": (30, 185, 200),
}
# shape -> family (the `category` column); shapes ordered so that the first ones span all families.
SHAPES: dict[str, str] = {
    "circle": "round",
    "triangle": "polygon",
    "star": "spiky",
    "heart": "sign",
    "crescent": "round",
    "square": "polygon",
    "cross": "spiky",
    "arrow": "sign",
}
STYLES = ("filled", "outline", "striped")
MAX_CLASSES = len(COLOURS) * len(SHAPES) * len(STYLES)
SUPERSAMPLE = 4
PNG_OPTIONS = {"format": "PNG", "optimize": False, "compress_level": 6}


def class_table(n_classes: int) -> pd.DataFrame:
    """The first `n_classes` classes: columns label, shape, colour, style, category, class_name.

    Order: each round of styles walks colour blocks of four, shapes, then colours, so the default 32 are
    8 shapes x 4 colours with one style per (shape, colour) pair: same-colour classes differ by shape
    and style, which is what makes colour statistics alone insufficient.
    """
    if not 1 <= n_classes <= MAX_CLASSES:
        raise ValueError(f"figures: n_classes must be between 1 and {MAX_CLASSES}, got {n_classes}.")
    colours, shapes = list(COLOURS), list(SHAPES)
    blocks = [range(0, 4), range(4, len(colours))]
    rows = []
    for round_ in range(len(STYLES)):
        for block in blocks:
            for s, shape in enumerate(shapes):
                for c in block:
                    style = STYLES[(s + c + round_) % len(STYLES)]
                    rows.append((shape, colours[c], style, SHAPES[shape], f"{colours[c]} {style} {shape}"))
    table = pd.DataFrame(rows[:n_classes], columns=["shape", "colour", "style", "category", "class_name"])
    table.insert(0, "label", np.arange(n_classes, dtype=np.int64))
    return table


def split_classes(table: pd.DataFrame, seed: int) -> np.ndarray:
    """Split per class, "train" or "validation": half of each category's classes, chosen by `seed`."""
    rng = np.random.default_rng([seed, 7919])
    split = np.empty(len(table), dtype=object)
    parity = 0
    for category in sorted(table["category"].unique()):
        members = rng.permutation(np.flatnonzero(table["category"].to_numpy() == category))
        for i, member in enumerate(members):
            split[member] = "validation" if (i + parity) % 2 == 0 else "train"
        parity = (parity + len(members)) % 2
    if len(table) >= 2 and (split == "train").sum() == 0:
        split[rng.integers(len(table))] = "train"
    return split


# ----------------------------------------------------------------------------------------- drawing


def _outline(shape: str) -> np.ndarray:
    """Unit-size outline (K, 2) of a shape centred at 0, radius about 1."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    if shape == "circle":
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape in ("triangle", "square"):
        k = 3 if shape == "triangle" else 4
        a = np.arange(k) * 2 * np.pi / k - np.pi / 2
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "star":
        a = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "cross":
        w = 0.33
        pts = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w)]
        return np.array(pts + [(-w, -w), (-w, -1)], dtype=float)
    if shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], 1) / 16.5
    if shape == "crescent":
        a = np.linspace(-0.72 * np.pi, 0.72 * np.pi, 40)
        outer = np.stack([np.cos(a), np.sin(a)], 1)
        b = np.linspace(0.62 * np.pi, -0.62 * np.pi, 40)
        inner = np.stack([0.55 * np.cos(b) - 0.2, 0.85 * np.sin(b)], 1)
        return np.concatenate([outer, inner]) * np.array([1.0, 1.0]) + np.array([-0.15, 0.0])
    if shape == "arrow":
        pts = [(-1, -0.28), (0.15, -0.28), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.28), (-1, 0.28)]
        return np.array(pts, dtype=float)
    raise ValueError(f"figures: unknown shape {shape!r}")


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255))


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, big: int, n: int, palette) -> None:
    for _ in range(n):
        colour = _jitter(rng, palette[rng.integers(len(palette))], 30)
        kind = rng.integers(3)
        if kind == 0:  # line
            p = rng.uniform(-0.1, 1.1, 4) * big
            draw.line([tuple(p[:2]), tuple(p[2:])], fill=colour, width=int(rng.uniform(0.02, 0.06) * big))
        elif kind == 1:  # blob
            c, r = rng.uniform(0, 1, 2) * big, rng.uniform(0.04, 0.14, 2) * big
            draw.ellipse([c[0] - r[0], c[1] - r[1], c[0] + r[0], c[1] + r[1]], fill=colour)
        else:  # scribble
            pts = np.cumsum(rng.normal(0, 0.12, (4, 2)), 0) + rng.uniform(0, 1, 2)
            draw.line([tuple(p) for p in pts * big], fill=colour, width=int(rng.uniform(0.015, 0.04) * big))


def render(shape: str, colour: str, style: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of the class (shape, colour, style), all nuisances drawn from `rng`."""
    big = size * SUPERSAMPLE
    palette = list(COLOURS.values())
    # background: a random muted colour with a linear gradient
    base = rng.uniform(60, 200, 3)
    tint = rng.uniform(-50, 50, 3)
    ramp = np.linspace(-1, 1, size)
    angle = rng.uniform(0, 2 * np.pi)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    bg = np.clip(base + grad[..., None] * tint, 0, 255).astype(np.uint8)
    image = Image.fromarray(bg, "RGB").resize((big, big), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    _draw_clutter(draw, rng, big, int(rng.integers(2, 5)), palette)

    # the figure
    radius = rng.uniform(0.25, 0.42) * big
    centre = rng.uniform(radius * 0.8, big - radius * 0.8, 2)
    rot = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.85, 1.15)
    pts = _outline(shape) * np.array([aspect, 1 / aspect])
    rotation = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    pts = pts @ rotation.T * radius + centre
    polygon = [tuple(p) for p in pts]
    stroke = max(1, int(rng.uniform(1.2, 3.2) * SUPERSAMPLE))
    mask = Image.new("L", (big, big), 0)
    mdraw = ImageDraw.Draw(mask)
    if style == "filled":
        mdraw.polygon(polygon, fill=255)
    else:
        if style == "striped":
            fill = Image.new("L", (big, big), 0)
            fdraw = ImageDraw.Draw(fill)
            period = rng.uniform(0.16, 0.26) * radius * 1.6
            sa = rng.uniform(0, np.pi)
            d = np.array([math.cos(sa), math.sin(sa)])
            n = np.array([-d[1], d[0]])
            for k in np.arange(-big, big, period):
                a, b = centre + n * k - d * big, centre + n * k + d * big
                fdraw.line([tuple(a), tuple(b)], fill=255, width=max(1, int(period * 0.45)))
            shape_mask = Image.new("L", (big, big), 0)
            ImageDraw.Draw(shape_mask).polygon(polygon, fill=255)
            mask.paste(fill, (0, 0), shape_mask)
        mdraw.line(polygon + [polygon[0]], fill=255, width=stroke, joint="curve")
    figure_colour = _jitter(rng, COLOURS[colour], 18)
    image.paste(Image.new("RGB", (big, big), figure_colour), (0, 0), mask)

    # a few thin occluders on top
    _draw_clutter(ImageDraw.Draw(image), rng, big, int(rng.integers(0, 3)), palette)
    image = image.resize((size, size), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0, rng.uniform(2, 10), pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------------- generation


def figures_params(n_classes: int, images_per_class: int, size: int, seed: int) -> dict:
    """The parameters recorded in the manifest (a change regenerates the dataset)."""
    return {
        "n_classes": int(n_classes),
        "images_per_class": int(images_per_class),
        "size": int(size),
        "seed": int(seed),
        "version": VERSION,
    }


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _is_complete(root: Path, manifest: dict | None, params: dict) -> bool:
    if not manifest or not manifest.get("complete") or manifest.get("params") != params:
        return False
    if not (root / CSV_NAME).is_file():
        return False
    images = root / IMAGES_DIR
    n_files = sum(1 for _ in images.rglob("*.png")) if images.is_dir() else 0
    return n_files == manifest.get("n_images")


def generation_dir(
    data_dir: str | os.PathLike | None = None,
    *,
    n_classes: int = 32,
    images_per_class: int = 40,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """The folder of one generation: `<data_dir>/figures-<classes>x<images>-<size>px-seed<seed>-v<version>`.

    `data_dir` defaults to `labkit.paths.default_data_dir()`.
    """
    from labkit.paths import default_data_dir

    base = Path(data_dir) if data_dir is not None else default_data_dir()
    return base / f"figures-{int(n_classes)}x{int(images_per_class)}-{int(size)}px-seed{int(seed)}-v{VERSION}"


def make_figures(
    root: str | os.PathLike | None = None,
    *,
    n_classes: int = 32,
    images_per_class: int = 40,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Generate (or reuse) the figures dataset under `root` and return its CSV path.

    `root` defaults to `generation_dir(...)` of these parameters (one folder per generation, never
    rewritten with other parameters). An explicit `root` is regenerated only when missing, incomplete
    (interrupted) or generated with other parameters. Raises DatasetError when `root` is a non-empty
    folder that labkit did not create.
    """
    if images_per_class < 2:
        raise ValueError(f"figures: images_per_class must be at least 2, got {images_per_class}.")
    if n_classes < 2:
        raise ValueError(f"figures: n_classes must be at least 2 (train and validation), got {n_classes}.")
    if size < 8:
        raise ValueError(f"figures: size must be at least 8 pixels, got {size}.")
    if root is None:
        root = generation_dir(n_classes=n_classes, images_per_class=images_per_class, size=size, seed=seed)
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_path(root)):
        return _reuse_or_generate(root, n_classes, images_per_class, size, seed)


def lock_path(root: Path) -> Path:
    """The lock file held while the figures folder `root` is checked or generated."""
    folder = root.resolve()
    return folder.with_name(folder.name + ".lock")


def _reuse_or_generate(root: Path, n_classes: int, images_per_class: int, size: int, seed: int) -> Path:
    params = figures_params(n_classes, images_per_class, size, seed)
    manifest = _read_manifest(root)
    if _is_complete(root, manifest, params):
        return root / CSV_NAME
    if manifest is None and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise _data.DatasetError(
            f"figures: {root} is not empty and has no labkit manifest ({MANIFEST_NAME}); refusing to write "
            "into it. Pass another folder (data_dir) or empty this one."
        )
    root.mkdir(parents=True, exist_ok=True)
    claim = {"generator": GENERATOR, "params": params, "complete": False}
    _write_json(root / MANIFEST_NAME, claim)
    shutil.rmtree(root / IMAGES_DIR, ignore_errors=True)
    (root / CSV_NAME).unlink(missing_ok=True)

    table = class_table(n_classes)
    table["split"] = split_classes(table, seed)
    rows = []
    for cls in table.itertuples(index=False):
        folder = f"{IMAGES_DIR}/{cls.label:03d}_{cls.colour}_{cls.style}_{cls.shape}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            rng = np.random.default_rng([seed, cls.label, i])
            image = render(cls.shape, cls.colour, cls.style, size, rng)
            rel = f"{folder}/{i:03d}.png"
            image.save(root / rel, **PNG_OPTIONS)
            val = cls.split == "validation"
            rows.append((cls.label, rel, cls.split, val, val, cls.category, cls.class_name))
    columns = [_data.LABEL, _data.PATH, _data.SPLIT, _data.IS_QUERY, _data.IS_GALLERY, _data.CATEGORY]
    df = pd.DataFrame(rows, columns=[*columns, "class_name"])
    _data.write_dataset(df, root / CSV_NAME, root=root, overwrite=True)
    _write_json(root / MANIFEST_NAME, {**claim, "complete": True, "n_images": len(df), "csv": CSV_NAME})
    return root / CSV_NAME
