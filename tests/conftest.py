"""Shared fixtures: a tiny "figures" dataset and a papermill runner for the notebooks."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("LABKIT_NO_WIDGETS", "1")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"

# A dataset small enough for every test: 8 classes x 6 images of 32x32 pixels.
TINY_FIGURES = {"n_classes": 8, "images_per_class": 6, "size": 32, "seed": 0}


@pytest.fixture(scope="session")
def figures_root(tmp_path_factory) -> Path:
    """Folder holding the tiny figures dataset (made once per session)."""
    from labkit.data import make_figures

    root = tmp_path_factory.mktemp("figures")
    make_figures(root, **TINY_FIGURES)
    return root


@pytest.fixture(scope="session")
def figures_csv(figures_root) -> Path:
    return next(figures_root.glob("*.csv"))


@pytest.fixture(scope="session")
def figures_df(figures_csv):
    """The tiny figures dataset, validated, with absolute paths."""
    from labkit.data import load_dataset

    return load_dataset(str(figures_csv))


@pytest.fixture
def execute_notebook():
    """Run `notebooks/<name>.ipynb` with papermill into run_dir; returns the executed copy."""
    import papermill

    def run(name: str, params: dict, run_dir: Path) -> Path:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        executed = run_dir / f"{name}.ipynb"
        papermill.execute_notebook(
            str(NOTEBOOKS / f"{name}.ipynb"),
            str(executed),
            parameters={"run_dir": str(run_dir), **params},
            kernel_name="python3",
            cwd=str(NOTEBOOKS),
            progress_bar=False,
        )
        return executed

    return run
