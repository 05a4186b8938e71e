"""labkit.viz: worst-query order, frames by relevance, boxes, readable headless figures."""

from __future__ import annotations

import itertools

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.image import AxesImage
from matplotlib.text import Text
from PIL import Image

from labkit import viz
from labkit.retrieval import RetrievalResults

matplotlib.use("Agg")

INF = float("inf")


def make_items(folder, labels, *, size=(12, 10), long_names=False) -> pd.DataFrame:
    """One tiny PNG per item, each of its own colour; returns the items DataFrame (embedding order)."""
    rows = []
    for i, label in enumerate(labels):
        path = folder / f"item{i}.png"
        Image.new("RGB", size, (20 * i % 256, 255 - 20 * i % 256, 90)).save(path)
        name = f"label_{label}_with_a_really_long_descriptive_name" if long_names else f"label_{label}"
        rows.append({"path": str(path), "label": name, "split": "validation", "category": f"cat{label % 2}"})
    return pd.DataFrame(rows)


@pytest.fixture
def hand_results() -> RetrievalResults:
    """4 queries over 6 items (labels 0,0,1,1,2,2), top-3; query 3 has fewer gallery items (padding)."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    retrieved = torch.tensor([[1, 2, 4], [3, 2, 0], [5, 3, 1], [2, 0, -1]])
    distances = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.3, 0.4], [0.3, 0.35, 0.6], [0.05, 0.7, INF]])
    query_ids = torch.tensor([0, 1, 2, 3])
    relevant = torch.zeros_like(retrieved, dtype=torch.bool)
    valid = retrieved >= 0
    relevant[valid] = (labels[retrieved.clamp_min(0)] == labels[query_ids][:, None])[valid]
    return RetrievalResults(
        distances=distances,
        retrieved=retrieved,
        query_ids=query_ids,
        relevant=relevant,
        n_relevant=torch.tensor([1, 1, 1, 1]),
        labels=labels,
    )


@pytest.fixture
def items(tmp_path) -> pd.DataFrame:
    return make_items(tmp_path, [0, 0, 1, 1, 2, 2])


def render(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def axes_by_gid(fig) -> dict[str, matplotlib.axes.Axes]:
    return {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}


def visible_texts(fig) -> list[Text]:
    """Titles, axis labels, captions and legends (tick labels are matplotlib's own business)."""
    ticks = {
        id(label)
        for ax in fig.axes
        for axis in (ax.xaxis, ax.yaxis)
        for tick in axis.get_major_ticks() + axis.get_minor_ticks()
        for label in (tick.label1, tick.label2)
    }
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in ticks]


# -- worst_queries ---------------------------------------------------------------------------------


def test_worst_queries_lowest_first_ties_by_index_nan_left_out():
    values = torch.tensor([0.5, 0.0, 1.0, 0.0, float("nan"), 0.5])
    assert viz.worst_queries(values).tolist() == [1, 3, 0, 5, 2]
    assert viz.worst_queries(values, n=3).tolist() == [1, 3, 0]
    assert viz.worst_queries(values, skip_nan=False).tolist() == [1, 3, 0, 5, 2, 4]
    assert viz.worst_queries(np.asarray(values), higher_is_better=False).tolist() == [2, 0, 5, 1, 3]
    assert viz.worst_queries(values, n=0).tolist() == []
    assert viz.worst_queries(values).dtype == np.int64


def test_worst_queries_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        viz.worst_queries(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="n must be"):
        viz.worst_queries([1.0], n=-1)


def test_shorten_keeps_start_and_end():
    assert viz.shorten("short", 16) == "short"
    cut = viz.shorten("abcdefghijklmnopqrstuvwxyz", 10)
    assert len(cut) == 10 and cut.startswith("abcde") and cut.endswith("wxyz") and "\u2026" in cut
    names = ["label 10", "label 2", "b", "label 1", "a"]
    assert sorted(names, key=viz.natural_key) == ["a", "b", "label 1", "label 2", "label 10"]


# -- retrieval grids -------------------------------------------------------------------------------


