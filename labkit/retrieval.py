"""Exact Euclidean top-k retrieval with OML-4 exclusion rules, in bounded memory.

`retrieve` finds, for every query item, the `k` closest gallery items, never the query itself and never a
gallery item of the query's own sequence. It scans the gallery in chunks of query rows:

1. one matrix product per chunk gives ``q.g - ||g||^2/2`` (larger = closer; it ranks like the squared
   distance ``||q||^2 + ||g||^2 - 2 q.g``), both sides augmented by one column so that no extra pass over
   the chunk is needed;
2. exclusions (self, same sequence) are written into the chunk as -inf (a list of pairs, no mask matrix);
3. a two-stage top-k: maxima of 64-column blocks, then the k best blocks' columns (see `_topk_largest`);
4. only the k winners get a distance, computed directly as ``||q - g||`` (no cancellation error), sqrt
   only there; rows are sorted by (distance, gallery position).

Peak memory = the embeddings + an augmented gallery copy + O(queries x k) + one chunk of `chunk_bytes`
(default 256 MiB). Ranking uses float32 scores, so two gallery items whose distances to a query differ by
less than ~1e-6 * (||q||^2 + ||g||^2) in squared distance may swap places (as in OML, whose torch.cdist
uses the same expansion); the returned distances themselves are exact float32.

`knn` is the same search without labels and exclusions (for stores and query expansion).

Labels (and sequence ids) are coded by `factorize`, the one rule the data layer, retrieval and metrics
share: values compared as given (numbers by value, strings as strings), a mix of numbers and strings
refused, missing labels refused (a missing sequence id means "no sequence").
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "RetrievalResults",
    "as_codes",
    "factorize",
    "faiss_available",
    "iter_pair_distances",
    "knn",
    "retrieve",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]

#: Memory budget of one distance chunk (bytes): large enough for full-speed matrix products (a few hundred
#: query rows even for a 100k gallery), small beside the 4 GB target.
DEFAULT_CHUNK_BYTES = 256 * 2**20

_BACKENDS = ("auto", "torch", "faiss")


# ----------------------------------------------------------------------------------------------- results
@dataclass
class RetrievalResults:
    """Top-k retrieval for every query; padding is ``retrieved == -1`` with ``distances == inf``.

    Ids are item ids: row positions in the embeddings / dataset the retrieval ran on.
    """

    distances: torch.Tensor  # (Q, K) float32, ascending per row, +inf on padding
    retrieved: torch.Tensor  # (Q, K) int64 item ids, -1 on padding
    query_ids: torch.Tensor  # (Q,) int64 item ids of the queries
    relevant: torch.Tensor  # (Q, K) bool, same label (False on padding)
    n_relevant: torch.Tensor  # (Q,) int64 relevant gallery items available to the query
    labels: torch.Tensor  # (N,) int64 labels of all items

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])

    @property
    def k(self) -> int:
        """Number of columns (retrieved slots per query, padding included)."""
        return int(self.retrieved.shape[1])

    @property
    def n_retrieved(self) -> torch.Tensor:
        """(Q,) number of real (non-padding) retrieved items per query."""
        return (self.retrieved >= 0).sum(dim=1)

    def to(self, device: torch.device | str) -> RetrievalResults:
        """A copy with every tensor on `device`."""
        return RetrievalResults(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def reordered(self, retrieved: ArrayLike, distances: ArrayLike) -> RetrievalResults:
        """Same queries with a new (e.g. re-ranked) order; `relevant` is recomputed from `labels`.

        `retrieved` (Q, K') holds item ids (-1 = padding), `distances` (Q, K') must ascend along each row
        (padding last, +inf). K' may differ from the original K. `n_relevant` is kept: it counts what was
        available in the gallery, not what was retrieved.
        """
        retrieved_t = torch.as_tensor(np.asarray(retrieved) if not torch.is_tensor(retrieved) else retrieved)
        distances_t = torch.as_tensor(np.asarray(distances) if not torch.is_tensor(distances) else distances)
        retrieved_t = retrieved_t.to(device=self.labels.device, dtype=torch.int64)
        distances_t = distances_t.to(device=self.labels.device, dtype=torch.float32)
        if retrieved_t.ndim != 2 or retrieved_t.shape != distances_t.shape or len(retrieved_t) != len(self):
            raise ValueError(
                f"reordered: retrieved {tuple(retrieved_t.shape)} and distances "
                f"{tuple(distances_t.shape)} must both be (n_queries={len(self)}, K)."
            )
        n_items = len(self.labels)
        if retrieved_t.numel() and (int(retrieved_t.min()) < -1 or int(retrieved_t.max()) >= n_items):
            raise ValueError(f"reordered: retrieved ids must lie in [0, {n_items}) or be -1 for padding.")
        pad = retrieved_t < 0
        distances_t = distances_t.masked_fill(pad, float("inf"))
        if distances_t.shape[1] > 1 and bool((distances_t[:, 1:] < distances_t[:, :-1]).any()):
            raise ValueError(
                "reordered: distances must ascend along each row (padding last); pass the re-ranker's "
                "scores as distances (smaller = better) in the new order."
            )
        return RetrievalResults(
            distances=distances_t,
            retrieved=retrieved_t,
            query_ids=self.query_ids,
            relevant=_relevance(retrieved_t, self.query_ids, self.labels),
            n_relevant=self.n_relevant,
            labels=self.labels,
        )


def _relevance(retrieved: torch.Tensor, query_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    pad = retrieved < 0
    same = labels[retrieved.clamp(min=0)] == labels[query_ids].unsqueeze(1)
    return same & ~pad


# ------------------------------------------------------------------------------------------ input checks
def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise TypeError(
            f"{name}: expected a numpy array, torch tensor or sequence, got {type(x).__name__}"
        ) from e


def _positions_text(positions: Sequence[int]) -> str:
    positions = list(positions)
    if len(positions) == 1:
        return f"item {positions[0]}"
    shown = ", ".join(str(p) for p in positions[:5])
    return f"item(s) {shown}{f' and {len(positions) - 5} more' if len(positions) > 5 else ''}"


def _value_kind(value: Any) -> str:
    """The kind of a value: missing (None, NaN, pd.NA, NaT), number (bool too), text, or its type's name."""
    if value is None or value is pd.NA or value is pd.NaT:
        return "missing"
    if isinstance(value, str | bytes | np.str_ | np.bytes_):
        return "text"
    if isinstance(value, numbers.Number | np.number | np.bool_):
        return "missing" if isinstance(value, float | np.floating) and value != value else "number"
    return type(value).__name__


