"""Embeddings and their metadata in one SQLite file, searched exactly (or through a faiss index), one model
at a time.

An `EmbeddingStore` is a SQLite database (standard library `sqlite3`, WAL mode) with three tables:

- `meta`: key/value rows, among them `magic`, `schema_version` and a random `store_id`; the file header
  also carries `PRAGMA application_id = APPLICATION_ID`, so a foreign file is recognised before anything
  is written.
- `models`: which model made the embeddings (backbone, fingerprint, dimension, created, extra JSON) and its
  `generation`, a random token replaced in the same transaction as every change to the model's items.
- `items`: one embedding per (model, path) with its label, split, category and extra JSON (every other column
  of the items DataFrame), the vector stored as a little-endian float32 blob.

Writes are one transaction each (all rows or none); a second writer waits `timeout` seconds for the lock and
then gets `StoreLockedError`. Embeddings of two models never meet: every read, search and deletion names its
model (an id, a fingerprint or an unambiguous fingerprint prefix / backbone name).

A new store is built in a private temporary file and hard-linked into place only if the name is still free, so
two processes creating the same store both end up using one complete store, and a failed creation removes
only its own temporary file. `read_only=True` opens a store in a read-only folder or file through SQLite's
`immutable` flag (refused if a -wal file there holds changes not yet in the main file).

Search (`labkit.store_files`): exact top-k over a memory-mapped vector sidecar beside the database, used only
while its generation is the model's (otherwise rebuilt from one read snapshot, or, in a read-only store, the
database is scanned chunk by chunk); a search is one read transaction, so the scan and the hits' metadata come
from the same state. `build_index` + `search(..., exact=False)`: a faiss IVF-Flat index, refused when stale.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import operator
import os
import secrets
import shutil
import sqlite3
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from labkit.store_files import (
    VectorFile,
    faiss_index_path,
    open_vector_file,
    private_name,
    publish,
    remove_abandoned,
    scan_top_k,
    sidecar_path,
    stale_faiss_indexes,
    write_vector_file,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "EmbeddingStore",
    "ModelInfo",
    "NotAStoreError",
    "StoreError",
    "StoreLockedError",
    "embed_dataset_cached",
    "embed_images",
    "open_store_for",
]

APPLICATION_ID = 0x4C4B4553  # "LKES": labkit embedding store, in the SQLite header (offset 68)
SCHEMA_VERSION = 2  # 2: models.generation (the token vector sidecars and faiss indexes are checked against)
MAGIC = "labkit-embedding-store"
CORE_COLUMNS = ("path", "label", "split", "category")
EXTRA_COLUMN = "extra"
FILE_MTIME = "file_mtime_ns"
FILE_SIZE = "file_size"
BOX_COLUMNS = ("x_1", "y_1", "x_2", "y_2")

_SQLITE_HEADER = b"SQLite format 3\x00"
_NOT_CHANGED = "Pass the path of a labkit embedding store or a new file name; this file was not changed."
_PAGE_SIZE = 16384
_WAL_LIMIT = 64 * 2**20
#: Vector sidecars up to this size stay memory-mapped between searches; larger ones are read window by window.
DEFAULT_RESIDENT_BYTES = 512 * 2**20
_DB_CHUNK_ROWS = 8192  # the WAL file is truncated to this after a checkpoint
_FILTERS = {"split": "split", "label": "label", "category": "category", "paths": "path"}
_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE models (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    backbone TEXT NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE,
    dim INTEGER NOT NULL CHECK (dim > 0),
    created TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{{}}',
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    label,
    split TEXT,
    category TEXT,
    extra TEXT NOT NULL DEFAULT '{{}}',
    embedding BLOB NOT NULL,
    UNIQUE (model_id, path)
);
CREATE INDEX items_model_split ON items (model_id, split);
CREATE INDEX items_model_label ON items (model_id, label);
PRAGMA application_id = {APPLICATION_ID};
"""
_UPSERT = """
INSERT INTO items (model_id, path, label, split, category, extra, embedding) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (model_id, path) DO UPDATE SET
    label = excluded.label, split = excluded.split, category = excluded.category,
    extra = excluded.extra, embedding = excluded.embedding
"""


class StoreError(ValueError):
    """Bad input to, or an inconsistent state of, an embedding store."""


class NotAStoreError(StoreError):
    """The file exists but is not a labkit embedding store (it is left untouched)."""


class StoreLockedError(StoreError):
    """Another connection (usually another process) held the store's write lock past the timeout."""


@dataclass(frozen=True)
class ModelInfo:
    """One row of the `models` table."""

    id: int
    backbone: str
    fingerprint: str
    dim: int
    created: str
    extra: dict

    def describe(self) -> str:
        return f"model {self.id} ({self.backbone}, dim {self.dim}, fingerprint {self.fingerprint[:12]})"


# --- helpers
def _file_uri(path: Path, mode: str) -> str:
    return f"file:{urllib.request.pathname2url(str(path.resolve()))}?mode={mode}"


def _check_store_header(path: Path) -> None:
    """Raise NotAStoreError unless `path` starts like a labkit store (reads header bytes only)."""
    if path.is_dir():
        raise NotAStoreError(f"{path} is a directory, not a labkit embedding store. {_NOT_CHANGED}")
    with open(path, "rb") as handle:
        header = handle.read(100)
    if not header:
        raise NotAStoreError(f"{path} is an empty file, not a labkit embedding store. {_NOT_CHANGED}")
    if not header.startswith(_SQLITE_HEADER) or len(header) < 100:
        raise NotAStoreError(
            f"{path} is not a SQLite database, so not a labkit embedding store. {_NOT_CHANGED}"
        )
    app_id = int.from_bytes(header[68:72], "big", signed=True)
    if app_id != APPLICATION_ID:
        raise NotAStoreError(
            f"{path} is a SQLite database of another application (application_id {app_id}, "
            f"labkit stores have {APPLICATION_ID}). {_NOT_CHANGED}"
        )


