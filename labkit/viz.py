"""Figures for retrieval results, embeddings and training runs.

Every function returns a `matplotlib.figure.Figure` built without pyplot: nothing is shown or kept open,
it works headless (Agg) and a notebook displays a returned figure once. Save one with `fig.savefig(path)`.

Retrieval figures take a `RetrievalResults` (labkit.retrieval) and the items it indexes: a DataFrame with one
row per item in the order of the embeddings (e.g. `labkit.data.validation_dataset(df).df`; a full dataset with
a `split` column is narrowed to its validation rows), or a list of image paths. `query_pos` always means a row
of the results (0..Q-1); `results.query_ids[query_pos]` is the item it stands for.
"""

from __future__ import annotations

import io
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import matplotlib.figure
import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from labkit.data_plots import plot_sample_grid as show_grid  # noqa: F401  (the sample grid per class)

RELEVANT_COLOR = "#1a9641"  # green frame: same label as the query
IRRELEVANT_COLOR = "#d7191c"  # red frame: another label
QUERY_COLOR = "#2b83ba"  # blue frame: the query itself
POSITIVE_COLOR = "#1a9641"
NEGATIVE_COLOR = "#d7191c"
FRAME_WIDTH = 4.0
CHECK, CROSS = "\u2713", "\u2717"  # marks beside the rank, for readers who do not tell red from green
LABEL_CHARS = 16  # longer labels are shortened with an ellipsis so that neighbours never overlap at k=10
TILE_INCHES = 1.5  # width per image column of the retrieval grids (before margins)
METRIC_COLUMN = re.compile(r"^(cmc|precision|map|pcf|fnmr@fmr)@")
_BOX = ("x_1", "y_1", "x_2", "y_2")  # labkit.data.BOX


class Figure(matplotlib.figure.Figure):
    """A matplotlib Figure that notebooks show as a PNG even when pyplot was never imported."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def figure_png(
    fig: matplotlib.figure.Figure, *, dpi: float = 100, tight: bool = False, compress_level: int = 6
) -> bytes:
    """The figure rendered as PNG bytes (Agg); `tight` crops its margins (at the cost of a second pass);
    `compress_level` 0-9 trades size for speed (1: about a third faster to encode, for live widgets)."""
    buffer = io.BytesIO()
    fig.savefig(
        buffer,
        format="png",
        dpi=dpi,
        bbox_inches="tight" if tight else None,
        facecolor="white",
        pil_kwargs={"compress_level": compress_level},
    )
    return buffer.getvalue()


def save_figure(
    fig: matplotlib.figure.Figure, path: str | os.PathLike, *, dpi: int = 100, overwrite: bool = True
) -> str:
    """Save `fig` as an image (format from the suffix), creating parent folders; returns the path."""
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    return path


# ----------------------------------------------------------------------------------------------------
# Pure helpers


def worst_queries(
    per_query_values: Any, *, n: int | None = None, higher_is_better: bool = True, skip_nan: bool = True
) -> np.ndarray:
    """Query positions ordered worst first (lowest value when `higher_is_better`), ties broken by position.

    NaN values (queries without any relevant gallery item) are left out when `skip_nan`, else put last.
    `n` keeps the first n (all when None).
    """
    values = _as_numpy(per_query_values, "per_query_values").astype(np.float64)
    if values.ndim != 1:
        raise ValueError(f"per_query_values must be one value per query (1-D), got shape {values.shape}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    key = values if higher_is_better else -values
    nan = np.isnan(values)
    order = np.argsort(np.where(nan, np.inf, key), kind="stable")  # stable: equal values keep position order
    order = order[~nan[order]] if skip_nan else np.concatenate([order[~nan[order]], order[nan[order]]])
    return order[:n].astype(np.int64) if n is not None else order.astype(np.int64)


def per_query_metrics(metrics: Mapping[Any, Any], section: Any = "overall") -> dict[str, torch.Tensor]:
    """Flatten per-query metrics (`metrics_from_results(..., reduce=False)`) to {"cmc@1": (Q,), "map@5": ...}.

    Only the `section` (default "overall", whose tensors cover every query) is used.
    """
    if section not in metrics:
        raise ValueError(f"metrics have no section {section!r}; they have {list(metrics)}")
    flat: dict[str, torch.Tensor] = {}
    for name, values in metrics[section].items():
        if not isinstance(values, Mapping):
            continue  # n_queries, n_skipped
        for k, value in values.items():
            if not torch.is_tensor(value) or value.ndim != 1:
                raise ValueError("per_query_metrics needs per-query metrics: compute them with reduce=False")
            flat[f"{name}@{k:g}" if isinstance(k, float) else f"{name}@{k}"] = value.detach().cpu()
    return flat


def shorten(text: Any, width: int = LABEL_CHARS) -> str:
    """`text` cut to at most `width` characters, keeping its start and end around an ellipsis."""
    text = str(text)
    if len(text) <= width:
        return text
    head = max((width - 1) * 3 // 5, 1)
    tail = max(width - 1 - head, 0)
    return text[:head] + "\u2026" + (text[-tail:] if tail else "")


def natural_key(value: Any) -> tuple:
    """Sort key putting "label 2" before "label 10" (numbers inside strings compare as numbers)."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(value))
    )