def factorize(
    values: ArrayLike,
    name: str,
    *,
    missing_unique: bool = False,
    where: Callable[[Sequence[int]], str] = _positions_text,
    error: type[Exception] = ValueError,
) -> tuple[np.ndarray, np.ndarray]:
    """The one rule for coding labels (and sequence ids): ``(uniques, codes)`` with int64 codes.

    Values are compared as given: numbers by value (``1 == 1.0``), strings as strings (``"1" != "01"``),
    and a mix of numbers and strings (or other types) is refused, as ``1`` vs ``"1"`` has no safe reading.
    Missing values (None, NaN, pd.NA) are refused too, or with ``missing_unique`` (sequence ids) they, and
    "", mean "no value" and get code -1. Errors (``error``, message starting with ``name``, items named by
    ``where(positions)``) say what to do. Uniques are sorted when the values can be ordered.
    """
    arr = _to_numpy(values, name)
    if arr.ndim != 1:
        raise error(f"{name}: expected one value per item (a 1-d array), got shape {arr.shape}.")
    n = len(arr)
    if arr.dtype.kind in "iub":
        uniques, inverse = np.unique(arr, return_inverse=True)
        return uniques, inverse.reshape(-1).astype(np.int64)
    if arr.dtype.kind == "f":
        kinds = np.where(np.isnan(arr), "missing", "number")
    elif arr.dtype.kind in "US":
        kinds = np.full(n, "text", dtype=object)
    elif arr.dtype.kind == "O":
        kinds = np.array([_value_kind(v) for v in arr], dtype=object)
    else:
        kinds = np.full(n, arr.dtype.kind, dtype=object)
    missing = kinds == "missing"
    if missing_unique and arr.dtype.kind in "USO":
        missing |= np.array(
            [kind == "text" and len(v) == 0 for kind, v in zip(kinds, arr, strict=True)], bool
        )
    problems = []
    present = sorted(set(kinds[~missing].tolist()))
    if len(present) > 1:
        first = {kind: int(np.flatnonzero((kinds == kind) & ~missing)[0]) for kind in present}
        examples = " and ".join(f"{arr[i]!r} at {where([i])}" for i in first.values())
        described = "numbers and strings" if present == ["number", "text"] else "types " + ", ".join(present)
        problems.append(
            f"mixes {described} (e.g. {examples}); values are compared as given, so 1 and '1' would be two "
            "different labels. Convert them to one type first, e.g. .astype(str) for all strings or "
            "pd.to_numeric(...) for all numbers."
        )
    if missing.any() and not missing_unique:
        problems.append(
            f"{int(missing.sum())} missing value(s) (None/NaN) at {where(np.flatnonzero(missing))}; every "
            "item needs a value. Drop those items or give them one."
        )
    if problems:
        raise error(f"{name}: " + " Also: ".join(problems))
    codes = np.full(n, -1, dtype=np.int64)
    kept = arr[~missing]
    try:
        uniques, inverse = np.unique(kept, return_inverse=True)
    except TypeError:  # values of one type that cannot be ordered: first-seen order
        inverse, uniques = pd.factorize(pd.Series(kept, dtype=object), use_na_sentinel=False)
    codes[~missing] = np.asarray(inverse).reshape(-1)
    return np.asarray(uniques), codes


