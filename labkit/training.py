"""Training on PyTorch Lightning: triplet loss with an in-batch miner, a balanced sampler, per-epoch retrieval
validation (also under DDP), CSV/TensorBoard logs, best/last checkpoints, resume and extractor export.

The notebook entry point is :func:`train`; :func:`read_history` gives the per-epoch table.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, Subset

from labkit import data as lkdata
from labkit.losses import TripletLoss
from labkit.models import (
    CHECKPOINT_CONFIG_KEY,
    Extractor,
    batch_images,
    create_extractor,
    embed,
    load_extractor,
    save_extractor,
)
from labkit.samplers import BalancedBatchSampler

HISTORY_CSV = "train_history.csv"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
EXTRACTOR_FILE = "extractor.pt"
BEST_NAME = "best"
LAST_NAME = "last"
METRIC_PREFIX = "val/"
SCHEDULES = (None, "cosine")

EPOCH_KEY = "labkit_epoch"  # checkpoint key: the last validated epoch (1-based) when it was saved

_COUNTS = ("n_queries", "n_skipped")  # flattened metric keys that are counts, not metrics


class CheckpointError(ValueError):
    """A checkpoint that training cannot resume from; the message names the file and what to do."""


# ----------------------------------------------------------------------------------------------- module


class MetricLearningModule(L.LightningModule):
    """LightningModule training an :class:`~labkit.models.Extractor` with a mined triplet loss.

    Logs per step (and epoch means) ``train/loss``, ``train/pos_dist``, ``train/neg_dist``,
    ``train/active_fraction``. Its checkpoints hold the extractor config (hparam ``extractor_config``), so
    :func:`labkit.models.load_extractor` rebuilds the extractor from a checkpoint.
    """

    def __init__(
        self,
        extractor: Extractor | None = None,
        *,
        extractor_config: dict[str, Any] | None = None,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        margin: float | None = 0.2,
        miner: str = "all",
        schedule: str | None = None,
    ) -> None:
        super().__init__()
        if extractor is None and extractor_config is None:
            raise ValueError("MetricLearningModule needs an extractor or an extractor_config.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: choose one of {SCHEDULES}.")
        extractor_config = dict(extractor.config if extractor is not None else extractor_config)
        self.save_hyperparameters(
            {
                CHECKPOINT_CONFIG_KEY: extractor_config,
                "lr": lr,
                "weight_decay": weight_decay,
                "margin": margin,
                "miner": miner,
                "schedule": schedule,
            }
        )
        self.extractor = extractor if extractor is not None else create_extractor(**extractor_config)
        self.criterion = TripletLoss(margin=margin, miner=miner)
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._loss_count = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = batch_images(batch)
        labels = batch["labels"]
        loss = self.criterion(self.extractor(images), labels)
        logs = {f"train/{k}": float(v) for k, v in self.criterion.last_logs.items() if k != "n_triplets"}
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log_dict(logs, on_step=True, on_epoch=True, batch_size=len(labels))
        self._loss_sum = self._loss_sum.to(loss.device) + loss.detach().double()
        self._loss_count += 1
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        if self.hparams.schedule is None:
            return optimizer
        # cosine decay to 0 over the whole run (all epochs, or max_steps), stepped every batch
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._loss_count = 0
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.current_epoch)

    def epoch_loss(self) -> float:
        """Mean train loss over this epoch's steps on all ranks (NaN before any step)."""
        totals = torch.tensor(
            [float(self._loss_sum), float(self._loss_count)], dtype=torch.float64, device=self.device
        )
        if _world_size() > 1:
            torch.distributed.all_reduce(totals)
        return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


# ------------------------------------------------------------------------------------------------- data


