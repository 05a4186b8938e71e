"""In-batch triplet miners (vectorised): all valid triplets, and batch-hard."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class Triplets(NamedTuple):
    """Row indices into the batch: ``anchor[i]``, ``positive[i]``, ``negative[i]`` form triplet i."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor

    def __len__(self) -> int:  # number of triplets, not of fields
        return int(self.anchor.numel())


class Miner(Protocol):
    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets: ...


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix (B, B) of a batch of embeddings."""
    x = embeddings.float()
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.as_tensor(labels).reshape(-1)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def all_triplets(labels: torch.Tensor) -> Triplets:
    """Every (anchor, positive, negative) with label[a] == label[p], a != p and label[n] != label[a]."""
    positive, negative = _masks(labels)
    valid = positive[:, :, None] & negative[:, None, :]
    a, p, n = torch.nonzero(valid, as_tuple=True)
    return Triplets(a, p, n)


def batch_hard_triplets(distances: torch.Tensor, labels: torch.Tensor) -> Triplets:
    """Per anchor the farthest positive and the closest negative (first index on ties).

    Anchors without a positive or without a negative in the batch are left out.
    """
    positive, negative = _masks(labels)
    hardest_positive = distances.masked_fill(~positive, float("-inf")).argmax(dim=1)
    hardest_negative = distances.masked_fill(~negative, float("inf")).argmin(dim=1)
    anchors = torch.nonzero(positive.any(dim=1) & negative.any(dim=1), as_tuple=True)[0]
    return Triplets(anchors, hardest_positive[anchors], hardest_negative[anchors])


class AllTripletsMiner:
    """All valid triplets of the batch (B * (m - 1) * (B - m) for B items in groups of m)."""

    name = "all"

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        return all_triplets(torch.as_tensor(labels, device=embeddings.device))


class HardTripletsMiner:
    """Batch-hard mining: hardest positive and hardest negative for every anchor."""

    name = "hard"

    @torch.no_grad()
    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        labels = torch.as_tensor(labels, device=embeddings.device)
        return batch_hard_triplets(pairwise_distances(embeddings.detach()), labels)


MINERS = {"all": AllTripletsMiner, "hard": HardTripletsMiner}


def get_miner(miner: str | Miner) -> Miner:
    """A miner by name ("hard" or "all"), or the given miner object."""
    if not isinstance(miner, str):
        return miner
    if miner not in MINERS:
        raise ValueError(f"Unknown miner {miner!r}; choose one of {sorted(MINERS)}.")
    return MINERS[miner]()
