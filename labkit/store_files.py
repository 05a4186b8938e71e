"""Files beside an embedding store that make its search fast: a vector sidecar and an optional faiss index.

Both are caches of the database, never trusted over it. The store bumps a random 64-bit `generation` token of
a model in the same transaction as every change to its items; a file records the token of the snapshot it was
built from and is used only while the database still holds that token.

- **Vector sidecar** `<store>.m<model id>.vectors`: a 4 KiB JSON header (store id, model id, fingerprint,
  generation, n, dim), then the item ids (int64, ascending), their squared norms (float32) and the vectors
  (float32, row-major), each section 4 KiB aligned. It is written to a private temporary file, fsynced and
  renamed over the old one, so a reader sees the old file or the new one, never half of one; a process killed
  while writing leaves only its temporary file (removed by the next build).
- **faiss index** `<store>.m<model id>.g<generation>.faiss`: an IVF-Flat index (faiss ids = item ids), its
  file name carrying the generation it indexes; written the same way. Other generations' files are stale.

`scan_top_k` is the exact search over (ids, vectors, squared norms) chunks: one matrix product per chunk for
``||g||^2 - 2 q.g`` (ranks like the squared distance), an `argpartition` top-k per chunk merged with the
running best, and for the k winners of each chunk the distance computed directly as ``||q - g||`` (no
cancellation error) in float64, then rounded to float32. Rows end sorted by (distance, item id).
Memory: the queries, one chunk of scores (`score_bytes`) and O(queries x k); the vectors themselves are read
through a memory map, window by window (`window_bytes`) unless the whole file fits `resident_bytes`, when it
stays mapped between searches. Ranking uses float32 scores, so near-ties within float error may swap (as in
`labkit.retrieval`).
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "VectorFile",
    "private_name",
    "publish",
    "remove_abandoned",
    "faiss_index_path",
    "open_vector_file",
    "scan_top_k",
    "sidecar_path",
    "stale_faiss_indexes",
    "write_vector_file",
]

SIDECAR_MAGIC = b"LKVEC1\n"
HEADER_BYTES = 4096
ALIGN = 4096
WINDOW_BYTES = 64 * 2**20
SCORE_BYTES = 64 * 2**20


def sidecar_path(store_path: Path, model_id: int) -> Path:
    return store_path.with_name(f"{store_path.name}.m{model_id}.vectors")


def faiss_index_path(store_path: Path, model_id: int, generation: int) -> Path:
    return store_path.with_name(
        f"{store_path.name}.m{model_id}.g{generation & 0xFFFFFFFFFFFFFFFF:016x}.faiss"
    )


def stale_faiss_indexes(store_path: Path, model_id: int, generation: int) -> list[Path]:
    """Index files of this model built for another generation (stale)."""
    current = faiss_index_path(store_path, model_id, generation)
    return sorted(
        p for p in store_path.parent.glob(f"{store_path.name}.m{model_id}.g*.faiss") if p != current
    )


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _layout(n: int, dim: int) -> tuple[int, int, int, int]:
    ids_at = HEADER_BYTES
    norms_at = _aligned(ids_at + 8 * n)
    vectors_at = _aligned(norms_at + 4 * n)
    return ids_at, norms_at, vectors_at, vectors_at + 4 * n * dim


def private_name(final: Path) -> Path:
    """A temporary name beside `final` that only this process uses."""
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def remove_abandoned(final: Path, suffix: str = ".tmp") -> None:
    """Delete temporary files of `final` left by processes that no longer run (killed while writing)."""
    for leftover in final.parent.glob(f".{final.name}.*{suffix}"):
        try:
            pid = int(leftover.name[len(final.name) + 2 :].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            leftover.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


def publish(temporary: Path, final: Path) -> None:
    """fsync `temporary` and rename it over `final` (atomic on POSIX)."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    try:
        folder = os.open(final.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_vector_file(
    path: Path, header: dict, n: int, dim: int, chunks: Iterable[tuple[np.ndarray, np.ndarray]]
) -> None:
    """Write a sidecar of `n` rows from `(ids, vectors)` chunks (ids ascending), atomically."""
    ids_at, norms_at, vectors_at, end = _layout(n, dim)
    encoded = SIDECAR_MAGIC + json.dumps({**header, "n": n, "dim": dim}).encode()
    if len(encoded) >= HEADER_BYTES:
        raise ValueError("sidecar header too long")
    remove_abandoned(path)
    temporary = private_name(path)
    try:
        with open(temporary, "wb") as handle:
            handle.truncate(end)
            handle.write(encoded.ljust(HEADER_BYTES, b" "))
            row, last_id = 0, None
            for ids, vectors in chunks:
                ids = np.ascontiguousarray(ids, dtype="<i8")
                vectors = np.ascontiguousarray(vectors, dtype="<f4").reshape(len(ids), dim)
                if len(ids) and ((last_id is not None and ids[0] <= last_id) or np.any(np.diff(ids) <= 0)):
                    raise ValueError("sidecar rows must come in ascending id order")
                if row + len(ids) > n:
                    raise ValueError(f"more than the announced {n} rows")
                handle.seek(ids_at + 8 * row)
                handle.write(ids.tobytes())
                handle.seek(norms_at + 4 * row)
                handle.write(np.einsum("ij,ij->i", vectors, vectors).astype("<f4").tobytes())
                handle.seek(vectors_at + 4 * dim * row)
                handle.write(vectors.tobytes())
                row += len(ids)
                last_id = int(ids[-1]) if len(ids) else last_id
            if row != n:
                raise ValueError(f"{row} rows written, {n} announced")
        publish(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@dataclass
class VectorFile:
    """An open sidecar: header, ids and squared norms in memory, vectors read through a memory map."""

    path: Path
    header: dict
    ids: np.ndarray
    norms: np.ndarray
    vectors_at: int
    fd: int
    resident: np.ndarray | None = None  # the whole (n, dim) matrix, mapped, when it fits the budget
    stamp: tuple = ()  # (inode, size, mtime) when opened: a file changed in place is opened again

    def unchanged(self) -> bool:
        """Whether the file at `path` is still the one opened (our writes replace it: a new inode)."""
        try:
            now = os.stat(self.path)
        except OSError:
            return False
        return (now.st_ino, now.st_size, now.st_mtime_ns) == self.stamp

    @property
    def n(self) -> int:
        return int(self.header["n"])

    @property
    def dim(self) -> int:
        return int(self.header["dim"])

    def close(self) -> None:
        self.resident = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _map(self, start: int, stop: int, populate: bool = False) -> np.ndarray:
        row_bytes = 4 * self.dim
        offset = self.vectors_at + start * row_bytes
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        length = (stop - start) * row_bytes + offset - aligned
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        mapped = mmap.mmap(self.fd, length, flags=flags, prot=mmap.PROT_READ, offset=aligned)
        return np.frombuffer(mapped, "<f4", count=(stop - start) * self.dim, offset=offset - aligned).reshape(
            stop - start, self.dim
        )

    def chunks(
        self, positions: np.ndarray | None = None, window_bytes: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`(ids, vectors, squared norms)` windows over all rows, or over the given sorted row positions."""
        if self.n == 0:
            return
        window_bytes = window_bytes or WINDOW_BYTES
        step = self.n if self.resident is not None else max(1, window_bytes // (4 * self.dim))
        for start in range(0, self.n, step):
            stop = min(self.n, start + step)
            if positions is not None:
                lo, hi = np.searchsorted(positions, [start, stop])
                if lo == hi:
                    continue
            window = self.resident[start:stop] if self.resident is not None else self._map(start, stop)
            if positions is None:
                yield self.ids[start:stop], window, self.norms[start:stop]
            else:
                local = positions[lo:hi]
                yield self.ids[local], window[local - start], self.norms[local]


def open_vector_file(path: Path, resident_bytes: int) -> VectorFile | None:
    """The sidecar at `path`, or None when it is missing or unreadable (then it is rebuilt or not used)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        head = os.pread(fd, HEADER_BYTES, 0)
        if not head.startswith(SIDECAR_MAGIC):
            raise ValueError("not a sidecar")
        header = json.loads(head[len(SIDECAR_MAGIC) :].decode().strip())
        n, dim = int(header["n"]), int(header["dim"])
        ids_at, norms_at, vectors_at, end = _layout(n, dim)
        if os.fstat(fd).st_size != end:
            raise ValueError("truncated sidecar")
        ids = np.frombuffer(os.pread(fd, 8 * n, ids_at), "<i8")
        norms = np.frombuffer(os.pread(fd, 4 * n, norms_at), "<f4")
        if len(ids) != n or len(norms) != n:
            raise ValueError("short read")
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        os.close(fd)
        return None
    opened = os.fstat(fd)
    stamp = (opened.st_ino, opened.st_size, opened.st_mtime_ns)
    vector_file = VectorFile(path, header, ids, norms, vectors_at, fd, stamp=stamp)
    if 0 < 4 * n * dim <= resident_bytes:
        vector_file.resident = vector_file._map(0, n, populate=True)
    return vector_file


def scan_top_k(
    queries: np.ndarray,
    chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    k: int,
    score_bytes: int = SCORE_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by Euclidean distance over `(ids, vectors, squared norms)` chunks.

    Returns `(distances, ids)`, both (Q, k'), k' = min(k, rows seen): distances ascending float32, ties
    broken by id; fewer rows than k give k' columns.
    """
    n_queries = len(queries)
    best_scores = np.empty((n_queries, 0), np.float32)
    best_ids = np.empty((n_queries, 0), np.int64)
    best_distances = np.empty((n_queries, 0), np.float32)
    rows_per_step = max(256, score_bytes // (4 * max(1, n_queries)))
    for ids, vectors, norms in chunks:
        for start in range(0, len(ids), rows_per_step):
            g = vectors[start : start + rows_per_step]
            scores = norms[start : start + rows_per_step][None, :] - 2 * (g @ queries.T).T  # GEMV for 1 query
            if scores.shape[1] > k:
                local = np.argpartition(scores, k - 1, axis=1)[:, :k]
            else:
                local = np.broadcast_to(np.arange(scores.shape[1]), (n_queries, scores.shape[1]))
            winners = g[local]  # (Q, k, D)
            difference = winners.astype(np.float64) - queries[:, None, :]
            distances = np.sqrt(np.einsum("qkd,qkd->qk", difference, difference))
            best_scores = np.concatenate([best_scores, np.take_along_axis(scores, local, 1)], axis=1)
            best_ids = np.concatenate(
                [best_ids, np.asarray(ids[start : start + rows_per_step])[local]], axis=1
            )
            best_distances = np.concatenate([best_distances, distances.astype(np.float32)], axis=1)
            if best_scores.shape[1] > k:
                keep = np.argpartition(best_scores, k - 1, axis=1)[:, :k]
                best_scores = np.take_along_axis(best_scores, keep, 1)
                best_ids = np.take_along_axis(best_ids, keep, 1)
                best_distances = np.take_along_axis(best_distances, keep, 1)
    order = np.lexsort((best_ids, best_distances), axis=1) if best_ids.size else best_ids
    return np.take_along_axis(best_distances, order, 1), np.take_along_axis(best_ids, order, 1)
