"""Miners on hand-built batches and triplet-loss values on hand cases."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.losses import TripletLoss, triplet_loss
from labkit.miners import (
    AllTripletsMiner,
    HardTripletsMiner,
    Triplets,
    all_triplets,
    batch_hard_triplets,
    get_miner,
    pairwise_distances,
)

# Points on a line: label 0 at 0, 1, 3; label 1 at 4, 10; label 2 at 2 (no positive).
LINE = torch.tensor([[0.0], [1.0], [3.0], [4.0], [10.0], [2.0]])
LINE_LABELS = torch.tensor([0, 0, 0, 1, 1, 2])


def as_set(t: Triplets) -> set[tuple[int, int, int]]:
    return set(zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist(), strict=True))


def test_pairwise_distances_are_euclidean():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    expected = torch.tensor([[0.0, 5.0, 10.0], [5.0, 0.0, 5.0], [10.0, 5.0, 0.0]])
    assert torch.allclose(pairwise_distances(x), expected)


def test_batch_hard_picks_farthest_positive_and_closest_negative():
    triplets = batch_hard_triplets(pairwise_distances(LINE), LINE_LABELS)
    # anchor 0 (at 0): positives 1 (d=1), 2 (d=3) -> 2; negatives 3 (4), 4 (10), 5 (2) -> 5
    # anchor 1 (at 1): positives 0 (1), 2 (2) -> 2; negatives 5 (d=1) -> 5
    # anchor 2 (at 3): positives 0 (3), 1 (2) -> 0; negatives 3 (1), 5 (1) tie -> first index 3
    # anchor 3 (at 4): positive 4 (6); negatives 2 (1) -> 2
    # anchor 4 (at 10): positive 3 (6); negatives 2 (7), 5 (8), ... -> 2
    # anchor 5 has no positive: skipped
    assert triplets.anchor.tolist() == [0, 1, 2, 3, 4]
    assert triplets.positive.tolist() == [2, 2, 0, 4, 3]
    assert triplets.negative.tolist() == [5, 5, 3, 2, 2]


def test_hard_miner_uses_embeddings_and_skips_anchors_without_negatives():
    miner = HardTripletsMiner()
    assert as_set(miner(LINE, LINE_LABELS)) == {(0, 2, 5), (1, 2, 5), (2, 0, 3), (3, 4, 2), (4, 3, 2)}
    assert len(miner(torch.randn(4, 3), torch.tensor([1, 1, 1, 1]))) == 0


def test_all_triplets_are_every_valid_combination():
    labels = torch.tensor([0, 0, 1, 1, 1])
    expected = {
        (a, p, n)
        for a in range(5)
        for p in range(5)
        for n in range(5)
        if a != p and labels[a] == labels[p] and labels[n] != labels[a]
    }
    triplets = all_triplets(labels)
    assert as_set(triplets) == expected
    assert len(triplets) == len(expected) == 2 * 1 * 3 + 3 * 2 * 2


@pytest.mark.parametrize(("n_labels", "n_instances"), [(2, 2), (3, 4), (8, 4)])
def test_all_triplets_count_in_a_balanced_batch(n_labels, n_instances):
    labels = torch.arange(n_labels).repeat_interleave(n_instances)
    batch = n_labels * n_instances
    assert len(AllTripletsMiner()(torch.zeros(batch, 2), labels)) == batch * (n_instances - 1) * (
        batch - n_instances
    )


def test_get_miner_by_name_and_unknown_name():
    assert isinstance(get_miner("hard"), HardTripletsMiner)
    assert isinstance(get_miner("all"), AllTripletsMiner)
    with pytest.raises(ValueError, match="'semi'.*all.*hard"):
        get_miner("semi")


def test_triplet_loss_margin_hand_values():
    # a=0, p=1 (d_ap=1), n=3 (d_an=3) -> relu(1 - 3 + m); second triplet a=0, p=2 (2), n=1.5 (1.5)
    x = torch.tensor([[0.0], [1.0], [3.0], [2.0], [1.5]])
    triplets = Triplets(torch.tensor([0, 0]), torch.tensor([1, 3]), torch.tensor([2, 4]))
    loss, logs = triplet_loss(x, triplets, margin=0.5)
    assert loss.item() == pytest.approx((0.0 + (2.0 - 1.5 + 0.5)) / 2)
    assert logs["pos_dist"] == pytest.approx(1.5)
    assert logs["neg_dist"] == pytest.approx(2.25)
    assert logs["active_fraction"] == pytest.approx(0.5)
    assert logs["n_triplets"] == 2
    loss, logs = triplet_loss(x, triplets, margin=2.5)
    assert loss.item() == pytest.approx(((1 - 3 + 2.5) + (2 - 1.5 + 2.5)) / 2)
    assert logs["active_fraction"] == 1.0


def test_triplet_loss_soft_margin_is_softplus_of_the_gap():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])  # d_ap = 5, d_an = 1
    triplets = Triplets(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    loss, logs = triplet_loss(x, triplets, margin=None)
    assert loss.item() == pytest.approx(math.log1p(math.exp(4.0)))
    assert logs["active_fraction"] == 1.0
    loss, logs = triplet_loss(
        x, Triplets(torch.tensor([0]), torch.tensor([2]), torch.tensor([1])), margin=None
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-4.0)))
    assert logs["active_fraction"] == 0.0


def test_triplet_loss_module_with_hard_miner_and_gradients():
    x = LINE.clone().requires_grad_(True)
    criterion = TripletLoss(margin=1.0, miner="hard")
    loss = criterion(x, LINE_LABELS)
    # hard triplets (a, p, n), d_ap - d_an: (0,2,5) 3-2, (1,2,5) 2-1, (2,0,3) 3-1, (3,4,2) 6-1, (4,3,2) 6-7

    gaps = torch.tensor([1.0, 1.0, 2.0, 5.0, -1.0])
    assert loss.item() == pytest.approx(torch.relu(gaps + 1.0).mean().item())
    assert criterion.last_logs["active_fraction"] == pytest.approx(4 / 5)
    assert criterion.last_logs["pos_dist"] == pytest.approx((3 + 2 + 3 + 6 + 6) / 5)
    assert criterion.last_logs["neg_dist"] == pytest.approx((2 + 1 + 1 + 1 + 7) / 5)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_triplet_loss_without_triplets_is_zero_and_backpropagates():
    x = torch.randn(3, 4, requires_grad=True)
    criterion = TripletLoss(miner="all")
    loss = criterion(x, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0
    assert criterion.last_logs["n_triplets"] == 0 and math.isnan(criterion.last_logs["pos_dist"])
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_identical_embeddings_give_finite_gradients():
    x = torch.zeros(4, 3, requires_grad=True)
    TripletLoss(margin=0.2, miner="all")(x, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(x.grad).all()


def test_negative_margin_is_rejected():
    with pytest.raises(ValueError, match="margin.*-0.1"):
        TripletLoss(margin=-0.1)
