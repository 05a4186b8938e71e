"""Benchmark: retrieval metrics vs a bare float32 matrix product of the same shape.

For every N (default 10k, 30k, 100k; d=384; every item is a query and a gallery item; N/20 labels) it runs,
each in a fresh subprocess so that peak memory (ru_maxrss) belongs to one measurement:

- ``matmul``: the bare product X @ X.T (N x d times d x N), chunked over query rows exactly as the retrieval
  chunks it (one reused output buffer of DEFAULT_CHUNK_BYTES);
- ``metrics``: ``labkit.metrics.retrieval_metrics`` with cmc@1/5, precision@5, map@5 (pcf off, fnmr off).

It prints wall time, process CPU time, peak RSS and the ratios metrics / matmul (wall and CPU). The two are
interleaved `--repeats` times and the best of each is kept, because the machine may be shared.

    .venv/bin/python benchmarks/metrics.py                  # 10k, 30k, 100k
    .venv/bin/python benchmarks/metrics.py --sizes 10000    # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def make_data(n: int, dim: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    n_labels = max(1, n // 20)
    labels = torch.randint(0, n_labels, (n,), generator=g)
    centers = torch.randn(n_labels, dim, generator=g)
    x = centers[labels] + 3.0 * torch.randn(n, dim, generator=g)
    x = torch.nn.functional.normalize(x, dim=1)
    return x, labels


def worker(mode: str, n: int, dim: int, backend: str) -> dict:
    import torch

    from labkit import metrics as M
    from labkit import retrieval as R

    x, labels = make_data(n, dim)
    every = torch.ones(n, dtype=torch.bool)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, c0 = time.perf_counter(), time.process_time()
    out: dict = {}
    if mode == "matmul":
        rows = R._rows_per_chunk(n, n, None, R.DEFAULT_CHUNK_BYTES)
        buf = torch.empty(rows, n)
        for a in range(0, n, rows):
            q = x[a : a + rows]
            torch.mm(q, x.T, out=buf[: len(q)])
        out["rows_per_chunk"] = rows
    else:
        m = M.retrieval_metrics(
            x,
            labels,
            every,
            every,
            cmc_k=(1, 5),
            precision_k=(5,),
            map_k=(5,),
            pcf_variance=(),
            backend=backend,
        )
        out["metrics"] = {key: round(v, 4) for key, v in M.flatten_metrics(m).items()}
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - c0
    out["data_mb"] = rss_before
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_worker(mode: str, n: int, dim: int, backend: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--sizes",
        str(n),
        "--dim",
        str(dim),
        "--backend",
        backend,
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,30000,100000", help="comma-separated N (items)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per N; the best is kept")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"])
    parser.add_argument("--worker", choices=["matmul", "metrics"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    if args.worker:
        print(json.dumps(worker(args.worker, sizes[0], args.dim, args.backend)))
        return

    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={args.dim}, backend={args.backend}"
    )
    header = (
        f"{'N':>7} | {'matmul s':>8} {'cpu s':>7} | {'metrics s':>9} {'cpu s':>7} | "
        f"{'ratio':>5} {'cpu':>5} | {'peak MB':>7} {'data MB':>7} {'mm peak':>7} | cmc@1  map@5"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        mm, mt = [], []
        for _ in range(args.repeats):
            mm.append(run_worker("matmul", n, args.dim, args.backend))
            mt.append(run_worker("metrics", n, args.dim, args.backend))
        a = min(mm, key=lambda r: r["wall_s"])
        b = min(mt, key=lambda r: r["wall_s"])
        a_cpu = min(r["cpu_s"] for r in mm)
        b_cpu = min(r["cpu_s"] for r in mt)
        print(
            f"{n:>7} | {a['wall_s']:>8.2f} {a_cpu:>7.2f} | {b['wall_s']:>9.2f} {b_cpu:>7.2f} | "
            f"{b['wall_s'] / a['wall_s']:>5.2f} {b_cpu / a_cpu:>5.2f} | {b['peak_mb']:>7.0f} "
            f"{b['data_mb']:>7.0f} {a['peak_mb']:>7.0f} | "
            f"{b['metrics']['cmc@1']:.4f} {b['metrics']['map@5']:.4f}",
            flush=True,
        )
    print(
        "ratio = metrics wall time / bare chunked matmul wall time (cpu = same with process CPU time); "
        "peak MB = max RSS of the metrics process (data MB = RSS after making the data)."
    )


if __name__ == "__main__":
    main()
