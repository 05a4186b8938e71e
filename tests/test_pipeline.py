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
        "effective": {"seed": 0, "size": 5, "factor": 0.5, "fail": False},
    }
    state = pipeline.read_run_state(run)
    assert state["state"] == "finished" and state["done"] == ["00_first.ipynb", "01_second.ipynb"]
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
    result = pipeline.run_pipeline(
        name="taken", runs_dir=tmp_path / "runs", notebooks=notebooks, overwrite=True, progress=False
    )
    assert not (run / "mine.txt").exists() and (run / "metrics.json").is_file()  # a clean new run
    assert result.replaced.parent == tmp_path / "runs" / ".replaced"
    assert (result.replaced / "mine.txt").read_text() == "keep me"  # the earlier one, moved aside


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def checkpointing(tmp_path) -> list[Path]:
    """Like 01_train: refuses to run where its checkpoint already is; fails on request."""
    folder = tmp_path / "ckpt_nbs"
    folder.mkdir()
    return [
        _notebook(
            folder / "00_train.ipynb",
            'run_dir = ""\nvalue = 1\nfail = False',
            "from pathlib import Path\n"
            "ckpt = Path(run_dir) / 'best.ckpt'\n"
            "if ckpt.exists():\n    raise FileExistsError(f'{run_dir} already holds best.ckpt')\n"
            "ckpt.write_text(str(value))\n"
            "assert not fail, 'asked to fail'",
        )
    ]


def test_overwrite_replaces_a_finished_run_all_or_nothing(tmp_path, checkpointing):
    runs = tmp_path / "runs"
    kwargs = {"name": "r", "runs_dir": runs, "notebooks": checkpointing, "progress": False}
    pipeline.run_pipeline({"value": 1}, **kwargs)
    first = _files(runs / "r")
    # a finished run is replaced whole: the notebook that refuses existing checkpoints runs in a clean folder
    result = pipeline.run_pipeline({"value": 2}, overwrite=True, **kwargs)
    assert (runs / "r" / "best.ckpt").read_text() == "2"
    assert _files(result.replaced) == first
    second = _files(runs / "r")
    # a failing replacement puts the earlier run back exactly, and keeps the failed one aside
    with pytest.raises(pipeline.NotebookFailed, match="asked to fail") as info:
        pipeline.run_pipeline({"value": 3, "fail": True}, overwrite=True, **kwargs)
    assert _files(runs / "r") == second
    assert info.value.restored == (runs / "r").resolve()
    assert info.value.executed.parent.parent == runs / ".failed"
    assert "asked to fail" in info.value.executed.read_text()
    assert (info.value.executed.parent / "best.ckpt").read_text() == "3"
    assert pipeline.read_run_state(info.value.executed.parent)["state"] == "failed"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"size": "abc"},
            r"parameter size = 'abc' \(str\) does not fit 00_first.ipynb, which declares size = 3 "
            r"\(type int\); pass a value of type int, e.g. -p size 3",
        ),
        ({"size": 2.5}, r"size = 2.5 \(float\).*type int"),
        ({"fail": "yes"}, r"fail = 'yes' \(str\).*declares fail = False \(type bool\)"),
        ({"factor": "x"}, r"factor = 'x'.*type float"),
        ({"factor": None}, r"factor = None.*type float"),
        ({"sizee": 1}, r"\['sizee'\] are declared by none"),
    ],
)
def test_bad_parameters_are_refused_before_anything_runs(tmp_path, notebooks, params, message):
    with pytest.raises(pipeline.ParameterError, match=message):
        pipeline.run_pipeline(
            params, name="x", runs_dir=tmp_path / "runs", notebooks=notebooks, progress=False
        )
    assert not (tmp_path / "runs").exists()  # no folder made, no notebook run


def test_parameter_types_that_fit(tmp_path):
    nb = _notebook(
        tmp_path / "00_p.ipynb",
        'run_dir = ""\nlr = 3e-3\nmargin = 0.2  # None: soft margin\nks = [1, 5]\nname = "a"\nlimit = None',
        "pass",
    )
    declared = {nb: pipeline.notebook_declarations(nb)}
    for ok in ({"lr": 1}, {"margin": None}, {"ks": [2]}, {"name": "b"}, {"limit": 5}, {"limit": "x"}):
        pipeline.check_parameters(ok, declared)
    for bad in ({"ks": ["a"]}, {"ks": 3}, {"name": 1}, {"lr": True}, {"lr": None}):
        with pytest.raises(pipeline.ParameterError, match=list(bad)[0]):
            pipeline.check_parameters(bad, declared)


def test_cli_refuses_a_bad_type_with_one_message(tmp_path, notebooks, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "discover_notebooks", lambda folder=None, **kw: notebooks)
    assert cli.main(["run", "--runs-dir", str(tmp_path / "runs"), "-p", "size", "abc"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "labkit run: parameter size = 'abc' (str) does not fit 00_first.ipynb, which declares size = 3 "
        "(type int); pass a value of type int, e.g. -p size 3"
    ]
    assert not (tmp_path / "runs").exists()


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
    monkeypatch.setattr(pipeline, "discover_notebooks", lambda folder=None, **kw: notebooks)
    argv = ["run", "--runs-dir", str(tmp_path), "--name", "c", "-p", "size", "7", "--no-progress"]
    assert cli.main(argv) == 0
    assert f"Run finished: {(tmp_path / 'c').resolve()}" in capsys.readouterr().out
    assert pipeline.read_metrics(tmp_path / "c")["first"]["size"] == 7
    assert cli.main(argv) == 1
    assert "is not empty" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert f"The earlier run was moved to {tmp_path / '.replaced'}" in out


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


def test_ctrl_c_stops_the_run_with_one_line_and_no_kernel_left(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole process group) while a notebook runs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "nbs"
    folder.mkdir()
    pid_file = tmp_path / "kernel.pid"
    first = _notebook(folder / "00_quick.ipynb", 'run_dir = ""', "x = 1")
    slow = _notebook(
        folder / "01_slow.ipynb",
        'run_dir = ""',
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)",
    )
    listed = [str(first), str(slow)]
    argv = ["run", "--runs-dir", str(tmp_path / "runs"), "--name", "cut", "--no-progress"]
    driver = (
        "import signal, sys\nfrom pathlib import Path\nfrom labkit import cli, pipeline\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (not ignored)\n"
        f"pipeline.discover_notebooks = lambda folder=None, **kw: [Path(p) for p in {listed!r}]\n"
        f"sys.exit(cli.main({argv!r}))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", driver],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    kernel_pid = None
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        kernel_pid = int(pid_file.read_text())
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    run = (tmp_path / "runs" / "cut").resolve()
    ours = [line for line in err.splitlines() if not line.startswith("[IPKernelApp]") and line.strip()]
    assert process.returncode == 130
    assert ours == [f"labkit run: interrupted during 01_slow.ipynb; the partial run is in {run}"]
    assert "Traceback" not in err
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the kernel is gone
        os.kill(kernel_pid, 0)
    executed = nbformat.read(run / "01_slow.ipynb", as_version=4)
    assert executed.metadata["labkit"] == {"interrupted": True}
    assert executed.metadata["papermill"]["exception"] is True
    assert "Interrupted (Ctrl-C)" in executed.cells[0].source
    assert pipeline.read_run_state(run)["state"] == "interrupted"
