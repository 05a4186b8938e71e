"""Pair mining, the pairwise model, its training and the pairwise re-ranker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from labkit.metrics import flatten_metrics, metrics_from_results
from labkit.rerank import (
    PairwiseModel,
    PairwiseReranker,
    load_pairwise,
    method_summary,
    mine_pairs,
    most_changed_query,
    ranking_changes,
    save_pairwise,
    select_queries,
    train_pairwise,
)
from labkit.retrieval import RetrievalResults, retrieve


# ------------------------------------------------------------------------------------------------- mining
def test_mine_pairs_hardest_positive_and_negative_of_a_hand_built_batch():
    # 1-d embeddings: label 0 at 0, 1, 3 and label 1 at 5, 6
    emb = torch.tensor([[0.0], [1.0], [5.0], [6.0], [3.0]])
    ids1, ids2, is_negative = mine_pairs(emb, [0, 0, 1, 1, 0])
    pairs = list(zip(ids1.tolist(), ids2.tolist(), is_negative.tolist(), strict=True))
    # farthest same-label item: 0->4, 1->4, 2->3, 3->2, 4->0 ; closest other-label item: 0->2, 1->2, 2->4,
    # 3->4, 4->2 ; unordered pairs deduplicated, positives first
    assert pairs == [
        (0, 4, False),
        (1, 4, False),
        (2, 3, False),
        (0, 2, True),
        (1, 2, True),
        (2, 4, True),
        (3, 4, True),
    ]


def test_mine_pairs_all_pairs_and_lonely_anchors():
    emb = torch.zeros(5, 2)
    ids1, ids2, is_negative = mine_pairs(emb, torch.tensor([7, 7, 3, 3, 9]), hard=False)
    positives = {
        (a, b) for a, b, n in zip(ids1.tolist(), ids2.tolist(), is_negative.tolist(), strict=True) if not n
    }
    negatives = {
        (a, b) for a, b, n in zip(ids1.tolist(), ids2.tolist(), is_negative.tolist(), strict=True) if n
    }
    assert positives == {(0, 1), (2, 3)}
    assert negatives == {(0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (2, 4), (3, 4)}
    # hard mining: item 4 (label 9) has no positive, so no positive pair names it; ties go to the lowest id
    ids1, ids2, is_negative = mine_pairs(emb, [7, 7, 3, 3, 9])
    assert not any(
        4 in (a, b)
        for a, b, n in zip(ids1.tolist(), ids2.tolist(), is_negative.tolist(), strict=True)
        if not n
    )
    assert sorted(zip(ids1[is_negative].tolist(), ids2[is_negative].tolist(), strict=True)) == [
        (0, 2),
        (0, 3),
        (0, 4),
        (1, 2),
    ]


def test_mine_pairs_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="labels"):
        mine_pairs(torch.zeros(4, 3), [0, 1, 2])


# -------------------------------------------------------------------------------------------------- model
def _tiny_extractor():
    from labkit.models import create_extractor

    torch.manual_seed(0)
    return create_extractor("resnet10t", image_size=32)


def test_pairwise_model_starts_from_the_extractor_backbone():
    extractor = _tiny_extractor().eval()
    model = PairwiseModel.from_extractor(extractor, hidden_dims=(8,)).eval()
    images = torch.rand(2, 3, 32, 32)
    # the widened first convolution answers a pair of identical images as the extractor answers one image
    first = extractor.backbone.pretrained_cfg["first_conv"]
    conv6 = model.backbone.get_submodule(first)
    conv3 = extractor.backbone.get_submodule(first)
    assert conv6.weight.shape[1] == 6
    torch.testing.assert_close(conv6(torch.cat([images, images], 1)), conv3(images), atol=1e-5, rtol=1e-4)
    # every other backbone weight is the extractor's
    theirs = extractor.backbone.state_dict()
    for key, value in model.backbone.state_dict().items():
        if key != f"{first}.weight":
            assert torch.equal(value, theirs[key]), key
    assert model(images, images).shape == (2,)
    stacked = PairwiseModel.from_extractor(extractor, hidden_dims=(8,), concat="height").eval()
    assert torch.equal(stacked.backbone.get_submodule(first).weight, conv3.weight)
    assert stacked(images, images).shape == (2,)


def test_frozen_backbone_gets_no_gradient_and_keeps_its_batchnorm_statistics():
    model = PairwiseModel("resnet10t", hidden_dims=(8,), freeze_backbone=True)
    model.train()
    assert not model.backbone.training and model.head.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model(torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    model.unfreeze()
    assert model.backbone.training and all(p.requires_grad for p in model.backbone.parameters())


def test_pairwise_model_save_and_load_round_trip(tmp_path):
    model = PairwiseModel("resnet10t", hidden_dims=(8,)).eval()
    path = save_pairwise(model, tmp_path / "pairwise.pt")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pairwise(model, path)
    loaded = load_pairwise(path).eval()
    x1, x2 = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded(x1, x2), model(x1, x2))
    assert loaded.config == model.config


# ---------------------------------------------------------------------------------------------- re-ranker
class ProductScorer(nn.Module):
    """A stand-in pairwise model: logit = product of the two one-pixel "images"."""

    def forward(self, images1: torch.Tensor, images2: torch.Tensor) -> torch.Tensor:
        return (images1 * images2).flatten(1).sum(1)


def _random_results(rng: np.random.Generator, n_queries: int, k: int, n_items: int) -> RetrievalResults:
    labels = torch.from_numpy(rng.integers(0, 3, n_items))
    query_ids = torch.from_numpy(rng.integers(0, n_items, n_queries))
    retrieved = torch.full((n_queries, k), -1)
    distances = torch.full((n_queries, k), float("inf"))
    for row in range(n_queries):
        n_valid = int(rng.integers(0, min(k, n_items) + 1))
        retrieved[row, :n_valid] = torch.from_numpy(rng.choice(n_items, n_valid, replace=False))
        distances[row, :n_valid] = torch.from_numpy(np.sort(rng.random(n_valid)).astype(np.float32))
    relevant = (labels[retrieved.clamp(min=0)] == labels[query_ids][:, None]) & (retrieved >= 0)
    return RetrievalResults(distances, retrieved, query_ids, relevant, relevant.sum(1), labels)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_queries=st.integers(1, 6),
    k=st.integers(1, 8),
    n_items=st.integers(1, 15),
    top_n=st.integers(1, 10),
)
def test_rerank_only_reorders_inside_top_n_and_keeps_every_item(seed, n_queries, k, n_items, top_n):
    rng = np.random.default_rng(seed)
    results = _random_results(rng, n_queries, k, n_items)
    images = torch.from_numpy(rng.normal(size=(n_items, 1, 1, 1)).astype(np.float32))
    reranker = PairwiseReranker(top_n, ProductScorer(), batch_size=4)
    out = reranker.rerank(results, images)
    n = min(top_n, k)
    old, new = results.retrieved, out.retrieved
    assert torch.equal(new[:, n:], old[:, n:])  # the rest keeps its order
    assert torch.equal(new.sort(dim=1).values, old.sort(dim=1).values)  # every item (and padding) kept
    assert torch.equal(new[:, :n].sort(dim=1).values, old[:, :n].sort(dim=1).values)
    assert torch.equal(out.query_ids, results.query_ids) and torch.equal(out.n_relevant, results.n_relevant)
    assert torch.equal(
        out.relevant, (out.labels[new.clamp(min=0)] == out.labels[out.query_ids][:, None]) & (new >= 0)
    )
    assert bool((out.distances[:, 1:] >= out.distances[:, :-1]).all())
    assert torch.equal(torch.isinf(out.distances), new < 0)
    # inside the top_n the model's logits descend
    logits = (
        images.flatten()[new[:, :n].clamp(min=0)] * images.flatten()[out.query_ids][:, None]
    ).masked_fill(new[:, :n] < 0, -float("inf"))
    assert bool((logits[:, 1:] <= logits[:, :-1]).all())
    assert reranker.pairs_scored == int((old[:, :n] >= 0).sum())


def test_rerank_hand_case_orders_by_logit_and_shifts_the_rest():
    labels = torch.tensor([0, 0, 1, 0, 1])
    results = RetrievalResults(
        distances=torch.tensor([[0.1, 0.2, 0.3, 0.4]]),
        retrieved=torch.tensor([[2, 1, 3, 4]]),
        query_ids=torch.tensor([0]),
        relevant=torch.tensor([[False, True, True, False]]),
        n_relevant=torch.tensor([2]),
        labels=labels,
    )
    images = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0]).view(5, 1, 1, 1)  # logits with item 0: -1, 2, 0.5
    out = PairwiseReranker(3, ProductScorer()).rerank(results, images)
    assert out.retrieved.tolist() == [[1, 3, 2, 4]]
    assert out.relevant.tolist() == [[True, True, False, False]]
    expected_top = torch.sigmoid(-torch.tensor([2.0, 0.5, -1.0]))
    torch.testing.assert_close(out.distances[0, :3], expected_top)
    # 0.4 is below the new top's largest distance sigmoid(1) = 0.731: shifted just enough
    torch.testing.assert_close(out.distances[0, 3], expected_top[2])


def test_rerank_rows_ascend_across_the_top_n_boundary_despite_rounding():
    # the rest is shifted up to the new top's largest distance; a + (b - a) rounds below b for ~3% of
    # float32 pairs, so many rows whose rest must move up catch a boundary that fails to ascend
    rng = np.random.default_rng(0)
    n_queries, n_items = 3000, 50
    retrieved = torch.from_numpy(np.stack([rng.choice(n_items, 4, replace=False) for _ in range(n_queries)]))
    distances = torch.from_numpy(np.sort(rng.random((n_queries, 4)).astype(np.float32) * 0.1, axis=1))
    labels = torch.zeros(n_items, dtype=torch.int64)
    query_ids = torch.from_numpy(rng.integers(0, n_items, n_queries))
    relevant = torch.ones(n_queries, 4, dtype=torch.bool)
    results = RetrievalResults(distances, retrieved, query_ids, relevant, torch.full((n_queries,), 4), labels)
    images = torch.from_numpy(rng.normal(size=(n_items, 1, 1, 1)).astype(np.float32))
    out = PairwiseReranker(2, ProductScorer(), batch_size=4096).rerank(results, images)
    assert bool((out.distances[:, 1:] >= out.distances[:, :-1]).all())
    assert torch.equal(out.retrieved[:, 2:], retrieved[:, 2:])


def test_rerank_with_a_dataset_and_metrics(figures_df):
    from labkit.data import validation_dataset
    from labkit.metrics import metrics_from_results

    extractor = _tiny_extractor().eval()
    dataset = validation_dataset(figures_df, extractor.transforms())
    images = torch.stack([dataset[i]["input_tensors"] for i in range(len(dataset))])
    with torch.no_grad():
        emb = extractor(images)
    results = retrieve(emb, dataset.labels, dataset.is_query, dataset.is_gallery, k=6)
    model = PairwiseModel.from_extractor(extractor, hidden_dims=(8,))
    from_dataset = PairwiseReranker(4, model, batch_size=16).rerank(results, dataset)
    from_tensor = PairwiseReranker(4, model, batch_size=7).rerank(results, images)
    assert torch.equal(from_dataset.retrieved, from_tensor.retrieved)
    metrics = metrics_from_results(from_dataset)
    assert metrics["overall"]["n_queries"] == len(results)
    half = select_queries(results, [0, 2])
    assert torch.equal(half.retrieved, results.retrieved[[0, 2]]) and len(half) == 2


# --------------------------------------------------------------------------------------------------- training
def test_training_on_mined_pairs_reduces_the_bce_loss(figures_df, tmp_path):
    from labkit.data import train_dataset

    extractor = _tiny_extractor()
    data = train_dataset(figures_df, extractor.transforms(train=False))  # no augmentation: same pairs
    n_labels, counts = np.unique(data.labels, return_counts=True)
    torch.manual_seed(0)
    model = PairwiseModel.from_extractor(extractor, hidden_dims=(16,))
    # every batch holds every image, so every epoch mines the same hard pairs from the frozen extractor
    model, history = train_pairwise(
        model,
        extractor,
        data,
        epochs=4,
        n_labels=len(n_labels),
        n_instances=int(counts.min()),
        lr=1e-3,
        progress=False,
        accelerator="cpu",
        out_dir=tmp_path,
    )
    assert list(history["epoch"]) == [0, 1, 2, 3, 4]
    assert history["pairs"].iloc[1:].nunique() == 1 and history["pairs"].iloc[1] > 0
    assert history["loss"].iloc[-1] < history["loss"].iloc[1]
    assert (tmp_path / "logs" / "metrics.csv").is_file()
    assert not model.training


def test_reporting_helpers_on_hand_built_results():
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    before = RetrievalResults(
        distances=torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]),
        retrieved=torch.tensor([[2, 1, 3], [0, 4, 1]]),
        query_ids=torch.tensor([0, 5]),
        relevant=torch.tensor([[False, True, True], [False, True, False]]),
        n_relevant=torch.tensor([2, 2]),
        labels=labels,
    )
    after = before.reordered(torch.tensor([[1, 3, 2], [0, 4, 1]]), before.distances)
    assert ranking_changes(before, after, 3).tolist() == [3, 0]
    assert ranking_changes(before, after, 1).tolist() == [1, 0]
    assert most_changed_query(before, after, k=3) == 0
    row = method_summary(after, seconds=1.5, pairs_scored=6)
    flat = flatten_metrics(metrics_from_results(after, cmc_k=(1,), precision_k=(5,), map_k=(5,)))
    assert row == {
        "cmc@1": 0.5,  # query 0 now starts with a relevant item, query 5 still does not
        "precision@5": flat["precision@5"],
        "map@5": flat["map@5"],
        "seconds": 1.5,
        "pairs_scored": 6,
    }
    with pytest.raises(ValueError, match="cmc@k"):
        method_summary(after, seconds=0, columns=("recall@1",))


# ------------------------------------------------------------------------------------ feature pair model
def _feature_setup(figures_df):
    from labkit.data import train_dataset, validation_dataset

    extractor = _tiny_extractor().eval()
    train = train_dataset(figures_df, extractor.transforms())
    valid = validation_dataset(figures_df, extractor.transforms())
    train_images = torch.stack([train[i]["input_tensors"] for i in range(len(train))])
    valid_images = torch.stack([valid[i]["input_tensors"] for i in range(len(valid))])
    with torch.no_grad():
        emb = extractor(valid_images)
    results = retrieve(emb, valid.labels, valid.is_query, valid.is_gallery, k=8)
    return extractor, train, train_images, valid_images, results


def test_feature_model_encodes_the_extractor_embedding_and_is_symmetric():
    from labkit.rerank import FeaturePairModel

    extractor = _tiny_extractor().eval()
    model = FeaturePairModel(extractor, n_stages=2)
    images = torch.rand(3, 3, 32, 32)
    encoded = model.encode(images)
    torch.testing.assert_close(model.embeddings(encoded), extractor(images), atol=1e-6, rtol=1e-5)
    a, b = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    ea, eb = model.encode(a), model.encode(b)
    d = (model.embeddings(ea) - model.embeddings(eb)).norm(dim=1)
    torch.testing.assert_close(model.interactions(ea, eb, d), model.interactions(eb, ea, d))
    # the untrained head corrects nothing
    assert torch.equal(model.score(ea, eb, d), d)


def test_feature_model_views_compare_turned_and_mirrored_images(tmp_path):
    from labkit.rerank import FeaturePairModel

    extractor = _tiny_extractor().eval()
    with pytest.raises(ValueError, match="views must be one of"):
        FeaturePairModel(extractor, n_stages=2, views=3)
    plain, model = FeaturePairModel(extractor, n_stages=2), FeaturePairModel(extractor, n_stages=2, views=8)
    assert model.n_inputs == plain.n_inputs + 2
    a = torch.rand(2, 3, 32, 32)
    b = torch.stack([torch.rot90(a[0], 1, dims=(-2, -1)), torch.flip(a[1], dims=(-1,))])
    ea, eb = model.encode(a), model.encode(b)
    torch.testing.assert_close(model.embeddings(ea), extractor(a), atol=1e-6, rtol=1e-5)
    d = (model.embeddings(ea) - model.embeddings(eb)).norm(dim=1)
    raw = model.interactions(ea, eb, d)
    torch.testing.assert_close(raw, model.interactions(eb, ea, d))
    # b is a turned / mirrored copy of a: some view of one matches the other exactly, so the best cosine
    # across views is 1, and the view-averaged embeddings (the same set of views) coincide
    torch.testing.assert_close(raw[:, -1], torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[:, -2], torch.ones(2), atol=1e-5, rtol=0)
    assert bool((raw[:, 1] < 0.9999).all())  # while the plain embeddings differ
    assert torch.equal(model.score(ea, eb, d), d)  # untrained: no correction
    torch.nn.init.normal_(model.heads[0][-1].weight, std=1.0)
    loaded = load_pairwise(save_pairwise(model, tmp_path / "views.pt"))
    assert loaded.config["views"] == 8
    assert torch.equal(loaded(a, b), model(a, b))


def test_untrained_feature_reranker_returns_exactly_the_baseline(figures_df):
    from labkit.rerank import FeaturePairModel

    extractor, _, _, valid_images, results = _feature_setup(figures_df)
    model = FeaturePairModel(extractor, n_stages=2)
    out = PairwiseReranker(5, model, batch_size=16).rerank(results, valid_images)
    assert torch.equal(out.retrieved, results.retrieved)
    assert torch.equal(out.distances, results.distances)
    assert torch.equal(out.relevant, results.relevant)


def test_feature_reranker_never_touches_ranks_beyond_top_n(figures_df):
    from labkit.rerank import FeaturePairModel

    extractor, _, _, valid_images, results = _feature_setup(figures_df)
    torch.manual_seed(1)
    model = FeaturePairModel(extractor, n_stages=2, n_heads=1)
    torch.nn.init.normal_(model.heads[0][-1].weight, std=100.0)  # a correction that changes the order a lot
    out = PairwiseReranker(3, model).rerank(results, valid_images)
    assert torch.equal(out.retrieved[:, 3:], results.retrieved[:, 3:])
    assert torch.equal(out.retrieved[:, :3].sort(1).values, results.retrieved[:, :3].sort(1).values)
    assert not torch.equal(out.retrieved[:, :3], results.retrieved[:, :3])
    assert bool((out.distances[:, 1:] >= out.distances[:, :-1]).all())


def test_split_train_classes_and_class_folds_are_class_disjoint_and_seeded():
    from labkit.rerank import class_folds, split_train_classes

    labels = np.repeat(np.arange(10), 3)
    fit, holdout = split_train_classes(labels, 0.25, seed=3)
    assert not set(labels[fit]) & set(labels[holdout])
    assert len(set(labels[holdout])) == 2 and fit.sum() + holdout.sum() == len(labels)
    again = split_train_classes(labels, 0.25, seed=3)
    assert np.array_equal(again[1], holdout)
    with pytest.raises(ValueError, match="at least 4 classes"):
        split_train_classes([0, 0, 1, 1, 2], 0.25)
    folds = class_folds(labels, 3, seed=0)
    held = [set(labels[f]) for f in folds]
    assert [len(h) for h in held] == [4, 3, 3] and set().union(*held) == set(range(10))
    assert not (held[0] & held[1] or held[0] & held[2] or held[1] & held[2])
    with pytest.raises(ValueError, match="fewer folds"):
        class_folds(labels, 6)


def test_neighbour_pairs_hand_case_hold_both_labels():
    from labkit.rerank import neighbour_pairs

    emb = torch.tensor([[0.0], [1.0], [3.0], [10.0], [2.0]])
    labels = [0, 0, 1, 1, 0]
    mask = np.array([True, True, True, False, True])  # item 3 is left out
    ids1, ids2, dist, same = neighbour_pairs(emb, labels, mask, 2)
    pairs = list(zip(ids1.tolist(), ids2.tolist(), same.tolist(), strict=True))
    # nearest two among {0, 1, 2, 4}: 0 -> 1, 4; 1 -> 0, 4 (tie with 2 broken by item order: 0 first);
    # 2 -> 4, 1; 4 -> 1, 2
    assert pairs == [
        (0, 1, True), (0, 4, True), (1, 0, True), (1, 4, True), (2, 4, False), (2, 1, False),
        (4, 1, True), (4, 2, False),
    ]  # fmt: skip
    assert dist.tolist() == [1.0, 2.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0]
    assert same.any() and (~same).any()


def test_fit_feature_reranker_trains_on_fit_classes_only_and_reloads_identically(figures_df, tmp_path):
    from labkit.rerank import FeaturePairModel, fit_feature_reranker

    extractor, train, train_images, valid_images, results = _feature_setup(figures_df)
    model = FeaturePairModel(extractor, n_stages=2)
    model, history = fit_feature_reranker(
        model, train_images, train.labels, top_n=3, epochs=3, seed=0,
        val_results=results, val_images=valid_images,
    )  # fmt: skip
    assert list(history["epoch"]) == [0, 1, 2, 3]
    assert int(history["chosen"].sum()) == 1
    assert history.loc[history["chosen"], "epoch"].item() == history.attrs["best_epoch"]
    # 4 train classes, 4 heads: 2 folds of 2 held-out classes each, every class held out once
    folds = history.attrs["folds"]
    assert len(folds) == 2 and len(model.heads) == 4
    for fold in folds:
        fit_classes, holdout_classes = set(fold["fit_classes"]), set(fold["holdout_classes"])
        assert len(holdout_classes) == 2 and not fit_classes & holdout_classes
        assert fit_classes | holdout_classes == set(np.unique(train.labels).tolist())
    assert sorted(c for f in folds for c in f["holdout_classes"]) == sorted(np.unique(train.labels).tolist())
    # epoch 0 is the baseline: the validation metrics of the results as they are
    flat = flatten_metrics(metrics_from_results(results, cmc_k=(1,), precision_k=(5,), map_k=(5,)))
    assert history.loc[0, "cmc@1"] == pytest.approx(flat["cmc@1"])
    # make the heads non-trivial, so that equality after reloading means something
    for head in model.heads:
        torch.nn.init.normal_(head[-1].weight, std=100.0)
    path = save_pairwise(model, tmp_path / "features.pt")
    loaded = load_pairwise(path)
    assert type(loaded) is FeaturePairModel and loaded.config == model.config
    a = PairwiseReranker(5, model).rerank(results, valid_images)
    b = PairwiseReranker(5, loaded).rerank(results, valid_images)
    assert torch.equal(a.retrieved, b.retrieved) and torch.equal(a.distances, b.distances)
    assert not torch.equal(a.retrieved, results.retrieved)


# --------------------------------------------------------------------------------- fine-tuned pair model
def test_untrained_tuned_reranker_returns_exactly_the_baseline(figures_df):
    from labkit.rerank import TunedPairModel

    extractor, _, _, valid_images, results = _feature_setup(figures_df)
    model = TunedPairModel(extractor)
    images = valid_images[:4]
    encoded = model.encode(images)
    torch.testing.assert_close(model.embeddings(encoded), extractor(images), atol=1e-6, rtol=1e-5)
    d = (model.embeddings(encoded[:2]) - model.embeddings(encoded[2:])).norm(dim=1)
    torch.testing.assert_close(model.score(encoded[:2], encoded[2:], d), 2 * d)  # the copy's distance = d
    out = PairwiseReranker(5, model, batch_size=16).rerank(results, valid_images)
    assert torch.equal(out.retrieved, results.retrieved)
    assert torch.equal(out.relevant, results.relevant)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        TunedPairModel(extractor, weight=-1)
    with pytest.raises(ValueError, match="labkit Extractor"):
        TunedPairModel(nn.Linear(2, 2))


def test_fit_tuned_reranker_trains_the_copy_only_and_reloads_identically(figures_df, tmp_path):
    from labkit.rerank import TunedPairModel, fit_tuned_reranker

    extractor, train, train_images, valid_images, results = _feature_setup(figures_df)
    before = {k: v.clone() for k, v in extractor.state_dict().items()}
    model = TunedPairModel(extractor)
    seen, steps = [], []
    model, history = fit_tuned_reranker(
        model, train_images, train.labels, top_n=3, epochs=2, steps_per_epoch=2, queries_per_step=4, seed=0,
        val_results=results, val_images=valid_images, on_epoch=lambda epoch, m: seen.append(epoch),
        on_step=lambda step, m: steps.append((step, m.training)),
    )  # fmt: skip
    assert list(history["epoch"]) == [0, 1, 2] and list(history["step"]) == [0, 2, 4]
    assert seen == [0, 1, 2]
    assert steps == [(1, True), (2, True), (3, True), (4, True)]
    assert history.loc[history["chosen"], "epoch"].item() == history.attrs["best_epoch"] == 2
    assert history.attrs["n_lists"] == len(train.labels)
    # epoch 0 is the baseline: the validation metrics of the results as they are
    flat = flatten_metrics(metrics_from_results(results, cmc_k=(1,), precision_k=(5,), map_k=(5,)))
    assert history.loc[0, "cmc@1"] == pytest.approx(flat["cmc@1"])
    assert np.isnan(history.loc[0, "loss"]) and bool((history.loc[1:, "loss"] > 0).all())
    # the frozen extractor is untouched (weights and batch-norm statistics); the copy moved
    for key, value in extractor.state_dict().items():
        assert torch.equal(value, before[key]), key
    moved = [k for k, v in model.tuned.state_dict().items() if not torch.equal(v, before[k])]
    assert moved
    out = PairwiseReranker(3, model).rerank(results, valid_images)
    assert torch.equal(out.retrieved[:, 3:], results.retrieved[:, 3:])
    assert torch.equal(out.retrieved[:, :3].sort(1).values, results.retrieved[:, :3].sort(1).values)
    assert bool((out.distances[:, 1:] >= out.distances[:, :-1]).all())
    path = save_pairwise(model, tmp_path / "tuned.pt")
    loaded = load_pairwise(path)
    assert type(loaded) is TunedPairModel and loaded.config == model.config
    pair_a, pair_b = valid_images[:6], valid_images[6:12]
    assert not torch.allclose(
        model(pair_a, pair_b), 2 * model.extractor(pair_a).sub(model.extractor(pair_b)).norm(dim=1)
    )
    assert torch.equal(loaded(pair_a, pair_b), model(pair_a, pair_b))  # the tuned copy's weights came back
    again = PairwiseReranker(3, loaded).rerank(results, valid_images)
    assert torch.equal(again.retrieved, out.retrieved) and torch.equal(again.distances, out.distances)
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        fit_tuned_reranker(model, train_images, train.labels, epochs=-1)


def test_fit_tuned_reranker_is_reproducible_with_several_threads(figures_df):
    """Same seed, same machine, two threads: identical weights (lists repeat images, so the step's embedding
    rows are gathered with repeats; a thread-order-dependent backward made runs differ)."""
    from labkit.rerank import TunedPairModel, fit_tuned_reranker

    extractor, train, train_images, _, _ = _feature_setup(figures_df)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fitted = []
        for _ in range(3):
            model, _ = fit_tuned_reranker(
                TunedPairModel(extractor), train_images, train.labels, epochs=2, steps_per_epoch=3, seed=0
            )
            fitted.append(model.tuned.state_dict())
    finally:
        torch.set_num_threads(threads)
    for state in fitted[1:]:
        for key, value in state.items():
            assert torch.equal(value, fitted[0][key]), key


# ------------------------------------------------------------------------------- both corrections at once
def test_untrained_combined_reranker_returns_exactly_the_baseline(figures_df):
    from labkit.rerank import CombinedPairModel, FeaturePairModel, TunedPairModel

    extractor, _, _, valid_images, results = _feature_setup(figures_df)
    model = CombinedPairModel(FeaturePairModel(extractor, n_stages=2), TunedPairModel(extractor, weight=0.5))
    encoded = model.encode(valid_images[:4])
    torch.testing.assert_close(model.embeddings(encoded), extractor(valid_images[:4]), atol=1e-6, rtol=1e-5)
    d = (model.embeddings(encoded[:2]) - model.embeddings(encoded[2:])).norm(dim=1)
    torch.testing.assert_close(model.score(encoded[:2], encoded[2:], d), 1.5 * d)  # zero heads, same copy
    out = PairwiseReranker(5, model, batch_size=16).rerank(results, valid_images)
    assert torch.equal(out.retrieved, results.retrieved)
    assert torch.equal(out.relevant, results.relevant)
    with pytest.raises(ValueError, match="share one extractor"):
        CombinedPairModel(FeaturePairModel(extractor, n_stages=2), TunedPairModel(_tiny_extractor()))
    with pytest.raises(ValueError, match="needs a FeaturePairModel and a TunedPairModel"):
        CombinedPairModel(TunedPairModel(extractor), TunedPairModel(extractor))


def test_fit_combined_reranker_adds_both_fitted_models_and_reloads_identically(figures_df, tmp_path):
    from labkit.rerank import (
        CombinedPairModel,
        FeaturePairModel,
        TunedPairModel,
        fit_combined_reranker,
        fit_feature_reranker,
        fit_tuned_reranker,
    )

    extractor, train, train_images, valid_images, results = _feature_setup(figures_df)
    options = {"top_n": 3, "seed": 0}
    feature_options, tuned_options = {"epochs": 3}, {"epochs": 2, "steps_per_epoch": 2, "queries_per_step": 4}
    model = CombinedPairModel(FeaturePairModel(extractor, n_stages=2), TunedPairModel(extractor, weight=0.5))
    model, history = fit_combined_reranker(
        model, train_images, train.labels, feature_options=feature_options, tuned_options=tuned_options,
        val_results=results, val_images=valid_images, **options,
    )  # fmt: skip
    assert list(history["epoch"]) == [0, 1, 2, 3, 4, 5]
    assert list(history["stage"]) == ["features"] * 4 + ["tuned"] * 2
    # each stage's own loss: the head's in `loss`, the fine-tuning's in `tuned_loss`
    assert history["loss"].iloc[1:4].notna().all() and history["loss"].iloc[4:].isna().all()
    assert history["tuned_loss"].iloc[:4].isna().all() and bool((history["tuned_loss"].iloc[4:] > 0).all())
    assert history["chosen"].tolist().count(True) == 2 and bool(history["chosen"].iloc[-1])
    assert history.attrs["tuned_epochs"] == 2 and 0 <= history.attrs["best_epoch"] <= 3
    flat = flatten_metrics(metrics_from_results(results, cmc_k=(1,), precision_k=(5,), map_k=(5,)))
    assert history.loc[0, "cmc@1"] == pytest.approx(flat["cmc@1"])  # epoch 0 is the baseline
    assert history["cmc@1"].notna().all()  # the fine-tuning epochs are measured with the combined score
    # the same as fitting both models on their own and adding their corrections
    features, _ = fit_feature_reranker(
        FeaturePairModel(extractor, n_stages=2), train_images, train.labels, **options, **feature_options
    )
    tuned, _ = fit_tuned_reranker(
        TunedPairModel(extractor, weight=0.5), train_images, train.labels, **options, **tuned_options
    )
    a, b = valid_images[:6], valid_images[6:12]
    d = (extractor(a) - extractor(b)).norm(dim=1)
    expected = features(a, b, d) + 0.5 * (tuned.tuned(a) - tuned.tuned(b)).norm(dim=1)
    torch.testing.assert_close(model(a, b, d), expected)
    assert not torch.allclose(model(a, b, d), 1.5 * d)  # it moved away from the baseline
    out = PairwiseReranker(3, model).rerank(results, valid_images)
    assert torch.equal(out.retrieved[:, 3:], results.retrieved[:, 3:])
    assert bool((out.distances[:, 1:] >= out.distances[:, :-1]).all())
    loaded = load_pairwise(save_pairwise(model, tmp_path / "combined.pt"))
    assert type(loaded) is CombinedPairModel and loaded.config == model.config
    assert torch.equal(loaded(a, b), model(a, b))
    again = PairwiseReranker(3, loaded).rerank(results, valid_images)
    assert torch.equal(again.retrieved, out.retrieved) and torch.equal(again.distances, out.distances)


def test_mirror_averaged_tuned_distance_keeps_the_baseline_untrained_and_adds_the_tuned_change(
    figures_df, tmp_path
):
    from labkit.rerank import CombinedPairModel, TunedPairModel

    extractor, _, _, valid_images, results = _feature_setup(figures_df)
    model = CombinedPairModel.from_extractor(extractor, weight=0.5, flip=True, n_stages=2)
    tuned = model.tuned
    assert tuned.flip and tuned.config == {"weight": 0.5, "flip": True}
    a, b = valid_images[:6], valid_images[6:12]
    d = (extractor(a) - extractor(b)).norm(dim=1)
    # untrained: the copy's change is exactly zero, so the tuned distance is the given distance
    torch.testing.assert_close(tuned.tuned_distances(tuned.encode_tuned(a), tuned.encode_tuned(b), d), d)
    for reranker in (model, TunedPairModel(extractor, flip=True)):
        out = PairwiseReranker(5, reranker, batch_size=16).rerank(results, valid_images)
        assert torch.equal(out.retrieved, results.retrieved)
    with torch.no_grad():  # a moved copy: distance + (tuned - extractor distance), both on mirror averages
        for parameter in tuned.tuned.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    model.eval()

    def averaged(net, images):
        with torch.no_grad():
            return torch.nn.functional.normalize(net(images) + net(images.flip(-1)), dim=1)

    change = (averaged(tuned.tuned, a) - averaged(tuned.tuned, b)).norm(dim=1)
    change = change - (averaged(extractor, a) - averaged(extractor, b)).norm(dim=1)
    assert change.abs().max() > 1e-3
    torch.testing.assert_close(model(a, b, d), model.features(a, b, d) + 0.5 * (d + change))
    loaded = load_pairwise(save_pairwise(model, tmp_path / "mirrored.pt"))
    assert loaded.tuned.flip and torch.equal(loaded(a, b, d), model(a, b, d))


def test_consensus_scores_gate_or_rank_by_both_models_by_hand():
    from labkit.rerank import consensus_scores

    inf = torch.inf
    distances = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.1, 0.2, inf]])
    head_alone = torch.tensor([[0.5, 0.1, 0.2], [0.5, 0.1, 0.2], [0.1, 0.3, inf]])
    copy_alone = torch.tensor([[0.4, 0.2, 0.3], [0.3, 0.5, 0.1], [0.4, 0.2, inf]])
    combined = torch.tensor([[0.9, 0.3, 0.5], [0.8, 0.6, 0.3], [0.5, 0.5, inf]])
    agree = consensus_scores(distances, head_alone, copy_alone, combined, "agree")
    # query 0: both put item 1 first -> the combined score; query 1 (1 vs 2) and 2 (0 vs 1): the baseline
    assert torch.equal(agree, torch.tensor([[0.9, 0.3, 0.5], [0.1, 0.2, 0.3], [0.1, 0.2, inf]]))
    borda = consensus_scores(distances, head_alone, copy_alone, combined, "borda")
    # ranks per item (head + copy + combined / 3): query 0 (2+2+2/3, 0+0+0, 1+1+1/3); query 1 (2+1+2/3,
    # 0+2+1/3, 1+0+0); query 2: a tie (0+1 against 1+0) broken by the combined ranks (0, 1/3: stable sort)
    expected = torch.tensor([[4 + 2 / 3, 0, 2 + 1 / 3], [3 + 2 / 3, 2 + 1 / 3, 1], [1, 1 + 1 / 3, inf]])
    torch.testing.assert_close(borda, expected)
    with pytest.raises(ValueError, match="consensus='vote' is not one of"):
        consensus_scores(distances, head_alone, copy_alone, combined, "vote")


@pytest.mark.parametrize("consensus", ["agree", "borda"])
def test_consensus_combined_reranker_keeps_the_baseline_untrained_and_reloads(
    figures_df, tmp_path, consensus
):
    from labkit.rerank import CombinedPairModel, consensus_scores

    extractor, _, _, valid_images, results = _feature_setup(figures_df)
    model = CombinedPairModel.from_extractor(extractor, consensus=consensus, n_stages=2)
    assert model.config["consensus"] == consensus
    out = PairwiseReranker(5, model, batch_size=16).rerank(results, valid_images)
    assert torch.equal(out.retrieved, results.retrieved)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # moved models: the re-ranked order is the consensus of their scores
        for parameter in [*model.tuned.tuned.parameters(), *model.features.parameters()]:
            if parameter.requires_grad:  # not the shared (frozen) extractor
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    out = PairwiseReranker(5, model, batch_size=16).rerank(results, valid_images)
    encoded = model.encode(valid_images)
    top = results.retrieved[:, :5]
    queries = results.query_ids[:, None].expand_as(top).reshape(-1)
    distances = results.distances[:, :5].float()
    with torch.no_grad():
        parts = model.score_parts(encoded[queries], encoded[top.reshape(-1)], distances.reshape(-1))
    head_alone, copy_alone, combined = (part.view_as(distances) for part in parts)
    scores = consensus_scores(distances, head_alone, copy_alone, combined, consensus)
    order = torch.argsort(scores, dim=1, stable=True)
    assert torch.equal(out.retrieved[:, :5], top.gather(1, order))
    assert not torch.equal(out.retrieved, results.retrieved)  # it moved
    assert torch.equal(out.retrieved[:, 5:], results.retrieved[:, 5:])
    assert bool((out.distances[:, 1:] >= out.distances[:, :-1]).all())
    loaded = load_pairwise(save_pairwise(model, tmp_path / f"{consensus}.pt"))
    assert loaded.consensus == consensus and loaded.config == model.config
    again = PairwiseReranker(5, loaded, batch_size=16).rerank(results, valid_images)
    assert torch.equal(again.retrieved, out.retrieved) and torch.equal(again.distances, out.distances)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_combined_reranker_on_cuda(figures_df):
    """04's default on a GPU (its accelerator "auto"): both fits run there and the re-ranker keeps its
    contract (only the top_n re-ordered, distances ascending)."""
    from labkit.rerank import CombinedPairModel, FeaturePairModel, TunedPairModel, fit_combined_reranker

    extractor, train, train_images, valid_images, results = _feature_setup(figures_df)
    model = CombinedPairModel(FeaturePairModel(extractor, n_stages=2), TunedPairModel(extractor, weight=0.5))
    model, history = fit_combined_reranker(
        model, train_images, train.labels, top_n=3, seed=0, device="cuda", feature_options={"epochs": 3},
        tuned_options={"epochs": 2, "steps_per_epoch": 2, "queries_per_step": 4},
        val_results=results, val_images=valid_images,
    )  # fmt: skip
    assert list(history["stage"]) == ["features"] * 4 + ["tuned"] * 2 and history["cmc@1"].notna().all()
    model = model.cpu()
    a, b = valid_images[:6], valid_images[6:12]
    d = (extractor(a) - extractor(b)).norm(dim=1)
    assert not torch.allclose(model(a, b, d), 1.5 * d)  # trained on the GPU: it moved from the baseline
    out = PairwiseReranker(3, model, device="cuda").rerank(results, valid_images)
    assert torch.equal(out.retrieved[:, 3:], results.retrieved[:, 3:])
    assert torch.equal(out.retrieved[:, :3].sort(1).values, results.retrieved[:, :3].sort(1).values)
    assert bool((out.distances[:, 1:] >= out.distances[:, :-1]).all())


def test_most_changed_query_can_prefer_improved_queries():
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    before = RetrievalResults(
        distances=torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]),
        retrieved=torch.tensor([[2, 1, 3], [5, 4, 1]]),
        query_ids=torch.tensor([0, 2]),
        relevant=torch.tensor([[False, True, True], [True, True, False]]),
        n_relevant=torch.tensor([2, 2]),
        labels=labels,
    )
    # query 0 improves with 2 changes; query 2 gets worse with 3 changes
    after = before.reordered(torch.tensor([[1, 2, 3], [1, 5, 4]]), before.distances)
    assert most_changed_query(before, after, k=3) == 1
    assert most_changed_query(before, after, k=3, improved=True) == 0


def test_mirror_averaged_encoding_runs_each_network_once_per_view(figures_df):
    from labkit.rerank import TunedPairModel

    extractor, _, _, valid_images, _ = _feature_setup(figures_df)
    model = TunedPairModel(extractor, flip=True)
    calls = {"extractor": 0, "tuned": 0}
    for name, net in (("extractor", model.extractor), ("tuned", model.tuned)):
        net.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    images = valid_images[:4]
    encoded = model.encode(images)
    assert calls == {"extractor": 2, "tuned": 2}  # plain + mirrored each; the plain embedding is reused
    with torch.no_grad():
        expected = torch.cat([extractor(images), model.encode_tuned(images)], dim=1)
    assert torch.equal(encoded, expected)
