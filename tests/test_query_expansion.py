"""Query expansion (average, alpha-weighted, database-side) and k-reciprocal re-ranking."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
import torch

from labkit.query_expansion import (
    RerankSizeError,
    k_reciprocal_distances,
    k_reciprocal_rerank,
    query_expansion,
)
from labkit.retrieval import retrieve


def _data(seed: int = 0, n: int = 60, dim: int = 6):
    rng = np.random.default_rng(seed)
    emb = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(n, dim)).astype(np.float32)), dim=1)
    labels = rng.integers(0, 5, n)
    is_query = rng.random(n) < 0.6
    is_gallery = rng.random(n) < 0.8
    is_gallery[~is_query] = True  # some items are both, some only gallery, some only query
    sequences = rng.integers(0, 20, n).astype(object)
    sequences[::5] = None
    return emb, labels, is_query, is_gallery, sequences


def _same(a, b) -> None:
    for f in fields(a):
        assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name


@pytest.mark.parametrize("with_sequences", [False, True])
def test_query_expansion_with_n_0_is_the_baseline(with_sequences):
    emb, labels, is_query, is_gallery, sequences = _data()
    seq = sequences if with_sequences else None
    baseline = retrieve(emb, labels, is_query, is_gallery, k=7, sequence_ids=seq)
    _same(query_expansion(emb, labels, is_query, is_gallery, n=0, k=7, sequence_ids=seq), baseline)
    _same(query_expansion(emb, labels, is_query, is_gallery, n=0, alpha=3, k=7, sequence_ids=seq), baseline)


def _brute_force(query_vecs, gallery_vecs, query_ids, gallery_ids, excluded, k):
    """(Q, k) ids and distances by a full sort, excluded[(q, g)] pairs skipped."""
    ids, dists = [], []
    for qi, q in zip(query_ids, query_vecs, strict=True):
        cand = [(float(np.linalg.norm(q - gallery_vecs[g])), g) for g in gallery_ids if not excluded(qi, g)]
        cand.sort()
        ids.append([g for _, g in cand[:k]])
        dists.append([d for d, _ in cand[:k]])
    return ids, dists


@pytest.mark.parametrize(
    ("n", "alpha", "db"), [(1, 0.0, False), (3, 0.0, False), (3, 3.0, False), (2, 1.0, True)]
)
def test_query_expansion_matches_a_brute_force_reading_of_its_definition(n, alpha, db):
    emb, labels, is_query, is_gallery, sequences = _data(1)
    x = emb.numpy().astype(np.float64)
    seq = np.array([("none", i) if s is None else s for i, s in enumerate(sequences)], dtype=object)
    gallery_ids = np.flatnonzero(is_gallery)
    query_ids = np.flatnonzero(is_query)

    def expand(vec, neighbours, table):
        weights = [
            max(float(vec @ table[g]) / np.linalg.norm(vec) / np.linalg.norm(table[g]), 0.0) ** alpha
            for g in neighbours
        ]
        mean = (vec + sum(w * table[g] for w, g in zip(weights, neighbours, strict=True))) / (
            1 + sum(weights)
        )
        return mean / np.linalg.norm(mean)

    table = x.copy()
    if db:  # every gallery item averaged with its own n nearest gallery items (itself excluded)
        near, _ = _brute_force(x[gallery_ids], x, gallery_ids, gallery_ids, lambda q, g: q == g, n)
        for g, nb in zip(gallery_ids, near, strict=True):
            table[g] = expand(x[g], nb, x)

    def excluded(q, g):
        return q == g or seq[q] == seq[g]

    first, _ = _brute_force(x[query_ids], table, query_ids, gallery_ids, excluded, n)
    expanded = np.stack([expand(x[q], nb, table) for q, nb in zip(query_ids, first, strict=True)])
    want_ids, want_dist = _brute_force(expanded, table, query_ids, gallery_ids, excluded, 6)

    got = query_expansion(
        emb, labels, is_query, is_gallery, n=n, alpha=alpha, k=6, db_augmentation=db, sequence_ids=sequences
    )
    assert got.retrieved.tolist() == want_ids
    np.testing.assert_allclose(got.distances.numpy(), np.array(want_dist), atol=1e-5)
    assert torch.equal(got.query_ids, torch.from_numpy(query_ids))
    assert torch.equal(
        got.n_relevant, retrieve(emb, labels, is_query, is_gallery, k=1, sequence_ids=sequences).n_relevant
    )


def test_query_expansion_pulls_a_query_towards_its_neighbourhood():
    # 2-d unit vectors: the query at 0 deg; a same-label pair at 20 and 25 deg, an impostor at -18 deg
    angles = np.deg2rad([0.0, 20.0, 25.0, -18.0])
    emb = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32)
    labels, is_query, is_gallery = [0, 0, 0, 1], [True, False, False, False], [False, True, True, True]
    assert retrieve(emb, labels, is_query, is_gallery, k=3).retrieved.tolist() == [[3, 1, 2]]
    # n=2 with the impostor and item 1: mean at about 0.7 deg -> the impostor stays first
    assert query_expansion(emb, labels, is_query, is_gallery, n=2, k=3).retrieved.tolist() == [[3, 1, 2]]
    # n=3: the mean of 0, -18, 20, 25 deg is at about 6.8 deg -> both same-label items precede the impostor
    out = query_expansion(emb, labels, is_query, is_gallery, n=3, k=3)
    assert out.retrieved.tolist() == [[1, 2, 3]]
    assert out.relevant.tolist() == [[True, True, False]]
    mean = emb.sum(0) / 4
    expected = torch.linalg.vector_norm(emb[[1, 2, 3]] - mean / mean.norm(), dim=1)
    torch.testing.assert_close(out.distances[0], expected)


def test_query_expansion_rejects_negative_parameters():
    emb, labels, is_query, is_gallery, _ = _data()
    with pytest.raises(ValueError, match="n, db_n and alpha must be >= 0"):
        query_expansion(emb, labels, is_query, is_gallery, n=-1)


# ----------------------------------------------------------------------------------------------- k-reciprocal
def _zhong_loop(dist: np.ndarray, n_query: int, k1: int, k2: int, lam: float) -> np.ndarray:
    """The paper's definitions item by item with Python sets (queries are the first n_query rows)."""
    m = len(dist)
    d = dist / dist.max(axis=1, keepdims=True)
    rank = [list(np.argsort(d[i], kind="stable")) for i in range(m)]

    def reciprocal(i, k):
        return {j for j in rank[i][: k + 1] if i in rank[j][: k + 1]}

    v = np.zeros((m, m))
    for i in range(m):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, int(round(k1 / 2)))
            if len(rc & r) > 2 / 3 * len(rc):
                expanded |= rc
        cols = sorted(expanded)
        w = np.exp(-d[i, cols])
        v[i, cols] = w / w.sum()
    v = np.stack([v[rank[i][:k2]].mean(axis=0) for i in range(m)])
    out = np.zeros((n_query, m - n_query))
    for q in range(n_query):
        for g in range(n_query, m):
            s = np.minimum(v[q], v[g]).sum()
            out[q, g - n_query] = (1 - lam) * (1 - s / (2 - s)) + lam * d[q, g]
    return out


