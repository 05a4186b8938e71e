"""The run folder's dataset (labkit.rundata): written once by 00_data, read by every later notebook."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from labkit import data, figures, pipeline, rundata

TINY = {"n_classes": 8, "images_per_class": 3, "figure_size": 24}


def _image_folder(root: Path, n_classes: int = 6, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


def _hashes(paths) -> dict[str, str]:
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def test_prepare_writes_an_oml_csv_and_its_description(tmp_path):
    run = tmp_path / "run"
    held = rundata.prepare(run, "figures", seed=1, data_dir=tmp_path / "data", **TINY)
    csv = pd.read_csv(run / "dataset.csv")
    assert list(csv.columns[:6]) == ["label", "path", "split", "is_query", "is_gallery", "category"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in csv["path"])  # OML reads it as it is
    assert csv.loc[csv["split"] == "train", "is_query"].isna().all()  # OML leaves train flags empty
    info = json.loads((run / "dataset.json").read_text())
    assert info["source"] == "figures" and info["kind"] == "figures"
    assert info["params"] == {"seed": 1, "n_classes": 8, "images_per_class": 3, "figure_size": 24}
    assert info["images_root"] == str(tmp_path / "data" / "figures-8x3-24px-seed1-v1")
    assert info["counts"]["n_images"] == 24 and info["counts"]["validation"]["queries"] == 12
    assert len(info["fingerprint"]) == 64
    assert held.seed == 1 and len(held.df) == 24
    again = rundata.load(run, "figures")
    pd.testing.assert_frame_equal(again.df, held.df)
    assert again.df.attrs["run_dataset"] == str(run / "dataset.csv")


def test_other_figures_parameters_leave_an_existing_runs_images_untouched(tmp_path):
    """Regression: another n_classes used to regenerate data/figures/ in place under earlier runs."""
    first = data.load_dataset("figures", data_dir=tmp_path, seed=0, n_classes=8, images_per_class=3, size=24)
    before = _hashes(first["path"])
    other = data.load_dataset("figures", data_dir=tmp_path, seed=0, n_classes=6, images_per_class=3, size=24)
    assert set(other["path"]).isdisjoint(first["path"])  # a folder of its own
    assert _hashes(first["path"]) == before
    # and through the run folder: run a keeps reading its images, unchanged
    rundata.prepare(tmp_path / "a", "figures", data_dir=tmp_path, **TINY)
    images = _hashes(rundata.load(tmp_path / "a").df["path"])
    rundata.prepare(tmp_path / "b", "figures", data_dir=tmp_path, **{**TINY, "n_classes": 4})
    rundata.prepare(tmp_path / "c", "figures", data_dir=tmp_path, seed=5, **TINY)
    assert _hashes(rundata.load(tmp_path / "a").df["path"]) == images


def test_a_mismatched_dataset_request_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    rundata.prepare(run, "figures", data_dir=tmp_path / "data", **TINY)
    with pytest.raises(
        rundata.RunDatasetError,
        match=r"asked for dataset '.*other.csv', but the run folder .* holds "
        r"'figures' \(figure_size=24, images_per_class=3, n_classes=8, seed=0; see dataset.json\)",
    ):
        rundata.load(run, tmp_path / "other.csv")
    with pytest.raises(rundata.RunDatasetError, match="already holds another dataset"):
        rundata.prepare(run, "figures", data_dir=tmp_path / "data", **{**TINY, "n_classes": 6})
    with pytest.raises(rundata.RunDatasetError, match="run 00_data into this run folder first"):
        rundata.load(tmp_path / "empty")
    assert len(rundata.load(run, "figures").df) == 24  # the same source is fine


def test_changed_images_under_a_run_are_detected(tmp_path):
    run = tmp_path / "run"
    held = rundata.prepare(run, "figures", data_dir=tmp_path / "data", **TINY)
    victim = Path(held.df["path"].iloc[0])
    Image.new("RGB", (24, 24), "white").save(victim)  # another image of another size
    with pytest.raises(rundata.RunDatasetError, match="changed since 00_data wrote them"):
        rundata.load(run)


def test_an_imported_folder_keeps_its_split_in_the_run_folder(tmp_path):
    folder = _image_folder(tmp_path / "photos")
    run = tmp_path / "run"
    held = rundata.prepare(run, folder, seed=3, val_ratio=0.5)
    assert held.info["kind"] == "folder" and held.info["params"] == {"seed": 3, "val_ratio": 0.5}
    _image_folder(tmp_path / "more", n_classes=1)
    (tmp_path / "more" / "class_0").rename(folder / "class_new")  # the folder grows after 00_data
    later = rundata.load(run, folder)
    pd.testing.assert_frame_equal(later.df, held.df)
    assert not any("class_new" in p for p in later.df["path"])


def test_interactive_folder_moves_the_earlier_run_aside_for_another_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RUNS_DIR", str(tmp_path / "runs"))
    interactive = pipeline.prepare_run_dir("")
    rundata.prepare(interactive, "figures", data_dir=tmp_path / "data", **TINY)
    (interactive / "extractor.pt").write_text("earlier model")
    rundata.prepare(interactive, "figures", data_dir=tmp_path / "data", **{**TINY, "n_classes": 6})
    earlier = tmp_path / "runs" / "interactive-1"
    assert (earlier / "extractor.pt").read_text() == "earlier model"
    assert rundata.describe(earlier)["params"]["n_classes"] == 8
    assert rundata.describe(interactive)["params"]["n_classes"] == 6
    assert not (interactive / "extractor.pt").exists()


def test_rerunning_training_interactively_sets_the_earlier_run_aside(tmp_path, monkeypatch, capsys):
    """Regression (issue 16.3): 01_train run twice in runs/interactive stopped with FileExistsError."""
    monkeypatch.setenv("LABKIT_RUNS_DIR", str(tmp_path / "runs"))
    interactive = pipeline.prepare_run_dir("")
    rundata.prepare(interactive, "figures", data_dir=tmp_path / "data", **TINY)
    assert pipeline.training_run_dir("", resume=False, overwrite=False) == interactive  # nothing trained yet
    assert not (tmp_path / "runs" / "interactive-1").exists()
    (interactive / "checkpoints").mkdir()
    (interactive / "checkpoints" / "best.ckpt").write_text("first")
    (interactive / "validation_embeddings.pt").write_text("of the first model")
    assert pipeline.training_run_dir("", resume=True, overwrite=False) == interactive  # resume: kept
    assert pipeline.training_run_dir("", resume=False, overwrite=False) == interactive
    earlier = tmp_path / "runs" / "interactive-1"
    assert (earlier / "checkpoints" / "best.ckpt").read_text() == "first"
    assert (earlier / "validation_embeddings.pt").is_file()  # later results stay with their model
    assert sorted(p.name for p in interactive.iterdir()) == ["dataset.csv", "dataset.json"]
    assert rundata.load(interactive).info == rundata.load(earlier).info
    assert f"moved whole to {earlier}" in capsys.readouterr().out
    named = tmp_path / "runs" / "named"
    (named / "checkpoints").mkdir(parents=True)
    (named / "checkpoints" / "best.ckpt").write_text("x")
    assert pipeline.training_run_dir(named, resume=False, overwrite=False) == named.resolve()
    assert (named / "checkpoints" / "best.ckpt").is_file()  # a named run is never moved


def test_generation_dir_names_the_parameters(tmp_path):
    assert figures.generation_dir(tmp_path, n_classes=8, images_per_class=3, size=24, seed=2) == (
        tmp_path / "figures-8x3-24px-seed2-v1"
    )