def as_codes(values: ArrayLike, name: str, n: int, *, missing_unique: bool = False) -> torch.Tensor:
    """Integer codes (int64 tensor, CPU) for per-item values by :func:`factorize`'s rule.

    Integer inputs are kept as they are; other values are factorised (equal values -> equal codes); mixed
    numbers and strings, and missing values, raise ValueError. With `missing_unique`, None/NaN/"" mean
    "no value" and get code -1.
    """
    arr = _to_numpy(values, name)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{name}: expected one value per item (shape ({n},)), got shape {arr.shape}.")
    if arr.dtype.kind in "iub" and not missing_unique:
        return torch.from_numpy(arr.astype(np.int64, copy=False))
    return torch.from_numpy(factorize(arr, name, missing_unique=missing_unique)[1])


def _as_mask(x: ArrayLike, name: str, n: int) -> torch.Tensor:
    arr = _to_numpy(x, name)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{name}: expected one flag per item (shape ({n},)), got shape {arr.shape}.")
    if arr.dtype.kind == "b":
        return torch.from_numpy(arr.copy())
    if arr.dtype.kind in "iuf" and np.isin(arr, (0, 1)).all():
        return torch.from_numpy(arr.astype(bool))
    raise ValueError(f"{name}: expected booleans (or 0/1), got values like {arr[:5].tolist()}.")


def _as_embeddings(x: ArrayLike, name: str = "embeddings") -> torch.Tensor:
    t = x.detach() if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(_to_numpy(x, name)))
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array (n_items, dim), got shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        t = t.float()
    t = t.to(torch.float32).contiguous()
    # one reduction pass: the sum is finite when every value is (an overflowing sum falls back to isfinite)
    if t.numel() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or infinite values; check the model outputs.")
    return t


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    return int(k)


def faiss_available() -> bool:
    """Whether the optional faiss (faiss-cpu) backend can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- exclusions
class _Exclusions:
    """Which (query, gallery-position) pairs must never be retrieved: the item itself and its sequence."""

    def __init__(
        self,
        query_items: torch.Tensor,
        gallery_items: torch.Tensor,
        n_items: int,
        sequences: torch.Tensor | None,
    ) -> None:
        pos = torch.full((n_items,), -1, dtype=torch.int64)
        pos[gallery_items] = torch.arange(len(gallery_items))
        self.self_pos = pos[
            query_items
        ]  # (Q,) gallery position of the query itself, -1 if not in the gallery
        self.query_seq = None
        self.max_per_query = int((self.self_pos >= 0).any())
        if sequences is not None:
            seq_g = sequences[gallery_items]
            order = torch.argsort(seq_g, stable=True)
            self.g_order = order
            self.seq_sorted = seq_g[order].contiguous()
            qs = sequences[query_items]
            self.query_seq = qs
            start = torch.searchsorted(self.seq_sorted, qs, right=False)
            end = torch.searchsorted(self.seq_sorted, qs, right=True)
            counts = torch.where(qs >= 0, end - start, torch.zeros_like(start))
            self.seq_start, self.seq_count = start, counts
            if len(counts):
                self.max_per_query = max(self.max_per_query, int(counts.max()) + 1)

    def pairs(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(row-in-chunk, gallery-position) pairs to exclude for the queries `rows`."""
        sp = self.self_pos[rows]
        r_self = torch.nonzero(sp >= 0).view(-1)
        c_self = sp[r_self]
        if self.query_seq is None:
            return r_self, c_self
        counts = self.seq_count[rows]
        total = int(counts.sum())
        if total == 0:
            return r_self, c_self
        r_seq = torch.repeat_interleave(torch.arange(len(counts)), counts)
        offsets = torch.cumsum(counts, 0) - counts
        within = torch.arange(total) - offsets[r_seq]
        c_seq = self.g_order[self.seq_start[rows][r_seq] + within]
        return torch.cat([r_self, r_seq]), torch.cat([c_self, c_seq])


