"""The public-benchmark converters on tiny fake copies of the official layouts, and the protocol on
index files of the true sizes (rows only, no images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from labkit import data, public_datasets
from labkit.data import DatasetError

BOX = list(data.BOX)


def _image(path: Path, size: tuple[int, int] = (40, 30), colour: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour * 40 % 256, 80, 120)).save(path)


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _spread(total: int, n: int) -> np.ndarray:
    """n counts summing to total, as even as possible."""
    counts = np.full(n, total // n)
    counts[: total % n] += 1
    return counts


# ------------------------------------------------------------------------------------ fake layouts

# CUB: 2 training classes (1, 2) and 2 validation classes (101, 102), 3 images each, 40x30 pixels.
CUB_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 101: "101.White_Pelican",
               102: "102.Western_Wood_Pewee"}  # fmt: skip


def make_cub(root: Path, *, images: bool = True) -> Path:
    names, labels, boxes = [], [], []
    image_id = 0
    for class_id, folder in CUB_CLASSES.items():
        for k in range(3):
            image_id += 1
            name = f"{folder}/{folder.split('.')[1]}_{k:04d}_{image_id}.jpg"
            names.append(f"{image_id} {name}")
            labels.append(f"{image_id} {class_id}")
            boxes.append(f"{image_id} {k + 1}.0 2.0 20.0 {10 + k}.0")
            if images:
                _image(root / "images" / name, colour=class_id)
    boxes[-1] = f"{image_id} 30.0 5.0 25.0 10.0"  # reaches x=55 > 40: clipped to the image
    _write(root / "images.txt", names)
    _write(root / "image_class_labels.txt", labels)
    _write(root / "bounding_boxes.txt", boxes)
    _write(root / "train_test_split.txt", [f"{i} {i % 2}" for i in range(1, image_id + 1)])
    return root


CARS_USED = (1, 2, 99, 100)  # 2 training and 2 validation classes, 3 images each


def _cars_struct(records: list[dict], name_field: str) -> np.ndarray:
    fields = [name_field, "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    array = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, record in enumerate(records):
        array[0, i] = tuple(
            record[f] if f == name_field else np.array([[record[f]]], np.uint16) for f in fields
        )
    return array


def _class_names() -> np.ndarray:
    names = np.empty((1, public_datasets.CARS_CLASSES), dtype=object)
    names[0, :] = [f"Make Model {c} 2012" for c in range(1, public_datasets.CARS_CLASSES + 1)]
    return names


def _cars_records() -> list[dict]:
    records = []
    for class_id in CARS_USED:
        for k in range(3):
            n = len(records) + 1
            records.append(
                {
                    "n": n,
                    "bbox_x1": 2 + k,
                    "bbox_y1": 3,
                    "bbox_x2": 30,
                    "bbox_y2": 25,
                    "class": class_id,
                    "test": k % 2,
                }  # fmt: skip
            )
    return records


def make_cars(root: Path, *, images: bool = True) -> Path:
    from scipy.io import savemat

    records = _cars_records()
    for r in records:
        r["relative_im_path"] = f"car_ims/{r['n']:06d}.jpg"
        if images:
            _image(root / r["relative_im_path"], colour=r["class"])
    root.mkdir(parents=True, exist_ok=True)
    savemat(root / "cars_annos.mat", {"annotations": _cars_struct(records, "relative_im_path"),
                                      "class_names": _class_names()})  # fmt: skip
    return root


def make_cars_devkit(root: Path) -> Path:
    from scipy.io import savemat

    records = _cars_records()
    halves = {
        "cars_train": [r for r in records if not r["test"]],
        "cars_test": [r for r in records if r["test"]],
    }
    for folder, part in halves.items():
        for i, r in enumerate(part):
            r["fname"] = f"{i + 1:05d}.jpg"
            _image(root / folder / r["fname"], colour=r["class"])
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(
        root / "devkit" / "cars_train_annos.mat", {"annotations": _cars_struct(halves["cars_train"], "fname")}
    )
    savemat(
        root / "cars_test_annos_withlabels.mat", {"annotations": _cars_struct(halves["cars_test"], "fname")}
    )
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": _class_names()})
    return root


SOP_HEADER = "image_id class_id super_class_id path"
# (class_id, super_class_id, folder); train classes 1-2, validation classes 11319-11320
SOP_CLASSES = {"train": [(1, 1, "bicycle_final"), (2, 2, "cabinet_final")],
               "test": [(11319, 1, "bicycle_final"), (11320, 2, "cabinet_final")]}  # fmt: skip


def make_sop(root: Path, *, images: bool = True) -> Path:
    image_id = 0
    for part, classes in SOP_CLASSES.items():
        lines = [SOP_HEADER]
        for class_id, super_id, folder in classes:
            for k in range(2):
                image_id += 1
                path = f"{folder}/{class_id}0000{k}_{k}.JPG"
                lines.append(f"{image_id} {class_id} {super_id} {path}")
                if images:
                    _image(root / path, colour=class_id)
        _write(root / f"Ebay_{part}.txt", lines)
    return root


# item: (status of each image); items 1-2 train, 3-4 validation
INSHOP_ITEMS = {1: ("train", "train"), 2: ("train", "train", "train"), 3: ("query", "gallery", "gallery"),
                4: ("query", "gallery")}  # fmt: skip
INSHOP_TYPES = {1: "WOMEN/Dresses", 2: "MEN/Denim", 3: "WOMEN/Dresses", 4: "MEN/Tees_Tanks"}


def make_inshop(root: Path, *, official_folders: bool = False, images: bool = True) -> Path:
    """The flat layout OML documents, or (official_folders) the Google Drive one: Eval/, Anno/, Img/img/."""
    partition, boxes = [], []
    for item, statuses in INSHOP_ITEMS.items():
        for k, status in enumerate(statuses):
            name = f"img/{INSHOP_TYPES[item]}/id_{item:08d}/{k + 1:02d}_{k + 1}_front.jpg"
            partition.append(f"{name}  id_{item:08d}  {status}")
            boxes.append(f"{name}  1  1  {5 + k}  4  30  28")
            if images:
                _image((root / "Img" if official_folders else root) / name, size=(32, 32), colour=item)
    header = [str(len(partition)), "image_name item_id evaluation_status"]
    _write(root / ("Eval" if official_folders else "") / "list_eval_partition.txt", header + partition)
    box_header = [str(len(boxes)), "image_name  clothes_type  pose_type  x_1  y_1  x_2  y_2"]
    _write(root / ("Anno" if official_folders else "") / "list_bbox_inshop.txt", box_header + boxes)
    return root


MAKERS = {"cub": make_cub, "cars": make_cars, "sop": make_sop, "inshop": make_inshop}


class _no_fail:
    """Warnings are expected from some converters (e.g. a clipped box); tests read them from df.attrs."""

    def __enter__(self):
        import warnings

        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def convert(name: str, root: Path, **options) -> pd.DataFrame:
    with _no_fail():
        return public_datasets.convert(name, root, **options)


def _roundtrip(df: pd.DataFrame, tmp_path: Path) -> pd.DataFrame:
    """Written as an OML CSV and read back through the validator (files and boxes checked)."""
    csv = data.write_dataset(df, tmp_path / "out" / "dataset.csv")
    with _no_fail():
        return data.read_dataset(csv)


# ------------------------------------------------------------------------------------ conversions


def test_cub_split_by_class_boxes_and_names(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    df = convert("cub", root)
    assert list(df.columns[:9]) == ["label", "path", "split", "is_query", "is_gallery", *BOX]
    assert df["label"].tolist() == [1] * 3 + [2] * 3 + [101] * 3 + [102] * 3
    assert df["split"].tolist() == ["train"] * 6 + ["validation"] * 6
    assert df["is_query"].tolist() == [False] * 6 + [True] * 6
    assert df["is_gallery"].tolist() == [False] * 6 + [True] * 6
    assert df["path"][0] == str(root / "images/001.Black_footed_Albatross/Black_footed_Albatross_0000_1.jpg")
    assert df["class_name"].unique().tolist() == [
        "Black_footed_Albatross", "Laysan_Albatross", "White_Pelican", "Western_Wood_Pewee"]  # fmt: skip
    # x y width height -> x_1 y_1 x_2 y_2; the last box (30, 5, 55, 15) is clipped to the 40x30 image
    assert df.loc[0, BOX].tolist() == [1.0, 2.0, 21.0, 12.0]
    assert df.loc[2, BOX].tolist() == [3.0, 2.0, 23.0, 14.0]
    assert df.loc[11, BOX].tolist() == [30.0, 5.0, 40.0, 15.0]
    assert any("1 box(es) reached past their image" in w for w in df.attrs["warnings"])
    assert df.attrs["source"] == f"cub:{root}"
    assert "category" not in df.columns  # CUB has no super-class
    back = _roundtrip(df, tmp_path)
    pd.testing.assert_frame_equal(back[df.columns].reset_index(drop=True), df, check_dtype=False)


def test_boxes_outside_the_image_or_empty_are_dropped(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    _replace(root / "bounding_boxes.txt", "1 1.0 2.0 20.0 10.0\n", "1 45.0 2.0 5.0 5.0\n")  # x_1 past 40
    _replace(root / "bounding_boxes.txt", "2 2.0 2.0 20.0 11.0\n", "2 2.0 2.0 0.0 11.0\n")  # zero width
    df = convert("cub", root)
    assert df.loc[[0, 1], BOX].isna().all().all() and df.loc[2:, BOX].notna().all().all()
    assert df.loc[11, BOX].tolist() == [30.0, 5.0, 40.0, 15.0]
    assert [w.split(": ", 1)[1] for w in df.attrs["warnings"]] == [
        "1 empty or negative box(es) were dropped (whole image).",
        "1 box(es) reached past their image and were clipped to it.",
        "1 box(es) outside their image were dropped (whole image).",
    ]
    _roundtrip(df, tmp_path)


def test_cub_classification_split_file_is_not_used(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    (root / "train_test_split.txt").unlink()
    df = convert("cub", root, boxes=False)
    assert len(df) == 12 and not any(c in df.columns for c in BOX)


@pytest.mark.parametrize("layout", ["cars_annos", "devkit"])
def test_cars_split_by_class_from_the_mat_files(tmp_path, layout):
    pytest.importorskip("scipy")
    root = (make_cars if layout == "cars_annos" else make_cars_devkit)(tmp_path / "cars196")
    df = convert("cars", root)
    df = df.sort_values(["label", "x_1"], kind="stable").reset_index(drop=True)
    assert df["label"].tolist() == [1] * 3 + [2] * 3 + [99] * 3 + [100] * 3
    assert df["split"].tolist() == ["train"] * 6 + ["validation"] * 6  # the `test` flag is ignored
    assert (df["is_query"] == (df["split"] == "validation")).all()
    assert (df["is_gallery"] == (df["split"] == "validation")).all()
    assert df["class_name"].tolist()[::3] == ["Make Model 1 2012", "Make Model 2 2012", "Make Model 99 2012",
                                              "Make Model 100 2012"]  # fmt: skip
    assert df.loc[0, BOX].tolist() == [2.0, 3.0, 30.0, 25.0]
    assert df.loc[2, BOX].tolist() == [4.0, 3.0, 30.0, 25.0]
    if layout == "cars_annos":
        assert df["path"][0] == str(root / "car_ims/000001.jpg")
    else:
        assert {Path(p).parent.name for p in df["path"]} == {"cars_train", "cars_test"}
    assert df.attrs["warnings"] == []
    _roundtrip(df, tmp_path)


def test_sop_files_give_the_split_and_super_classes_the_category(tmp_path):
    root = make_sop(tmp_path / "Stanford_Online_Products")
    df = convert("sop", root)
    assert df["label"].tolist() == [1, 1, 2, 2, 11319, 11319, 11320, 11320]
    assert df["split"].tolist() == ["train"] * 4 + ["validation"] * 4
    assert df["is_query"].tolist() == [False] * 4 + [True] * 4
    assert df["is_gallery"].tolist() == [False] * 4 + [True] * 4
    assert df["category"].tolist() == ["bicycle", "bicycle", "cabinet", "cabinet"] * 2
    assert df["super_class_id"].tolist() == [1, 1, 2, 2] * 2
    assert df["path"][0] == str(root / "bicycle_final/100000_0.JPG")
    assert not any(c in df.columns for c in BOX)
    _roundtrip(df, tmp_path)


@pytest.mark.parametrize("official_folders", [False, True], ids=["flat", "eval-anno-img"])
def test_inshop_query_gallery_as_given(tmp_path, official_folders):
    root = make_inshop(tmp_path / "InShop", official_folders=official_folders)
    df = convert("inshop", root)
    assert df["label"].tolist() == [1, 1, 2, 2, 2, 3, 3, 3, 4, 4]
    assert df["split"].tolist() == ["train"] * 5 + ["validation"] * 5
    assert df["is_query"].tolist() == [False] * 5 + [True, False, False, True, False]
    assert df["is_gallery"].tolist() == [False] * 5 + [False, True, True, False, True]
    assert df["category"].tolist() == ["Dresses"] * 2 + ["Denim"] * 3 + ["Dresses"] * 3 + ["Tees_Tanks"] * 2
    assert df.loc[0, BOX].tolist() == [5.0, 4.0, 30.0, 28.0]
    assert df.loc[1, BOX].tolist() == [6.0, 4.0, 30.0, 28.0]
    images = root / "Img" if official_folders else root
    assert df["path"][0] == str(images / "img/WOMEN/Dresses/id_00000001/01_1_front.jpg")
    _roundtrip(df, tmp_path)


def test_inshop_high_resolution_images_are_read_without_boxes(tmp_path):
    root = make_inshop(tmp_path / "InShop")
    (root / "img").rename(root / "img_highres")  # only the high-resolution archive extracted
    df = convert("inshop", root)  # found by itself; its images have no boxes in the annotation
    assert df["path"][0] == str(root / "img_highres/WOMEN/Dresses/id_00000001/01_1_front.jpg")
    assert not any(c in df.columns for c in BOX)
    assert df["is_query"].sum() == 2 and df["is_gallery"].sum() == 3
    with pytest.raises(ValueError, match="boxes=False"):
        public_datasets.convert_inshop(root, images="img_highres", boxes=True)
    with pytest.raises(DatasetError, match=r"10 of 10 listed image\(s\) are missing, e\.g\. .*/img/WOMEN"):
        public_datasets.convert_inshop(root, images="img")


# ------------------------------------------------------------------------------------ errors

ANNOTATION_FILES = {
    "cub": ["images.txt", "image_class_labels.txt", "bounding_boxes.txt"],
    "cars": ["cars_annos.mat"],
    "sop": ["Ebay_train.txt", "Ebay_test.txt"],
    "inshop": ["list_eval_partition.txt", "list_bbox_inshop.txt"],
}


@pytest.mark.parametrize(
    ("name", "file"), [(n, f) for n, files in ANNOTATION_FILES.items() for f in files], ids=lambda v: str(v)
)
def test_a_missing_annotation_file_is_named(tmp_path, name, file):
    if name == "cars":
        pytest.importorskip("scipy")
    root = MAKERS[name](tmp_path / name, images=False)
    (root / file).unlink()
    with pytest.raises(DatasetError, match=rf"annotation file {file} is missing .*{root / file}"):
        public_datasets.convert(name, root, check_images=False)


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)nowhere: no such folder; .*CUB-200-2011.*images.txt"):
        public_datasets.convert("cub", tmp_path / "nowhere")


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_class_ids_out_of_range_are_named(tmp_path):
    cub = make_cub(tmp_path / "cub", images=False)
    _replace(cub / "image_class_labels.txt", "4 2\n", "4 201\n")
    with pytest.raises(
        DatasetError, match=r"image_class_labels.txt: class id out of range .*image 4 has 201"
    ):
        public_datasets.convert("cub", cub, check_images=False)

    sop = make_sop(tmp_path / "sop", images=False)
    _replace(sop / "Ebay_test.txt", "5 11319 1", "5 22635 1")
    with pytest.raises(DatasetError, match=r"Ebay_test.txt: class id out of range .*image_id 5 has 22635"):
        public_datasets.convert("sop", sop, check_images=False)

    inshop = make_inshop(tmp_path / "inshop", images=False)
    _replace(inshop / "list_eval_partition.txt", "id_00000004  query", "id_00007983  query")
    with pytest.raises(DatasetError, match=r"list_eval_partition.txt: item number out of range .*has 7983"):
        public_datasets.convert("inshop", inshop, check_images=False)


def test_cars_class_id_out_of_range_is_named(tmp_path):
    pytest.importorskip("scipy")
    from scipy.io import savemat

    root = tmp_path / "cars"
    records = _cars_records()
    for r in records:
        r["relative_im_path"] = f"car_ims/{r['n']:06d}.jpg"
    records[4]["class"] = 197
    root.mkdir()
    savemat(root / "cars_annos.mat", {"annotations": _cars_struct(records, "relative_im_path")})
    with pytest.raises(DatasetError, match=r"cars_annos.mat: class id out of range .*000005.jpg has 197"):
        public_datasets.convert("cars", root, check_images=False)


@pytest.mark.parametrize("name", list(MAKERS))
def test_an_image_listed_but_absent_is_named(tmp_path, name):
    if name == "cars":
        pytest.importorskip("scipy")
    root = MAKERS[name](tmp_path / name)
    df = convert(name, root)
    victim = Path(df["path"].iloc[-1])
    victim.unlink()
    with pytest.raises(DatasetError, match=rf"1 of {len(df)} listed image\(s\) are missing, e\.g\. {victim}"):
        public_datasets.convert(name, root)
    assert len(convert(name, root, check_images=False)) == len(df)  # the index alone still converts


def test_malformed_index_files_are_named(tmp_path):
    sop = make_sop(tmp_path / "sop", images=False)
    _replace(sop / "Ebay_train.txt", SOP_HEADER + "\n", "")
    with pytest.raises(DatasetError, match=r"Ebay_train.txt: line 1 should be the header 'image_id class_id"):
        public_datasets.convert("sop", sop, check_images=False)

    inshop = make_inshop(tmp_path / "inshop", images=False)
    _replace(inshop / "list_eval_partition.txt", "10\n", "11\n")
    with pytest.raises(DatasetError, match=r"line 1 announces 11 entries but the file lists 10"):
        public_datasets.convert("inshop", inshop, check_images=False)

    cub = make_cub(tmp_path / "cub", images=False)
    _replace(cub / "image_class_labels.txt", "3 1\n", "3 one\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt: field 'class_id' must be an integer"):
        public_datasets.convert("cub", cub, check_images=False)


# ------------------------------------------------------------------------------------ load_dataset and CSV


def test_load_dataset_converts_a_prefixed_source(tmp_path):
    root = make_sop(tmp_path / "Stanford_Online_Products")
    with _no_fail():
        df = data.load_dataset(f"sop:{root}")
        expected = public_datasets.convert_sop(root)
    pd.testing.assert_frame_equal(df, expected)
    assert public_datasets.parse_source(f"  InShop:{root} ") == ("inshop", root)
    assert public_datasets.parse_source(str(root)) is None
    assert public_datasets.parse_source("figures") is None


def test_convert_writes_the_csv_without_overwriting(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    csv = tmp_path / "run" / "dataset.csv"
    df = convert("cub", root, csv_path=csv)
    written = pd.read_csv(csv)
    assert len(written) == len(df) and written["path"][0].startswith(str(root))
    assert written["is_query"].isna().sum() == 6  # OML leaves the flags empty on train rows
    with pytest.raises(FileExistsError):
        convert("cub", root, csv_path=csv)


# ------------------------------------------------------------------------------------ protocol (true sizes)


def test_cub_protocol_on_index_files_of_the_true_size(tmp_path):
    counts = np.concatenate([_spread(5_864, 100), _spread(5_924, 100)])
    class_ids = np.repeat(np.arange(1, 201), counts)
    ids = np.arange(1, len(class_ids) + 1)
    _write(
        tmp_path / "images.txt",
        [f"{i} {c:03d}.bird_{c}/bird_{i}.jpg" for i, c in zip(ids, class_ids, strict=True)],
    )
    _write(tmp_path / "image_class_labels.txt", [f"{i} {c}" for i, c in zip(ids, class_ids, strict=True)])
    _write(tmp_path / "bounding_boxes.txt", [f"{i} 1.0 2.0 30.0 40.0" for i in ids])
    df = convert("cub", tmp_path, check_images=False)
    summary = data.dataset_summary(df, per_class=False).set_index("split")
    assert len(df) == 11_788
    assert summary.loc["train", ["classes", "images"]].tolist() == [100, 5_864]
    assert summary.loc["validation", ["classes", "images", "queries", "gallery"]].tolist() == [
        100,
        5_924,
        5_924,
        5_924,
    ]
    assert set(df.loc[df["split"] == "train", "label"]) == set(range(1, 101))


def test_cars_protocol_on_an_annotation_file_of_the_true_size(tmp_path):
    pytest.importorskip("scipy")
    from scipy.io import savemat

    counts = np.concatenate([_spread(8_054, 98), _spread(8_131, 98)])
    classes = np.repeat(np.arange(1, 197), counts)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.zeros((1, len(classes)), dtype=[(f, "O") for f in fields])
    annotations["relative_im_path"][0] = [f"car_ims/{i + 1:06d}.jpg" for i in range(len(classes))]
    for field, value in (("bbox_x1", 1), ("bbox_y1", 2), ("bbox_x2", 50), ("bbox_y2", 40), ("test", 0)):
        annotations[field][0] = [value] * len(classes)
    annotations["class"][0] = classes.tolist()
    savemat(tmp_path / "cars_annos.mat", {"annotations": annotations, "class_names": _class_names()})
    df = convert("cars", tmp_path, check_images=False)
    summary = data.dataset_summary(df, per_class=False).set_index("split")
    assert len(df) == 16_185
    assert summary.loc["train", ["classes", "images"]].tolist() == [98, 8_054]
    assert summary.loc["validation", ["classes", "images", "queries", "gallery"]].tolist() == [
        98,
        8_131,
        8_131,
        8_131,
    ]
    assert set(df.loc[df["split"] == "validation", "label"]) == set(range(99, 197))


def test_sop_protocol_on_index_files_of_the_true_size(tmp_path):
    first = 1
    for part, n_classes, n_images in (("train", 11_318, 59_551), ("test", 11_316, 60_502)):
        classes = np.repeat(np.arange(first, first + n_classes), _spread(n_images, n_classes))
        supers = (classes % 12) + 1
        lines = [SOP_HEADER] + [
            f"{i + 1} {c} {s} super{s}_final/{c}_{i}.JPG"
            for i, (c, s) in enumerate(zip(classes, supers, strict=True))
        ]
        _write(tmp_path / f"Ebay_{part}.txt", lines)
        first += n_classes
    df = convert("sop", tmp_path, check_images=False)
    summary = data.dataset_summary(df, per_class=False).set_index("split")
    assert len(df) == 120_053
    assert summary.loc["train", ["classes", "images"]].tolist() == [11_318, 59_551]
    assert summary.loc["validation", ["classes", "images", "queries", "gallery"]].tolist() == [
        11_316,
        60_502,
        60_502,
        60_502,
    ]
    assert df["category"].nunique() == 12


def test_inshop_protocol_on_index_files_of_the_true_size(tmp_path):
    train_items = np.repeat(np.arange(1, 3_998), _spread(25_882, 3_997))
    test_ids = np.arange(3_998, 7_983)
    queries = np.repeat(test_ids, _spread(14_218, 3_985))
    gallery = np.repeat(test_ids, _spread(12_612, 3_985))
    rows = (
        [(i, "train") for i in train_items]
        + [(i, "query") for i in queries]
        + [(i, "gallery") for i in gallery]
    )
    names = [f"img/WOMEN/Dresses/id_{i:08d}/{k:05d}_front.jpg" for k, (i, _) in enumerate(rows)]
    partition = [f"{n} id_{i:08d} {s}" for n, (i, s) in zip(names, rows, strict=True)]
    _write(
        tmp_path / "list_eval_partition.txt",
        [str(len(rows)), "image_name item_id evaluation_status", *partition],
    )
    boxes = [f"{n} 1 1 10 20 100 200" for n in names]
    box_header = "image_name clothes_type pose_type x_1 y_1 x_2 y_2"
    _write(tmp_path / "list_bbox_inshop.txt", [str(len(rows)), box_header, *boxes])
    df = convert("inshop", tmp_path, check_images=False)
    summary = data.dataset_summary(df, per_class=False).set_index("split")
    assert len(df) == 52_712
    assert summary.loc["train", ["classes", "images"]].tolist() == [3_997, 25_882]
    assert summary.loc["validation", ["classes", "images", "queries", "gallery"]].tolist() == [
        3_985, 26_830, 14_218, 12_612]  # fmt: skip
    assert not (df["is_query"] & df["is_gallery"]).any()
    assert df.loc[0, BOX].tolist() == [10.0, 20.0, 100.0, 200.0]


# ------------------------------------------------------------------------------------ 00_data


@pytest.mark.slow
def test_00_data_converts_a_benchmark_on_the_fly(tmp_path, execute_notebook):
    root = make_cub(tmp_path / "CUB_200_2011")
    run_dir = tmp_path / "run"
    execute_notebook("00_data", {"dataset": f"cub:{root}", "grid_classes": 2, "grid_images": 2}, run_dir)
    counts = json.loads((run_dir / "metrics.json").read_text())["data"]
    assert counts["n_images"] == 12 and counts["n_classes"] == 4
    assert counts["train/images"] == 6 and counts["validation/queries"] == 6
