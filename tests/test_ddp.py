"""DDP with 2 CPU processes gives the same validation metrics as one process on the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pandas as pd
import pytest

from labkit.data import SPLIT, VALIDATION, validation_dataset
from labkit.metrics import flatten_metrics
from labkit.models import create_extractor, load_extractor
from labkit.training import evaluate

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(figures_df, figures_csv, tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(figures_csv), str(tmp_path / "run"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["world_size"] == 2
    history = pd.DataFrame(payload["history"]).set_index("epoch")
    assert history.index.tolist() == [0, 1]

    df = figures_df.drop(index=figures_df.index[figures_df[SPLIT] == VALIDATION][-1])  # as the script does
    metric_columns = [c for c in history.columns if c not in ("step", "loss")]

    def single_process(extractor) -> pd.Series:
        dataset = validation_dataset(df, extractor.transforms())
        assert len(dataset) % 2 == 1  # uneven split across the 2 ranks
        return pd.Series(flatten_metrics(evaluate(extractor, dataset)))[metric_columns]

    trained = load_extractor(tmp_path / "run" / "extractor.pt")  # weights after the DDP epoch
    pd.testing.assert_series_equal(single_process(trained), history.loc[1, metric_columns], check_names=False)

    L.seed_everything(0, verbose=False)  # the initial weights, as train() makes them on every rank
    initial = create_extractor("test_resnet", image_size=32)
    pd.testing.assert_series_equal(single_process(initial), history.loc[0, metric_columns], check_names=False)