# ------------------------------------------------------------------------------------------------ engines
def _rows_per_chunk(n_gallery: int, n_queries: int, chunk_size: int | None, chunk_bytes: int) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of query rows, got {chunk_size}.")
        return min(int(chunk_size), max(n_queries, 1))
    rows = max(1, chunk_bytes // (4 * max(n_gallery, 1)))
    return min(rows, max(n_queries, 1))


def _exact_topk_distances(
    queries: torch.Tensor, gallery: torch.Tensor, cand: torch.Tensor, block_bytes: int = 16 * 2**20
) -> torch.Tensor:
    """||q - g|| for candidate gallery positions `cand` (c, k) (-1 = padding -> inf), computed directly."""
    c, k = cand.shape
    out = torch.full((c, k), float("inf"), dtype=torch.float32, device=queries.device)
    if c == 0 or k == 0:
        return out
    dim = queries.shape[1]
    step = max(1, block_bytes // (4 * k * max(dim, 1)))
    for a in range(0, c, step):
        cb = cand[a : a + step]
        diff = torch.index_select(gallery, 0, cb.clamp(min=0).reshape(-1)).view(len(cb), k, dim)
        diff.sub_(queries[a : a + step].unsqueeze(1))
        out[a : a + step] = torch.linalg.vector_norm(diff, dim=2).masked_fill_(cb < 0, float("inf"))
    return out


def _sort_rows(dist: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (distance, gallery position); padding (-1, inf) last."""
    if dist.shape[1] <= 1:
        return dist, cand
    key = torch.where(cand < 0, torch.iinfo(torch.int64).max, cand)
    o1 = torch.argsort(key, dim=1, stable=True)
    d1, c1 = dist.gather(1, o1), cand.gather(1, o1)
    o2 = torch.argsort(d1, dim=1, stable=True)
    return d1.gather(1, o2), c1.gather(1, o2)


_BLOCK = 64  # columns per block of the two-stage top-k


def _topk_largest(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k (unsorted) in two stages: block maxima, then the k best blocks' columns.

    The k largest values of a row lie in the k blocks with the largest maxima (a value outside them is
    matched by k block maxima, one per block), so only k * _BLOCK candidates per row go through topk and one
    vectorised pass (amax) replaces topk's selection over the whole row. The width must be a multiple of
    _BLOCK (callers pad with -inf) unless the row is short.
    """
    c, n = scores.shape
    nb = n // _BLOCK
    if nb <= 4 * k or n % _BLOCK:
        return torch.topk(scores, k, dim=1, largest=True, sorted=False)
    block_max = scores.view(c, nb, _BLOCK).amax(dim=2)
    _, blocks = torch.topk(block_max, k, dim=1, largest=True, sorted=False)
    offsets = torch.arange(_BLOCK, device=scores.device)
    cols = (blocks.unsqueeze(2) * _BLOCK + offsets).view(c, k * _BLOCK)
    values, picked = torch.topk(scores.gather(1, cols), k, dim=1, largest=True, sorted=False)
    return values, cols.gather(1, picked)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Row-wise squared norms without an (n, d) temporary."""
    return torch.linalg.vector_norm(x, dim=1).square_()


def _topk_torch(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    excl: _Exclusions | None,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, k) exact distances and gallery positions (-1 padding), queries scanned in chunks of `rows`."""
    nq, ng = len(queries), len(gallery)
    device = queries.device
    kk = min(k, ng)
    out_d = torch.full((nq, k), float("inf"), dtype=torch.float32, device=device)
    out_i = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    if nq == 0 or ng == 0:
        return out_d, out_i
    # score = q.g - ||g||^2/2 (larger = closer; ||q||^2 is constant per row). Many queries: one product per
    # chunk with both sides augmented by a column (gallery padded with zero rows to a multiple of _BLOCK,
    # scored -inf). Few queries: the augmented gallery copy would dominate, so add the bias per chunk.
    dim = queries.shape[1]
    half_sq = -0.5 * _sq_norms(gallery)
    rows = min(rows, nq)
    augmented = nq > 4 * dim
    if augmented:
        n_pad = -(-ng // _BLOCK) * _BLOCK if ng > 4 * kk * _BLOCK else ng
        g_aug = torch.zeros(n_pad, dim + 1, dtype=torch.float32, device=device)
        g_aug[:ng, :dim] = gallery
        g_aug[:ng, dim] = half_sq
        q_aug = torch.ones(rows, dim + 1, dtype=torch.float32, device=device)
    else:
        n_pad = ng
    buf = torch.empty(rows * n_pad, dtype=torch.float32, device=device)
    for a in range(0, nq, rows):
        q = queries[a : a + rows]
        c = len(q)
        scores = buf[: c * n_pad].view(c, n_pad)
        if augmented:
            q_aug[:c, :dim] = q
            torch.mm(q_aug[:c], g_aug.T, out=scores)
            scores[:, ng:] = float("-inf")
        else:
            torch.addmm(half_sq.unsqueeze(0), q, gallery.T, out=scores)
        if excl is not None:
            r, col = excl.pairs(slice(a, a + c))
            if len(r):
                scores[r.to(device), col.to(device)] = float("-inf")
        top_s, top_i = _topk_largest(scores, kk)
        top_i = top_i.masked_fill(top_s == float("-inf"), -1)
        dist = _exact_topk_distances(q, gallery, top_i)
        dist, top_i = _sort_rows(dist, top_i)
        out_d[a : a + c, :kk] = dist
        out_i[a : a + c, :kk] = top_i
    return out_d, out_i


def _topk_faiss(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    excl: _Exclusions | None,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `_topk_torch`, searching a faiss IndexFlatL2 for k + max exclusions and filtering."""
    import faiss

    nq, ng = len(queries), len(gallery)
    kk = min(k, ng)
    out_d = torch.full((nq, k), float("inf"), dtype=torch.float32)
    out_i = torch.full((nq, k), -1, dtype=torch.int64)
    if nq == 0 or ng == 0:
        return out_d, out_i
    extra = excl.max_per_query if excl is not None else 0
    k_search = min(kk + extra, ng)
    index = faiss.IndexFlatL2(gallery.shape[1])
    index.add(gallery.numpy())
    q_np = queries.numpy()
    rows = max(1, min(rows, (64 * 2**20) // (12 * k_search)))
    for a in range(0, nq, rows):
        c = min(rows, nq - a)
        _, found = index.search(q_np[a : a + c], k_search)
        cand = torch.from_numpy(found)
        if excl is not None:
            r, col = excl.pairs(slice(a, a + c))
            if len(r):
                banned = torch.zeros(c, ng, dtype=torch.bool) if c * ng <= 2**26 else None
                if banned is not None:
                    banned[r, col] = True
                    hit = banned.gather(1, cand.clamp(min=0)) & (cand >= 0)
                else:  # huge gallery: test candidates against the sorted pair keys
                    keys = torch.sort(r * ng + col).values
                    probe = torch.arange(c).unsqueeze(1) * ng + cand.clamp(min=0)
                    pos = torch.searchsorted(keys, probe).clamp(max=len(keys) - 1)
                    hit = (keys[pos] == probe) & (cand >= 0)
                cand = cand.masked_fill(hit, -1)
        # keep the first kk valid candidates of every row, in faiss order
        valid = cand >= 0
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :kk]
        cand = cand.gather(1, order)
        dist = _exact_topk_distances(queries[a : a + c], gallery, cand)
        dist, cand = _sort_rows(dist, cand)
        out_d[a : a + c, :kk] = dist
        out_i[a : a + c, :kk] = cand
    return out_d, out_i


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
    if backend == "faiss":
        if not faiss_available():
            raise ImportError("backend='faiss' needs faiss: `pip install faiss-cpu` (or labkit[faiss]).")
        if device.type != "cpu":
            raise ValueError(
                "backend='faiss' runs on CPU embeddings only; move them with .cpu() or use 'torch'."
            )
        return "faiss"
    # "auto" = torch: on the reference machine (2-core AMD EPYC, MKL) faiss's IndexFlatL2 measured slower
    # for every shape tried (1.7x vs 1.2x the bare matmul at 30k x 30k; 3-4x slower at 1-16 queries x 100k,
    # 1.8x at 2048 queries), so faiss is used only when asked for.
    return "torch"


def _search(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    excl: _Exclusions | None,
    chunk_size: int | None,
    backend: str,
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows_per_chunk(len(gallery), len(queries), chunk_size, chunk_bytes)
    chosen = _pick_backend(backend, queries.device)
    if chosen == "faiss":
        return _topk_faiss(queries.cpu(), gallery.cpu(), k, excl, rows)
    return _topk_torch(queries, gallery, k, excl, rows)


# --------------------------------------------------------------------------------------------------- public
def knn(
    queries: ArrayLike,
    gallery: ArrayLike,
    k: int,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean k nearest neighbours of every query row among the gallery rows.

    Returns ``(distances, indices)``, both (Q, k): distances ascending (float32, exact ``||q - g||``),
    indices into `gallery`. When k exceeds the gallery the extra columns are padding (index -1, inf).
    `chunk_size` = query rows per chunk (default: from `chunk_bytes`); `backend` "auto" | "torch" | "faiss".
    """
    k = _check_k(k)
    q = _as_embeddings(queries, "queries")
    g = _as_embeddings(gallery, "gallery").to(q.device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but gallery has {g.shape[1]}.")
    return _search(q, g, k, None, chunk_size, backend, chunk_bytes)


@dataclass
class _Prepared:
    embeddings: torch.Tensor
    labels: torch.Tensor
    query_ids: torch.Tensor
    gallery_ids: torch.Tensor
    sequences: torch.Tensor | None
    excl: _Exclusions


def _prepare(
    embeddings: ArrayLike,
    labels: ArrayLike,
    is_query: ArrayLike,
    is_gallery: ArrayLike,
    sequence_ids: ArrayLike | None,
) -> _Prepared:
    x = _as_embeddings(embeddings)
    n = len(x)
    lab = as_codes(labels, "labels", n)
    qm = _as_mask(is_query, "is_query", n)
    gm = _as_mask(is_gallery, "is_gallery", n)
    seq = None if sequence_ids is None else as_codes(sequence_ids, "sequence_ids", n, missing_unique=True)
    q_ids = torch.nonzero(qm).view(-1)
    g_ids = torch.nonzero(gm).view(-1)
    excl = _Exclusions(q_ids, g_ids, n, seq)
    return _Prepared(x, lab, q_ids, g_ids, seq, excl)


def _gallery_view(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of x (sorted item ids); x itself when they are all the items (no copy)."""
    if len(ids) == len(x):
        return x
    return torch.index_select(x, 0, ids.to(x.device))


def _count_relevant(p: _Prepared) -> torch.Tensor:
    """Relevant gallery items per query after self/sequence exclusion (no distance needed)."""
    lab = p.labels
    uniq, lab_c = torch.unique(lab, return_inverse=True)
    per_label = torch.bincount(lab_c[p.gallery_ids], minlength=len(uniq))
    n_rel = per_label[lab_c[p.query_ids]]
    self_in_g = p.excl.self_pos >= 0
    if p.sequences is None:
        return n_rel - self_in_g.to(torch.int64)
    seq = p.sequences
    has_seq = seq[p.query_ids] >= 0
    # same label and same sequence in the gallery (includes the query itself when it is in the gallery)
    pair = lab_c * (int(seq.max()) + 2 if len(seq) else 1) + (seq + 1)
    upair, pair_c = torch.unique(pair, return_inverse=True)
    per_pair = torch.bincount(pair_c[p.gallery_ids], minlength=len(upair))
    same_seq = per_pair[pair_c[p.query_ids]]
    return torch.where(has_seq, n_rel - same_seq, n_rel - self_in_g.to(torch.int64))


def retrieve(
    embeddings: ArrayLike,
    labels: ArrayLike,
    is_query: ArrayLike,
    is_gallery: ArrayLike,
    *,
    k: int = 10,
    sequence_ids: ArrayLike | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> RetrievalResults:
    """Top-k gallery items for every query (OML 4 rules), as a `RetrievalResults`.

    - Euclidean distance; an item that is both query and gallery is never retrieved for itself;
      gallery items sharing the query's `sequence_ids` value are excluded (None/NaN/"" = no sequence).
    - Queries are the items with `is_query`, in item order; `k` larger than the available gallery pads
      the row with (-1, inf).
    - Inputs: numpy arrays or torch tensors (one row per item); labels and sequence ids of any type.
    - `chunk_size` query rows per matrix product (default: sized from `chunk_bytes`), `backend`
      "auto" (= torch, measured faster here) | "torch" | "faiss" (faiss-cpu, CPU only). Results on the
      embeddings' device (torch) or CPU (faiss).
    """
    k = _check_k(k)
    p = _prepare(embeddings, labels, is_query, is_gallery, sequence_ids)
    x = p.embeddings
    queries = _gallery_view(x, p.query_ids)
    gallery = _gallery_view(x, p.gallery_ids)
    dist, pos = _search(queries, gallery, k, p.excl, chunk_size, backend, chunk_bytes)
    g_ids = p.gallery_ids.to(pos.device)
    retrieved = torch.where(pos >= 0, g_ids[pos.clamp(min=0)], pos) if len(g_ids) else pos
    device = retrieved.device
    labels_t = p.labels.to(device)
    query_ids = p.query_ids.to(device)
    return RetrievalResults(
        distances=dist,
        retrieved=retrieved,
        query_ids=query_ids,
        relevant=_relevance(retrieved, query_ids, labels_t),
        n_relevant=_count_relevant(p).to(device),
        labels=labels_t,
    )


def iter_pair_distances(
    embeddings: ArrayLike,
    labels: ArrayLike,
    is_query: ArrayLike,
    is_gallery: ArrayLike,
    *,
    sequence_ids: ArrayLike | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(distances, relevant)`` chunks covering every non-excluded query-gallery pair.

    `distances` (c, G) float32 via the expansion ``sqrt(max(||q||^2 + ||g||^2 - 2 q.g, 0))`` with excluded
    pairs set to NaN; `relevant` (c, G) bool (same label). Used for distance statistics (fnmr@fmr,
    histograms) without ever holding the full Q x G matrix.
    """
    p = _prepare(embeddings, labels, is_query, is_gallery, sequence_ids)
    yield from _pair_chunks(p, chunk_bytes)


def _pair_chunks(p: _Prepared, chunk_bytes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for d, rel, r, col in _pair_chunks_raw(p, max(1, chunk_bytes // 8)):  # 4 + 1 bytes a pair + temporaries
        if len(r):
            d[r, col] = float("nan")
        yield d, rel


def _pair_chunks_raw(
    p: _Prepared, chunk_elements: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(distances, relevant, excluded rows, excluded cols) per chunk of about `chunk_elements` pairs."""
    x = p.embeddings
    dev = x.device
    queries = _gallery_view(x, p.query_ids)
    gallery = _gallery_view(x, p.gallery_ids)
    nq, ng = len(queries), len(gallery)
    if nq == 0 or ng == 0:
        return
    rows = max(1, min(nq, chunk_elements // ng))
    g_sq = _sq_norms(gallery)
    q_sq_all = _sq_norms(queries)
    lab_q = p.labels[p.query_ids].to(dev)
    lab_g = p.labels[p.gallery_ids].to(dev)
    for a in range(0, nq, rows):
        q = queries[a : a + rows]
        c = len(q)
        d = torch.addmm(g_sq.unsqueeze(0), q, gallery.T, beta=1.0, alpha=-2.0)
        d.add_(q_sq_all[a : a + c].unsqueeze(1)).clamp_(min=0).sqrt_()
        r, col = p.excl.pairs(slice(a, a + c))
        rel = lab_q[a : a + c].unsqueeze(1) == lab_g.unsqueeze(0)
        yield d, rel, r.to(dev), col.to(dev)
