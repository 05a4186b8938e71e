"""labkit.store: round trip, safety (dimension, non-finite, interrupted insert, foreign file), search."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3

import numpy as np
import pandas as pd
import pytest

from labkit import run_store
from labkit import store as store_module
from labkit.store import APPLICATION_ID, EmbeddingStore, NotAStoreError, StoreError

DIM = 8


def _items(n: int, prefix: str = "img", seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    items = pd.DataFrame(
        {
            "path": [f"/data/{prefix}_{i:04d}.png" for i in range(n)],
            "label": [int(i % 5) for i in range(n)],
            "split": ["validation" if i % 3 else "train" for i in range(n)],
            "category": ["odd" if i % 2 else "even" for i in range(n)],
        }
    )
    return vectors, items


def _snapshot(path) -> tuple:
    """Everything a reader can see: every model, and every item with its vector, in a fresh connection."""
    with EmbeddingStore(path, create=False) as s:
        models = [(m.id, m.backbone, m.fingerprint, m.dim) for m in s.models()]
        items = []
        for m in s.models():
            vectors, meta = s.load(m.id)
            items.append((vectors.tobytes(), meta.to_json()))
        return models, items, s.summary().to_json()


@pytest.fixture
def store(tmp_path):
    with EmbeddingStore(tmp_path / "store.sqlite") as s:
        yield s


# --- round trip / schema
def test_round_trip_is_bit_identical_with_metadata(tmp_path):
    vectors = np.array(
        [[0.1, -0.0, 1e-45, 3.4e38, -2.5, 7.0, 1 / 3, np.pi]] + [np.arange(DIM) * 0.37 - 1.1] * 2,
        dtype=np.float32,
    )
    vectors[2, 0] = np.nextafter(np.float32(1), np.float32(2))
    items = pd.DataFrame(
        {
            "path": ["/a/x.png", "/a/y.png", "/b/z.png"],
            "label": [3, "cat", 7],
            "split": ["validation", "validation", "train"],
            "category": ["fruit", "", "shape"],
            "is_query": [True, False, True],
            "x_1": [1.5, 2.25, 0.0],
            "sequence": ["s1", "s1", "s2"],
        }
    )
    path = tmp_path / "store.sqlite"
    with EmbeddingStore(path) as s:
        model_id = s.register_model("resnet18", "f" * 64, DIM, image_size=32)
        assert s.add(model_id, vectors, items) == {"inserted": 3, "updated": 0}
    with EmbeddingStore(path, create=False) as s:  # a new connection, after close
        loaded, meta = s.load(model_id)
        assert loaded.dtype == np.float32 and loaded.shape == (3, DIM)
        assert loaded.tobytes() == vectors.tobytes()
        assert np.signbit(loaded[0, 1])  # -0.0 kept
        assert list(meta.columns) == list(items.columns)
        for column in items.columns:
            assert meta[column].tolist() == items[column].tolist(), column
        assert [type(v) for v in meta["label"]] == [int, str, int]
        (info,) = s.models()
        assert (info.id, info.backbone, info.fingerprint, info.dim, info.extra) == (
            model_id,
            "resnet18",
            "f" * 64,
            DIM,
            {"image_size": 32},
        )
        assert s.meta["magic"] == store_module.MAGIC and s.meta["schema_version"] == str(
            store_module.SCHEMA_VERSION
        )
        assert s._db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert path.read_bytes()[68:72] == APPLICATION_ID.to_bytes(4, "big")


def test_torch_float64_and_list_of_rows_are_stored_as_float32(store):
    torch = pytest.importorskip("torch")
    model_id = store.register_model("m", "fp-1", DIM)
    vectors, items = _items(4)
    store.add(model_id, torch.from_numpy(vectors[:2].astype(np.float64)), items.iloc[:2])
    store.add(model_id, list(vectors[2:]), items["path"].iloc[2:].tolist())
    loaded, meta = store.load(model_id)
    assert loaded.tobytes() == vectors.tobytes()
    assert meta["label"].tolist()[:2] == [0, 1] and meta["label"].isna().tolist()[2:] == [True, True]


def test_upsert_by_path_updates_in_place(store):
    model_id = store.register_model("m", "fp-1", DIM)
    vectors, items = _items(6)
    store.add(model_id, vectors, items)
    changed = items.iloc[[4, 1]].assign(label=["new4", "new1"])
    assert store.add(model_id, vectors[[0, 2]] * 2, changed) == {"inserted": 0, "updated": 2}
    loaded, meta = store.load(model_id)
    expected = vectors.copy()
    expected[[4, 1]] = vectors[[0, 2]] * 2
    assert loaded.tobytes() == expected.tobytes()
    assert meta["path"].tolist() == items["path"].tolist()  # rows keep their place
    assert meta["label"].tolist() == [0, "new1", 2, 3, "new4", 0]
    assert len(store) == 6


def test_filters_select_subsets_and_paths_keep_their_order(store):
    model_id = store.register_model("m", "fp-1", DIM)
    vectors, items = _items(30)
    store.add(model_id, vectors, items)
    keep = (items["split"] == "validation") & items["label"].isin([1, 3]) & (items["category"] == "odd")
    loaded, meta = store.load(model_id, split="validation", label=[1, 3], category="odd")
    assert meta["path"].tolist() == items.loc[keep, "path"].tolist()
    assert loaded.tobytes() == vectors[keep.to_numpy()].tobytes()
    wanted = [items["path"][7], "/not/stored.png", items["path"][2], items["path"][7]]
    loaded, meta = store.load(model_id, paths=wanted)
    assert meta["path"].tolist() == [items["path"][7], items["path"][2]]
    assert loaded.tobytes() == vectors[[7, 2]].tobytes()
    empty, meta = store.load(model_id, label="no such label")
    assert empty.shape == (0, DIM) and len(meta) == 0


def test_summary_counts_per_model(store):
    a = store.register_model("resnet18", "fp-a", DIM)
    b = store.register_model("vit_small", "fp-b", 4)
    vectors, items = _items(9)
    store.add(a, vectors, items)
    summary = store.summary()
    assert summary["model_id"].tolist() == [a, b]
    assert summary["n_items"].tolist() == [9, 0]
    assert summary["n_labels"].tolist() == [5, 0]
    assert summary["n_categories"].tolist() == [2, 0]
    assert summary["dim"].tolist() == [DIM, 4]
    assert summary["splits"].tolist() == ["train: 3, validation: 6", ""]


def test_register_model_is_idempotent_and_refuses_conflicts(store):
    first = store.register_model("resnet18", "fp-a", DIM)
    assert store.register_model("resnet18", "fp-a", DIM) == first
    with pytest.raises(StoreError, match="fp-a.*registered as model 1"):
        store.register_model("resnet18", "fp-a", DIM * 2)
    with pytest.raises(StoreError, match="dim must be a positive integer"):
        store.register_model("resnet18", "fp-b", 0)
    assert len(store.models()) == 1


def test_delete_items_and_models(store):
    a = store.register_model("resnet18", "fp-a", DIM)
    b = store.register_model("resnet18", "fp-b", DIM)
    vectors, items = _items(12)
    store.add(a, vectors, items)
    store.add(b, vectors, items)
    with pytest.raises(StoreError, match="no filter"):
        store.delete_items(a)
    assert store.delete_items(a, split="train") == 4
    assert store.delete_items(a, paths=[items["path"][1], "/missing.png"]) == 1
    _, meta = store.load(a)
    assert meta["path"].tolist() == [p for i, p in enumerate(items["path"]) if i % 3 and i != 1]
    assert len(store.load(b)[0]) == 12  # the other model is untouched
    assert store.delete_model(b) == 12
    assert [m.id for m in store.models()] == [a]
    assert store.delete_items(a, all_items=True) == 7
    assert len(store) == 0


# --- safety
def test_wrong_dimension_is_refused_naming_model_and_path(store):
    model_id = store.register_model("resnet18", "abcdef0123456789", DIM)
    vectors, items = _items(3)
    with pytest.raises(
        StoreError, match=r"model 1 \(resnet18, dim 8, fingerprint abcdef012345\).* 4 columns"
    ) as err:
        store.add(model_id, vectors[:, :4], items)
    assert items["path"][0] in str(err.value)
    ragged = [vectors[0], vectors[1][:5], vectors[2]]
    with pytest.raises(StoreError, match=r"row 1 \(path '/data/img_0001.png'\) has shape \(5,\)"):
        store.add(model_id, ragged, items)
    with pytest.raises(StoreError, match="4 rows but 3 items"):
        store.add(model_id, np.zeros((4, DIM), np.float32), items)
    with pytest.raises(StoreError, match="query vectors have 3 columns"):
        store.search(np.zeros((1, 3), np.float32), model=model_id)
    assert len(store) == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_values_are_refused_naming_row_and_path(store, bad):
    model_id = store.register_model("resnet18", "abcdef0123456789", DIM)
    vectors, items = _items(10)
    vectors = vectors.astype(np.float64)
    vectors[7, 3] = bad  # 1e39 overflows float32
    vectors[9, 0] = bad
    with pytest.raises(StoreError, match=r"model 1 .*row 7 \(path '/data/img_0007.png'\).*2 row\(s\)"):
        store.add(model_id, vectors, items)
    assert len(store) == 0


def test_bad_items_are_refused(store):
    model_id = store.register_model("m", "fp-1", DIM)
    vectors, items = _items(3)
    with pytest.raises(StoreError, match="more than once"):
        store.add(model_id, vectors, items.assign(path=["/a", "/b", "/a"]))
    with pytest.raises(StoreError, match="'path' column"):
        store.add(model_id, vectors, items.drop(columns="path"))
    with pytest.raises(StoreError, match="row 2: 'path' must be a non-empty string"):
        store.add(model_id, vectors, items.assign(path=["/a", "/b", ""]))
    assert len(store) == 0


def test_interrupted_bulk_insert_leaves_the_database_unchanged(tmp_path):
    path = tmp_path / "store.sqlite"
    with EmbeddingStore(path) as s:
        model_id = s.register_model("m", "fp-1", DIM)
        vectors, items = _items(20)
        s.add(model_id, vectors, items)
        before = _snapshot(path)
        # 1000 rows: the first 20 update stored items, row 600 holds a value JSON cannot store.
        new_vectors, new_items = _items(1000, seed=1)
        new_items.loc[:19, "path"] = items["path"]
        new_items["note"] = pd.Series(["ok"] * len(new_items), dtype=object)
        new_items.loc[600, "note"] = object()
        with pytest.raises(StoreError, match=r"img_0600.png'.*column 'note'"):
            s.add(model_id, new_vectors, new_items)
        assert _snapshot(path) == before
        # the same interruption from a generator that raises after handing 500 rows to sqlite
        handed = []

        def interrupted(model_id, frame, matrix):
            for i, row in enumerate(original(model_id, frame, matrix)):
                if i == 500:
                    raise KeyboardInterrupt
                handed.append(i)
                yield row

        original = EmbeddingStore._rows
        s._rows = interrupted
        with pytest.raises(KeyboardInterrupt):
            s.add(model_id, new_vectors, new_items.assign(note="ok"))
        assert len(handed) == 500
        del s._rows
        assert _snapshot(path) == before
        assert s.add(model_id, new_vectors[:3], new_items.iloc[:3]) == {"inserted": 0, "updated": 3}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("kind", ["random bytes", "other sqlite", "same id, no meta", "empty", "text"])
def test_foreign_files_are_refused_and_left_unchanged(tmp_path, kind):
    path = tmp_path / "foreign.db"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        path.write_text("path,label\n/a.png,1\n")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        conn = sqlite3.connect(path)
        conn.execute(
            "CREATE TABLE meta (key TEXT, value TEXT)" if kind == "same id, no meta" else "CREATE TABLE t (x)"
        )
        conn.execute("INSERT INTO t VALUES (1)" if kind == "other sqlite" else "SELECT 1")
        if kind == "same id, no meta":
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.commit()
        conn.close()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    stat = path.stat()
    with pytest.raises(NotAStoreError, match="not changed"):
        EmbeddingStore(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.db"]  # no -wal / -shm / journal left


def test_missing_file_with_create_false_and_newer_schema(tmp_path):
    with pytest.raises(FileNotFoundError, match="create=True"):
        EmbeddingStore(tmp_path / "none.sqlite", create=False)
    assert not (tmp_path / "none.sqlite").exists()
    path = tmp_path / "store.sqlite"
    EmbeddingStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        EmbeddingStore(path)


def test_read_only_store_refuses_writes(tmp_path):
    path = tmp_path / "store.sqlite"
    with EmbeddingStore(path) as s:
        model_id = s.register_model("m", "fp-1", DIM)
    with EmbeddingStore(path, read_only=True) as s:
        vectors, items = _items(2)
        with pytest.raises(StoreError, match="read_only=True"):
            s.add(model_id, vectors, items)
        assert len(s.load(model_id)[0]) == 0


def test_models_never_mix(store):
    a = store.register_model("resnet18", "aaaaaa111", DIM)
    b = store.register_model("resnet18", "bbbbbb222", DIM)
    vectors, items = _items(10)
    store.add(a, vectors, items)
    store.add(b, vectors + 100, items.assign(path=items["path"] + "?b"))
    for call in (lambda: store.load("resnet18"), lambda: store.search(vectors[:1], model="resnet18")):
        with pytest.raises(StoreError, match="ambiguous.*model 1.*model 2"):
            call()
    with pytest.raises(StoreError, match="name the model"):
        store.search(vectors[:1], model=None)
    with pytest.raises(StoreError, match="no model 7"):
        store.load(7)
    assert store.model("aaaaaa").id == a and store.model("bbbbbb222").id == b
    # the query is model b's vector of item 0, but model a is searched: only model a's items come back
    results = store.search(vectors[:1] + 100, model=a, k=10)
    assert sorted(results["path"]) == sorted(items["path"])


# --- search
def _brute_force(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    rows, dists = [], []
    for q in queries.astype(np.float64):
        d = np.array([np.sqrt(((q - g) ** 2).sum()) for g in gallery.astype(np.float64)])
        order = np.argsort(d, kind="stable")[:k]
        rows.append(order)
        dists.append(d[order])
    return np.array(rows), np.array(dists)


def test_search_equals_brute_force(store):
    model_id = store.register_model("m", "fp-1", DIM)
    vectors, items = _items(300)
    store.add(model_id, vectors, items)
    queries = np.random.default_rng(5).standard_normal((7, DIM)).astype(np.float32)
    results = store.search(queries, model=model_id, k=5)
    assert list(results.columns) == ["query", "rank", "path", "label", "category", "split", "distance"]
    rows, dists = _brute_force(queries, vectors, 5)
    assert results["query"].tolist() == np.repeat(np.arange(7), 5).tolist()
    assert results["rank"].tolist() == [1, 2, 3, 4, 5] * 7
    assert results["path"].tolist() == items["path"].to_numpy()[rows.ravel()].tolist()
    assert results["label"].tolist() == items["label"].to_numpy()[rows.ravel()].tolist()
    np.testing.assert_allclose(results["distance"], dists.ravel(), rtol=1e-5, atol=1e-5)
    # with a filter, against brute force over the filtered rows
    keep = np.flatnonzero((items["split"] == "train").to_numpy())
    results = store.search(queries, model=model_id, k=3, split="train")
    rows, dists = _brute_force(queries, vectors[keep], 3)
    assert results["path"].tolist() == items["path"].to_numpy()[keep[rows.ravel()]].tolist()
    np.testing.assert_allclose(results["distance"], dists.ravel(), rtol=1e-5, atol=1e-5)
    # k larger than the gallery: everything, ranked
    assert len(store.search(queries[:1], model=model_id, k=1000, label=0, category="even")) == 30
    with pytest.raises(StoreError, match="no stored items matching"):
        store.search(queries, model=model_id, label="nope")


def test_search_sees_writes_and_stored_queries_exclude_themselves(store):
    model_id = store.register_model("m", "fp-1", DIM)
    vectors, items = _items(40)
    store.add(model_id, vectors[:30], items.iloc[:30])
    first = store.search(vectors[35], model=model_id, k=1)
    store.add(model_id, vectors[30:], items.iloc[30:])
    assert store.search(vectors[35], model=model_id, k=1)["path"].tolist() == [items["path"][35]]
    assert first["path"][0] != items["path"][35]
    results = store.search_stored([items["path"][3], items["path"][8]], model=model_id, k=4)
    assert results["query_path"].tolist() == [items["path"][3]] * 4 + [items["path"][8]] * 4
    rows, dists = _brute_force(vectors[[3, 8]], vectors, 5)
    assert results["path"].tolist() == items["path"].to_numpy()[rows[:, 1:].ravel()].tolist()
    np.testing.assert_allclose(results["distance"], dists[:, 1:].ravel(), rtol=1e-5, atol=1e-5)
    with pytest.raises(StoreError, match="no stored item '/nope.png'"):
        store.search_stored("/nope.png", model=model_id)


# --- images and cache
@pytest.fixture(scope="module")
def extractor():
    import torch

    from labkit.models import create_extractor

    torch.manual_seed(0)
    return create_extractor("resnet18", pretrained=False, embedding_size=16, image_size=32)


@pytest.fixture
def seen(extractor):
    """Sizes of the batches the extractor is run on during a test."""
    sizes: list[int] = []
    handle = extractor.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    yield sizes
    handle.remove()


def test_embed_dataset_cached_skips_stored_images(tmp_path, figures_df, extractor, seen):
    from labkit import data, models

    frame = figures_df[figures_df["split"] == "validation"].iloc[:10].copy()
    images = tmp_path / "images"
    images.mkdir()
    frame["path"] = [str(images / f"{i}.png") for i in range(len(frame))]
    for source, target in zip(figures_df["path"][frame.index], frame["path"], strict=True):
        shutil.copyfile(source, target)
    with EmbeddingStore(tmp_path / "store.sqlite") as s:
        assert s.model_for_fingerprint(models.fingerprint(extractor)) is None
        first = counts = store_module.embed_dataset_cached(s, extractor, frame, batch_size=4)
        assert (counts["embedded"], counts["skipped"], sum(seen)) == (10, 0, 10)
        expected = models.embed(
            extractor, data.LabeledImages(frame, extractor.transforms(train=False)), progress=False
        )
        stored, meta = s.load(counts["model_id"])
        np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-5, atol=1e-6)
        assert meta["path"].tolist() == frame["path"].tolist()
        seen.clear()
        counts = store_module.embed_dataset_cached(s, extractor, frame.assign(label="relabelled"))
        assert (counts["embedded"], counts["skipped"], sum(seen)) == (0, 10, 0)
        assert s.load(counts["model_id"])[1]["label"].unique().tolist() == ["relabelled"]
        changed = frame["path"].iloc[4]
        os.utime(changed, ns=(1, 1))  # the file changed (mtime), so it is embedded again
        counts = store_module.embed_dataset_cached(s, extractor, frame)
        assert (counts["embedded"], counts["skipped"], sum(seen)) == (1, 9, 1)
        np.testing.assert_allclose(s.load(counts["model_id"])[0], stored, rtol=1e-5, atol=1e-6)
        assert first["model_id"] == counts["model_id"]


def test_search_images_uses_the_stores_model(tmp_path, figures_df, extractor):
    from PIL import Image

    from labkit.models import create_extractor

    frame = figures_df[figures_df["split"] == "validation"].iloc[:12]
    with EmbeddingStore(tmp_path / "store.sqlite") as s:
        model_id = store_module.embed_dataset_cached(s, extractor, frame)["model_id"]
        query = frame["path"].iloc[5]
        results = s.search_images([query, Image.open(query)], extractor, k=3)
        assert results["query_path"].iloc[:3].tolist() == [query] * 3
        assert results["query_path"].iloc[3:].isna().all()  # a PIL image has no path
        assert results.loc[results["rank"] == 1, "path"].tolist() == [query, query]
        assert results["distance"].iloc[0] < 1e-3
        query_label = frame["label"].iloc[5]
        figure = run_store.draw_search_results(results.iloc[:3], query_labels=[query_label])
        marks = ["\u2713" if label == query_label else "\u2717" for label in results["label"].iloc[:3]]
        titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
        assert titles == ["query 0"] + [f"#{rank} {mark}" for rank, mark in enumerate(marks, 1)]
        assert marks[0] == "\u2713"  # the image itself
        stored, _ = s.load(model_id, paths=[query])
        by_vector = s.search(stored, model=model_id, k=3)
        assert by_vector["path"].tolist() == results["path"].iloc[:3].tolist()
        other = create_extractor("resnet18", pretrained=False, embedding_size=16, image_size=32)
        with pytest.raises(StoreError, match="made none of the embeddings"):
            s.search_images(query, other)
        with pytest.raises(StoreError, match="cannot be compared"):
            s.search_images(query, other, model=model_id)


def _save_validation_embeddings(run_dir, df, extractor):
    import torch

    from labkit import data, models

    validation = data.validation_dataset(df, extractor.transforms(train=False))
    vectors = models.embed(extractor, validation, progress=False)
    payload = {"embeddings": vectors, "paths": validation.paths, "labels": validation.df["label"].tolist()}
    torch.save(
        {**payload, "extractor": None, "backbone": extractor.backbone_name},
        run_dir / "validation_embeddings.pt",
    )
    return vectors.numpy(), validation.df


def test_run_store_uses_saved_embeddings_and_refuses_another_model(tmp_path, figures_df, extractor, seen):
    from labkit.models import create_extractor

    df = figures_df[figures_df["label"].isin(figures_df["label"].unique()[:4])]
    vectors, validation = _save_validation_embeddings(tmp_path, df, extractor)
    seen.clear()
    db, model_id = store_module.open_store_for(tmp_path / "store.sqlite", extractor)
    with db:
        filled = run_store.fill_from_run(db, extractor, tmp_path, df, check_rows=2)
        assert filled == {
            "model_id": model_id,
            "source": "validation_embeddings.pt",
            "note": "",
            "inserted": len(validation),
            "updated": 0,
        }
        assert sum(seen) == 2  # only the rows that check the file were embedded
        stored, meta = db.load(model_id)
        assert stored.tobytes() == vectors.tobytes()
        assert meta["path"].tolist() == validation["path"].tolist()
        assert meta["is_query"].tolist() == validation["is_query"].tolist()
    other = create_extractor("resnet18", pretrained=False, embedding_size=16, image_size=32)
    with pytest.raises(StoreError, match="holds the embeddings of another model.*overwrite=True"):
        store_module.open_store_for(tmp_path / "store.sqlite", other)
    db, other_id = store_module.open_store_for(tmp_path / "store.sqlite", other, overwrite=True)
    with db:
        assert other_id != model_id and [m.id for m in db.models()] == [other_id]
        filled = run_store.fill_from_run(db, other, tmp_path, df, check_rows=2)
        assert (filled["source"], filled["embedded"], filled["skipped"]) == (
            "embedded now",
            len(validation),
            0,
        )
        assert "another model made them" in filled["note"]
        assert db.load(other_id)[0].tobytes() != vectors.tobytes()


def test_search_results_as_retrieval_results_and_figure(store):
    model_id = store.register_model("m", "fp-1", DIM)
    vectors, items = _items(20)
    store.add(model_id, vectors, items)
    results = store.search_stored([items["path"][0], items["path"][6]], model=model_id, k=3)
    retrieval, shown = run_store.as_retrieval_results(results)
    assert retrieval.query_ids.tolist() == [0, 1]
    assert shown["path"].tolist()[:2] == [items["path"][0], items["path"][6]]
    assert shown["path"].tolist()[2:] == results["path"].tolist()
    assert retrieval.retrieved.tolist() == [[2, 3, 4], [5, 6, 7]]
    expected = (results["label"] == results["query_label"]).to_numpy().reshape(2, 3)
    assert retrieval.relevant.numpy().tolist() == expected.tolist()
    np.testing.assert_array_equal(retrieval.distances.numpy().ravel(), results["distance"].to_numpy())
    # a query of unknown label is relevant to nothing; vectors have no image unless paths are given
    by_vector = store.search(vectors[:1] + 0.01, model=model_id, k=2)
    with pytest.raises(StoreError, match="no query_path column"):
        run_store.as_retrieval_results(by_vector)
    retrieval, shown = run_store.as_retrieval_results(by_vector, query_paths=["/q.png"])
    assert not retrieval.relevant.any() and shown["label"][0] == "new image"
    assert retrieval.labels[0] not in retrieval.labels[1:]


# --- concurrency, read-only places, damaged files (issue 14)
def _create_and_fill(path, barrier, seed, queue) -> None:
    try:
        barrier.wait(timeout=30)
        with EmbeddingStore(path) as s:
            model_id = s.register_model("m", "fp-1", DIM)
            vectors, items = _items(5, prefix=f"p{seed}", seed=seed)
            s.add(model_id, vectors, items)
        queue.put((seed, "ok"))
    except BaseException as error:  # reported to the parent, which fails the test
        queue.put((seed, f"{type(error).__name__}: {error}"))


def test_two_processes_creating_the_same_store_both_succeed_and_nothing_is_lost(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for trial in range(24):
        path = tmp_path / f"race_{trial}.sqlite"
        barrier, queue = context.Barrier(2), context.Queue()
        workers = [context.Process(target=_create_and_fill, args=(path, barrier, s, queue)) for s in (1, 2)]
        for worker in workers:
            worker.start()
        outcomes = dict(queue.get(timeout=60) for _ in workers)
        for worker in workers:
            worker.join(timeout=60)
        assert outcomes == {1: "ok", 2: "ok"}, f"trial {trial}: {outcomes}"
        with EmbeddingStore(path, create=False, read_only=True) as s:
            (model,) = s.models()
            _, meta = s.load(model.id)
            assert sorted(meta["path"].str[6:8]) == ["p1"] * 5 + ["p2"] * 5, f"trial {trial}"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".creating")]  # no private file left


def _run_unprivileged(function, *args):
    """`function(*args)` as an unprivileged user (root ignores file modes): in a forked child that drops to
    uid/gid 65534 when this runs as root, in this process otherwise. Returns its result or re-raises."""
    if os.geteuid() != 0:
        return function(*args)
    import multiprocessing

    def child(queue):
        os.setgid(65534)
        os.setuid(65534)
        try:
            queue.put(("ok", function(*args)))
        except BaseException as error:
            queue.put(("error", (type(error).__name__, str(error))))

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    kind, value = queue.get(timeout=60)
    process.join(timeout=60)
    if kind == "error":
        raise {"StoreError": StoreError, "NotAStoreError": NotAStoreError}.get(value[0], RuntimeError)(
            f"{value[0]}: {value[1]}"
        )
    return value


@pytest.fixture
def read_only_folder():
    """A folder an unprivileged user can read but not write (outside pytest's root-only tmp folders)."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="labkit-ro-")
    os.chmod(folder, 0o755)
    yield __import__("pathlib").Path(folder)
    os.chmod(folder, 0o755)
    shutil.rmtree(folder)


def _search_paths(path, query):
    with EmbeddingStore(path, create=False, read_only=True) as s:
        return s.immutable, s.search(query, model=1, k=3)["path"].tolist()


def _open_writable(path):
    EmbeddingStore(path).close()


def test_store_in_a_read_only_folder_opens_read_only_and_refuses_plainly_otherwise(read_only_folder):
    path = read_only_folder / "store.sqlite"
    vectors, items = _items(30)
    with EmbeddingStore(path) as s:
        s.add(s.register_model("m", "fp-1", DIM), vectors, items)
        expected = s.search(vectors[4], model=1, k=3)["path"].tolist()
    os.chmod(path, 0o444)
    os.chmod(read_only_folder, 0o555)
    before = sorted(p.name for p in read_only_folder.iterdir())
    assert _run_unprivileged(_search_paths, path, vectors[4]) == (True, expected)
    assert sorted(p.name for p in read_only_folder.iterdir()) == before  # no -shm, -wal made
    with pytest.raises(StoreError, match=r"store.sqlite cannot be opened for writing.*read_only=True"):
        _run_unprivileged(_open_writable, path)
    with pytest.raises(
        StoreError, match=r"cannot create a store at .*new.sqlite: the folder .* is not writable"
    ):
        _run_unprivileged(_open_writable, read_only_folder / "new.sqlite")
    assert sorted(p.name for p in read_only_folder.iterdir()) == before


def test_read_only_folder_with_uncheckpointed_wal_is_refused_not_read_stale(tmp_path, read_only_folder):
    path = tmp_path / "store.sqlite"
    vectors, items = _items(10)
    with EmbeddingStore(path) as s:
        s.add(s.register_model("m", "fp-1", DIM), vectors, items)
        s.add(1, vectors[:2] + 1, items.iloc[:2])  # still in the -wal file while this connection is open
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{path}{suffix}", read_only_folder / f"store.sqlite{suffix}")
    assert (read_only_folder / "store.sqlite-wal").stat().st_size > 0
    os.chmod(read_only_folder, 0o555)
    with pytest.raises(StoreError, match=r"store.sqlite-wal holds changes not yet written"):
        _run_unprivileged(_search_paths, read_only_folder / "store.sqlite", vectors[0])


def test_damaged_meta_or_missing_table_is_named(tmp_path):
    path = tmp_path / "store.sqlite"
    EmbeddingStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = 'one' WHERE key = 'schema_version'")
    with pytest.raises(NotAStoreError, match=r"store.sqlite has an invalid schema_version 'one'"):
        EmbeddingStore(path)
    path = tmp_path / "store2.sqlite"
    EmbeddingStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE items")
    with pytest.raises(StoreError, match=r"store2.sqlite is a labkit store without its table\(s\) items"):
        EmbeddingStore(path)


def test_second_writer_behind_a_long_transaction_gets_a_named_lock_error(tmp_path):
    path = tmp_path / "store.sqlite"
    with EmbeddingStore(path) as s:
        model_id = s.register_model("m", "fp-1", DIM)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer, holding the lock
    try:
        with EmbeddingStore(path, timeout=0.2) as s:
            vectors, items = _items(3)
            with pytest.raises(store_module.StoreLockedError, match=r"store.sqlite is locked: another conn"):
                s.add(model_id, vectors, items)
            assert len(s.load(model_id)[0]) == 0  # readers are not blocked
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# --- sidecar, faiss index (issue 15)
def _reference_search(store, model_id, queries, k, **filters):
    """The search before the sidecar: retrieval.knn over `load`, rows in load order."""
    from labkit.retrieval import knn

    gallery, meta = store.load(model_id, **filters)
    distances, rows = knn(queries, gallery, min(k, len(gallery)))
    return meta["path"].to_numpy()[rows.numpy()].ravel().tolist(), distances.numpy().ravel()


def _clustered(n, dim, seed=0, n_classes=20):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32) * 3
    labels = rng.integers(0, n_classes, n)
    return (centres[labels] + rng.standard_normal((n, dim)).astype(np.float32)).astype(np.float32), labels


