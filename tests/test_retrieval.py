"""labkit.retrieval against a brute-force reference (full distance matrix, one query at a time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labkit import retrieval as R


def make_data(seed: int = 0, n: int = 300, dim: int = 8):
    """Random items: labels (some singletons), sequences (some missing), query/gallery overlap."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, 40, n)
    labels[:10] = 1000 + np.arange(10)  # singletons: queries without relevant gallery items
    is_query = rng.random(n) < 0.6
    is_gallery = rng.random(n) < 0.7
    is_query[:10] = True
    seq = rng.integers(0, 60, n).astype(object)
    seq[rng.random(n) < 0.3] = None  # no sequence: only the item itself is excluded
    cats = np.array(["cat", "dog", "owl"])[rng.integers(0, 3, n)]
    return x, labels, is_query, is_gallery, seq, cats


def brute_force(x, labels, is_query, is_gallery, seq, k):
    """Plain reference: float64 distance matrix, a Python loop over queries, sort by (distance, item id)."""
    x64 = x.astype(np.float64)
    dist = np.sqrt(((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1))
    out = []
    for i in np.nonzero(is_query)[0]:
        gallery = []
        for j in np.nonzero(is_gallery)[0]:
            if j == i:
                continue
            if seq is not None and seq[i] is not None and seq[j] == seq[i]:
                continue
            gallery.append(j)
        ranked = sorted(gallery, key=lambda j: (dist[i, j], j))
        top = ranked[:k]
        out.append(
            {
                "query": i,
                "retrieved": top + [-1] * (k - len(top)),
                "distances": [dist[i, j] for j in top] + [np.inf] * (k - len(top)),
                "relevant": [labels[j] == labels[i] for j in top] + [False] * (k - len(top)),
                "n_relevant": sum(labels[j] == labels[i] for j in gallery),
            }
        )
    return out


def assert_matches_reference(res: R.RetrievalResults, ref: list[dict]) -> None:
    assert res.query_ids.tolist() == [r["query"] for r in ref]
    assert res.retrieved.tolist() == [r["retrieved"] for r in ref]
    assert res.relevant.tolist() == [r["relevant"] for r in ref]
    assert res.n_relevant.tolist() == [r["n_relevant"] for r in ref]
    np.testing.assert_allclose(res.distances.numpy(), np.array([r["distances"] for r in ref]), rtol=1e-5)


@pytest.mark.parametrize("use_seq", [False, True])
@pytest.mark.parametrize("block", [64, 4])  # 4: the two-stage (block maxima) top-k with a ragged last block
def test_retrieve_matches_brute_force(use_seq, block, monkeypatch):
    monkeypatch.setattr(R, "_BLOCK", block)
    x, labels, is_query, is_gallery, seq, _ = make_data()
    seq = seq if use_seq else None
    res = R.retrieve(x, labels, is_query, is_gallery, k=7, sequence_ids=seq, backend="torch")
    ref = brute_force(x, labels, is_query, is_gallery, seq, 7)
    assert_matches_reference(res, ref)
    assert res.distances.dtype == torch.float32 and res.retrieved.dtype == torch.int64
    assert (res.n_relevant == 0).any(), "the data must contain queries without relevant gallery items"
    # never the query itself, never its sequence
    q = res.query_ids.unsqueeze(1).expand_as(res.retrieved)
    assert not (res.retrieved == q).any()


def test_k_larger_than_gallery_pads():
    x, labels, is_query, is_gallery, seq, _ = make_data(1, n=40)
    n_gallery = int(is_gallery.sum())
    k = n_gallery + 5
    res = R.retrieve(x, labels, is_query, is_gallery, k=k, sequence_ids=seq, backend="torch")
    assert res.retrieved.shape == (int(is_query.sum()), k)
    assert_matches_reference(res, brute_force(x, labels, is_query, is_gallery, seq, k))
    pad = res.retrieved == -1
    assert pad[:, n_gallery:].all() and torch.isinf(res.distances[pad]).all() and not res.relevant[pad].any()


def test_chunking_invariance():
    x, labels, is_query, is_gallery, seq, _ = make_data(2)
    base = R.retrieve(x, labels, is_query, is_gallery, k=6, sequence_ids=seq, backend="torch")
    for chunk in (1, 7, 10_000):
        other = R.retrieve(
            x, labels, is_query, is_gallery, k=6, sequence_ids=seq, chunk_size=chunk, backend="torch"
        )
        assert torch.equal(other.retrieved, base.retrieved)
        assert torch.equal(other.distances, base.distances)
    tiny_budget = R.retrieve(
        x, labels, is_query, is_gallery, k=6, sequence_ids=seq, chunk_bytes=1, backend="torch"
    )
    assert torch.equal(tiny_budget.retrieved, base.retrieved)


@pytest.mark.skipif(not R.faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("use_seq", [False, True])
def test_faiss_backend_equals_torch(use_seq):
    x, labels, is_query, is_gallery, seq, _ = make_data(3)
    seq = seq if use_seq else None
    a = R.retrieve(x, labels, is_query, is_gallery, k=9, sequence_ids=seq, backend="torch")
    b = R.retrieve(x, labels, is_query, is_gallery, k=9, sequence_ids=seq, backend="faiss", chunk_size=5)
    for name in ("retrieved", "relevant", "n_relevant", "query_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.distances, b.distances)
    d_t, i_t = R.knn(x[:50], x, 400, backend="torch")
    d_f, i_f = R.knn(x[:50], x, 400, backend="faiss")
    assert torch.equal(i_t, i_f) and torch.equal(d_t, d_f)


def test_inputs_numpy_torch_and_label_types_agree():
    x, labels, is_query, is_gallery, seq, _ = make_data(4, n=120)
    a = R.retrieve(x, labels, is_query, is_gallery, k=5, sequence_ids=seq)
    names = np.array([f"label-{v}" for v in labels])
    seq_codes = np.array([-1 if s is None else s for s in seq], dtype=float)
    seq_codes[seq_codes < 0] = np.nan
    b = R.retrieve(
        torch.from_numpy(x),
        names,
        torch.from_numpy(is_query),
        torch.from_numpy(is_gallery.astype(np.int64)),
        k=5,
        sequence_ids=seq_codes,
    )
    assert torch.equal(a.retrieved, b.retrieved) and torch.equal(a.relevant, b.relevant)
    assert torch.equal(a.n_relevant, b.n_relevant)


@pytest.mark.parametrize("n_queries", [3, 30])  # few queries: bias added per chunk; many: augmented product
def test_knn_matches_brute_force_and_pads(n_queries):
    rng = np.random.default_rng(5)
    q = rng.normal(size=(n_queries, 4)).astype(np.float32)
    g = rng.normal(size=(12, 4)).astype(np.float32)
    dist, idx = R.knn(q, g, 15, chunk_size=2)
    full = np.sqrt(((q[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1))
    expected = np.argsort(full, axis=1, kind="stable")
    assert idx[:, :12].tolist() == expected.tolist()
    assert (idx[:, 12:] == -1).all() and torch.isinf(dist[:, 12:]).all()
    np.testing.assert_allclose(dist[:, :12].numpy(), np.sort(full, axis=1), rtol=1e-5)
    assert torch.equal(R.knn(q, g, 15)[1], idx)


def test_knn_two_stage_topk_on_a_wide_gallery():
    rng = np.random.default_rng(9)
    q = rng.normal(size=(40, 6)).astype(np.float32)
    g = rng.normal(size=(3000, 6)).astype(np.float32)  # 3000 = 46 blocks of 64 + a ragged 56
    dist, idx = R.knn(q, g, 5)
    full = np.sqrt(((q[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1))
    assert idx.tolist() == np.argsort(full, axis=1, kind="stable")[:, :5].tolist()
    np.testing.assert_allclose(dist.numpy(), np.sort(full, axis=1)[:, :5], rtol=1e-5)


def test_reordered_recomputes_relevance():
    x, labels, is_query, is_gallery, seq, _ = make_data(6, n=80)
    res = R.retrieve(x, labels, is_query, is_gallery, k=4)
    new_retrieved = res.retrieved.flip(1)
    new_retrieved[:, 0] = -1  # drop one item per row: padding goes last, so move it there
    new_retrieved = torch.cat([new_retrieved[:, 1:], new_retrieved[:, :1]], dim=1)
    dist = torch.arange(4, dtype=torch.float32).expand(len(res), 4).clone()
    out = res.reordered(new_retrieved, dist)
    lab = torch.as_tensor(labels)
    expected = (lab[new_retrieved.clamp(min=0)] == lab[res.query_ids].unsqueeze(1)) & (new_retrieved >= 0)
    assert torch.equal(out.relevant, expected)
    assert torch.isinf(out.distances[:, 3]).all()
    assert torch.equal(out.n_relevant, res.n_relevant) and len(out) == len(res)
    with pytest.raises(ValueError, match="ascend"):
        res.reordered(res.retrieved, res.distances.flip(1).nan_to_num(posinf=1e9))
    with pytest.raises(ValueError, match="n_queries"):
        res.reordered(res.retrieved[:3], res.distances[:3])


def test_results_to_and_len():
    x, labels, is_query, is_gallery, _, _ = make_data(7, n=50)
    res = R.retrieve(x, labels, is_query, is_gallery, k=3)
    moved = res.to("cpu")
    assert len(moved) == int(is_query.sum()) and moved.k == 3
    assert torch.equal(moved.retrieved, res.retrieved)


def test_bad_inputs_give_clear_errors():
    x, labels, is_query, is_gallery, _, _ = make_data(8, n=30)
    with pytest.raises(ValueError, match="labels"):
        R.retrieve(x, labels[:-1], is_query, is_gallery)
    with pytest.raises(ValueError, match="is_query"):
        R.retrieve(x, labels, np.where(is_query, 2, 0), is_gallery)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        R.retrieve(bad, labels, is_query, is_gallery)
    with pytest.raises(ValueError, match="backend"):
        R.retrieve(x, labels, is_query, is_gallery, backend="annoy")
    with pytest.raises(ValueError, match="k must"):
        R.knn(x, x, 0)


def test_empty_query_or_gallery_sets():
    x, labels, _, _, _, _ = make_data(10, n=12)
    none, every = np.zeros(12, bool), np.ones(12, bool)
    res = R.retrieve(x, labels, every, none, k=3)
    assert res.retrieved.tolist() == [[-1, -1, -1]] * 12 and res.n_relevant.tolist() == [0] * 12
    res = R.retrieve(x, labels, none, every, k=3)
    assert res.retrieved.shape == (0, 3) and len(res) == 0
    only_self = np.arange(12) == 4
    res = R.retrieve(x, labels, only_self, only_self, k=2)
    assert res.retrieved.tolist() == [[-1, -1]] and res.n_relevant.tolist() == [0]


# ------------------------------------------------------------------ issue 14: one rule for label values


def test_mixed_and_missing_labels_are_refused_by_retrieval_and_metrics():
    from labkit.metrics import retrieval_metrics

    x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    flags = np.ones(12, dtype=bool)
    issue = np.array([1, "1", 1.0, "a", None, 2] * 2, dtype=object)  # the issue's labels
    expected = (
        "labels: mixes numbers and strings (e.g. 1 at item 0 and '1' at item 1); values are compared as "
        "given, so 1 and '1' would be two different labels. Convert them to one type first, e.g. "
        ".astype(str) for all strings or pd.to_numeric(...) for all numbers. Also: 2 missing value(s) "
        "(None/NaN) at item(s) 4, 10; every item needs a value. Drop those items or give them one."
    )
    for run in (
        lambda labels: R.retrieve(x, labels, flags, flags, k=3),
        lambda labels: retrieval_metrics(x, labels, flags, flags, pcf_variance=()),
    ):
        with pytest.raises(ValueError) as info:
            run(issue)
        assert str(info.value) == expected
        with pytest.raises(
            ValueError, match=r"labels: 3 missing value\(s\) \(None/NaN\) at item\(s\) 3, 7, 11;"
        ):
            run(np.array([1.0, 2.0, 1.0, np.nan] * 3))  # NaN labels were merged into one label


def test_labels_are_compared_as_given():
    x = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    flags = np.ones(8, dtype=bool)

    def relevant(labels):
        return R.retrieve(x, labels, flags, flags, k=7).relevant

    ints = relevant(np.array([1, 1, 2, 2, 3, 3, 4, 4]))
    # numbers by value: 1 and 1.0 are one label (also as Python objects and with a float column)
    assert torch.equal(relevant(np.array([1, 1.0, 2, 2.0, 3, 3, 4.0, 4], dtype=object)), ints)
    assert torch.equal(relevant(np.array([1.0, 1, 2, 2, 3, 3, 4, 4], dtype=np.float64)), ints)
    # strings as strings: "1" and "01" are two labels
    strings = relevant(np.array(["1", "01", "2", "2", "3", "3", "4", "4"]))
    assert not torch.equal(strings, ints)
    assert torch.equal(strings, relevant(np.array([1, 5, 2, 2, 3, 3, 4, 4])))
    uniques, codes = R.factorize(np.array(["b", "a", "b"], dtype=object), "labels")
    assert uniques.tolist() == ["a", "b"] and codes.tolist() == [1, 0, 1]


def test_missing_sequence_ids_still_mean_no_sequence_but_mixed_ones_are_refused():
    codes = R.as_codes(
        np.array(["a", "", None, np.nan, "b", "a"], dtype=object), "sequence_ids", 6, missing_unique=True
    )
    assert codes.tolist() == [0, -1, -1, -1, 1, 0]
    assert R.as_codes(np.array([7.0, np.nan, 7.0]), "sequence_ids", 3, missing_unique=True).tolist() == [
        0,
        -1,
        0,
    ]
    with pytest.raises(
        ValueError, match=r"sequence_ids: mixes numbers and strings \(e\.g\. 3 at item 0 and 's'"
    ):
        R.as_codes(np.array([3, "s", None], dtype=object), "sequence_ids", 3, missing_unique=True)