class MetricLearningData(L.LightningDataModule):
    """The train split behind a :class:`~labkit.samplers.BalancedBatchSampler` (built on each rank)."""

    def __init__(
        self,
        train: lkdata.LabeledImages,
        *,
        n_labels: int,
        n_instances: int,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.train = train
        self.n_labels = n_labels
        self.n_instances = n_instances
        self.seed = seed
        self.num_workers = num_workers

    def make_sampler(self) -> BalancedBatchSampler:
        return BalancedBatchSampler(self.train.labels, self.n_labels, self.n_instances, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        sampler = self.make_sampler()
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.current_epoch)  # right batches on resume too
        return DataLoader(
            self.train,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


# ------------------------------------------------------------------------------------------- validation


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def _broadcast_state(module: torch.nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers.

    DDP keeps parameters in sync, but each rank updates its BatchNorm running statistics from its own batch
    after the last broadcast; rank 0's copy is the one checkpointed and exported.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(tensor.data, src=0)


def embed_distributed(
    extractor: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> torch.Tensor:
    """Embeddings of the whole dataset (N, D), in dataset order, on every rank.

    Each rank embeds every ``world``-th item (no padding duplicates); the parts are all-gathered and put back
    in order. Without an initialised process group this is :func:`labkit.models.embed`.
    """
    world, rank = _world_size(), _rank()
    if world > 1:
        _broadcast_state(extractor)
    if world == 1:
        return embed(
            extractor, dataset, batch_size=batch_size, device=device, num_workers=num_workers, progress=False
        )
    n = len(dataset)
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    own = (
        embed(
            extractor,
            Subset(dataset, mine),
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=False,
        )
        if mine
        else None
    )
    dim = torch.tensor([own.shape[1] if own is not None else 0], device=device)
    torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
    padded = torch.zeros(per_rank, int(dim), dtype=torch.float32, device=device)
    index = torch.full((per_rank,), -1, dtype=torch.int64, device=device)
    if own is not None:
        padded[: len(mine)] = own.to(device)
        index[: len(mine)] = torch.tensor(mine, device=device)
    all_padded = [torch.empty_like(padded) for _ in range(world)]
    all_index = [torch.empty_like(index) for _ in range(world)]
    torch.distributed.all_gather(all_padded, padded)
    torch.distributed.all_gather(all_index, index)
    rows, index = torch.cat(all_padded).cpu(), torch.cat(all_index).cpu()
    keep = index >= 0
    out = torch.empty(n, int(dim), dtype=torch.float32)
    out[index[keep]] = rows[keep]
    return out


def evaluate(
    extractor: torch.nn.Module,
    dataset: lkdata.QueryGalleryImages,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    cmc_k: Sequence[int] = (1, 5),
    precision_k: Sequence[int] = (5,),
    map_k: Sequence[int] = (5,),
) -> dict:
    """Retrieval metrics (:func:`labkit.metrics.retrieval_metrics`) of the extractor on a query/gallery set.

    Per category when the dataset has categories. Under DDP every rank embeds part of the set and gets the
    metrics of the whole set.
    """
    from labkit.metrics import retrieval_metrics

    embeddings = embed_distributed(
        extractor, dataset, batch_size=batch_size, device=device, num_workers=num_workers
    )
    categories = dataset.categories if any(str(c) for c in dataset.categories) else None
    return retrieval_metrics(
        embeddings,
        torch.tensor(dataset.labels),
        torch.tensor(dataset.is_query),
        torch.tensor(dataset.is_gallery),
        categories=categories,
        sequence_ids=dataset.sequences,
        cmc_k=tuple(cmc_k),
        precision_k=tuple(precision_k),
        map_k=tuple(map_k),
        pcf_variance=(),
    )


class RetrievalValidation(Callback):
    """Validates retrieval once before training (epoch 0) and after every epoch (1..E).

    Embeds ``dataset`` (a :class:`~labkit.data.QueryGalleryImages`; split across ranks under DDP and
    gathered), computes the metrics, logs them as ``val/<metric>`` (e.g. ``val/cmc@1``,
    ``val/<category>/cmc@1``) and keeps a per-epoch history (``epoch``, ``step``, ``loss``, metric columns)
    that is saved in checkpoints and, when ``history_csv`` is given, written there by rank 0 after each epoch
    (with ``csv_after_checkpoint`` only epoch 0 is written here; :class:`LastCheckpoint` writes the later
    rows once ``last.ckpt`` holds them, so the CSV never shows an epoch a resume would train again).
    """

    def __init__(
        self,
        dataset: lkdata.QueryGalleryImages,
        *,
        history_csv: str | Path | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        cmc_k: Sequence[int] = (1, 5),
        precision_k: Sequence[int] = (5,),
        map_k: Sequence[int] = (5,),
        csv_after_checkpoint: bool = False,
    ) -> None:
        self.dataset = dataset
        self.history_csv = Path(history_csv) if history_csv else None
        self.csv_after_checkpoint = csv_after_checkpoint
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.ks = {"cmc_k": tuple(cmc_k), "precision_k": tuple(precision_k), "map_k": tuple(map_k)}
        self.history: list[dict[str, float]] = []
        self.metrics: dict[int, dict] = {}  # nested metrics per epoch of this session (not checkpointed)

    @property
    def state_key(self) -> str:
        return "RetrievalValidation"

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]

    def _validate(self, trainer: L.Trainer, pl_module: MetricLearningModule, epoch: int, loss: float) -> None:
        from labkit.metrics import flatten_metrics

        metrics = evaluate(
            pl_module.extractor,
            self.dataset,
            batch_size=self.batch_size,
            device=pl_module.device,
            num_workers=self.num_workers,
            **self.ks,
        )
        flat = {k: float(v) for k, v in flatten_metrics(metrics).items() if not k.endswith(_COUNTS)}
        self.metrics[epoch] = metrics
        self.history = [row for row in self.history if row["epoch"] != epoch]
        self.history.append({"epoch": epoch, "step": trainer.global_step, "loss": loss, **flat})
        # same values on every rank: no sync needed, and monitoring callbacks find the key on each rank
        pl_module.log_dict({METRIC_PREFIX + k: v for k, v in flat.items()}, on_step=False, on_epoch=True)
        if epoch == 0 or not self.csv_after_checkpoint:
            self.write_history(trainer)

    def write_history(self, trainer: L.Trainer) -> None:
        """Write the history to ``history_csv`` (rank 0; a temporary file replaces it in one step)."""
        if trainer.is_global_zero and self.history_csv is not None:
            partial = self.history_csv.with_name(self.history_csv.name + ".partial")
            self.history_frame().to_csv(partial, index=False)
            os.replace(partial, self.history_csv)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[EPOCH_KEY] = max((int(row["epoch"]) for row in self.history), default=0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not any(row["epoch"] == 0 for row in self.history):
            self._validate(trainer, pl_module, 0, math.nan)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validate(trainer, pl_module, trainer.current_epoch + 1, pl_module.epoch_loss())

    def history_frame(self) -> pd.DataFrame:
        return _history_frame(self.history)


class LastCheckpoint(Checkpoint):
    """Saves ``<dirpath>/last.ckpt`` at the end of every training epoch (after validation and the best
    checkpoint), so it is always the final state; written to a temporary file that then replaces it, so a
    run killed while saving keeps the previous ``last.ckpt``. Then ``validation`` writes its history CSV.

    (Lightning 2.6's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only in epochs that also
    save a monitored checkpoint, so a resume could go back epochs and rewrite the history.)
    """

    def __init__(self, dirpath: str | Path, validation: RetrievalValidation | None = None) -> None:
        self.path = Path(dirpath) / f"{LAST_NAME}.ckpt"
        self.validation = validation

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        trainer.save_checkpoint(partial)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            os.replace(partial, self.path)
        if self.validation is not None:
            self.validation.write_history(trainer)


def _history_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["epoch", "step", "loss"])
    frame = frame.sort_values("epoch").reset_index(drop=True)
    frame["epoch"] = frame["epoch"].astype(int)
    frame["step"] = frame["step"].astype(int)
    return frame


def read_history(run_dir_or_csv: str | Path) -> pd.DataFrame:
    """Per-epoch table of a run: ``epoch`` (0 = before training), ``step``, ``loss`` (NaN at 0), metrics."""
    path = Path(run_dir_or_csv).expanduser()
    csv = path / HISTORY_CSV if path.is_dir() else path
    if not csv.is_file():
        raise FileNotFoundError(
            f"No training history at {str(csv)!r}: train first (labkit.training.train or notebooks/01_train)."
        )
    return _history_frame(pd.read_csv(csv).to_dict("records"))


# ------------------------------------------------------------------------------------------------ train


@dataclass
class TrainResult:
    """What :func:`train` produced; ``extractor`` holds the best weights (by ``monitor``)."""

    run_dir: Path
    extractor: Extractor
    history: pd.DataFrame
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    extractor_path: Path | None
    monitor: str
    best_epoch: int | None
    best_score: float | None
    wall_time_s: float
    metrics: dict = field(
        default_factory=dict
    )  # nested validation metrics of the best epoch (when validated now)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info messages and harmless warnings (library code does not print unasked)."""
    names = ["lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"]
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        for pattern in (
            ".*does not have many workers.*",
            ".*Checkpoint directory .* exists and is not empty.*",
            ".*The number of training batches .* is smaller than the logging interval.*",
            ".*Experiment logs directory .* exists and is not empty.*",
            ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ):
            warnings.filterwarnings("ignore", message=pattern)
        for n in names:
            logging.getLogger(n).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def _resolve_resume(resume: str | Path | bool | None, checkpoints: Path) -> Path | None:
    if resume is None or resume is False:
        return None
    path = (
        checkpoints / f"{LAST_NAME}.ckpt" if resume is True or resume == "last" else Path(resume).expanduser()
    )
    if not path.is_file():
        raise FileNotFoundError(f"Cannot resume: checkpoint {str(path)!r} does not exist.")
    return path


def _read_resume_checkpoint(path: Path, config: dict[str, Any]) -> int:
    """The last finished epoch of a checkpoint to resume from; CheckpointError if it cannot be used."""
    fix = (
        "Restore the file from a copy (resume=<path> takes any checkpoint of this run's last epoch), or "
        "train again with overwrite=True or in a new run_dir."
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_sentence = str(error).strip().split("\n")[0].split(". ")[0].rstrip(".")
        reason = "0 bytes" if path.stat().st_size == 0 else f"{type(error).__name__}: {first_sentence}"
        raise CheckpointError(
            f"Cannot resume from {str(path)!r}: it is not a readable checkpoint ({reason}); it may be empty "
            f"or truncated (a copy or save cut short) or another kind of file. {fix}"
        ) from error
    saved_config = (
        (state.get("hyper_parameters") or {}).get(CHECKPOINT_CONFIG_KEY) if isinstance(state, dict) else None
    )
    if not isinstance(saved_config, dict) or "state_dict" not in state:
        raise CheckpointError(
            f"Cannot resume from {str(path)!r}: it is not a labkit training checkpoint (no model state and "
            f"extractor config in it). {fix}"
        )
    differ = {k: (saved_config.get(k), v) for k, v in config.items() if saved_config.get(k) != v}
    if differ:
        raise CheckpointError(
            f"Cannot resume from {str(path)!r}: it was trained with "
            f"{', '.join(f'{k}={saved!r}' for k, (saved, _) in differ.items())} but this call asks for "
            f"{', '.join(f'{k}={asked!r}' for k, (_, asked) in differ.items())}. Pass the checkpoint's "
            "settings to resume it, or train the new model in another run_dir."
        )
    return int(state.get(EPOCH_KEY, 0))


def _check_history_kept(history_csv: Path, checkpoint: Path, checkpoint_epoch: int) -> None:
    """Refuse a resume that would train again epochs already in the history (it is never rewritten)."""
    if not history_csv.is_file():
        return
    try:
        recorded = pd.read_csv(history_csv, usecols=["epoch"])["epoch"]
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return
    later = sorted(int(e) for e in recorded if e > checkpoint_epoch)
    if later:
        raise CheckpointError(
            f"Cannot resume from {str(checkpoint)!r} (epoch {checkpoint_epoch}): {str(history_csv)!r} "
            f"already records epoch(s) {', '.join(map(str, later))}, which resuming would train again and "
            f"rewrite. Resume from a checkpoint of epoch {later[-1]} (resume=True takes the run's "
            "checkpoints/last.ckpt), or train in a new run_dir (or again from scratch with overwrite=True)."
        )


def _prepare_checkpoints(checkpoints: Path, *, resuming: bool, overwrite: bool) -> None:
    existing = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
    if existing and not resuming:
        if not overwrite:
            raise FileExistsError(
                f"Checkpoint folder {str(checkpoints)!r} already holds {', '.join(existing[:5])} from an "
                "earlier run. Pass resume=True to continue that run, overwrite=True to replace it, or use "
                "another run_dir."
            )
        for name in existing:
            target = checkpoints / name
            if target.is_file() or target.is_symlink():
                target.unlink()
    checkpoints.mkdir(parents=True, exist_ok=True)


class EpochFromOneProgressBar(TQDMProgressBar):
    """Lightning's progress bar numbering epochs 1..N as the history does, without the logger's `v_num`."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

        if self._leave:  # Lightning's own steps, with the description counting from 1
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset()
        self.train_progress_bar.total = convert_inf(self.total_train_batches)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def train(
    df: pd.DataFrame,
    *,
    run_dir: str | Path,
    backbone: str = "resnet18",
    pretrained: bool = False,
    weights: str | Path | None = None,
    image_size: int | None = 64,
    embedding_size: int | None = None,
    normalize: bool = True,
    epochs: int = 25,
    max_steps: int | None = None,
    n_labels: int = 4,
    n_instances: int = 8,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    margin: float | None = 0.2,
    miner: str = "all",
    schedule: str | None = None,
    seed: int = 0,
    monitor: str = "cmc@1",
    monitor_mode: str = "max",
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    resume: str | Path | bool | None = None,
    overwrite: bool = False,
    num_workers: int = 0,
    eval_batch_size: int = 64,
    cmc_k: Sequence[int] = (1, 5),
    precision_k: Sequence[int] = (5,),
    map_k: Sequence[int] = (5,),
    deterministic: bool | str = "warn",
    export: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train an extractor on ``df``'s train split, validating on its validation split after every epoch.

    Writes into ``run_dir``: ``checkpoints/best.ckpt`` (best ``monitor``, e.g. "cmc@1") and ``last.ckpt``
    (the state after the last finished epoch, replaced every epoch), ``logs/`` (CSV and TensorBoard),
    ``train_history.csv`` (a row is written once ``last.ckpt`` holds its epoch) and (``export=True``)
    ``extractor.pt``, the best extractor's weights for :func:`labkit.models.load_extractor`. A non-empty
    ``checkpoints/`` is refused unless ``resume`` (True/"last" or a checkpoint path; training then continues
    from the checkpoint's epoch up to ``epochs`` in all, with the optimiser state restored) or
    ``overwrite=True``. Resuming never rewrites the history: a checkpoint older than the history's last
    epoch, unreadable, or of another architecture raises :class:`CheckpointError` naming the file.
    ``max_steps`` (None = no limit) stops earlier.
    ``devices=2, strategy="ddp"`` trains with DDP (from a script, not a notebook); validation metrics then
    equal a one-process evaluation of the same weights.

    The defaults are the CPU job on "figures": resnet18 from random initialisation at 64 px, 25 epochs of
    4 batches of 4 labels x 8 images, lr 3e-3 (AdamW), margin 0.2 and the all-triplets miner, which learns
    faster from scratch than batch-hard (``miner="hard"``, the usual choice with a pretrained backbone).
    ``schedule="cosine"`` decays the learning rate to 0 over the run. ``deterministic`` is Lightning's flag
    (torch's deterministic algorithms, "warn" = only warn where none exists), restored after training.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = run_dir / CHECKPOINTS_DIR
    ckpt_path = _resolve_resume(resume, checkpoints)
    _prepare_checkpoints(checkpoints, resuming=ckpt_path is not None, overwrite=overwrite)
    extractor_path = run_dir / EXTRACTOR_FILE
    if export and extractor_path.exists() and ckpt_path is None and not overwrite:
        raise FileExistsError(
            f"{str(extractor_path)!r} exists from an earlier run; pass overwrite=True or use another run_dir."
        )
    if epochs < 1:
        raise ValueError(f"epochs={epochs}: train at least 1 epoch.")

    L.seed_everything(seed, workers=True, verbose=False)
    extractor = create_extractor(
        backbone,
        pretrained=pretrained and ckpt_path is None,  # a resumed run gets its weights from the checkpoint
        weights=weights if ckpt_path is None else None,
        embedding_size=embedding_size,
        normalize=normalize,
        image_size=image_size,
    )
    if ckpt_path is not None:
        resumed_epoch = _read_resume_checkpoint(ckpt_path, extractor.config)
        _check_history_kept(run_dir / HISTORY_CSV, ckpt_path, resumed_epoch)
    train_set = lkdata.train_dataset(df, extractor.transforms(train=True))
    val_set = lkdata.validation_dataset(df, extractor.transforms(train=False))
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(
            f"train() needs both splits; the dataframe has {len(train_set)} train and {len(val_set)} "
            "validation rows."
        )
    data = MetricLearningData(
        train_set, n_labels=n_labels, n_instances=n_instances, seed=seed, num_workers=num_workers
    )
    data.make_sampler()  # fail now (with the sampler's message) on impossible n_labels / n_instances
    module = MetricLearningModule(
        extractor, lr=lr, weight_decay=weight_decay, margin=margin, miner=miner, schedule=schedule
    )
    validation = RetrievalValidation(
        val_set,
        history_csv=run_dir / HISTORY_CSV,
        batch_size=eval_batch_size,
        num_workers=num_workers,
        cmc_k=cmc_k,
        precision_k=precision_k,
        map_k=map_k,
        csv_after_checkpoint=True,
    )
    checkpointing = ModelCheckpoint(
        dirpath=checkpoints,
        filename=BEST_NAME,
        monitor=METRIC_PREFIX + monitor,
        mode=monitor_mode,
        save_top_k=1,
        save_last=False,  # LastCheckpoint writes last.ckpt after every epoch
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    steps_per_epoch = len(data.make_sampler())
    torch_deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    with _quiet_lightning():
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            max_epochs=epochs,
            max_steps=-1 if max_steps is None or max_steps < 0 else int(max_steps),
            callbacks=[
                validation,
                checkpointing,
                LastCheckpoint(checkpoints, validation),
                *([EpochFromOneProgressBar()] if progress else []),
            ],
            logger=[
                CSVLogger(run_dir / LOGS_DIR, name="csv"),
                TensorBoardLogger(run_dir / LOGS_DIR, name="tensorboard", default_hp_metric=False),
            ],
            log_every_n_steps=max(1, min(50, steps_per_epoch)),
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,  # the balanced sampler splits batches across ranks itself
            deterministic=deterministic,
            enable_progress_bar=progress,
            enable_model_summary=False,
            default_root_dir=run_dir,
        )
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        finally:
            torch.use_deterministic_algorithms(torch_deterministic[0], warn_only=torch_deterministic[1])

    history = validation.history_frame()
    best = Path(checkpointing.best_model_path) if checkpointing.best_model_path else None
    last = checkpoints / f"{LAST_NAME}.ckpt"
    best_score = checkpointing.best_model_score
    best_epoch = None
    if best is not None and best.is_file():
        best_epoch = torch.load(best, map_location="cpu", weights_only=True).get(EPOCH_KEY)
        best_extractor = load_extractor(best)
    else:
        best_extractor = module.extractor.cpu()
    best_extractor.eval()
    saved = None
    if export and trainer.is_global_zero:
        saved = save_extractor(best_extractor, extractor_path, overwrite=True)
    if trainer.world_size > 1:
        torch.distributed.barrier()
    return TrainResult(
        run_dir=run_dir,
        extractor=best_extractor,
        history=history,
        best_checkpoint=best,
        last_checkpoint=last if last.is_file() else None,
        extractor_path=saved if saved is not None else (extractor_path if extractor_path.is_file() else None),
        monitor=monitor,
        best_epoch=best_epoch,
        best_score=float(best_score) if best_score is not None else None,
        wall_time_s=time.perf_counter() - start,
        metrics=validation.metrics.get(best_epoch, {}) if best_epoch is not None else {},
    )
