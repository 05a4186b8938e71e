"""Train one tiny epoch with DDP on 2 CPU processes (gloo); rank 0 writes the per-epoch history as JSON.

Usage: python ddp_train.py DATASET_CSV RUN_DIR OUT_JSON. Lightning re-runs this script for rank 1.
The last validation row is dropped so that the validation set does not split evenly across the ranks.
"""

from __future__ import annotations

import json
import sys

import torch

from labkit.data import SPLIT, VALIDATION, load_dataset
from labkit.training import train


def main(csv: str, run_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    df = load_dataset(csv)
    df = df.drop(index=df.index[df[SPLIT] == VALIDATION][-1])
    result = train(
        df,
        run_dir=run_dir,
        backbone="test_resnet",
        image_size=32,
        epochs=1,
        n_labels=2,
        n_instances=2,
        seed=0,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        progress=False,
    )
    if torch.distributed.get_rank() == 0:
        payload = {
            "world_size": torch.distributed.get_world_size(),
            "history": result.history.to_dict("records"),
        }
        with open(out, "w") as f:
            json.dump(payload, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
