"""Sweeps and comparisons (labkit.experiments, `labkit sweep`, `labkit compare`) on throwaway notebooks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from labkit import cli, experiments, pipeline

BODY = """from pathlib import Path
import os, time
from labkit import pipeline
Path(run_dir, "kernel.pid").write_text(str(os.getpid()))
time.sleep(sleep)
score = lr * 10 + (0.1 if miner == "hard" else 0.0) + seed / 100
pipeline.record_metrics(run_dir, "validate", {"cmc@1": score, "map@5": score / 2, "round/cmc@1": score / 4,
                                              "n_queries": 10})
pipeline.record_metrics(run_dir, "train", {"best_epoch": 3})
"""


@pytest.fixture
def notebook(tmp_path) -> list[Path]:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('run_dir = ""\nseed = 0\nlr = 0.01\nminer = "all"\nsleep = 0.0')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(BODY)]
    path = tmp_path / "nbs" / "00_score.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    return [path]


def _score(lr, miner, seed=0):
    return lr * 10 + (0.1 if miner == "hard" else 0.0) + seed / 100


def test_grid_points_and_names():
    points = experiments.grid_points({"lr": [1e-3, 3e-3], "miner": ["all", "hard"]}, seeds=[0, 1])
    assert len(points) == 8 and points[0] == {"lr": 1e-3, "miner": "all", "seed": 0}
    assert points[-1] == {"lr": 3e-3, "miner": "hard", "seed": 1}
    assert experiments.point_name(points[0]) == "lr=0.001_miner=all_seed=0"
    assert experiments.point_name({"dataset": "/a b/c", "ks": [1, 5]}) == "dataset=-a-b-c_ks=-1-5-"
    assert experiments.point_names([{"lr": 1, "epochs": 2}, {"lr": 3, "epochs": 2}]) == ["lr=1", "lr=3"]
    with pytest.raises(experiments.SweepError, match="seed is both"):
        experiments.grid_points({"seed": [1]}, seeds=[2])
    with pytest.raises(experiments.SweepError, match=r"\['lr'\] have no values"):
        experiments.grid_points({"lr": []})


def test_sweep_2x2_makes_4_runs_and_a_summary_and_a_rerun_skips_them(tmp_path, notebook):
    grid = {"lr": [0.01, 0.03], "miner": ["all", "hard"]}
    lines: list[str] = []
    result = experiments.run_sweep("s", grid, runs_dir=tmp_path, notebooks=notebook, report=lines.append)
    names = ["lr=0.01_miner=all", "lr=0.01_miner=hard", "lr=0.03_miner=all", "lr=0.03_miner=hard"]
    assert result.ran == names and not result.skipped and not result.failed
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == names
    assert all(pipeline.is_finished(tmp_path / "s" / n) for n in names)
    assert lines[0] == "[1/4] lr=0.01_miner=all: running (0 s into the sweep)"
    assert lines[1].startswith("[1/4] lr=0.01_miner=all: done in ")
    assert lines[1].endswith("cmc@1 0.100 map@5 0.050")
    summary = pd.read_csv(tmp_path / "s" / "summary.csv")
    assert list(summary["point"]) == names and (summary["state"] == "finished").all()
    assert list(summary.columns[:4]) == ["point", "state", "lr", "miner"]
    expected = [_score(lr, m) for lr in grid["lr"] for m in grid["miner"]]
    assert summary["cmc@1"].tolist() == pytest.approx(expected)
    assert summary["map@5"].tolist() == pytest.approx([e / 2 for e in expected])
    assert (summary["train/best_epoch"] == 3).all() and (summary["seconds"] > 0).all()
    stamps = {n: (tmp_path / "s" / n / "00_score.ipynb").stat().st_mtime_ns for n in names}

    again = experiments.run_sweep("s", grid, runs_dir=tmp_path, notebooks=notebook, report=lines.append)
    assert again.skipped == names and not again.ran
    assert lines[-1] == "[4/4] lr=0.03_miner=hard: finished earlier, skipped"
    assert {n: (tmp_path / "s" / n / "00_score.ipynb").stat().st_mtime_ns for n in names} == stamps
    with pytest.raises(experiments.SweepError, match="another grid"):
        experiments.run_sweep("s", {"lr": [0.05]}, runs_dir=tmp_path, notebooks=notebook)


def test_sweep_checks_every_point_before_running_any(tmp_path, notebook):
    with pytest.raises(pipeline.ParameterError, match="lr = 'fast'"):
        experiments.run_sweep("bad", {"lr": [0.01, "fast"]}, runs_dir=tmp_path, notebooks=notebook)
    assert not (tmp_path / "bad").exists()


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, notebook):
    result = experiments.run_sweep("f", {"sleep": [0.0, -1.0]}, runs_dir=tmp_path, notebooks=notebook)
    assert result.ran == ["sleep=0"] and list(result.failed) == ["sleep=-1"]
    assert "ValueError" in result.failed["sleep=-1"]  # time.sleep(-1)
    assert list(result.summary["state"]) == ["finished", "failed"]


def _kill_kernels(folder: Path) -> None:
    for pid_file in folder.rglob("kernel.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_a_killed_sweep_resumes_where_it_stopped(tmp_path, notebook):
    grid = {"lr": [0.01, 0.02, 0.03], "sleep": [1.5]}
    driver = (
        "from labkit import experiments\n"
        f"experiments.run_sweep('k', {grid!r}, runs_dir={str(tmp_path)!r}, notebooks=[{str(notebook[0])!r}])"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", driver], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = tmp_path / "k" / "lr=0.01"
    try:
        deadline = time.monotonic() + 120
        while not pipeline.is_finished(first) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pipeline.is_finished(first)
        process.kill()  # kill -9 between (or early in) the points
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        _kill_kernels(tmp_path / "k")
    started = pipeline.read_run_state(first)["started"]
    states = [pipeline.read_run_state(tmp_path / "k" / f"lr={lr}").get("state") for lr in (0.02, 0.03)]
    assert states[1] is None and states[0] in (None, "running")  # the rest did not finish
    result = experiments.run_sweep("k", grid, runs_dir=tmp_path, notebooks=notebook)
    assert result.skipped == ["lr=0.01"] and result.ran == [
        "lr=0.02",
        "lr=0.03",
    ]
    assert pipeline.read_run_state(first)["started"] == started  # not run again
    assert (result.summary["state"] == "finished").all() and len(result.summary) == 3


def test_compare_two_runs_shows_the_differing_parameters(tmp_path, notebook):
    for name, lr in (("a", 0.01), ("b", 0.03)):
        pipeline.run_pipeline({"lr": lr}, name=name, runs_dir=tmp_path, notebooks=notebook, progress=False)
    table = experiments.compare([tmp_path / "a", tmp_path / "b"])
    assert list(table.columns) == ["run", "lr", "cmc@1", "map@5", "train/best_epoch", "seconds"]
    assert table["run"].tolist() == ["a", "b"] and table["lr"].tolist() == [0.01, 0.03]
    assert table["cmc@1"].tolist() == pytest.approx([_score(0.01, "all"), _score(0.03, "all")])
    assert table.attrs["same"] == {"miner": "all", "seed": 0, "sleep": 0.0}
    text = experiments.format_comparison(table)
    assert "same in every run: miner='all', seed=0, sleep=0.0" in text


def test_compare_a_sweep_gives_mean_and_spread_over_seeds(tmp_path, notebook):
    experiments.run_sweep(
        "m", {"miner": ["all", "hard"]}, seeds=[0, 1, 2], runs_dir=tmp_path, notebooks=notebook
    )
    table = experiments.compare([tmp_path / "m"], metrics=["cmc@1"])
    assert list(table.columns) == ["runs", "miner", "n_runs", "seeds", "cmc@1", "cmc@1 sd"]
    assert table["miner"].tolist() == ["all", "hard"] and table["n_runs"].tolist() == [3, 3]
    assert table["seeds"].tolist() == ["0 1 2", "0 1 2"]
    assert table["runs"].tolist() == ["m/miner=all (3 runs)", "m/miner=hard (3 runs)"]
    assert table["cmc@1"].tolist() == pytest.approx([0.11, 0.21])  # 0.1 + mean(0, .01, .02) (+ 0.1)
    assert table["cmc@1 sd"].tolist() == pytest.approx([0.01, 0.01])
    assert "0.110 ± 0.010" in experiments.format_comparison(table)
    ungrouped = experiments.compare([tmp_path / "m"], metrics=["cmc@1"], group_seeds=False)
    assert len(ungrouped) == 6 and ungrouped["run"].iloc[0] == "m/miner=all_seed=0"
    assert experiments.category_metrics(tmp_path / "m" / "miner=all_seed=0") == {
        "round": pytest.approx(0.025)
    }


def test_compare_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(experiments.CompareError, match="neither a run folder"):
        experiments.compare([tmp_path])


def test_cli_sweep_and_compare(tmp_path, notebook, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "discover_notebooks", lambda folder=None, **kw: notebook)
    argv = ["sweep", "--runs-dir", str(tmp_path), "--name", "c", "-p", "lr", "0.01", "0.02", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "[2/2] lr=0.02: done in" in out and "2 run, 0 skipped (finished earlier), 0 failed" in out
    assert cli.main(argv) == 0
    assert "0 run, 2 skipped" in capsys.readouterr().out
    assert cli.main(["compare", str(tmp_path / "c" / "lr=0.01"), str(tmp_path / "c" / "lr=0.02")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "lr", "cmc@1"]
    assert lines[1].split()[:3] == ["c/lr=0.01", "0.010", "0.100"]
    assert cli.main(["compare", str(tmp_path / "nothing")]) == 1
    assert "labkit compare:" in capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "sweep.json").read_text())["grid"] == {"lr": [0.01, 0.02]}