@pytest.mark.parametrize("where", ["resident", "windows", "database"])
def test_exact_search_is_identical_to_the_search_before_the_sidecar(tmp_path, monkeypatch, where):
    from labkit import store_files

    path = tmp_path / "store.sqlite"
    vectors, items = _items(500)
    vectors[[10, 20, 30, 40]] = vectors[5]  # exact ties: broken by insertion order
    with EmbeddingStore(path) as s:
        model_id = s.register_model("m", "fp-1", DIM)
        s.add(model_id, vectors[:300], items.iloc[:300])
        s.add(model_id, vectors[300:], items.iloc[300:])
        s.delete_items(model_id, paths=items["path"].iloc[100:120].tolist())
        s.add(model_id, vectors[:50] * 0.5, items.iloc[:50])  # updates in place
        queries = np.concatenate([vectors[[5, 7]], np.random.default_rng(3).standard_normal((6, DIM))])
        queries = queries.astype(np.float32)
        expected = [(f, _reference_search(s, model_id, queries, 7, **f)) for f in ({}, {"split": "train"})]
    if where == "windows":
        monkeypatch.setattr(store_files, "WINDOW_BYTES", 37 * DIM * 4)  # 37 rows a window
    options = {"resident_bytes": 0} if where != "resident" else {}
    if where == "database":  # a read-only store without a fresh sidecar reads the database itself
        store_files.sidecar_path(path, model_id).unlink(missing_ok=True)
        options["read_only"] = True
    with EmbeddingStore(path, **options) as s:
        for f, (paths, distances) in expected:
            results = s.search(queries, model=model_id, k=7, **f)
            assert results["path"].tolist() == paths
            # float64 sums here, float32 in torch before: the same values up to one float32 rounding
            np.testing.assert_allclose(results["distance"].to_numpy(), distances, rtol=3e-7, atol=0)
        assert results["rank"].tolist() == list(range(1, 8)) * len(queries)
        tied = s.search(vectors[5], model=model_id, k=5)["path"].tolist()
        assert tied == items["path"].iloc[[5, 10, 20, 30, 40]].tolist()
        assert s.sidecar_state(model_id) == ("missing" if where == "database" else "fresh")


