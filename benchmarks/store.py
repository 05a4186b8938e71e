"""Embedding store speed: insert and load N x D float32 embeddings, and the latency of one search over N.

Run: `.venv/bin/python benchmarks/store.py [--n 100000] [--dim 384]` (a temporary file, removed afterwards).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import labkit.retrieval  # noqa: F401  (imports torch now, not inside the first timed search)
from labkit.store import EmbeddingStore


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=20, help="single-query searches timed (warm)")
    args = parser.parse_args()
    n, dim = args.n, args.dim
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = pd.DataFrame(
        {
            "path": [f"/data/images/class_{i % 1000:04d}/{i:07d}.jpg" for i in range(n)],
            "label": np.arange(n) % 1000,
            "split": np.where(np.arange(n) % 2 == 0, "train", "validation"),
            "category": np.where(np.arange(n) % 3 == 0, "a", "b"),
        }
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "store.sqlite"
        with EmbeddingStore(path) as store:
            model = store.register_model("benchmark", "f" * 64, dim)
            counts, insert_s = _timed(store.add, model, vectors, items)
            assert counts["inserted"] == n
            _, upsert_s = _timed(store.add, model, vectors, items)
            size_mb = sum(p.stat().st_size for p in Path(folder).iterdir()) / 2**20
            (loaded, meta), load_s = _timed(store.load, model)
            assert loaded.tobytes() == vectors.tobytes() and len(meta) == n
            (half, _), load_split_s = _timed(store.load, model, split="validation")
            queries = rng.standard_normal((args.queries, dim), dtype=np.float32)
            _, cold_s = _timed(store.search, queries[:1], model=model, k=5)
            warm = [_timed(store.search, q[None], model=model, k=5)[1] for q in queries]
            _, batch_s = _timed(store.search, queries, model=model, k=5)
            _, filtered_s = _timed(store.search, queries[:1], model=model, k=5, split="validation")
            _, filtered_warm_s = _timed(store.search, queries[:1], model=model, k=5, split="validation")
    # reference: one query as a bare numpy product against the vectors already in memory, norms precomputed
    norms = (vectors * vectors).sum(1)
    bare = [_timed(lambda q: np.argpartition(norms - 2 * (vectors @ q), 5)[:5], q)[1] for q in queries]
    print(f"embedding store benchmark: {n} x {dim} float32 ({vectors.nbytes / 2**20:.0f} MiB of vectors)")
    print(f"  insert (one transaction)   {insert_s:7.2f} s   {n / insert_s:10,.0f} rows/s")
    print(f"  upsert (same paths again)  {upsert_s:7.2f} s   {n / upsert_s:10,.0f} rows/s")
    print(f"  file size                  {size_mb:7.1f} MiB")
    print(f"  load all + metadata        {load_s:7.2f} s   {n / load_s:10,.0f} rows/s")
    print(f"  load split=validation      {load_split_s:7.2f} s   {len(half) / load_split_s:10,.0f} rows/s")
    print(f"  search 1 query, cold       {cold_s * 1e3:7.1f} ms  (includes loading the {n} vectors)")
    print(
        f"  search 1 query, warm       {statistics.median(warm) * 1e3:7.1f} ms  "
        f"(median of {len(warm)}; min {min(warm) * 1e3:.1f} ms)"
    )
    print(
        f"  bare numpy top-5, 1 query  {statistics.median(bare) * 1e3:7.1f} ms  "
        f"(reference; warm search / bare = {statistics.median(warm) / statistics.median(bare):.0f}x)"
    )
    print(f"  search {len(queries)} queries at once  {batch_s * 1e3 / len(queries):7.1f} ms per query")
    print(
        f"  search 1 query, split filter  cold {filtered_s * 1e3:.1f} ms, "
        f"warm {filtered_warm_s * 1e3:.1f} ms over {len(half)} vectors"
    )


if __name__ == "__main__":
    main()
