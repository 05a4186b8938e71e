"""Re-ranking by the embeddings alone: query expansion and k-reciprocal re-ranking.

- `query_expansion`: average query expansion (alpha=0: the query averaged with its top n results, then
  searched again) and alpha-weighted expansion (weights = similarity ** alpha, Radenovic et al.), with
  optional database-side augmentation (every gallery item averaged with its own top n gallery neighbours).
- `k_reciprocal_rerank`: Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding",
  CVPR 2017 — Jaccard distance over k-reciprocal neighbour sets blended with the original distance.

Both return a `labkit.retrieval.RetrievalResults` over the same queries, gallery and exclusions (the query
itself and, with `sequence_ids`, its sequence) as `labkit.retrieval.retrieve`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from labkit.retrieval import RetrievalResults, _as_mask, as_codes, iter_pair_distances, retrieve

BYTES_PER_ITEM_PAIR = 24  # k-reciprocal: about six (Q+G)^2 float32/bool matrices alive at once


class RerankSizeError(ValueError):
    """The item set is too large for an O((Q+G)^2)-memory re-ranking."""


# --------------------------------------------------------------------------------------------- helpers
def _as_tensor_2d(embeddings) -> Tensor:
    emb = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, Tensor) else embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (N, D); got shape {tuple(emb.shape)}")
    return emb.detach().float().cpu()


def _sequence_codes(sequence_ids, n: int) -> Tensor:
    """Sequence codes as `retrieve` reads them, items without a sequence given codes of their own."""
    if sequence_ids is None:
        return torch.arange(n)
    codes = as_codes(sequence_ids, "sequence_ids", n, missing_unique=True).clone()
    missing = codes < 0
    codes[missing] = int(codes.max()) + 1 + torch.arange(int(missing.sum()))
    return codes


def _search_with(
    query_emb: Tensor,
    gallery_emb: Tensor,
    labels,
    is_query: Tensor,
    is_gallery: Tensor,
    *,
    k: int,
    sequence_ids,
    **retrieve_kwargs,
) -> RetrievalResults:
    """`retrieve` where queries are represented by `query_emb` (one row per query, in item order) and
    gallery items by `gallery_emb` (N rows): same exclusions (self, same sequence) and relevance.

    Runs `retrieve` on the N gallery-side rows plus Q extra query rows; each extra row carries the sequence
    code of its item, and (without sequence_ids) every item its own code, so the query's own gallery row is
    excluded exactly as `retrieve` excludes the query itself.
    """
    n = len(gallery_emb)
    query_ids = torch.nonzero(is_query).squeeze(1)
    labels_t = as_codes(labels, "labels", n)
    codes = _sequence_codes(sequence_ids, n)
    results = retrieve(
        torch.cat([gallery_emb, query_emb]),
        torch.cat([labels_t, labels_t[query_ids]]),
        torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(len(query_ids), dtype=torch.bool)]),
        torch.cat([is_gallery, torch.zeros(len(query_ids), dtype=torch.bool)]),
        k=k,
        sequence_ids=torch.cat([codes, codes[query_ids]]).numpy(),
        **retrieve_kwargs,
    )
    return RetrievalResults(
        distances=results.distances,
        retrieved=results.retrieved,
        query_ids=query_ids,
        relevant=results.relevant,
        n_relevant=results.n_relevant,
        labels=results.labels[:n],
    )


def _is_unit(emb: Tensor) -> bool:
    return bool(len(emb)) and bool(torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-3))


def _expand(base: Tensor, neighbours: Tensor, retrieved: Tensor, alpha: float, normalize: bool) -> Tensor:
    """Rows of `base` averaged with their neighbours (rows of `neighbours` named by `retrieved`, -1 = none),
    weights similarity ** alpha (cosine similarity clamped at 0; the base row has weight 1)."""
    valid = retrieved >= 0
    found = neighbours[retrieved.clamp(min=0)]  # (R, n, D)
    sim = torch.nn.functional.cosine_similarity(base[:, None, :], found, dim=2).clamp(min=0)
    weights = torch.where(valid, sim.pow(alpha) if alpha else torch.ones_like(sim), torch.zeros_like(sim))
    expanded = (base + (weights[..., None] * found).sum(dim=1)) / (1 + weights.sum(dim=1, keepdim=True))
    return torch.nn.functional.normalize(expanded, dim=1) if normalize else expanded


def query_expansion(
    embeddings,
    labels,
    is_query,
    is_gallery,
    *,
    n: int = 1,
    alpha: float = 0.0,
    k: int = 10,
    db_augmentation: bool = False,
    db_n: int | None = None,
    sequence_ids=None,
    normalize: bool | None = None,
    **retrieve_kwargs,
) -> RetrievalResults:
    """Search again with every query replaced by the weighted mean of itself and its top `n` results.

    alpha=0 is average query expansion (all weights 1); alpha>0 is alpha-weighted expansion, a result's
    weight being its cosine similarity to the query (clamped at 0) to the power alpha; the query itself has
    weight 1. db_augmentation=True first replaces every gallery item by the same weighted mean over its own
    top `db_n` (default `n`) gallery neighbours (database-side augmentation), and both searches use the
    augmented gallery. normalize (default: when the embeddings have unit norm) L2-normalises the means.
    n=0 without augmentation returns exactly `retrieve(...)`'s results. Both searches use
    `labkit.retrieval.retrieve` (extra keyword arguments go to it), so exclusions match the baseline.
    """
    if n < 0 or (db_n is not None and db_n < 0) or alpha < 0:
        raise ValueError(f"n, db_n and alpha must be >= 0; got n={n}, db_n={db_n}, alpha={alpha}")
    emb = _as_tensor_2d(embeddings)
    is_query, is_gallery = (
        _as_mask(is_query, "is_query", len(emb)),
        _as_mask(is_gallery, "is_gallery", len(emb)),
    )
    normalize = _is_unit(emb) if normalize is None else normalize
    db_n = n if db_n is None else db_n
    gallery_emb = emb
    if db_augmentation and db_n > 0:
        neighbours = retrieve(emb, labels, is_gallery, is_gallery, k=db_n, **retrieve_kwargs)
        gallery_emb = emb.clone()
        gallery_emb[neighbours.query_ids] = _expand(
            emb[neighbours.query_ids], emb, neighbours.retrieved, alpha, normalize
        )
    query_emb = emb[is_query]
    if n > 0:
        first = _search_with(
            query_emb,
            gallery_emb,
            labels,
            is_query,
            is_gallery,
            k=n,
            sequence_ids=sequence_ids,
            **retrieve_kwargs,
        )
        query_emb = _expand(query_emb, gallery_emb, first.retrieved, alpha, normalize)
    return _search_with(
        query_emb,
        gallery_emb,
        labels,
        is_query,
        is_gallery,
        k=k,
        sequence_ids=sequence_ids,
        **retrieve_kwargs,
    )


# ----------------------------------------------------------------------------------------- k-reciprocal
def _k_reciprocal_sets(rank: Tensor, k: int) -> Tensor:
    """(M, M) bool: j is a k-reciprocal neighbour of i (j in i's k+1 nearest and i in j's)."""
    m = len(rank)
    forward = torch.zeros(m, m, dtype=torch.bool)
    forward.scatter_(1, rank[:, : min(k + 1, m)], True)
    return forward & forward.T


def k_reciprocal_distances(
    dist: Tensor,
    query_rows: Tensor,
    gallery_rows: Tensor,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    chunk_elements: int = 2**23,
) -> Tensor:
    """Zhong et al.'s re-ranked distances (Q, G) from a symmetric (M, M) squared-distance matrix over all
    items; `query_rows` / `gallery_rows` index its rows. Memory O(M^2), time O(M^3) (set expansion).

    Follows the authors' reference code: distances normalised by their row maximum; R(i, k1) = k1-reciprocal
    neighbours (self included); each member c of R(i, k1) whose R(c, round(k1/2)) shares more than 2/3 of
    its items with R(i, k1) adds them; V[i] = exp(-d) over that set, normalised to sum 1; V averaged over each
    item's k2 nearest (local query expansion); Jaccard distance 1 - sum(min)/ (2 - sum(min)); final
    = (1 - lambda) * Jaccard + lambda * normalised distance.
    """
    m = len(dist)
    dist = dist.float()
    dist = dist / dist.amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    rank = torch.argsort(dist, dim=1, stable=True)
    r1 = _k_reciprocal_sets(rank, k1)
    r_half = _k_reciprocal_sets(rank, int(round(k1 / 2)))
    r1_f, r_half_f = r1.float(), r_half.float()
    shared = r1_f @ r_half_f.T  # shared[i, c] = |R(i, k1) & R(c, k1/2)|
    accept = r1 & (shared > (2.0 / 3.0) * r_half_f.sum(dim=1)[None, :])
    expanded = r1 | ((accept.float() @ r_half_f) > 0)
    del shared, accept, r1_f, r_half_f, r1, r_half
    weights = torch.where(expanded, torch.exp(-dist), torch.zeros(()))
    del expanded
    v = weights / weights.sum(dim=1, keepdim=True)
    if k2 > 1:
        neighbours = rank[:, : min(k2, m)]
        v_qe = torch.zeros_like(v)
        for t in range(neighbours.shape[1]):
            v_qe += v[neighbours[:, t]]
        v = v_qe / neighbours.shape[1]
        del v_qe
    del rank
    vq, vg = v[query_rows], v[gallery_rows]
    overlap = torch.zeros(len(query_rows), len(gallery_rows))
    # sum_l min(V[q, l], V[g, l]): V is sparse (about k1 * k2 non-zeros a row), so only each query's own
    # non-zero columns are visited: cols (Q, w) lists them first (the rest, zeros, pad the width w)
    support = vq > 0
    width = max(1, int(support.sum(dim=1).max())) if len(vq) else 1
    cols = torch.argsort((~support).to(torch.uint8), dim=1, stable=True)[:, :width]
    values = vq.gather(1, cols)
    rows = max(1, chunk_elements // max(len(gallery_rows) * width, 1))
    for start in range(0, len(query_rows), rows):
        part = cols[start : start + rows]
        mins = torch.minimum(values[start : start + rows], vg[:, part])  # (G, c, w)
        overlap[start : start + rows] = mins.sum(dim=2).T
    jaccard = 1 - overlap / (2 - overlap)
    return (1 - lambda_value) * jaccard + lambda_value * dist[query_rows][:, gallery_rows]


def k_reciprocal_rerank(
    embeddings,
    labels,
    is_query,
    is_gallery,
    *,
    k: int = 10,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    sequence_ids=None,
    max_items: int = 5000,
) -> RetrievalResults:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of the whole gallery for every query.

    The k-reciprocal neighbour sets are computed over all M = |queries U gallery| items (an item that is both
    counts once); the new distance is (1 - lambda) * Jaccard distance of the (expanded, k2-averaged) sets
    + lambda * the squared Euclidean distance normalised by its row maximum. The top `k` gallery items per
    query are returned, with `retrieve`'s exclusions (the query itself, its sequence) and `n_relevant`.

    Memory is O((Q+G)^2): about 24 * M^2 bytes (several dense M x M matrices), and time O(M^3) for the set
    expansion. More than `max_items` items raises `RerankSizeError` instead of exhausting memory.
    """
    if k1 < 1 or k2 < 1 or not 0 <= lambda_value <= 1:
        raise ValueError(f"need k1 >= 1, k2 >= 1 and 0 <= lambda_value <= 1; got {k1}, {k2}, {lambda_value}")
    emb = _as_tensor_2d(embeddings)
    is_query, is_gallery = (
        _as_mask(is_query, "is_query", len(emb)),
        _as_mask(is_gallery, "is_gallery", len(emb)),
    )
    items = torch.nonzero(is_query | is_gallery).squeeze(1)
    m = len(items)
    if m > max_items:
        need = BYTES_PER_ITEM_PAIR * m * m / 2**30
        raise RerankSizeError(
            f"k-reciprocal re-ranking of {int(is_query.sum())} queries and {int(is_gallery.sum())} gallery "
            f"items ({m} distinct items) needs O((Q+G)^2) memory, about {need:.1f} GiB, over the limit "
            f"max_items={max_items}. Raise max_items if the machine has that memory, re-rank a subset "
            f"(fewer queries or a smaller gallery), or use query_expansion / PairwiseReranker, which scale "
            f"linearly."
        )
    baseline = retrieve(emb, labels, is_query, is_gallery, k=1, sequence_ids=sequence_ids)
    position = torch.full((len(emb),), -1, dtype=torch.int64)
    position[items] = torch.arange(m)
    x = emb[items].double()
    sq = (x * x).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0).float()
    dist.fill_diagonal_(0)
    gallery_ids = torch.nonzero(is_gallery).squeeze(1)
    final = k_reciprocal_distances(
        dist, position[baseline.query_ids], position[gallery_ids], k1=k1, k2=k2, lambda_value=lambda_value
    )
    del dist
    excluded = (
        torch.cat(
            [
                torch.isnan(d)
                for d, _ in iter_pair_distances(emb, labels, is_query, is_gallery, sequence_ids=sequence_ids)
            ]
        )
        if len(baseline) and len(gallery_ids)
        else torch.zeros(final.shape, dtype=torch.bool)
    )
    final = final.masked_fill(excluded, float("inf"))
    kk = min(k, len(gallery_ids))
    order = torch.argsort(final, dim=1, stable=True)[:, :kk]
    new_dist = final.gather(1, order)
    retrieved = torch.where(torch.isinf(new_dist), -1, gallery_ids[order])
    pad = k - kk
    if pad:
        retrieved = torch.cat([retrieved, torch.full((len(retrieved), pad), -1)], dim=1)
        new_dist = torch.cat([new_dist, torch.full((len(new_dist), pad), float("inf"))], dim=1)
    return baseline.reordered(retrieved, new_dist)