@pytest.mark.parametrize(("n_query", "n_gallery", "k1", "k2"), [(4, 16, 3, 2), (6, 24, 20, 6), (3, 9, 2, 1)])
def test_k_reciprocal_distances_follow_the_definition(n_query, n_gallery, k1, k2):
    rng = np.random.default_rng(n_gallery)
    x = rng.normal(size=(n_query + n_gallery, 3))
    dist = ((x[:, None] - x[None]) ** 2).sum(-1)
    want = _zhong_loop(dist, n_query, k1, k2, 0.3)
    got = k_reciprocal_distances(
        torch.tensor(dist, dtype=torch.float32),
        torch.arange(n_query),
        torch.arange(n_query, n_query + n_gallery),
        k1=k1,
        k2=k2,
        lambda_value=0.3,
        chunk_elements=50,  # several chunks
    )
    np.testing.assert_allclose(got.numpy(), want, atol=2e-6)


def test_k_reciprocal_hand_case_promotes_the_reciprocal_neighbour():
    # On a line: the query at 0 (label A); B items at 1.2, 1.6, 1.7; a lone A at -1.5. Euclidean: 1.2 first.
    # With k1=2 the query's two nearest are 1.2 and -1.5, but 1.2's two nearest are 1.6 and 1.7: only -1.5
    # (whose two nearest are the query and 1.2) is a 2-reciprocal neighbour of the query.
    x = torch.tensor([[0.0], [1.2], [1.6], [1.7], [-1.5]])
    labels = [0, 1, 1, 1, 0]
    is_query = [True, False, False, False, False]
    is_gallery = [False, True, True, True, True]
    assert retrieve(x, labels, is_query, is_gallery, k=4).retrieved[0].tolist() == [1, 4, 2, 3]
    out = k_reciprocal_rerank(x, labels, is_query, is_gallery, k=4, k1=2, k2=1, lambda_value=0.3)
    assert out.retrieved[0].tolist() == [4, 1, 2, 3]
    assert out.relevant[0].tolist() == [True, False, False, False]
    # both sets are {query, -1.5}; V = exp(-d) normalised, d = squared distance / its row maximum
    # (row of the query: 1.7^2 = 2.89; row of -1.5: 3.2^2 = 10.24)
    v_q = torch.exp(-torch.tensor([0.0, 2.25 / 2.89]))
    v_far = torch.exp(-torch.tensor([2.25 / 10.24, 0.0]))
    shared = float(torch.minimum(v_q / v_q.sum(), v_far / v_far.sum()).sum())
    expected = 0.7 * (1 - shared / (2 - shared)) + 0.3 * 2.25 / 2.89
    assert out.distances[0, 0].item() == pytest.approx(expected, abs=1e-6)
    # the B items share nothing with the query's set: Jaccard distance 1
    for pos, value in zip(range(1, 4), (1.2, 1.6, 1.7), strict=True):
        assert out.distances[0, pos].item() == pytest.approx(0.7 + 0.3 * value**2 / 2.89, abs=1e-6)


