"""Interactive panels (ipywidgets) that also work without any widget front end.

- `ResultBrowser`: the queries of a RetrievalResults beside their top-k (order, category filter, k, query);
- `SearchPanel`: live search in an embedding store (stored item, uploaded image or path; filters; k);
- `EmbeddingMap`: a 2D map of the embeddings (bqplot scatter; PCA, t-SNE, UMAP) to click through.

Each keeps its state in plain Python and changes it only through methods (e.g. `set_order`, `set_k`,
`select`, `next`), so scripts and tests drive it exactly as the widgets do; the widgets only call those
methods and show the result. Positions shown to people count from 1 (rank slider, dropdown, titles).
`display()` shows live widgets when a widget front end is attached, with a PNG snapshot of the view in the
same output for viewers without live widgets, and otherwise draws the current view as static figure(s).
Pictures go to the browser at their own pixel size (`tile_px` per image), in a box that scrolls sideways.

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
ALL = "all"  # the dropdown entry that means "no filter"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"


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


def show_panel(panel: Any) -> Any:
    """Display a panel (`ResultBrowser`, `SearchPanel`, `EmbeddingMap`): live widgets with a front end,
    else its static figure(s).

    The live display carries a PNG snapshot of the view at display time next to the widget: front ends
    without the widget's live model (GitHub, nbviewer, an exported HTML) show the snapshot instead. Returns
    the widget box, or the static figure (displayed too when running inside IPython).
    """
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return panel.figure()
    if widget_frontend_available():
        display(panel.mimebundle(), raw=True)
        return panel.widget
    figures = panel.static_figures() if hasattr(panel, "static_figures") else [panel.figure()]
    if get_ipython() is not None:
        for fig in figures:
            display(fig)
    return figures[0]


def _bundle_with_snapshot(box: Any, png: bytes, what: str) -> dict[str, Any]:
    import base64

    bundle = dict(box._repr_mimebundle_())
    bundle["image/png"] = base64.b64encode(png).decode("ascii")
    bundle["text/plain"] = f"labkit {what} (live widget; a PNG snapshot of its view at display time)"
    return bundle


def _checked_tile_px(tile_px: int) -> int:
    if isinstance(tile_px, bool) or not isinstance(tile_px, (int, np.integer)) or not 40 <= tile_px <= 600:
        raise ValueError(f"tile_px must be an integer from 40 to 600 (pixels per image), got {tile_px!r}")
    return int(tile_px)


def _figure_png_at_tile(fig: Any, k: int, tile_px: int) -> tuple[bytes, int]:
    """Render a retrieval grid so that each image is `tile_px` pixels wide; returns (PNG, width px)."""
    png = viz.figure_png(fig, dpi=tile_px / viz.tile_inches(k), compress_level=1)
    return png, int.from_bytes(png[16:20], "big")  # the width field of the PNG header (IHDR)


def _show_png(image: Any, png: bytes, width_px: int) -> None:
    """Put PNG bytes into an ipywidgets Image at their own width: never stretched to the output width."""
    image.value = png
    image.width = str(width_px)
    image.layout.width = f"{width_px}px"
    image.layout.min_width = f"{width_px}px"
    image.layout.max_width = "none"


def _scroll_box(child: Any) -> Any:
    """A box that scrolls sideways when its child is wider than the output (large k): never shrinks it."""
    import ipywidgets as w

    return w.Box([child], layout=w.Layout(overflow="auto", max_width="100%", width="100%"))


class _Panel:
    """What every panel shares: `display()` (live widgets with a front end, else the static view; see
    `show_panel`) and the ipywidgets box built on first use. Subclasses give `figure`, `mimebundle`,
    `_build_ui` (a dict holding the "box") and `_sync_ui`."""

    _ui: dict[str, Any] | None = None
    _syncing = False  # True while `_sync_ui` writes state into the controls: their callbacks then do nothing

    def _from_ui(self, change: Any) -> None:
        """Run a control's callback unless the change came from `_sync_ui` itself."""
        if not self._syncing:
            change()

    def display(self) -> Any:
        """Show the panel: live widgets with a front end, else the static current view.

        Returns the widget box, or the static figure (also displayed when running inside IPython).
        """
        return show_panel(self)

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


