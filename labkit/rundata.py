"""The run folder's dataset: `00_data` writes it once, every later notebook reads it from there.

`prepare(run_dir, dataset, ...)` resolves the dataset the way `00_data` is asked for it ("figures", an
OML CSV, or an image folder imported with `val_ratio` and `seed`) and writes into the run folder:

- `dataset.csv`: the resolved table in OML's format, exactly as later notebooks use it (the split, the
  query/gallery flags, categories, boxes, extra columns such as `class_name`), with absolute image paths,
  so OML reads the same file unchanged (`dataset_root` is not needed);
- `dataset.json`: where it came from (`source`, `kind`), the parameters asked for, counts per split and
  a `fingerprint` (SHA-256 of the table and of every image file's size).

`load(run_dir, dataset="")` reads it back, validated. With `dataset` given it must name the same source,
otherwise it raises `RunDatasetError` saying what the run folder holds; images whose size changed since
`00_data` (a dataset regenerated in place under the run) are an error too. A run folder keeps one
dataset: `prepare` with another one is refused, except in the interactive folder, where the earlier
interactive run is moved aside whole (see `labkit.pipeline.set_aside_interactive_run`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from labkit import data, figures, public_datasets

DATASET_CSV = "dataset.csv"
DATASET_JSON = "dataset.json"
FORMAT_VERSION = 1


class RunDatasetError(data.DatasetError):
    """The run folder's dataset is missing, or differs from the one asked for."""


@dataclass
class RunDataset:
    """A run folder's dataset: the validated table (absolute paths) and its `dataset.json`."""

    df: pd.DataFrame
    info: dict
    csv_path: Path

    @property
    def source(self) -> str:
        return str(self.info["source"])

    @property
    def seed(self) -> int:
        """The run's seed, as `00_data` was given it (it made the split of figures and imported folders)."""
        return int(self.info["params"]["seed"])


def resolve(
    dataset: str | os.PathLike = "figures",
    *,
    seed: int = 0,
    val_ratio: float = 0.5,
    n_classes: int = 32,
    images_per_class: int = 40,
    figure_size: int = 64,
    data_dir: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, dict]:
    """The dataset asked for and its description (`source`, `kind`, `params`), without writing anything.

    "figures" is generated (or reused) in the folder of its own parameters (`figures.generation_dir`).
    """
    params: dict[str, Any] = {"seed": int(seed)}
    if str(dataset) == "figures":
        sizes = {"n_classes": n_classes, "images_per_class": images_per_class, "size": figure_size}
        sizes = {key: int(value) for key, value in sizes.items()}
        root = figures.generation_dir(data_dir, seed=seed, **sizes)
        csv = figures.make_figures(root, seed=seed, **sizes)
        df = data.read_dataset(csv)
        params.update(
            n_classes=sizes["n_classes"],
            images_per_class=sizes["images_per_class"],
            figure_size=sizes["size"],
        )
        return df, {"source": "figures", "kind": "figures", "params": params, "images_root": str(root)}
    benchmark = public_datasets.parse_source(dataset)
    if benchmark is not None:  # "cub:<folder>" etc.: converted from the official files
        name, root = benchmark[0], benchmark[1].resolve()
        df = public_datasets.convert(name, root)
        return df, {"source": f"{name}:{root}", "kind": name, "params": params, "images_root": str(root)}
    path = Path(dataset).expanduser().resolve()
    df = data.load_dataset(path, seed=seed, val_ratio=val_ratio)
    kind = "csv" if path.is_file() else "folder"
    if kind == "folder" and str(df.attrs.get("source", "")).endswith(".csv"):
        kind = "csv"  # a folder holding one CSV is read as that CSV
    if kind == "folder":
        params["val_ratio"] = float(val_ratio)
    images_root = path if kind == "folder" else Path(str(df.attrs.get("source", path))).parent
    return df, {"source": str(path), "kind": kind, "params": params, "images_root": str(images_root)}


def fingerprint(df: pd.DataFrame) -> str:
    """SHA-256 of the table as written to `dataset.csv` and of each image file's size (in row order)."""
    digest = hashlib.sha256(_csv_text(df).encode())
    for path in df[data.PATH]:
        digest.update(f"{_size(path)}\n".encode())
    return digest.hexdigest()


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _csv_text(df: pd.DataFrame) -> str:
    """The table in OML's CSV form: absolute paths, flags empty on train rows."""
    out = df.copy()
    out[data.PATH] = [str(Path(p).absolute()) for p in out[data.PATH]]
    is_val = out[data.SPLIT] == data.VALIDATION
    for column in (data.IS_QUERY, data.IS_GALLERY):
        out[column] = out[column].astype(object).where(is_val, None)
    return out.to_csv(index=False)


