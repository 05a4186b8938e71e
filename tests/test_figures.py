"""The embedded "figures" dataset: determinism, splits, regeneration and refusal to touch foreign folders."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from labkit import data, figures
from labkit.data import DatasetError

TINY = {"n_classes": 6, "images_per_class": 3, "size": 24}


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = data.make_figures(tmp_path / "a", seed=3, **TINY)
    b = data.make_figures(tmp_path / "b", seed=3, **TINY)
    c = data.make_figures(tmp_path / "c", seed=4, **TINY)
    ha, hb, hc = _hashes(a.parent), _hashes(b.parent), _hashes(c.parent)
    assert len(ha) == 6 * 3 + 2 and ha == hb
    images = [k for k in ha if k.endswith(".png")]
    assert all(ha[k] != hc[k] for k in images)


def test_layout_splits_and_columns(tmp_path):
    csv = data.make_figures(tmp_path / "figs", n_classes=16, images_per_class=2, size=32, seed=0)
    assert csv == tmp_path / "figs" / "figures.csv"
    df = data.read_dataset(csv)
    assert len(df) == 32 and df["label"].nunique() == 16
    assert df.groupby("label")["split"].nunique().max() == 1  # class-disjoint
    split_of = df.groupby("label")["split"].first()
    assert (split_of == "validation").sum() == 8 and (split_of == "train").sum() == 8
    val = df["split"] == "validation"
    assert (
        df.loc[val, "is_query"].all()
        and df.loc[val, "is_gallery"].all()
        and not df.loc[~val, "is_query"].any()
    )
    # every category has classes on both sides
    sides = df.groupby("category")["split"].nunique()
    assert set(df["category"]) == {"round", "polygon", "spiky", "sign"} and (sides == 2).all()
    image = data.load_image(df["path"][0])
    assert image.size == (32, 32) and image.mode == "RGB"
    manifest = json.loads((tmp_path / "figs" / "figures.json").read_text())
    assert manifest["complete"] is True and manifest["n_images"] == 32
    assert manifest["params"] == {"n_classes": 16, "images_per_class": 2, "size": 32, "seed": 0, "version": 1}
    other = data.read_dataset(
        data.make_figures(tmp_path / "other", n_classes=16, images_per_class=2, size=32, seed=5)
    )
    assert set(other.query("split == 'validation'")["label"]) != set(
        df.query("split == 'validation'")["label"]
    )


def test_default_classes_are_shape_colour_style():
    table = figures.class_table(32)
    assert len(table) == 32 and table["class_name"].is_unique
    assert table["shape"].nunique() == 8 and table["colour"].nunique() == 4 and table["style"].nunique() == 3
    assert (table.groupby("colour").size() == 8).all()  # same-colour classes differ by shape and style
    assert (table["category"] == table["shape"].map(figures.SHAPES)).all()
    assert figures.class_table(figures.MAX_CLASSES)["class_name"].is_unique
    with pytest.raises(ValueError, match="n_classes must be between 1 and 144"):
        figures.class_table(145)


def test_render_is_deterministic_and_varies_between_images():
    one = np.asarray(figures.render("star", "red", "striped", 32, np.random.default_rng([0, 1, 2])))
    same = np.asarray(figures.render("star", "red", "striped", 32, np.random.default_rng([0, 1, 2])))
    other = np.asarray(figures.render("star", "red", "striped", 32, np.random.default_rng([0, 1, 3])))
    assert one.shape == (32, 32, 3) and np.array_equal(one, same) and not np.array_equal(one, other)


def test_regenerates_only_when_parameters_change(tmp_path):
    root = tmp_path / "figs"
    csv = data.make_figures(root, **TINY)
    first = root / "images" / "000_red_filled_circle" / "000.png"
    first.touch()
    touched = first.stat().st_mtime_ns
    assert data.make_figures(root, **TINY) == csv
    assert first.stat().st_mtime_ns == touched  # reused, not rewritten
    (root / "mine.txt").write_text("a user's file")
    data.make_figures(root, **{**TINY, "images_per_class": 2})
    assert not (root / "images" / "000_red_filled_circle" / "002.png").exists()
    assert len(data.read_dataset(csv)) == 12 and (root / "mine.txt").read_text() == "a user's file"


def test_interrupted_generation_is_redone(tmp_path):
    root = tmp_path / "figs"
    data.make_figures(root, **TINY)
    manifest = json.loads((root / "figures.json").read_text())
    (root / "figures.json").write_text(json.dumps({**manifest, "complete": False}))
    victim = root / "images" / "001_green_outline_circle" / "001.png"
    victim.unlink()
    data.make_figures(root, **TINY)
    assert victim.is_file() and json.loads((root / "figures.json").read_text())["complete"] is True
    victim.unlink()  # a lost image is detected as well
    data.make_figures(root, **TINY)
    assert victim.is_file()


def test_generation_waits_for_a_concurrent_one_on_the_same_folder(tmp_path):
    root = tmp_path / "figs"
    results: list[Path] = []
    worker = threading.Thread(target=lambda: results.append(data.make_figures(root, **TINY)))
    with FileLock(figures.lock_path(root)):  # another process generating this folder
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not root.exists()  # waits without touching the folder
    worker.join(timeout=60)
    assert results == [root / "figures.csv"] and len(data.read_dataset(results[0])) == 18
    assert figures.lock_path(root) == tmp_path / "figs.lock"


def test_refuses_a_non_empty_folder_without_manifest(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(DatasetError, match=f"{root} is not empty and has no labkit manifest"):
        data.make_figures(root, **TINY)
    assert [p.name for p in root.iterdir()] == ["holiday.jpg"]
    (root / "holiday.jpg").unlink()
    (root / "figures.json").write_text('{"something": "else"}')  # not ours either
    with pytest.raises(DatasetError, match="no labkit manifest"):
        data.make_figures(root, **TINY)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert data.make_figures(empty, **TINY).is_file()


def test_load_dataset_figures_under_data_dir(tmp_path):
    df = data.load_dataset("figures", data_dir=tmp_path, seed=1, **TINY)
    assert (tmp_path / "figures-6x3-24px-seed1-v1" / "figures.csv").is_file()  # the folder of its parameters
    assert len(df) == 18 and all(Path(p).is_absolute() for p in df["path"])


def test_rejects_too_small_parameters(tmp_path):
    with pytest.raises(ValueError, match="images_per_class must be at least 2"):
        data.make_figures(tmp_path, n_classes=4, images_per_class=1)
    with pytest.raises(ValueError, match="n_classes must be at least 2"):
        data.make_figures(tmp_path, n_classes=1)
    assert not any(tmp_path.iterdir())


def test_default_root_is_one_folder_per_generation(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path))
    a = data.make_figures(seed=0, **TINY)
    b = data.make_figures(seed=0, **{**TINY, "n_classes": 4})
    assert a == tmp_path / "figures-6x3-24px-seed0-v1" / "figures.csv"
    assert b == tmp_path / "figures-4x3-24px-seed0-v1" / "figures.csv"
    assert len(data.read_dataset(a)) == 18 and len(data.read_dataset(b)) == 12  # both kept