class ResultBrowser(_Panel):
    """Browse the queries of a RetrievalResults: each query beside its top-k, framed by relevance.

    `df` holds the items in embedding order (see `labkit.viz`); `metrics_per_query` maps metric names to
    per-query values aligned with the results rows (NaN for skipped queries), e.g. `{"map@5": tensor}`.
    `categories` gives one category per item (default: the DataFrame's `category` column, if any).
    `k` (capped at the k the results were retrieved with) is the number of gallery images shown; `tile_px`
    (about the pixels per image) sets the picture's size, which grows with k and is never stretched.

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
        tile_px: int = 140,
    ) -> None:
        self.results = results
        self.tile_px = _checked_tile_px(tile_px)
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
        """Position of the shown query within `order`, from 0 (the rank shown is `index + 1`)."""
        return self._index

    @property
    def rank(self) -> int:
        """The shown query's rank in the current order, from 1: what the slider, dropdown and title show."""
        return self._index + 1

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
        info = f"query {query} (item {self.current_item}), {self.rank} of {len(self._order)}"
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

    def mimebundle(self) -> dict[str, Any]:
        """The live widget's display data plus a PNG snapshot of the current view (see `show_panel`)."""
        return _bundle_with_snapshot(self.widget, self._png()[0], "result browser")

    def _png(self) -> tuple[bytes, int]:
        """The current view as PNG bytes and its width in pixels (tiles of `tile_px`, never scaled)."""
        return _figure_png_at_tile(self.figure(), self._k, self.tile_px)

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
            # option values are positions, never None: None means "nothing selected" to a Dropdown
            "category": w.Dropdown(
                options=[(ALL, 0)] + [(c, i + 1) for i, c in enumerate(self.categories)],
                description="category",
                disabled=not self.categories,
            ),
            "k": w.IntSlider(min=1, max=self._max_k, description="k"),
            "slider": w.IntSlider(min=1, max=1, description="rank", continuous_update=False),
            "query": w.Dropdown(description="query", layout=w.Layout(width="420px")),
            "previous": w.Button(description="\u25c0 previous"),
            "next": w.Button(description="next \u25b6"),
            "image": w.Image(format="png"),
            "facts": w.HTML(),
        }
        categories = [None, *self.categories]
        ui["order"].observe(lambda c: self._from_ui(lambda: self.set_order(*c["new"])), names="value")
        ui["category"].observe(
            lambda c: c["new"] is not None and self._from_ui(lambda: self.set_category(categories[c["new"]])),
            names="value",
        )
        ui["k"].observe(lambda c: self._from_ui(lambda: self.set_k(c["new"])), names="value")
        ui["slider"].observe(lambda c: self._from_ui(lambda: self.select(c["new"] - 1)), names="value")
        ui["query"].observe(
            lambda c: c["new"] is not None and self._from_ui(lambda: self.select(c["new"])), names="value"
        )
        ui["previous"].on_click(lambda _: self.previous())
        ui["next"].on_click(lambda _: self.next())
        ui["box"] = w.VBox(
            [
                w.HBox([ui["order"], ui["category"], ui["k"]]),
                w.HBox([ui["previous"], ui["slider"], ui["next"], ui["query"]]),
                w.HBox([_scroll_box(ui["image"]), ui["facts"]]),
            ]
        )
        return ui

    def _sync_ui(self) -> None:
        ui = self._ui
        assert ui is not None
        self._syncing = True
        try:
            ui["order"].value = (self._mode, self.order_metric)
            ui["category"].value = 0 if self._category is None else self.categories.index(self._category) + 1
            ui["k"].value = self._k
            ui["slider"].max = max(len(self._order), 1)
            ui["slider"].value = self.rank
            key = (self._mode, self._metric, self._category, self._seed)
            if ui.get("options_key") != key:  # the options change with the order only, not with a step
                shown = range(min(len(self._order), _DROPDOWN_MAX))
                ui["query"].options = [(self._query_option(i), i) for i in shown]
                ui["options_key"] = key
            options = ui["query"].options
            ui["query"].value = self._index if self._index < len(options) else None
            _show_png(ui["image"], *self._png())
            ui["facts"].value = self.metrics_frame().to_html(header=False, escape=True)
        finally:
            self._syncing = False


# ----------------------------------------------------------------------------------------------------
# Live search over an embedding store


