"""The data layer: validator errors and warnings, CSV I/O, the folder importer, images and datasets."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from labkit import data
from labkit.data import DatasetError

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def _write_images(root: Path, n_labels: int = 4, per_label: int = 3, size=(20, 10)) -> list[str]:
    paths = []
    for label in range(n_labels):
        for i in range(per_label):
            rel = f"img/{label}_{i}.png"
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, COLOURS[label % len(COLOURS)]).save(root / rel)
            paths.append(rel)
    return paths


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    """Valid: labels 0-1 train, 2-3 validation (query and gallery), paths relative to tmp_path."""
    paths = _write_images(tmp_path)
    labels = [int(p.split("/")[1][0]) for p in paths]
    split = ["train" if lab < 2 else "validation" for lab in labels]
    flag = [True if s == "validation" else None for s in split]
    df = pd.DataFrame(
        {"label": labels, "path": paths, "split": split, "is_query": flag, "is_gallery": list(flag)}
    )
    return df, tmp_path


def _error(df: pd.DataFrame, root: Path, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        data.validate_dataframe(df, root, **kwargs)
    return str(info.value)


def test_valid_dataset_passes_without_warnings(dataset):
    df, root = dataset
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.validate_dataframe(df, root) == []


def test_missing_required_column(dataset):
    df, root = dataset
    message = _error(df.drop(columns=["is_gallery"]), root, source="my.csv")
    assert "my.csv" in message and "missing required column(s) 'is_gallery'" in message


def test_unknown_split_value_names_value_and_rows(dataset):
    df, root = dataset
    df.loc[[1, 4], "split"] = "test"
    message = _error(df, root, source="my.csv")
    assert "my.csv: column 'split' has unknown value(s) 'test' in 2 row(s) (1, 4)" in message


def test_missing_label(dataset):
    df, root = dataset
    df["label"] = df["label"].astype(object)
    df.loc[7, "label"] = None
    assert "column 'label' is missing (empty) in 1 row(s) (7)" in _error(df, root)


def test_validation_row_neither_query_nor_gallery(dataset):
    df, root = dataset
    df.loc[8, ["is_query", "is_gallery"]] = False
    assert "validation 1 row(s) (8) are neither query nor gallery" in _error(df, root)


def test_unparsable_flag_names_column_and_value(dataset):
    df, root = dataset
    df.loc[9, "is_query"] = "maybe"
    assert "column 'is_query' must be True/False on validation rows; found 'maybe' in 1 row(s) (9)" in _error(
        df, root
    )


@pytest.mark.parametrize("column, word", [("is_query", "no query rows"), ("is_gallery", "no gallery rows")])
def test_no_query_or_no_gallery_rows(dataset, column, word):
    df, root = dataset
    df.loc[df["split"] == "validation", column] = False
    message = _error(df, root)
    assert word in message
    assert ("no query rows" in message) == (column == "is_query")


def test_missing_files_lists_first_few_and_count(dataset):
    df, root = dataset
    for rel in df["path"][:7]:
        (root / rel).unlink()
    message = _error(df, root, source="x.csv")
    assert "x.csv: 7 image file(s) do not exist" in message
    assert str(root / "img/0_0.png") in message and str(root / "img/1_1.png") in message
    assert str(root / "img/2_0.png") not in message  # only the first five are listed
    data.validate_dataframe(df, root, check_files=False)  # skipped on request


def test_train_and_validation_labels_must_be_disjoint(dataset):
    df, root = dataset
    df.loc[6, ["split", "is_query", "is_gallery"]] = ["train", None, None]  # a label-2 image in train
    assert "disjoint labels, but 1 label(s) are in both (e.g. 2)" in _error(df, root)


def _with_box(df: pd.DataFrame, row: int, box) -> pd.DataFrame:
    df = df.assign(x_1=np.nan, y_1=np.nan, x_2=np.nan, y_2=np.nan)
    df.loc[row, list(data.BOX)] = box
    return df


@pytest.mark.parametrize("box", [(5, 1, 5, 8), (5, 8, 9, 8), (-1, 0, 4, 4)])
def test_bad_box_order(dataset, box):
    df, root = dataset
    message = _error(_with_box(df, 3, box), root, source="b.csv", check_files=False)
    assert (
        "b.csv: bad box in 1 row(s) (3)" in message
        and f"row 3 box ({', '.join(map(str, map(float, box)))})" in (message)
    )


def test_box_outside_image_checked_with_image_size(dataset):
    df, root = dataset  # images are 20 x 10
    inside = _with_box(df, 3, (0, 0, 20, 10))
    data.validate_dataframe(inside, root)
    outside = _with_box(df, 3, (0, 0, 20, 11))
    message = _error(outside, root)
    assert "box outside the image in 1 row(s) (3)" in message and "is 20x10" in message
    assert "img/1_0.png" in message
    data.validate_dataframe(outside, root, check_files=False)  # sizes need the files


def test_partial_box_columns_and_values(dataset):
    df, root = dataset
    assert "x_2, y_2 missing" in _error(df.assign(x_1=0, y_1=0), root)
    df = _with_box(df, 3, (0, 0, 5, 5))
    df.loc[4, "x_1"] = 1
    assert "incomplete or non-numeric box in 1 row(s) (4)" in _error(df, root)


def test_query_without_other_gallery_item_is_a_warning_with_count(dataset):
    df, root = dataset
    df.loc[df["label"] == 3, "is_gallery"] = False  # the 3 queries of label 3 lose their gallery
    df.loc[6, "is_gallery"] = False  # a label-2 query whose 2 other images stay in the gallery
    with pytest.warns(UserWarning, match="3 of 6 queries have no other gallery item"):
        found = data.validate_dataframe(df, root, source="w.csv")
    assert found == [
        "w.csv: 3 of 6 queries have no other gallery item with their label; they are skipped "
        "by the retrieval metrics."
    ]
    df.loc[7, "is_gallery"] = False  # now only query 8 is in label 2's gallery: query 8 has no other
    with pytest.warns(UserWarning, match="4 of 6 queries"):
        data.validate_dataframe(df, root)


def test_read_dataset_resolves_relative_paths_and_names_the_csv(dataset, tmp_path):
    df, root = dataset
    csv = root / "ds.csv"
    df.to_csv(csv, index=False)
    read = data.read_dataset(csv)
    assert read["path"].tolist() == [str(root / p) for p in df["path"]]
    assert read["is_query"].dtype == bool and read["is_query"].tolist() == [False] * 6 + [True] * 6
    assert read.attrs["source"] == str(csv) and read.attrs["warnings"] == []
    # another root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = elsewhere / "ds.csv"
    csv.rename(moved)
    assert data.read_dataset(moved, root=root)["path"][0] == str(root / "img/0_0.png")
    with pytest.raises(DatasetError, match=f"{moved}: 12 image file\\(s\\) do not exist"):
        data.read_dataset(moved)


def test_write_dataset_relative_under_root_and_refuses_overwrite(dataset, tmp_path):
    df, root = dataset
    csv = data.write_dataset(df, root / "out.csv")  # relative paths in df are relative to the CSV's folder
    written = pd.read_csv(csv)
    assert written["path"].tolist() == df["path"].tolist()
    assert written["is_query"].isna().sum() == 6  # empty on train rows, as OML writes them
    with pytest.raises(FileExistsError, match="out.csv already exists"):
        data.write_dataset(df, csv)
    read = data.read_dataset(csv)  # absolute paths
    inner = data.write_dataset(read, root / "img" / "inner.csv")
    assert pd.read_csv(inner)["path"][:2].tolist() == ["0_0.png", "0_1.png"]
    outer = data.write_dataset(read, tmp_path / "elsewhere" / "outer.csv", root=tmp_path / "elsewhere")
    assert pd.read_csv(outer)["path"][0] == str(root / "img" / "0_0.png")
    data.write_dataset(read.iloc[::-1], csv, overwrite=True)
    assert data.read_dataset(csv)["path"].tolist() == read["path"][::-1].tolist()
    with pytest.raises(DatasetError, match="write_dataset"):
        data.write_dataset(df.drop(columns=["split"]), root / "bad.csv")
    assert not (root / "bad.csv").exists()


def _image_folder(root: Path, n_classes: int = 6, per_class: int = 2) -> Path:
    for c in range(n_classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (c * 30, i * 50, 0)).save(folder / f"{i}.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "class_00" / "readme.md").write_text("ignored")
    return root


def test_import_image_folder_class_disjoint_ratio_and_seed(tmp_path):
    folder = _image_folder(tmp_path / "imgs", n_classes=10)
    df = data.import_image_folder(folder, val_ratio=0.3, seed=1)
    assert len(df) == 20 and sorted(df["label"].unique()) == list(range(10))
    assert df.groupby("label")["split"].nunique().max() == 1  # class-disjoint
    assert df.loc[df["split"] == "validation", "label"].nunique() == 3
    val = df["split"] == "validation"
    assert df.loc[val, "is_query"].all() and df.loc[val, "is_gallery"].all()
    assert not df.loc[~val, "is_query"].any()
    assert df.loc[df["label"] == 4, "class_name"].unique().tolist() == ["class_04"]
    assert "category" not in df.columns
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    again = data.import_image_folder(folder, val_ratio=0.3, seed=1)
    pd.testing.assert_frame_equal(df, again)
    val_sets = {
        frozenset(
            data.import_image_folder(folder, val_ratio=0.3, seed=s).query("split == 'validation'")["label"]
        )
        for s in range(6)
    }
    assert len(val_sets) > 1  # the seed chooses the classes


def test_import_image_folder_writes_csv_and_rejects_bad_input(tmp_path):
    folder = _image_folder(tmp_path / "imgs", n_classes=4)
    csv = tmp_path / "imgs.csv"
    df = data.import_image_folder(folder, csv_path=csv)
    read = data.read_dataset(csv)
    assert read["path"].tolist() == df["path"].tolist()
    assert pd.read_csv(csv)["path"][0] == "imgs/class_00/0.jpg"
    with pytest.raises(FileExistsError):
        data.import_image_folder(folder, csv_path=csv)
    assert (data.import_image_folder(folder, val_ratio=1.0)["split"] == "validation").all()
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(one / "only" / "a.png")
    with pytest.raises(DatasetError, match=f"{one}: found 1 class folder"):
        data.import_image_folder(one)
    with pytest.raises(DatasetError, match="no such image folder"):
        data.import_image_folder(tmp_path / "missing")


def test_load_dataset_sources(dataset, tmp_path):
    df, root = dataset
    csv = root / "ds.csv"
    df.to_csv(csv, index=False)
    by_file = data.load_dataset(csv, n_classes=99)  # figures parameters are ignored for other sources
    by_folder = data.load_dataset(root)  # a folder holding one CSV
    pd.testing.assert_frame_equal(by_file, by_folder)
    folder = _image_folder(tmp_path / "imgs", n_classes=4)
    imported = data.load_dataset(folder, seed=3)
    pd.testing.assert_frame_equal(imported, data.import_image_folder(folder, seed=3))
    with pytest.raises(DatasetError, match="nowhere.csv: no such dataset"):
        data.load_dataset(tmp_path / "nowhere.csv")


# ------------------------------------------------------------------------------------------ images


def _mode_image(mode: str) -> Image.Image:
    if mode == "L":
        return Image.new("L", (6, 4), 100)
    if mode == "P":
        image = Image.new("P", (6, 4), 1)
        image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
        return image
    if mode == "RGBA":
        return Image.new("RGBA", (6, 4), (200, 100, 50, 0))  # fully transparent -> white
    if mode == "CMYK":
        return Image.new("CMYK", (6, 4), (0, 255, 255, 0))  # pure red in CMYK
    if mode == "I;16":
        return Image.new("I;16", (6, 4), 65535)
    raise AssertionError(mode)


@pytest.mark.parametrize(
    "mode, ext, rgb",
    [
        ("L", "png", (100, 100, 100)),
        ("P", "png", (10, 20, 30)),
        ("RGBA", "png", (255, 255, 255)),
        ("CMYK", "tiff", (255, 0, 0)),
        ("I;16", "png", (255, 255, 255)),
    ],
)
def test_load_image_converts_any_mode_to_rgb(tmp_path, mode, ext, rgb):
    path = tmp_path / f"img.{ext}"
    _mode_image(mode).save(path)
    with Image.open(path) as raw:
        assert raw.mode == mode
    image = data.load_image(path)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert image.getpixel((2, 2)) == rgb


def test_unreadable_file_raises_naming_it(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="broken.png: cannot read the image"):
        data.load_image(bad)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    df = pd.DataFrame(
        {
            "label": [0, 1],
            "path": [str(bad), str(truncated)],
            "split": "validation",
            "is_query": True,
            "is_gallery": True,
        }
    )
    dataset = data.validation_dataset(df)
    with pytest.raises(DatasetError, match="truncated.png"):
        dataset[1]


def test_box_is_cropped_before_the_transform(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[2:6, 4:12] = (255, 0, 0)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    df = pd.DataFrame(
        {
            "label": [0],
            "path": [str(tmp_path / "a.png")],
            "split": "train",
            "is_query": None,
            "is_gallery": None,
        }
    ).assign(x_1=4, y_1=2, x_2=12, y_2=6)
    seen = []
    item = data.LabeledImages(df, transform=lambda im: seen.append(im.size) or torch.zeros(1))[0]
    assert seen == [(8, 4)] and item["input_tensors"].shape == (1,)
    tensor = data.LabeledImages(df)[0]["input_tensors"]
    assert tensor.shape == (3, 4, 8) and torch.equal(tensor[0], torch.ones(4, 8)) and tensor[1:].sum() == 0
    assert data.load_image(tmp_path / "a.png", (4, 2, 12, 6)).size == (8, 4)


def test_datasets_items_and_attributes(dataset):
    df, root = dataset
    df = df.assign(category=["a"] * 9 + [None] * 3, sequence=list(range(12)))
    df.to_csv(root / "ds.csv", index=False)
    df = data.read_dataset(root / "ds.csv")
    train = data.train_dataset(df)
    val = data.validation_dataset(df)
    assert isinstance(val, data.QueryGalleryImages) and type(train) is data.LabeledImages
    assert len(train) == 6 and len(val) == 6
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert val.labels.tolist() == [0, 0, 0, 1, 1, 1] and val.label_names.tolist() == [2, 3]
    assert val.categories.tolist() == ["a", "a", "a", "", "", ""]
    assert val.sequences.tolist() == [6, 7, 8, 9, 10, 11] and val.df.index.tolist() == list(range(6))
    assert val.is_query.dtype == bool and val.is_query.all() and val.is_gallery.all()
    item = val[4]
    assert set(item) == {"input_tensors", "labels", "paths", "categories", "idx", "is_query", "is_gallery"}
    assert item["labels"] == 1 and item["idx"] == 4 and item["paths"] == str(root / "img/3_1.png")
    x = item["input_tensors"]
    assert x.dtype == torch.float32 and x.shape == (3, 10, 20)
    assert torch.allclose(x[:, 0, 0], torch.tensor(COLOURS[3], dtype=torch.float32) / 255)
    batch = next(iter(torch.utils.data.DataLoader(val, batch_size=6)))
    assert batch["is_query"].dtype == torch.bool and batch["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    no_category = data.train_dataset(df.drop(columns=["category", "sequence"]))
    assert no_category.categories.tolist() == [""] * 6 and no_category.sequences is None


def test_make_transforms_train_and_eval():
    config = {
        "input_size": (3, 16, 16),
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    evaluation = data.make_transforms(config, train=False)
    x = evaluation(image)
    assert x.shape == (3, 16, 16)  # whole image squashed to the input size
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))
    torch.manual_seed(0)
    train = data.make_transforms(config, train=True)
    y = train(image)
    assert y.shape == (3, 16, 16) and torch.allclose(y[0], torch.ones(16, 16))  # no colour jitter
    names = [type(t).__name__ for t in train.transforms]
    assert "RandomHorizontalFlip" in names and "ColorJitter" not in names


def test_dataset_summary_counts(dataset):
    df, root = dataset
    df.to_csv(root / "ds.csv", index=False)
    df = data.read_dataset(root / "ds.csv")
    per_split = data.dataset_summary(df, per_class=False)
    assert per_split.to_dict("list") == {
        "split": ["train", "validation"],
        "classes": [2, 2],
        "images": [6, 6],
        "queries": [0, 6],
        "gallery": [0, 6],
    }
    per_class = data.dataset_summary(df)
    assert per_class.columns.tolist() == ["split", "label", "images", "queries", "gallery"]
    assert per_class["label"].tolist() == [0, 1, 2, 3] and per_class["queries"].tolist() == [0, 0, 3, 3]


def test_plot_sample_grid(dataset):
    from matplotlib.figure import Figure

    from labkit.data_plots import plot_sample_grid

    df, root = dataset
    df.to_csv(root / "ds.csv", index=False)
    df = data.read_dataset(root / "ds.csv")
    fig = plot_sample_grid(df, n_classes=3, n_per_class=2, seed=0)
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    assert fig._repr_png_().startswith(b"\x89PNG")  # notebooks show it without pyplot
    assert sum(len(ax.images) for ax in fig.axes) == 6
    big = plot_sample_grid(df, n_classes=10, n_per_class=5)  # capped by what the dataset holds
    assert len(big.axes) == 20 and sum(len(ax.images) for ax in big.axes) == 12


# ------------------------------------------------------------------------ issue 14: refused inputs


def test_repeated_validation_image_is_an_error_naming_the_rows(dataset):
    df, root = dataset
    # the case: validation rows appended once more (index labels repeat, so positions are named)
    again = pd.concat([df, df[df["split"] == "validation"]])
    message = _error(again, root, source="d.csv")
    assert message.startswith(
        "d.csv: 6 row(s) (12, 13, 14, 15, 16 and 1 more) repeat a validation image (same path and box) "
        "listed in an earlier row; first: the row at position 12 repeats the row at position 6 "
        f"({root / 'img/2_0.png'})."
    )
    assert "inflate the metrics" in message and "df.drop_duplicates(subset=['path'])" in message
    # a dataframe that skipped the validator is refused by the validation dataset (so by train / evaluate)
    absolute = again.assign(path=[str(root / p) for p in again["path"]])
    with pytest.raises(
        DatasetError, match=r"first: the row at position 6 of the validation rows repeats the"
    ):
        data.validation_dataset(absolute)
    # one repeat under a new index label, written as an absolute path: named by its row
    one = pd.concat([df, df.loc[[9]].assign(path=str(root / df.loc[9, "path"]))], ignore_index=True)
    assert "1 row(s) (12) repeat a validation image" in _error(one, root)
    assert "first: row 12 repeats row 9" in _error(one, root)
    # other crops of one image, and repeated train rows, are fine
    crops = _with_box(pd.concat([df, df.loc[[9]]], ignore_index=True), 12, (0, 0, 5, 5))
    assert data.validate_dataframe(crops, root) == []
    assert data.validate_dataframe(pd.concat([df, df.loc[[0]]], ignore_index=True), root) == []


def test_mixed_label_types_are_refused_by_the_validator_and_the_datasets(dataset):
    df, root = dataset
    mixed = df.assign(label=df["label"].astype(object))
    mixed.loc[[8, 9, 10, 11], "label"] = "3"
    message = _error(mixed, root, source="m.csv")
    assert message.startswith(
        "m.csv: column 'label': mixes numbers and strings (e.g. 0 at row 0 and '3' at row 8); values are "
        "compared as given, so 1 and '1' would be two different labels. Convert them to one type first"
    )
    with pytest.raises(
        DatasetError, match=r"dataframe: column 'label': mixes numbers and strings .*'3' at row 8"
    ):
        data.LabeledImages(mixed)  # was a raw TypeError from np.unique
    strings = data.LabeledImages(mixed.assign(label=mixed["label"].astype(str)))
    assert strings.label_names.tolist() == ["0", "1", "2", "3"]
    sequences = df.assign(sequence=[1, 1, 2, None, "s", "s", 3, 3, 4, 4, 5, 5])
    assert "column 'sequence': mixes numbers and strings (e.g. 1 at row 0 and 's' at row 4)" in _error(
        sequences, root
    )
    with pytest.raises(DatasetError, match=r"dataframe: column 'sequence': mixes numbers and strings"):
        data.LabeledImages(sequences)
    assert len(data.LabeledImages(df.assign(sequence=["a", None, "b", "", "a", np.nan] * 2)).sequences) == 12


@pytest.mark.parametrize("box", [(0.2, 0.2, 0.4, 0.4), (3, 3, 3.4, 9)])
def test_box_under_one_pixel_after_rounding_is_refused(dataset, box):
    df, root = dataset
    message = _error(_with_box(df, 3, box), root, source="b.csv")
    assert message.startswith(
        "b.csv: box less than one pixel wide or high after rounding to whole pixels in 1 row(s) (3); first: "
        f"row 3 box ({', '.join(map(str, map(float, box)))}) crops to "
    )
    assert "not fractions of the image" in message
    image = root / df.loc[3, "path"]
    with pytest.raises(
        DatasetError, match=rf"{image}: box \(0\.2, 0\.2, 0\.4, 0\.4\) is less than one pixel"
    ):
        data.load_image(image, (0.2, 0.2, 0.4, 0.4))
    assert data.load_image(image, (0.2, 0.2, 1.6, 1.6)).size == (2, 2)


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of width x height black pixels (a few kB: no decoder runs to make it)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = (b"\x00" * (1 + (width + 7) // 8)) * height
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def test_decompression_bomb_image_is_named_with_what_to_do(dataset):
    df, root = dataset
    big = _huge_png(root / "img" / "2_0.png", 20000, 20000)  # replaces a validation image
    with pytest.raises(DatasetError, match=rf"{big}: the image is too large to open safely \(Image size "):
        data.load_image(big)
    with pytest.raises(DatasetError, match=r"2_0\.png: .*Downscale the file .* PIL\.Image\.MAX_IMAGE_PIXELS"):
        data.validation_dataset(df.assign(path=[str(root / p) for p in df["path"]]))[0]
    with_box = _with_box(df, 6, (0, 0, 4, 4))
    assert f"b.csv: {big}: the image is too large to open safely" in _error(with_box, root, source="b.csv")


def test_semicolon_csv_names_the_delimiter_to_pass(dataset):
    df, root = dataset
    csv = root / "semi.csv"
    df.to_csv(csv, sep=";", index=False)
    with pytest.raises(DatasetError) as info:
        data.read_dataset(csv)
    assert str(info.value) == (
        f"{csv}: the header 'label;path;split;is_query;is_gallery' is separated by ';', not ','. Pass "
        f"sep=';' (read_dataset('{csv}', sep=';')), or save the file comma-separated: "
        "pd.read_csv(path, sep=';').to_csv(path, index=False)."
    )
    assert len(data.read_dataset(csv, sep=";")) == len(df)


def test_folder_with_a_stray_csv_is_read_as_an_image_folder(tmp_path):
    folder = _image_folder(tmp_path / "imgs", n_classes=4)
    (folder / "notes.csv").write_text("what,when\nphotos,2024\n")
    with pytest.warns(UserWarning, match=r"imported as an image folder .*notes\.csv there is not an OML"):
        loaded = data.load_dataset(folder, seed=3)
    pd.testing.assert_frame_equal(loaded, data.import_image_folder(folder, seed=3))
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "notes.csv").write_text("what,when\nphotos,2024\n")  # no class folders: the CSV's own error
    with pytest.raises(DatasetError, match=r"notes\.csv: missing required column\(s\) 'label'"):
        data.load_dataset(lone)
