"""Embedding store speed at N x D float32 (default 100k and 1M x 384): insert, cold and warm exact search,
peak memory, the faiss index (build time, latency, recall@10 against exact search) and, when the `sqlite-vec`
package and `pysqlite3-binary` (an sqlite3 that loads extensions) are installed, sqlite-vec's figures on the
same data.

Run: `nice .venv/bin/python benchmarks/store.py [--sizes 100000 1000000] [--dim 384]` (temporary files,
removed afterwards; 1M x 384 needs ~6 GB of disk and ~5 GB of memory).

Vectors: 1000 class centres plus noise, unit length (trained embeddings cluster by class; on structureless
noise an IVF index needs far more probes for the same recall). Queries are new draws from the same classes.
"Cold" = a new process that opens the store and searches once (the OS page cache is warm, as for a script
run after another); "warm" = the median of the next single-query searches in that process. A store whose
vectors exceed `resident_bytes` (default 512 MiB) scans them window by window (bounded memory); the benchmark
also times such a store opened with a larger `resident_bytes` (all vectors mapped: faster, more memory).
Peak memory = the process's maximum resident set during the cold search minus its resident set before it
(memory-mapped file pages count while mapped).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

_CHILD_RUNS = 3  # cold searches = new processes per engine and size (median reported)


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def _data(n: int, dim: int, seed: int, classes: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """`n` unit vectors around the same `classes` centres (seed 0); `seed` draws the classes and the noise."""
    centres = np.random.default_rng(0).standard_normal((classes, dim), dtype=np.float32)
    rng = np.random.default_rng(seed + 1)
    labels = rng.integers(0, classes, n)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = centres[labels[start:stop]] + 0.7 * rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, labels


def _sqlite_vec():
    try:
        import pysqlite3.dbapi2 as sqlite3
        import sqlite_vec
    except ImportError:
        return None
    return sqlite3, sqlite_vec


# --- child processes: one cold search, then warm ones
def _memory(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process image, bytes (ru_maxrss counts the pre-exec parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(engine: str, path: str, queries_path: str, k: int) -> None:
    queries = np.load(queries_path)
    if engine.startswith("labkit"):
        from labkit.store import EmbeddingStore

        options = {"resident_bytes": 2**62} if engine == "labkit-resident" else {}
        rss_before = _memory("VmRSS")
        start = time.perf_counter()
        store = EmbeddingStore(path, read_only=True, **options)
        store.search(queries[0], model=1, k=k)
        cold = time.perf_counter() - start

        def search(q):
            return store.search(q, model=1, k=k)
    else:
        sqlite3, sqlite_vec = _sqlite_vec()
        rss_before = _memory("VmRSS")
        start = time.perf_counter()
        conn = sqlite3.connect(path)
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        sql = "SELECT rowid, distance FROM vectors WHERE embedding MATCH ? AND k = ? ORDER BY distance"
        conn.execute(sql, (queries[0].tobytes(), k)).fetchall()
        cold = time.perf_counter() - start

        def search(q):
            return conn.execute(sql, (q.tobytes(), k)).fetchall()

    peak = _memory("VmHWM") - rss_before
    warm = [_timed(search, q)[1] for q in queries[1:]]
    print(json.dumps({"cold": cold, "warm": statistics.median(warm), "peak": peak}))


def _cold_and_warm(engine: str, path: Path, queries_path: Path, k: int) -> dict:
    runs = []
    for _ in range(_CHILD_RUNS):
        out = subprocess.run(
            [sys.executable, __file__, "--child", engine, str(path), str(queries_path), str(k)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


# --- one size
def _bench(n: int, dim: int, n_queries: int, k: int, folder: Path, faiss_on: bool) -> dict:
    from labkit.store import DEFAULT_RESIDENT_BYTES, EmbeddingStore

    vectors, labels = _data(n, dim, seed=0)
    queries, _ = _data(max(n_queries, 100), dim, seed=1)  # new draws around the same centres
    queries_path = folder / "queries.npy"
    np.save(queries_path, queries[:n_queries])
    items = pd.DataFrame(
        {
            "path": [f"/data/images/class_{c:04d}/{i:07d}.jpg" for i, c in enumerate(labels)],
            "label": labels,
            "split": np.where(np.arange(n) % 2 == 0, "train", "validation"),
        }
    )
    row: dict = {"n": n}
    path = folder / f"store_{n}.sqlite"
    with EmbeddingStore(path) as store:
        model = store.register_model("benchmark", "f" * 64, dim)
        _, row["insert_s"] = _timed(store.add, model, vectors, items)
        _, row["first_search_s"] = _timed(store.search, queries[0], model=model, k=k)  # builds the sidecar
    del items
    row.update(
        {f"labkit_{key}": value for key, value in _cold_and_warm("labkit", path, queries_path, k).items()}
    )
    if n * dim * 4 > DEFAULT_RESIDENT_BYTES:  # the other side of the memory/speed trade: all vectors mapped
        resident = _cold_and_warm("labkit-resident", path, queries_path, k)
        row.update({f"resident_{key}": value for key, value in resident.items()})
    # the floor: one query as a bare numpy product against the vectors in memory, norms precomputed
    norms = np.einsum("ij,ij->i", vectors, vectors)
    bare = [
        _timed(lambda q: np.argpartition(norms - 2 * (vectors @ q), k)[:k], q)[1] for q in queries[:n_queries]
    ]
    row["numpy_warm"] = statistics.median(bare)
    if faiss_on:
        with EmbeddingStore(path) as store:
            built = store.build_index(1)
            row["faiss_build_s"], row["faiss_nlist"] = built["seconds"], built["nlist"]
            exact = store.search(queries, model=1, k=10)
            store.search(queries[0], model=1, k=10, exact=False)  # loads the index
            times = [_timed(store.search, q, model=1, k=10, exact=False)[1] for q in queries[:n_queries]]
            approx = store.search(queries, model=1, k=10, exact=False)
            row["faiss_warm"] = statistics.median(times)
            truth = exact.groupby("query")["path"].apply(set)
            found = approx.groupby("query")["path"].apply(set)
            row["faiss_recall10"] = float(np.mean([len(truth[q] & found[q]) / 10 for q in truth.index]))
            row["faiss_nprobe"] = max(1, built["nlist"] // 16)
    engine = _sqlite_vec()
    if engine is not None:
        sqlite3, sqlite_vec = engine
        vec_path = folder / f"vec_{n}.sqlite"
        conn = sqlite3.connect(vec_path)
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.execute(f"CREATE VIRTUAL TABLE vectors USING vec0(embedding float[{dim}])")
        start = time.perf_counter()
        with conn:
            conn.executemany(
                "INSERT INTO vectors (rowid, embedding) VALUES (?, ?)",
                ((i + 1, vectors[i].tobytes()) for i in range(n)),
            )
        row["vec_insert_s"] = time.perf_counter() - start
        conn.close()
        cold_warm = _cold_and_warm("sqlite-vec", vec_path, queries_path, k)
        row.update({f"vec_{key}": value for key, value in cold_warm.items()})
        vec_path.unlink()
    return row


def _print(rows: list[dict], dim: int) -> None:
    def ms(value):
        return "—" if value is None else f"{value * 1e3:.1f} ms"

    def s(value):
        return "—" if value is None else f"{value:.2f} s"

    def mib(value):
        return "—" if value is None else f"{value / 2**20:.0f} MiB"

    lines = [
        ("vectors", lambda r: f"{r['n']:,} x {dim} ({r['n'] * dim * 4 / 2**20:.0f} MiB)"),
        ("insert, labkit", lambda r: s(r["insert_s"])),
        ("first search after insert (builds sidecar)", lambda r: s(r["first_search_s"])),
        ("cold search (new process), labkit", lambda r: ms(r["labkit_cold"])),
        ("warm search, labkit", lambda r: ms(r["labkit_warm"])),
        ("warm search, bare numpy top-k", lambda r: ms(r["numpy_warm"])),
        ("labkit warm / numpy", lambda r: f"{r['labkit_warm'] / r['numpy_warm']:.2f}x"),
        ("peak memory of a cold search, labkit", lambda r: mib(r["labkit_peak"])),
        ("cold search, labkit resident_bytes > vectors", lambda r: ms(r.get("resident_cold"))),
        ("warm search, labkit resident_bytes > vectors", lambda r: ms(r.get("resident_warm"))),
        (
            "  / numpy",
            lambda r: f"{r['resident_warm'] / r['numpy_warm']:.2f}x" if "resident_warm" in r else "—",
        ),
        ("peak memory, labkit resident_bytes > vectors", lambda r: mib(r.get("resident_peak"))),
        (
            "faiss IVF-Flat build (nlist)",
            lambda r: f"{s(r.get('faiss_build_s'))} ({r.get('faiss_nlist', '—')})",
        ),
        (
            "faiss search, warm (nprobe)",
            lambda r: f"{ms(r.get('faiss_warm'))} ({r.get('faiss_nprobe', '—')})",
        ),
        (
            "faiss recall@10 vs exact (100 queries)",
            lambda r: f"{r['faiss_recall10']:.3f}" if "faiss_recall10" in r else "—",
        ),
        (
            "exact warm / faiss",
            lambda r: f"{r['labkit_warm'] / r['faiss_warm']:.0f}x" if "faiss_warm" in r else "—",
        ),
        ("insert, sqlite-vec", lambda r: s(r.get("vec_insert_s"))),
        ("cold search (new process), sqlite-vec", lambda r: ms(r.get("vec_cold"))),
        ("warm search, sqlite-vec", lambda r: ms(r.get("vec_warm"))),
        ("peak memory of a cold search, sqlite-vec", lambda r: mib(r.get("vec_peak"))),
    ]
    width = max(len(name) for name, _ in lines)
    print(f"| {'':{width}} | " + " | ".join(f"{r['n']:>12,}" for r in rows) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * 14 for _ in rows) + "|")
    for name, cell in lines:
        print(f"| {name:{width}} | " + " | ".join(f"{cell(r):>12}" for r in rows) + " |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=21, help="single-query searches per process")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--no-faiss", action="store_true")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            rows.append(_bench(n, args.dim, args.queries, args.k, Path(folder), not args.no_faiss))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(
        f"embedding store benchmark, k = {args.k}, d = {args.dim} "
        f"({_CHILD_RUNS} new processes per cold figure)"
    )
    _print(rows, args.dim)


if __name__ == "__main__":
    main()
