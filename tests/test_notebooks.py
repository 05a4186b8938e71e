"""The notebooks: committed clean, Colab-ready, and executed end to end by papermill with tiny parameters."""

from __future__ import annotations

import json
import os

import nbformat
import pytest

from labkit import pipeline
from labkit.paths import notebooks_dir

NOTEBOOKS = pipeline.discover_notebooks()
EXPECTED_ORDER = [
    "00_data.ipynb",
    "01_train.ipynb",
    "02_validate.ipynb",
    "03_worst_queries.ipynb",
    "04_rerank.ipynb",
    "05_search.ipynb",
]


def test_the_pipeline_order():
    assert [p.name for p in NOTEBOOKS] == EXPECTED_ORDER


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean_and_colab_ready(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "outputs must be stripped"
    assert nb.cells[0].cell_type == "markdown", "a notebook opens with its story"
    setup = code[0].source
    assert 'importlib.util.find_spec("labkit") is None' in setup and "pip" in setup
    tagged = [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [1], "the cell after the setup cell, and only it, is tagged parameters"
    declared = pipeline.notebook_parameters(path)
    assert {"run_dir", "dataset"} <= set(declared)
    assert declared["run_dir"] == ""
    if path.name == "00_data.ipynb":  # the one notebook that decides the dataset
        assert declared["dataset"] == "figures" and {"seed", "n_classes", "images_per_class"} <= set(declared)
    else:  # the others read it from the run folder: no dataset parameters of their own
        assert declared["dataset"] == ""
        assert not {"seed", "n_classes", "images_per_class", "figure_size"} & set(declared)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_is_the_same_everywhere(path):
    first = nbformat.read(NOTEBOOKS[0], as_version=4)
    nb = nbformat.read(path, as_version=4)
    setup = [c for c in nb.cells if c.cell_type == "code"][0].source
    assert setup == [c for c in first.cells if c.cell_type == "code"][0].source


def test_notebooks_folder_is_the_checkout_one():
    assert notebooks_dir() == NOTEBOOKS[0].parent


def _outputs_text(executed) -> str:
    nb = json.loads(executed.read_text())
    return json.dumps([c.get("outputs", []) for c in nb["cells"]])


# Tiny parameters: every notebook in seconds on 2 CPU cores (8 classes x 6 images of 32x32 pixels).
TINY = {
    "n_classes": 8,
    "images_per_class": 6,
    "figure_size": 32,
    "image_size": 32,
    "grid_classes": 4,
    "grid_images": 3,
    "epochs": 1,
    "max_steps": 2,
    "n_labels": 2,
    "n_instances": 2,
    "batch_size": 16,
    "accelerator": "cpu",
    "n_worst": 2,
    "draw_k": 3,
    "chosen_queries": [0, 1],
    "passes_per_epoch": 1,
    "hidden_dims": [16],
    "val_max_queries": 8,
    "k": 5,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole pipeline, every notebook in order, on tiny "figures" data made in a temporary folder."""
    tmp = tmp_path_factory.mktemp("pipeline")
    saved = os.environ.get("LABKIT_DATA_DIR")
    os.environ["LABKIT_DATA_DIR"] = str(tmp / "data")  # the papermill kernels inherit it
    try:
        yield pipeline.run_pipeline(TINY, name="tiny", runs_dir=tmp / "runs", progress=False)
    finally:
        if saved is None:
            os.environ.pop("LABKIT_DATA_DIR")
        else:
            os.environ["LABKIT_DATA_DIR"] = saved


@pytest.mark.slow
def test_pipeline_executes_every_notebook_into_the_run_folder(tiny_run):
    run = tiny_run.run_dir
    assert [p.name for p in tiny_run.executed] == EXPECTED_ORDER
    assert all((run / name).is_file() for name in EXPECTED_ORDER)
    params = json.loads((run / "params.json").read_text())
    assert params["params"] == TINY
    env = json.loads((run / "environment.json").read_text())
    assert env["seed"] == 0 and env["labkit"] and env["torch"]
    assert {"data", "train", "validate", "rerank", "search", "pipeline"} <= set(tiny_run.metrics)
    figures_dir = run.parent.parent / "data" / "figures-8x6-32px-seed0-v1"
    assert figures_dir.is_dir()  # generated where LABKIT_DATA_DIR points, in the folder of its parameters
    info = json.loads((run / "dataset.json").read_text())
    assert info["source"] == "figures" and info["images_root"] == str(figures_dir)
    assert info["counts"]["n_images"] == 48 and (run / "dataset.csv").is_file()
    assert json.loads((run / "run.json").read_text())["state"] == "finished"


@pytest.mark.slow
def test_00_data_counts_the_generated_dataset(tiny_run):
    counts = tiny_run.metrics["data"]
    assert counts["n_images"] == 8 * 6 and counts["n_classes"] == 8
    nb = json.loads((tiny_run.run_dir / "00_data.ipynb").read_text())
    assert any("image/png" in out.get("data", {}) for c in nb["cells"] for out in c.get("outputs", []))


@pytest.mark.slow
def test_01_train_writes_checkpoints_history_and_export(tiny_run):
    from labkit.models import load_extractor
    from labkit.training import read_history

    run = tiny_run.run_dir
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "train_history.csv").is_file()
    history = read_history(run)
    assert list(history["epoch"]) == [0, 1]
    extractor = load_extractor(run / "extractor.pt")
    assert extractor.backbone_name == "resnet18"


@pytest.mark.slow
def test_02_validate_metrics_match_its_saved_embeddings(
    tiny_run,
):
    import torch

    from labkit.data import load_dataset, validation_dataset
    from labkit.metrics import flatten_metrics, retrieval_metrics

    run = tiny_run.run_dir
    saved = torch.load(run / "validation_embeddings.pt", weights_only=False)
    df = load_dataset(
        "figures", data_dir=run.parent.parent / "data", n_classes=8, images_per_class=6, size=32
    )
    val = validation_dataset(df)
    assert saved["paths"] == list(val.df["path"])
    m = retrieval_metrics(
        saved["embeddings"],
        val.labels,
        val.is_query,
        val.is_gallery,
        categories=val.categories,
        cmc_k=(1, 5),
        precision_k=(5,),
        map_k=(5,),
    )
    recorded = tiny_run.metrics["validate"]
    for key, value in flatten_metrics(m).items():
        if key in recorded and value == value:  # NaN is recorded as null
            assert recorded[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_03_worst_queries_writes_its_pngs(tiny_run):
    figures = tiny_run.run_dir / "figures"
    names = {p.name for p in figures.glob("*.png")}
    assert {"worst_queries.png", "chosen_queries.png", "embeddings_pca.png"} <= names
    assert all(p.stat().st_size > 1000 for p in figures.glob("*.png"))


@pytest.mark.slow
def test_04_rerank_reports_every_method(tiny_run):
    text = json.dumps(tiny_run.metrics["rerank"])
    for method in ("baseline", "pairwise", "query", "reciprocal"):
        assert method in text.lower(), method
    import pandas as pd

    # the default re-ranker: a head over the frozen extractor's features plus a fine-tuned copy's distance;
    # the head's epochs, then the copy's; epoch 0 of its history = baseline
    assert tiny_run.metrics["rerank"]["pair_model"] == "features+tuned"
    history = pd.read_csv(tiny_run.run_dir / "reranker" / "train_history.csv")
    assert list(history["epoch"]) == [0, 1, 2] and list(history["stage"]) == ["features", "features", "tuned"]
    assert history["chosen"].sum() == 2 and bool(history["chosen"].iloc[-1])
    baseline = tiny_run.metrics["rerank"]["methods"]["baseline"]
    assert history.loc[0, "cmc@1"] == pytest.approx(baseline["cmc@1"])


@pytest.mark.slow
@pytest.mark.parametrize("pair_model", ["tuned", "features"])
def test_04_rerank_one_model_on_a_copy_of_the_run(tiny_run, tmp_path, execute_notebook, pair_model):
    """04 with pair_model "tuned" (the fine-tuned copy of the extractor) or "features" (the head alone), on a
    copy of the tiny run folder."""
    import shutil

    import pandas as pd

    from labkit.rerank import FeaturePairModel, TunedPairModel, load_pairwise

    run = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    declared = pipeline.notebook_parameters(notebooks_dir() / "04_rerank.ipynb")
    params = {k: v for k, v in TINY.items() if k in declared}
    execute_notebook("04_rerank", {**params, "pair_model": pair_model, "overwrite": True}, run)
    metrics = json.loads((run / "metrics.json").read_text())["rerank"]
    assert metrics["pair_model"] == pair_model
    history = pd.read_csv(run / "reranker" / "train_history.csv")
    if pair_model == "tuned":
        assert list(history["epoch"]) == [0, 1] and list(history["step"]) == [0, 10]
    else:
        assert list(history["epoch"]) == [0, 1] and history["chosen"].sum() == 1
    assert history.loc[0, "cmc@1"] == pytest.approx(metrics["methods"]["baseline"]["cmc@1"])
    model = load_pairwise(run / "reranker" / "pairwise.pt")
    assert type(model) is (TunedPairModel if pair_model == "tuned" else FeaturePairModel)


@pytest.mark.slow
def test_05_search_builds_the_store(tiny_run):
    from labkit.store import EmbeddingStore

    with EmbeddingStore(tiny_run.run_dir / "store.sqlite", create=False, read_only=True) as store:
        assert len(store) == 4 * 6  # the validation half of 8 classes x 6 images
    assert tiny_run.metrics["search"]


def _photo_folder(root, n_classes=6, per_class=3):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in range(n_classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                root / f"class_{c}" / f"{i}.png"
            )
    return root


@pytest.mark.slow
def test_a_later_notebook_uses_exactly_the_split_of_an_imported_folder(tmp_path, execute_notebook):
    import pandas as pd
    import torch

    from labkit import data

    folder = _photo_folder(tmp_path / "photos")
    run = tmp_path / "run"
    execute_notebook("00_data", {"dataset": str(folder), "seed": 3, "grid_classes": 2, "grid_images": 2}, run)
    _photo_folder(tmp_path / "more", n_classes=1)
    (tmp_path / "more" / "class_0").rename(folder / "class_late")  # the folder changes after 00_data
    execute_notebook("02_validate", {"image_size": 32, "batch_size": 16, "accelerator": "cpu"}, run)
    written = pd.read_csv(run / "dataset.csv")
    validation = written.loc[written["split"] == "validation", "path"].tolist()
    saved = torch.load(run / "validation_embeddings.pt", weights_only=False)
    assert saved["paths"] == validation
    reimported = data.import_image_folder(folder, seed=0)  # what 02 did before: its own import, its own seed
    assert sorted(reimported.loc[reimported["split"] == "validation", "path"]) != sorted(validation)


@pytest.mark.slow
def test_01_train_run_twice_interactively_keeps_both_trainings(tmp_path, monkeypatch):
    """Regression (issue 16.3): the second interactive run stopped with FileExistsError (best.ckpt)."""
    import papermill

    monkeypatch.setenv("LABKIT_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path / "data"))
    copies = tmp_path / "executed"
    copies.mkdir()
    tiny = {"n_classes": 8, "images_per_class": 6, "figure_size": 32, "grid_classes": 2, "grid_images": 2}
    train = {
        "image_size": 32,
        "epochs": 1,
        "max_steps": 2,
        "n_labels": 2,
        "n_instances": 2,
        "accelerator": "cpu",
    }
    for name, params in (("00_data", tiny), ("01_train", train), ("01_train", train)):
        papermill.execute_notebook(
            str(notebooks_dir() / f"{name}.ipynb"),
            str(copies / f"{name}.ipynb"),
            parameters=params,
            kernel_name="python3",
            cwd=str(notebooks_dir()),
            progress_bar=False,
        )
    interactive, earlier = tmp_path / "runs" / "interactive", tmp_path / "runs" / "interactive-1"
    assert (interactive / "checkpoints" / "best.ckpt").is_file() and (interactive / "extractor.pt").is_file()
    assert (earlier / "checkpoints" / "best.ckpt").is_file() and (earlier / "extractor.pt").is_file()
    assert f"moved whole to {earlier}" in _outputs_text(copies / "01_train.ipynb")


COMPARE = notebooks_dir() / "06_compare_runs.ipynb"


def test_06_compare_runs_is_clean_and_outside_the_pipeline():
    nb = nbformat.read(COMPARE, as_version=4)
    assert nb.metadata["labkit"] == {"pipeline": False} and nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert (
        code[0].source
        == [c for c in nbformat.read(NOTEBOOKS[0], as_version=4).cells if c.cell_type == "code"][0].source
    )
    assert [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])] == [1]
    assert COMPARE not in NOTEBOOKS and COMPARE in pipeline.discover_notebooks(pipeline_only=False)
    assert pipeline.notebook_parameters(COMPARE)["runs"] == []


@pytest.mark.slow
def test_06_compare_runs_on_a_tiny_sweep(tmp_path, monkeypatch, execute_notebook):
    """A real sweep (00-02 on tiny figures, two miners), `compare` on it, and 06 under papermill."""
    from labkit import experiments

    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path / "data"))
    fixed = {
        k: v
        for k, v in TINY.items()
        if k
        in (
            "n_classes",
            "images_per_class",
            "figure_size",
            "image_size",
            "grid_classes",
            "grid_images",
            "epochs",
            "max_steps",
            "n_labels",
            "n_instances",
            "batch_size",
            "accelerator",
        )
    }
    grid = {**{k: [v] for k, v in fixed.items()}, "miner": ["all", "hard"]}
    result = experiments.run_sweep("tiny", grid, runs_dir=tmp_path / "runs", only=["00", "01", "02"])
    assert len(result.ran) == 2 and not result.failed
    assert list(result.summary["miner"]) == ["all", "hard"] and result.summary["cmc@1"].notna().all()
    table = experiments.compare([result.sweep_dir])
    assert list(table.columns[:2]) == ["run", "miner"] and "lr" not in table  # only the miner differs
    assert experiments.same_data_pair([result.sweep_dir]) is not None
    figures = tmp_path / "figures"
    executed = execute_notebook(
        "06_compare_runs",
        {"runs": [str(result.sweep_dir)], "save_dir": str(figures), "draw_k": 3},
        tmp_path / "c",
    )
    names = sorted(p.name for p in figures.glob("*.png"))
    assert names == [
        "per_category.png",
        "queries_improved.png",
        "queries_worsened.png",
        "training_curves.png",
    ]
    assert "miner" in _outputs_text(executed)
