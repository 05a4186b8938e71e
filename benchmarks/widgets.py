"""Update latency of the interactive panels, kernel side: from a state change to the new picture.

For N items (default 1,000: 64 px images, 512-d embeddings, 50 labels, 5 categories) it times what a click
costs in the kernel: the state change, the retrieval or search, drawing the figure and encoding the PNG that
goes to the browser (`ResultBrowser.next` / `set_k`, `EmbeddingMap.select`, `SearchPanel.set_stored_query` /
`set_k`), with the widgets built so that the sync runs too. The browser's share (comm round trip, decoding,
layout) comes on top: tests/test_browser.py measures click-to-picture in Chromium.

Run: `.venv/bin/python benchmarks/widgets.py [--n 1000] [--repeats 20]`; prints median, p90 and max in ms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from labkit import store, widgets
from labkit.retrieval import retrieve


def make_items(folder: Path, n: int, n_labels: int, side: int = 64) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = i % n_labels
        path = folder / f"{i:05d}.png"
        pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        pixels[..., label % 3] = 40 + 4 * label
        Image.fromarray(pixels).save(path)
        rows.append(
            {
                "path": str(path),
                "label": label,
                "split": "validation",
                "category": f"family {label % 5}",
                "class_name": f"class {label:02d}",
                "is_query": True,
                "is_gallery": True,
            }
        )
    return pd.DataFrame(rows)


def timed(action, repeats: int) -> list[float]:
    action()  # warm: caches, first-draw costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--labels", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        items = make_items(Path(tmp), args.n, args.labels)
        labels = torch.as_tensor(items["label"].to_numpy())
        embeddings = torch.nn.functional.normalize(
            torch.randn(args.n, 512) + 2 * torch.randn(args.labels, 512)[labels]
        )
        ones = torch.ones(args.n, dtype=torch.bool)
        results = retrieve(embeddings, labels, ones, ones, k=10)
        per_query = {"cmc@1": results.relevant[:, 0].float()}

        browser = widgets.ResultBrowser(results, items, per_query, k=5)
        browser.widget  # noqa: B018 - build the widgets: every change syncs them
        k_values = iter([4, 5] * (args.repeats + 1))
        rows = {
            "result browser: next": timed(browser.next, args.repeats),
            "result browser: set_k": timed(lambda: browser.set_k(next(k_values)), args.repeats),
        }
        embedding_map = widgets.EmbeddingMap(
            embeddings, items, results=results, metrics_per_query=per_query, k=5
        )
        embedding_map.widget  # noqa: B018
        picks = iter(np.random.default_rng(1).integers(0, args.n, args.repeats + 1).tolist())
        rows["embedding map: select"] = timed(lambda: embedding_map.select(next(picks)), args.repeats)

        db = store.EmbeddingStore(Path(tmp) / "store.sqlite")
        model = db.register_model("synthetic", "0" * 64, 512)
        db.add(model, embeddings.numpy(), items.drop(columns=["is_query", "is_gallery"]))
        panel = widgets.SearchPanel(db, model, k=5)
        panel.widget  # noqa: B018
        paths = iter(items["path"].sample(args.repeats + 1, random_state=2).tolist())
        rows["search panel: stored query"] = timed(lambda: panel.set_stored_query(next(paths)), args.repeats)
        k_values = iter([4, 5] * (args.repeats + 1))
        rows["search panel: set_k"] = timed(lambda: panel.set_k(next(k_values)), args.repeats)
        db.close()

    print(f"kernel-side update latency, {args.n} items, {args.repeats} updates each (ms)")
    print(f"{'update':<30} {'median':>8} {'p90':>8} {'max':>8}")
    for name, times in rows.items():
        p90 = float(np.percentile(times, 90))
        print(f"{name:<30} {statistics.median(times):8.0f} {p90:8.0f} {max(times):8.0f}")


if __name__ == "__main__":
    main()