def test_stale_or_damaged_sidecar_is_detected_and_never_used(tmp_path):
    from labkit.store_files import sidecar_path

    path = tmp_path / "store.sqlite"
    vectors, items = _items(60)
    with EmbeddingStore(path) as s:
        model_id = s.register_model("m", "fp-1", DIM)
        s.add(model_id, vectors, items)
        sidecar = sidecar_path(path, model_id)
        assert s.sidecar_state(model_id) == "missing"
        s.search(vectors[0], model=model_id)
        assert s.sidecar_state(model_id) == "fresh"
        old_sidecar = sidecar.read_bytes()
        # another connection moves item 0 far away: same count, same ids, other vectors
        with EmbeddingStore(path) as other:
            other.add(model_id, vectors[:1] + 50, items.iloc[:1])
        assert s.sidecar_state(model_id) == "stale"
        hits = s.search(vectors[0], model=model_id, k=1)  # this store had the old sidecar mapped
        assert hits["path"][0] != items["path"][0]
        assert s.sidecar_state(model_id) == "fresh"  # rebuilt
        sidecar.write_bytes(old_sidecar)  # an old copy put back: refused, rebuilt
        assert s.sidecar_state(model_id) == "stale"
        assert s.search(vectors[0] + 50, model=model_id, k=1)["path"][0] == items["path"][0]
        assert s.sidecar_state(model_id) == "fresh"
        sidecar.write_bytes(sidecar.read_bytes()[:5000])  # truncated
    with EmbeddingStore(path, read_only=True) as s:
        assert s.sidecar_state(model_id) == "missing"  # unreadable counts as missing
        assert s.search(vectors[0] + 50, model=model_id, k=1)["path"][0] == items["path"][0]
        assert sidecar.stat().st_size == 5000  # a read-only store does not write
    sidecar.write_bytes(old_sidecar)
    with EmbeddingStore(path, read_only=True) as s:
        assert s.sidecar_state(model_id) == "stale"
        assert s.search(vectors[0] + 50, model=model_id, k=1)["path"][0] == items["path"][0]
    with EmbeddingStore(path) as s:
        s.delete_model(model_id)
    assert not sidecar.exists()


