"""An ipywidgets browser over retrieval results that also works without any widget front end.

`ResultBrowser` keeps its state (order, category filter, k, selected query) in plain Python and changes it
only through methods (`set_order`, `set_category`, `set_k`, `select`, `select_query`, `next`, `previous`),
so scripts and tests drive it exactly as the widgets do. `display()` shows live widgets when a widget front
end is attached and otherwise draws the current view as a static figure.

How the front end is detected (`widget_frontend_available`), first rule that applies wins:

1. environment variables: `LABKIT_NO_WIDGETS=1` forces the static figure; `LABKIT_WIDGETS` set to
   `1`/`true`/`yes`/`on` forces widgets, to `0`/`false`/`no`/`off`/`static` the static figure;
2. ipywidgets cannot be imported -> static;
3. not inside an IPython kernel (plain Python, terminal IPython) -> static;
4. the running cell was sent without stdin (papermill, nbclient, `jupyter nbconvert --execute` send
   `allow_stdin=False`; JupyterLab, Notebook, VS Code and Colab allow it) -> static;
5. otherwise -> widgets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from labkit import viz

WIDGETS_ENV = "LABKIT_WIDGETS"
NO_WIDGETS_ENV = "LABKIT_NO_WIDGETS"  # set by the test suite's conftest
_ON = {"1", "true", "yes", "on", "widgets"}
_OFF = {"0", "false", "no", "off", "static"}
ORDERS = ("worst", "index", "random")
_DROPDOWN_MAX = 1000  # queries listed in the dropdown (the slider reaches all of them)


def widget_frontend_available() -> bool:
    """Whether live ipywidgets can be shown here (see the module docstring for the rules)."""
    if os.environ.get(NO_WIDGETS_ENV, "").strip().lower() in _ON:
        return False
    forced = os.environ.get(WIDGETS_ENV, "").strip().lower()
    if forced in _ON:
        return True
    if forced in _OFF:
        return False
    if forced:
        raise ValueError(f"{WIDGETS_ENV}={forced!r}: use one of {sorted(_ON)} or {sorted(_OFF)}")
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return False
    return bool(getattr(kernel, "_allow_stdin", False))


class ResultBrowser:
    """Browse the queries of a RetrievalResults: each query beside its top-k, framed by relevance.

    `df` holds the items in embedding order (see `labkit.viz`); `metrics_per_query` maps metric names to
    per-query values aligned with the results rows (NaN for skipped queries), e.g. `{"map@5": tensor}`.
    `categories` gives one category per item (default: the DataFrame's `category` column, if any).
    `k` (capped at the k the results were retrieved with) is the number of gallery images shown.

    Order modes: "worst" (by `metric`, lowest first; NaN last; ties by position), "index" (results order),
    "random" (a permutation seeded by `seed`). Every state change resets the view to the first query of the
    new order, except `set_k`, which keeps the query. Setters return the query now shown (a results row).
    """

    def __init__(
        self,
        results: Any,
        df: pd.DataFrame | Sequence[str],
        metrics_per_query: Mapping[str, Any] | None = None,
        *,
        categories: Sequence[Any] | None = None,
        k: int = 5,
        order: str = "worst",
        metric: str | None = None,
        higher_is_better: bool = True,
        seed: int = 0,
        labels: Sequence[Any] | Mapping[Any, Any] | None = None,
        boxes: bool = True,
    ) -> None:
        self.results = results
        n_items = int(results.labels.numel())
        self.items = viz.items_frame(df, n_items)
        self._query_ids = results.query_ids.cpu().numpy().astype(np.int64)
        self.metrics: dict[str, np.ndarray] = {
            str(name): viz._per_query(values, results, str(name))
            for name, values in (metrics_per_query or {}).items()
        }
        self.higher_is_better = higher_is_better
        self.labels = viz.display_labels(self.items, results, labels)
        self.boxes = boxes
        self._query_categories = self._categories_of_queries(categories, n_items)
        self._max_k = int(results.retrieved.shape[1])
        self._k = self._checked_k(min(k, self._max_k) if isinstance(k, (int, np.integer)) else k)
        self._seed = seed
        self._mode, self._metric = self._checked_order(order, metric)
        self._category: str | None = None
        self._order = self._compute_order()
        self._index = 0
        self._ui: dict[str, Any] | None = None
        self._syncing = False

    # -- state ------------------------------------------------------------------------------------

    @property
    def order(self) -> np.ndarray:
        """Query positions (results rows) that can be browsed now, in the current order."""
        return self._order.copy()

    @property
    def order_mode(self) -> str:
        return self._mode

    @property
    def order_metric(self) -> str | None:
        """The metric the "worst" order sorts by (None for the other orders)."""
        return self._metric if self._mode == "worst" else None

    @property
    def category(self) -> str | None:
        """The category filter (None: all queries)."""
        return self._category

    @property
    def categories(self) -> list[str]:
        """Categories the queries can be filtered by (empty when the items have none)."""
        return sorted({c for c in self._query_categories if c})

    @property
    def k(self) -> int:
        return self._k

    @property
    def index(self) -> int:
        """Position of the shown query within `order` (what the slider shows)."""
        return self._index

    @property
    def current_query(self) -> int:
        """The shown query as a results row (0..Q-1)."""
        return int(self._order[self._index])

    @property
    def current_item(self) -> int:
        """The shown query as an item id (row of the embeddings / DataFrame)."""
        return int(self._query_ids[self.current_query])

    @property
    def current_metrics(self) -> dict[str, float]:
        """The shown query's metric values (NaN when it was skipped)."""
        return {name: float(values[self.current_query]) for name, values in self.metrics.items()}

    def set_order(self, mode: str, metric: str | None = None, *, seed: int | None = None) -> int:
        """Order by "worst" (by `metric`, default the current or first metric), "index" or "random"."""
        self._mode, self._metric = self._checked_order(mode, metric)
        if seed is not None:
            self._seed = seed
        return self._reorder()

    def set_category(self, category: str | None) -> int:
        """Show only queries of `category` (None: all)."""
        if category is not None and category not in self.categories:
            raise ValueError(
                f"unknown category {category!r}; the queries have {self.categories or 'no categories'} "
                "(None shows all)"
            )
        self._category = category
        return self._reorder()

    def set_k(self, k: int) -> int:
        """Show the top `k` gallery items (1 .. the k the results were retrieved with)."""
        self._k = self._checked_k(k)
        self._changed()
        return self.current_query

    def select(self, index: int) -> int:
        """Show the query at `index` of the current order (0 = first, e.g. the worst)."""
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self._order):
            raise IndexError(f"index {index!r} is outside the current order of {len(self._order)} queries")
        self._index = int(index)
        self._changed()
        return self.current_query

    def select_query(self, query_pos: int) -> int:
        """Show the query of results row `query_pos` (it must pass the category filter)."""
        hits = np.flatnonzero(self._order == int(query_pos))
        if len(hits) == 0:
            raise ValueError(
                f"query {query_pos} is not in the current order ({len(self._order)} queries, category "
                f"{self._category!r}); call set_category(None) to browse all"
            )
        return self.select(int(hits[0]))

    def next(self) -> int:
        """Show the next query of the order (stays on the last one)."""
        return self.select(min(self._index + 1, len(self._order) - 1))

    def previous(self) -> int:
        """Show the previous query of the order (stays on the first one)."""
        return self.select(max(self._index - 1, 0))

    # -- views ------------------------------------------------------------------------------------

    def figure(self) -> viz.Figure:
        """The current view as a static figure: the query, its top-k and its metrics."""
        query = self.current_query
        info = f"query {query} (item {self.current_item}), {self._index + 1} of {len(self._order)}"
        order = f"worst by {self._metric}" if self._mode == "worst" else self._mode
        where = f", category {self._category}" if self._category is not None else ""
        return viz.draw_query(
            self.results,
            query,
            self.items,
            k=self._k,
            labels=self.labels,
            boxes=self.boxes,
            metrics=self.current_metrics,
            title=f"{info} [{order}{where}]",
        )

    def metrics_frame(self) -> pd.DataFrame:
        """The current query's facts and metrics as a one-column table."""
        query = self.current_query
        facts = {
            "query (results row)": query,
            "item": self.current_item,
            "label": self.labels[self.current_item],
            "category": self._query_categories[query] or "-",
            "relevant in gallery": int(self.results.n_relevant[query]),
        }
        facts.update({name: round(value, 4) for name, value in self.current_metrics.items()})
        return pd.DataFrame({"value": [str(v) for v in facts.values()]}, index=list(facts))

    def display(self) -> Any:
        """Show the browser: live widgets with a front end, else the static current view.

        Returns the widget box, or the static figure (also displayed when running inside IPython).
        """
        if widget_frontend_available():
            from IPython.display import display

            display(self.widget)
            return self.widget
        fig = self.figure()
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:  # pragma: no cover - IPython comes with ipywidgets
            return fig
        if get_ipython() is not None:
            display(fig)
        return fig

    show = display

    def _ipython_display_(self) -> None:
        self.display()

    @property
    def widget(self) -> Any:
        """The ipywidgets box (built on first use)."""
        if self._ui is None:
            self._ui = self._build_ui()
            self._sync_ui()
        return self._ui["box"]

    # -- internals --------------------------------------------------------------------------------

    def _categories_of_queries(self, categories: Sequence[Any] | None, n_items: int) -> np.ndarray:
        if categories is None:
            if "category" not in self.items.columns:
                return np.full(len(self._query_ids), "", dtype=object)
            categories = self.items["category"].tolist()
        values = (
            list(viz._as_numpy(categories, "categories")) if not isinstance(categories, list) else categories
        )
        if len(values) != n_items:
            raise ValueError(f"categories has {len(values)} values for {n_items} items (one per item)")
        per_item = np.array(["" if v is None or pd.isna(v) else str(v) for v in values], dtype=object)
        return per_item[self._query_ids]

    def _checked_k(self, k: int) -> int:
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= self._max_k:
            raise ValueError(f"k must be an integer from 1 to {self._max_k} (the results' k), got {k!r}")
        return int(k)

    def _checked_order(self, mode: str, metric: str | None) -> tuple[str, str | None]:
        if mode not in ORDERS:
            raise ValueError(f"order {mode!r} is not one of {ORDERS}")
        if metric is not None and metric not in self.metrics:
            raise ValueError(f"unknown metric {metric!r}; the browser has {sorted(self.metrics)}")
        metric = metric or getattr(self, "_metric", None) or next(iter(self.metrics), None)
        if mode == "worst" and metric is None:
            raise ValueError("ordering by the worst queries needs metrics_per_query, e.g. {'map@5': values}")
        return mode, metric  # a metric given with another order is remembered for a later "worst"

    def _compute_order(self) -> np.ndarray:
        n = len(self._query_ids)
        if self._mode == "worst":
            order = viz.worst_queries(
                self.metrics[self._metric], higher_is_better=self.higher_is_better, skip_nan=False
            )
        elif self._mode == "random":
            order = np.random.default_rng(self._seed).permutation(n)
        else:
            order = np.arange(n)
        if self._category is not None:
            order = order[self._query_categories[order] == self._category]
        return order.astype(np.int64)

    def _reorder(self) -> int:
        self._order = self._compute_order()
        self._index = 0
        self._changed()
        return self.current_query

    def _changed(self) -> None:
        if self._ui is not None:
            self._sync_ui()

    def _query_option(self, index: int) -> str:
        query = int(self._order[index])
        text = f"{index + 1}. query {query}: {viz.shorten(self.labels[self._query_ids[query]], 24)}"
        if self._mode == "worst":
            text += f" ({self._metric} {self.metrics[self._metric][query]:.2f})"
        return text

    def _build_ui(self) -> dict[str, Any]:
        import ipywidgets as w

        order_options = [(f"worst by {name}", ("worst", name)) for name in self.metrics]
        order_options += [("index", ("index", None)), ("random", ("random", None))]
        ui: dict[str, Any] = {
            "order": w.Dropdown(options=order_options, description="order"),
            "category": w.Dropdown(
                options=[("all", None)] + [(c, c) for c in self.categories],
                description="category",
                disabled=not self.categories,
            ),
            "k": w.IntSlider(min=1, max=self._max_k, description="k"),
            "slider": w.IntSlider(min=0, max=0, description="rank", continuous_update=False),
            "query": w.Dropdown(description="query", layout=w.Layout(width="420px")),
            "previous": w.Button(description="\u25c0 previous"),
            "next": w.Button(description="next \u25b6"),
            "image": w.Image(format="png", layout=w.Layout(max_width="100%")),
            "facts": w.HTML(),
        }
        ui["order"].observe(lambda c: self._from_ui(lambda: self.set_order(*c["new"])), names="value")
        ui["category"].observe(lambda c: self._from_ui(lambda: self.set_category(c["new"])), names="value")
        ui["k"].observe(lambda c: self._from_ui(lambda: self.set_k(c["new"])), names="value")
        ui["slider"].observe(lambda c: self._from_ui(lambda: self.select(c["new"])), names="value")
        ui["query"].observe(
            lambda c: c["new"] is not None and self._from_ui(lambda: self.select(c["new"])), names="value"
        )
        ui["previous"].on_click(lambda _: self.previous())
        ui["next"].on_click(lambda _: self.next())
        ui["box"] = w.VBox(
            [
                w.HBox([ui["order"], ui["category"], ui["k"]]),
                w.HBox([ui["previous"], ui["slider"], ui["next"], ui["query"]]),
                ui["facts"],
                ui["image"],
            ]
        )
        return ui

    def _from_ui(self, change: Any) -> None:
        if not self._syncing:
            change()

    def _sync_ui(self) -> None:
        ui = self._ui
        assert ui is not None
        self._syncing = True
        try:
            ui["order"].value = (self._mode, self.order_metric)
            ui["category"].value = self._category
            ui["k"].value = self._k
            ui["slider"].max = max(len(self._order) - 1, 0)
            ui["slider"].value = self._index
            shown = range(min(len(self._order), _DROPDOWN_MAX))
            options = [(self._query_option(i), i) for i in shown]
            if ui["query"].options != tuple(options):
                ui["query"].options = options
            ui["query"].value = self._index if self._index < len(options) else None
            ui["image"].value = viz.figure_png(self.figure())
            ui["facts"].value = self.metrics_frame().to_html(header=False, escape=True)
        finally:
            self._syncing = False
