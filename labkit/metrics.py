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
    n_bins: int = 1 << 18,
    max_collect: int = 1 << 22,
) -> dict[float, float]:
    """OML's ``calc_fnmr_at_fmr`` over all non-excluded query-gallery pairs, without the full matrix.

    Threshold T_f = numpy-"linear" f-quantile of the negative (different label) distances; value = share of
    positive distances >= T_f. Exact, in bounded memory, usually in two chunked passes over the distances:

    1. histogram negatives and positives into `n_bins` bins over [0, max||q|| + max||g||];
    2. collect the negatives of the bins holding the needed ranks and the positives of the bins T_f can fall
       in; T_f from the exact order statistics; positives in higher bins all count, in lower bins none.

    A bin with more than `max_collect` values is split into `n_bins` sub-bins by an extra pass (up to three
    levels; deeper than that a bin is narrower than a float32 ulp and is collected as (value, count) pairs);
    too many positives to collect cost one more counting pass. Memory: one chunk of `chunk_bytes` (about 14
    bytes per pair: distance, relevance, bin key) + O(n_bins + max_collect). Distances are float32 via the
    expansion sqrt(||q||^2 + ||g||^2 - 2 q.g), as OML's ``torch.cdist`` computes them (absolute error about
    1e-7 * (||q||^2 + ||g||^2) on squared distances). NaN when there are no positive or no negative pairs.
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
    scale = n_bins / upper
    trash = 2 * n_bins  # key of excluded pairs

    def keyed_chunks():
        """(distances, keys): key = bin for negatives, n_bins + bin for positives, `trash` if excluded."""
        for d, rel, r, col in R._pair_chunks_raw(p, max(1, chunk_bytes // 14)):
            key = (d * scale).clamp_(max=n_bins - 1).to(torch.int32).add_(rel, alpha=n_bins)
            if len(r):
                key[r, col] = trash
            yield d, key

    # pass 1: histograms
    hist = torch.zeros(trash + 1, dtype=torch.int64)
    for _, key in keyed_chunks():
        hist += torch.bincount(key.view(-1), minlength=trash + 1).cpu()
    neg_hist, pos_hist = hist[:n_bins], hist[n_bins:trash]
    n_neg, n_pos = int(neg_hist.sum()), int(pos_hist.sum())
    if n_neg == 0 or n_pos == 0:
        return {f: float("nan") for f in fmr}

    # every f needs the ranks floor(h) and min(floor(h) + 1, n - 1) of the negatives, h = (n - 1) f
    # (numpy "linear"). A rank is located by a path of levels (low, inv_width, bin): v is in the path when
    # clamp(floor((v - low) * inv_width), 0, n_bins - 1) == bin at every level below the first (level 1 is
    # the key itself), with the same float operations in every pass.
    def sub_bin(v: torch.Tensor, low: float, inv_w: float) -> torch.Tensor:
        return torch.floor((v - low) * inv_w).clamp_(0, n_bins - 1).to(torch.int64)

    virtual = {f: (n_neg - 1) * f for f in fmr}
    ranks: dict[int, dict[str, Any]] = {}
    for h in virtual.values():
        lo = math.floor(h)
        for r in (lo, min(lo + 1, n_neg - 1)):
            ranks.setdefault(r, {"levels": [], "below": 0, "state": "refine", "hist": neg_hist})

    def descend(st: dict[str, Any], rank: int) -> None:
        hist_ = st.pop("hist")
        cum = torch.cumsum(hist_, 0)
        j = int(torch.searchsorted(cum, torch.tensor(rank - st["below"]), right=True))
        st["below"] += int(cum[j - 1]) if j > 0 else 0
        if not st["levels"]:
            st["bin1"] = j
            low, width = 0.0, upper / n_bins
        else:
            low, inv_w, _ = st["levels"][-1]
            st["levels"][-1] = (low, inv_w, j)
            width = 1.0 / inv_w
            low = low + j * width
            width = width / n_bins
        if int(hist_[j]) > max_collect and len(st["levels"]) < 2:  # split the bin into n_bins sub-bins
            st["levels"].append((low, 1.0 / width, None))
            st["hist"] = torch.zeros(n_bins, dtype=torch.int64)
        else:
            st["state"], st["parts"] = "collect", []

    for r, st in ranks.items():
        descend(st, r)

    # positives of the level-1 bins each threshold can fall in (between its two order statistics' bins)
    pos_bins = sorted(
        {
            b
            for f, h in virtual.items()
            for b in range(ranks[math.floor(h)]["bin1"], ranks[min(math.floor(h) + 1, n_neg - 1)]["bin1"] + 1)
        }
    )
    collect_pos = int(pos_hist[pos_bins].sum()) <= max_collect
    pos_parts: list[torch.Tensor] = []
    pos_keys: list[torch.Tensor] = []
    first = True
    while any(st["state"] != "done" for st in ranks.values()):
        need = torch.zeros(trash + 1, dtype=torch.bool)
        need[[st["bin1"] for st in ranks.values() if st["state"] != "done"]] = True
        if first and collect_pos:
            need[[n_bins + b for b in pos_bins]] = True
        need = need.to(x.device)
        for d, key in keyed_chunks():
            m = need[key]
            vals, keys = d[m], key[m]
            if first and collect_pos:
                is_pos = keys >= n_bins
                pos_parts.append(vals[is_pos].cpu())
                pos_keys.append((keys[is_pos] - n_bins).cpu())
            for st in ranks.values():
                if st["state"] == "done":
                    continue
                v = vals[keys == st["bin1"]]
                for low, inv_w, j in st["levels"]:
                    if j is not None:
                        v = v[sub_bin(v, low, inv_w) == j]
                if st["state"] == "collect":
                    u, cnt = torch.unique(v, return_counts=True)
                    st["parts"].append((u.cpu(), cnt.cpu()))
                else:
                    low, inv_w, _ = st["levels"][-1]
                    st["hist"] += torch.bincount(sub_bin(v, low, inv_w), minlength=n_bins).cpu()
        first = False
        for r, st in ranks.items():
            if st["state"] == "collect":
                vals_ = torch.cat([u for u, _ in st["parts"]])
                counts = torch.cat([c for _, c in st["parts"]])
                uniq, inverse = torch.unique(vals_, return_inverse=True)
                total = torch.zeros(len(uniq), dtype=torch.int64).index_add_(0, inverse, counts)
                i = int(torch.searchsorted(torch.cumsum(total, 0), torch.tensor(r - st["below"]), right=True))
                st["value"], st["state"] = float(uniq[i]), "done"
                del st["parts"]
            elif st["state"] == "refine":
                descend(st, r)

    thresholds = {}
    for f, h in virtual.items():
        lo = math.floor(h)
        a = np.float32(ranks[lo]["value"])
        b = np.float32(ranks[min(lo + 1, n_neg - 1)]["value"])
        thresholds[f] = _lerp_like_numpy(a, b, h - lo)

    above = dict.fromkeys(fmr, 0)
    if collect_pos:
        # a positive in a higher bin than the threshold's is above it, in a lower bin below (binning is
        # monotone); only the threshold's own bin needs the exact comparison
        pos_vals = torch.cat(pos_parts).double() if pos_parts else torch.zeros(0, dtype=torch.float64)
        pos_key = torch.cat(pos_keys) if pos_keys else torch.zeros(0, dtype=torch.int32)
        for f, t in thresholds.items():
            t_bin = int(torch.tensor(t, dtype=torch.float32).mul(scale).clamp(max=n_bins - 1).to(torch.int32))
            above[f] = int(pos_hist[t_bin + 1 :].sum()) + int(((pos_key == t_bin) & (pos_vals >= t)).sum())
    else:
        for d, key in keyed_chunks():
            pos = d[(key >= n_bins) & (key < trash)].double()
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