def test_frames_match_relevance(hand_results, items):
    for pos in range(4):
        fig = viz.draw_query(hand_results, pos, items, k=3)
        drawn = axes_by_gid(fig)
        query_ax = drawn[f"query:{pos}"]
        assert {s.get_edgecolor() for s in query_ax.spines.values()} == {to_rgba(viz.QUERY_COLOR)}
        for col in range(3):
            item = int(hand_results.retrieved[pos, col])
            if item < 0:
                assert not any(gid.endswith(f":{pos}:{col}") for gid in drawn)
                continue
            is_rel = bool(hand_results.relevant[pos, col])
            ax = drawn[f"{'relevant' if is_rel else 'irrelevant'}:{pos}:{col}"]
            expected = to_rgba(viz.RELEVANT_COLOR if is_rel else viz.IRRELEVANT_COLOR)
            assert {s.get_edgecolor() for s in ax.spines.values()} == {expected}
            assert all(s.get_linewidth() == viz.FRAME_WIDTH for s in ax.spines.values())
            distance = float(hand_results.distances[pos, col])
            assert ax.get_xlabel() == f"{items.label[item]}\nd={distance:.3f}"
            assert ax.get_title() == f"#{col + 1} {viz.CHECK if is_rel else viz.CROSS}"


def test_query_grid_shows_the_right_images(hand_results, items):
    fig = viz.draw_query(hand_results, 1, items, k=3)
    drawn = axes_by_gid(fig)
    shown = [drawn["query:1"]] + [
        drawn[g] for g in sorted(g for g in drawn if g.endswith(tuple(":1:" + c for c in "012")))
    ]
    expected_items = [1, 3, 2, 0]
    for ax, item in zip(shown, expected_items, strict=True):
        (image,) = ax.get_images()
        expected = np.asarray(Image.open(items.path[item]).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(image.get_array()), expected)
    assert fig._suptitle.get_text() == "Query 1 (item 1): top 3"


def test_boxes_crop_the_images(tmp_path, hand_results):
    df = make_items(tmp_path, [0, 0, 1, 1, 2, 2], size=(20, 10))
    df[["x_1", "y_1", "x_2", "y_2"]] = [2, 3, 12, 8]
    df.loc[5, ["x_1", "y_1", "x_2", "y_2"]] = np.nan  # no box: the whole image
    fig = viz.draw_query(hand_results, 2, df, k=3)  # shows items 2, 5, 3, 1
    shapes = [ax.get_images()[0].get_array().shape for ax in fig.axes if ax.get_images()]
    assert shapes == [(5, 10, 3), (10, 20, 3), (5, 10, 3), (5, 10, 3)]
    fig = viz.draw_query(hand_results, 2, df, k=3, boxes=False)
    assert {ax.get_images()[0].get_array().shape for ax in fig.axes if ax.get_images()} == {(10, 20, 3)}


def test_draw_worst_queries_rows_worst_first(hand_results, items):
    values = torch.tensor([1.0, 0.0, 0.5, 0.0])
    fig = viz.draw_worst_queries(hand_results, values, items, n=3, k=2, metric_name="map@5")
    query_axes = [ax for ax in fig.axes if (ax.get_gid() or "").startswith("query:")]
    assert [ax.get_gid() for ax in query_axes] == ["query:1", "query:3", "query:2"]
    assert query_axes[0].get_xlabel() == "label_0\nmap@5 0.00"
    assert query_axes[2].get_xlabel() == "label_1\nmap@5 0.50"
    gallery = [ax for ax in fig.axes if ax.get_images() and not ax.get_gid().startswith("query")]
    assert len(gallery) == 6
    assert "3 worst queries by map@5" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="4 queries"):
        viz.draw_worst_queries(hand_results, values[:3], items)
    with pytest.raises(ValueError, match="all NaN"):
        viz.draw_worst_queries(hand_results, torch.full((4,), float("nan")), items)


