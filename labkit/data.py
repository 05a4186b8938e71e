"""The data layer: OML's dataframe format, its validator, loaders, the folder importer and datasets.

Format (one row per image): required `label`, `path`, `split` ("train" / "validation"), `is_query`,
`is_gallery` (booleans on validation rows; may be empty on train rows); optional `category`, `sequence`
and a box `x_1, y_1, x_2, y_2` (pixels, at least one pixel wide and high after rounding; cropped before
the transform). Paths are absolute or relative to a dataset root (by default the CSV's folder). Extra
columns are kept and ignored. Labels are all numbers or all strings (compared as given, see
`labkit.retrieval.factorize`); a validation image (same path and box) is listed once.

In memory (what `read_dataset` / `load_dataset` return) paths are absolute strings and `is_query` /
`is_gallery` are booleans (False on train rows); validator warnings are in `df.attrs["warnings"]`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from labkit.retrieval import factorize

LABEL = "label"
PATH = "path"
SPLIT = "split"
IS_QUERY = "is_query"
IS_GALLERY = "is_gallery"
CATEGORY = "category"
SEQUENCE = "sequence"
BOX = ("x_1", "y_1", "x_2", "y_2")
TRAIN = "train"
VALIDATION = "validation"
SPLITS = (TRAIN, VALIDATION)
REQUIRED_COLUMNS = (LABEL, PATH, SPLIT, IS_QUERY, IS_GALLERY)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_SHOW = 5  # how many offending rows / files / labels a message lists
_TRUE = {"true", "1", "1.0", "yes", "y", "t"}
_FALSE = {"false", "0", "0.0", "no", "n", "f"}


class DatasetError(ValueError):
    """A dataset (dataframe, CSV, folder or image file) that labkit cannot use; the message says why."""


# ------------------------------------------------------------------------------------ validation


def _rows(index: Sequence) -> str:
    index = list(index)
    shown = ", ".join(str(i) for i in index[:_SHOW])
    more = f" and {len(index) - _SHOW} more" if len(index) > _SHOW else ""
    return f"{len(index)} row(s) ({shown}{more})"


def _at_rows(index: Sequence) -> str:
    index = list(index)
    return f"row {index[0]}" if len(index) == 1 else _rows(index)


def _parse_flag(value: Any) -> bool | None:
    """True/False for a boolean-like value (bool, 0/1, "true"/"false", ...), None otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not pd.isna(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    return None


def _resolve(path: Any, root: Path | None) -> Path:
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() or root is None else root / p


def validate_dataframe(
    df: pd.DataFrame,
    root: str | os.PathLike | None = None,
    *,
    source: str = "dataframe",
    check_files: bool = True,
) -> list[str]:
    """Check `df` against the OML format; return warnings (also emitted), raise DatasetError on errors.

    `root` resolves relative paths (default: the current folder); `source` (e.g. the CSV path) starts
    every message. With `check_files`, image files must exist and boxes must lie inside their images.
    """
    root = Path(root) if root is not None else None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(
            f"{source}: missing required column(s) {', '.join(repr(c) for c in missing)}; "
            f"an OML dataset needs columns {', '.join(REQUIRED_COLUMNS)} "
            f"(have: {', '.join(map(str, df.columns))})."
        )
    box_present = [c for c in BOX if c in df.columns]
    if box_present and len(box_present) < len(BOX):
        absent = [c for c in BOX if c not in df.columns]
        raise DatasetError(
            f"{source}: box column(s) {', '.join(box_present)} present but {', '.join(absent)} missing; "
            f"give all of {', '.join(BOX)} or none."
        )
    if len(df) == 0:
        raise DatasetError(f"{source}: the dataset has no rows.")

    errors: list[str] = []
    split = df[SPLIT]
    bad_split = ~split.isin(SPLITS)
    if bad_split.any():
        values = sorted({str(v) for v in split[bad_split]})
        errors.append(
            f"{source}: column '{SPLIT}' has unknown value(s) {', '.join(repr(v) for v in values[:_SHOW])} "
            f"in {_rows(df.index[bad_split])}; allowed: {', '.join(SPLITS)}."
        )
    for column in (LABEL, PATH):
        empty = df[column].isna() | (df[column].astype(str).str.strip() == "")
        if empty.any():
            errors.append(f"{source}: column '{column}' is missing (empty) in {_rows(df.index[empty])}.")

    is_val = (split == VALIDATION).to_numpy()
    flags = {}
    for column in (IS_QUERY, IS_GALLERY):
        parsed = df[column].map(_parse_flag)
        bad = is_val & parsed.isna().to_numpy()
        if bad.any():
            values = sorted({str(v) for v in df.loc[bad, column]})
            errors.append(
                f"{source}: column '{column}' must be True/False on validation rows; found "
                f"{', '.join(repr(v) for v in values[:_SHOW])} in {_rows(df.index[bad])}."
            )
        flags[column] = parsed.where(parsed.notna(), False).astype(bool).to_numpy() & is_val
    is_query, is_gallery = flags[IS_QUERY], flags[IS_GALLERY]
    neither = is_val & ~is_query & ~is_gallery
    # rows whose flags could not be parsed are already reported above
    neither &= (
        df[IS_QUERY].map(_parse_flag).notna().to_numpy() & df[IS_GALLERY].map(_parse_flag).notna().to_numpy()
    )
    if neither.any():
        errors.append(
            f"{source}: validation {_rows(df.index[neither])} are neither query nor gallery "
            f"('{IS_QUERY}' and '{IS_GALLERY}' both False); set one of them or drop the rows."
        )
    if not is_query.any():
        errors.append(
            f"{source}: no query rows (validation rows with '{IS_QUERY}' True); retrieval needs some."
        )
    if not is_gallery.any():
        errors.append(
            f"{source}: no gallery rows (validation rows with '{IS_GALLERY}' True); retrieval needs some."
        )

    labels = df[LABEL]
    given = np.flatnonzero(~(labels.isna() | (labels.astype(str).str.strip() == "")).to_numpy())
    try:  # the one labelling rule (mixed numbers and strings refused), on the labels not reported empty
        factorize(
            labels.iloc[given].to_numpy(),
            f"{source}: column '{LABEL}'",
            where=lambda positions: _at_rows(df.index[given[positions]]),
        )
    except ValueError as err:
        errors.append(str(err))
    if SEQUENCE in df.columns:
        try:
            factorize(
                df[SEQUENCE].to_numpy(),
                f"{source}: column '{SEQUENCE}'",
                missing_unique=True,
                where=lambda positions: _at_rows(df.index[positions]),
            )
        except ValueError as err:
            errors.append(str(err))
    shared = sorted(set(labels[split == TRAIN].dropna()) & set(labels[split == VALIDATION].dropna()), key=str)
    if shared:
        errors.append(
            f"{source}: train and validation must have disjoint labels, but {len(shared)} label(s) are in "
            f"both (e.g. {', '.join(repr(v) for v in shared[:_SHOW])}); move each label's rows to one split."
        )

    has_box = np.zeros(len(df), dtype=bool)
    if box_present:
        box = df[list(BOX)].apply(pd.to_numeric, errors="coerce")
        given = df[list(BOX)].notna()
        partial = given.any(axis=1) & ~given.all(axis=1)
        unparsable = given.all(axis=1) & box.isna().any(axis=1)
        if partial.any() or unparsable.any():
            errors.append(
                f"{source}: incomplete or non-numeric box in {_rows(df.index[partial | unparsable])}; "
                f"give all of {', '.join(BOX)} as numbers, or leave all four empty."
            )
        has_box = box.notna().all(axis=1).to_numpy().copy()
        x1, y1, x2, y2 = (box[c].to_numpy() for c in BOX)
        with np.errstate(invalid="ignore"):
            bad_box = has_box & ((x2 <= x1) | (y2 <= y1) | (x1 < 0) | (y1 < 0))
        if bad_box.any():
            errors.append(
                f"{source}: bad box in {_rows(df.index[bad_box])} (needs 0 <= x_1 < x_2 and 0 <= y_1 < y_2); "
                f"first: {_box_text(df, np.flatnonzero(bad_box)[0])}."
            )
        has_box &= ~bad_box
        with np.errstate(invalid="ignore"):
            tiny = has_box & ((np.round(x2) - np.round(x1) < 1) | (np.round(y2) - np.round(y1) < 1))
        if tiny.any():
            first = np.flatnonzero(tiny)[0]
            width, height = (
                int(np.round(x2[first]) - np.round(x1[first])),
                int(np.round(y2[first]) - np.round(y1[first])),
            )
            errors.append(
                f"{source}: box less than one pixel wide or high after rounding to whole pixels in "
                f"{_rows(df.index[tiny])}; first: {_box_text(df, first)} crops to {width}x{height}. "
                f"Boxes are pixel coordinates ({', '.join(BOX)}), not fractions of the image: multiply "
                "fractional boxes by the image width and height."
            )
        has_box &= ~tiny
    errors.extend(_duplicate_images(df, root, is_val, has_box, source))

    if check_files and not df[PATH].isna().any():
        paths = [_resolve(p, root) for p in df[PATH]]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            errors.append(
                f"{source}: {len(absent)} image file(s) do not exist, e.g. {', '.join(absent[:_SHOW])}"
                f"{' (relative paths are read from ' + str(root) + ')' if root is not None else ''}."
            )
        elif has_box.any():
            errors.extend(_check_boxes_inside(df, paths, np.flatnonzero(has_box), source))

    if errors:
        raise DatasetError("\n".join(errors))

    found: list[str] = []
    if is_query.any():
        gallery_counts = pd.Series(labels[is_gallery]).value_counts()
        others = labels[is_query].map(gallery_counts).fillna(0).to_numpy() - is_gallery[is_query]
        lonely = int((others <= 0).sum())
        if lonely:
            found.append(
                f"{source}: {lonely} of {int(is_query.sum())} queries have no other gallery item with their "
                "label; they are skipped by the retrieval metrics."
            )
    for message in found:
        warnings.warn(message, UserWarning, stacklevel=2)
    return found


def _duplicate_images(
    df: pd.DataFrame,
    root: Path | None,
    is_val: np.ndarray,
    has_box: np.ndarray,
    source: str,
    positions_in: str = "",
) -> list[str]:
    """An error for validation rows listing an image (same path and pixel box) already listed."""
    rows = np.flatnonzero(is_val & df[PATH].notna().to_numpy())
    if len(rows) < 2:
        return []
    base = os.path.abspath(root if root is not None else os.curdir)
    keys = pd.DataFrame(
        {
            PATH: [
                os.path.normpath(os.path.join(base, os.path.expanduser(str(p)))) for p in df[PATH].iloc[rows]
            ]
        }
    )
    if has_box.any():
        boxes = df[list(BOX)].iloc[rows].apply(pd.to_numeric, errors="coerce").to_numpy()
        pixels = np.where(has_box[rows, None], np.round(boxes), -1.0)  # -1: no box (the whole image)
        for c, column in enumerate(BOX):
            keys[column] = pixels[:, c]
    repeats = np.flatnonzero(keys.duplicated(keep="first").to_numpy())
    if not len(repeats):
        return []
    first = repeats[0]
    same = (keys.iloc[:first] == keys.iloc[first]).all(axis=1).to_numpy()
    i, j = int(rows[first]), int(rows[np.flatnonzero(same)[0]])
    repeated_path = keys[PATH].iloc[first]
    repeated = rows[repeats].tolist()
    unique = df.index.is_unique  # else (e.g. after pd.concat) name positions, as index labels repeat too

    def row(position: int) -> str:
        return f"row {df.index[position]}" if unique else f"the row at position {position}{positions_in}"

    subset = [PATH, *(c for c in BOX if c in df.columns)]
    return [
        f"{source}: {_rows(df.index[repeated] if unique else repeated)} repeat a validation image (same "
        f"path and box) listed in an earlier row; first: {row(i)} repeats {row(j)} ({repeated_path}). "
        "A query would find its own copy in the gallery and inflate the metrics; drop the repeats (e.g. "
        f"df = df.drop_duplicates(subset={subset})) or give each row its own image."
    ]


def _box_text(df: pd.DataFrame, position: int) -> str:
    row = df.iloc[position]
    return f"row {df.index[position]} box ({', '.join(str(row[c]) for c in BOX)})"


def _check_boxes_inside(df: pd.DataFrame, paths: list[Path], positions: np.ndarray, source: str) -> list[str]:
    outside = []
    for i in positions:
        try:
            with Image.open(paths[i]) as image:  # reads the header only
                width, height = image.size
        except Image.DecompressionBombError as err:
            return [f"{source}: {_too_large(paths[i], err)}"]
        except (OSError, UnidentifiedImageError) as err:
            return [f"{source}: cannot read image {paths[i]} ({err})."]
        row = df.iloc[i]
        if float(row[BOX[2]]) > width or float(row[BOX[3]]) > height:
            outside.append((i, width, height))
    if not outside:
        return []
    i, width, height = outside[0]
    return [
        f"{source}: box outside the image in {_rows(df.index[[o[0] for o in outside]])}; first: "
        f"{_box_text(df, i)} but {paths[i]} is {width}x{height}."
    ]


# ---------------------------------------------------------------------------------- reading / writing


def _normalised(df: pd.DataFrame, root: Path | None) -> pd.DataFrame:
    """A copy with absolute string paths and boolean is_query / is_gallery (False on train rows)."""
    out = df.copy()
    out[PATH] = [str(_resolve(p, root).absolute()) for p in out[PATH]]
    is_val = out[SPLIT] == VALIDATION
    for column in (IS_QUERY, IS_GALLERY):
        out[column] = out[column].map(_parse_flag).where(is_val, False).fillna(False).astype(bool)
    if CATEGORY in out.columns:
        out[CATEGORY] = out[CATEGORY].fillna("").astype(str)
    return out


def read_dataset(
    csv_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    check_files: bool = True,
    sep: str = ",",
) -> pd.DataFrame:
    """Read and validate an OML CSV; relative paths resolve against `root` (default: the CSV's folder).

    `sep` is the field delimiter; a file written with another one is refused with the delimiter to pass.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: no such CSV file.")
    try:
        df = pd.read_csv(csv_path, sep=sep)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"{csv_path}: cannot parse the CSV ({err}).") from err
    delimiter = _other_delimiter(df.columns, sep)
    if delimiter is not None:
        raise DatasetError(
            f"{csv_path}: the header {sep.join(map(str, df.columns))!r} is separated by {delimiter!r}, not "
            f"{sep!r}. Pass sep={delimiter!r} (read_dataset({str(csv_path)!r}, sep={delimiter!r})), or save "
            f"the file comma-separated: pd.read_csv(path, sep={delimiter!r}).to_csv(path, index=False)."
        )
    root = Path(root) if root is not None else csv_path.parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = validate_dataframe(df, root, source=str(csv_path), check_files=check_files)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    out = _normalised(df, root)
    out.attrs.update(source=str(csv_path), warnings=found)
    return out


def _other_delimiter(columns: Sequence, sep: str) -> str | None:
    """The delimiter that splits a header lacking the required columns into them, if any."""
    if all(c in columns for c in REQUIRED_COLUMNS):
        return None
    header = sep.join(map(str, columns))
    for delimiter in (";", "\t", "|", ",", " "):
        if delimiter != sep and all(
            c in [p.strip() for p in header.split(delimiter)] for c in REQUIRED_COLUMNS
        ):
            return delimiter
    return None


def _is_oml_csv(path: Path) -> bool:
    try:
        return all(c in pd.read_csv(path, nrows=0).columns for c in REQUIRED_COLUMNS)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
        return False


def write_dataset(
    df: pd.DataFrame,
    csv_path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `df` as an OML CSV; paths under `root` (default: the CSV's folder) are written relative to it.

    Relative paths in `df` are taken as relative to `root`. Refuses to replace an existing file unless
    `overwrite=True`. The dataframe is validated first (without touching the image files).
    """
    csv_path = Path(csv_path)
    if csv_path.exists() and not overwrite:
        raise FileExistsError(f"{csv_path} already exists; pass overwrite=True to replace it.")
    root = Path(root if root is not None else csv_path.parent).absolute()
    validate_dataframe(df, root, source=f"write_dataset({csv_path})", check_files=False)
    out = _normalised(df, root)
    relative = []
    for p in out[PATH]:
        path = Path(p)
        relative.append(path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path))
    out[PATH] = relative
    is_val = out[SPLIT] == VALIDATION
    for column in (IS_QUERY, IS_GALLERY):  # OML leaves them empty on train rows
        out[column] = out[column].astype(object).where(is_val, None)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    out.to_csv(tmp, index=False)
    os.replace(tmp, csv_path)
    return csv_path