class SearchPanel(_Panel):
    """Search an embedding store interactively: a stored item, an uploaded image or an image path as query.

    Uses only the store's public API (`EmbeddingStore.load`, `search_stored`, `search_images`,
    `run_store.as_retrieval_results`): the same calls a script makes. `db` is an open `EmbeddingStore` or the
    path of a store file (then the panel opens its own read-only connection, so closing the notebook's
    connection does not stop it). `extractor` (the model that made the store) is needed for images that are
    not stored; uploaded images are written to `upload_dir` (named by their content, never overwriting).

    State: `query` (kind and path), `k`, `filters` (split / label / category; None = any) and `results`
    (the store's DataFrame of the last search), changed only by `set_stored_query`, `set_image_query`,
    `upload`, `set_k` and `set_filters`. A change that leaves no result raises the store's error and keeps
    the previous state.
    """

    def __init__(
        self,
        db: Any,
        model: int | str,
        *,
        extractor: Any = None,
        k: int = 5,
        upload_dir: str | os.PathLike | None = None,
        device: str = "cpu",
        tile_px: int = 140,
        max_k: int = 20,
    ) -> None:
        from labkit import store

        self._owns_db = not isinstance(db, store.EmbeddingStore)
        self.db = store.EmbeddingStore(db, create=False, read_only=True) if self._owns_db else db
        self.model = self.db.model(model).id
        self.extractor = extractor
        self.device = device
        self.upload_dir = None if upload_dir is None else os.fspath(upload_dir)
        self.tile_px = _checked_tile_px(tile_px)
        _, self.items = self.db.load(self.model)
        if len(self.items) == 0:
            raise ValueError(f"{self.db.path} holds no items of model {self.model}: fill the store first")
        self.max_k = max(1, min(int(max_k), len(self.items) - 1 or 1))
        self._names = _display_names(self.items)
        self._k = self._checked_k(min(k, self.max_k) if isinstance(k, (int, np.integer)) else k)
        self._filters: dict[str, Any] = {"split": None, "label": None, "category": None}
        self._query: tuple[str, str] = ("stored", str(self.items["path"].iloc[0]))
        self._results: pd.DataFrame | None = None
        self._ui: dict[str, Any] | None = None
        self._syncing = False
        self._message = ""
        self._search()

    # -- state ------------------------------------------------------------------------------------

    @property
    def k(self) -> int:
        return self._k

    @property
    def query(self) -> tuple[str, str]:
        """("stored", path of a stored item) or ("image", path of an image file)."""
        return self._query

    @property
    def filters(self) -> dict[str, Any]:
        return dict(self._filters)

    @property
    def results(self) -> pd.DataFrame:
        """The store's answer to the current query: query, rank, path, label, category, split, distance."""
        assert self._results is not None
        return self._results.copy()

    def options(self, column: str) -> list[Any]:
        """The values a filter can take: those the stored items have in `column` (split, label, category)."""
        if column not in self._filters:
            raise ValueError(f"unknown filter {column!r}; use one of {sorted(self._filters)}")
        values = [v for v in self.items[column].tolist() if v is not None and not pd.isna(v)]
        return sorted(set(values), key=viz.natural_key)

    @property
    def stored_paths(self) -> list[str]:
        return [str(p) for p in self.items["path"]]

    def set_stored_query(self, path: str | os.PathLike) -> pd.DataFrame:
        """Search with a stored item (by path); it is left out of its own results."""
        path = os.fspath(path)
        if path not in set(self.stored_paths):
            raise ValueError(f"{path} is not a stored item of model {self.model}; pick one of `stored_paths`")
        return self._change(query=("stored", path))

    def set_image_query(self, image: Any) -> pd.DataFrame:
        """Search with an image that need not be stored: a path, or a PIL image (saved to `upload_dir`)."""
        if self.extractor is None:
            raise ValueError("searching with a new image needs the store's extractor: pass extractor=...")
        if isinstance(image, (str, os.PathLike)):
            path = os.path.abspath(os.path.expanduser(os.fspath(image)))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no image file at {path}: give the path of an image file")
        else:
            path = self._save_upload(image, "image.png")
        return self._change(query=("image", path))

    def upload(self, name: str, content: bytes) -> pd.DataFrame:
        """Search with uploaded file content (what a FileUpload widget receives)."""
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(bytes(content)))
            image.load()
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"uploaded file {name!r} is not an image PIL can read: {error}") from error
        return self.set_image_query(image.convert("RGB"))

    def set_k(self, k: int) -> pd.DataFrame:
        """Show the top `k` results (1 .. `max_k`)."""
        return self._change(k=self._checked_k(k))

    def set_filters(self, **filters: Any) -> pd.DataFrame:
        """Restrict the results: `split=`, `label=`, `category=` (a value from `options`, or None = any)."""
        new = dict(self._filters)
        for column, value in filters.items():
            if column not in self._filters:
                raise ValueError(f"unknown filter {column!r}; use one of {sorted(self._filters)}")
            if value is not None and value not in self.options(column):
                raise ValueError(
                    f"no stored item has {column} {value!r}; choose one of {self.options(column)} or None"
                )
            new[column] = value
        return self._change(filters=new)

    # -- views ------------------------------------------------------------------------------------

    def figure(self) -> viz.Figure:
        """The query (blue) and its top-k, green when a result has the query's label."""
        from labkit import run_store

        results = self.results
        kind, path = self._query
        label = self._query_label()
        retrieval, items = run_store.as_retrieval_results(results, query_paths=[path], query_labels=[label])
        names = [self._names.get(p, lab) for p, lab in zip(items["path"], items["label"], strict=True)]
        if label is None:
            names[0] = "new image"
        where = ", ".join(f"{c} {v}" for c, v in self._filters.items() if v is not None)
        title = (
            f"{'stored item' if kind == 'stored' else 'new image'} {os.path.basename(path)}: top {self._k}"
        )
        fig = viz.draw_query(retrieval, 0, items, k=self._k, labels=names, title="", query_title="query")
        fig.suptitle(viz.wrap_title(title + (f" ({where})" if where else ""), fig), fontsize=10)
        return fig

    def results_frame(self) -> pd.DataFrame:
        """The results as a table: rank, label (class name where known), category, split, distance, file."""
        results = self.results
        hits = zip(results["path"], results["label"], strict=True)
        return pd.DataFrame(
            {
                "rank": results["rank"],
                "label": [self._names.get(p, lab) for p, lab in hits],
                "category": results["category"],
                "split": results["split"],
                "distance": results["distance"].round(4),
                "file": [os.path.basename(str(p)) for p in results["path"]],
            }
        )

    def mimebundle(self) -> dict[str, Any]:
        return _bundle_with_snapshot(self.widget, self._png()[0], "search panel")

    def close(self) -> None:
        """Close the store connection the panel opened itself (not one it was given)."""
        if self._owns_db:
            self.db.close()

    # -- internals --------------------------------------------------------------------------------

    def _checked_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.max_k:
            raise ValueError(f"k must be an integer from 1 to {self.max_k}, got {k!r}")
        return int(k)

    def _query_label(self) -> Any:
        kind, path = self._query
        if kind != "stored":
            return None
        return self.items.loc[self.items["path"] == path, "label"].iloc[0]

    def _save_upload(self, image: Any, name: str) -> str:
        import hashlib
        import io
        import tempfile

        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        folder = self.upload_dir or tempfile.gettempdir()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"upload_{hashlib.sha1(data).hexdigest()[:16]}.png")
        if not os.path.exists(path):  # same content, same name: an existing file is never replaced
            with open(path, "wb") as f:
                f.write(data)
        return path

    def _change(self, **state: Any) -> pd.DataFrame:
        saved = (self._query, self._k, dict(self._filters), self._results)
        self._query = state.get("query", self._query)
        self._k = state.get("k", self._k)
        self._filters = state.get("filters", self._filters)
        try:
            self._search()
        except Exception:
            self._query, self._k, self._filters, self._results = saved
            raise
        self._changed()
        return self.results

    def _search(self) -> None:
        kind, path = self._query
        filters = {c: v for c, v in self._filters.items() if v is not None}
        if kind == "stored":
            self._results = self.db.search_stored(path, model=self.model, k=self._k, **filters)
        else:
            self._results = self.db.search_images(
                [path], self.extractor, model=self.model, k=self._k, device=self.device, **filters
            )
        if len(self._results) == 0:
            raise ValueError(
                f"no stored item but the query itself matches {filters}: widen the filters (None = any)"
            )

    def _changed(self) -> None:
        if self._ui is not None:
            self._sync_ui()

    def _png(self) -> tuple[bytes, int]:
        return _figure_png_at_tile(self.figure(), self._k, self.tile_px)

    def _build_ui(self) -> dict[str, Any]:
        import ipywidgets as w

        paths = self.stored_paths[:_DROPDOWN_MAX]
        stored_options = [
            (f"{i + 1}. {viz.shorten(self._names.get(p, ''), 24)} {os.path.basename(p)}", i)
            for i, p in enumerate(paths)
        ]
        ui: dict[str, Any] = {
            "stored": w.Dropdown(
                options=stored_options, description="stored", layout=w.Layout(width="420px")
            ),
            "upload": w.FileUpload(accept="image/*", multiple=False, description="upload image"),
            "path": w.Text(
                placeholder="/path/to/image.png", description="path", layout=w.Layout(width="420px")
            ),
            "go": w.Button(description="search path"),
            "k": w.IntSlider(min=1, max=self.max_k, description="k"),
            "message": w.HTML(),
            "image": w.Image(format="png"),
            "table": w.HTML(),
        }
        for column in self._filters:
            values = self.options(column)
            ui[column] = w.Dropdown(
                options=[(ALL, 0)] + [(str(v), i + 1) for i, v in enumerate(values)],
                description=column,
                layout=w.Layout(width="220px"),
            )
            ui[column].observe(self._filter_observer(column, [None, *values]), names="value")
        if self.extractor is None:
            for name in ("upload", "path", "go"):
                ui[name].disabled = True
        ui["stored"].observe(
            lambda c: c["new"] is not None and self._from_ui(lambda: self.set_stored_query(paths[c["new"]])),
            names="value",
        )
        ui["upload"].observe(lambda c: self._from_ui(lambda: self._uploaded(c["new"])), names="value")
        ui["go"].on_click(lambda _: self._from_ui(lambda: self.set_image_query(ui["path"].value.strip())))
        ui["path"].on_submit(lambda _: self._from_ui(lambda: self.set_image_query(ui["path"].value.strip())))
        ui["k"].observe(lambda c: self._from_ui(lambda: self.set_k(c["new"])), names="value")
        ui["box"] = w.VBox(
            [
                w.HBox([ui["stored"], ui["upload"]]),
                w.HBox([ui["path"], ui["go"]]),
                w.HBox([ui["split"], ui["label"], ui["category"], ui["k"]]),
                ui["message"],
                _scroll_box(ui["image"]),
                ui["table"],
            ]
        )
        return ui

    def _filter_observer(self, column: str, values: list[Any]) -> Any:
        return lambda c: (
            c["new"] is not None and self._from_ui(lambda: self.set_filters(**{column: values[c["new"]]}))
        )

    def _uploaded(self, value: Any) -> None:
        if not value:
            return
        first = value[0] if isinstance(value, (list, tuple)) else next(iter(value.values()))
        self.upload(first["name"], first["content"])

    def _from_ui(self, change: Any) -> None:
        if self._syncing:
            return
        try:
            change()
            self._message = ""
        except (ValueError, FileNotFoundError) as error:  # StoreError is a ValueError
            self._message = f"<span style='color:#d7191c'>{error}</span>"
            self._sync_ui()  # the widgets go back to the state that still holds

    def _sync_ui(self) -> None:
        ui = self._ui
        assert ui is not None
        self._syncing = True
        try:
            kind, path = self._query
            paths = self.stored_paths[:_DROPDOWN_MAX]
            ui["stored"].value = paths.index(path) if kind == "stored" and path in paths else None
            ui["k"].value = self._k
            for column, value in self._filters.items():
                ui[column].value = 0 if value is None else self.options(column).index(value) + 1
            query = f"query: {'stored item' if kind == 'stored' else 'image'} {path}"
            ui["message"].value = self._message or f"<small>{query}</small>"
            _show_png(ui["image"], *self._png())
            ui["table"].value = self.results_frame().to_html(index=False, escape=True)
        finally:
            self._syncing = False