def _killed_child(path, stage, ready):
    """Adds 3000 rows to the store at `path` and stops (for SIGKILL) after 1500 rows handed to SQLite
    ("insert") or half-way through writing the sidecar after a committed insert ("sidecar")."""
    import time

    s = EmbeddingStore(path)
    vectors, items = _items(3000, prefix="new", seed=9)
    if stage == "insert":
        original = EmbeddingStore._rows

        def rows(model_id, frame, matrix):
            for i, row in enumerate(original(model_id, frame, matrix)):
                if i == 1500:
                    ready.set()
                    time.sleep(60)
                yield row

        s._rows = rows
        s.add(1, vectors, items)
    else:
        s.add(1, vectors, items)
        original = store_module.write_vector_file

        def write(path, header, n, dim, chunks):
            def slow():
                for i, chunk in enumerate(chunks):
                    if i == 1:
                        ready.set()
                        time.sleep(60)
                    yield chunk

            original(path, header, n, dim, slow())

        store_module.write_vector_file = write
        s.search(vectors[0], model=1)


@pytest.mark.parametrize("stage", ["insert", "sidecar"])
def test_kill_9_during_an_insert_or_a_sidecar_write_leaves_both_consistent(tmp_path, stage):
    import multiprocessing
    import signal

    path = tmp_path / "store.sqlite"
    vectors, items = _items(10000)  # > 8192 rows: the sidecar is written in two chunks
    with EmbeddingStore(path) as s:
        s.add(s.register_model("m", "fp-1", DIM), vectors, items)
        s.search(vectors[0], model=1)
    before = _snapshot(path)
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_killed_child, args=(path, stage, ready))
    child.start()
    assert ready.wait(60)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    with EmbeddingStore(path, read_only=True) as s:
        if stage == "insert":
            assert _snapshot(path) == before  # the transaction never happened
            assert s.sidecar_state(1) == "fresh"  # and the sidecar still matches it
        else:
            assert len(s) == 13000  # the insert committed; the sidecar was not replaced half-written
            assert s.sidecar_state(1) == "stale"
            assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the dead writer's file
        gallery, meta = s.load(1)
        queries = gallery[[3, 10500 % len(gallery)]] + 0.01
        expected = _reference_search(s, 1, queries, 5)[0]
        assert s.search(queries, model=1, k=5)["path"].tolist() == expected
    with EmbeddingStore(path) as s:
        assert s.search(queries, model=1, k=5)["path"].tolist() == expected
        assert s.sidecar_state(1) == "fresh"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # removed by the rebuild
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_faiss_index_same_schema_as_exact_refused_when_stale_or_missing(tmp_path):
    pytest.importorskip("faiss")
    path = tmp_path / "store.sqlite"
    vectors, labels = _clustered(3000, 16)
    items = pd.DataFrame(
        {"path": [f"/d/{i}.png" for i in range(3000)], "label": labels, "split": ["validation"] * 3000}
    )
    items.loc[::4, "split"] = "train"
    with EmbeddingStore(path) as s:
        model_id = s.register_model("m", "fp-1", 16)
        s.add(model_id, vectors, items)
        queries = _clustered(40, 16, seed=1)[0]
        with pytest.raises(StoreError, match=r"faiss index of model 1 .* is missing.*build_index"):
            s.search(queries, model=model_id, exact=False)
        built = s.build_index(model_id, nlist=16)
        assert built["n"] == 3000 and built["path"].is_file() and s.index_state(model_id) == "fresh"
        exact = s.search(queries, model=model_id, k=10)
        approx = s.search(queries, model=model_id, k=10, exact=False, nprobe=4)
        assert list(approx.columns) == list(exact.columns)
        assert approx.dtypes.tolist() == exact.dtypes.tolist()
        assert approx["rank"].tolist() == exact["rank"].tolist() == list(range(1, 11)) * 40
        recall = np.mean(
            [
                len(set(a) & set(e)) / 10
                for a, e in zip(
                    approx.groupby("query")["path"].apply(list),
                    exact.groupby("query")["path"].apply(list),
                    strict=True,
                )
            ]
        )
        assert recall >= 0.9
        everything = s.search(queries, model=model_id, k=10, exact=False, nprobe=16)  # all lists: exact
        assert everything["path"].tolist() == exact["path"].tolist()
        np.testing.assert_allclose(everything["distance"], exact["distance"], rtol=1e-5)
        train = s.search(queries, model=model_id, k=5, exact=False, nprobe=16, split="train")
        assert (
            train["path"].tolist() == s.search(queries, model=model_id, k=5, split="train")["path"].tolist()
        )
        stored = s.search_stored(["/d/7.png"], model=model_id, k=3, exact=False, nprobe=16)
        assert "/d/7.png" not in stored["path"].tolist() and len(stored) == 3
        s.add(model_id, vectors[:1] + 1, items.iloc[:1])
        assert s.index_state(model_id) == "stale"
        with pytest.raises(StoreError, match=r"is stale \(the store changed after it was built\)"):
            s.search(queries, model=model_id, exact=False)
        s.build_index(model_id, nlist=16)
        assert s.index_state(model_id) == "fresh"
        assert len(list(tmp_path.glob("*.faiss"))) == 1  # the stale file was removed


def test_schema_1_store_is_read_as_before_and_upgraded_when_opened_writable(tmp_path):
    path = tmp_path / "store.sqlite"
    vectors, items = _items(40)
    with EmbeddingStore(path) as s:
        s.add(s.register_model("m", "fp-1", DIM), vectors, items)
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE models DROP COLUMN generation")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        conn.execute("DELETE FROM meta WHERE key = 'store_id'")
    with EmbeddingStore(path, read_only=True) as s:
        expected = _reference_search(s, 1, vectors[:3], 4)[0]
        assert s.search(vectors[:3], model=1, k=4)["path"].tolist() == expected
    with EmbeddingStore(path) as s:
        assert s.meta["schema_version"] == "2" and len(s.meta["store_id"]) == 32
        assert s.search(vectors[:3], model=1, k=4)["path"].tolist() == expected
        assert s.sidecar_state(1) == "fresh"
