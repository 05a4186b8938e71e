"""Run folders and the pipeline that executes the ordered notebooks with papermill.

A run folder holds everything needed to reproduce a result: the executed notebooks, `params.json` (the
parameters given and the effective ones, defaults included), `environment.json` (versions, seed, git
commit), `run.json` (state: running / finished / failed / interrupted), `metrics.json` (one section per
notebook) and the dataset `00_data` resolved (`dataset.csv`, `dataset.json`; see `labkit.rundata`).

Parameters are checked against the notebooks' `parameters` cells (names and types) before anything runs.
`--overwrite` replaces a run all or nothing (the earlier run is moved aside and put back on failure).
Notebooks run interactively share `runs/interactive/`; rerunning `01_train` there moves the earlier
interactive run aside whole (`runs/interactive-<n>/`) instead of failing.
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else ""


def prepare_run_dir(run_dir: str | os.PathLike | None) -> Path:
    """Return the run folder as a Path, creating it; empty means `runs/interactive` (for notebook users)."""
    path = Path(run_dir) if run_dir else default_runs_dir() / INTERACTIVE_RUN
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_interactive_run(run_dir: str | os.PathLike) -> bool:
    """Whether `run_dir` is the folder that notebooks run by hand share (`runs/interactive`)."""
    interactive = (default_runs_dir() / INTERACTIVE_RUN).expanduser().resolve()
    return Path(run_dir).expanduser().resolve() == interactive


def set_aside_interactive_run(
    run_dir: str | os.PathLike, *, reason: str = "", keep: Sequence[str] = ()
) -> Path:
    """Move the interactive run folder whole to the first free `runs/interactive-<n>/` and start it afresh.

    The files named in `keep` (e.g. the run's dataset) are copied into the fresh folder. Returns where the
    earlier run went. Refuses any folder but the interactive one (`RunFolderError`).
    """
    import shutil

    path = Path(run_dir).expanduser().resolve()
    if not is_interactive_run(path):
        raise RunFolderError(f"{path} is not the interactive run folder; only that one is moved aside.")
    n = 1
    while (target := path.with_name(f"{path.name}-{n}")).exists():
        n += 1
    os.replace(path, target)
    path.mkdir(parents=True)
    for name in keep:
        if (target / name).is_file():
            shutil.copy2(target / name, path / name)
    _write_json(target / "moved.json", {"moved_from": str(path), "reason": reason, "at": _now()})
    return target


def training_run_dir(run_dir: str | os.PathLike | None, *, resume: bool, overwrite: bool) -> Path:
    """The run folder for `01_train`, so that rerunning it by hand just works.

    In the interactive folder, when it already holds a training (`checkpoints/`) and neither `resume`
    nor `overwrite` is asked, the earlier interactive run is moved whole to `runs/interactive-<n>/`
    (nothing is lost, and its later results stay with the model that made them) and training starts in
    a fresh `runs/interactive/` with the same dataset; a line says so. Elsewhere the folder is returned
    as it is (a named run's checkpoints are never moved).
    """
    from labkit import rundata

    path = prepare_run_dir(run_dir)
    checkpoints = path / "checkpoints"
    held = checkpoints.is_dir() and any(checkpoints.iterdir())
    if held and not resume and not overwrite and is_interactive_run(path):
        moved = set_aside_interactive_run(
            path, reason="01_train was run again", keep=(rundata.DATASET_CSV, rundata.DATASET_JSON)
        )
        print(
            f"{path} already held a training: that run was moved whole to {moved} (set resume = True to "
            f"continue it instead); training a new one in {path} on the same dataset."
        )
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


def discover_notebooks(folder: str | os.PathLike | None = None, *, pipeline_only: bool = True) -> list[Path]:
    """The pipeline's notebooks, `NN_name.ipynb`, in order.

    With `pipeline_only`, notebooks whose metadata says `{"labkit": {"pipeline": false}}` (those that
    look across runs, such as `06_compare_runs`) are left out.
    """
    folder = Path(folder) if folder else notebooks_dir()
    found = sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    if not found:
        raise FileNotFoundError(f"no notebooks named NN_name.ipynb in {folder}")
    if pipeline_only:
        found = [p for p in found if _in_pipeline(p)]
    return found


def _in_pipeline(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text()).get("metadata", {})
    except ValueError:
        return True
    return bool(meta.get("labkit", {}).get("pipeline", True))


@dataclass
class PipelineResult:
    """What `run_pipeline` made: the folder, the executed notebooks, the metrics, the replaced run."""

    run_dir: Path
    executed: list[Path] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    replaced: Path | None = None  # where --overwrite moved the earlier run


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


@dataclass(frozen=True)
class Declared:
    """One parameter of a notebook's `parameters` cell: its default (a Python value) and its comment."""

    name: str
    default: Any
    help: str = ""
    literal: bool = True  # False when the default is an expression, not a literal (its type is not checked)

    @property
    def type_name(self) -> str:
        return type(self.default).__name__ if self.literal else "expression"

    @property
    def allows_none(self) -> bool:
        return self.default is None or "None" in self.help


def notebook_declarations(notebook: str | os.PathLike) -> dict[str, Declared]:
    """The parameters a notebook declares in its `parameters` cell (papermill's `inspect_notebook`)."""
    import papermill

    out = {}
    for name, spec in papermill.inspect_notebook(str(notebook)).items():
        source = spec.get("default")
        try:
            default, literal = (ast.literal_eval(source), True) if source is not None else (None, True)
        except (ValueError, SyntaxError):
            default, literal = source, False
        out[name] = Declared(name, default, spec.get("help") or "", literal)
    return out


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """The parameters a notebook declares in its `parameters` cell, with their defaults."""
    return {name: d.default for name, d in notebook_declarations(notebook).items()}


def _fits(declared: Declared, value: Any) -> bool:
    """Whether `value` has the declared default's type (ints pass for floats; None where the comment says)."""
    default = declared.default
    if not declared.literal:
        return True
    if value is None:
        return declared.allows_none
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            return False
        kinds = {type(v) for v in default}
        if len(kinds) == 1 and default:
            element = Declared(declared.name, default[0], declared.help)
            return all(_fits(element, v) for v in value)
        return True
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


class ParameterError(ValueError):
    """A `-p key value` that no notebook declares, or whose value has the wrong type."""


def check_parameters(params: Mapping[str, Any], declared: Mapping[Path, Mapping[str, Declared]]) -> None:
    """Refuse unknown keys and values whose type differs from a declaring notebook's default."""
    known = set().union(*(set(d) for d in declared.values())) if declared else set()
    if "run_dir" in params:
        raise ParameterError("run_dir is set by the pipeline; choose the folder with name= / --name instead")
    unknown = sorted(set(params) - known)
    if unknown:
        hint = ""
        if declared and any(p.name.startswith("0") for p in declared):
            try:
                others = [p for p in discover_notebooks(next(iter(declared)).parent) if p not in declared]
            except FileNotFoundError:
                others = []
            owners = sorted({o.name for o in others for key in unknown if key in notebook_parameters(o)})
            if owners:
                hint = (
                    f" ({', '.join(owners)} declares them, but is not run; the dataset parameters belong to "
                    "00_data, and the later notebooks read the dataset from the run folder)"
                )
        raise ParameterError(
            f"parameter(s) {unknown} are declared by none of the notebooks {[p.name for p in declared]}"
            f"{hint}; known parameters: {sorted(known - {'run_dir'})}"
        )
    for key, value in params.items():
        for path, notebook in declared.items():
            if key in notebook and not _fits(notebook[key], value):
                d = notebook[key]
                hint = f", or None ({d.help})" if d.allows_none and d.default is not None else ""
                raise ParameterError(
                    f"parameter {key} = {value!r} ({type(value).__name__}) does not fit {path.name}, which "
                    f"declares {key} = {d.default!r} (type {d.type_name}{hint}); pass a value of type "
                    f"{d.type_name}, e.g. -p {key} {json.dumps(d.default)}"
                )


def parse_value(text: str) -> Any:
    """Read a `-p key value` value as JSON when it is JSON (numbers, true/false, lists), else as a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def default_run_name() -> str:
    """A new, sortable run name: the date and time."""
    return time.strftime("%Y%m%d-%H%M%S")


# ----------------------------------------------------------------------------------- the run's state

RUN_STATE = "run.json"
REPLACED_DIR = ".replaced"  # earlier runs moved aside by --overwrite (under the runs folder)
FAILED_DIR = ".failed"  # new runs that failed while replacing an earlier one


def read_run_state(run_dir: str | os.PathLike) -> dict:
    """The run's `run.json` ({"state": "running", "finished", "failed" or "interrupted", ...}), or {}."""
    path = Path(run_dir) / RUN_STATE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def is_finished(run_dir: str | os.PathLike) -> bool:
    """Whether every notebook of the run finished (its `run.json` says so)."""
    return read_run_state(run_dir).get("state") == "finished"


def _set_state(run_dir: Path, **values: Any) -> None:
    _write_json(run_dir / RUN_STATE, {**read_run_state(run_dir), **values})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _aside(runs_dir: Path, kind: str, name: str) -> Path:
    """A new, free path `<runs_dir>/<kind>/<name>-<date-time>[-n]`."""
    folder = runs_dir / kind
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"{name.replace(os.sep, '_')}-{default_run_name()}"
    target, n = folder / stamp, 1
    while target.exists():
        n += 1
        target = folder / f"{stamp}-{n}"
    return target


class RunFailed(RuntimeError):
    """Base of the pipeline's run errors; `.run_dir` is where the partial run is."""


class NotebookFailed(RunFailed):
    """A notebook of the pipeline raised; names the notebook and its executed copy."""

    def __init__(self, notebook: str, executed: Path, cause: BaseException, restored: Path | None = None):
        self.notebook, self.executed, self.restored = notebook, executed, restored
        self.run_dir = executed.parent
        kept = f"\nThe earlier run was put back in {restored}." if restored else ""
        super().__init__(
            f"notebook {notebook} failed: {_error_text(cause)}\n"
            f"Its executed copy, with the traceback in the failing cell, is {executed}{kept}"
        )


class RunInterrupted(RunFailed):
    """The run was stopped (Ctrl-C); `.run_dir` holds the partial run, `.notebook` the one interrupted."""

    def __init__(self, notebook: str, run_dir: Path, restored: Path | None = None):
        self.notebook, self.run_dir, self.restored = notebook, run_dir, restored
        kept = f"; the earlier run is back in {restored}" if restored else ""
        super().__init__(f"interrupted during {notebook}; the partial run is in {run_dir}{kept}")


def _error_text(error: BaseException) -> str:
    ename = getattr(error, "ename", None)
    evalue = getattr(error, "evalue", None)
    if ename:  # papermill's PapermillExecutionError: the notebook's own error
        return f"{ename}: {evalue}"
    return f"{type(error).__name__}: {_first_line(error)}"


def _mark_interrupted(executed: Path) -> None:
    """Say in the executed copy that the run was interrupted (papermill leaves `exception: None`)."""
    import nbformat

    if not executed.is_file():
        return
    nb = nbformat.read(executed, as_version=4)
    nb.metadata.setdefault("papermill", {})["exception"] = True
    nb.metadata["labkit"] = {"interrupted": True}
    status = [c.get("metadata", {}).get("papermill", {}).get("status") for c in nb.cells]
    stopped = status.index("running") if "running" in status else None
    where = f" in cell {stopped}" if stopped is not None else ""
    banner = nbformat.v4.new_markdown_cell(
        f'<span style="color:red; font-size:1.4em;">Interrupted (Ctrl-C){where}: this notebook did not '
        "finish; the cells below it were not run.</span>"
    )
    banner.metadata["tags"] = ["papermill-error-cell-tag"]
    nb.cells.insert(0, banner)
    nbformat.write(nb, executed)


def _execute(path: Path, executed: Path, parameters: dict, kernel: str, progress: bool) -> None:
    """Run one notebook with papermill in a kernel this function owns and always shuts down."""
    import papermill
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    km = AsyncKernelManager(kernel_name=kernel)
    try:
        papermill.execute_notebook(
            str(path),
            str(executed),
            parameters=parameters,
            kernel_name=kernel,
            cwd=str(path.parent),
            progress_bar=progress,
            km=km,
        )
    finally:
        if km.has_kernel:
            try:
                run_sync(km.shutdown_kernel)(now=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


def select_notebooks(
    notebooks: Sequence[str | os.PathLike] | None = None, only: Iterable[str] | None = None
) -> list[Path]:
    """The notebooks to run: `notebooks` (default: the pipeline's), those starting with an `only` prefix."""
    paths = [Path(p) for p in notebooks] if notebooks else discover_notebooks()
    if only:
        prefixes = tuple(str(o) for o in only)
        paths = [p for p in paths if p.name.startswith(prefixes)]
        if not paths:
            raise ParameterError(f"no notebook starts with any of {list(prefixes)}")
    return paths


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

    Each notebook receives only the parameters it declares, plus `run_dir`. Before anything runs, a
    parameter that no notebook declares, or whose value's type differs from the declared default, is a
    `ParameterError`. `only` keeps notebooks whose name starts with one of the given prefixes.

    A non-empty run folder is refused (`RunFolderError`) unless `overwrite`, which replaces the run all
    or nothing: the earlier run is moved to `<runs>/.replaced/<name>-<time>/` first (`result.replaced`),
    and put back when the new run fails or is interrupted (the new partial run then goes to
    `<runs>/.failed/`). The run's state is kept in `run.json`. On failure `NotebookFailed`, on Ctrl-C
    `RunInterrupted`; both carry `.run_dir`, the partial run, and no kernel is left running.
    """
    params = dict(params or {})
    paths = select_notebooks(notebooks, only)
    declared = {p: notebook_declarations(p) for p in paths}
    check_parameters(params, declared)

    runs_root = Path(runs_dir) if runs_dir else default_runs_dir()
    run_dir = runs_root / (name or default_run_name())
    replaced = None
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunFolderError(
                f"run folder {run_dir} is not empty; choose another --name, or pass --overwrite to replace "
                f"that run (it is moved to {runs_root / REPLACED_DIR}/ first, and put back if the new run "
                "fails)."
            )
        replaced = _aside(runs_root, REPLACED_DIR, run_dir.name)
        os.replace(run_dir, replaced)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir.resolve()
    defaults: dict[str, Any] = {}
    for notebook in declared.values():
        for key, d in notebook.items():
            if key != "run_dir":
                defaults.setdefault(key, d.default)
    effective = {**defaults, **params}
    seed = effective.get("seed")
    _write_json(
        run_dir / "params.json",
        {"params": params, "notebooks": [p.name for p in paths], "effective": effective},
    )
    _write_json(run_dir / "environment.json", environment_info(seed))
    _set_state(run_dir, state="running", notebooks=[p.name for p in paths], done=[], started=_now())

    result = PipelineResult(run_dir=run_dir, replaced=replaced)
    for path in paths:
        executed = run_dir / path.name
        own = {k: v for k, v in params.items() if k in declared[path]}
        own["run_dir"] = str(run_dir)
        started = time.perf_counter()
        try:
            _execute(path, executed, own, kernel, progress)
        except KeyboardInterrupt:
            _mark_interrupted(executed)
            _set_state(run_dir, state="interrupted", notebook=path.name, ended=_now())
            partial, restored = _give_back(run_dir, replaced, runs_root)
            raise RunInterrupted(path.name, partial, restored) from None
        except Exception as error:  # papermill raises PapermillExecutionError with the cell's traceback
            if getattr(error, "ename", None) == "KeyboardInterrupt":
                _mark_interrupted(executed)
                _set_state(run_dir, state="interrupted", notebook=path.name, ended=_now())
                partial, restored = _give_back(run_dir, replaced, runs_root)
                raise RunInterrupted(path.name, partial, restored) from None
            _set_state(run_dir, state="failed", notebook=path.name, error=_error_text(error), ended=_now())
            partial, restored = _give_back(run_dir, replaced, runs_root)
            raise NotebookFailed(path.name, partial / path.name, error, restored) from error
        result.seconds[path.name] = round(time.perf_counter() - started, 2)
        result.executed.append(executed)
        _set_state(run_dir, done=[p.name for p in result.executed])
    record_metrics(run_dir, "pipeline", {"seconds": result.seconds})
    _set_state(run_dir, state="finished", ended=_now(), seconds=result.seconds)
    result.metrics = read_metrics(run_dir)
    return result


def _give_back(run_dir: Path, replaced: Path | None, runs_root: Path) -> tuple[Path, Path | None]:
    """After a failed or interrupted run: when it replaced an earlier run, put that one back.

    Returns where the partial run is now and where the earlier run was put back (None if there was none).
    """
    if replaced is None:
        return run_dir, None
    failed = _aside(runs_root, FAILED_DIR, run_dir.name)
    os.replace(run_dir, failed)
    os.replace(replaced, run_dir)
    return failed, run_dir