def _check_store_content(path: Path, conn: sqlite3.Connection) -> int:
    """Raise unless the open database `conn` holds a labkit store this labkit reads; its schema version."""
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as error:
        raise NotAStoreError(
            f"{path} has labkit's application_id but no readable meta table ({error}). {_NOT_CHANGED}"
        ) from None
    if meta.get("magic") != MAGIC:
        raise NotAStoreError(f"{path} has no labkit store marker in its meta table. {_NOT_CHANGED}")
    raw_version = meta.get("schema_version")
    try:
        version = int(raw_version)
    except (TypeError, ValueError):
        version = 0
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has store schema version {version}; this labkit reads versions up to {SCHEMA_VERSION}: "
            "upgrade labkit."
        )
    if version < 1:
        raise NotAStoreError(
            f"{path} has an invalid schema_version {raw_version!r} in its meta table (a whole number is "
            f"expected); the store is damaged. {_NOT_CHANGED}"
        )
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = [t for t in ("meta", "models", "items") if t not in tables]
    if missing:
        raise StoreError(
            f"{path} is a labkit store without its table(s) {', '.join(missing)}: the file is damaged. "
            "Restore it from a copy or build a new store under another name; this file was not changed."
        )
    return version


def _bump(db: sqlite3.Connection, model_id: int) -> None:
    """A new random generation token for the model, inside the caller's write transaction."""
    db.execute("UPDATE models SET generation = random() WHERE id = ?", (model_id,))


def _is_locked(error: sqlite3.OperationalError) -> bool:
    return "locked" in str(error) or "busy" in str(error)


