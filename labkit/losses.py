"""Triplet loss (margin or soft margin) fed by an in-batch miner, with per-step logs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labkit.miners import Miner, Triplets, get_miner


def _distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # clamp keeps the gradient finite when two embeddings coincide
    return (x - y).pow(2).sum(dim=-1).clamp_min(1e-12).sqrt()


def triplet_loss(
    embeddings: torch.Tensor, triplets: Triplets, *, margin: float | None = 0.2
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean triplet loss over ``triplets`` and its logs.

    Per triplet: ``relu(d(a, p) - d(a, n) + margin)``, or ``softplus(d(a, p) - d(a, n))`` when ``margin``
    is None.

    Logs: ``pos_dist`` and ``neg_dist`` (mean anchor-positive / anchor-negative distance), ``active_fraction``
    (share of triplets with ``d(a, p) + margin > d(a, n)``, margin 0 for the soft margin) and ``n_triplets``.
    """
    if len(triplets) == 0:
        nan = float("nan")
        zero = embeddings.sum() * 0.0  # keeps the graph so backward() works on a batch without triplets
        return zero, {"pos_dist": nan, "neg_dist": nan, "active_fraction": 0.0, "n_triplets": 0}
    anchor = embeddings[triplets.anchor]
    d_ap = _distance(anchor, embeddings[triplets.positive])
    d_an = _distance(anchor, embeddings[triplets.negative])
    gap = d_ap - d_an
    if margin is None:
        losses = F.softplus(gap)
        active = gap > 0
    else:
        losses = F.relu(gap + margin)
        active = gap + margin > 0
    logs = {
        "pos_dist": float(d_ap.detach().mean()),
        "neg_dist": float(d_an.detach().mean()),
        "active_fraction": float(active.float().mean()),
        "n_triplets": int(gap.numel()),
    }
    return losses.mean(), logs


class TripletLoss(nn.Module):
    """Triplet loss over the triplets a miner finds in each batch.

    ``margin=None`` gives the soft-margin version. After every call ``last_logs`` holds the step's logs
    (see :func:`triplet_loss`).
    """

    def __init__(self, margin: float | None = 0.2, miner: str | Miner = "hard") -> None:
        super().__init__()
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0 or None (soft margin), got {margin}.")
        self.margin = margin
        self.miner = get_miner(miner)
        self.last_logs: dict[str, float] = {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        triplets = self.miner(embeddings, labels)
        loss, self.last_logs = triplet_loss(embeddings, triplets, margin=self.margin)
        return loss

    def extra_repr(self) -> str:
        return f"margin={self.margin}, miner={getattr(self.miner, 'name', type(self.miner).__name__)!r}"