def test_draw_queries_chosen_list_and_labels_mapping(hand_results, items):
    fig = viz.draw_queries(
        hand_results, [3, 0], items.path.tolist(), k=3, labels={0: "cat", 1: "dog", 2: "owl"}
    )
    drawn = axes_by_gid(fig)
    assert [ax.get_gid() for ax in fig.axes if (ax.get_gid() or "").startswith("query:")] == [
        "query:3",
        "query:0",
    ]
    assert drawn["query:3"].get_xlabel() == "dog"
    assert drawn["relevant:3:0"].get_xlabel() == "dog\nd=0.050"
    assert "irrelevant:3:2" not in drawn and "relevant:3:2" not in drawn  # padding stays empty
    with pytest.raises(ValueError, match="out of range"):
        viz.draw_queries(hand_results, [4], items)
    with pytest.raises(ValueError, match="positive integer"):
        viz.draw_queries(hand_results, [0], items, k=0)


def test_items_frame_takes_the_validation_rows_and_names_mismatches(items, hand_results):
    train = items.assign(split="train", path=items.path + ".unused")
    mixed = pd.concat([train.iloc[:3], items, train.iloc[3:]], ignore_index=True)
    picked = viz.items_frame(mixed, 6)
    assert picked.path.tolist() == items.path.tolist()
    with pytest.raises(ValueError, match="6 items but the DataFrame has 5 rows"):
        viz.items_frame(items.iloc[:5], 6)
    with pytest.raises(ValueError, match="no 'path' column"):
        viz.items_frame(items.drop(columns="path"), 6)


def _overlaps(fig, renderer) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in visible_texts(fig)]
    return [
        (a, b)
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
        if box_a.x0 < box_b.x1 - 0.5
        and box_b.x0 < box_a.x1 - 0.5
        and box_a.y0 < box_b.y1 - 0.5
        and box_b.y0 < box_a.y1 - 0.5
    ]


def test_k10_grid_with_long_labels_has_no_overlapping_text(tmp_path):
    n = 12
    labels = torch.arange(n) % 3
    df = make_items(tmp_path, labels.tolist(), long_names=True)
    emb = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    dist = torch.cdist(emb, emb).fill_diagonal_(INF)
    distances, retrieved = dist.topk(10, largest=False)
    results = RetrievalResults(
        distances=distances,
        retrieved=retrieved,
        query_ids=torch.arange(n),
        relevant=labels[retrieved] == labels[:, None],
        n_relevant=torch.full((n,), 3),
        labels=labels,
    )
    metrics = {"map@5": torch.rand(n), "cmc@1": torch.rand(n), "precision@5": torch.rand(n)}
    fig = viz.draw_queries(results, [0, 5], df, k=10, metrics=metrics)
    renderer = render(fig)
    texts = visible_texts(fig)
    assert len(texts) >= 2 * 11 * 2  # titles and captions of 22 images, plus the suptitle
    assert _overlaps(fig, renderer) == []
    for text in texts:  # nothing cut off at the figure's edges
        box = text.get_window_extent(renderer)
        assert box.x0 >= -1 and box.x1 <= fig.bbox.x1 + 1 and box.y0 >= -1 and box.y1 <= fig.bbox.y1 + 1
    single = viz.draw_query(results, 2, df, k=10, metrics={"map@5": 0.25})
    assert _overlaps(single, render(single)) == []


# -- embeddings, distances, history ----------------------------------------------------------------


def test_pca_2d_matches_svd_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    coords, ratio = viz.pca_2d(torch.tensor(x, dtype=torch.float32))
    centered = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centered, full_matrices=False)
    np.testing.assert_allclose(np.abs(coords), np.abs(u[:, :2] * s[:2]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ratio, (s**2 / (s**2).sum())[:2], rtol=1e-5)
    np.testing.assert_array_equal(viz.pca_2d(x[::-1].copy())[0], viz.pca_2d(x[::-1].copy())[0])
    line = np.outer(np.arange(5.0), [1.0, 0.0, 0.0])
    coords, ratio = viz.pca_2d(line)
    np.testing.assert_allclose(coords[:, 0], np.arange(5.0) - 2.0, atol=1e-9)
    np.testing.assert_allclose(ratio, [1.0, 0.0], atol=1e-9)


def test_plot_embeddings_2d_colours_by_label():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(30, 5))
    labels = np.array(["ant", "bee", "cat"])[np.arange(30) % 3]
    fig = viz.plot_embeddings_2d(emb, labels)
    (ax,) = fig.axes
    coords, ratio = viz.pca_2d(emb)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ant", "bee", "cat"]
    for collection, name in zip(ax.collections, ["ant", "bee", "cat"], strict=True):
        np.testing.assert_allclose(collection.get_offsets(), coords[labels == name])
    assert len({tuple(c.get_facecolor()[0]) for c in ax.collections}) == 3
    assert ax.get_xlabel() == f"PC1 ({ratio[0]:.1%} of variance)"
    many = viz.plot_embeddings_2d(rng.normal(size=(60, 3)), np.arange(60) % 30)
    assert many.axes[0].get_legend() is None  # 30 labels: no legend, still 30 distinct series
    assert len(many.axes[0].collections) == 30
    with pytest.raises(ValueError, match="labels has 29 values for 30 embeddings"):
        viz.plot_embeddings_2d(emb, labels[:29])


