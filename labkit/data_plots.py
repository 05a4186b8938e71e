"""A sample grid of a dataset (one row per class) for the data notebook; returns Figures, never shows."""

from __future__ import annotations

import io

import matplotlib.figure
import numpy as np
import pandas as pd

from labkit.data import BOX, CATEGORY, LABEL, PATH, SPLIT, load_image


class Figure(matplotlib.figure.Figure):
    """A matplotlib Figure that notebooks show as a PNG even when pyplot was never imported."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100, facecolor="white")
        return buffer.getvalue()


def plot_sample_grid(df: pd.DataFrame, n_classes: int = 8, n_per_class: int = 6, seed: int = 0) -> Figure:
    """Images of `n_classes` classes (a row each, drawn from both splits), `n_per_class` per row.

    Classes and images are sampled with `seed`; rows are titled by label, split, class name and category.
    Boxes, when given, are cropped.
    """
    if n_classes < 1 or n_per_class < 1:
        raise ValueError(f"n_classes and n_per_class must be positive, got {n_classes} and {n_per_class}.")
    rng = np.random.default_rng(seed)
    labels = df[LABEL].drop_duplicates().to_numpy()
    chosen = labels[np.sort(rng.choice(len(labels), size=min(n_classes, len(labels)), replace=False))]
    has_box = all(c in df.columns for c in BOX)
    fig = Figure(figsize=(1.2 * n_per_class + 2.2, 1.25 * len(chosen)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(chosen), n_per_class, squeeze=False))
    for row, label in zip(axes, chosen, strict=True):
        rows = df[df[LABEL] == label]
        picks = rows.iloc[np.sort(rng.choice(len(rows), size=min(n_per_class, len(rows)), replace=False))]
        first = rows.iloc[0]
        title = f"{label} · {first[SPLIT]}"
        if "class_name" in rows.columns:
            title += f"\n{first['class_name']}"
        elif CATEGORY in rows.columns and first[CATEGORY]:
            title += f"\n{first[CATEGORY]}"
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("off")
        for ax, (_, item) in zip(row, picks.iterrows(), strict=False):
            box = [item[c] for c in BOX] if has_box and not pd.isna(item[BOX[0]]) else None
            ax.imshow(load_image(item[PATH], box))
        row[0].axis("on")
        for spine in row[0].spines.values():
            spine.set_visible(False)
        row[0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    return fig
