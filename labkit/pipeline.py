"""Run folders and the pipeline that executes the ordered notebooks with papermill.

A run folder holds everything needed to reproduce a result: the executed notebooks, `params.json`,
`environment.json` (versions, seed, git commit) and `metrics.json` (one section per notebook).
"""

from __future__ import annotations

import ast
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit import __version__
from labkit.paths import checkout_root, default_runs_dir, notebooks_dir

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[A-Za-z0-9_\-]+\.ipynb$")
INTERACTIVE_RUN = "interactive"


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked (it holds an earlier run, say)."""


class NotebookFailed(RuntimeError):
    """A notebook of the pipeline raised; names the notebook and its executed copy."""

    def __init__(self, notebook: str, executed: Path, cause: BaseException):
        self.notebook, self.executed = notebook, executed
        super().__init__(
            f"notebook {notebook} failed: {type(cause).__name__}: {_first_line(cause)}\n"
            f"Its executed copy, with the traceback in the failing cell, is {executed}"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else ""


def prepare_run_dir(run_dir: str | os.PathLike | None) -> Path:
    """Return the run folder as a Path, creating it; empty means `runs/interactive` (for notebook users)."""
    path = Path(run_dir) if run_dir else default_runs_dir() / INTERACTIVE_RUN
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def to_jsonable(value: Any) -> Any:
    """Convert numpy/torch scalars and arrays, paths and non-str keys to plain JSON values (NaN -> None)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy and torch scalars or arrays
        return to_jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(to_jsonable(data), tmp, indent=2, sort_keys=True)
        tmp.write("\n")
    os.replace(tmp.name, path)


def read_metrics(run_dir: str | os.PathLike) -> dict:
    """The run's `metrics.json` as a dict (empty when none was written yet)."""
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def record_metrics(run_dir: str | os.PathLike, section: str, values: Mapping[str, Any]) -> Path:
    """Merge `values` into section `section` of the run's `metrics.json`; returns the file's path."""
    path = Path(run_dir) / "metrics.json"
    metrics = read_metrics(run_dir)
    metrics[section] = {**metrics.get(section, {}), **to_jsonable(dict(values))}
    _write_json(path, metrics)
    return path


def discover_notebooks(folder: str | os.PathLike | None = None) -> list[Path]:
    """The pipeline's notebooks, `NN_name.ipynb`, in order."""
    folder = Path(folder) if folder else notebooks_dir()
    found = sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    if not found:
        raise FileNotFoundError(f"no notebooks named NN_name.ipynb in {folder}")
    return found


def _git_commit(root: Path | None) -> str | None:
    if root is None:
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_info(seed: int | None = None) -> dict:
    """Versions of python and the main packages, the seed, the platform and the git commit."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "labkit": __version__,
        "seed": seed,
        "git_commit": _git_commit(checkout_root()),
        "argv": sys.argv,
    }
    for package in ("torch", "torchvision", "timm", "lightning", "numpy", "pandas", "papermill"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["devices"] = torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """The parameters a notebook declares in its `parameters` cell, with their defaults."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    return {name: _literal(spec.get("default")) for name, spec in declared.items()}


def _literal(source: str | None) -> Any:
    """A default as papermill reports it (source text) read as a Python literal where it is one."""
    try:
        return ast.literal_eval(source) if source is not None else None
    except (ValueError, SyntaxError):
        return source


def parse_value(text: str) -> Any:
    """Read a `-p key value` value as JSON when it is JSON (numbers, true/false, lists), else as a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _check_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunFolderError(
                f"run folder {run_dir} is not empty; choose another --name, or pass --overwrite "
                "to run into it anyway (files of the same name are replaced)."
            )


def default_run_name() -> str:
    """A new, sortable run name: the date and time."""
    return time.strftime("%Y%m%d-%H%M%S")


@dataclass
class PipelineResult:
    """What `run_pipeline` made: the folder, the executed notebooks and the metrics."""

    run_dir: Path
    executed: list[Path] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_pipeline(
    params: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    runs_dir: str | os.PathLike | None = None,
    notebooks: Sequence[str | os.PathLike] | None = None,
    only: Iterable[str] | None = None,
    overwrite: bool = False,
    kernel: str = "python3",
    progress: bool = True,
) -> PipelineResult:
    """Execute the ordered notebooks into `runs/<name>/` with the same `params` for every notebook.

    Each notebook receives only the parameters it declares, plus `run_dir`. A parameter that no notebook
    declares is an error (a typo would otherwise be ignored). `only` keeps notebooks whose name starts
    with one of the given prefixes (e.g. `["00", "01"]`).
    """
    import papermill

    params = dict(params or {})
    paths = [Path(p) for p in notebooks] if notebooks else discover_notebooks()
    if only:
        prefixes = tuple(only)
        paths = [p for p in paths if p.name.startswith(prefixes)]
        if not paths:
            raise ValueError(f"no notebook starts with any of {list(prefixes)}")
    declared = {p: notebook_parameters(p) for p in paths}
    known = set().union(*declared.values())
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"parameter(s) {unknown} are declared by none of the notebooks {[p.name for p in paths]}; "
            f"known parameters: {sorted(known - {'run_dir'})}"
        )
    if "run_dir" in params:
        raise ValueError("run_dir is set by the pipeline; choose the folder with name= / --name instead")

    run_dir = (Path(runs_dir) if runs_dir else default_runs_dir()) / (name or default_run_name())
    _check_run_dir(run_dir, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir.resolve()
    seed = params.get("seed", next((d["seed"] for d in declared.values() if "seed" in d), None))
    _write_json(run_dir / "params.json", {"params": params, "notebooks": [p.name for p in paths]})
    _write_json(run_dir / "environment.json", environment_info(seed))

    result = PipelineResult(run_dir=run_dir)
    for path in paths:
        executed = run_dir / path.name
        own = {k: v for k, v in params.items() if k in declared[path]}
        own["run_dir"] = str(run_dir)
        started = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(path),
                str(executed),
                parameters=own,
                kernel_name=kernel,
                cwd=str(path.parent),
                progress_bar=progress,
            )
        except Exception as error:  # papermill raises PapermillExecutionError with the cell's traceback
            raise NotebookFailed(path.name, executed, error) from error
        result.seconds[path.name] = round(time.perf_counter() - started, 2)
        result.executed.append(executed)
    record_metrics(run_dir, "pipeline", {"seconds": result.seconds})
    result.metrics = read_metrics(run_dir)
    return result