def test_distance_histograms_from_results(hand_results):
    fig = viz.plot_distance_histograms(hand_results)
    (ax,) = fig.axes
    (legend,) = fig.legends
    pos = hand_results.distances[hand_results.relevant].numpy()
    neg = hand_results.distances[(hand_results.retrieved >= 0) & ~hand_results.relevant].numpy()
    assert (len(pos), len(neg)) == (4, 7)
    assert [t.get_text() for t in legend.get_texts()] == [
        f"positive (same label): n=4, median {np.median(pos):.3g}",
        f"negative (other label): n=7, median {np.median(neg):.3g}",
    ]
    medians = [line.get_xdata()[0] for line in ax.get_lines()]
    np.testing.assert_allclose(medians, [np.median(pos), np.median(neg)], rtol=1e-6)
    for container in ax.containers:  # densities: each histogram integrates to 1
        area = sum(p.get_height() * p.get_width() for p in container.patches)
        assert area == pytest.approx(1.0)


def test_distance_samples_match_brute_force():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(9, 3)).astype(np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    is_query = np.array([1, 1, 0, 1, 0, 1, 1, 0, 0], bool)
    is_gallery = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1], bool)
    seq = np.array([0, 1, 2, 3, 3, 4, 5, 6, 7])
    pos, neg = viz.distance_samples(emb, labels, is_query, is_gallery, sequence_ids=seq)
    want_pos, want_neg = [], []
    for q in np.flatnonzero(is_query):
        for g in np.flatnonzero(is_gallery):
            if g == q or seq[g] == seq[q]:
                continue
            d = float(np.linalg.norm(emb[q] - emb[g]))
            (want_pos if labels[q] == labels[g] else want_neg).append(d)
    np.testing.assert_allclose(np.sort(pos), np.sort(want_pos), rtol=1e-5)
    np.testing.assert_allclose(np.sort(neg), np.sort(want_neg), rtol=1e-5)
    _, few = viz.distance_samples(emb, labels, is_query, is_gallery, max_negatives=4)
    _, every = viz.distance_samples(emb, labels, is_query, is_gallery)
    assert len(few) == 4 and len(every) > 4 and set(few) <= set(every)  # a sample of the same distances
    two_queries, _ = viz.distance_samples(emb, labels, is_query, is_gallery, max_queries=2, seed=1)
    assert 0 < len(two_queries) < len(want_pos)


def test_real_retrieval_and_per_query_metrics_drive_the_worst_queries(tmp_path):
    from labkit.metrics import metrics_from_results
    from labkit.retrieval import retrieve

    labels = np.arange(10) % 3
    df = make_items(tmp_path, labels.tolist())
    emb = np.random.default_rng(3).normal(size=(10, 4)).astype(np.float32)
    results = retrieve(emb, labels, np.ones(10, bool), np.ones(10, bool), k=4)
    flat = viz.per_query_metrics(metrics_from_results(results, cmc_k=(1,), map_k=(3,), reduce=False))
    assert sorted(flat) == ["cmc@1", "map@3", "precision@5"]
    relevant_first = results.relevant[:, 0].float()
    np.testing.assert_array_equal(flat["cmc@1"].numpy(), relevant_first.numpy())
    fig = viz.draw_worst_queries(results, flat["map@3"], df, n=3, k=4, metric_name="map@3")
    rows = [ax.get_gid() for ax in fig.axes if (ax.get_gid() or "").startswith("query:")]
    assert rows == [f"query:{q}" for q in viz.worst_queries(flat["map@3"], n=3)]
    with pytest.raises(ValueError, match="reduce=False"):
        viz.per_query_metrics(metrics_from_results(results))


