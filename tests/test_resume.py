"""Resume: last.ckpt is the final state, the history is never rewritten (also after kill -9), and
checkpoints that cannot be resumed are refused with the file named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from labkit.training import HISTORY_CSV, CheckpointError, read_history, train

REPO = Path(__file__).resolve().parents[1]
# 4 train labels x 10 images: 2 batches of 2 labels x 4 images per epoch, timm's tiny test_resnet
RUN = {
    "backbone": "test_resnet",
    "image_size": 32,
    "n_labels": 2,
    "n_instances": 4,
    "seed": 0,
    "progress": False,
}


@pytest.fixture(scope="module")
def figures10_csv(tmp_path_factory) -> Path:
    """8 classes x 10 images of 32x32 (a run on it peaks at epoch 1 of 3: the last epoch is not the best)."""
    from labkit.data import make_figures

    return make_figures(tmp_path_factory.mktemp("figures10"), n_classes=8, images_per_class=10, size=32)


@pytest.fixture(scope="module")
def figures10_df(figures10_csv):
    from labkit.data import load_dataset

    return load_dataset(str(figures10_csv))


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_last_checkpoint_is_the_final_epoch_when_it_is_not_the_best(figures10_df, tmp_path):
    run_dir = tmp_path / "run"
    first = train(figures10_df, run_dir=run_dir, epochs=3, **RUN)
    steps = first.history["step"].tolist()
    assert first.history["epoch"].tolist() == [0, 1, 2, 3] and steps == [0, 2, 4, 6]
    assert first.best_epoch == 1  # the case of the defect: the last epoch is not the best one
    last = _last(run_dir)
    assert last["labkit_epoch"] == 3 and last["global_step"] == 6 and last["epoch"] == 2
    csv_before = (run_dir / HISTORY_CSV).read_text()
    epoch_1 = tmp_path / "epoch_1.ckpt"
    epoch_1.write_bytes((run_dir / "checkpoints" / "best.ckpt").read_bytes())

    # extending the finished run continues from epoch 3 and keeps epochs 0-3 exactly as they were
    more = train(figures10_df, run_dir=run_dir, epochs=4, resume=True, **RUN)
    assert more.history["epoch"].tolist() == [0, 1, 2, 3, 4]
    assert more.history["step"].tolist() == [0, 2, 4, 6, 8]
    pd.testing.assert_frame_equal(more.history.iloc[:4], first.history)
    assert (run_dir / HISTORY_CSV).read_text().startswith(csv_before)
    assert _last(run_dir)["labkit_epoch"] == 4

    # resuming from an older checkpoint would train epochs 2-4 again: refused, the history untouched
    csv_now = (run_dir / HISTORY_CSV).read_text()
    older = r"epoch_1\.ckpt' \(epoch 1\).*train_history\.csv.*already records epoch\(s\) 2, 3, 4.*resume=True"
    with pytest.raises(CheckpointError, match=older):
        train(figures10_df, run_dir=run_dir, epochs=5, resume=epoch_1, **RUN)
    assert (run_dir / HISTORY_CSV).read_text() == csv_now


def test_resume_after_kill_9_between_epochs_continues_and_keeps_the_history(
    figures10_csv, figures10_df, tmp_path
):
    run_dir = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        from labkit.data import load_dataset
        from labkit.training import train
        train(load_dataset({str(figures10_csv)!r}), run_dir={str(run_dir)!r}, epochs=1000, **{RUN!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr.txt"
    csv = run_dir / HISTORY_CSV
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=stderr)
        try:
            deadline = time.monotonic() + 240
            while not (csv.is_file() and len(pd.read_csv(csv)) >= 3):  # epochs 0, 1, 2 recorded
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "training did not record 2 epochs in time"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    recorded = read_history(csv)
    recorded_epoch = int(recorded["epoch"].max())
    saved_epoch = _last(run_dir)["labkit_epoch"]
    # the checkpoint is written before the history row: it holds at least every recorded epoch
    assert recorded_epoch >= 2 and saved_epoch >= recorded_epoch

    resumed = train(figures10_df, run_dir=run_dir, epochs=saved_epoch + 1, resume=True, **RUN)
    epochs = list(range(saved_epoch + 2))
    assert resumed.history["epoch"].tolist() == epochs
    assert resumed.history["step"].tolist() == [2 * e for e in epochs]  # no epoch trained twice
    pd.testing.assert_frame_equal(resumed.history.iloc[: len(recorded)], recorded)
    assert read_history(csv)["epoch"].tolist() == epochs


@pytest.fixture(scope="module")
def finished_run(figures10_df, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished")
    train(figures10_df, run_dir=run_dir, epochs=1, export=False, **RUN)
    return run_dir


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("truncated.ckpt", lambda data: data[: len(data) // 2], r"RuntimeError: .*central directory"),
        ("garbage.ckpt", lambda data: bytes(range(256)) * 40, r"UnpicklingError: Weights only load failed"),
        ("empty.ckpt", lambda data: b"", r"0 bytes"),
    ],
)
def test_resume_from_an_unreadable_checkpoint_names_the_file(
    figures10_df, finished_run, tmp_path, name, make, reason
):
    bad = tmp_path / name
    bad.write_bytes(make((finished_run / "checkpoints" / "last.ckpt").read_bytes()))
    message = (
        rf"Cannot resume from '.*{name}': it is not a readable checkpoint \({reason}\); .* overwrite=True"
    )
    with pytest.raises(CheckpointError, match=message):
        train(figures10_df, run_dir=tmp_path / "run", epochs=2, resume=bad, **RUN)


def test_resume_with_another_backbone_names_the_file_and_the_settings(figures10_df, finished_run, tmp_path):
    last = finished_run / "checkpoints" / "last.ckpt"
    with pytest.raises(
        CheckpointError,
        match=r"last\.ckpt': it was trained with backbone='test_resnet' but this call asks for "
        r"backbone='resnet18'\. Pass the checkpoint's settings",
    ):
        train(
            figures10_df, run_dir=tmp_path / "run", epochs=2, resume=last, **(RUN | {"backbone": "resnet18"})
        )
    exported = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, exported)
    with pytest.raises(CheckpointError, match=r"plain\.pt': it is not a labkit training checkpoint"):
        train(figures10_df, run_dir=tmp_path / "run2", epochs=2, resume=exported, **RUN)
