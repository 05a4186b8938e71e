"""labkit.widgets: the result browser's state changes through plain methods, and its static fallback."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from labkit import viz, widgets
from labkit.retrieval import RetrievalResults

matplotlib.use("Agg")

LABELS = [0, 0, 1, 1, 2, 2, 0, 1]
CATEGORIES = ["red", "red", "blue", "blue", "red", "red", "blue", "blue"]


@pytest.fixture
def results() -> RetrievalResults:
    """Every item is a query; top-4 by the distance |i - j| (ties to the lower item), no self-match."""
    labels = torch.tensor(LABELS)
    n = len(LABELS)
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().float() + torch.arange(n) * 1e-3
    dist.fill_diagonal_(float("inf"))
    distances, retrieved = dist.topk(4, largest=False)
    relevant = labels[retrieved] == labels[:, None]
    n_relevant = torch.tensor([(labels == label).sum().item() - 1 for label in LABELS])
    return RetrievalResults(
        distances=distances,
        retrieved=retrieved,
        query_ids=torch.arange(n),
        relevant=relevant,
        n_relevant=n_relevant,
        labels=labels,
    )


@pytest.fixture
def items(tmp_path) -> pd.DataFrame:
    rows = []
    for i, (label, category) in enumerate(zip(LABELS, CATEGORIES, strict=True)):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (30 * i, 100, 200 - 20 * i)).save(path)
        rows.append({"path": str(path), "label": f"L{label}", "category": category})
    return pd.DataFrame(rows)


@pytest.fixture
def metrics(results) -> dict[str, torch.Tensor]:
    cmc1 = results.relevant[:, 0].float()
    p2 = results.relevant[:, :2].float().mean(dim=1)
    p2[5] = float("nan")  # a skipped query goes last in the worst-first order
    return {"precision@2": p2, "cmc@1": cmc1}


@pytest.fixture
def browser(results, items, metrics) -> widgets.ResultBrowser:
    return widgets.ResultBrowser(results, items, metrics, k=3)


def shown_gallery(fig) -> list[str]:
    return [
        ax.get_gid() for ax in fig.axes if (ax.get_gid() or "").split(":")[0] in ("relevant", "irrelevant")
    ]


def test_starts_worst_first_by_the_first_metric(browser, metrics):
    expected = viz.worst_queries(metrics["precision@2"], skip_nan=False)
    assert browser.order.tolist() == expected.tolist()
    assert browser.order[-1] == 5
    assert browser.order_mode == "worst" and browser.order_metric == "precision@2"
    assert browser.current_query == expected[0] and browser.index == 0
    assert browser.current_metrics == {
        "precision@2": float(metrics["precision@2"][expected[0]]),
        "cmc@1": float(metrics["cmc@1"][expected[0]]),
    }


def test_set_order_by_metric_index_and_random(browser, metrics):
    assert browser.set_order("worst", "cmc@1") == viz.worst_queries(metrics["cmc@1"])[0]
    assert browser.order.tolist() == viz.worst_queries(metrics["cmc@1"], skip_nan=False).tolist()
    assert browser.set_order("index") == 0
    assert browser.order.tolist() == list(range(8)) and browser.order_metric is None
    browser.set_order("random", seed=3)
    assert browser.order.tolist() == np.random.default_rng(3).permutation(8).tolist()
    assert browser.order_mode == "random"
    browser.set_order("worst")  # remembers the last metric
    assert browser.order_metric == "cmc@1"
    with pytest.raises(ValueError, match="not one of"):
        browser.set_order("best")
    with pytest.raises(ValueError, match="unknown metric 'map@5'"):
        browser.set_order("worst", "map@5")


def test_select_next_previous_change_the_shown_query(browser):
    browser.set_order("index")
    assert browser.select(4) == 4 and browser.current_item == 4
    assert browser.next() == 5 and browser.index == 5
    assert browser.previous() == 4
    browser.select(7)
    assert browser.next() == 7  # stays on the last
    browser.select(0)
    assert browser.previous() == 0  # stays on the first
    with pytest.raises(IndexError, match="outside the current order of 8"):
        browser.select(8)
    assert browser.select_query(6) == 6 and browser.index == 6
    fig = browser.figure()
    assert [ax.get_gid() for ax in fig.axes if (ax.get_gid() or "").startswith("query:")] == ["query:6"]


def test_category_filter(browser, items):
    assert browser.categories == ["blue", "red"]
    browser.set_order("index")
    browser.select(3)
    assert browser.set_category("blue") == 2  # back to the first blue query
    assert browser.order.tolist() == [2, 3, 6, 7] and browser.category == "blue"
    assert items.category[browser.order].eq("blue").all()
    with pytest.raises(ValueError, match="not in the current order"):
        browser.select_query(0)
    browser.set_order("worst", "precision@2")
    assert set(browser.order.tolist()) == {2, 3, 6, 7}
    with pytest.raises(ValueError, match="unknown category 'green'"):
        browser.set_category("green")
    browser.set_category(None)
    assert len(browser.order) == 8


def test_explicit_categories_override_the_column(results, items, metrics):
    b = widgets.ResultBrowser(results, items, metrics, categories=["a"] * 4 + ["b"] * 4)
    b.set_category("b")
    assert sorted(b.order.tolist()) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="3 values for 8 items"):
        widgets.ResultBrowser(results, items, metrics, categories=["a", "b", "c"])
    no_column = widgets.ResultBrowser(results, items.drop(columns="category"), metrics)
    assert no_column.categories == []


def test_set_k_keeps_the_query_and_draws_k_images(browser):
    query = browser.select(2)
    assert len(shown_gallery(browser.figure())) == 3
    assert browser.set_k(1) == query and browser.k == 1
    assert shown_gallery(browser.figure()) == [
        f"{'relevant' if browser.results.relevant[query, 0] else 'irrelevant'}:{query}:0"
    ]
    browser.set_k(4)
    assert len(shown_gallery(browser.figure())) == 4
    with pytest.raises(ValueError, match="from 1 to 4"):
        browser.set_k(5)


def test_figure_and_table_show_the_query_metrics(browser, metrics):
    browser.set_order("index")
    browser.select(1)
    fig = browser.figure()
    query_ax = next(ax for ax in fig.axes if ax.get_gid() == "query:1")
    p2, c1 = float(metrics["precision@2"][1]), float(metrics["cmc@1"][1])
    assert query_ax.get_xlabel() == f"L0\nprecision@2 {p2:.2f}\ncmc@1 {c1:.2f}"
    assert "2 of 8" in fig._suptitle.get_text() and "index" in fig._suptitle.get_text()
    table = browser.metrics_frame()["value"]
    assert table["label"] == "L0" and table["category"] == "red" and table["relevant in gallery"] == "2"
    assert float(table["precision@2"]) == pytest.approx(p2)


def test_worst_order_needs_a_metric(results, items):
    with pytest.raises(ValueError, match="needs metrics_per_query"):
        widgets.ResultBrowser(results, items)
    b = widgets.ResultBrowser(results, items, order="index")
    assert b.current_metrics == {}
    assert b.k == 4  # the default 5 is capped at the results' k
    with pytest.raises(ValueError, match="has 7 values but the results have 8 queries"):
        widgets.ResultBrowser(results, items, {"m": torch.zeros(7)})


def test_widgets_follow_and_drive_the_state(browser):
    box = browser.widget
    ui = browser._ui
    assert box is browser.widget  # built once
    ui["order"].value = ("index", None)
    assert browser.order_mode == "index"
    ui["slider"].value = 6  # the rank counts from 1, as the dropdown and the title do
    assert browser.current_query == 5 and browser.rank == 6
    ui["next"].click()
    assert browser.current_query == 6 and ui["slider"].value == 7 and ui["query"].value == 6
    ui["category"].label = "red"
    assert browser.category == "red" and ui["slider"].max == 4 and ui["slider"].value == 1
    ui["k"].value = 2
    assert browser.k == 2
    browser.set_order("worst", "cmc@1")  # a method call updates the widgets
    assert ui["order"].value == ("worst", "cmc@1")
    assert ui["query"].options[0][0].startswith(f"1. query {browser.current_query}: L")
    assert ui["image"].value[:8] == b"\x89PNG\r\n\x1a\n"


def test_display_falls_back_to_a_static_figure_without_a_front_end(browser, monkeypatch):
    monkeypatch.delenv(widgets.NO_WIDGETS_ENV, raising=False)
    monkeypatch.delenv(widgets.WIDGETS_ENV, raising=False)
    assert widgets.widget_frontend_available() is False  # plain Python, no kernel
    shown = browser.display()
    assert isinstance(shown, matplotlib.figure.Figure)
    assert any(ax.get_gid() == f"query:{browser.current_query}" for ax in shown.axes)
    monkeypatch.setenv(widgets.WIDGETS_ENV, "1")
    assert widgets.widget_frontend_available() is True
    assert browser.display() is browser.widget
    monkeypatch.setenv(widgets.NO_WIDGETS_ENV, "1")  # the test suite's switch wins
    assert widgets.widget_frontend_available() is False
    monkeypatch.delenv(widgets.NO_WIDGETS_ENV)
    monkeypatch.setenv(widgets.WIDGETS_ENV, "static")
    assert widgets.widget_frontend_available() is False
    monkeypatch.setenv(widgets.WIDGETS_ENV, "maybe")
    with pytest.raises(ValueError, match="LABKIT_WIDGETS='maybe'"):
        widgets.widget_frontend_available()


def test_one_numbering_in_slider_dropdown_and_title(browser):
    ui = browser._ui if browser._ui else (browser.widget, browser._ui)[1]
    browser.set_order("index")
    browser.select(2)
    assert browser.rank == 3 and ui["slider"].min == 1 and ui["slider"].value == 3
    assert ui["slider"].max == 8 and ui["query"].label.startswith("3. query 2:")
    assert "3 of 8" in browser.figure()._suptitle.get_text()


def test_category_all_keeps_its_label_after_a_category(browser):
    """Choosing "all" again must leave the dropdown showing "all", not blank (None means no selection)."""
    ui = browser._ui if browser._ui else (browser.widget, browser._ui)[1]
    ui["category"].label = "blue"
    assert browser.category == "blue"
    ui["category"].label = widgets.ALL
    assert browser.category is None and len(browser.order) == 8
    assert ui["category"].label == widgets.ALL and ui["category"].index == 0
    browser.set_category("red")
    browser.set_category(None)  # a method call shows "all" too
    assert ui["category"].label == widgets.ALL


def test_view_keeps_its_pixel_size_for_every_k(browser):
    """The picture is shown at its own width (tiles of tile_px pixels), never stretched to the output."""
    import io

    ui = browser._ui if browser._ui else (browser.widget, browser._ui)[1]
    widths, tiles = {}, {}
    for k in (1, 4):
        browser.set_k(k)
        png = Image.open(io.BytesIO(ui["image"].value))
        widths[k] = png.width
        assert ui["image"].width == str(png.width) and ui["image"].layout.width == f"{png.width}px"
        assert ui["image"].layout.max_width == "none"
        fig = browser.figure()
        fig.set_dpi(browser.tile_px / viz.tile_inches(k))
        query_ax = next(ax for ax in fig.axes if (ax.get_gid() or "").startswith("query:"))
        fig.canvas.draw()
        tiles[k] = query_ax.get_window_extent().width
        assert 0.6 * browser.tile_px <= tiles[k] <= browser.tile_px  # about tile_px, never more
    assert widths[1] < widths[4] and abs(tiles[1] - tiles[4]) <= 0.1 * tiles[1]  # the view grows with k
    scroll = browser.widget.children[-1].children[0]  # the picture, with the facts beside it
    assert scroll.layout.overflow == "auto" and scroll.children == (ui["image"],)
    with pytest.raises(ValueError, match="tile_px"):
        widgets.ResultBrowser(browser.results, browser.items, browser.metrics, tile_px=10)


def test_the_title_fits_a_k1_view(browser):
    browser.set_category("blue")
    browser.set_k(1)
    fig = browser.figure()
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent()
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width


def test_live_display_carries_a_png_snapshot(browser):
    import base64

    bundle = browser.mimebundle()
    assert widgets.WIDGET_VIEW_MIME in bundle
    assert bundle[widgets.WIDGET_VIEW_MIME]["model_id"] == browser.widget.model_id
    assert base64.b64decode(bundle["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "snapshot" in bundle["text/plain"]


def test_class_names_are_shown_where_the_dataset_has_them(results, items, metrics):
    named = items.assign(class_name=[f"class {label}" for label in LABELS])
    named.loc[7, "class_name"] = None  # an item without a name keeps its label
    b = widgets.ResultBrowser(results, named, metrics, order="index")
    assert b.labels == [f"class {label}" for label in LABELS[:7]] + ["L1"]
    assert b.metrics_frame()["value"]["label"] == "class 0"
    query_ax = next(ax for ax in b.figure().axes if ax.get_gid() == "query:0")
    assert query_ax.get_xlabel().startswith("class 0\n")


# -- the search panel ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def search_store(tmp_path_factory):
    """A store of 12 tiny images (labels 0..2, splits, categories, class names) made by a 32-px resnet18."""
    from labkit import models, store

    tmp = tmp_path_factory.mktemp("search")
    rows = []
    for i in range(12):
        path = tmp / f"img{i}.png"
        Image.new("RGB", (16, 16), (20 * i, 100, 200 - 10 * i)).save(path)
        rows.append(
            {
                "path": str(path),
                "label": i % 3,
                "split": "validation" if i < 9 else "train",
                "category": "ab"[i % 2],
                "class_name": f"class {i % 3}",
            }
        )
    df = pd.DataFrame(rows)
    torch.manual_seed(0)
    extractor = models.create_extractor("resnet18", image_size=32)
    db, model_id = store.open_store_for(tmp / "store.sqlite", extractor)
    db.add(model_id, store.embed_images(extractor, df["path"].tolist()), df)
    db.close()
    return tmp / "store.sqlite", model_id, extractor, df


@pytest.fixture
def panel(search_store, tmp_path):
    path, model_id, extractor, _ = search_store
    p = widgets.SearchPanel(path, model_id, extractor=extractor, k=3, upload_dir=tmp_path / "uploads")
    yield p
    p.close()


def test_search_panel_answers_as_the_store_does(panel, search_store):
    from labkit import store

    path, model_id, extractor, df = search_store
    query = df["path"][4]
    found = panel.set_stored_query(query)
    with store.EmbeddingStore(path, read_only=True) as db:
        expected = db.search_stored(query, model=model_id, k=3)
        pd.testing.assert_frame_equal(found, expected)
        assert query not in found["path"].tolist() and panel.query == ("stored", query)
        panel.set_k(5)
        assert panel.results["rank"].tolist() == [1, 2, 3, 4, 5]
        found = panel.set_filters(split="validation", category="a")
        pd.testing.assert_frame_equal(
            found, db.search_stored(query, model=model_id, k=5, split="validation", category="a")
        )
        assert set(found["category"]) == {"a"} and set(found["split"]) == {"validation"}
        panel.set_filters(split=None, category=None)
        found = panel.set_image_query(df["path"][7])
        expected = db.search_images([df["path"][7]], extractor, model=model_id, k=5)
        assert found["path"].tolist() == expected["path"].tolist()
        assert found["path"].iloc[0] == df["path"][7]  # the image itself is stored: it comes first
    table = panel.results_frame()
    assert table["label"].tolist() == [f"class {df['label'][df['path'] == p].item()}" for p in found["path"]]
    assert panel.options("split") == ["train", "validation"] and panel.options("label") == [0, 1, 2]


def test_search_panel_refuses_bad_changes_and_keeps_its_state(panel, search_store):
    _, _, _, df = search_store
    panel.set_stored_query(df["path"][0])
    before = panel.results
    with pytest.raises(ValueError, match="no stored item has category 'c'"):
        panel.set_filters(category="c")
    with pytest.raises(ValueError, match="unknown filter 'colour'"):
        panel.set_filters(colour="red")
    with pytest.raises(ValueError, match="k must be an integer from 1 to 11"):
        panel.set_k(12)
    with pytest.raises(ValueError, match="is not a stored item"):
        panel.set_stored_query("/nowhere.png")
    with pytest.raises(FileNotFoundError, match="no image file at /nowhere.png"):
        panel.set_image_query("/nowhere.png")
    with pytest.raises(ValueError, match="'notes.txt' is not an image"):
        panel.upload("notes.txt", b"hello")
    panel.set_stored_query(df["path"][9])  # the only train item of label 0 and category b
    with pytest.raises(ValueError, match="no stored item but the query itself matches"):
        panel.set_filters(split="train", label=0, category="b")
    assert panel.filters == {"split": None, "label": None, "category": None}  # the change was undone
    assert panel.query == ("stored", df["path"][9]) and len(panel.results) == 3
    panel.set_filters(split=None, label=None, category=None)
    panel.set_stored_query(df["path"][0])
    pd.testing.assert_frame_equal(panel.results, before)


def test_search_panel_uploads_are_kept_by_content(panel, tmp_path):
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (80, 100, 160)).save(buffer, format="PNG")
    found = panel.upload("mine.png", buffer.getvalue())
    kind, path = panel.query
    assert kind == "image" and path.startswith(str(tmp_path / "uploads")) and len(found) == 3
    again = widgets.SearchPanel(
        panel.db, panel.model, extractor=panel.extractor, upload_dir=tmp_path / "uploads"
    )
    again.upload("same.png", buffer.getvalue())
    assert again.query == panel.query and len(list((tmp_path / "uploads").iterdir())) == 1


def test_search_panel_widgets_drive_the_state_and_show_errors(panel, search_store):
    _, _, _, df = search_store
    box = panel.widget
    ui = panel._ui
    assert box is panel.widget
    ui["stored"].value = 2
    assert panel.query == ("stored", df["path"][2])
    ui["k"].value = 4
    assert panel.k == 4 and len(panel.results) == 4
    ui["category"].label = "b"
    assert panel.filters["category"] == "b" and set(panel.results["category"]) == {"b"}
    ui["category"].label = widgets.ALL
    assert panel.filters["category"] is None and ui["category"].label == widgets.ALL
    ui["path"].value = "/nowhere.png"
    ui["go"].click()
    assert "no image file" in ui["message"].value and panel.query == ("stored", df["path"][2])
    ui["path"].value = df["path"][5]
    ui["go"].click()
    assert panel.query == ("image", df["path"][5]) and ui["stored"].value is None
    assert ui["image"].value[:8] == b"\x89PNG\r\n\x1a\n" and "<table" in ui["table"].value


def test_search_panel_static_fallback(panel, monkeypatch):
    monkeypatch.setenv(widgets.NO_WIDGETS_ENV, "1")
    fig = panel.display()
    gids = [ax.get_gid() for ax in fig.axes if ax.get_gid()]
    assert gids[0] == "query:0" and len(gids) == 1 + panel.k


# -- the embedding map -----------------------------------------------------------------------------

EMBEDDINGS = torch.tensor(
    [[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.2, 5.0], [9.0, 0.0], [9.0, 0.3], [0.0, 0.3], [5.0, 5.4]]
)


@pytest.fixture
def embedding_map(results, items, metrics) -> widgets.EmbeddingMap:
    return widgets.EmbeddingMap(EMBEDDINGS, items, results=results, metrics_per_query=metrics, n_worst=3, k=2)


def test_map_projects_with_pca_and_knows_its_projections(embedding_map):
    np.testing.assert_allclose(embedding_map.coords, viz.pca_2d(EMBEDDINGS)[0], rtol=1e-5, atol=1e-6)
    assert embedding_map.method == "pca" and "pca" in widgets.available_projections()
    with pytest.raises(ValueError, match="not one of"):
        embedding_map.set_method("mds")
    if "tsne" not in widgets.available_projections():
        with pytest.raises(ValueError, match="pip install scikit-learn"):
            embedding_map.set_method("tsne")
    else:
        assert embedding_map.set_method("tsne").shape == (8, 2)


def test_map_selection_shows_the_nearest_items(embedding_map):
    embedding_map.select(0)
    results, _ = embedding_map.neighbours()
    assert results.retrieved.tolist() == [[1, 6]]  # by Euclidean distance, never itself
    assert results.relevant.tolist() == [[True, True]]  # items 1 and 6 share label L0 with item 0
    np.testing.assert_allclose(results.distances.numpy(), [[0.1, 0.3]], rtol=1e-5)
    embedding_map.set_k(3)
    assert embedding_map.neighbours(2)[0].retrieved.tolist() == [[3, 7, 5]]
    fig = embedding_map.selection_figure()
    query_ax = next(ax for ax in fig.axes if ax.get_gid() == "query:0")
    assert query_ax.get_title() == "item 0" and fig._suptitle.get_text() == "item 0: its 3 nearest"
    assert embedding_map.select_nearest(9.0, 0.2) == 5 and embedding_map.selected == 5
    with pytest.raises(IndexError, match="outside the 8 items"):
        embedding_map.select(8)
    embedding_map.select(None)
    with pytest.raises(ValueError, match="no item is selected"):
        embedding_map.neighbours()


def test_map_highlights_the_worst_queries_and_colours(embedding_map, metrics):
    expected = viz.worst_queries(metrics["precision@2"], n=3)
    assert embedding_map.worst_items.tolist() == expected.tolist()  # query ids are items here
    assert embedding_map.selected == expected[0]  # it opens on the worst query
    assert embedding_map.color_values() == [f"L{label}" for label in LABELS]
    embedding_map.set_color_by("category")
    assert embedding_map.color_values() == CATEGORIES
    with pytest.raises(ValueError, match="'label' or 'category'"):
        embedding_map.set_color_by("split")
    fig = embedding_map.figure()
    gids = {c.get_gid() for c in fig.axes[0].collections}
    assert {"worst", "selected"} <= gids
    embedding_map.set_highlight(False)
    assert "worst" not in {c.get_gid() for c in embedding_map.figure().axes[0].collections}


def test_map_widgets_click_selects(embedding_map):
    box = embedding_map.widget
    ui = embedding_map._ui
    assert box is embedding_map.widget
    np.testing.assert_allclose(ui["points"].x, embedding_map.coords[:, 0])
    xs = ui["scales"][0]
    bounds = (xs.min, xs.max)
    assert xs.min < embedding_map.coords[:, 0].min() and xs.max > embedding_map.coords[:, 0].max()
    ui["points"]._handle_custom_msgs(None, {"event": "element_click", "data": {"index": 3}})
    assert embedding_map.selected == 3 and ui["item"].value == 3
    assert (xs.min, xs.max) == bounds  # a selection does not rescale the map
    assert ui["chosen"].x.tolist() == [embedding_map.coords[3, 0]]
    worst = embedding_map.worst_items
    ui["worst"]._handle_custom_msgs(None, {"event": "element_click", "data": {"index": 1}})
    assert embedding_map.selected == worst[1] and "worst query #2" in ui["facts"].value
    ui["item"].value = 6
    assert embedding_map.selected == 6 and ui["image"].value[:8] == b"\x89PNG\r\n\x1a\n"
    ui["highlight"].value = False
    assert len(ui["worst"].x) == 0
    ui["color_by"].value = "category"
    assert len(set(ui["points"].color.tolist())) == 2


def test_map_static_fallback_draws_map_and_selection(embedding_map, monkeypatch):
    monkeypatch.setenv(widgets.NO_WIDGETS_ENV, "1")
    fig = embedding_map.display()
    assert fig.axes[0].get_title().startswith("PCA of 8 embeddings")
    assert len(embedding_map.static_figures()) == 2
