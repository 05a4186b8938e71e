"""The four public metric-learning benchmarks, converted from their official downloads to OML's table.

One converter per dataset reads the files and folders exactly as the authors distribute them (extracted
under `root`) and returns the table in the form `data.read_dataset` returns it: absolute string paths,
boolean `is_query` / `is_gallery` (False on train rows), checked by `data.validate_dataframe`. Labels are
the dataset's own 1-based class ids. The split is the standard zero-shot protocol of the metric-learning
literature (Song et al. 2016; Liu et al. 2016 for In-Shop), with disjoint train and validation classes:

- `cub`, CUB-200-2011 (`images.txt`, `image_class_labels.txt`, `bounding_boxes.txt`): classes 1-100 train
  (5,864 images), 101-200 validation (5,924), every validation image query and gallery; boxes.
- `cars`, Cars196 (`cars_annos.mat`, or the devkit layout): classes 1-98 train (8,054 images), 99-196
  validation (8,131), query and gallery; boxes.
- `sop`, Stanford Online Products (`Ebay_train.txt`, `Ebay_test.txt`): 11,318 train classes (59,551 images),
  11,316 validation classes (60,502), query and gallery; `category` the super-class; no boxes.
- `inshop`, DeepFashion In-Shop (`list_eval_partition.txt`, `list_bbox_inshop.txt`): 3,997 train items
  (25,882 images); 3,985 validation items with 14,218 query and 12,612 gallery images as the file says;
  `category` the clothing type; boxes.

CUB's `train_test_split.txt` and Cars196's `test` flag are the classification split (the same classes on
both sides) and are not used. CUB and Cars196 add a `class_name` column. Boxes are `x_1, y_1, x_2, y_2`
in pixels (CUB's `x y width height` become `x, y, x + width, y + height`).

Errors are `data.DatasetError`s naming the missing file (and where it was looked for), the file and id of
a class id out of range, or the images listed but absent. With `check_images=True` (the default) every
listed image must exist, and a box reaching past its image is clipped to it (a box left empty by that is
dropped); both are counted in `df.attrs["warnings"]`. `check_images=False` reads the index files only.

`data.load_dataset` calls `load` for a source written `"<name>:<root>"`, e.g. `"cub:/data/CUB_200_2011"`.
Reading Cars196's `.mat` files needs scipy (`pip install "labkit[datasets]"`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from labkit import data
from labkit.data import (
    BOX,
    CATEGORY,
    IS_GALLERY,
    IS_QUERY,
    LABEL,
    PATH,
    SPLIT,
    TRAIN,
    VALIDATION,
    DatasetError,
)

CUB_CLASSES = 200
CUB_TRAIN_CLASSES = 100
CARS_CLASSES = 196
CARS_TRAIN_CLASSES = 98
SOP_CLASSES = 22_634
SOP_SUPER_CLASSES = 12
INSHOP_ITEMS = 7_982
INSHOP_STATUSES = ("train", "query", "gallery")
INSHOP_IMAGE_FOLDERS = ("img", "img_highres")

_SHOW = 5
_SOURCE = re.compile(r"^(cub|cars|sop|inshop):(.+)$", re.IGNORECASE | re.DOTALL)

LAYOUTS = {
    "cub": (
        "CUB_200_2011/\n  images.txt  image_class_labels.txt  bounding_boxes.txt\n"
        "  images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg ..."
    ),
    "cars": (
        "cars196/\n  cars_annos.mat\n  car_ims/000001.jpg ...\n"
        "or the devkit layout: devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
        "cars_test_annos_withlabels.mat, cars_train/00001.jpg ..., cars_test/00001.jpg ..."
    ),
    "sop": (
        "Stanford_Online_Products/\n  Ebay_train.txt  Ebay_test.txt\n"
        "  bicycle_final/111085122871_0.JPG ...  (one <super-class>_final folder per super-class)"
    ),
    "inshop": (
        "DeepFashion_InShop/   (or the Google Drive folder 'In-shop Clothes Retrieval Benchmark')\n"
        "  list_eval_partition.txt (or Eval/list_eval_partition.txt)\n"
        "  list_bbox_inshop.txt (or Anno/list_bbox_inshop.txt)\n"
        "  img/WOMEN/Dresses/id_00000002/02_1_front.jpg ... (img.zip extracted here or under Img/)"
    ),
}
NAMES = {"cub": "CUB-200-2011", "cars": "Cars196", "sop": "Stanford Online Products", "inshop": "In-Shop"}


# ------------------------------------------------------------------------------------------- helpers


def _root(root: str | os.PathLike, name: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(
            f"{path}: no such folder; pass the folder of the extracted {NAMES[name]} archive, laid out as\n"
            f"{LAYOUTS[name]}"
        )
    return path.absolute()


def _missing(root: Path, name: str, candidates: Sequence[str]) -> DatasetError:
    looked = " or ".join(str(root / c) for c in candidates)
    return DatasetError(
        f"{root}: {NAMES[name]} annotation file {candidates[0]} is missing (looked for {looked}); "
        f"extract the official archive so that the folder reads\n{LAYOUTS[name]}"
    )


def _find(root: Path, name: str, candidates: Sequence[str], *, required: bool = True) -> Path | None:
    """The first of `candidates` (relative to root) that is a file; DatasetError naming them when none is."""
    for candidate in candidates:
        if (root / candidate).is_file():
            return root / candidate
    if required:
        raise _missing(root, name, candidates)
    return None


def _read_table(
    path: Path,
    columns: Sequence[str],
    *,
    integers: Sequence[str] = (),
    numbers: Sequence[str] = (),
    skip: int = 0,
    header: bool = False,
) -> pd.DataFrame:
    """A whitespace-separated file as strings, `integers` / `numbers` columns parsed; errors name the file.

    `skip` lines are skipped first; with `header` the next line must name exactly `columns`.
    """
    expected = " ".join(columns)
    try:
        df = pd.read_csv(path, sep=r"\s+", header=None, skiprows=skip + int(header), dtype=str)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: the file lists nothing; expected lines '{expected}'.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot parse it ({err}); expected lines '{expected}'.") from err
    if header:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [f.readline() for _ in range(skip + 1)]
        found = lines[-1].split()
        if found != list(columns):
            raise DatasetError(
                f"{path}: line {skip + 1} should be the header '{expected}', found '{' '.join(found)}'; "
                "is this the official file?"
            )
    if df.shape[1] != len(columns):
        raise DatasetError(
            f"{path}: expected {len(columns)} fields per line ('{expected}'), found {df.shape[1]}; "
            "is this the official file?"
        )
    df.columns = list(columns)
    short = df.isna().any(axis=1)
    if short.any():
        first = df.index[short][0]
        raise DatasetError(
            f"{path}: {int(short.sum())} line(s) have fewer than {len(columns)} fields ('{expected}'), "
            f"e.g. the one starting '{df.iloc[first, 0]}'."
        )
    for column in [*integers, *numbers]:
        values = pd.to_numeric(df[column], errors="coerce")
        bad = values.isna() | (np.mod(values, 1) != 0 if column in integers else False)
        if bad.any():
            first = np.flatnonzero(bad.to_numpy())[0]
            raise DatasetError(
                f"{path}: field '{column}' must be {'an integer' if column in integers else 'a number'}; "
                f"found '{df[column].iloc[first]}' in {int(bad.sum())} line(s), e.g. the one starting "
                f"'{df.iloc[first, 0]}'."
            )
        df[column] = values.astype(np.int64) if column in integers else values.astype(float)
    return df


def _check_unique(df: pd.DataFrame, column: str, path: Path) -> None:
    repeated = df[column][df[column].duplicated()]
    if len(repeated):
        shown = ", ".join(str(v) for v in repeated.unique()[:_SHOW])
        raise DatasetError(f"{path}: {column} listed more than once: {shown}; is this the official file?")


def _check_range(
    values: pd.Series, low: int, high: int, *, path: Path, what: str, ids: pd.Series, id_name: str, name: str
) -> None:
    bad = ((values < low) | (values > high)).to_numpy()
    if bad.any():
        shown = ", ".join(
            f"{id_name} {i} has {v}" for i, v in zip(ids[bad][:_SHOW], values[bad][:_SHOW], strict=True)
        )
        raise DatasetError(
            f"{path}: {what} out of range in {int(bad.sum())} line(s) ({shown}); {NAMES[name]} has "
            f"{what}s {low}-{high}. Is this the official file of that dataset?"
        )


def _check_images(df: pd.DataFrame, listing: Path | str, name: str) -> None:
    absent = [p for p in df[PATH] if not os.path.isfile(p)]
    if absent:
        raise DatasetError(
            f"{listing}: {len(absent)} of {len(df)} listed image(s) are missing, e.g. "
            f"{', '.join(absent[:_SHOW])}; extract the image archive so that the folder reads\n"
            f"{LAYOUTS[name]}\n(or fix the listing)."
        )


def _image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except (OSError, UnidentifiedImageError) as err:
        raise DatasetError(f"{path}: cannot read the image ({err}).") from err


def _fit_boxes(df: pd.DataFrame) -> list[str]:
    """Clip boxes to their images (header reads only); drop boxes left empty. Returns warnings."""
    rows = np.flatnonzero(df[list(BOX)].notna().all(axis=1).to_numpy())
    if not len(rows):
        return []
    size = np.array([_image_size(df[PATH].iat[i]) for i in rows], dtype=float).reshape(-1, 2)
    box = df[list(BOX)].to_numpy(dtype=float)[rows]
    fitted = np.column_stack(
        [np.maximum(box[:, 0], 0), np.maximum(box[:, 1], 0), np.minimum(box[:, 2], size[:, 0]),
         np.minimum(box[:, 3], size[:, 1])]
    )  # fmt: skip
    empty = (fitted[:, 2] <= fitted[:, 0]) | (fitted[:, 3] <= fitted[:, 1])
    fitted[empty] = np.nan
    clipped = ~empty & (fitted != box).any(axis=1)
    df.loc[df.index[rows], list(BOX)] = fitted
    found = []
    if clipped.any():
        found.append(f"{int(clipped.sum())} box(es) reached past their image and were clipped to it.")
    if empty.any():
        found.append(f"{int(empty.sum())} box(es) outside their image were dropped (whole image).")
    return found


def _drop_empty_boxes(df: pd.DataFrame) -> list[str]:
    """Without the images: boxes with x_2 <= x_1 or y_2 <= y_1 (or negative) are dropped. Returns warnings."""
    x1, y1, x2, y2 = (df[c].to_numpy(dtype=float) for c in BOX)
    with np.errstate(invalid="ignore"):
        bad = (x2 <= x1) | (y2 <= y1) | (x1 < 0) | (y1 < 0)
    if not bad.any():
        return []
    df.loc[bad, list(BOX)] = np.nan
    return [f"{int(bad.sum())} empty or negative box(es) were dropped (whole image)."]


def _finish(
    df: pd.DataFrame, *, name: str, root: Path, listing: Path | str, check_images: bool, boxes: bool
) -> pd.DataFrame:
    """Order the columns, check images and boxes, validate; attrs: source, warnings."""
    columns = [LABEL, PATH, SPLIT, IS_QUERY, IS_GALLERY]
    columns += [c for c in (CATEGORY,) if c in df.columns]
    columns += list(BOX) if boxes else []
    columns += [c for c in df.columns if c not in columns and c not in BOX]
    df = df[columns].reset_index(drop=True)
    found: list[str] = []
    if boxes:
        df[list(BOX)] = df[list(BOX)].astype(float)
        found += _drop_empty_boxes(df)
    if check_images:
        _check_images(df, listing, name)
        if boxes:
            found += _fit_boxes(df)
    source = f"{name}:{root}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = data.validate_dataframe(df, source=source, check_files=False)  # files checked above
    found = [f"{source}: {message}" for message in found]
    for message in found:
        warnings.warn(message, UserWarning, stacklevel=3)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=3)
    df.attrs.update(source=source, warnings=found + checked)
    return df


def _roles(split: pd.Series, is_query: Any = None, is_gallery: Any = None) -> tuple[pd.Series, pd.Series]:
    """Query/gallery flags: every validation row both, unless given; False on train rows."""
    is_val = split == VALIDATION
    query = is_val if is_query is None else (pd.Series(is_query, index=split.index) & is_val)
    gallery = is_val if is_gallery is None else (pd.Series(is_gallery, index=split.index) & is_val)
    return query.astype(bool), gallery.astype(bool)


def _joined(folder: Path, relative: pd.Series) -> list[str]:
    base = str(folder)
    return [f"{base}/{r.lstrip('/')}" for r in relative]


# ----------------------------------------------------------------------------------------------- CUB


def convert_cub(root: str | os.PathLike, *, boxes: bool = True, check_images: bool = True) -> pd.DataFrame:
    """CUB-200-2011 from its extracted `CUB_200_2011` folder: classes 1-100 train, 101-200 validation.

    Reads `images.txt` (`<image_id> <image_name>`), `image_class_labels.txt` (`<image_id> <class_id>`) and,
    with `boxes`, `bounding_boxes.txt` (`<image_id> <x> <y> <width> <height>`); images under `images/`.
    """
    root = _root(root, "cub")
    images_txt = _find(root, "cub", ["images.txt"])
    labels_txt = _find(root, "cub", ["image_class_labels.txt"])
    boxes_txt = _find(root, "cub", ["bounding_boxes.txt"]) if boxes else None
    images = _read_table(images_txt, ["image_id", "image_name"], integers=["image_id"])
    labels = _read_table(labels_txt, ["image_id", "class_id"], integers=["image_id", "class_id"])
    _check_unique(images, "image_id", images_txt)
    _check_unique(labels, "image_id", labels_txt)
    _check_range(
        labels["class_id"],
        1,
        CUB_CLASSES,
        path=labels_txt,
        what="class id",
        ids=labels["image_id"],
        id_name="image",
        name="cub",
    )
    df = images.merge(labels, on="image_id", how="left")
    unlabelled = df["class_id"].isna().to_numpy()
    if unlabelled.any():
        shown = ", ".join(str(i) for i in df["image_id"][unlabelled][:_SHOW])
        raise DatasetError(
            f"{labels_txt}: {int(unlabelled.sum())} image(s) of {images_txt.name} have no class "
            f"(image ids {shown}); is this the official file?"
        )
    class_id = df["class_id"].astype(np.int64)
    split = pd.Series(np.where(class_id <= CUB_TRAIN_CLASSES, TRAIN, VALIDATION), index=df.index)
    is_query, is_gallery = _roles(split)
    out = pd.DataFrame(
        {
            LABEL: class_id,
            PATH: _joined(root / "images", df["image_name"]),
            SPLIT: split,
            IS_QUERY: is_query,
            IS_GALLERY: is_gallery,
            # "001.Black_footed_Albatross/..." -> "Black_footed_Albatross"
            "class_name": df["image_name"].str.split("/").str[0].str.split(".", n=1).str[-1],
        }
    )
    if boxes:
        box = _read_table(
            boxes_txt,
            ["image_id", "x", "y", "width", "height"],
            integers=["image_id"],
            numbers=["x", "y", "width", "height"],
        )
        _check_unique(box, "image_id", boxes_txt)
        box = df[["image_id"]].merge(box, on="image_id", how="left")
        out["x_1"], out["y_1"] = box["x"].to_numpy(), box["y"].to_numpy()
        out["x_2"] = (box["x"] + box["width"]).to_numpy()
        out["y_2"] = (box["y"] + box["height"]).to_numpy()
    return _finish(out, name="cub", root=root, listing=images_txt, check_images=check_images, boxes=boxes)


# ---------------------------------------------------------------------------------------------- Cars


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs scipy: pip install scipy (or pip install 'labkit[datasets]')."
        ) from err
    try:
        return loadmat(str(path), squeeze_me=True)
    except (ValueError, OSError, NotImplementedError, TypeError) as err:
        raise DatasetError(f"{path}: cannot read the MATLAB file ({err}).") from err


def _mat_records(path: Path, mat: dict, key: str, fields: Sequence[str]) -> pd.DataFrame:
    if key not in mat:
        present = ", ".join(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{path}: no variable '{key}' (has: {present}); is this the official file?")
    records = np.atleast_1d(mat[key])
    missing = [f for f in fields if records.dtype.names is None or f not in records.dtype.names]
    if missing:
        raise DatasetError(
            f"{path}: '{key}' lacks the field(s) {', '.join(missing)}; expected a struct array with fields "
            f"{', '.join(fields)}."
        )

    def plain(value: Any) -> Any:
        return value.item() if isinstance(value, np.ndarray) and value.size == 1 else value

    return pd.DataFrame({f: [plain(v) for v in records[f]] for f in fields})


def _class_names(mat: dict | None) -> list[str] | None:
    if mat is None or "class_names" not in mat:
        return None
    return [str(n) for n in np.atleast_1d(mat["class_names"])]


def convert_cars(root: str | os.PathLike, *, boxes: bool = True, check_images: bool = True) -> pd.DataFrame:
    """Cars196 from `cars_annos.mat` (images under `car_ims/`): classes 1-98 train, 99-196 validation.

    `cars_annos.mat` holds `annotations` (fields `relative_im_path`, `bbox_x1`, `bbox_y1`, `bbox_x2`,
    `bbox_y2`, `class`, `test`) and `class_names`. Without it, the devkit layout is read instead:
    `devkit/cars_train_annos.mat` and `cars_test_annos_withlabels.mat` (fields `bbox_*`, `class`, `fname`;
    images under `cars_train/` and `cars_test/`) with `devkit/cars_meta.mat` for the class names. Either way
    the split is by class (the archive's train/test halves share classes and are merged).
    """
    root = _root(root, "cars")
    box_fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
    annos = _find(root, "cars", ["cars_annos.mat"], required=False)
    if annos is not None:
        mat = _loadmat(annos)
        records = _mat_records(annos, mat, "annotations", ["relative_im_path", *box_fields, "class"])
        paths = _joined(root, records["relative_im_path"].astype(str))
        names = _class_names(mat)
        listing = annos
    elif (root / "devkit").is_dir() or (root / "cars_train").is_dir():
        train_annos = _find(root, "cars", ["devkit/cars_train_annos.mat", "cars_train_annos.mat"])
        test_annos = _find(
            root, "cars", ["cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat"]
        )
        parts, paths = [], []
        for file, folder in ((train_annos, "cars_train"), (test_annos, "cars_test")):
            part = _mat_records(file, _loadmat(file), "annotations", ["fname", *box_fields, "class"])
            paths += _joined(root / folder, part["fname"].astype(str))
            parts.append(part)
        records = pd.concat(parts, ignore_index=True)
        meta = _find(root, "cars", ["devkit/cars_meta.mat", "cars_meta.mat"], required=False)
        names = _class_names(_loadmat(meta) if meta is not None else None)
        listing = train_annos
    else:
        raise _missing(root, "cars", ["cars_annos.mat"])
    classes = pd.to_numeric(records["class"], errors="coerce")
    if classes.isna().any() or (np.mod(classes, 1) != 0).any():
        raise DatasetError(f"{listing}: field 'class' must hold integers; is this the official file?")
    classes = classes.astype(np.int64)
    _check_range(
        classes,
        1,
        CARS_CLASSES,
        path=listing,
        what="class id",
        ids=pd.Series(paths),
        id_name="image",
        name="cars",
    )
    split = pd.Series(np.where(classes <= CARS_TRAIN_CLASSES, TRAIN, VALIDATION))
    is_query, is_gallery = _roles(split)
    out = pd.DataFrame(
        {LABEL: classes, PATH: paths, SPLIT: split, IS_QUERY: is_query, IS_GALLERY: is_gallery}
    )
    if names is not None and len(names) >= CARS_CLASSES:
        out["class_name"] = [names[c - 1] for c in classes]
    if boxes:
        for column, field in zip(BOX, box_fields, strict=True):
            values = pd.to_numeric(records[field], errors="coerce")
            if values.isna().any():
                raise DatasetError(
                    f"{listing}: field '{field}' must hold numbers; is this the official file?"
                )
            out[column] = values.astype(float).to_numpy()
    return _finish(out, name="cars", root=root, listing=listing, check_images=check_images, boxes=boxes)


# ----------------------------------------------------------------------------------------------- SOP


def convert_sop(root: str | os.PathLike, *, check_images: bool = True) -> pd.DataFrame:
    """Stanford Online Products: `Ebay_train.txt` is the train split, `Ebay_test.txt` the validation one.

    Both files open with the header `image_id class_id super_class_id path`; `category` is the path's
    super-class folder without its `_final` suffix (`bicycle_final/...` -> `bicycle`), and a
    `super_class_id` column is kept. SOP has no boxes.
    """
    root = _root(root, "sop")
    columns = ["image_id", "class_id", "super_class_id", "path"]
    parts = []
    for file, split in (("Ebay_train.txt", TRAIN), ("Ebay_test.txt", VALIDATION)):
        path = _find(root, "sop", [file])
        part = _read_table(path, columns, integers=columns[:3], header=True)
        _check_range(
            part["class_id"],
            1,
            SOP_CLASSES,
            path=path,
            what="class id",
            ids=part["image_id"],
            id_name="image_id",
            name="sop",
        )
        _check_range(
            part["super_class_id"],
            1,
            SOP_SUPER_CLASSES,
            path=path,
            what="super-class id",
            ids=part["image_id"],
            id_name="image_id",
            name="sop",
        )
        parts.append(part.assign(**{SPLIT: split}))
    df = pd.concat(parts, ignore_index=True)
    is_query, is_gallery = _roles(df[SPLIT])
    folder = df["path"].str.split("/").str[0]
    out = pd.DataFrame(
        {
            LABEL: df["class_id"],
            PATH: _joined(root, df["path"]),
            SPLIT: df[SPLIT],
            IS_QUERY: is_query,
            IS_GALLERY: is_gallery,
            CATEGORY: folder.str.replace(r"_final$", "", regex=True),
            "super_class_id": df["super_class_id"],
        }
    )
    return _finish(
        out,
        name="sop",
        root=root,
        listing=f"{root}/Ebay_train.txt, Ebay_test.txt",
        check_images=check_images,
        boxes=False,
    )


# -------------------------------------------------------------------------------------------- InShop


def _read_counted(path: Path, columns: Sequence[str], *, numbers: Sequence[str] = ()) -> pd.DataFrame:
    """DeepFashion's list files: line 1 the number of entries, line 2 the header, then the entries."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    if not first.isdigit():
        raise DatasetError(
            f"{path}: line 1 should be the number of entries, found '{first}'; is this the official file?"
        )
    df = _read_table(path, columns, numbers=numbers, skip=1, header=True)
    if int(first) != len(df):
        raise DatasetError(
            f"{path}: line 1 announces {int(first)} entries but the file lists {len(df)}; "
            "the file is truncated or edited; download it again."
        )
    return df


def convert_inshop(
    root: str | os.PathLike,
    *,
    boxes: bool | None = None,
    check_images: bool = True,
    images: str | None = None,
) -> pd.DataFrame:
    """DeepFashion In-Shop: the `evaluation_status` of `list_eval_partition.txt` (train / query / gallery).

    Label: the item number (`id_00000123` -> 123); category: the clothing type folder
    (`img/WOMEN/Dresses/...` -> `Dresses`, as OML does). Query rows are not gallery rows. `images`: "img"
    (the 256x256 archive `img.zip`) or "img_highres" (`img_highres.zip`, the same names under
    `img_highres/`); None takes `img/` when it is there, else `img_highres/` when that is. Boxes come from
    `list_bbox_inshop.txt` and are in the pixels of `img/`, so `boxes=None` means boxes with `img/` and none
    with `img_highres/` (where `boxes=True` is refused).
    """
    root = _root(root, "inshop")
    bases = (root, root / "Img")
    if images is None:
        found = [name for name in INSHOP_IMAGE_FOLDERS if any((b / name).is_dir() for b in bases)]
        images = found[0] if found else INSHOP_IMAGE_FOLDERS[0]
    if images not in INSHOP_IMAGE_FOLDERS:
        raise ValueError(f"images must be one of {', '.join(INSHOP_IMAGE_FOLDERS)} or None, got {images!r}.")
    if boxes is None:
        boxes = images == "img"
    if images == "img_highres" and boxes:
        raise ValueError(
            "the boxes of list_bbox_inshop.txt are in the pixels of img/, not img_highres/; "
            "pass boxes=False (or None) with images='img_highres'."
        )
    partition_txt = _find(root, "inshop", ["list_eval_partition.txt", "Eval/list_eval_partition.txt"])
    bbox_txt = _find(root, "inshop", ["list_bbox_inshop.txt", "Anno/list_bbox_inshop.txt"]) if boxes else None
    df = _read_counted(partition_txt, ["image_name", "item_id", "evaluation_status"])
    _check_unique(df, "image_name", partition_txt)
    item = df["item_id"].str.extract(r"^id_(\d+)$", expand=False)
    if item.isna().any():
        bad = ", ".join(repr(v) for v in df["item_id"][item.isna()][:_SHOW])
        raise DatasetError(f"{partition_txt}: item_id must read id_<number>; found {bad}.")
    label = item.astype(np.int64)
    _check_range(
        label,
        1,
        INSHOP_ITEMS,
        path=partition_txt,
        what="item number",
        ids=df["image_name"],
        id_name="image",
        name="inshop",
    )
    status = df["evaluation_status"]
    unknown = ~status.isin(INSHOP_STATUSES)
    if unknown.any():
        values = sorted(set(status[unknown]))
        raise DatasetError(
            f"{partition_txt}: evaluation_status must be one of {', '.join(INSHOP_STATUSES)}; found "
            f"{', '.join(repr(v) for v in values[:_SHOW])} in {int(unknown.sum())} line(s)."
        )
    split = pd.Series(np.where(status == "train", TRAIN, VALIDATION), index=df.index)
    is_query, is_gallery = _roles(split, status == "query", status == "gallery")
    names = df["image_name"]
    if images == "img_highres":
        names = names.str.replace(r"^img/", "img_highres/", regex=True)
    base = next((b for b in bases if (b / images).is_dir()), root)
    out = pd.DataFrame(
        {
            LABEL: label,
            PATH: _joined(base, names),
            SPLIT: split,
            IS_QUERY: is_query,
            IS_GALLERY: is_gallery,
            CATEGORY: df["image_name"].str.split("/").str[2].fillna(""),
        }
    )
    if boxes:
        box = _read_counted(bbox_txt, ["image_name", "clothes_type", "pose_type", *BOX], numbers=BOX)
        _check_unique(box, "image_name", bbox_txt)
        merged = df[["image_name"]].merge(box, on="image_name", how="left")
        for column in BOX:
            out[column] = merged[column].to_numpy(dtype=float)
    return _finish(
        out, name="inshop", root=root, listing=partition_txt, check_images=check_images, boxes=boxes
    )


# ------------------------------------------------------------------------------------------ dispatch

CONVERTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "cub": convert_cub,
    "cars": convert_cars,
    "sop": convert_sop,
    "inshop": convert_inshop,
}


