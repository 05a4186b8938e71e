"""The embedding store of a run folder: fill it from the run's saved validation embeddings, and draw search
results with labkit.viz.

`labkit.store` keeps embeddings and searches them and knows nothing of run folders or figures; this
module holds what `notebooks/05_search.ipynb` needs around it. `fill_from_run` uses
`run_dir/validation_embeddings.pt` (written by 02_validate) only when its rows are the dataset's validation
rows and re-embedding its first images gives the same vectors; `as_retrieval_results` turns search results
into a `RetrievalResults` so the viz retrieval figures draw them unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from labkit.store import (
    EmbeddingStore,
    StoreError,
    _python_value,
    _register,
    _to_numpy,
    _with_file_stamps,
    embed_dataset_cached,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["VALIDATION_EMBEDDINGS", "as_retrieval_results", "draw_search_results", "fill_from_run"]

VALIDATION_EMBEDDINGS = "validation_embeddings.pt"


def _saved_embeddings_problem(
    saved: Any, validation: pd.DataFrame, extractor: Any, check_rows: int, device: str
) -> str:
    """Why `saved` (a validation_embeddings.pt payload) cannot stand for `extractor`, or "" when it can."""
    from labkit.data import LabeledImages
    from labkit.models import embed

    if not isinstance(saved, dict) or not {"embeddings", "paths"} <= set(saved):
        return "it lacks the keys 'embeddings' and 'paths'"
    vectors = _to_numpy(saved["embeddings"])
    if [str(p) for p in saved["paths"]] != validation["path"].astype(str).tolist():
        return "its rows are not the validation rows of this dataset"
    if vectors.ndim != 2 or vectors.shape[1] != int(extractor.embedding_size):
        return (
            f"its vectors have shape {vectors.shape}, the extractor makes {extractor.embedding_size} values"
        )
    rows = validation.iloc[:check_rows]
    dataset = LabeledImages(rows, extractor.transforms(train=False))
    fresh = embed(extractor, dataset, device=device, progress=False).numpy()
    if not np.allclose(fresh, vectors[: len(rows)], rtol=1e-3, atol=1e-4):
        return "this extractor embeds its first images differently (another model made them)"
    return ""


def fill_from_run(
    store: EmbeddingStore,
    extractor: torch.nn.Module,
    run_dir: str | os.PathLike,
    dataset_df: pd.DataFrame,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    check_rows: int = 4,
) -> dict[str, Any]:
    """Store the validation images of `dataset_df` for `extractor`.

    The vectors come from `run_dir/validation_embeddings.pt` (02_validate) when its rows are this dataset's
    validation rows and re-embedding its first `check_rows` images with `extractor` gives the same vectors;
    otherwise they are embedded now with `embed_dataset_cached`. Returns the model id, the `source` and why
    the file was not used (`note`), with the counts.
    """
    import torch

    from labkit.data import validation_dataset

    validation = validation_dataset(dataset_df).df
    saved_path = Path(run_dir) / VALIDATION_EMBEDDINGS
    note = f"no {saved_path.name} in the run folder"
    if saved_path.is_file():
        saved = torch.load(saved_path, map_location="cpu", weights_only=True)
        problem = _saved_embeddings_problem(saved, validation, extractor, check_rows, device)
        if not problem:
            model_id = _register(store, extractor)
            counts = store.add(model_id, saved["embeddings"], _with_file_stamps(validation))
            return {"model_id": model_id, "source": saved_path.name, "note": "", **counts}
        note = f"{saved_path.name} not used: {problem}"
    counts = embed_dataset_cached(store, extractor, validation, batch_size=batch_size, device=device)
    return {**counts, "source": "embedded now", "note": note}


def _search_items(results: pd.DataFrame, query_paths: Any, query_labels: Any) -> tuple[list, list]:
    queries = sorted(results["query"].unique().tolist())
    if query_paths is None:
        if "query_path" not in results.columns:
            raise StoreError(
                "these results have no query_path column; pass query_paths (one image per query)."
            )
        first = results.groupby("query")["query_path"].first()
        query_paths = [first[q] for q in queries]
    if query_labels is None and "query_label" in results.columns:
        first = results.groupby("query")["query_label"].first()
        query_labels = [first[q] for q in queries]
    query_labels = [None] * len(queries) if query_labels is None else list(query_labels)
    if len(query_paths) != len(queries) or len(query_labels) != len(queries):
        raise StoreError(f"the results hold {len(queries)} queries; give one query path and label for each.")
    for q, path in zip(queries, query_paths, strict=True):
        if _python_value(path) is None:
            raise StoreError(f"query {q} has no image path (a PIL image or a vector); pass query_paths.")
    return list(zip(query_paths, query_labels, strict=True)), queries


def as_retrieval_results(
    results: pd.DataFrame, *, query_paths: Sequence[str] | None = None, query_labels: Sequence | None = None
) -> tuple[Any, pd.DataFrame]:
    """Search results as a `labkit.retrieval.RetrievalResults` over items (queries first, then every hit)
    for the labkit.viz retrieval figures. Relevance = same label as the query (never for an unknown label).
    """
    import torch

    from labkit.retrieval import RetrievalResults

    query_items, queries = _search_items(results, query_paths, query_labels)
    n_queries, width = len(queries), int(results["rank"].max()) if len(results) else 1
    hit_labels = results["label"].tolist()
    names = [str(label) if label is not None else "new image" for _, label in query_items]
    items = pd.DataFrame(
        {
            "path": [str(p) for p, _ in query_items] + results["path"].tolist(),
            "label": names + [str(v) for v in hit_labels],
        }
    )
    keys = [
        ("label", str(label)) if label is not None else ("unknown", q)
        for q, (_, label) in enumerate(query_items)
    ]
    keys += [("label", str(v)) for v in hit_labels]
    codes = torch.as_tensor(pd.factorize(pd.Series([repr(k) for k in keys]))[0], dtype=torch.int64)
    retrieved = torch.full((n_queries, width), -1, dtype=torch.int64)
    distances = torch.full((n_queries, width), math.inf, dtype=torch.float32)
    position = {q: i for i, q in enumerate(queries)}
    rows = torch.as_tensor([position[q] for q in results["query"]], dtype=torch.int64)
    cols = torch.as_tensor(results["rank"].to_numpy() - 1, dtype=torch.int64)
    retrieved[rows, cols] = torch.arange(len(results)) + n_queries
    distances[rows, cols] = torch.tensor(results["distance"].to_numpy(dtype=np.float32))
    query_ids = torch.arange(n_queries)
    relevant = (retrieved >= 0) & (codes[retrieved.clamp(min=0)] == codes[query_ids][:, None])
    return (
        RetrievalResults(distances, retrieved, query_ids, relevant, relevant.sum(dim=1), codes),
        items,
    )


def draw_search_results(
    results: pd.DataFrame,
    *,
    query_paths: Sequence[str] | None = None,
    query_labels: Sequence | None = None,
    k: int | None = None,
    title: str | None = None,
) -> Any:
    """A labkit.viz grid of search results: each query (blue) and its hits, green when they share its label.

    Query paths and labels come from the results' `query_path` / `query_label` columns unless given.
    """
    from labkit import viz

    retrieval, items = as_retrieval_results(results, query_paths=query_paths, query_labels=query_labels)
    k = int(results["rank"].max()) if k is None else k
    title = f"Search results: top {k} (green: same label as the query)" if title is None else title
    return viz.draw_queries(
        retrieval, list(range(len(retrieval))), items, k=k, labels=items["label"].tolist(), title=title
    )
