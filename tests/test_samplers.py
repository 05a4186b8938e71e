"""Balanced batch sampler: batch composition, epoch coverage, seeding, DDP split and errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from labkit.samplers import BalancedBatchSampler

# 5 labels: "a" 6 images, "b" 4, "c" 2 (fewer than n_instances), "d" 3, "e" 5
LABELS = np.array(["a"] * 6 + ["b"] * 4 + ["c"] * 2 + ["d"] * 3 + ["e"] * 5)


def batches(sampler: BalancedBatchSampler) -> list[list[int]]:
    return [list(b) for b in sampler]


def test_batches_hold_n_labels_times_n_instances():
    sampler = BalancedBatchSampler(LABELS, n_labels=2, n_instances=3, seed=0)
    out = batches(sampler)
    assert len(out) == len(sampler) == 3  # ceil(5 labels / 2)
    for batch in out:
        assert len(batch) == sampler.batch_size == 6
        counts = Counter(LABELS[batch])
        assert len(counts) == 2 and set(counts.values()) == {3}


def test_epoch_covers_every_label_and_small_labels_use_all_images():
    sampler = BalancedBatchSampler(LABELS, n_labels=2, n_instances=3, seed=1)
    for _ in range(3):
        out = batches(sampler)
        assert set(LABELS[np.concatenate(out)]) == set(LABELS)
        for batch in out:
            c_items = [i for i in batch if LABELS[i] == "c"]
            if c_items:  # 2 images for 3 slots: both used, one repeated
                assert set(c_items) == {10, 11} and len(c_items) == 3
            for label in ("a", "b", "d", "e"):
                items = [i for i in batch if LABELS[i] == label]
                assert len(items) in (0, 3) and len(set(items)) == len(items)  # no replacement needed


def test_seed_and_epoch_determine_batches():
    one = BalancedBatchSampler(LABELS, 2, 3, seed=3)
    two = BalancedBatchSampler(LABELS, 2, 3, seed=3)
    first = batches(one)
    assert first == batches(two)
    assert batches(one) != first  # the next iteration is the next epoch
    two.set_epoch(0)
    assert batches(two) == first
    assert batches(BalancedBatchSampler(LABELS, 2, 3, seed=4)) != first


def test_ddp_ranks_split_the_batches_evenly():
    whole = BalancedBatchSampler(LABELS, 2, 2, seed=0, num_replicas=1, rank=0)
    ranks = [BalancedBatchSampler(LABELS, 2, 2, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # 3 batches padded to 4 so both ranks step together
    parts, single = [batches(s) for s in ranks], batches(whole)
    assert parts[0][0] == single[0] and parts[1][0] == single[1] and parts[0][1] == single[2]
    assert set(LABELS[np.concatenate(parts[0] + parts[1])]) == set(LABELS)


def test_works_as_a_dataloader_batch_sampler():
    dataset = torch.utils.data.TensorDataset(torch.arange(len(LABELS)))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=BalancedBatchSampler(LABELS, 3, 2, seed=0))
    sizes = [len(b[0]) for b in loader]
    assert sizes == [6, 6]


@pytest.mark.parametrize(
    ("labels", "n_labels", "n_instances", "message"),
    [
        (LABELS, 6, 2, r"n_labels=6 .* only 5 labels"),
        (LABELS, 2, 1, r"n_instances=1"),
        (LABELS, 1, 2, r"n_labels=1"),
        (np.array([0, 0, 1, 2, 2, 3]), 2, 2, r"2 label\(s\) have a single image \(1, 3\)"),
        (np.array([]), 2, 2, r"non-empty"),
    ],
)
def test_impossible_settings_raise_naming_the_values(labels, n_labels, n_instances, message):
    with pytest.raises(ValueError, match=message):
        BalancedBatchSampler(labels, n_labels, n_instances)
