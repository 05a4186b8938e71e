"""Sweeps over notebook parameters, and comparisons of runs.

A **sweep** (`run_sweep`) runs the pipeline once per point of a parameter grid (optionally times several
seeds) into `runs/<name>/<point>/`, each an ordinary run folder (`labkit.pipeline.run_pipeline`). The
grid is kept in `runs/<name>/sweep.json`; a rerun with the same grid skips the points whose run finished
(`run.json` says so, with the same parameters) and reruns the others, so an interrupted sweep resumes.
After every point `runs/<name>/summary.csv` is rewritten: one row per point with its parameters, state,
key metrics and seconds. A point whose notebook fails is recorded as failed and the sweep goes on.

**Comparing** (`compare`) reads run folders (or sweep folders, standing for their points): the effective
parameters of each run (`params.json`: defaults of the notebooks it ran plus those given) and its key
metrics (`metrics.json`). It returns one table, a row per run, with the parameters that differ and the
metrics side by side; runs that differ only by `seed` are grouped into one row with the mean and the
standard deviation over seeds (`<metric> sd`, `n_runs`). `query_changes` lines up two runs on the same
data (same `dataset.json` fingerprint) query by query. Drawing is separate: `plot_training_curves`,
`plot_category_metrics` and `draw_query_changes` return figures and print nothing.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labkit import pipeline
from labkit.paths import default_runs_dir

SWEEP_JSON = "sweep.json"
SUMMARY_CSV = "summary.csv"
KEY_METRICS = ("cmc@1", "cmc@5", "precision@5", "map@5")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


class SweepError(ValueError):
    """A sweep cannot run as asked (its folder holds another grid, a bad grid)."""


class CompareError(ValueError):
    """Runs cannot be compared as asked (not a run folder, not the same data)."""


# --------------------------------------------------------------------------------------------- sweeps


def grid_points(grid: Mapping[str, Sequence[Any]], seeds: Sequence[int] | None = None) -> list[dict]:
    """Every combination of the grid's values (first key slowest), times the seeds when given."""
    grid = {key: list(values) for key, values in grid.items()}
    empty = [key for key, values in grid.items() if not values]
    if empty:
        raise SweepError(f"grid parameter(s) {empty} have no values; give at least one value each.")
    if seeds:
        if "seed" in grid:
            raise SweepError("seed is both a grid parameter and --seeds; give it once.")
        grid["seed"] = [int(s) for s in seeds]
    if not grid:
        raise SweepError("the grid is empty: give at least one -p KEY VALUE... or --seeds.")
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def point_name(point: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """A folder name for a grid point: `lr=0.001_miner=all_seed=0` (only `keys`, when given)."""
    parts = [f"{key}={_value_text(value)}" for key, value in point.items() if keys is None or key in keys]
    return _UNSAFE.sub("-", "_".join(parts)) or "default"


def point_names(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """Folder names of the grid points, naming only the parameters that vary across the grid."""
    keys = list(points[0]) if points else []
    varying = [k for k in keys if not _same([p[k] for p in points])] or keys
    return [point_name(p, varying) for p in points]


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


@dataclass
class SweepResult:
    """What `run_sweep` did: the sweep folder, its summary table, the points run, skipped and failed."""

    sweep_dir: Path
    summary: pd.DataFrame
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def run_sweep(
    name: str,
    grid: Mapping[str, Sequence[Any]],
    *,
    seeds: Sequence[int] | None = None,
    params: Mapping[str, Any] | None = None,
    runs_dir: str | os.PathLike | None = None,
    only: Iterable[str] | None = None,
    notebooks: Sequence[str | os.PathLike] | None = None,
    kernel: str = "python3",
    progress: bool = False,
    report: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run the pipeline for every grid point into `<runs_dir>/<name>/<point>/`; see the module docstring.

    `params` go to every point (the grid's values override them). Every point's parameters are checked
    against the notebooks before anything runs. `report` receives one progress line per point.
    """
    say = report or (lambda line: None)
    params = dict(params or {})
    points = grid_points(grid, seeds)
    only = [str(o) for o in only] if only else None
    paths = pipeline.select_notebooks(notebooks, only)
    declared = {p: pipeline.notebook_declarations(p) for p in paths}
    for point in points:
        pipeline.check_parameters({**params, **point}, declared)

    sweep_dir = (Path(runs_dir) if runs_dir else default_runs_dir()) / name
    spec = pipeline.to_jsonable(
        {
            "grid": {k: list(v) for k, v in grid.items()},
            "seeds": list(seeds or []),
            "params": params,
            "only": only,
            "notebooks": [p.name for p in paths],
        }
    )
    spec_path = sweep_dir / SWEEP_JSON
    if spec_path.is_file():
        held = json.loads(spec_path.read_text())
        if {k: held.get(k) for k in spec} != spec:
            raise SweepError(
                f"{sweep_dir} holds a sweep with another grid or parameters ({spec_path}: {held}); "
                "use another --name, or repeat that sweep's arguments to resume it."
            )
    elif sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise SweepError(f"{sweep_dir} is not empty and holds no {SWEEP_JSON}; choose another --name.")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    labels = point_names(points)
    pipeline._write_json(spec_path, {**spec, "points": labels})

    result = SweepResult(sweep_dir=sweep_dir.resolve(), summary=pd.DataFrame())
    started = time.perf_counter()
    try:
        for i, (point, label) in enumerate(zip(points, labels, strict=True), 1):
            run_dir = sweep_dir / label
            head = f"[{i}/{len(points)}] {label}"
            if _finished_with(run_dir, {**params, **point}, [p.name for p in paths]):
                result.skipped.append(label)
                say(f"{head}: finished earlier, skipped")
                continue
            say(f"{head}: running ({time.perf_counter() - started:.0f} s into the sweep)")
            try:
                run = pipeline.run_pipeline(
                    {**params, **point},
                    name=label,
                    runs_dir=sweep_dir,
                    notebooks=paths,
                    overwrite=True,
                    kernel=kernel,
                    progress=progress,
                )
            except pipeline.NotebookFailed as error:
                result.failed[label] = str(error).splitlines()[0]
                say(f"{head}: FAILED - {result.failed[label]} (see {error.executed})")
            else:
                result.ran.append(label)
                shown = {k: v for k, v in run_metrics(run.run_dir).items() if k in KEY_METRICS}
                say(f"{head}: done in {sum(run.seconds.values()):.0f} s " + _metrics_text(shown))
            finally:
                result.summary = write_summary(sweep_dir, points)
    finally:
        result.summary = write_summary(sweep_dir, points)
    return result


def _metrics_text(values: Mapping[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, (int, float)))


def _finished_with(run_dir: Path, params: Mapping[str, Any], notebooks: list[str]) -> bool:
    if not pipeline.is_finished(run_dir):
        return False
    recorded = _read_json(run_dir / "params.json")
    return (
        recorded.get("params") == pipeline.to_jsonable(dict(params))
        and recorded.get("notebooks") == notebooks
    )


def write_summary(sweep_dir: str | os.PathLike, points: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Rewrite `summary.csv`: one row per point (point, state, its parameters, key metrics, seconds)."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for point, label in zip(points, point_names(points), strict=True):
        run_dir = sweep_dir / label
        state = pipeline.read_run_state(run_dir)
        row: dict[str, Any] = {"point": label, "state": state.get("state", "not run"), **point}
        if state:
            metrics = run_metrics(run_dir)
            row.update({k: v for k, v in metrics.items() if k != "seconds"})
            row["seconds"] = metrics.get("seconds")
        rows.append(row)
    table = pd.DataFrame(rows)
    tmp = sweep_dir / (SUMMARY_CSV + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, sweep_dir / SUMMARY_CSV)
    return table


# ------------------------------------------------------------------------------------------- runs


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def run_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's key numbers: overall validation metrics, best epoch, training seconds, total seconds."""
    metrics = pipeline.read_metrics(run_dir)
    out: dict[str, Any] = {}
    validate = metrics.get("validate", {})
    out.update({k: v for k, v in validate.items() if "/" not in k and k not in ("n_queries", "n_skipped")})
    if not validate:  # no 02_validate: the training's best epoch metrics
        train = metrics.get("train", {})
        out.update({k.removeprefix("best/"): v for k, v in train.items() if k.startswith("best/")})
    train = metrics.get("train", {})
    for key in ("best_epoch", "wall_time_s"):
        if key in train:
            out[f"train/{key}"] = train[key]
    seconds = metrics.get("pipeline", {}).get("seconds") or pipeline.read_run_state(run_dir).get("seconds")
    if seconds:
        out["seconds"] = round(sum(seconds.values()), 1)
    return out


def category_metrics(run_dir: str | os.PathLike, metric: str = "cmc@1") -> dict[str, float]:
    """The run's validation `metric` per category (`metrics.json`, section validate)."""
    validate = pipeline.read_metrics(run_dir).get("validate", {})
    return {k.split("/")[0]: v for k, v in validate.items() if "/" in k and k.split("/", 1)[1] == metric}


def run_params(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The parameters a run used: the notebooks' defaults plus those given (`params.json`)."""
    recorded = _read_json(Path(run_dir) / "params.json")
    if "effective" in recorded:
        return dict(recorded["effective"])
    return dict(recorded.get("params", {}))


def expand_runs(runs: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders; a sweep folder stands for its points (in grid order, those that ran)."""
    out: list[Path] = []
    for run in runs:
        path = Path(run).expanduser()
        if not path.is_dir() and not path.is_absolute() and (default_runs_dir() / path).is_dir():
            path = default_runs_dir() / path
        if (path / SWEEP_JSON).is_file():
            points = _read_json(path / SWEEP_JSON).get("points", [])
            out.extend(path / p for p in points if (path / p / "params.json").is_file())
        elif (path / "params.json").is_file():
            out.append(path)
        else:
            raise CompareError(
                f"{path} is neither a run folder (with params.json) nor a sweep folder (with {SWEEP_JSON}); "
                "give folders made by `labkit run` or `labkit sweep`."
            )
    if not out:
        raise CompareError("no runs to compare: give run folders or a sweep folder whose points ran.")
    return [p.resolve() for p in out]


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if (path.parent / SWEEP_JSON).is_file() else path.name


def _same(values: list[Any]) -> bool:
    return len({json.dumps(pipeline.to_jsonable(v), sort_keys=True) for v in values}) <= 1


def compare(
    runs: Iterable[str | os.PathLike],
    *,
    metrics: Sequence[str] | None = None,
    group_seeds: bool = True,
) -> pd.DataFrame:
    """One table: a row per run (or per group of runs differing only by seed), the parameters that differ
    and the metrics side by side. Grouped rows hold the mean, `<metric> sd` the standard deviation over
    seeds (ddof 1; NaN for one run) and `n_runs` how many. `table.attrs["same"]` holds the parameters all
    runs share.
    """
    paths = expand_runs(runs)
    params = [run_params(p) for p in paths]
    values = [run_metrics(p) for p in paths]
    keys = sorted({k for p in params for k in p} - {"run_dir"})
    differing = [k for k in keys if not _same([p.get(k) for p in params])]
    same = {k: params[0].get(k) for k in keys if k not in differing}
    if metrics is None:
        found = [m for m in values[0] if all(m in v for v in values)]
        metrics = [m for m in found if not m.startswith(("pcf", "fnmr"))]
    rows = []
    for path, p, v in zip(paths, params, values, strict=True):
        row = {"run": _name(path), **{k: _cell(p.get(k)) for k in differing}}
        row.update({m: v.get(m, math.nan) for m in metrics})
        rows.append(row)
    table = pd.DataFrame(rows)
    by = [k for k in differing if k != "seed"]
    if group_seeds and "seed" in differing and table.duplicated(by).any():
        grouped = table.groupby(by, sort=False, dropna=False) if by else table.groupby(lambda _: 0)
        mean = grouped[list(metrics)].mean()
        spread = grouped[list(metrics)].std(ddof=1).add_suffix(" sd")
        out = pd.concat([mean, spread], axis=1)
        out = out[[c for m in metrics for c in (m, f"{m} sd")]]
        out.insert(0, "n_runs", grouped.size())
        out.insert(1, "seeds", grouped["seed"].agg(lambda s: " ".join(str(x) for x in s)))
        table = out.reset_index() if by else out.reset_index(drop=True)
        table.insert(0, "runs", grouped["run"].agg(_common_prefix).to_numpy())
    table.attrs["same"] = same
    table.attrs["runs"] = [str(p) for p in paths]
    return table


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _common_prefix(names: pd.Series) -> str:
    """The group's runs: one name, or the first name without its seed and how many seeds."""
    names = list(names)
    if len(names) == 1:
        return names[0]
    base = re.sub(r"_?seed=[^_/]*", "", names[0]).rstrip("/_") or names[0]
    return f"{base} ({len(names)} runs)"


def format_comparison(table: pd.DataFrame, digits: int = 3) -> str:
    """The comparison as text: grouped metrics as `mean ± sd`."""
    shown = table.copy()
    for column in list(shown.columns):
        if isinstance(column, str) and f"{column} sd" in shown.columns:
            mean, spread = shown[column], shown[f"{column} sd"]
            shown[column] = [
                f"{m:.{digits}f}" + ("" if s != s else f" ± {s:.{digits}f}")
                for m, s in zip(mean, spread, strict=True)
            ]
            shown = shown.drop(columns=f"{column} sd")
    with pd.option_context(
        "display.width", 200, "display.max_columns", 50, "display.float_format", lambda x: f"{x:.{digits}f}"
    ):
        text = shown.to_string(index=False)
    same = table.attrs.get("same")
    if same:
        text += "\nsame in every run: " + ", ".join(f"{k}={v!r}" for k, v in same.items())
    return text


# ------------------------------------------------------------------------------- two runs, query by query


@dataclass
class RunResults:
    """A run's validation retrieval, recomputed from its saved embeddings and its dataset."""

    run_dir: Path
    results: Any  # labkit.retrieval.RetrievalResults
    items: pd.DataFrame  # the validation rows, in item order
    per_query: dict[str, Any]  # metric name -> (Q,) tensor


def run_results(
    run_dir: str | os.PathLike, *, k: int = 10, cmc_k=(1,), precision_k=(5,), map_k=(5,)
) -> RunResults:
    """Retrieve again from `validation_embeddings.pt` (02_validate) on the run folder's dataset."""
    import torch

    from labkit import data, metrics, retrieval, rundata, viz

    run_dir = Path(run_dir)
    saved_path = run_dir / "validation_embeddings.pt"
    if not saved_path.is_file():
        raise CompareError(f"{saved_path} is missing: run 02_validate into {run_dir} first.")
    saved = torch.load(saved_path, weights_only=False)
    valid = data.validation_dataset(rundata.load(run_dir).df)
    if saved["paths"] != valid.paths:
        raise CompareError(f"{saved_path} does not hold the validation images of {run_dir / 'dataset.csv'}.")
    results = retrieval.retrieve(
        saved["embeddings"],
        valid.labels,
        valid.is_query,
        valid.is_gallery,
        k=max(k, *cmc_k, *precision_k, *map_k),
        sequence_ids=valid.sequences,
    )
    m = metrics.metrics_from_results(results, cmc_k=cmc_k, precision_k=precision_k, map_k=map_k, reduce=False)
    return RunResults(run_dir, results, valid.df, viz.per_query_metrics(m))


def query_changes(
    run_a: str | os.PathLike, run_b: str | os.PathLike, *, metric: str = "map@5"
) -> pd.DataFrame:
    """Per query, `metric` in run a and run b and the change (b - a), most improved first.

    Both runs must hold the same data (same `dataset.json` fingerprint), so queries line up.
    """
    from labkit import rundata

    a, b = (rundata.describe(r) or {} for r in (run_a, run_b))
    if not a or a.get("fingerprint") != b.get("fingerprint"):
        raise CompareError(
            f"{run_a} and {run_b} do not hold the same data (dataset.json fingerprints differ or are "
            "missing); query-by-query changes need two runs on the same dataset."
        )
    ra, rb = run_results(run_a), run_results(run_b)
    if metric not in ra.per_query:
        raise CompareError(f"metric {metric!r} is not computed; choose one of {sorted(ra.per_query)}")
    va, vb = ra.per_query[metric].numpy(), rb.per_query[metric].numpy()
    items = np.asarray(
        ra.results.query_ids.cpu() if hasattr(ra.results.query_ids, "cpu") else ra.results.query_ids
    )
    table = pd.DataFrame(
        {
            "query": np.arange(len(va)),
            "item": items,
            "label": ra.items["label"].to_numpy()[items],
            f"{metric} a": va,
            f"{metric} b": vb,
            "change": vb - va,
        }
    )
    table = table.dropna(subset=["change"]).sort_values(["change", "query"], ascending=[False, True])
    return table.reset_index(drop=True)


# ------------------------------------------------------------------------------------------- drawing


def _groups(paths: list[Path]) -> list[str]:
    """A label per run: its differing parameters except the seed (runs of one group share a colour)."""
    params = [run_params(p) for p in paths]
    keys = sorted({k for p in params for k in p} - {"run_dir", "seed"})
    differing = [k for k in keys if not _same([p.get(k) for p in params])]
    if differing:
        return [", ".join(f"{k}={_value_text(p.get(k))}" for k in differing) for p in params]
    if _same([p.get("seed") for p in params]):
        return [_name(p) for p in paths]
    return [f"{len(paths)} seeds"] * len(paths)


def plot_training_curves(runs: Iterable[str | os.PathLike], metric: str = "cmc@1"):
    """Training loss and validation `metric` per epoch of every run, overlaid; one colour per group
    (runs differing only by seed share one)."""
    from labkit import training, viz

    paths = [p for p in expand_runs(runs) if (p / training.HISTORY_CSV).is_file()]
    if not paths:
        raise CompareError("none of the runs has a train_history.csv (run 01_train).")
    labels = _groups(paths)
    colours = {g: f"C{i % 10}" for i, g in enumerate(dict.fromkeys(labels))}
    fig = viz.Figure(figsize=(11, 4), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    seen = set()
    for path, label in zip(paths, labels, strict=True):
        history = training.read_history(path)
        legend = label if label not in seen else None
        seen.add(label)
        loss_ax.plot(
            history["epoch"], history["loss"], color=colours[label], alpha=0.8, marker=".", label=legend
        )
        if metric in history:
            metric_ax.plot(history["epoch"], history[metric], color=colours[label], alpha=0.8, marker=".")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Training loss")
    metric_ax.set(xlabel="epoch (0 = before training)", ylabel=metric, title=f"Validation {metric}")
    loss_ax.legend(fontsize=8)
    return fig


def plot_category_metrics(runs: Iterable[str | os.PathLike], metric: str = "cmc@1"):
    """Bars of the validation `metric` per category, one bar per group of runs (mean; error bar: sd)."""
    from labkit import viz

    paths = expand_runs(runs)
    labels = _groups(paths)
    rows = [{"group": g, **category_metrics(p, metric)} for p, g in zip(paths, labels, strict=True)]
    table = pd.DataFrame(rows).set_index("group")
    if table.shape[1] == 0:
        raise CompareError(f"the runs record no per-category {metric} (a dataset without categories?)")
    grouped = table.groupby(level=0, sort=False)
    mean, spread = grouped.mean(), grouped.std(ddof=1)
    fig = viz.Figure(
        figsize=(max(6, 1.4 * mean.shape[1] * max(1, len(mean)) / 2 + 2), 4), layout="constrained"
    )
    ax = fig.subplots()
    width = 0.8 / len(mean)
    x = np.arange(mean.shape[1])
    for i, group in enumerate(mean.index):
        err = spread.loc[group].to_numpy() if grouped.size()[group] > 1 else None
        ax.bar(
            x + i * width - 0.4 + width / 2,
            mean.loc[group].to_numpy(),
            width,
            yerr=err,
            capsize=3,
            label=f"{group} (n={grouped.size()[group]})",
        )
    ax.set_xticks(x, list(mean.columns))
    ax.set(ylabel=metric, title=f"Validation {metric} per category", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    return fig


def side_by_side(figures: Sequence[Any], *, title: str | None = None, columns: int = 2):
    """Several figures drawn as pictures into one (e.g. the same query in two runs)."""
    import io

    from matplotlib.image import imread

    from labkit import viz

    images = [imread(io.BytesIO(viz.figure_png(f)), format="png") for f in figures]
    rows = math.ceil(len(images) / columns)
    height = max(i.shape[0] for i in images) / 100
    width = max(i.shape[1] for i in images) / 100
    fig = viz.Figure(figsize=(width * columns, height * rows + (0.4 if title else 0)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image in zip(axes, images, strict=False):
        ax.imshow(image)
    if title:
        fig.suptitle(title)
    return fig


def draw_query_changes(
    run_a: str | os.PathLike,
    run_b: str | os.PathLike,
    *,
    metric: str = "map@5",
    n: int = 2,
    k: int = 5,
) -> tuple[Any, Any]:
    """The `n` queries whose `metric` improved most and the `n` that worsened most from run a to run b,
    each drawn in both runs side by side (labkit.viz.draw_query). Returns (improved, worsened) figures."""
    from labkit import viz

    changes = query_changes(run_a, run_b, metric=metric)
    ra, rb = run_results(run_a, k=k), run_results(run_b, k=k)
    label_a, label_b = _groups([Path(run_a).resolve(), Path(run_b).resolve()])
    if label_a == label_b:  # only the seed differs: the run names say more
        label_a, label_b = _name(Path(run_a).resolve()), _name(Path(run_b).resolve())
    name_a, name_b = f"a ({label_a})", f"b ({label_b})"

    def draw(rows: pd.DataFrame, what: str):
        figs = []
        for _, row in rows.iterrows():
            q = int(row["query"])
            for side, results, name in (("a", ra, name_a), ("b", rb, name_b)):
                value = row[f"{metric} {side}"]
                title = f"{name}: query {q}, {metric} {value:.2f}"
                figs.append(viz.draw_query(results.results, q, ra.items, k=k, title=title))
        return side_by_side(figs, title=f"Queries whose {metric} {what} most from {name_a} to {name_b}")

    improved = changes.head(n)
    worsened = changes.iloc[::-1].head(n)
    return draw(improved, "improved"), draw(worsened, "worsened")


def recent_runs(n: int = 2, runs_dir: str | os.PathLike | None = None) -> list[Path]:
    """The `n` most recently finished runs under the runs folder (sweep points included), oldest first."""
    root = Path(runs_dir) if runs_dir else default_runs_dir()
    found = [p.parent for p in root.glob("*/run.json")] + [p.parent for p in root.glob("*/*/run.json")]
    finished = [p for p in found if pipeline.is_finished(p) and not p.parent.name.startswith(".")]
    finished.sort(key=lambda p: (pipeline.read_run_state(p).get("ended", ""), str(p)))
    if len(finished) < n:
        raise CompareError(
            f"{root} holds {len(finished)} finished run(s); give the runs to compare (runs = [...])."
        )
    return [p.resolve() for p in finished[-n:]]


def same_data_pair(runs: Iterable[str | os.PathLike]) -> tuple[Path, Path] | None:
    """The first two runs (in order) that hold the same data and saved validation embeddings, or None."""
    from labkit import rundata

    paths = [p for p in expand_runs(runs) if (p / "validation_embeddings.pt").is_file()]
    prints = [(rundata.describe(p) or {}).get("fingerprint") for p in paths]
    for i, a in enumerate(paths):
        for j in range(i + 1, len(paths)):
            if prints[i] and prints[i] == prints[j]:
                return a, paths[j]
    return None
