"""labkit.metrics: OML 4 definitions, hand-computed cases and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_retrieval import brute_force, make_data

from labkit import metrics as M
from labkit import retrieval as R


def results_from_patterns(patterns: list[list[int]], n_relevant: list[int]) -> R.RetrievalResults:
    """Hand-made results: 1 = relevant, 0 = not relevant, -1 = padding; one query per row."""
    k = max(len(p) for p in patterns)
    rows = [p + [-1] * (k - len(p)) for p in patterns]
    nq = len(rows)
    # item ids: queries 0..nq-1 (label = own row), then one item per retrieved slot
    retrieved, labels = [], list(range(nq))
    for qi, row in enumerate(rows):
        ids = []
        for flag in row:
            if flag < 0:
                ids.append(-1)
            else:
                ids.append(len(labels))
                labels.append(qi if flag == 1 else -1 - qi)
        retrieved.append(ids)
    retrieved_t = torch.tensor(retrieved, dtype=torch.int64)
    distances = torch.arange(k, dtype=torch.float32).expand(nq, k).masked_fill(retrieved_t < 0, float("inf"))
    base = R.RetrievalResults(
        distances=distances,
        retrieved=retrieved_t,
        query_ids=torch.arange(nq),
        relevant=torch.zeros(nq, k, dtype=torch.bool),
        n_relevant=torch.tensor(n_relevant),
        labels=torch.tensor(labels),
    )
    return base.reordered(retrieved_t, distances)  # recomputes `relevant` from the labels


def test_hand_computed_cmc_precision_map():
    res = results_from_patterns(
        [[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, -1, -1, -1], [0, 0, 0]],
        n_relevant=[3, 1, 2, 2, 0],
    )
    m = M.metrics_from_results(res, cmc_k=(1, 2, 5), precision_k=(1, 2, 5), map_k=(1, 2, 5), reduce=False)
    o = m["overall"]
    nan = float("nan")
    expected = {
        ("cmc", 1): [1, 0, 0, 1, nan],
        ("cmc", 2): [1, 1, 0, 1, nan],
        ("cmc", 5): [1, 1, 0, 1, nan],
        ("precision", 1): [1, 0, 0, 1, nan],
        ("precision", 2): [1 / 2, 1 / 1, 0, 1, nan],  # min(n_relevant, k) in the denominator
        ("precision", 5): [2 / 3, 1, 0, 2 / 2, nan],  # 4th query: only 2 retrieved -> k' = 2
        ("map", 1): [1, 0, 0, 1, nan],
        ("map", 2): [1, 1 / 2, 0, 1, nan],
        ("map", 5): [(1 + 2 / 3) / 2, 1 / 2, 0, 1, nan],  # divided by relevant-in-top-k (OML 4)
    }
    for (name, k), values in expected.items():
        np.testing.assert_allclose(o[name][k].numpy(), np.array(values, dtype=np.float32), rtol=1e-6)
    assert o["n_queries"] == 5 and o["n_skipped"] == 1

    reduced = M.metrics_from_results(res, cmc_k=(1,), precision_k=(5,), map_k=(5,))["overall"]
    assert reduced["cmc"][1] == pytest.approx(2 / 4)
    assert reduced["precision"][5] == pytest.approx((2 / 3 + 1 + 0 + 1) / 4)
    assert reduced["map"][5] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2 + 0 + 1) / 4)


def test_oml_docstring_examples():
    # OML calc_map example: gt_tops [1,0], [0,1], [0,0,0,0]; n_gts 1, 1, 2 -> map@1 [1,0,0], map@2 [1,.5,0]
    res = results_from_patterns([[1, 0], [0, 1], [0, 0, 0, 0]], n_relevant=[1, 1, 2])
    m = M.metrics_from_results(res, cmc_k=(1, 2), precision_k=(1, 2), map_k=(1, 2), reduce=False)["overall"]
    assert m["map"][1].tolist() == [1, 0, 0] and m["map"][2].tolist() == [1, 0.5, 0]
    # OML calc_precision example (first 3 rows): n_gts 2, 3, 5 -> precision@2 [.5, .5, 0]
    res = results_from_patterns([[1, 0], [0, 1, 1], [0, 0]], n_relevant=[2, 3, 5])
    m = M.metrics_from_results(res, cmc_k=(1, 2), precision_k=(1, 2), map_k=(), reduce=False)["overall"]
    assert m["precision"][1].tolist() == [1, 0, 0] and m["precision"][2].tolist() == [0.5, 0.5, 0]
    assert m["cmc"][1].tolist() == [1, 0, 0] and m["cmc"][2].tolist() == [1, 1, 0]


def test_pcf_hand_computed():
    # variances 8/3 and 2/3 along x and y, none along z: explained shares 0.8, 0.2, 0
    x = np.array([[2, 0, 0], [-2, 0, 0], [0, 1, 0], [0, -1, 0]], dtype=np.float32)
    assert M.calc_pcf(x, (0.5, 0.79, 0.9)) == {0.5: 1 / 3, 0.79: 1 / 3, 0.9: 2 / 3}
    # OML's example: torch.eye(4, 10) -> pcf(0.5) = 0.2
    assert M.calc_pcf(torch.eye(4, 10), (0.5,)) == {0.5: 0.2}
    assert math.isnan(M.calc_pcf(np.ones((5, 3), np.float32), (0.5,))[0.5])


def test_fnmr_at_fmr_hand_computed():
    # OML's example: pos 0 0 1 1 2 2 5 5 9 9, neg 3 3 4 4 6 6 7 7 8 8 -> fnmr@fmr(0.1) = 0.4, (0.5) = 0.2
    pos = [0, 0, 1, 1, 2, 2, 5, 5, 9, 9]
    neg = [3, 3, 4, 4, 6, 6, 7, 7, 8, 8]
    x = np.array([[0.0]] + [[v] for v in pos + neg], dtype=np.float32)
    labels = np.array([0] * 11 + [1] * 10)
    is_query = np.arange(21) == 0
    is_gallery = ~is_query
    out = M.fnmr_at_fmr(x, labels, is_query, is_gallery, (0.1, 0.15, 0.5, 0.8))
    # thresholds: 3, 3 + 0.35 * (4 - 3) = 3.35, 6, 7 + 0.2 * (8 - 7) = 7.2
    assert out == {0.1: 0.4, 0.15: 0.4, 0.5: 0.2, 0.8: 0.2}


def _fnmr_reference(x, labels, is_query, is_gallery, seq, fmr):
    """Plain: every non-excluded pair, float32 distances, numpy quantile (as OML)."""
    pos, neg = [], []
    sq = ((x[:, None, :].astype(np.int64) - x[None].astype(np.int64)) ** 2).sum(-1)
    dist = np.sqrt(sq).astype(np.float32)
    for i in np.nonzero(is_query)[0]:
        for j in np.nonzero(is_gallery)[0]:
            if i == j or (seq is not None and seq[i] is not None and seq[i] == seq[j]):
                continue
            (pos if labels[i] == labels[j] else neg).append(dist[i, j])
    thresholds = np.quantile(np.array(neg, dtype=np.float32), fmr)
    pos = np.array(pos, dtype=np.float32)
    return {f: float((pos >= t).sum() / len(pos)) for f, t in zip(fmr, thresholds, strict=True)}


@pytest.mark.parametrize("n_bins,max_collect", [(1 << 18, 1 << 22), (8, 1 << 22), (8, 5), (2, 3)])
def test_fnmr_at_fmr_matches_reference(n_bins, max_collect):
    rng = np.random.default_rng(11)
    n = 120
    x = rng.integers(-3, 4, size=(n, 5)).astype(np.float32)  # integer coordinates: exact float32 distances
    _, labels, is_query, is_gallery, seq, _ = make_data(11, n=n)
    fmr = (0.0, 0.013, 0.1, 0.5, 0.77, 1.0)
    got = M.fnmr_at_fmr(
        x,
        labels,
        is_query,
        is_gallery,
        fmr,
        sequence_ids=seq,
        n_bins=n_bins,
        max_collect=max_collect,
        chunk_bytes=1,
    )
    assert got == _fnmr_reference(x, labels, is_query, is_gallery, seq, fmr)


def reference_metrics(x, labels, is_query, is_gallery, seq, cats, ks):
    """Per-query OML metrics from the brute-force retrieval, averaged plainly over non-skipped queries."""
    ref = brute_force(x, labels, is_query, is_gallery, seq, max(ks))
    per_query = []
    for r in ref:
        rel, n = r["relevant"], r["n_relevant"]
        n_ret = sum(i >= 0 for i in r["retrieved"])
        row = {"category": cats[r["query"]], "skip": n == 0}
        for k in ks:
            kk = min(k, n_ret)
            hits = sum(rel[:kk])
            row[f"cmc@{k}"] = float(hits > 0)
            row[f"precision@{k}"] = hits / min(n, kk) if min(n, kk) else 0.0
            prec_at = [sum(rel[: i + 1]) / (i + 1) for i in range(kk)]
            row[f"map@{k}"] = (
                sum(p for p, g in zip(prec_at, rel[:kk], strict=True) if g) / hits if hits else 0.0
            )
        per_query.append(row)
    df = pd.DataFrame(per_query)
    return df


@pytest.mark.parametrize("use_seq", [False, True])
def test_retrieval_metrics_match_brute_force(use_seq):
    x, labels, is_query, is_gallery, seq, cats = make_data(12)
    seq = seq if use_seq else None
    ks = (1, 3, 5, 250)  # 250 > gallery size for many queries
    m = M.retrieval_metrics(
        x, labels, is_query, is_gallery, categories=cats, sequence_ids=seq, cmc_k=ks, precision_k=ks, map_k=ks
    )
    df = reference_metrics(x, labels, is_query, is_gallery, seq, cats, ks)
    assert df["skip"].any()
    for section, rows in [("overall", df), *[(c, df[df.category == c]) for c in ("cat", "dog", "owl")]]:
        kept = rows[~rows.skip]
        assert m[section]["n_queries"] == len(rows) and m[section]["n_skipped"] == int(rows.skip.sum())
        for k in ks:
            for name in ("cmc", "precision", "map"):
                assert m[section][name][k] == pytest.approx(kept[f"{name}@{k}"].mean(), abs=1e-6), (
                    section,
                    name,
                    k,
                )
    assert set(m) == {"overall", "cat", "dog", "owl"}
    assert m["overall"]["pcf"][0.5] == M.calc_pcf(x, (0.5,))[0.5]
    assert m["dog"]["pcf"][0.5] == M.calc_pcf(x[cats == "dog"], (0.5,))[0.5]

    unreduced = M.retrieval_metrics(
        x,
        labels,
        is_query,
        is_gallery,
        categories=cats,
        sequence_ids=seq,
        cmc_k=(5,),
        precision_k=(),
        map_k=(),
    )
    assert unreduced["overall"]["cmc"][5] == pytest.approx(m["overall"]["cmc"][5])
    per_q = M.retrieval_metrics(x, labels, is_query, is_gallery, sequence_ids=seq, reduce=False)["overall"]
    assert per_q["cmc"][5].shape == (int(is_query.sum()),)
    np.testing.assert_array_equal(torch.isnan(per_q["map"][5]).numpy(), df.skip.to_numpy())
    np.testing.assert_allclose(per_q["map"][5][~df.skip.to_numpy()].numpy(), df[~df.skip]["map@5"], atol=1e-6)


def test_metrics_after_reranking_and_flatten_and_table():
    x, labels, is_query, is_gallery, seq, cats = make_data(13, n=100)
    res = R.retrieve(x, labels, is_query, is_gallery, k=5, sequence_ids=seq)
    # move every relevant item to the front (a perfect re-ranker) -> cmc@5 unchanged, precision can only grow
    order = torch.argsort(
        (~res.relevant).to(torch.int8) + 2 * (res.retrieved < 0).to(torch.int8), dim=1, stable=True
    )
    reranked = res.reordered(res.retrieved.gather(1, order), torch.arange(5.0).expand(len(res), 5))
    before = M.metrics_from_results(res, categories=cats)
    after = M.metrics_from_results(reranked, categories=cats)
    assert after["overall"]["cmc"][5] == before["overall"]["cmc"][5]
    assert after["overall"]["cmc"][1] == after["overall"]["cmc"][5] >= before["overall"]["cmc"][1]
    assert after["overall"]["map"][5] == pytest.approx(1.0 * after["overall"]["cmc"][5])

    m = M.retrieval_metrics(x, labels, is_query, is_gallery, categories=cats, sequence_ids=seq, fmr=(0.1,))
    flat = M.flatten_metrics(m)
    assert flat["cmc@1"] == m["overall"]["cmc"][1] and flat["dog/map@5"] == m["dog"]["map"][5]
    assert (
        flat["pcf@0.5"] == m["overall"]["pcf"][0.5] and flat["fnmr@fmr@0.1"] == m["overall"]["fnmr@fmr"][0.1]
    )
    assert "dog/fnmr@fmr@0.1" not in flat
    table = M.metrics_table(m)
    assert table.index.tolist() == ["overall", "cat", "dog", "owl"]
    assert table.loc["owl", "precision@5"] == m["owl"]["precision"][5]
    assert table.loc["overall", "n_queries"] == int(is_query.sum())
    with pytest.raises(ValueError, match="reduce=True"):
        M.flatten_metrics(M.metrics_from_results(res, reduce=False))


def test_metric_argument_errors():
    x, labels, is_query, is_gallery, _, cats = make_data(14, n=40)
    with pytest.raises(ValueError, match="fractions"):
        M.retrieval_metrics(x, labels, is_query, is_gallery, fmr=(10,))
    with pytest.raises(ValueError, match="cmc_k"):
        M.retrieval_metrics(x, labels, is_query, is_gallery, cmc_k=(0,))
    with pytest.raises(ValueError, match="reserved"):
        M.retrieval_metrics(x, labels, is_query, is_gallery, categories=np.array(["overall"] * 40))
    with pytest.raises(ValueError, match="categories"):
        M.retrieval_metrics(x, labels, is_query, is_gallery, categories=cats[:5])