def _counts(df: pd.DataFrame) -> dict:
    counts: dict[str, Any] = {"n_images": len(df), "n_classes": int(df[data.LABEL].nunique())}
    for split, part in df.groupby(data.SPLIT):
        counts[str(split)] = {
            "images": len(part),
            "classes": int(part[data.LABEL].nunique()),
            "queries": int(part[data.IS_QUERY].astype(bool).sum()),
            "gallery": int(part[data.IS_GALLERY].astype(bool).sum()),
        }
    return counts


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def describe(run_dir: str | os.PathLike) -> dict | None:
    """The run folder's `dataset.json`, or None when it has none."""
    path = Path(run_dir) / DATASET_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def prepare(
    run_dir: str | os.PathLike,
    dataset: str | os.PathLike = "figures",
    **resolve_kwargs: Any,
) -> RunDataset:
    """Resolve the dataset (see `resolve`) and write `dataset.csv` and `dataset.json` into `run_dir`.

    The same dataset again leaves the files as they are. Another dataset is refused with
    `RunDatasetError`, except in the interactive run folder, whose earlier run is then moved aside whole.
    """
    from labkit import pipeline

    run_dir = Path(run_dir)
    df, info = resolve(dataset, **resolve_kwargs)
    info = {**info, "format_version": FORMAT_VERSION, "counts": _counts(df), "csv": DATASET_CSV}
    run_dir.mkdir(parents=True, exist_ok=True)
    new = run_dir / (DATASET_CSV + ".new")
    new.write_text(_csv_text(df))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the caller saw them when the dataset was resolved
            info["fingerprint"] = fingerprint(data.read_dataset(new))  # as later notebooks will read it
        held = describe(run_dir)
        if held is not None and (run_dir / DATASET_CSV).is_file():
            same = held.get("source") == info["source"] and held.get("params") == info["params"]
            if same and held.get("fingerprint") == info["fingerprint"]:
                return load(run_dir)
            if not pipeline.is_interactive_run(run_dir):
                raise RunDatasetError(
                    f"{run_dir} already holds another dataset ({held.get('source')}, {_params_text(held)}); "
                    f"a run folder keeps one dataset. Use another run folder for {dataset} "
                    f"({_params_text(info)})."
                )
            text = new.read_text()
            moved = pipeline.set_aside_interactive_run(run_dir, reason="00_data was given another dataset")
            print(f"the earlier interactive run (another dataset) was moved whole to {moved}")
            new = run_dir / (DATASET_CSV + ".new")
            new.write_text(text)
        os.replace(new, run_dir / DATASET_CSV)
        _write_text(run_dir / DATASET_JSON, json.dumps(info, indent=2, sort_keys=True) + "\n")
    finally:
        new.unlink(missing_ok=True)
    return load(run_dir)


def _params_text(info: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(info.get("params", {}).items()))


def _same_source(asked: str | os.PathLike, info: dict) -> bool:
    if str(asked) == "figures" or info.get("kind") == "figures":
        return str(asked) == "figures" and info.get("kind") == "figures"
    benchmark = public_datasets.parse_source(asked)
    if benchmark is not None:
        return f"{benchmark[0]}:{benchmark[1].resolve()}" == str(info["source"])
    return Path(asked).expanduser().resolve() == Path(info["source"]).resolve()


def load(run_dir: str | os.PathLike, dataset: str | os.PathLike = "") -> RunDataset:
    """The run folder's dataset, validated, with absolute paths.

    `dataset` empty: whatever the run folder holds. Otherwise it must be the source the run folder was
    made from ("figures", or the same CSV / folder path). Raises `RunDatasetError` when the run folder has
    no dataset (run `00_data` into it first), when it holds another one, or when its images changed.
    """
    run_dir = Path(run_dir)
    csv_path = run_dir / DATASET_CSV
    info = describe(run_dir)
    if info is None or not csv_path.is_file():
        raise RunDatasetError(
            f"{run_dir} has no {DATASET_CSV}/{DATASET_JSON}: run 00_data into this run folder first "
            f"(labkit run --only 00 ..., or the notebook with run_dir = {str(run_dir)!r})."
        )
    if str(dataset) and not _same_source(dataset, info):
        raise RunDatasetError(
            f"this notebook was asked for dataset {str(dataset)!r}, but the run folder {run_dir} holds "
            f"{info['source']!r} ({_params_text(info)}; see {DATASET_JSON}). Leave dataset empty to use the "
            "run folder's, or run 00_data with the dataset you want into another run folder."
        )
    df = data.read_dataset(csv_path)
    if fingerprint(df) != info.get("fingerprint"):
        raise RunDatasetError(
            f"{csv_path} or its images changed since 00_data wrote them (fingerprint differs from "
            f"{DATASET_JSON}); images under {info.get('images_root')} were replaced or edited. Rerun the "
            "pipeline into a new run folder."
        )
    df.attrs.update(source=str(info["source"]), run_dataset=str(csv_path))
    return RunDataset(df=df, info=info, csv_path=csv_path)