def import_image_folder(
    folder: str | os.PathLike,
    *,
    val_ratio: float = 0.5,
    seed: int = 0,
    csv_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Build a dataset from `folder/<class>/<images>` (images may sit in nested sub-folders of a class).

    Classes (sorted folder names) get int labels 0..C-1 and a `class_name` column; `round(C * val_ratio)`
    classes (at least one, and at least one left for training when `val_ratio < 1`), chosen by `seed`,
    form the validation split, where every image is query and gallery. No `category` column is written
    (a flat folder has no grouping above the class). With `csv_path` the CSV is written too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such image folder.")
    if not 0 < val_ratio <= 1:
        raise ValueError(f"val_ratio must be in (0, 1], got {val_ratio}.")
    classes: list[tuple[str, list[Path]]] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in sub.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if files:
            classes.append((sub.name, files))
    if len(classes) < 2:
        raise DatasetError(
            f"{folder}: found {len(classes)} class folder(s) with images; an image folder needs one "
            f"sub-folder per class (at least 2) holding images ({', '.join(IMAGE_EXTENSIONS)})."
        )
    n_val = int(round(len(classes) * val_ratio))
    n_val = max(1, n_val if val_ratio == 1 else min(n_val, len(classes) - 1))
    val_classes = set(np.random.default_rng(seed).permutation(len(classes))[:n_val].tolist())
    rows = []
    for label, (name, files) in enumerate(classes):
        split = VALIDATION if label in val_classes else TRAIN
        for f in files:
            val = split == VALIDATION
            rows.append((label, str(f.absolute()), split, val, val, name))
    df = pd.DataFrame(rows, columns=[LABEL, PATH, SPLIT, IS_QUERY, IS_GALLERY, "class_name"])
    found = validate_dataframe(df, source=str(folder), check_files=False)
    if csv_path is not None:
        write_dataset(df, csv_path, overwrite=overwrite)
    df.attrs.update(source=str(folder), warnings=found)
    return df


def make_figures(
    root: str | os.PathLike | None = None,
    *,
    n_classes: int = 32,
    images_per_class: int = 40,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Generate (or reuse) the embedded "figures" dataset and return its CSV; see `labkit.figures`."""
    from labkit import figures

    return figures.make_figures(
        root, n_classes=n_classes, images_per_class=images_per_class, size=size, seed=seed
    )


def load_dataset(
    source: str | os.PathLike = "figures",
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    val_ratio: float = 0.5,
    **figures_kwargs: Any,
) -> pd.DataFrame:
    """Load a validated dataset with absolute paths from "figures", a CSV, or a folder.

    "figures" generates the embedded dataset under `figures.generation_dir(data_dir, ...)` (one folder per
    distinct generation; default data dir when None) with `seed` and `figures_kwargs` (n_classes,
    images_per_class, size). A folder holding exactly one CSV with the OML columns is read as that CSV; any
    other folder (a stray CSV beside class sub-folders is ignored, with a warning) is imported as one
    sub-folder per class (`val_ratio`, `seed`).
    `figures_kwargs` are ignored for other sources, so notebooks can always pass them.
    "cub:<folder>" (also cars:, sop:, inshop:) converts a public benchmark (`labkit.public_datasets`).
    """
    if str(source) == "figures":
        from labkit.figures import generation_dir

        root = generation_dir(data_dir, seed=seed, **figures_kwargs) if data_dir is not None else None
        return read_dataset(make_figures(root, seed=seed, **figures_kwargs))
    from labkit import public_datasets  # the public benchmarks, "<name>:<folder>"

    if public_datasets.parse_source(source) is not None:
        return public_datasets.load(str(source))
    path = Path(source).expanduser()
    if path.is_file():
        return read_dataset(path)
    if path.is_dir():
        csvs = sorted(path.glob("*.csv"))
        if len(csvs) == 1 and (_is_oml_csv(csvs[0]) or not _has_class_folders(path)):
            return read_dataset(csvs[0])  # an OML CSV, or the CSV's own error (e.g. its delimiter)
        df = import_image_folder(path, val_ratio=val_ratio, seed=seed)
        if len(csvs) == 1:
            warnings.warn(
                f"{path}: imported as an image folder (one sub-folder per class); {csvs[0].name} there is "
                f"not an OML dataset CSV (it lacks some of the columns {', '.join(REQUIRED_COLUMNS)}) and "
                "was ignored.",
                UserWarning,
                stacklevel=2,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already emitted by the importer
            validate_dataframe(df, source=str(path))
        return df
    raise DatasetError(
        f"{source}: no such dataset; use 'figures', a CSV in OML format, a folder with one sub-folder "
        "per class, or a public benchmark as 'cub:<folder>' (cars:, sop:, inshop:)."
    )


def _has_class_folders(folder: Path) -> bool:
    """Whether `folder` has a sub-folder holding an image (as an image folder of classes does)."""
    for sub in folder.iterdir():
        if sub.is_dir() and not sub.name.startswith("."):
            if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in sub.rglob("*") if p.is_file()):
                return True
    return False


# ------------------------------------------------------------------------------------------ images


def load_image(path: str | os.PathLike, box: Sequence[float] | None = None) -> Image.Image:
    """Open an image as RGB (any mode: L, P, RGBA, CMYK, I;16, ...), cropped to `box` (x_1, y_1, x_2, y_2)."""
    try:
        with Image.open(path) as image:
            image.load()
            image = _to_rgb(image)
    except Image.DecompressionBombError as err:
        raise DatasetError(_too_large(path, err)) from err
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read the image ({err}).") from err
    if box is not None:
        pixels = tuple(int(round(float(v))) for v in box)
        if pixels[2] - pixels[0] < 1 or pixels[3] - pixels[1] < 1:
            raise DatasetError(
                f"{path}: box {tuple(float(v) for v in box)} is less than one pixel wide or high after "
                f"rounding to whole pixels {pixels}; boxes are pixel coordinates ({', '.join(BOX)}), not "
                "fractions of the image."
            )
        image = image.crop(pixels)
    return image


def _too_large(path: str | os.PathLike, err: Exception) -> str:
    return (
        f"{path}: the image is too large to open safely ({err}). Downscale the file (e.g. to a few thousand "
        "pixels a side), or, if you trust it, raise PIL.Image.MAX_IMAGE_PIXELS before loading."
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth: rescale to 8 bits
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        return Image.fromarray(np.clip(pixels / top * 255 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class LabeledImages(torch.utils.data.Dataset):
    """Images with labels; items are dicts `input_tensors`, `labels` (int code), `paths`, `categories`, `idx`.

    `transform` maps a PIL RGB image to a tensor; None gives a float CHW tensor in [0, 1].
    """

    def __init__(self, df: pd.DataFrame, transform: Callable | None = None) -> None:
        missing = [c for c in (LABEL, PATH) if c not in df.columns]
        if missing:
            raise DatasetError(f"dataframe: missing column(s) {', '.join(missing)} for a dataset.")
        self.df = df.reset_index(drop=True)
        self.transform = transform if transform is not None else _to_tensor()
        names, codes = factorize(
            self.df[LABEL].to_numpy(),
            f"dataframe: column '{LABEL}'",
            where=lambda positions: _at_rows(self.df.index[positions]),
            error=DatasetError,
        )
        self.label_names = names
        self.labels = codes
        if CATEGORY in self.df.columns:
            self.categories = self.df[CATEGORY].fillna("").astype(str).to_numpy()
        else:
            self.categories = np.full(len(self.df), "", dtype=object)
        self.sequences = self.df[SEQUENCE].to_numpy() if SEQUENCE in self.df.columns else None
        if self.sequences is not None:  # the same rule as the labels (a missing sequence id is allowed)
            factorize(
                self.sequences,
                f"dataframe: column '{SEQUENCE}'",
                missing_unique=True,
                where=lambda positions: _at_rows(self.df.index[positions]),
                error=DatasetError,
            )
        self.paths = self.df[PATH].astype(str).tolist()
        if all(c in self.df.columns for c in BOX):
            boxes = self.df[list(BOX)].apply(pd.to_numeric, errors="coerce").to_numpy()
            self._boxes = [None if np.isnan(b).any() else b for b in boxes]
        else:
            self._boxes = [None] * len(self.df)

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        image = load_image(self.paths[idx], self._boxes[idx])
        return {
            "input_tensors": self.transform(image),
            "labels": int(self.labels[idx]),
            "paths": self.paths[idx],
            "categories": str(self.categories[idx]),
            "idx": int(idx),
        }


class QueryGalleryImages(LabeledImages):
    """Validation images; adds `.is_query`, `.is_gallery` and the item keys of the same names.

    A repeated image (same path and box) is refused, as the validator does: it would inflate the metrics.
    """

    def __init__(self, df: pd.DataFrame, transform: Callable | None = None) -> None:
        super().__init__(df, transform)
        self.is_query = self.df[IS_QUERY].map(_parse_flag).fillna(False).astype(bool).to_numpy()
        self.is_gallery = self.df[IS_GALLERY].map(_parse_flag).fillna(False).astype(bool).to_numpy()
        has_box = np.array([box is not None for box in self._boxes], dtype=bool)
        every = np.ones(len(df), dtype=bool)
        repeated = _duplicate_images(df, None, every, has_box, "dataframe", " of the validation rows")
        if repeated:  # a query would retrieve its own copy
            raise DatasetError(repeated[0])

    def __getitem__(self, idx: int) -> dict[str, Any]:
        item = super().__getitem__(idx)
        item["is_query"] = bool(self.is_query[idx])
        item["is_gallery"] = bool(self.is_gallery[idx])
        return item


def train_dataset(df: pd.DataFrame, transform: Callable | None = None) -> LabeledImages:
    """The train split as a LabeledImages dataset (rows in dataframe order)."""
    return LabeledImages(df[df[SPLIT] == TRAIN], transform)


def validation_dataset(df: pd.DataFrame, transform: Callable | None = None) -> QueryGalleryImages:
    """The validation split as a QueryGalleryImages dataset (rows in dataframe order)."""
    return QueryGalleryImages(df[df[SPLIT] == VALIDATION], transform)


def _to_tensor() -> Callable:
    from torchvision import transforms

    return transforms.ToTensor()


# The training augmentation's random resized crop (also applied on tensors by labkit.rerank's fine-tuning).
TRAIN_CROP_SCALE = (0.8, 1.0)
TRAIN_CROP_RATIO = (0.9, 1.1)


def make_transforms(data_config: dict, *, train: bool, full_image: bool = True) -> Callable:
    """timm transform for a backbone's data config (input_size, interpolation, mean, std, crop_pct).

    Train: a mild random resized crop (scale 0.8-1) and horizontal flip, no colour jitter (colour can be
    what tells classes apart). Eval: resize and normalise. `full_image=True` resizes the whole image to
    the input size (crop_pct 1, squash) instead of the config's centre crop, which would cut off borders.
    """
    from timm.data import create_transform

    config = dict(data_config)
    kwargs: dict[str, Any] = {
        "input_size": config.get("input_size", (3, 224, 224)),
        "interpolation": config.get("interpolation", "bilinear"),
        "mean": tuple(config.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(config.get("std", (0.229, 0.224, 0.225))),
        "crop_pct": 1.0 if full_image else config.get("crop_pct"),
        "crop_mode": "squash" if full_image else config.get("crop_mode"),
    }
    if train:
        return create_transform(
            **kwargs,
            is_training=True,
            scale=TRAIN_CROP_SCALE,
            ratio=TRAIN_CROP_RATIO,
            hflip=0.5,
            color_jitter=None,
        )
    return create_transform(**kwargs, is_training=False)


# ------------------------------------------------------------------------------------------ summary


def dataset_summary(df: pd.DataFrame, *, per_class: bool = True) -> pd.DataFrame:
    """Counts per split and class (or per split with `per_class=False`).

    Per class: split, label[, category][, class_name], images, queries, gallery.
    Per split: split, classes, images, queries, gallery.
    """
    work = df.assign(
        _q=df[IS_QUERY].map(_parse_flag).fillna(False).astype(int),
        _g=df[IS_GALLERY].map(_parse_flag).fillna(False).astype(int),
    )
    work = work.assign(**{SPLIT: pd.Categorical(work[SPLIT], categories=list(SPLITS), ordered=True)})
    if not per_class:
        out = work.groupby(SPLIT, observed=True).agg(
            classes=(LABEL, "nunique"), images=(PATH, "size"), queries=("_q", "sum"), gallery=("_g", "sum")
        )
        return out.reset_index().assign(**{SPLIT: lambda d: d[SPLIT].astype(str)})
    keys = [SPLIT, LABEL] + [c for c in (CATEGORY, "class_name") if c in work.columns]
    out = work.groupby(keys, observed=True, dropna=False).agg(
        images=(PATH, "size"), queries=("_q", "sum"), gallery=("_g", "sum")
    )
    return out.reset_index().assign(**{SPLIT: lambda d: d[SPLIT].astype(str)})
