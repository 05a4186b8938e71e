"""Retrieval metrics with OML 4 definitions: cmc@k, precision@k, map@k, pcf, fnmr@fmr.

Per query (relevant = same label, self and same-sequence gallery items excluded, `n` relevant gallery items
available, `g_i` = 1 when the i-th retrieved item is relevant, `k' = min(k, number retrieved)`):

- ``cmc@k``       = 1 if any of the first k is relevant, else 0.
- ``precision@k`` = (sum of g_i, i <= k') / min(n, k').
- ``map@k``       = (sum over relevant i <= k' of (relevant among first i) / i) / (relevant among first k'),
                    0 when none of the first k' is relevant (OML 4's ``calc_map``).
- Queries with n == 0 are left out of every average and counted in ``n_skipped`` (OML yields NaN for their
  precision); with ``reduce=False`` their per-query values are NaN.
- ``pcf@v`` = (smallest number of principal components whose explained-variance share exceeds v, as OML's
  ``searchsorted(cumsum, v, right) + 1``, capped at dim) / dim, on the embeddings of all items
  (per category: the items of that category).
- ``fnmr@fmr@f`` = share of positive (query, gallery) distances >= the f-quantile (numpy "linear") of the
  negative distances, over every non-excluded pair; overall only (as in OML). Exact, computed in passes over
  distance chunks (see `fnmr_at_fmr`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from labkit import retrieval as R
from labkit.retrieval import ArrayLike, RetrievalResults

__all__ = [
    "OVERALL",
    "calc_pcf",
    "fnmr_at_fmr",
    "flatten_metrics",
    "metrics_from_results",
    "metrics_table",
    "retrieval_metrics",
]

OVERALL = "overall"


# ------------------------------------------------------------------------------------------------ helpers
def _check_ks(ks: Iterable[int], name: str) -> tuple[int, ...]:
    out = tuple(ks)
    for k in out:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"{name}: every k must be a positive integer, got {out!r}.")
    return tuple(int(k) for k in out)


def _check_fractions(vals: Iterable[float], name: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in vals)
    if not all(0.0 <= v <= 1.0 for v in out):
        raise ValueError(f"{name}: values must lie in [0, 1] (fractions, not percents), got {out!r}.")
    return out


def _per_query(results: RetrievalResults, cmc_k, precision_k, map_k) -> dict[str, dict[int, torch.Tensor]]:
    """Unreduced metrics (float32 tensors (Q,)); NaN for queries without relevant gallery items."""
    rel = results.relevant
    nq, width = rel.shape
    n_rel = results.n_relevant
    n_ret = results.n_retrieved
    skipped = n_rel == 0
    relf = rel.to(torch.float32)
    cum = torch.cumsum(relf, dim=1) if width else relf
    nan = torch.tensor(float("nan"), device=rel.device)
    out: dict[str, dict[int, torch.Tensor]] = {"cmc": {}, "precision": {}, "map": {}}

    def hits_at(k: int) -> torch.Tensor:  # relevant among the first k (padding is never relevant)
        kk = min(k, width)
        return cum[:, kk - 1] if kk > 0 else torch.zeros(nq, device=rel.device)

    for k in cmc_k:
        out["cmc"][k] = torch.where(skipped, nan, (hits_at(k) > 0).to(torch.float32))
    for k in precision_k:
        k_eff = torch.clamp(n_ret, max=min(k, width))
        denom = torch.minimum(n_rel, k_eff).to(torch.float32)
        value = torch.where(denom > 0, hits_at(k) / denom.clamp(min=1), torch.zeros_like(denom))
        out["precision"][k] = torch.where(skipped, nan, value)
    if map_k:
        positions = torch.arange(1, width + 1, device=rel.device, dtype=torch.float32)
        ap_terms = torch.cumsum(cum / positions * relf, dim=1) if width else relf
        for k in map_k:
            kk = min(k, width)
            n_k = hits_at(k)
            total = ap_terms[:, kk - 1] if kk > 0 else torch.zeros(nq, device=rel.device)
            value = torch.where(n_k > 0, total / n_k.clamp(min=1), torch.zeros_like(n_k))
            out["map"][k] = torch.where(skipped, nan, value)
    return out


def _reduce(
    per_query: dict[str, dict[int, torch.Tensor]], sel: torch.Tensor, skipped: torch.Tensor, reduce: bool
):
    """Means over the selected, non-skipped queries (or the selected per-query tensors)."""
    out: dict[str, Any] = {}
    keep = sel & ~skipped
    for name, by_k in per_query.items():
        out[name] = {}
        for k, v in by_k.items():
            if reduce:
                out[name][k] = float(v[keep].double().mean()) if bool(keep.any()) else float("nan")
            else:
                out[name][k] = v[sel]
    out["n_queries"] = int(sel.sum())
    out["n_skipped"] = int((sel & skipped).sum())
    return out


def _query_categories(categories: ArrayLike | None, results: RetrievalResults) -> np.ndarray | None:
    if categories is None:
        return None
    cats = R._to_numpy(categories, "categories")
    n = len(results.labels)
    if cats.ndim != 1 or len(cats) != n:
        raise ValueError(f"categories: expected one value per item (shape ({n},)), got shape {cats.shape}.")
    return cats


def _category_values(cats: np.ndarray) -> list[Any]:
    uniq = pd.unique(pd.Series(cats)).tolist()
    if OVERALL in uniq:
        raise ValueError(f"categories: the value {OVERALL!r} is reserved for the overall metrics; rename it.")
    try:
        return sorted(uniq)
    except TypeError:
        return sorted(uniq, key=str)


# --------------------------------------------------------------------------------------------------- public
def metrics_from_results(
    results: RetrievalResults,
    *,
    categories: ArrayLike | None = None,
    cmc_k: Sequence[int] = (1, 5),
    precision_k: Sequence[int] = (5,),
    map_k: Sequence[int] = (5,),
    reduce: bool = True,
) -> dict[Any, dict[str, Any]]:
    """cmc / precision / map from (possibly re-ranked) `RetrievalResults`.

    `categories`: one value per item (length N) or None. Returns ``{"overall": {...}, <category>: {...}}``
    with ``m[..]["cmc"][k]``, ``["precision"][k]``, ``["map"][k]``, ``["n_queries"]``, ``["n_skipped"]``.
    Values are floats (means over the non-skipped queries), or with ``reduce=False`` per-query float32
    tensors aligned with ``results.query_ids`` (NaN for skipped queries). k beyond the retrieved columns
    is clipped to them (as OML clips to what was retrieved).
    """
    cmc_k = _check_ks(cmc_k, "cmc_k")
    precision_k = _check_ks(precision_k, "precision_k")
    map_k = _check_ks(map_k, "map_k")
    per_query = _per_query(results, cmc_k, precision_k, map_k)
    skipped = results.n_relevant == 0
    every = torch.ones_like(skipped)
    m: dict[Any, dict[str, Any]] = {OVERALL: _reduce(per_query, every, skipped, reduce)}
    cats = _query_categories(categories, results)
    if cats is not None:
        q_cats = cats[results.query_ids.cpu().numpy()]
        for c in _category_values(q_cats):
            sel = torch.from_numpy(q_cats == c).to(skipped.device)
            m[c] = _reduce(per_query, sel, skipped, reduce)
    return m


def retrieval_metrics(
    embeddings: ArrayLike,
    labels: ArrayLike,
    is_query: ArrayLike,
    is_gallery: ArrayLike,
    *,
    categories: ArrayLike | None = None,
    sequence_ids: ArrayLike | None = None,
    cmc_k: Sequence[int] = (1, 5),
    precision_k: Sequence[int] = (5,),
    map_k: Sequence[int] = (5,),
    pcf_variance: Sequence[float] = (0.5,),
    fmr: Sequence[float] = (),
    reduce: bool = True,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> dict[Any, dict[str, Any]]:
    """All metrics from embeddings (one row per item) — see the module docstring for the definitions.

    ``m["overall"]["cmc"][1]``, ``["precision"][5]``, ``["map"][5]``, ``["pcf"][0.5]``, ``["fnmr@fmr"][f]``
    (when `fmr` given; fractions in [0, 1]), ``["n_queries"]``, ``["n_skipped"]``; ``m[<category>]`` likewise
    (no fnmr@fmr). ``reduce=False``: per-query tensors for cmc/precision/map (pcf and fnmr stay scalars).
    """
    cmc_k = _check_ks(cmc_k, "cmc_k")
    precision_k = _check_ks(precision_k, "precision_k")
    map_k = _check_ks(map_k, "map_k")
    pcf_variance = _check_fractions(pcf_variance, "pcf_variance")
    fmr = _check_fractions(fmr, "fmr")
    k = max([*cmc_k, *precision_k, *map_k, 1])
    x = R._as_embeddings(embeddings)
    results = R.retrieve(
        x,
        labels,
        is_query,
        is_gallery,
        k=k,
        sequence_ids=sequence_ids,
        chunk_size=chunk_size,
        backend=backend,
    )
    m = metrics_from_results(
        results, categories=categories, cmc_k=cmc_k, precision_k=precision_k, map_k=map_k, reduce=reduce
    )
    if pcf_variance:
        m[OVERALL]["pcf"] = calc_pcf(x, pcf_variance)
        cats = _query_categories(categories, results)
        if cats is not None:
            for c in m:
                if c != OVERALL:
                    m[c]["pcf"] = calc_pcf(x[torch.from_numpy(cats == c).to(x.device)], pcf_variance)
    if fmr:
        m[OVERALL]["fnmr@fmr"] = fnmr_at_fmr(x, labels, is_query, is_gallery, fmr, sequence_ids=sequence_ids)
    return m


def calc_pcf(embeddings: ArrayLike, pcf_variance: Sequence[float] = (0.5,)) -> dict[float, float]:
    """Principal-components fraction (OML's ``calc_pcf``): ``{v: n_components(v) / dim}``.

    n_components(v) = ``searchsorted(cumsum(explained_variance_ratio), v, side="right") + 1`` (capped at dim):
    the number of leading components whose variance share, without the last one, is <= v. Eigenvalues of
    the covariance are computed in float64 (OML: float32 SVD). NaN when there are < 2 items or no variance.
    """
    pcf_variance = _check_fractions(pcf_variance, "pcf_variance")
    x = R._as_embeddings(embeddings)
    n, dim = x.shape
    if n < 2 or dim == 0:
        return {v: float("nan") for v in pcf_variance}
    mean = x.double().mean(0)
    cov = torch.zeros(dim, dim, dtype=torch.float64, device=x.device)
    step = max(1, (32 * 2**20) // (8 * dim))
    for a in range(0, n, step):
        xc = x[a : a + step].double() - mean
        cov += xc.T @ xc
    eig = torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)
    total = eig.sum()
    if not bool(total > 0):
        return {v: float("nan") for v in pcf_variance}
    ratio_cumsum = torch.cumsum(eig / total, 0)
    vs = torch.tensor(pcf_variance, dtype=torch.float64, device=x.device)
    n_comp = (torch.searchsorted(ratio_cumsum, vs, right=True) + 1).clamp(max=dim)
    return {v: float(c) / dim for v, c in zip(pcf_variance, n_comp.tolist(), strict=True)}


def _lerp_like_numpy(a: np.float32, b: np.float32, t: float) -> float:
    """numpy's quantile interpolation (``_lerp``) for float32 order statistics, in float64."""
    diff = np.float32(b) - np.float32(a)
    if t >= 0.5:
        return float(np.float64(b) - np.float64(diff) * (1.0 - t))
    return float(np.float64(a) + np.float64(diff) * t)


def fnmr_at_fmr(
    embeddings: ArrayLike,
    labels: ArrayLike,
    is_query: ArrayLike,
    is_gallery: ArrayLike,
    fmr: Sequence[float] = (0.1,),
    *,
    sequence_ids: ArrayLike | None = None,
    chunk_bytes: int = R.DEFAULT_CHUNK_BYTES,
    n_bins: int = 1 << 16,
    max_collect: int = 1 << 22,
) -> dict[float, float]:
    """OML's ``calc_fnmr_at_fmr`` over all non-excluded query-gallery pairs, without the full matrix.

    Threshold T_f = numpy-"linear" f-quantile of the negative (different label) distances; value = share of
    positive distances >= T_f. Exact order statistics in bounded memory: pass 1 histograms the negative
    distances (`n_bins` bins up to the triangle-inequality bound), following passes narrow the bins holding
    the needed ranks until at most `max_collect` values remain and collect them, a final pass counts the
    positives >= T_f. Memory: one distance chunk (`chunk_bytes`) + O(n_bins + max_collect); time: about
    three chunked distance passes. Distances are float32 via the expansion ||q||^2 + ||g||^2 - 2 q.g, as
    OML's ``torch.cdist`` computes them (absolute error ~1e-7 * (||q||^2 + ||g||^2) on squared distances).
    NaN when there are no positive or no negative pairs.
    """
    fmr = _check_fractions(fmr, "fmr")
    if not fmr:
        return {}
    p = R._prepare(embeddings, labels, is_query, is_gallery, sequence_ids)
    x = p.embeddings
    if len(p.query_ids) == 0 or len(p.gallery_ids) == 0:
        return {f: float("nan") for f in fmr}
    norms = torch.linalg.vector_norm(x, dim=1)
    upper = float(norms[p.query_ids.to(x.device)].max() + norms[p.gallery_ids.to(x.device)].max())
    upper = upper * (1 + 1e-5) + 1e-6

    def chunks():
        return R._pair_chunks(p, chunk_bytes)

    # targets: for every f, the ranks floor(h) and min(floor(h) + 1, n - 1), h = (n - 1) f
    # each rank is located by a path of (low, inv_width, bin) levels: value v is in the path's bin when
    # clamp(floor((v - low) * inv_width), 0, n_bins - 1) == bin at every level (same float ops every pass)
    def bin_of(v: torch.Tensor, low: float, inv_w: float) -> torch.Tensor:
        return torch.floor((v - low) * inv_w).clamp_(0, n_bins - 1).to(torch.int64)

    n_neg = n_pos = 0
    hist = torch.zeros(n_bins, dtype=torch.int64)
    for d, rel in chunks():
        finite = ~torch.isnan(d)
        neg = d[finite & ~rel]
        n_neg += len(neg)
        n_pos += int((finite & rel).sum())
        hist += torch.bincount(bin_of(neg, 0.0, n_bins / upper), minlength=n_bins).cpu()
    if n_neg == 0 or n_pos == 0:
        return {f: float("nan") for f in fmr}

    ranks: dict[int, dict[str, Any]] = {}
    virtual = {f: (n_neg - 1) * f for f in fmr}
    for h in virtual.values():
        lo = math.floor(h)
        for r in (lo, min(lo + 1, n_neg - 1)):
            ranks.setdefault(r, {"path": [(0.0, n_bins / upper, None)], "below": 0, "values": None})

    def descend(state: dict[str, Any], rank: int, hist_: torch.Tensor) -> None:
        low, inv_w, _ = state["path"][-1]
        cum = torch.cumsum(hist_, 0)
        j = int(torch.searchsorted(cum, torch.tensor(rank - state["below"]), right=True))
        state["below"] += int(cum[j - 1]) if j > 0 else 0
        state["path"][-1] = (low, inv_w, j)
        # a crowded bin is split into n_bins sub-bins; after 3 levels a bin is narrower than a float32 ulp
        if int(hist_[j]) > max_collect and len(state["path"]) < 3:
            width = 1.0 / inv_w
            state["path"].append((low + j * width, n_bins / width, None))
            state["hist"] = torch.zeros(n_bins, dtype=torch.int64)
        else:
            state["values"] = []  # collect (value, count) pairs

    for r, st in ranks.items():
        descend(st, r, hist)

    def in_path(v: torch.Tensor, path: list) -> torch.Tensor:
        m = torch.ones_like(v, dtype=torch.bool)
        for low, inv_w, j in path:
            if j is not None:
                m &= bin_of(v, low, inv_w) == j
        return m

    while any(not isinstance(st["values"], float) for st in ranks.values()):
        for d, rel in chunks():
            neg = d[~torch.isnan(d) & ~rel]
            for st in ranks.values():
                if isinstance(st["values"], list):
                    vals, counts = torch.unique(neg[in_path(neg, st["path"])], return_counts=True)
                    st["values"].append((vals.cpu(), counts.cpu()))
                elif st["values"] is None:
                    sel = neg[in_path(neg, st["path"])]
                    low, inv_w, _ = st["path"][-1]
                    st["hist"] += torch.bincount(bin_of(sel, low, inv_w), minlength=n_bins).cpu()
        for r, st in ranks.items():
            if isinstance(st["values"], list):
                vals = torch.cat([v for v, _ in st["values"]])
                counts = torch.cat([c for _, c in st["values"]])
                uniq, inverse = torch.unique(vals, return_inverse=True)
                total = torch.zeros(len(uniq), dtype=torch.int64).index_add_(0, inverse, counts)
                i = int(torch.searchsorted(torch.cumsum(total, 0), torch.tensor(r - st["below"]), right=True))
                st["values"] = float(uniq[i])
            elif st["values"] is None:
                descend(st, r, st.pop("hist"))

    thresholds = {}
    for f, h in virtual.items():
        lo = math.floor(h)
        a = np.float32(ranks[lo]["values"])
        b = np.float32(ranks[min(lo + 1, n_neg - 1)]["values"])
        thresholds[f] = _lerp_like_numpy(a, b, h - lo)
    above = dict.fromkeys(fmr, 0)
    for d, rel in chunks():
        pos = d[~torch.isnan(d) & rel].double()
        for f, t in thresholds.items():
            above[f] += int((pos >= t).sum())
    return {f: above[f] / n_pos for f in fmr}


# ------------------------------------------------------------------------------------------- presentation
def _fmt(v: float) -> str:
    return f"{v:g}"


def _flatten_one(section: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in ("cmc", "precision", "map", "pcf", "fnmr@fmr"):
        for k, v in section.get(name, {}).items():
            if torch.is_tensor(v) and v.numel() != 1:
                raise ValueError("flatten_metrics needs reduced metrics (reduce=True).")
            out[f"{name}@{_fmt(k)}"] = float(v)
    for name in ("n_queries", "n_skipped"):
        if name in section:
            out[name] = section[name]
    return out


def flatten_metrics(m: dict[Any, dict[str, Any]]) -> dict[str, float]:
    """``{"cmc@1": .., "precision@5": .., "pcf@0.5": .., "fnmr@fmr@0.1": .., "<category>/cmc@1": ..}``."""
    out: dict[str, float] = {}
    for cat, section in m.items():
        prefix = "" if cat == OVERALL else f"{cat}/"
        out.update({prefix + key: v for key, v in _flatten_one(section).items()})
    return out


def metrics_table(m: dict[Any, dict[str, Any]]) -> pd.DataFrame:
    """One row per section ("overall" first, then categories), columns "cmc@1", "precision@5", ..."""
    rows = {str(cat): _flatten_one(section) for cat, section in m.items()}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "category"
    for col in ("n_queries", "n_skipped"):
        if col in df:
            df[col] = df[col].astype("Int64")
    return df
