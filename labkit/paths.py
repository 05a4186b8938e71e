"""Where labkit keeps datasets and runs by default."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def checkout_root() -> Path | None:
    """The source checkout that holds this package, or None when labkit is installed elsewhere."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def default_data_dir() -> Path:
    """`$LABKIT_DATA_DIR`, else `data/` of the checkout, else `~/.cache/labkit/data`."""
    if os.environ.get("LABKIT_DATA_DIR"):
        return Path(os.environ["LABKIT_DATA_DIR"]).expanduser()
    root = checkout_root()
    return root / "data" if root else Path.home() / ".cache" / "labkit" / "data"


def default_runs_dir() -> Path:
    """`$LABKIT_RUNS_DIR`, else `runs/` of the checkout, else `./runs`."""
    if os.environ.get("LABKIT_RUNS_DIR"):
        return Path(os.environ["LABKIT_RUNS_DIR"]).expanduser()
    root = checkout_root()
    return root / "runs" if root else Path.cwd() / "runs"


def notebooks_dir() -> Path:
    """The ordered notebooks shipped with the checkout."""
    root = checkout_root()
    if root is None:
        raise FileNotFoundError(
            "labkit's notebooks are not next to the installed package; "
            "clone the labkit repository and install it with `pip install -e .`."
        )
    return root / "notebooks"
