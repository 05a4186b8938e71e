"""The training progress bar numbers epochs as the history does (1..N) and hides Lightning's v_num."""

from __future__ import annotations

import re

from labkit.training import read_history, train


def test_progress_bar_counts_epochs_from_one(figures_df, tmp_path, capsys):
    train(
        figures_df,
        run_dir=tmp_path,
        backbone="test_resnet",
        image_size=32,
        n_labels=4,
        n_instances=2,
        seed=0,
        epochs=2,
        max_steps=4,
        accelerator="cpu",
        progress=True,
    )
    captured = capsys.readouterr()
    shown = captured.err + captured.out
    epochs = sorted({int(n) for n in re.findall(r"Epoch (\d+)/2", shown)})
    assert epochs == [1, 2] and "Epoch 0" not in shown and "v_num" not in shown
    assert sorted(set(read_history(tmp_path)["epoch"]) - {0}) == epochs  # the history's own numbering
