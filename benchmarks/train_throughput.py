"""Training throughput: labkit's Lightning path against a plain PyTorch loop, measured in one run.

Both do the same steps (forward, mined triplet loss, backward, AdamW step) on the same model (same initial
weights) and the same batch, kept in memory so that image decoding does not count. Lightning runs
`labkit.training.MetricLearningModule` (with its per-step logging) under `lightning.Trainer`. The timed
window starts after `--warmup` steps; the two paths alternate for `--rounds` rounds; each one's best counts.
Backbone, image size, batch layout, miner, lr and margin default to `labkit.training.train`'s defaults.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--backbone resnet18] [--image-size 64]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import time
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from labkit.losses import TripletLoss
from labkit.models import create_extractor
from labkit.training import MetricLearningModule, train

TRAIN_DEFAULTS = {name: p.default for name, p in inspect.signature(train).parameters.items()}


class RepeatedBatch(Dataset):
    """The same batch `steps` times (a DataLoader with batch_size=None yields it as is)."""

    def __init__(self, batch: dict[str, torch.Tensor], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.batch


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def plain_loop(extractor, batch, *, steps: int, warmup: int, lr: float, margin: float, miner: str) -> float:
    """Seconds for the timed steps of a hand-written loop."""
    criterion = TripletLoss(margin=margin, miner=miner)
    optimizer = torch.optim.AdamW(extractor.parameters(), lr=lr, weight_decay=1e-4)
    extractor.train()
    start = None
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        loss = criterion(extractor(batch["input_tensors"]), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def lightning_loop(
    extractor, batch, *, steps: int, warmup: int, lr: float, margin: float, miner: str
) -> float:
    """Seconds for the timed steps of labkit's LightningModule under lightning.Trainer."""
    module = MetricLearningModule(extractor, lr=lr, weight_decay=1e-4, margin=margin, miner=miner)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, DataLoader(RepeatedBatch(batch, steps), batch_size=None))
    return timer.end - timer.start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default=TRAIN_DEFAULTS["backbone"])
    parser.add_argument("--image-size", type=int, default=TRAIN_DEFAULTS["image_size"])
    parser.add_argument("--n-labels", type=int, default=TRAIN_DEFAULTS["n_labels"])
    parser.add_argument("--n-instances", type=int, default=TRAIN_DEFAULTS["n_instances"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--miner", default=TRAIN_DEFAULTS["miner"])
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")

    torch.manual_seed(0)
    initial = create_extractor(args.backbone, image_size=args.image_size)
    size = args.n_labels * args.n_instances
    batch = {
        "input_tensors": torch.randn(size, 3, args.image_size, args.image_size),
        "labels": torch.arange(args.n_labels).repeat_interleave(args.n_instances),
    }
    timed = args.steps - args.warmup
    kwargs = {
        "steps": args.steps,
        "warmup": args.warmup,
        "lr": TRAIN_DEFAULTS["lr"],
        "margin": TRAIN_DEFAULTS["margin"],
        "miner": args.miner,
    }
    times: dict[str, list[float]] = {"plain": [], "lightning": []}
    for _ in range(args.rounds):
        times["plain"].append(plain_loop(copy.deepcopy(initial), batch, **kwargs))
        times["lightning"].append(lightning_loop(copy.deepcopy(initial), batch, **kwargs))
    rate = {name: size * timed / min(values) for name, values in times.items()}
    print(
        f"{args.backbone} {args.image_size}px, batch {size} ({args.n_labels}x{args.n_instances}), "
        f"{timed} timed steps after {args.warmup} warm-up, best of {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    for name, value in rate.items():
        print(f"  {name:9s} {value:8.1f} images/s   (rounds: {', '.join(f'{t:.2f}s' for t in times[name])})")
    print(f"  ratio lightning / plain = {rate['lightning'] / rate['plain']:.3f}  (aim: >= 0.9)")


if __name__ == "__main__":
    main()