def test_distance_histograms_from_arrays_and_errors():
    fig = viz.plot_distance_histograms(positive=[0.1, 0.2, 0.3], negative=np.array([0.8, 0.9, np.inf]))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["positive (same label): n=3, median 0.2", "negative (other label): n=2, median 0.85"]
    with pytest.raises(ValueError, match="both positive= and negative="):
        viz.plot_distance_histograms(positive=[0.1])


def test_plot_history_curves_and_columns():
    history = pd.DataFrame(
        {
            "epoch": [0, 1, 2],
            "loss": [np.nan, 0.9, 0.4],
            "cmc@1": [0.2, 0.5, 0.7],
            "map@5": [0.1, 0.3, 0.6],
            "shapes/cmc@1": [0.0, 0.4, 0.8],
            "lr": [0.1, 0.1, 0.01],
        }
    )
    fig = viz.plot_history(history)
    loss_ax, metric_ax = fig.axes
    (loss_line,) = loss_ax.get_lines()
    assert loss_line.get_xdata().tolist() == [1, 2] and loss_line.get_ydata().tolist() == [0.9, 0.4]
    assert [line.get_label() for line in metric_ax.get_lines()] == ["cmc@1", "map@5"]
    assert metric_ax.get_lines()[1].get_ydata().tolist() == [0.1, 0.3, 0.6]
    assert [t.get_text() for t in metric_ax.get_legend().get_texts()] == ["cmc@1", "map@5"]
    picked = viz.plot_history(history, metrics=["shapes/cmc@1"])
    assert [line.get_label() for line in picked.axes[1].get_lines()] == ["shapes/cmc@1"]
    only_metrics = viz.plot_history(history.drop(columns="loss"))
    assert len(only_metrics.axes) == 1
    with pytest.raises(ValueError, match=r"no column \['map@10'\]"):
        viz.plot_history(history, metrics=["map@10"])
    with pytest.raises(ValueError, match="no 'epoch' column"):
        viz.plot_history(history.drop(columns="epoch"))
    # a two-stage history (rerank.fit_combined_reranker): each stage's loss is its own line, not joined
    staged = history.assign(loss=[np.nan, 0.9, np.nan], tuned_loss=[np.nan, np.nan, 0.2])
    lines = viz.plot_history(staged).axes[0].get_lines()
    assert [(line.get_label(), line.get_xdata().tolist()) for line in lines] == [
        ("loss", [1]),
        ("tuned_loss", [2]),
    ]


def test_figures_render_headless_to_png(tmp_path, hand_results, items):
    assert matplotlib.get_backend().lower() == "agg"
    fig = viz.draw_query(hand_results, 0, items, k=3)
    png = viz.figure_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # notebooks show it even without pyplot
    path = viz.save_figure(fig, tmp_path / "figs" / "q.png")
    assert Image.open(path).size[0] > 300
    with pytest.raises(FileExistsError, match="overwrite=True"):
        viz.save_figure(fig, path, overwrite=False)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert all(isinstance(a, AxesImage) for ax in fig.axes for a in ax.get_images())


def test_other_figures_have_no_overlapping_text():
    rng = np.random.default_rng(4)
    history = pd.DataFrame(
        {"epoch": np.arange(6), "loss": [np.nan, *rng.random(5)]}
        | {f"{name}@{k}": rng.random(6) for name in ("cmc", "precision", "map") for k in (1, 5, 10)}
    )
    figures = [
        viz.plot_history(history),
        viz.plot_embeddings_2d(
            rng.normal(size=(80, 6)), [f"a rather long label {i % 16}" for i in range(80)]
        ),
        viz.plot_distance_histograms(positive=rng.random(50), negative=rng.random(500) + 0.5),
    ]
    for fig in figures:
        assert _overlaps(fig, render(fig)) == []
