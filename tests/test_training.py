"""Trainer: history and logs, checkpoints (refuse, repeat, resume, export), and learning on a tiny config."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from labkit.data import IS_GALLERY, IS_QUERY, SPLIT, TRAIN, VALIDATION, validation_dataset
from labkit.metrics import flatten_metrics, retrieval_metrics
from labkit.models import create_extractor, embed, fingerprint, load_extractor
from labkit.training import evaluate, read_history, train

# 4 train labels x 6 images, 32x32: one batch of 4 labels x 2 images per epoch, timm's tiny test_resnet
TINY = {
    "backbone": "test_resnet",
    "image_size": 32,
    "n_labels": 4,
    "n_instances": 2,
    "seed": 0,
    "progress": False,
}


def metric_values(frame: pd.DataFrame, epoch: int) -> pd.Series:
    return frame.set_index("epoch").loc[epoch].drop(["step", "loss"])


def test_checkpoints_refuse_repeat_resume_and_export(figures_df, tmp_path):
    run_dir = tmp_path / "run"
    first = train(figures_df, run_dir=run_dir, epochs=1, **TINY)

    # history: epoch 0 before training (no loss), epoch 1 after; written to CSV and readable back
    history = read_history(run_dir)
    assert history["epoch"].tolist() == [0, 1] and history["step"].tolist() == [0, 1]
    assert math.isnan(history["loss"][0]) and history["loss"][1] > 0
    assert {"cmc@1", "cmc@5", "precision@5", "map@5"} <= set(history.columns)
    assert any(c.endswith("/cmc@1") for c in history.columns)  # per category (figures have categories)
    pd.testing.assert_frame_equal(history, first.history, check_dtype=False)
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (
        run_dir / "checkpoints" / "last.ckpt"
    ).is_file()
    assert list((run_dir / "logs" / "csv").glob("*/metrics.csv"))
    assert list((run_dir / "logs" / "tensorboard").glob("*/events.out.tfevents.*"))
    assert first.best_epoch == 1 and first.best_score == pytest.approx(history["cmc@1"][1])

    # the exported extractor reproduces the best checkpoint's embeddings and the logged metrics
    exported = load_extractor(run_dir / "extractor.pt")
    from_ckpt = load_extractor(run_dir / "checkpoints" / "best.ckpt")
    dataset = validation_dataset(figures_df, exported.transforms())
    embeddings = embed(exported, dataset, progress=False)
    assert torch.equal(embeddings, embed(from_ckpt, dataset, progress=False))
    assert torch.equal(embeddings, embed(first.extractor, dataset, progress=False))
    logged = metric_values(history, 1)
    recomputed = pd.Series(flatten_metrics(evaluate(exported, dataset)))[logged.index]
    pd.testing.assert_series_equal(recomputed.astype(float), logged.astype(float), check_names=False)

    # an existing run is never overwritten silently
    with pytest.raises(FileExistsError, match=r"best\.ckpt.*resume=True.*overwrite=True"):
        train(figures_df, run_dir=run_dir, epochs=1, **TINY)

    # the same seed repeats the run exactly
    again = train(figures_df, run_dir=run_dir, epochs=1, overwrite=True, **TINY)
    pd.testing.assert_frame_equal(again.history, first.history)
    assert fingerprint(again.extractor) == fingerprint(first.extractor)

    # resume continues the epoch count, the history and the optimiser state
    resumed = train(figures_df, run_dir=run_dir, epochs=2, resume=True, **TINY)
    assert resumed.history["epoch"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(resumed.history.iloc[:2], first.history)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["labkit_epoch"] == 2 and last["global_step"] == 2
    assert torch.load(resumed.best_checkpoint, weights_only=True)["labkit_epoch"] == resumed.best_epoch

    adam_steps = {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()}
    assert adam_steps == {2.0}  # one step before the resume, one after
    assert read_history(run_dir / "train_history.csv")["epoch"].tolist() == [0, 1, 2]


def test_training_improves_cmc_on_a_tiny_fixed_seed_config(figures_df, tmp_path):
    # Validated on its own 24 training images (4 labels x 6), ten full-batch steps lift CMC@1 well above the
    # untrained backbone's. (Transfer to unseen classes needs more data and steps: notebooks/01_train.)
    seen = figures_df[figures_df[SPLIT] == TRAIN]
    df = pd.concat(
        [seen, seen.assign(**{SPLIT: VALIDATION, IS_QUERY: True, IS_GALLERY: True})], ignore_index=True
    )
    result = train(
        df,
        run_dir=tmp_path / "learn",
        backbone="resnet18",
        image_size=32,
        epochs=10,
        n_labels=4,
        n_instances=6,
        miner="all",
        lr=3e-3,
        seed=0,
        progress=False,
        export=False,
    )
    cmc = result.history.set_index("epoch")["cmc@1"]
    assert cmc.index.tolist() == list(range(11))
    assert cmc[10] >= cmc[0] + 0.3, cmc.to_dict()
    assert result.history["loss"].iloc[-1] < result.history["loss"].iloc[1]
    assert result.extractor_path is None and not (tmp_path / "learn" / "extractor.pt").exists()
    last = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert last["labkit_epoch"] == 10  # last.ckpt is the final state even when the best epoch is earlier


def test_evaluate_matches_retrieval_metrics_and_read_history_errors(figures_df, tmp_path):
    torch.manual_seed(0)
    extractor = create_extractor(image_size=32, embedding_size=8)
    dataset = validation_dataset(figures_df, extractor.transforms())
    embeddings = embed(extractor, dataset, progress=False)
    expected = retrieval_metrics(
        embeddings,
        dataset.labels,
        dataset.is_query,
        dataset.is_gallery,
        categories=dataset.categories,
        pcf_variance=(),
    )
    assert flatten_metrics(evaluate(extractor, dataset)) == flatten_metrics(expected)
    with pytest.raises(FileNotFoundError, match="No training history"):
        read_history(tmp_path)


def test_impossible_sampler_settings_fail_before_training(figures_df, tmp_path):
    with pytest.raises(ValueError, match="n_labels=9 .* only 4 labels"):
        train(figures_df, run_dir=tmp_path / "bad", epochs=1, **{**TINY, "n_labels": 9})
    with pytest.raises(FileNotFoundError, match="Cannot resume"):
        train(figures_df, run_dir=tmp_path / "none", epochs=1, resume=True, **TINY)