def parse_source(source: Any) -> tuple[str, Path] | None:
    """("cub", root) for a source written "cub:<root>" (also cars:, sop:, inshop:); None for any other."""
    match = _SOURCE.match(str(source).strip()) if isinstance(source, str) else None
    if match is None:
        return None
    return match.group(1).lower(), Path(match.group(2).strip()).expanduser()


def convert(
    name: str,
    root: str | os.PathLike,
    *,
    csv_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    **options: Any,
) -> pd.DataFrame:
    """Convert benchmark `name` (cub, cars, sop, inshop) under `root`; with `csv_path` also write the CSV.

    `options` go to the converter (`check_images`, `boxes`, InShop's `images`). The CSV is written with
    `data.write_dataset` (paths relative to the CSV's folder when under it), never over an existing file
    unless `overwrite=True`.
    """
    key = name.lower()
    if key not in CONVERTERS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(CONVERTERS)}.")
    df = CONVERTERS[key](root, **options)
    if csv_path is not None:
        attrs = dict(df.attrs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already emitted by the converter
            data.write_dataset(df, csv_path, overwrite=overwrite)
        df.attrs.update(attrs)
    return df


def load(source: str, **options: Any) -> pd.DataFrame:
    """The table for a source written "<name>:<root>" (e.g. "cub:/data/CUB_200_2011"), converted in memory."""
    parsed = parse_source(source)
    if parsed is None:
        raise ValueError(
            f"{source!r} is not a benchmark source; write '<name>:<folder>' with name one of "
            f"{', '.join(CONVERTERS)}."
        )
    return convert(*parsed, **options)
