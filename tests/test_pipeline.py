"""The run folder helpers and the pipeline runner, on small throwaway notebooks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from labkit import cli, pipeline


def _notebook(path: Path, parameters: str, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def notebooks(tmp_path) -> list[Path]:
    folder = tmp_path / "nbs"
    folder.mkdir()
    first = _notebook(
        folder / "00_first.ipynb",
        'run_dir = ""\nseed = 0\nsize = 3',
        "from labkit import pipeline\n"
        "pipeline.record_metrics(run_dir, 'first', {'size': size, 'seed': seed})",
    )
    second = _notebook(
        folder / "01_second.ipynb",
        'run_dir = ""\nfactor = 2.0\nfail = False',
        "from labkit import pipeline\n"
        "assert not fail, 'asked to fail'\n"
        "pipeline.record_metrics(run_dir, 'second', {'factor': factor})",
    )
    (folder / "scratch.ipynb").write_text(first.read_text())  # not NN_name: ignored
    return [first, second]


def test_discover_notebooks_keeps_numbered_ones_in_order(notebooks):
    assert pipeline.discover_notebooks(notebooks[0].parent) == notebooks


def test_shipped_notebooks_are_discovered_in_order():
    names = [p.name for p in pipeline.discover_notebooks()]
    assert names == sorted(names) and names[0] == "00_data.ipynb"


def test_run_pipeline_writes_the_run_folder(tmp_path, notebooks):
    result = pipeline.run_pipeline(
        {"size": 5, "factor": 0.5}, name="r1", runs_dir=tmp_path / "runs", notebooks=notebooks, progress=False
    )
    run = tmp_path / "runs" / "r1"
    assert result.run_dir == run.resolve()
    assert sorted(p.name for p in run.glob("*.ipynb")) == ["00_first.ipynb", "01_second.ipynb"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["first"] == {"size": 5, "seed": 0}
    assert metrics["second"] == {"factor": 0.5}
    assert set(metrics["pipeline"]["seconds"]) == {"00_first.ipynb", "01_second.ipynb"}
    params = json.loads((run / "params.json").read_text())
    assert params == {
        "params": {"size": 5, "factor": 0.5},
        "notebooks": ["00_first.ipynb", "01_second.ipynb"],
    }
    env = json.loads((run / "environment.json").read_text())
    assert env["seed"] == 0
    assert env["torch"] == torch.__version__.split("+")[0]
    assert env["python"] and env["timm"] and env["lightning"]


def test_run_pipeline_refuses_a_non_empty_run_folder(tmp_path, notebooks):
    run = tmp_path / "runs" / "taken"
    run.mkdir(parents=True)
    (run / "mine.txt").write_text("keep me")
    with pytest.raises(pipeline.RunFolderError, match="not empty"):
        pipeline.run_pipeline(name="taken", runs_dir=tmp_path / "runs", notebooks=notebooks, progress=False)
    assert (run / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in run.iterdir()) == ["mine.txt"]
    pipeline.run_pipeline(
        name="taken", runs_dir=tmp_path / "runs", notebooks=notebooks, overwrite=True, progress=False
    )
    assert (run / "mine.txt").read_text() == "keep me"
    assert (run / "metrics.json").is_file()


def test_unknown_parameter_is_an_error_naming_it(tmp_path, notebooks):
    with pytest.raises(
        ValueError, match=r"\['sizee'\].*known parameters: \['factor', 'fail', 'seed', 'size'\]"
    ):
        pipeline.run_pipeline({"sizee": 1}, runs_dir=tmp_path, notebooks=notebooks, progress=False)


def test_a_failing_notebook_is_named_with_its_executed_copy(tmp_path, notebooks):
    with pytest.raises(pipeline.NotebookFailed, match="01_second.ipynb failed") as info:
        pipeline.run_pipeline(
            {"fail": True}, name="bad", runs_dir=tmp_path, notebooks=notebooks, progress=False
        )
    assert info.value.executed == (tmp_path / "bad" / "01_second.ipynb").resolve()
    assert "asked to fail" in info.value.executed.read_text()


def test_cli_runs_and_reports_refusal(tmp_path, notebooks, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "discover_notebooks", lambda folder=None: notebooks)
    argv = ["run", "--runs-dir", str(tmp_path), "--name", "c", "-p", "size", "7", "--no-progress"]
    assert cli.main(argv) == 0
    assert f"Run finished: {(tmp_path / 'c').resolve()}" in capsys.readouterr().out
    assert pipeline.read_metrics(tmp_path / "c")["first"]["size"] == 7
    assert cli.main(argv) == 1
    assert "is not empty" in capsys.readouterr().err


def test_record_metrics_merges_and_converts(tmp_path):
    pipeline.record_metrics(tmp_path, "a", {"x": np.float32(0.5), 1: torch.tensor(2), "nan": math.nan})
    pipeline.record_metrics(tmp_path, "a", {"y": [np.int64(3)]})
    pipeline.record_metrics(tmp_path, "b", {"path": tmp_path})
    assert pipeline.read_metrics(tmp_path) == {
        "a": {"x": 0.5, "1": 2, "nan": None, "y": [3]},
        "b": {"path": str(tmp_path)},
    }


def test_prepare_run_dir_defaults_to_interactive(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RUNS_DIR", str(tmp_path))
    assert pipeline.prepare_run_dir("") == (tmp_path / "interactive").resolve()
    assert pipeline.prepare_run_dir(tmp_path / "x").is_dir()


@pytest.mark.parametrize(
    ("text", "value"),
    [("3", 3), ("0.5", 0.5), ("true", True), ("resnet18", "resnet18"), ("[1, 5]", [1, 5]), ('"7"', "7")],
)
def test_parse_value(text, value):
    assert pipeline.parse_value(text) == value