def _display_names(items: pd.DataFrame) -> dict[str, str]:
    """path -> the name shown for the item: its class name where it has one, else its label."""
    labels = [str(v) for v in items["label"]]
    if "class_name" in items.columns:
        labels = [
            lab if n is None or pd.isna(n) or str(n) == "" else str(n)
            for lab, n in zip(labels, items["class_name"], strict=True)
        ]
    return dict(zip(items["path"].astype(str), labels, strict=True))


# ----------------------------------------------------------------------------------------------------
# The embedding map

PROJECTIONS = ("pca", "tsne", "umap")
_PROJECTION_PACKAGES = {"tsne": ("sklearn", "scikit-learn"), "umap": ("umap", "umap-learn")}


def available_projections() -> list[str]:
    """The 2D projections usable here: "pca" always, "tsne" with scikit-learn, "umap" with umap-learn."""
    import importlib.util

    return ["pca"] + [
        m for m, (module, _) in _PROJECTION_PACKAGES.items() if importlib.util.find_spec(module)
    ]


def project_2d(embeddings: Any, method: str = "pca", *, seed: int = 0) -> np.ndarray:
    """Embeddings (N, D) projected to (N, 2) by "pca" (labkit.viz.pca_2d), "tsne" or "umap"."""
    if method not in PROJECTIONS:
        raise ValueError(f"projection {method!r} is not one of {PROJECTIONS}")
    x = np.asarray(viz._as_numpy(embeddings, "embeddings"), dtype=np.float64)
    if method == "pca":
        return viz.pca_2d(x)[0]
    if method not in available_projections():
        module, package = _PROJECTION_PACKAGES[method]
        raise ValueError(f"projection {method!r} needs the package {package}: pip install {package}")
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max((len(x) - 1) / 3, 1.0)))
        return TSNE(2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x)
    import umap  # pragma: no cover - optional

    return np.asarray(umap.UMAP(n_components=2, random_state=seed).fit_transform(x))  # pragma: no cover