# ---------------------------------------------------------------------------------------------- sweep
def expansion_sweep(
    embeddings,
    labels,
    is_query,
    is_gallery,
    *,
    qe_n: tuple[int, ...] = (1, 2, 3, 4, 5),
    alphas: tuple[float, ...] = (0.0, 3.0),
    db_augmentation: bool = False,
    k_reciprocal: tuple[tuple[int, int, float], ...] = ((20, 6, 0.3), (10, 3, 0.3), (5, 2, 0.3), (3, 1, 0.3)),
    k: int = 10,
    sequence_ids=None,
    max_items: int = 5000,
):
    """A table of query expansion (every `qe_n` x `alphas`) and k-reciprocal re-ranking (every
    (k1, k2, lambda) of `k_reciprocal`) against plain retrieval, one row per setting.

    Columns: method, n, alpha, k1, k2, lambda, cmc@1, precision@5, map@5, their change against the
    baseline (first row) as `delta cmc@1`, `delta map@5`, and seconds. k-reciprocal rows are left out
    when the item set exceeds `max_items` (`RerankSizeError`).
    """
    import time

    import pandas as pd

    from labkit.metrics import flatten_metrics, metrics_from_results

    def metrics(results: RetrievalResults) -> dict[str, float]:
        flat = flatten_metrics(metrics_from_results(results, cmc_k=(1,), precision_k=(5,), map_k=(5,)))
        return {c: float(flat[c]) for c in ("cmc@1", "precision@5", "map@5")}

    args = (embeddings, labels, is_query, is_gallery)
    rows = []
    started = time.perf_counter()
    base = retrieve(_as_tensor_2d(embeddings), labels, is_query, is_gallery, k=k, sequence_ids=sequence_ids)
    rows.append({"method": "baseline", **metrics(base), "seconds": time.perf_counter() - started})
    for alpha in alphas:
        for n in qe_n:
            started = time.perf_counter()
            out = query_expansion(
                *args, n=n, alpha=alpha, k=k, db_augmentation=db_augmentation, sequence_ids=sequence_ids
            )
            name = ("alpha QE" if alpha else "average QE") + (" + DBA" if db_augmentation else "")
            rows.append(
                {
                    "method": name,
                    "n": n,
                    "alpha": alpha,
                    **metrics(out),
                    "seconds": time.perf_counter() - started,
                }
            )
    for k1, k2, lambda_value in k_reciprocal:
        started = time.perf_counter()
        try:
            out = k_reciprocal_rerank(
                *args,
                k=k,
                k1=k1,
                k2=k2,
                lambda_value=lambda_value,
                sequence_ids=sequence_ids,
                max_items=max_items,
            )
        except RerankSizeError:
            continue
        rows.append(
            {
                "method": "k-reciprocal",
                "k1": k1,
                "k2": k2,
                "lambda": lambda_value,
                **metrics(out),
                "seconds": time.perf_counter() - started,
            }
        )
    table = pd.DataFrame(
        rows,
        columns=["method", "n", "alpha", "k1", "k2", "lambda", "cmc@1", "precision@5", "map@5", "seconds"],
    )
    for column in ("cmc@1", "map@5"):
        delta = table[column] - table[column].iloc[0]
        table.insert(table.columns.get_loc(column) + 1, f"delta {column}", delta)
    return table