def _python_value(value: Any) -> Any:
    """A numpy/pandas scalar as a plain Python value; missing values (None, NaN, NA) as None."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"a {type(value).__name__} cannot be stored as JSON")


def _dumps(extra: dict, path: str) -> str:
    try:
        return json.dumps(extra, default=_json_default)
    except (TypeError, ValueError):
        for key, value in extra.items():
            try:
                json.dumps(value, default=_json_default)
            except (TypeError, ValueError) as error:
                raise StoreError(
                    f"item {path!r}: column {key!r} holds {value!r}, which cannot be stored ({error}); "
                    "convert it to a str, number, bool or list, or drop the column."
                ) from None
        raise


def _value_list(values: Any) -> list:
    if isinstance(values, (str, bytes, Path)) or np.isscalar(values):
        values = [values]
    return [str(v) if isinstance(v, Path) else _python_value(v) for v in values]


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _matrix(embeddings: Any, model: ModelInfo, paths: Sequence[str], what: str = "embeddings") -> np.ndarray:
    """(N, D) little-endian float32, checked: N rows, D == model.dim, all finite."""
    n = len(paths)
    if isinstance(embeddings, (list, tuple)):
        rows = [_to_numpy(row).astype(np.float32, copy=False) for row in embeddings]
        for i, row in enumerate(rows):
            if row.ndim != 1 or row.shape[0] != model.dim:
                name = f" (path {paths[i]!r})" if i < n else ""
                raise StoreError(
                    f"{model.describe()}: {what} row {i}{name} has shape {tuple(row.shape)}, "
                    f"expected ({model.dim},). Nothing was written."
                )
        matrix = np.stack(rows) if rows else np.empty((0, model.dim), np.float32)
    else:
        matrix = _to_numpy(embeddings)
    if matrix.ndim != 2:
        raise StoreError(f"{model.describe()}: {what} must be a 2-D (N, D) array, got shape {matrix.shape}.")
    if not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise StoreError(f"{model.describe()}: {what} have dtype {matrix.dtype}; expected float32 numbers.")
    if matrix.shape[0] != n:
        raise StoreError(f"{model.describe()}: {what} have {matrix.shape[0]} rows but {n} items were given.")
    if matrix.shape[1] != model.dim:
        first = f" (first item: {paths[0]!r})" if n else ""
        raise StoreError(
            f"{model.describe()} has dimension {model.dim} but the {what} have {matrix.shape[1]} "
            f"columns{first}. Use the model that made these vectors, or register a new one. "
            "Nothing was written."
        )
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused below
        matrix = np.ascontiguousarray(matrix, dtype="<f4")
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if bad.size:
        i = int(bad[0])
        name = f" (path {paths[i]!r})" if i < n else ""
        raise StoreError(
            f"{model.describe()}: {what} row {i}{name} has a non-finite value "
            f"({matrix[i][~np.isfinite(matrix[i])][0]}); {bad.size} row(s) are non-finite in float32. "
            "Nothing was written."
        )
    return matrix


def _items_frame(items: pd.DataFrame | Sequence[str] | Sequence[Path]) -> pd.DataFrame:
    if isinstance(items, pd.DataFrame):
        frame = items.reset_index(drop=True)
    else:
        frame = pd.DataFrame({"path": [str(p) for p in items]})
    if "path" not in frame.columns:
        raise StoreError(f"the items DataFrame needs a 'path' column; it has {list(frame.columns)}.")
    bad_names = [c for c in frame.columns if not isinstance(c, str)]
    if bad_names:
        raise StoreError(f"item column names must be strings; got {bad_names}.")
    paths = frame["path"].tolist()
    for i, p in enumerate(paths):
        if isinstance(p, Path):
            paths[i] = str(p)
        elif not isinstance(p, str) or not p:
            raise StoreError(f"items row {i}: 'path' must be a non-empty string, got {p!r}.")
    duplicated = pd.Index(paths)[pd.Index(paths).duplicated()]
    if len(duplicated):
        raise StoreError(
            f"items contain the path {duplicated[0]!r} more than once; each path is stored once."
        )
    frame["path"] = paths
    return frame


# --- store
class EmbeddingStore:
    """Embeddings and metadata of one or more models in a SQLite file.

    `EmbeddingStore(path)` opens an existing store or creates a new one (`create=False`: only open).
    A file that is not a labkit store is refused with `NotAStoreError` before anything is written to it.
    Use as a context manager or call `close()`. Searches keep the last searched vectors in memory (one
    model and filter at a time) until the next write, by this connection or another, or `close()`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        create: bool = True,
        read_only: bool = False,
        timeout: float = 5.0,
        resident_bytes: int = DEFAULT_RESIDENT_BYTES,
    ) -> None:
        if sqlite3.sqlite_version_info < (3, 24):
            raise RuntimeError(
                f"labkit's store needs SQLite >= 3.24 (upsert); Python has {sqlite3.sqlite_version}."
            )
        self.path = Path(path).expanduser()
        self.read_only = read_only
        self.timeout = float(timeout)
        self.immutable = False  # True: opened with SQLite's immutable flag (read-only file or folder)
        self._conn: sqlite3.Connection | None = None
        self.resident_bytes = int(resident_bytes)
        self._vector_files: dict[int, VectorFile] = {}
        self._faiss: dict[int, tuple[Path, Any]] = {}
        if not self.path.exists():
            if not create or read_only:
                raise FileNotFoundError(
                    f"no embedding store at {self.path}; pass create=True to make a new one."
                )
            if not self.path.parent.is_dir():
                raise FileNotFoundError(
                    f"cannot create {self.path}: folder {self.path.parent} does not exist."
                )
            self._create_file()  # leaves the file to whoever linked it first (this process or another)
        _check_store_header(self.path)
        self._conn = self._open_read_only() if read_only else self._open_writable()
        try:
            self._version = _check_store_content(self.path, self._conn)
        except BaseException:
            self.close()
            raise
        if not read_only:
            self._configure_writable()
            if self._version < SCHEMA_VERSION:
                self._upgrade()
        self._store_id = self.meta.get("store_id")

    def _connect(self, mode: str, path: Path | None = None, immutable: bool = False) -> sqlite3.Connection:
        uri = _file_uri(path or self.path, mode) + ("&immutable=1" if immutable else "")
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=self.timeout)
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _create_file(self) -> None:
        """Build a complete new store in a private temporary file of the same folder, then hard-link it to
        `self.path` only if nothing is there yet (atomic). When another process won the race, its store is
        opened instead; only the temporary file, which is this process's own, is ever removed."""
        folder = self.path.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(
                f"cannot create a store at {self.path}: the folder {folder} is not writable. Choose a "
                "writable folder (or copy an existing store there and open it with read_only=True)."
            )
        remove_abandoned(self.path, ".creating")  # left by processes killed while creating this store
        private = folder / f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.creating"
        try:
            try:
                conn = self._connect("rwc", private)
                try:
                    self._create_schema(conn)
                    # WAL already here, where no one else looks: openers never convert a shared file
                    conn.execute("PRAGMA journal_mode = WAL")
                finally:
                    conn.close()
            except sqlite3.OperationalError as error:
                raise StoreError(
                    f"cannot create a store at {self.path}: SQLite could not write in {folder} ({error}). "
                    "Check that the folder is writable and has free space."
                ) from None
            try:
                os.link(private, self.path)
            except FileExistsError:
                pass  # another process created the store first: open it
            except OSError:  # no hard links on this file system: exclusive create, then copy
                try:
                    target = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                except FileExistsError:
                    return
                with os.fdopen(target, "wb") as out, open(private, "rb") as source:
                    shutil.copyfileobj(source, out)
        finally:
            for mine in (private, private.with_name(private.name + "-journal")):
                mine.unlink(missing_ok=True)

    def _open_writable(self) -> sqlite3.Connection:
        advice = (
            "Open it with read_only=True to search it, or copy it (with any -wal file beside it) to a "
            "writable folder."
        )
        if not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK | os.X_OK):
            where = "file" if not os.access(self.path, os.W_OK) else f"folder {self.path.parent}"
            raise StoreError(
                f"the store {self.path} cannot be opened for writing: its {where} is read-only. {advice}"
            )
        try:
            conn = self._connect("rw")
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.OperationalError as error:
            raise StoreError(
                f"the store {self.path} cannot be opened for writing ({error}). {advice}"
            ) from None
        return conn

    def _open_read_only(self) -> sqlite3.Connection:
        """A read-only connection; SQLite's `immutable` flag when WAL's shared-memory file cannot be made
        (read-only folder or file), which is safe only while nothing changes the file, so it is refused when
        a -wal file holds changes not yet in the main file."""
        try:
            conn = self._connect("ro")
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return conn
        except sqlite3.OperationalError as first_error:
            failure = first_error
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise StoreError(
                f"the store {self.path} cannot be read in place ({failure}): its folder or file is read-only "
                f"and {wal.name} holds changes not yet written into the main file. Open it once writable, or "
                "copy the store with its -wal file to a writable folder."
            )
        try:
            conn = self._connect("ro", immutable=True)
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.OperationalError as error:
            raise StoreError(f"the store {self.path} cannot be opened for reading ({error}).") from None
        self.immutable = True
        return conn

    def _configure_writable(self) -> None:
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
        except sqlite3.OperationalError as error:
            self.close()
            if _is_locked(error):
                raise self._locked_error() from None
            raise StoreError(f"the store {self.path} cannot be opened for writing ({error}).") from None

    def _upgrade(self) -> None:
        """Schema 1 -> 2: a generation token per model (and a store id), in one transaction."""
        with self._transaction() as db:
            if self._version == 1:
                db.execute("ALTER TABLE models ADD COLUMN generation INTEGER NOT NULL DEFAULT 0")
                db.execute("UPDATE models SET generation = random()")
                db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)", (secrets.token_hex(16),)
                )
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        self._version = SCHEMA_VERSION

    def _locked_error(self) -> StoreLockedError:
        return StoreLockedError(
            f"the store {self.path} is locked: another connection (usually another process) has held its "
            f"write lock for more than timeout={self.timeout:g} s. Wait for that writer to finish and retry, "
            "or open the store with a longer timeout."
        )

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # Everything, application_id included, in the first (rollback-journal) transaction, before WAL is on:
        # the header of the main file carries the marker from the start.
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        from labkit import __version__

        meta = {
            "magic": MAGIC,
            "schema_version": str(SCHEMA_VERSION),
            "created": now,
            "labkit": __version__,
            "store_id": secrets.token_hex(16),
        }
        statements = [s for s in _SCHEMA.split(";") if s.strip()]
        conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")  # 1.5 kB vectors fill 16 kB pages well
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                conn.execute(statement)
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- lifecycle
    def close(self) -> None:
        """Close the connection (idempotent)."""
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
            self._conn = None
        for vector_file in getattr(self, "_vector_files", {}).values():
            vector_file.close()
        self._vector_files = {}
        self._faiss = {}

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"{len(self)} items"
        return f"EmbeddingStore({str(self.path)!r}, {state})"

    def __len__(self) -> int:  # noqa: D105
        return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the store {self.path} is closed.")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise StoreError(
                f"the store {self.path} was opened read_only=True; open it writable to change it."
            )
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if _is_locked(error):
                raise self._locked_error() from None
            raise
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @property
    def meta(self) -> dict[str, str]:
        """The `meta` table (magic, schema_version, created, labkit version)."""
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    # -- models
    def register_model(self, backbone: str, fingerprint: str, dim: int, **extra: Any) -> int:
        """The id of the model with this fingerprint, registering it when new.

        Raises StoreError when the fingerprint is already registered with another backbone or dimension.
        """
        if not isinstance(backbone, str) or not backbone:
            raise StoreError(f"backbone must be a non-empty string, got {backbone!r}.")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise StoreError(f"fingerprint must be a non-empty string, got {fingerprint!r}.")
        if isinstance(dim, bool) or not isinstance(dim, Integral) or dim <= 0:
            raise StoreError(f"dim must be a positive integer, got {dim!r}.")
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, backbone, dim FROM models WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
            if row is not None:
                if (row[1], row[2]) != (backbone, int(dim)):
                    raise StoreError(
                        f"fingerprint {fingerprint[:12]} is registered as model {row[0]} "
                        f"({row[1]}, dim {row[2]}), "
                        f"not ({backbone}, dim {dim}); a fingerprint names exactly one model."
                    )
                return int(row[0])
            now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            cursor = db.execute(
                "INSERT INTO models (backbone, fingerprint, dim, created, extra) VALUES (?, ?, ?, ?, ?)",
                (backbone, fingerprint, int(dim), now, _dumps(extra, fingerprint)),
            )
            return int(cursor.lastrowid)

    def models(self) -> list[ModelInfo]:
        """All registered models, by id."""
        rows = self._db.execute(
            "SELECT id, backbone, fingerprint, dim, created, extra FROM models ORDER BY id"
        )
        return [ModelInfo(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    def model(self, model: int | str) -> ModelInfo:
        """Resolve a model: its id, its fingerprint, a unique fingerprint prefix or a unique backbone name."""
        known = self.models()
        listing = "; ".join(m.describe() for m in known) or "none registered yet"
        if isinstance(model, ModelInfo):
            model = model.id
        if isinstance(model, Integral) and not isinstance(model, bool):
            found = [m for m in known if m.id == int(model)]
        elif isinstance(model, str) and model:
            found = [m for m in known if m.fingerprint == model]
            found = found or [m for m in known if len(model) >= 6 and m.fingerprint.startswith(model)]
            found = found or [m for m in known if m.backbone == model]
        else:
            raise StoreError(
                f"name the model whose embeddings to use (id, fingerprint or backbone), got {model!r}; "
                f"models in {self.path.name}: {listing}."
            )
        if not found:
            raise StoreError(f"no model {model!r} in {self.path}; models: {listing}.")
        if len(found) > 1:
            raise StoreError(
                f"model {model!r} is ambiguous in {self.path}: it matches "
                + "; ".join(m.describe() for m in found)
                + ". Pass the model id or the full fingerprint."
            )
        return found[0]

    def model_for_fingerprint(self, fingerprint: str) -> ModelInfo | None:
        """The model with exactly this fingerprint, or None."""
        return next((m for m in self.models() if m.fingerprint == fingerprint), None)

    # -- writing
    def add(
        self, model: int | str, embeddings: Any, items: pd.DataFrame | Sequence[str] | Sequence[Path]
    ) -> dict[str, int]:
        """Insert or update (by path) one embedding per item, all in one transaction.

        `items`: a DataFrame with a `path` column and optionally `label`, `split`, `category`, `extra`
        (dicts merged into the extra JSON); every other column is kept in the extra JSON and comes back as a
        column from `load`. Or a list of paths. Returns `{"inserted": n, "updated": m}`.
        On any error nothing is written.
        """
        info = self.model(model)
        frame = _items_frame(items)
        paths = frame["path"].tolist()
        matrix = _matrix(embeddings, info, paths)
        with self._transaction() as db:
            before = db.execute("SELECT COUNT(*) FROM items WHERE model_id = ?", (info.id,)).fetchone()[0]
            db.executemany(_UPSERT, self._rows(info.id, frame, matrix))
            after = db.execute("SELECT COUNT(*) FROM items WHERE model_id = ?", (info.id,)).fetchone()[0]
            _bump(db, info.id)
        inserted = after - before
        return {"inserted": inserted, "updated": len(paths) - inserted}

    @staticmethod
    def _rows(model_id: int, frame: pd.DataFrame, matrix: np.ndarray) -> Iterator[tuple]:
        """Rows for the upsert, made lazily: a bad value stops the insert half-way (and it rolls back)."""
        columns = {c: frame[c].tolist() for c in frame.columns}
        core = [columns.get(c, [None] * len(frame)) for c in CORE_COLUMNS]
        extra_names = [c for c in frame.columns if c not in CORE_COLUMNS and c != EXTRA_COLUMN]
        given_extra = columns.get(EXTRA_COLUMN)
        for i, (path, label, split, category) in enumerate(zip(*core, strict=True)):
            extra = {name: columns[name][i] for name in extra_names}
            if given_extra is not None and isinstance(given_extra[i], dict):
                extra.update(given_extra[i])
            elif given_extra is not None and _python_value(given_extra[i]) is not None:
                raise StoreError(
                    f"item {path!r}: the 'extra' column must hold dicts, got {given_extra[i]!r}."
                )
            yield (
                model_id,
                path,
                _python_value(label),
                _python_value(split),
                _python_value(category),
                _dumps(extra, path) if extra else "{}",
                matrix[i].tobytes(),
            )

    def delete_items(
        self,
        model: int | str,
        *,
        split: Any = None,
        label: Any = None,
        category: Any = None,
        paths: Any = None,
        all_items: bool = False,
    ) -> int:
        """Delete the model's items matching every given filter; returns how many were deleted.

        Without filters nothing is deleted unless `all_items=True` (the model stays registered).
        """
        info = self.model(model)
        filters = {"split": split, "label": label, "category": category, "paths": paths}
        if all(v is None for v in filters.values()) and not all_items:
            raise StoreError(
                f"delete_items on {info.describe()} got no filter; pass split/label/category/paths, "
                "or all_items=True to delete all of its items."
            )
        where, params = self._where(info.id, filters)
        with self._transaction() as db:
            count = db.execute(f"DELETE FROM items WHERE {where}", params).rowcount
            _bump(db, info.id)
        return count

    def delete_model(self, model: int | str) -> int:
        """Delete a model and all its items; returns the number of items deleted."""
        info = self.model(model)
        with self._transaction() as db:
            count = db.execute("DELETE FROM items WHERE model_id = ?", (info.id,)).rowcount
            db.execute("DELETE FROM models WHERE id = ?", (info.id,))
        self._forget_files(info.id, remove=True)
        return count

    def vacuum(self) -> None:
        """Give the space of deleted rows back to the file system."""
        if self.read_only:
            raise StoreError(f"the store {self.path} was opened read_only=True; open it writable to vacuum.")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.execute("VACUUM")

    # -- reading
    @staticmethod
    def _where(model_id: int, filters: dict[str, Any]) -> tuple[str, list]:
        active = {name: values for name, values in filters.items() if values is not None}
        # Without filters, "+model_id" keeps sqlite off the indexes: one scan in rowid (insertion) order.
        clauses, params = ["model_id = ?" if active else "+model_id = ?"], [model_id]
        for name, values in active.items():
            if name not in _FILTERS:
                raise StoreError(f"unknown filter {name!r}; use one of {sorted(_FILTERS)}.")
            clauses.append(f"{_FILTERS[name]} IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(_value_list(values)))
        return " AND ".join(clauses), params

    def load(
        self,
        model: int | str,
        *,
        split: Any = None,
        label: Any = None,
        category: Any = None,
        paths: Any = None,
    ) -> tuple[np.ndarray, pd.DataFrame]:
        """The model's embeddings `(N, D)` float32 and their metadata, for items matching every given filter.

        Filters take one value or a list of values. Rows come in insertion order, or in the order of `paths`
        when given (paths not in the store are left out). The metadata has `path, label, split, category`
        and one column per extra key.
        """
        info = self.model(model)
        filters = {"split": split, "label": label, "category": category, "paths": paths}
        where, params = self._where(info.id, filters)
        rows = self._db.execute(
            f"SELECT id, path, label, split, category, extra, embedding FROM items WHERE {where}", params
        ).fetchall()
        if paths is not None:
            order = {p: i for i, p in reversed(list(enumerate(_value_list(paths))))}
            rows.sort(key=lambda row: order[row[1]])
        else:  # sorting here, not in SQL: sqlite would sort the blobs too
            rows.sort(key=operator.itemgetter(0))
        return self._assemble(info, rows)

    def _assemble(self, info: ModelInfo, rows: list[tuple]) -> tuple[np.ndarray, pd.DataFrame]:
        if not rows:
            return np.empty((0, info.dim), np.float32), pd.DataFrame(
                {c: [] for c in CORE_COLUMNS}, dtype=object
            )
        _, path, label, split, category, extra, blobs = zip(*rows, strict=True)
        buffer = bytearray().join(blobs)
        if len(buffer) != len(rows) * info.dim * 4:
            raise StoreError(
                f"{self.path}: stored vectors of {info.describe()} do not all have {info.dim} values."
            )
        matrix = (
            np.frombuffer(buffer, dtype="<f4").astype(np.float32, copy=False).reshape(len(rows), info.dim)
        )
        frame = pd.DataFrame({"path": path, "label": label, "split": split, "category": category})
        if any(e != "{}" for e in extra):
            extras = pd.DataFrame([json.loads(e) for e in extra])
            frame = pd.concat([frame, extras.drop(columns=list(CORE_COLUMNS), errors="ignore")], axis=1)
        return matrix, frame

    def stored_extra(self, model: int | str, paths: Sequence[str]) -> dict[str, dict]:
        """`{path: extra dict}` for those of `paths` the model has stored (no embeddings read)."""
        info = self.model(model)
        where, params = self._where(info.id, {"paths": list(paths)})
        rows = self._db.execute(f"SELECT path, extra FROM items WHERE {where}", params)
        return {path: json.loads(extra) for path, extra in rows}

    def summary(self) -> pd.DataFrame:
        """One row per model: id, backbone, fingerprint, dim, created, item/label/category counts, splits."""
        rows = self._db.execute(
            """SELECT m.id, m.backbone, m.fingerprint, m.dim, m.created, COUNT(i.id),
                      COUNT(DISTINCT i.label), COUNT(DISTINCT i.category)
               FROM models m LEFT JOIN items i ON i.model_id = m.id GROUP BY m.id ORDER BY m.id"""
        ).fetchall()
        splits: dict[int, list[str]] = {}
        for model_id, split, count in self._db.execute(
            "SELECT model_id, split, COUNT(*) FROM items GROUP BY model_id, split ORDER BY model_id, split"
        ):
            splits.setdefault(model_id, []).append(f"{split}: {count}")
        columns = [
            "model_id",
            "backbone",
            "fingerprint",
            "dim",
            "created",
            "n_items",
            "n_labels",
            "n_categories",
        ]
        frame = pd.DataFrame(rows, columns=columns)
        frame["splits"] = [", ".join(splits.get(m, [])) for m in frame["model_id"]]
        return frame

    # -- search
    def _generation(self, info: ModelInfo) -> int | None:
        """The model's generation token (None for a schema-1 store opened read-only: no sidecar then)."""
        if self._version < 2:
            return None
        row = self._db.execute("SELECT generation FROM models WHERE id = ?", (info.id,)).fetchone()
        if row is None:
            raise StoreError(f"{info.describe()} was deleted from {self.path} meanwhile.")
        return int(row[0])

    def _fresh(self, vector_file: VectorFile | None, info: ModelInfo, generation: int) -> bool:
        if vector_file is None:
            return False
        h = vector_file.header
        return (
            h.get("store_id"),
            h.get("model_id"),
            h.get("fingerprint"),
            h.get("generation"),
            h.get("dim"),
        ) == (
            self._store_id,
            info.id,
            info.fingerprint,
            generation,
            info.dim,
        )

    def _forget_files(self, model_id: int, remove: bool = False) -> None:
        cached = self._vector_files.pop(model_id, None)
        if cached is not None:
            cached.close()
        self._faiss.pop(model_id, None)
        if remove:
            sidecar_path(self.path, model_id).unlink(missing_ok=True)
            for stale in stale_faiss_indexes(self.path, model_id, 0):
                stale.unlink(missing_ok=True)

    def sidecar_state(self, model: int | str) -> str:
        """ "fresh" when the model's vector sidecar holds exactly what the database holds, else "stale" or
        "missing" (a stale or missing sidecar is rebuilt by the next search, or not used when read-only)."""
        info = self.model(model)
        generation = self._generation(info)
        vector_file = open_vector_file(sidecar_path(self.path, info.id), 0)
        try:
            if vector_file is None:
                return "missing"
            return (
                "fresh" if generation is not None and self._fresh(vector_file, info, generation) else "stale"
            )
        finally:
            if vector_file is not None:
                vector_file.close()

    def build_sidecar(self, model: int | str) -> Path:
        """(Re)write the model's vector sidecar from one consistent snapshot of the database; its path."""
        if self.read_only:
            raise StoreError(
                f"the store {self.path} was opened read_only=True; open it writable to build files."
            )
        info = self.model(model)
        self._forget_files(info.id)
        path = sidecar_path(self.path, info.id)
        db = self._db
        own_snapshot = not db.in_transaction
        if own_snapshot:
            db.execute("BEGIN")  # a read snapshot: the generation and the rows belong together
        try:
            generation = self._generation(info)
            n = db.execute("SELECT COUNT(*) FROM items WHERE model_id = ?", (info.id,)).fetchone()[0]
            cursor = db.execute("SELECT id, embedding FROM items WHERE +model_id = ?", (info.id,))
            header = {
                "store_id": self._store_id,
                "model_id": info.id,
                "fingerprint": info.fingerprint,
                "generation": generation,
            }
            write_vector_file(path, header, n, info.dim, self._blob_chunks(info, cursor))
        finally:
            if own_snapshot:
                db.execute("COMMIT")
        return path

    def _blob_chunks(
        self, info: ModelInfo, cursor: sqlite3.Cursor
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while rows := cursor.fetchmany(_DB_CHUNK_ROWS):
            ids, blobs = zip(*rows, strict=True)
            buffer = b"".join(blobs)
            if len(buffer) != len(rows) * info.dim * 4:
                raise StoreError(
                    f"{self.path}: stored vectors of {info.describe()} do not all have {info.dim} values."
                )
            order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
            matrix = np.frombuffer(buffer, dtype="<f4").reshape(len(rows), info.dim)
            yield np.asarray(ids, dtype=np.int64)[order], matrix[order]

    def _vector_file(self, info: ModelInfo, generation: int | None) -> VectorFile | None:
        """The model's fresh sidecar: cached, read from disk, or rebuilt (writable stores); None when none
        can be had (read-only store without a fresh sidecar: the search then reads the database)."""
        if generation is None:
            return None
        cached = self._vector_files.get(info.id)
        if cached is not None and self._fresh(cached, info, generation) and cached.unchanged():
            return cached
        self._forget_files(info.id)
        vector_file = open_vector_file(sidecar_path(self.path, info.id), self.resident_bytes)
        if not self._fresh(vector_file, info, generation):
            if vector_file is not None:
                vector_file.close()
            if self.read_only:
                return None
            self.build_sidecar(info.id)
            vector_file = open_vector_file(sidecar_path(self.path, info.id), self.resident_bytes)
            if not self._fresh(vector_file, info, generation):  # changed again meanwhile: read the database
                if vector_file is not None:
                    vector_file.close()
                return None
        self._vector_files[info.id] = vector_file
        return vector_file

    def _chunks(
        self, info: ModelInfo, filters: dict[str, Any], generation: int | None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`(ids, vectors, squared norms)` of the model's items matching the filters: from the sidecar when it
        is fresh, else straight from the database, chunk by chunk."""
        active = {n: v for n, v in filters.items() if v is not None}
        vector_file = self._vector_file(info, generation)
        if vector_file is not None:
            if not active:
                return vector_file.chunks()
            where, params = self._where(info.id, filters)
            ids = np.fromiter(
                (r[0] for r in self._db.execute(f"SELECT id FROM items WHERE {where}", params)), np.int64
            )
            positions = np.searchsorted(vector_file.ids, np.sort(ids))
            return vector_file.chunks(positions)
        where, params = self._where(info.id, filters)
        cursor = self._db.execute(f"SELECT id, embedding FROM items WHERE {where}", params)
        return (
            (ids, matrix, np.einsum("ij,ij->i", matrix, matrix))
            for ids, matrix in self._blob_chunks(info, cursor)
        )

    def _search(
        self,
        queries: np.ndarray,
        info: ModelInfo,
        k: int,
        filters: dict[str, Any],
        exclude: Sequence[int | None] | None = None,
        exact: bool = True,
        nprobe: int | None = None,
    ) -> pd.DataFrame:
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise StoreError(f"k must be a positive integer, got {k!r}.")
        extra = 1 if exclude is not None else 0
        db = self._db
        db.execute("BEGIN")  # one read snapshot for the generation check, the scan and the hits' metadata
        try:
            generation = self._generation(info)
            if exact:
                distances, ids = scan_top_k(queries, self._chunks(info, filters, generation), int(k) + extra)
            else:
                distances, ids = self._ann(queries, info, int(k) + extra, filters, generation, nprobe)
            found = ids[ids >= 0]
            rows = db.execute(
                "SELECT id, path, label, split, category FROM items "
                "WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(np.unique(found).tolist()),),
            ).fetchall()
        finally:
            db.execute("COMMIT")
        if ids.shape[1] == 0:
            active = {n: v for n, v in filters.items() if v is not None}
            raise StoreError(f"{info.describe()} has no stored items matching {active or 'any filter'}.")
        by_id = {row[0]: row[1:] for row in rows}
        keep = ids >= 0
        if exclude is not None:
            keep &= ids != np.asarray([-2 if e is None else e for e in exclude], dtype=np.int64)[:, None]
        keep &= np.cumsum(keep, axis=1) <= k
        query_index, column = np.nonzero(keep)
        hit_ids = ids[query_index, column]
        ranks = np.cumsum(keep, axis=1)[query_index, column]
        hits = [by_id[i] for i in hit_ids.tolist()]
        columns = list(zip(*hits, strict=True)) if hits else [(), (), (), ()]
        return pd.DataFrame(
            {
                "query": query_index.astype(np.int64),
                "rank": ranks.astype(np.int64),
                "path": np.asarray(columns[0], dtype=object),
                "label": np.asarray(columns[1], dtype=object),
                "category": np.asarray(columns[3], dtype=object),
                "split": np.asarray(columns[2], dtype=object),
                "distance": distances[query_index, column].astype(np.float32),
            }
        )

    # -- approximate search (faiss)
    def build_index(
        self, model: int | str, *, nlist: int | None = None, train_size: int | None = None, seed: int = 0
    ) -> dict[str, Any]:
        """Build the model's faiss IVF-Flat index (Euclidean) from a fresh sidecar and save it beside the
        store, named with the generation it indexes; `search(..., exact=False)` uses it while the store is
        unchanged.

        `nlist`: inverted lists (default ~sqrt(n)); `train_size`: vectors the k-means sees (default
        min(n, 64 nlist)). Returns `{"path", "n", "nlist", "seconds"}`.
        """
        import time

        faiss = _import_faiss()
        if self.read_only:
            raise StoreError(
                f"the store {self.path} was opened read_only=True; open it writable to build files."
            )
        info = self.model(model)
        started = time.perf_counter()
        self.build_sidecar(info.id)
        vector_file = open_vector_file(sidecar_path(self.path, info.id), 0)
        generation = int(vector_file.header["generation"])
        try:
            n = vector_file.n
            if n == 0:
                raise StoreError(f"{info.describe()} has no items to index.")
            nlist = int(nlist or max(1, min(round(math.sqrt(n)), n // 39 or 1)))
            train_size = int(train_size or min(n, 64 * nlist))
            rows = np.sort(np.random.default_rng(seed).choice(n, size=min(train_size, n), replace=False))
            sample = np.concatenate([vectors for _, vectors, _ in vector_file.chunks(rows)])
            quantizer = faiss.IndexFlatL2(info.dim)
            index = faiss.IndexIVFFlat(quantizer, info.dim, nlist, faiss.METRIC_L2)
            index.cp.seed = seed
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
            for ids, vectors, _ in vector_file.chunks():
                index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids))
        finally:
            vector_file.close()
        path = faiss_index_path(self.path, info.id, generation)
        remove_abandoned(path)
        temporary = private_name(path)
        try:
            faiss.write_index(index, str(temporary))
            publish(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        for stale in stale_faiss_indexes(self.path, info.id, generation):
            stale.unlink(missing_ok=True)
        self._faiss[info.id] = (path, index)
        return {"path": path, "n": n, "nlist": nlist, "seconds": time.perf_counter() - started}

    def index_state(self, model: int | str) -> str:
        """The model's faiss index: "fresh", "stale" (built before the last change: refused) or "missing"."""
        info = self.model(model)
        generation = self._generation(info)
        if generation is not None and faiss_index_path(self.path, info.id, generation).is_file():
            return "fresh"
        return "stale" if stale_faiss_indexes(self.path, info.id, generation or 0) else "missing"

    def _ann(
        self,
        queries: np.ndarray,
        info: ModelInfo,
        k: int,
        filters: dict[str, Any],
        generation: int | None,
        nprobe: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _import_faiss()
        state = "missing" if generation is None else None
        path = faiss_index_path(self.path, info.id, generation or 0)
        cached = self._faiss.get(info.id)
        if state is None and cached is not None and cached[0] == path and path.is_file():
            index = cached[1]
        elif state is None and path.is_file():
            index = faiss.read_index(str(path))
            self._faiss[info.id] = (path, index)
        else:
            state = "stale" if stale_faiss_indexes(self.path, info.id, generation or 0) else "missing"
            raise StoreError(
                f"the faiss index of {info.describe()} in {self.path.parent} is {state}"
                + (" (the store changed after it was built)" if state == "stale" else "")
                + "; it is not used. Rebuild it with store.build_index(model) or search with exact=True."
            )
        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe or max(1, index.nlist // 16))
        if any(v is not None for v in filters.values()):
            where, sql_params = self._where(info.id, filters)
            ids = np.fromiter(
                (r[0] for r in self._db.execute(f"SELECT id FROM items WHERE {where}", sql_params)), np.int64
            )
            if len(ids) == 0:
                return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
            selector = faiss.IDSelectorBatch(ids)
            params.sel = selector
        squared, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        distances = np.sqrt(np.maximum(squared, 0)).astype(np.float32)
        distances[ids < 0] = np.inf
        if not (ids >= 0).any():
            return distances[:, :0], ids[:, :0]
        order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), distances), axis=1)
        return np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)

    def search(
        self,
        query_vectors: Any,
        *,
        model: int | str,
        k: int = 5,
        split: Any = None,
        label: Any = None,
        category: Any = None,
        paths: Any = None,
        exact: bool = True,
        nprobe: int | None = None,
    ) -> pd.DataFrame:
        """Euclidean top-k of query vectors `(Q, D)` among the model's items matching the filters.

        Returns one row per hit: `query` (row of query_vectors), `rank` (1 = nearest), `path`, `label`,
        `category`, `split`, `distance`. `exact=False` uses the model's faiss index (`build_index`; refused
        when missing or stale) probing `nprobe` lists (default nlist/16): faster on large stores,
        may miss hits.
        """
        info = self.model(model)
        queries = _to_numpy(query_vectors)
        if queries.ndim == 1:
            queries = queries[None, :]
        names = [f"query {i}" for i in range(len(queries))]
        queries = _matrix(queries, info, names, what="query vectors")
        filters = {"split": split, "label": label, "category": category, "paths": paths}
        return self._search(queries, info, k, filters, exact=exact, nprobe=nprobe)

    def search_stored(
        self,
        query_paths: str | Sequence[str],
        *,
        model: int | str,
        k: int = 5,
        exclude_self: bool = True,
        split: Any = None,
        label: Any = None,
        category: Any = None,
        paths: Any = None,
        exact: bool = True,
        nprobe: int | None = None,
    ) -> pd.DataFrame:
        """Search with stored items as queries (by path); the query itself is left out of its results
        unless `exclude_self=False`. Adds the columns `query_path` and `query_label`."""
        info = self.model(model)
        query_paths = _value_list(query_paths)
        queries, found = self.load(info.id, paths=query_paths)
        missing = sorted(set(query_paths) - set(found["path"]))
        if missing:
            raise StoreError(f"{info.describe()} has no stored item {missing[0]!r} ({len(missing)} missing).")
        query_paths = found["path"].tolist()
        where, params = self._where(info.id, {"paths": query_paths})
        id_of = dict(self._db.execute(f"SELECT path, id FROM items WHERE {where}", params).fetchall())
        exclude = [id_of[p] for p in query_paths] if exclude_self else None
        filters = {"split": split, "label": label, "category": category, "paths": paths}
        results = self._search(queries, info, k, filters, exclude=exclude, exact=exact, nprobe=nprobe)
        results.insert(1, "query_path", [query_paths[q] for q in results["query"]])
        results.insert(2, "query_label", [found["label"].iloc[q] for q in results["query"]])
        return results

    def search_images(
        self,
        images: Any,
        extractor: torch.nn.Module,
        *,
        k: int = 5,
        model: int | str | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        split: Any = None,
        label: Any = None,
        category: Any = None,
        paths: Any = None,
        exact: bool = True,
    ) -> pd.DataFrame:
        """Embed new images (paths or PIL images) with `extractor` and search the model that has the same
        fingerprint (or `model`, which must then have the extractor's fingerprint). Adds `query_path`."""
        from labkit.models import fingerprint

        extractor_fingerprint = fingerprint(extractor)
        if model is None:
            info = self.model_for_fingerprint(extractor_fingerprint)
            if info is None:
                listing = "; ".join(m.describe() for m in self.models()) or "none"
                raise StoreError(
                    f"the extractor (fingerprint {extractor_fingerprint[:12]}) made none of the embeddings "
                    f"in {self.path}; models there: {listing}. Load the extractor that built the store."
                )
        else:
            info = self.model(model)
            if info.fingerprint != extractor_fingerprint:
                raise StoreError(
                    f"the extractor has fingerprint {extractor_fingerprint[:12]} but {info.describe()} was "
                    "made by another model; their vectors cannot be compared. Load the extractor that built "
                    "the store."
                )
        if not isinstance(images, (list, tuple)):
            images = [images]
        names = [str(im) if isinstance(im, (str, Path)) else None for im in images]
        vectors = embed_images(extractor, images, batch_size=batch_size, device=device)
        queries = _matrix(
            vectors, info, [n or f"image {i}" for i, n in enumerate(names)], what="query vectors"
        )
        filters = {"split": split, "label": label, "category": category, "paths": paths}
        results = self._search(queries, info, k, filters, exact=exact)
        results.insert(1, "query_path", [names[q] for q in results["query"]])
        return results


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise StoreError(
            "approximate search needs faiss: pip install 'labkit[faiss]' (faiss-cpu), "
            "or search with exact=True."
        ) from None
    return faiss


# --- image embedding
def embed_images(
    extractor: torch.nn.Module, images: Iterable[Any], *, batch_size: int = 32, device: str = "cpu"
) -> np.ndarray:
    """Embeddings `(N, D)` float32 of image paths or PIL images (the extractor's evaluation transforms)."""
    from labkit.data import load_image
    from labkit.models import embed

    transform = extractor.transforms(train=False)
    tensors = [
        transform(load_image(im) if isinstance(im, (str, Path)) else im.convert("RGB")) for im in images
    ]
    if not tensors:
        return np.empty((0, int(extractor.embedding_size)), np.float32)
    return embed(extractor, tensors, batch_size=batch_size, device=device, progress=False).numpy()


def _with_file_stamps(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` plus the modification time (ns) and size of each `path`, the cache key of its embedding."""
    stats = [os.stat(p) for p in frame["path"]]
    return frame.assign(**{FILE_MTIME: [s.st_mtime_ns for s in stats], FILE_SIZE: [s.st_size for s in stats]})


def _register(store: EmbeddingStore, extractor: torch.nn.Module) -> int:
    from labkit.models import fingerprint

    extra = {"config": extractor.config} if hasattr(extractor, "config") else {}
    return store.register_model(
        extractor.backbone_name, fingerprint(extractor), int(extractor.embedding_size), **extra
    )


def embed_dataset_cached(
    store: EmbeddingStore,
    extractor: torch.nn.Module,
    dataset_df: pd.DataFrame,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, int]:
    """Store the embeddings of every image of `dataset_df`, embedding only those not already stored for
    the extractor's fingerprint with the same file (modification time and size) and box.

    Metadata of all rows is refreshed in one transaction. Returns `{"model_id", "embedded", "skipped"}`.
    """
    from labkit.data import LabeledImages
    from labkit.models import embed

    frame = _with_file_stamps(_items_frame(dataset_df))
    dim = int(extractor.embedding_size)
    model_id = _register(store, extractor)
    paths = frame["path"].tolist()
    boxes = [c for c in BOX_COLUMNS if c in frame.columns]
    stored = store.stored_extra(model_id, paths)

    def unchanged(i: int) -> bool:
        old = stored.get(paths[i])
        keys = [FILE_MTIME, FILE_SIZE, *boxes]
        return old is not None and all(
            _python_value(old.get(c)) == _python_value(frame.at[i, c]) for c in keys
        )

    keep = np.array([unchanged(i) for i in range(len(frame))], dtype=bool)
    matrix = np.empty((len(frame), dim), np.float32)
    if keep.any():
        kept_vectors, _ = store.load(model_id, paths=[p for p, k in zip(paths, keep, strict=True) if k])
        matrix[keep] = kept_vectors
    todo = np.flatnonzero(~keep)
    if len(todo):
        dataset = LabeledImages(
            frame.iloc[todo].reset_index(drop=True), transform=extractor.transforms(train=False)
        )
        vectors = embed(
            extractor,
            dataset,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=progress,
        )
        matrix[todo] = _to_numpy(vectors)
    store.add(model_id, matrix, frame)
    return {"model_id": model_id, "embedded": int(len(todo)), "skipped": int(keep.sum())}


# --- notebook helpers
def open_store_for(
    path: str | os.PathLike, extractor: torch.nn.Module, *, overwrite: bool = False
) -> tuple[EmbeddingStore, int]:
    """Open (or create) the store at `path` for this extractor; returns the store and the model id.

    A store holding another model's embeddings is refused unless `overwrite=True`, which deletes them.
    """
    from labkit.models import fingerprint

    store = EmbeddingStore(path)
    try:
        mine = fingerprint(extractor)
        others = [m for m in store.models() if m.fingerprint != mine]
        if others and not overwrite:
            raise StoreError(
                f"{store.path} holds the embeddings of another model ("
                + "; ".join(m.describe() for m in others)
                + f"), not of this extractor (fingerprint {mine[:12]}). Pass overwrite=True to replace them, "
                "or choose another store path."
            )
        for model in others:
            store.delete_model(model.id)
        return store, _register(store, extractor)
    except BaseException:
        store.close()
        raise
