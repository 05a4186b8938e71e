"""Balanced batch sampler: ``n_labels`` distinct labels x ``n_instances`` images in every batch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``n_labels`` distinct labels with ``n_instances`` images each (a torch batch sampler).

    One epoch visits every label at least once: labels are shuffled and cut into groups of ``n_labels``; the
    last group is completed with other randomly drawn labels. Images of a label are drawn without replacement
    when it has at least ``n_instances`` of them, otherwise all of them are used and the rest drawn with
    replacement. Batches depend only on ``seed`` and the epoch (:meth:`set_epoch`; without it each new
    iteration counts as the next epoch). Under DDP (``num_replicas`` > 1, taken from ``torch.distributed``
    when initialised) every rank gets the same number of batches and different labels.
    """

    def __init__(
        self,
        labels: Sequence | np.ndarray | torch.Tensor,
        n_labels: int,
        n_instances: int,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}.")
        if n_instances < 2:
            raise ValueError(
                f"n_instances={n_instances}: need at least 2 images per label to form positives."
            )
        if n_labels < 2:
            raise ValueError(f"n_labels={n_labels}: need at least 2 labels per batch to form negatives.")
        unique, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        if n_labels > len(unique):
            raise ValueError(
                f"n_labels={n_labels} but the data has only {len(unique)} labels; "
                f"use n_labels <= {len(unique)}."
            )
        single = unique[counts < 2]
        if len(single):
            shown = ", ".join(repr(x.item() if hasattr(x, "item") else x) for x in single[:10])
            raise ValueError(
                f"{len(single)} label(s) have a single image ({shown}{', ...' if len(single) > 10 else ''}); "
                "a triplet needs 2 images of a label. Drop those labels from the training split "
                "(e.g. df[df.groupby('label')['label'].transform('size') > 1])."
            )
        if num_replicas is None or rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = (
                num_replicas
                if num_replicas is not None
                else (torch.distributed.get_world_size() if dist else 1)
            )
            rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas}).")
        self.n_labels = int(n_labels)
        self.n_instances = int(n_instances)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.unique_labels = unique
        self._indices = [np.flatnonzero(inverse == i) for i in range(len(unique))]

    @property
    def batch_size(self) -> int:
        return self.n_labels * self.n_instances

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return math.ceil(math.ceil(len(self._indices) / self.n_labels) / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _label_groups(self, rng: np.random.Generator) -> list[np.ndarray]:
        n = len(self._indices)
        order = rng.permutation(n)
        groups = [order[i : i + self.n_labels] for i in range(0, n - n % self.n_labels, self.n_labels)]
        rest = order[n - n % self.n_labels :]
        if len(rest):
            others = np.setdiff1d(np.arange(n), rest)
            groups.append(
                np.concatenate([rest, rng.choice(others, self.n_labels - len(rest), replace=False)])
            )
        while len(groups) < len(self) * self.num_replicas:  # equal batch counts on every rank
            groups.append(rng.choice(n, self.n_labels, replace=False))
        return groups

    def _instances(self, label: int, rng: np.random.Generator) -> np.ndarray:
        idx = self._indices[label]
        if len(idx) >= self.n_instances:
            return rng.choice(idx, self.n_instances, replace=False)
        extra = rng.choice(idx, self.n_instances - len(idx), replace=True)
        return rng.permutation(np.concatenate([idx, extra]))

    def __iter__(self) -> Iterator[list[int]]:
        label_rng = np.random.default_rng([self.seed, self.epoch, 0])
        instance_rng = np.random.default_rng([self.seed, self.epoch, 1])  # same batches whatever num_replicas
        self.epoch += 1
        groups = self._label_groups(label_rng)
        batches = [np.concatenate([self._instances(int(lab), instance_rng) for lab in g]) for g in groups]

        for batch in batches[self.rank :: self.num_replicas]:
            yield batch.tolist()