def pca_2d(embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
    """Project embeddings (N, D) on their first two principal components.

    Returns (coordinates (N, 2), explained variance ratio of the two components). Deterministic: each
    component's sign makes its largest loading positive.
    """
    x = torch.as_tensor(_as_numpy(embeddings, "embeddings"), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"embeddings must be a (N, D) matrix with N >= 2, got shape {tuple(x.shape)}")
    x = x - x.mean(dim=0)
    cov = x.T @ x / (x.shape[0] - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
    if x.shape[1] < 2:
        eigvals, eigvecs = (
            torch.cat([eigvals, eigvals.new_zeros(1)]),
            torch.cat([eigvecs, eigvecs.new_zeros(1, 1)], dim=1),
        )
    components = eigvecs[:, :2]
    signs = torch.sign(components.gather(0, components.abs().argmax(dim=0, keepdim=True)))
    components = components * torch.where(signs == 0, 1.0, signs)
    total = eigvals.sum()
    ratio = (eigvals[:2] / total) if total > 0 else torch.zeros(2, dtype=torch.float64)
    return (x @ components).numpy(), ratio.numpy()


def distance_samples(
    embeddings: Any,
    labels: Any,
    is_query: Any,
    is_gallery: Any,
    *,
    sequence_ids: Any = None,
    max_queries: int = 2000,
    max_negatives: int = 200_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean query-gallery distances split into positive (same label) and negative pairs.

    Unlike the top-k distances of a RetrievalResults, these cover all pairs (`labkit.retrieval`'s
    exclusions apply: never a query with itself nor with its own sequence). At most `max_queries` queries
    (a seeded sample) and `max_negatives` negative distances (a seeded sample) are kept.
    """
    from labkit.retrieval import iter_pair_distances

    query_mask = _as_numpy(is_query, "is_query").reshape(-1).astype(bool)
    queries = np.flatnonzero(query_mask)
    rng = np.random.default_rng(seed)
    if len(queries) > max_queries:
        query_mask = np.zeros_like(query_mask)
        query_mask[rng.choice(queries, size=max_queries, replace=False)] = True
    n_queries = max(int(query_mask.sum()), 1)
    positives, negatives = [], []
    chunks = iter_pair_distances(embeddings, labels, query_mask, is_gallery, sequence_ids=sequence_ids)
    for dist, relevant in chunks:
        dist, relevant = dist.cpu(), relevant.cpu()
        valid = ~torch.isnan(dist)
        positives.append(dist[valid & relevant].double().numpy())
        negative = dist[valid & ~relevant].double().numpy()
        quota = math.ceil(max_negatives * len(dist) / n_queries)  # bounded memory per chunk
        negatives.append(
            rng.choice(negative, size=quota, replace=False) if len(negative) > quota else negative
        )
    if not positives:
        raise ValueError("distance_samples needs at least one query and one gallery item")
    negative = np.concatenate(negatives)
    if len(negative) > max_negatives:
        negative = rng.choice(negative, size=max_negatives, replace=False)
    return np.concatenate(positives), negative


# ----------------------------------------------------------------------------------------------------
# Retrieval grids


def draw_query(
    results: Any,
    query_pos: int,
    df_or_paths: pd.DataFrame | Sequence[str],
    *,
    k: int = 5,
    labels: Sequence[Any] | Mapping[Any, Any] | None = None,
    boxes: bool = True,
    metrics: Mapping[str, float] | None = None,
    title: str | None = None,
    query_title: str | None = None,
) -> Figure:
    """One query beside its top-k gallery images, framed green when relevant and red when not.

    The query is framed blue; label and distance are written under each image. `labels` overrides the
    displayed labels (one per item, or a mapping from label code to name); `boxes` crops images to the
    x_1..y_2 columns when the DataFrame has them. `metrics` (name -> value of this query) are written under
    the query; `query_title` replaces the "query <row>" above it (e.g. "item 7").
    """
    per_query = (
        None if metrics is None else {name: {int(query_pos): value} for name, value in metrics.items()}
    )
    fig = _draw_rows(
        results,
        [query_pos],
        df_or_paths,
        k=k,
        labels=labels,
        boxes=boxes,
        metrics=per_query,
        query_titles=None if query_title is None else {int(query_pos): query_title},
    )
    n = int(_check_positions(results, [query_pos])[0])
    text = title if title is not None else f"Query {n} (item {int(results.query_ids[n])}): top {k}"
    fig.suptitle(wrap_title(text, fig), fontsize=10)
    return fig


def wrap_title(text: str, fig: matplotlib.figure.Figure, fontsize: float = 10) -> str:
    """`text` broken into lines that fit the figure's width at `fontsize` (a narrow k=1 grid clips none)."""
    chars_per_line = max(int(fig.get_figwidth() * 72 / (0.6 * fontsize)), 12)
    return "\n".join(textwrap.wrap(text, chars_per_line, break_long_words=False)) or text


def tile_inches(k: int) -> float:
    """Side in inches of one image of a retrieval grid with `k` gallery columns (see `_draw_rows`)."""
    width = TILE_INCHES * (k + 1) + 0.5
    return (width - 0.35) / (k + 1.12)


def draw_queries(
    results: Any,
    query_positions: Sequence[int] | np.ndarray | torch.Tensor,
    df_or_paths: pd.DataFrame | Sequence[str],
    *,
    k: int = 5,
    labels: Sequence[Any] | Mapping[Any, Any] | None = None,
    boxes: bool = True,
    metrics: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Figure:
    """A chosen list of queries, one row each (query, then its top-k framed by relevance).

    `metrics` maps a metric name to per-query values (Q,) aligned with the results rows (e.g. the output of
    `metrics_from_results(..., reduce=False)["overall"]`, flattened); each row shows its query's values.
    """
    per_query = None if metrics is None else {n: _per_query(v, results, n) for n, v in metrics.items()}
    fig = _draw_rows(
        results, query_positions, df_or_paths, k=k, labels=labels, boxes=boxes, metrics=per_query
    )
    fig.suptitle(title if title is not None else f"Chosen queries: top {k}")
    return fig


def draw_worst_queries(
    results: Any,
    metric_values: Any,
    df_or_paths: pd.DataFrame | Sequence[str],
    *,
    n: int = 5,
    k: int = 5,
    metric_name: str = "metric",
    higher_is_better: bool = True,
    labels: Sequence[Any] | Mapping[Any, Any] | None = None,
    boxes: bool = True,
) -> Figure:
    """The `n` worst queries by `metric_values` (one per results row; NaN = skipped query), worst first."""
    values = _per_query(metric_values, results, metric_name)
    order = worst_queries(values, n=n, higher_is_better=higher_is_better)
    if len(order) == 0:
        raise ValueError(
            f"no query has a {metric_name} value (all NaN: no query has a relevant gallery item)"
        )
    fig = _draw_rows(
        results, order, df_or_paths, k=k, labels=labels, boxes=boxes, metrics={metric_name: values}
    )
    fig.suptitle(f"The {len(order)} worst queries by {metric_name} (worst first): top {k}")
    return fig


# ----------------------------------------------------------------------------------------------------
# Embeddings, distances, history


def plot_embeddings_2d(
    embeddings: Any,
    labels: Any,
    *,
    title: str | None = None,
    max_legend: int = 20,
    point_size: float | None = None,
) -> Figure:
    """The embeddings projected on their first two principal components (PCA), coloured by label.

    The legend lists the labels when there are at most `max_legend` of them; with more, colours and markers
    still separate up to 100 labels.
    """
    coords, ratio = pca_2d(embeddings)
    labels_arr = np.asarray(_as_numpy(labels, "labels"), dtype=object)
    if len(labels_arr) != len(coords):
        raise ValueError(f"labels has {len(labels_arr)} values for {len(coords)} embeddings")
    names = sorted(pd.unique(labels_arr), key=natural_key)
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    markers = "os^Dv<>ph*"
    size = point_size if point_size is not None else float(np.clip(4000 / len(coords), 4, 40))
    show_legend = len(names) <= max_legend
    fig = Figure(figsize=(7.8 if show_legend else 6.2, 5.6), layout="constrained")
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        sel = labels_arr == name
        color = palette(i % palette.N)
        ax.scatter(
            coords[sel, 0],
            coords[sel, 1],
            s=size,
            color=color,
            marker=markers[(i // palette.N) % 10],
            alpha=0.75,
            linewidths=0,
            label=shorten(name),
        )
    ax.set_xlabel(f"PC1 ({ratio[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.1%} of variance)")
    ax.set_title(title if title is not None else f"PCA of {len(coords)} embeddings, {len(names)} labels")
    ax.grid(alpha=0.3)
    if show_legend:
        ax.legend(
            title="label",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            markerscale=1.5,
            ncols=1 if len(names) <= 12 else 2,
            frameon=False,
        )
    return fig


def plot_distance_histograms(
    results: Any = None,
    *,
    positive: Any = None,
    negative: Any = None,
    bins: int = 50,
    title: str | None = None,
) -> Figure:
    """Histograms (densities) of positive vs negative distances, with their medians.

    Pass a RetrievalResults (uses the distances of its top-k lists: relevant vs not) or the two arrays of
    distances `positive` and `negative` (e.g. from `distance_samples`, which covers all query-gallery pairs).
    """
    if results is not None:
        if positive is not None or negative is not None:
            raise ValueError("pass either results or positive/negative distances, not both")
        dist, relevant = results.distances.cpu(), results.relevant.cpu()
        finite = torch.isfinite(dist) & (results.retrieved.cpu() >= 0)
        positive, negative = dist[finite & relevant].numpy(), dist[finite & ~relevant].numpy()
        default_title = f"Distances among the top {dist.shape[1]} of {dist.shape[0]} queries"
    elif positive is None or negative is None:
        raise ValueError("plot_distance_histograms needs results, or both positive= and negative= distances")
    else:
        default_title = "Query-gallery distances"
    pos = _as_numpy(positive, "positive").astype(np.float64).ravel()
    neg = _as_numpy(negative, "negative").astype(np.float64).ravel()
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if len(pos) + len(neg) == 0:
        raise ValueError("no finite distances to plot")
    both = np.concatenate([pos, neg])
    lo, hi = float(both.min()), float(both.max())
    n_bins = int(np.clip(np.sqrt(len(both)), 10, bins))  # few distances: fewer, fuller bins
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, n_bins + 1)
    fig = Figure(figsize=(6.4, 4.3), layout="constrained")
    ax = fig.add_subplot()
    for values, color, name in (
        (pos, POSITIVE_COLOR, "positive (same label)"),
        (neg, NEGATIVE_COLOR, "negative (other label)"),
    ):
        if len(values) == 0:
            continue
        median = float(np.median(values))
        label = f"{name}: n={len(values):,}, median {median:.3g}"
        ax.hist(values, bins=edges, density=True, color=color, alpha=0.45, label=label)
        ax.axvline(median, color=color, linestyle="--", linewidth=1.5)
    ax.set_xlabel("Euclidean distance (dashed lines: medians)")
    ax.set_ylabel("density")
    ax.set_title(title if title is not None else default_title)
    fig.legend(loc="outside lower center", fontsize=9, frameon=False)  # under the axes, never on the bars
    return fig


def plot_history(
    history: pd.DataFrame, metrics: list[str] | None = None, *, title: str | None = None
) -> Figure:
    """Per-epoch curves: the train loss (and `val_loss`, or `tuned_loss` — the fine-tuning stage of
    `labkit.rerank.fit_combined_reranker` — if present) beside the validation metrics.

    `history` has an `epoch` column (0 = before training), `loss` (NaN at epoch 0) and flattened metric
    columns ("cmc@1", "map@5", "<category>/cmc@1", ...). `metrics` picks columns; by default the overall
    metrics (no category ones).
    """
    if not isinstance(history, pd.DataFrame):
        raise TypeError(
            f"history must be a pandas DataFrame (see labkit.training.read_history), got {type(history)}"
        )
    if "epoch" not in history.columns:
        raise ValueError(f"history has no 'epoch' column; its columns are {list(history.columns)}")
    if metrics is None:
        metrics = [c for c in history.columns if METRIC_COLUMN.match(str(c))]
    else:
        missing = [m for m in metrics if m not in history.columns]
        if missing:
            raise ValueError(f"history has no column {missing}; its columns are {list(history.columns)}")
    kinds = ("loss", "val_loss", "tuned_loss")
    losses = [c for c in kinds if c in history.columns and history[c].notna().any()]
    metrics = [m for m in metrics if history[m].notna().any()]
    if not losses and not metrics:
        raise ValueError("history has no loss values and no metric values to plot")
    history = history.sort_values("epoch")
    panels = int(bool(losses)) + int(bool(metrics))
    fig = Figure(figsize=(5.4 * panels, 3.9), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(1, panels, sharex=True)))
    if losses:
        ax = axes.pop(0)
        for col in losses:
            sel = history[col].notna()
            ax.plot(history.loc[sel, "epoch"], history.loc[sel, col], marker="o", label=col)
        ax.set(xlabel="epoch", ylabel="loss", title="Training loss per epoch")
        _epoch_axis(ax)
        if len(losses) > 1:
            ax.legend(fontsize=9)
    if metrics:
        ax = axes.pop(0)
        for col in metrics:
            sel = history[col].notna()
            ax.plot(history.loc[sel, "epoch"], history.loc[sel, col], marker="o", label=col)
        values = history[metrics].to_numpy(dtype=float)
        if np.nanmin(values) >= 0 and np.nanmax(values) <= 1:
            ax.set_ylim(-0.02, 1.02)
        ax.set(xlabel="epoch (0 = before training)", ylabel="value", title="Validation metrics per epoch")
        _epoch_axis(ax)
        ax.legend(
            fontsize=8,
            ncols=1 if len(metrics) <= 6 else 2,
            loc="upper left" if len(metrics) <= 6 else "center left",
            bbox_to_anchor=None if len(metrics) <= 6 else (1.01, 0.5),
        )
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------------------------------
# Internals


def items_frame(df_or_paths: pd.DataFrame | Sequence[str], n_items: int) -> pd.DataFrame:
    """The items a RetrievalResults indexes as a DataFrame (one row per item, index 0..n_items-1)."""
    if isinstance(df_or_paths, pd.DataFrame):
        df = df_or_paths
        if "path" not in df.columns:
            raise ValueError(f"the DataFrame has no 'path' column; its columns are {list(df.columns)}")
        if len(df) != n_items and "split" in df.columns:
            df = df[df["split"] == "validation"]
        if len(df) != n_items:
            raise ValueError(
                f"the results index {n_items} items but the DataFrame has {len(df_or_paths)} rows "
                f"({len(df)} validation rows); pass the items in embedding order, "
                "e.g. labkit.data.validation_dataset(df).df"
            )
        return df.reset_index(drop=True)
    paths = [os.fspath(p) for p in df_or_paths]
    if len(paths) != n_items:
        raise ValueError(f"the results index {n_items} items but {len(paths)} paths were given")
    return pd.DataFrame({"path": paths})


def display_labels(
    items: pd.DataFrame, results: Any, labels: Sequence[Any] | Mapping[Any, Any] | None = None
) -> list[str]:
    """One display label per item: `labels` (per item, or code -> name), else the class name (the
    'class_name' column, where it has a value), else the 'label' column, else the label codes."""
    codes = results.labels.tolist()
    if labels is None:
        shown = [str(v) for v in (items["label"].tolist() if "label" in items.columns else codes)]
        if "class_name" in items.columns:
            names = items["class_name"].tolist()
            shown = [
                s if n is None or pd.isna(n) or str(n) == "" else str(n)
                for s, n in zip(shown, names, strict=True)
            ]
        return shown
    if isinstance(labels, Mapping):
        return [str(labels.get(c, c)) for c in codes]
    labels = list(labels)
    if len(labels) != len(codes):
        raise ValueError(f"labels has {len(labels)} values for {len(codes)} items")
    return [str(v) for v in labels]


def _draw_rows(
    results: Any,
    query_positions: Any,
    df_or_paths: pd.DataFrame | Sequence[str],
    *,
    k: int,
    labels: Any,
    boxes: bool,
    metrics: Mapping[str, Any] | None,
    query_titles: Mapping[int, str] | None = None,
) -> Figure:
    positions = _check_positions(results, query_positions)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    items = items_frame(df_or_paths, int(results.labels.numel()))
    names = display_labels(items, results, labels)
    metric_lines = len(metrics) if metrics else 0
    width = TILE_INCHES * (k + 1) + 0.5
    image_side = tile_inches(k)  # the width ratios below, less the margins
    caption_lines = 1 + max(1, metric_lines)  # label, then the distance or the query's metrics
    row_height = image_side + 0.3 + 0.15 * caption_lines + 0.2
    fig = Figure(figsize=(width, row_height * len(positions) + 0.4), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.05, h_pad=0.05, wspace=0.02, hspace=0.02)
    grid = fig.add_gridspec(len(positions), k + 2, width_ratios=[1.0, 0.12] + [1.0] * k)
    retrieved, distances = results.retrieved.cpu(), results.distances.cpu()
    relevant, query_ids = results.relevant.cpu(), results.query_ids.cpu()
    for row, pos in enumerate(positions.tolist()):
        query_item = int(query_ids[pos])
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(_image(items.iloc[query_item], boxes))
        _frame(ax, QUERY_COLOR)
        query_title = (query_titles or {}).get(pos, f"query {pos}")
        ax.set_title(query_title, fontsize=9, color=QUERY_COLOR, fontweight="bold")
        lines = [shorten(names[query_item])]
        for name, values in (metrics or {}).items():
            value = values.get(pos, math.nan) if isinstance(values, Mapping) else float(values[pos])
            lines.append(shorten(f"{name} {value:.2f}"))
        ax.set_xlabel("\n".join(lines), fontsize=8)
        ax.set_gid(f"query:{pos}")
        fig.add_subplot(grid[row, 1]).set_axis_off()
        for col in range(k):
            ax = fig.add_subplot(grid[row, col + 2])
            item = int(retrieved[pos, col]) if col < retrieved.shape[1] else -1
            if item < 0:
                ax.set_axis_off()  # fewer gallery items than k: leave the cell empty
                continue
            is_rel = bool(relevant[pos, col])
            ax.imshow(_image(items.iloc[item], boxes))
            color = RELEVANT_COLOR if is_rel else IRRELEVANT_COLOR
            _frame(ax, color)
            ax.set_title(f"#{col + 1} {CHECK if is_rel else CROSS}", fontsize=9, color=color)
            ax.set_xlabel(f"{shorten(names[item])}\nd={float(distances[pos, col]):.3f}", fontsize=8)
            ax.set_gid(f"{'relevant' if is_rel else 'irrelevant'}:{pos}:{col}")
    return fig


def _check_positions(results: Any, query_positions: Any) -> np.ndarray:
    positions = np.asarray(_as_numpy(query_positions, "query_positions")).reshape(-1)
    n_queries = int(results.query_ids.numel())
    if len(positions) == 0:
        raise ValueError("no query positions given")
    if not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"query positions must be integers (rows of the results), got {positions.dtype}")
    bad = positions[(positions < 0) | (positions >= n_queries)]
    if len(bad):
        raise ValueError(
            f"query position {int(bad[0])} is out of range: the results have {n_queries} queries"
        )
    return positions.astype(np.int64)


def _per_query(values: Any, results: Any, name: str) -> np.ndarray:
    arr = _as_numpy(values, name).astype(np.float64).reshape(-1)
    n_queries = int(results.query_ids.numel())
    if len(arr) != n_queries:
        raise ValueError(f"{name} has {len(arr)} values but the results have {n_queries} queries")
    return arr


def _image(row: pd.Series, boxes: bool) -> np.ndarray:
    box = None
    if boxes and all(c in row.index for c in _BOX):
        values = [row[c] for c in _BOX]
        if all(v is not None and not pd.isna(v) for v in values):
            box = tuple(int(round(float(v))) for v in values)
    path = os.fspath(row["path"])
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = None  # load_image raises the clear error
    return _load(path, box, mtime)


@lru_cache(maxsize=2048)
def _load(path: str, box: tuple[int, int, int, int] | None, mtime: int | None) -> np.ndarray:
    from labkit.data import load_image

    image = np.asarray(load_image(path, box=box))
    image.setflags(write=False)
    return image


def _frame(ax: Axes, color: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(FRAME_WIDTH)


def _epoch_axis(ax: Axes) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _as_numpy(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    if isinstance(values, (pd.Series, pd.Index)):
        return values.to_numpy()
    try:
        return np.asarray(values)
    except Exception as error:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be array-like, got {type(values).__name__}") from error