class EmbeddingMap(_Panel):
    """A 2D map of embeddings (PCA by default; t-SNE / UMAP when installed) to click through.

    `embeddings` (N, D) and `df` (the N items in embedding order, as for `ResultBrowser`). Selecting an item
    shows its image beside its `k` nearest items (Euclidean, among the gallery items when `df` has an
    `is_gallery` column, never itself), framed green when they share its label. With `results` and
    `metrics_per_query` (as for `ResultBrowser`) the `n_worst` queries by `metric` can be highlighted.

    State: `method`, `color_by` ("label" or "category"), `selected` (an item, or None), `k`,
    `highlight_worst`, changed only by `set_method`, `set_color_by`, `select`, `select_nearest`, `set_k`,
    `set_highlight`. The scatter is a bqplot widget (clicking a point selects it); without a widget front
    end `static_figures()` draws the map and the selection with matplotlib.
    """

    def __init__(
        self,
        embeddings: Any,
        df: pd.DataFrame | Sequence[str],
        *,
        results: Any = None,
        metrics_per_query: Mapping[str, Any] | None = None,
        metric: str | None = None,
        higher_is_better: bool = True,
        n_worst: int = 10,
        k: int = 5,
        method: str = "pca",
        color_by: str = "label",
        seed: int = 0,
        tile_px: int = 120,
        max_k: int = 10,
    ) -> None:
        import torch

        self.embeddings = torch.as_tensor(
            np.asarray(viz._as_numpy(embeddings, "embeddings")), dtype=torch.float32
        )
        if self.embeddings.ndim != 2 or len(self.embeddings) < 2:
            raise ValueError(
                f"embeddings must be a (N, D) matrix with N >= 2, got {tuple(self.embeddings.shape)}"
            )
        n = len(self.embeddings)
        self.items = viz.items_frame(df, n)
        codes = pd.factorize(self.items["label"] if "label" in self.items.columns else pd.Series(range(n)))[0]
        self._codes = torch.as_tensor(codes, dtype=torch.int64)
        self.names = (
            list(_display_names(self.items.assign(path=self.items.index.astype(str))).values())
            if ("label" in self.items.columns)
            else [str(i) for i in range(n)]
        )
        gallery = (
            self.items["is_gallery"].astype(bool).to_numpy() if "is_gallery" in self.items.columns else None
        )
        self._gallery = torch.ones(n, dtype=torch.bool) if gallery is None else torch.as_tensor(gallery)
        self.seed = seed
        self.tile_px = _checked_tile_px(tile_px)
        self.max_k = max(1, min(int(max_k), int(self._gallery.sum()) - 1 or 1))
        self._k = self._checked_k(min(k, self.max_k) if isinstance(k, (int, np.integer)) else k)
        self._worst = self._worst_items(results, metrics_per_query, metric, higher_is_better, n_worst)
        self._coords: dict[str, np.ndarray] = {}
        self._method = self._checked_method(method)
        self._color_by = self._checked_color(color_by)
        self._highlight = len(self._worst) > 0
        self._selected: int | None = int(self._worst[0]) if len(self._worst) else 0
        self._ui: dict[str, Any] | None = None
        self._syncing = False

    # -- state ------------------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self._method

    @property
    def color_by(self) -> str:
        return self._color_by

    @property
    def selected(self) -> int | None:
        """The selected item (row of the embeddings), or None."""
        return self._selected

    @property
    def k(self) -> int:
        return self._k

    @property
    def highlight_worst(self) -> bool:
        return self._highlight

    @property
    def worst_items(self) -> np.ndarray:
        """Items of the worst queries, worst first (empty without results and metrics)."""
        return self._worst.copy()

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) coordinates of the current projection (computed once per method)."""
        if self._method not in self._coords:
            self._coords[self._method] = np.asarray(project_2d(self.embeddings, self._method, seed=self.seed))
        return self._coords[self._method]

    def color_values(self) -> list[str]:
        """One colour key per item: its display label, or its category."""
        if self._color_by == "category":
            return ["" if v is None or pd.isna(v) else str(v) for v in self.items["category"]]
        return list(self.names)

    def set_method(self, method: str) -> np.ndarray:
        self._method = self._checked_method(method)
        self._changed()
        return self.coords

    def set_color_by(self, color_by: str) -> None:
        self._color_by = self._checked_color(color_by)
        self._changed()

    def set_highlight(self, on: bool) -> None:
        self._highlight = bool(on)
        self._changed()

    def set_k(self, k: int) -> None:
        self._k = self._checked_k(k)
        self._changed()

    def select(self, item: int | None) -> int | None:
        """Select an item (row of the embeddings), or None."""
        if item is not None and (
            isinstance(item, bool)
            or not isinstance(item, (int, np.integer))
            or not 0 <= item < len(self.items)
        ):
            raise IndexError(f"item {item!r} is outside the {len(self.items)} items")
        self._selected = None if item is None else int(item)
        self._changed()
        return self._selected

    def select_nearest(self, x: float, y: float) -> int:
        """Select the item whose point is nearest to (x, y) on the current map."""
        coords = self.coords
        item = int(np.argmin(((coords - np.array([x, y])) ** 2).sum(axis=1)))
        self.select(item)
        return item

    def neighbours(self, item: int | None = None) -> tuple[Any, pd.DataFrame]:
        """The item's top-k as a one-query `RetrievalResults` (over all items) and the items DataFrame."""
        import torch

        from labkit.retrieval import RetrievalResults

        item = self._selected if item is None else item
        if item is None:
            raise ValueError("no item is selected: call select(item) first")
        dist = torch.cdist(self.embeddings[item : item + 1], self.embeddings).squeeze(0)
        dist[~self._gallery] = float("inf")
        dist[item] = float("inf")
        k = min(self._k, int(torch.isfinite(dist).sum()))
        distances, retrieved = dist.topk(k, largest=False)
        relevant = self._codes[retrieved] == self._codes[item]
        n_relevant = int(((self._codes == self._codes[item]) & self._gallery).sum()) - int(
            self._gallery[item]
        )
        results = RetrievalResults(
            distances=distances[None],
            retrieved=retrieved[None],
            query_ids=torch.tensor([item]),
            relevant=relevant[None],
            n_relevant=torch.tensor([n_relevant]),
            labels=self._codes,
        )
        return results, self.items

    # -- views ------------------------------------------------------------------------------------

    def figure(self) -> viz.Figure:
        """The map as a static figure: one colour per label (or category), worst queries ringed, the
        selected item marked."""
        coords, keys = self.coords, np.asarray(self.color_values(), dtype=object)
        names = sorted(set(keys.tolist()), key=viz.natural_key)
        palette = _palette(len(names))
        fig = viz.Figure(figsize=(6.4, 5.2), layout="constrained")
        ax = fig.add_subplot()
        size = float(np.clip(4000 / len(coords), 4, 40))
        for i, name in enumerate(names):
            sel = keys == name
            ax.scatter(
                coords[sel, 0],
                coords[sel, 1],
                s=size,
                color=palette[i],
                alpha=0.75,
                linewidths=0,
                label=viz.shorten(name) if len(names) <= 20 else None,
            )
        if self._highlight and len(self._worst):
            worst = coords[self._worst]
            ax.scatter(
                worst[:, 0],
                worst[:, 1],
                s=size * 4,
                facecolors="none",
                edgecolors="black",
                linewidths=1.2,
                label="worst queries",
                gid="worst",
            )
        if self._selected is not None:
            x, y = coords[self._selected]
            ax.scatter([x], [y], s=size * 8, marker="*", color="black", gid="selected", label="selected")
        ax.set_title(f"{self._method.upper()} of {len(coords)} embeddings, coloured by {self._color_by}")
        ax.grid(alpha=0.3)
        if len(names) <= 20:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
        return fig

    def selection_figure(self) -> viz.Figure:
        """The selected item beside its k nearest items."""
        results, items = self.neighbours()
        return viz.draw_query(
            results,
            0,
            items,
            k=self._k,
            labels=self.names,
            title=f"item {self._selected}: its {self._k} nearest",
            query_title=f"item {self._selected}",
        )

    def static_figures(self) -> list[viz.Figure]:
        return [self.figure()] + ([self.selection_figure()] if self._selected is not None else [])

    def mimebundle(self) -> dict[str, Any]:
        return _bundle_with_snapshot(self.widget, viz.figure_png(self.figure()), "embedding map")

    # -- internals --------------------------------------------------------------------------------

    def _checked_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.max_k:
            raise ValueError(f"k must be an integer from 1 to {self.max_k}, got {k!r}")
        return int(k)

    def _checked_method(self, method: str) -> str:
        if method not in PROJECTIONS:
            raise ValueError(f"projection {method!r} is not one of {PROJECTIONS}")
        if method not in available_projections():
            _, package = _PROJECTION_PACKAGES[method]
            raise ValueError(f"projection {method!r} needs the package {package}: pip install {package}")
        return method

    def _checked_color(self, color_by: str) -> str:
        if color_by not in ("label", "category"):
            raise ValueError(f"color_by must be 'label' or 'category', got {color_by!r}")
        if color_by == "category" and "category" not in self.items.columns:
            raise ValueError("the items have no 'category' column to colour by; use color_by='label'")
        return color_by

    def _worst_items(
        self, results: Any, metrics: Any, metric: str | None, higher: bool, n: int
    ) -> np.ndarray:
        if results is None or not metrics:
            return np.empty(0, dtype=np.int64)
        metric = metric or next(iter(metrics))
        if metric not in metrics:
            raise ValueError(f"unknown metric {metric!r}; the map has {sorted(metrics)}")
        values = viz._per_query(metrics[metric], results, metric)
        order = viz.worst_queries(values, n=n, higher_is_better=higher)
        return results.query_ids.cpu().numpy()[order].astype(np.int64)

    def _changed(self) -> None:
        if self._ui is not None:
            self._sync_ui()

    def _build_ui(self) -> dict[str, Any]:
        import bqplot as bq
        import ipywidgets as w

        xs, ys, cs = bq.LinearScale(), bq.LinearScale(), bq.OrdinalColorScale()
        size = int(np.clip(6000 / len(self.items), 8, 40))
        points = bq.Scatter(
            scales={"x": xs, "y": ys, "color": cs},
            default_size=size,
            stroke_width=0,
            default_opacities=[0.8],
            tooltip=bq.Tooltip(fields=["index"], labels=["item"]),
        )
        worst = bq.Scatter(
            scales={"x": xs, "y": ys},
            default_size=size * 4,
            fill=False,
            stroke="black",
            stroke_width=1.5,
            colors=["black"],
        )
        chosen = bq.Scatter(
            scales={"x": xs, "y": ys}, marker="diamond", default_size=size * 6, colors=["black"]
        )
        figure = bq.Figure(
            marks=[points, worst, chosen],
            axes=[bq.Axis(scale=xs, label="1"), bq.Axis(scale=ys, orientation="vertical", label="2")],
            fig_margin={"top": 20, "bottom": 40, "left": 50, "right": 10},
            layout=w.Layout(width="480px", height="440px"),
            min_aspect_ratio=0.5,
        )
        ui: dict[str, Any] = {
            "scales": (xs, ys),
            "points": points,
            "worst": worst,
            "chosen": chosen,
            "colors": cs,
            "figure": figure,
            "method": w.Dropdown(options=available_projections(), description="map"),
            "color_by": w.Dropdown(
                options=["label", "category"] if "category" in self.items.columns else ["label"],
                description="colour by",
            ),
            "highlight": w.Checkbox(
                description=f"ring the {len(self._worst)} worst queries", disabled=not len(self._worst)
            ),
            "item": w.BoundedIntText(min=0, max=len(self.items) - 1, description="item"),
            "k": w.IntSlider(min=1, max=self.max_k, description="k"),
            "legend": w.HTML(layout=w.Layout(max_height="440px", overflow="auto")),
            "facts": w.HTML(),
            "image": w.Image(format="png"),
        }
        points.on_element_click(
            lambda _, event: self._from_ui(lambda: self.select(int(event["data"]["index"])))
        )
        worst.on_element_click(
            lambda _, event: self._from_ui(lambda: self.select(int(self._worst[int(event["data"]["index"])])))
        )
        ui["method"].observe(lambda c: self._from_ui(lambda: self.set_method(c["new"])), names="value")
        ui["color_by"].observe(lambda c: self._from_ui(lambda: self.set_color_by(c["new"])), names="value")
        ui["highlight"].observe(lambda c: self._from_ui(lambda: self.set_highlight(c["new"])), names="value")
        ui["item"].observe(lambda c: self._from_ui(lambda: self.select(int(c["new"]))), names="value")
        ui["k"].observe(lambda c: self._from_ui(lambda: self.set_k(c["new"])), names="value")
        ui["box"] = w.VBox(
            [
                w.HBox([ui["method"], ui["color_by"], ui["highlight"]]),
                w.HBox([ui["item"], ui["k"]]),
                w.HBox([figure, ui["legend"]]),
                ui["facts"],
                _scroll_box(ui["image"]),
            ]
        )
        self._drawn: dict[str, Any] = {}
        return ui

    def _sync_ui(self) -> None:
        ui = self._ui
        assert ui is not None
        self._syncing = True
        try:
            ui["method"].value = self._method
            ui["color_by"].value = self._color_by
            ui["highlight"].value = self._highlight
            ui["k"].value = self._k
            coords = self.coords
            keys = self.color_values()
            names = sorted(set(keys), key=viz.natural_key)
            drawn = (self._method, self._color_by)
            if self._drawn.get("points") != drawn:  # only redraw the points when they change
                index = {name: i for i, name in enumerate(names)}
                palette = _palette(len(names))
                for scale, values in zip(
                    ui["scales"], coords.T, strict=True
                ):  # fixed: a selection never rescales
                    low, high = float(values.min()), float(values.max())
                    pad = 0.04 * (high - low or 1.0)
                    with scale.hold_sync():
                        scale.min, scale.max = low - pad, high + pad
                with ui["points"].hold_sync():
                    ui["points"].x, ui["points"].y = coords[:, 0], coords[:, 1]
                    ui["colors"].domain = list(range(len(names)))
                    ui["colors"].colors = palette
                    ui["points"].color = np.array([index[key] for key in keys])
                ui["legend"].value = "<br>".join(
                    f"<span style='color:{palette[i]}'>\u25cf</span> {viz.shorten(name, 24)}"
                    for i, name in enumerate(names[:40])
                ) + ("<br>\u2026" if len(names) > 40 else "")
                self._drawn["points"] = drawn
            if self._drawn.get("worst") != (self._method, self._highlight):
                worst = coords[self._worst] if self._highlight and len(self._worst) else np.empty((0, 2))
                with ui["worst"].hold_sync():
                    ui["worst"].x, ui["worst"].y = worst[:, 0], worst[:, 1]
                self._drawn["worst"] = (self._method, self._highlight)
            if self._selected is None:
                chosen = np.empty((0, 2))
                ui["image"].value = b""
                ui["facts"].value = "click a point, or give an item number"
            else:
                chosen = coords[self._selected : self._selected + 1]
                ui["item"].value = self._selected
                _show_png(ui["image"], *_figure_png_at_tile(self.selection_figure(), self._k, self.tile_px))
                rank = np.flatnonzero(self._worst == self._selected)
                note = f", worst query #{int(rank[0]) + 1}" if len(rank) else ""
                ui["facts"].value = (
                    f"item {self._selected}: {viz.shorten(self.names[self._selected], 40)}"
                    + (
                        f", category {self.items['category'].iloc[self._selected]}"
                        if "category" in self.items
                        else ""
                    )
                    + note
                )
            with ui["chosen"].hold_sync():
                ui["chosen"].x, ui["chosen"].y = chosen[:, 0], chosen[:, 1]
        finally:
            self._syncing = False


def _palette(n: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [to_hex(cmap(i % cmap.N)) for i in range(max(n, 1))]