def test_k_reciprocal_keeps_the_baseline_exclusions():
    emb, labels, is_query, is_gallery, sequences = _data(2)
    base = retrieve(emb, labels, is_query, is_gallery, k=8, sequence_ids=sequences)
    out = k_reciprocal_rerank(emb, labels, is_query, is_gallery, k=8, k1=5, k2=2, sequence_ids=sequences)
    assert torch.equal(out.query_ids, base.query_ids) and torch.equal(out.n_relevant, base.n_relevant)
    seq = np.array([("none", i) if s is None else s for i, s in enumerate(sequences)], dtype=object)
    for q, row in zip(out.query_ids.tolist(), out.retrieved.tolist(), strict=True):
        assert all(g != q and seq[g] != seq[q] and is_gallery[g] for g in row if g >= 0)
    assert bool((out.distances[:, 1:] >= out.distances[:, :-1]).all())


def test_k_reciprocal_refuses_too_many_items_with_a_clear_message():
    emb, labels, is_query, is_gallery, _ = _data(3)
    n_items = int((is_query | is_gallery).sum())
    with pytest.raises(RerankSizeError) as error:
        k_reciprocal_rerank(emb, labels, is_query, is_gallery, max_items=n_items - 1)
    message = str(error.value)
    assert f"{int(is_query.sum())} queries" in message and f"{n_items} distinct items" in message
    assert f"max_items={n_items - 1}" in message and "O((Q+G)^2)" in message and "query_expansion" in message
    assert math.isfinite(
        k_reciprocal_rerank(emb, labels, is_query, is_gallery, max_items=n_items).distances[0, 0]
    )


def test_expansion_sweep_rows_match_the_single_calls():
    from labkit.metrics import flatten_metrics, metrics_from_results
    from labkit.query_expansion import expansion_sweep

    emb, labels, is_query, is_gallery, sequences = _data()
    table = expansion_sweep(
        emb, labels, is_query, is_gallery, qe_n=(1, 3), alphas=(0.0, 3.0), k_reciprocal=((5, 2, 0.3),), k=6,
        sequence_ids=sequences,
    )  # fmt: skip
    assert table["method"].tolist() == [
        "baseline", "average QE", "average QE", "alpha QE", "alpha QE", "k-reciprocal",
    ]  # fmt: skip
    assert table["n"].tolist()[1:5] == [1, 3, 1, 3]

    def flat(results):
        return flatten_metrics(metrics_from_results(results, cmc_k=(1,), precision_k=(5,), map_k=(5,)))

    base = flat(retrieve(emb, labels, is_query, is_gallery, k=6, sequence_ids=sequences))
    qe = flat(query_expansion(emb, labels, is_query, is_gallery, n=3, alpha=3.0, k=6, sequence_ids=sequences))
    kr = flat(
        k_reciprocal_rerank(
            emb, labels, is_query, is_gallery, k=6, k1=5, k2=2, lambda_value=0.3, sequence_ids=sequences
        )
    )
    assert table.loc[0, "map@5"] == pytest.approx(base["map@5"]) and table.loc[0, "delta map@5"] == 0
    assert table.loc[4, "cmc@1"] == pytest.approx(qe["cmc@1"])
    assert table.loc[4, "delta cmc@1"] == pytest.approx(qe["cmc@1"] - base["cmc@1"])
    assert table.loc[5, "map@5"] == pytest.approx(kr["map@5"])
    # too many items for k-reciprocal: its rows are left out, the QE rows stay
    small = expansion_sweep(emb, labels, is_query, is_gallery, qe_n=(1,), alphas=(0.0,), max_items=10)
    assert small["method"].tolist() == ["baseline", "average QE"]
