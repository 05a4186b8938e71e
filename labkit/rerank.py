"""Second-stage retrieval: pairwise re-rankers of each query's first results.

The default (04's `pair_model = "features+tuned"`) adds two learned corrections to the extractor's distance:
the frozen-feature head's and the fine-tuned copy's, below, and re-orders a query only where both agree on its
first result. It was chosen over the head alone on held-out train classes (`benchmarks/rerank.py
--select-nested --tuned-epochs 9`, the sixth round; the agreement by `--select-consensus`, the ninth).

The frozen-feature head (04's `pair_model = "features"`; its epoch cap chosen by `--nested-candidates`):
- `FeaturePairModel`: both images through the trained extractor (one shared, frozen backbone); the pair's
  interactions (cosines of the embedding and of the pooled maps of the last backbone stages, spatial
  correlation of those maps, the distance) feed a head whose last layer starts at zero. Score = original
  distance + correction, so the untrained model reproduces the baseline order exactly.
- `fit_feature_reranker`: encodes the train split once, holds out a share of the train classes
  (`split_train_classes`), trains the head with a ranking loss inside each fit query's neighbour list
  (`neighbour_lists`), and keeps the epoch that re-ranks the held-out classes best (epoch 0 = baseline).
  Only the head trains, on cached features: many epochs cost little.

The fine-tuned copy (04's `pair_model = "tuned"`):
- `TunedPairModel`: score = the extractor's distance + weight x the distance under a copy of the extractor
  whose whole backbone is fine-tuned; the copy starts identical, so the untrained model reproduces the
  baseline order. `flip=True` measures what the fine-tuning changed on mirror-averaged embeddings instead
  (an option; it lost the eighth round).
- `fit_tuned_reranker`: fine-tunes the copy on the extractor's own confusions among the train classes (each
  train image's nearest train neighbours under the extractor; hinge ranking loss inside each list plus a
  batch-all triplet loss, the extractor's training augmentation) for a fixed number of steps. Cost: `epochs *
  steps_per_epoch` forward and backward passes of about `queries_per_step * (1 + list_size)` images, plus one
  encoding of the train split (4-10x the frozen-backbone model's training).

Both at once (the default): `CombinedPairModel` adds the head's correction and `COMBINED_TUNED_WEIGHT` (0.5)
x the tuned copy's distance to the extractor's distance; `fit_combined_reranker` fits the two models as above,
one after the other (the cost of both). By default (`COMBINED_CONSENSUS = "agree"`, the ninth round) a
query's first results are re-ordered by that score only where the two models, each alone, put the same item
first; elsewhere they keep the baseline order (`consensus_scores`; "borda", an option, orders by the sum of
their ranks).

Kept for comparison (OML's layout):
- `mine_pairs`: the hardest positive and hardest negative pair of every anchor in a batch (or all pairs).
- `PairwiseModel`: a timm backbone that sees both images of a pair at once (concatenated along the channel
  axis, or stacked vertically as OML's ConcatSiamese does) and an MLP head giving one logit ("same label").
- `PairwiseModule` / `train_pairwise`: Lightning training with BCE-with-logits on pairs mined with the
  extractor's embeddings inside balanced batches; `RerankValidation` measures the re-ranked metrics per epoch.

`PairwiseReranker(top_n, model)` re-orders each query's first `top_n` results with either model and returns a
new `RetrievalResults` (the rest keeps its order; distances ascend), so metrics and drawings work unchanged.
`save_pairwise` / `load_pairwise` store either model. Query expansion and k-reciprocal re-ranking live in
`labkit.query_expansion`.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import timm
import torch
from timm.models import adapt_input_conv
from torch import Tensor, nn

CONCAT_MODES = ("channels", "height")
# 04's `pair_model` values: the frozen-feature head, the fine-tuned copy, both, OML's layouts
PAIR_MODELS = ("features", "tuned", "features+tuned", *CONCAT_MODES)


# ----------------------------------------------------------------------------------------------- mining
def mine_pairs(
    embeddings: Tensor, labels: Tensor | Sequence[int], *, hard: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs of batch positions for a pairwise model, as `(ids1, ids2, is_negative)`.

    hard=True: for every anchor its hardest positive (the farthest item of the same label) and its hardest
    negative (the closest item of another label), by Euclidean distance between `embeddings`; ties go to the
    lowest position. hard=False: every pair of distinct items. Pairs are unordered and deduplicated
    (`ids1 < ids2`), positives first, each group sorted by (ids1, ids2). Anchors without a positive (or
    negative) in the batch contribute no such pair.
    """
    emb = torch.as_tensor(embeddings).detach().float()
    labels = torch.as_tensor(np.asarray(labels)).to(emb.device)
    if emb.ndim != 2 or labels.ndim != 1 or len(labels) != len(emb):
        raise ValueError(
            f"mine_pairs needs embeddings (N, D) and labels (N,); "
            f"got {tuple(emb.shape)} and {tuple(labels.shape)}"
        )
    n = len(emb)
    same = labels[:, None] == labels[None, :]
    pos_mask = same & ~torch.eye(n, dtype=torch.bool, device=emb.device)
    neg_mask = ~same
    if hard:
        dist = torch.cdist(emb[None], emb[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
        anchors = torch.arange(n, device=emb.device)
        hardest_pos = dist.masked_fill(~pos_mask, -float("inf")).argmax(dim=1)
        hardest_neg = dist.masked_fill(~neg_mask, float("inf")).argmin(dim=1)
        has_pos, has_neg = pos_mask.any(dim=1), neg_mask.any(dim=1)
        pos = (anchors[has_pos], hardest_pos[has_pos])
        neg = (anchors[has_neg], hardest_neg[has_neg])
    else:
        upper = torch.ones(n, n, dtype=torch.bool, device=emb.device).triu(1)
        pos = torch.nonzero(pos_mask & upper, as_tuple=True)
        neg = torch.nonzero(neg_mask & upper, as_tuple=True)
    pos1, pos2 = _unique_pairs(*pos, n)
    neg1, neg2 = _unique_pairs(*neg, n)
    is_negative = torch.cat(
        [torch.zeros(len(pos1), dtype=torch.bool), torch.ones(len(neg1), dtype=torch.bool)]
    )
    return torch.cat([pos1, neg1]), torch.cat([pos2, neg2]), is_negative.to(emb.device)


def _unique_pairs(a: Tensor, b: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Unordered pairs (a, b) deduplicated, as (low, high) sorted lexicographically."""
    keys = torch.unique(torch.minimum(a, b) * n + torch.maximum(a, b))
    return keys // n, keys % n


# ------------------------------------------------------------------------------------------------ model
class PairwiseModel(nn.Module):
    """A pair classifier: backbone over both images at once + MLP head -> one logit (> 0: same label).

    concat="channels" stacks the two RGB images into 6 channels; the first convolution is widened to 6
    input channels (its 3-channel weights repeated and scaled by 1/2 with `timm.models.adapt_input_conv`, so a
    pair of identical images gives the 3-channel response). concat="height" stacks them vertically, as
    OML's ConcatSiamese does, and keeps the backbone unchanged. `freeze()` stops training the backbone
    (kept in eval mode) so only the head learns.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        *,
        hidden_dims: Sequence[int] = (256,),
        dropout: float = 0.0,
        concat: str = "channels",
        freeze_backbone: bool = False,
        data_config: dict | None = None,
        backbone_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if concat not in CONCAT_MODES:
            raise ValueError(f"concat={concat!r} is not one of {CONCAT_MODES}")
        self.backbone_name, self.concat = backbone, concat
        in_chans = 6 if concat == "channels" else 3
        try:
            self.backbone = timm.create_model(
                backbone, pretrained=False, num_classes=0, in_chans=in_chans, **(backbone_kwargs or {})
            )
        except RuntimeError as error:  # timm names unknown models in a RuntimeError
            raise ValueError(f"backbone {backbone!r} cannot be built by timm: {error}") from error
        if isinstance(hidden_dims, str) or not all(isinstance(d, int) and d > 0 for d in hidden_dims):
            raise ValueError(
                f"hidden_dims must be a list of positive integers, e.g. [256]; got {hidden_dims!r}"
            )
        dims = [self.backbone.num_features, *hidden_dims]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        self.head = nn.Sequential(*layers, nn.Linear(dims[-1], 1))
        self.data_config = dict(data_config or timm.data.resolve_data_config({}, model=self.backbone))
        if concat == "channels":  # the resolved config says 6 channels; images stay RGB
            self.data_config["input_size"] = (3, *self.data_config["input_size"][1:])
        self.config = {
            "backbone": backbone,
            "hidden_dims": list(hidden_dims),
            "dropout": dropout,
            "concat": concat,
            "freeze_backbone": freeze_backbone,
            "data_config": _plain(self.data_config),
            "backbone_kwargs": dict(backbone_kwargs or {}),
        }
        self.train_backbone = True
        if freeze_backbone:
            self.freeze()

    @classmethod
    def from_extractor(cls, extractor: nn.Module, **kwargs: Any) -> PairwiseModel:
        """A pairwise model whose backbone starts from a trained extractor's backbone weights.

        `extractor` is a `labkit.models.Extractor` (uses its `backbone_name` and `data_config`); its timm
        backbone is found in its state dict (any prefix), the first convolution adapted to the pair input.
        """
        name = getattr(extractor, "backbone_name", None)
        if name is None:
            raise ValueError(
                "from_extractor needs a labkit Extractor (with `backbone_name`); got "
                + type(extractor).__name__
            )
        kwargs.setdefault("data_config", getattr(extractor, "data_config", None))
        image_size = getattr(extractor, "image_size", None)
        cfg = timm.get_pretrained_cfg(name)
        if image_size and cfg is not None and cfg.fixed_input_size:
            kwargs.setdefault("backbone_kwargs", {"img_size": int(image_size)})
        model = cls(name, **kwargs)
        model.load_backbone_weights(extractor.state_dict())
        return model

    def load_backbone_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Load a 3-channel timm backbone's weights (found under any key prefix) into this backbone."""
        target = self.backbone.state_dict()
        prefix = _find_prefix(state_dict, target)
        if prefix is None:
            raise ValueError(
                f"no {self.backbone_name} backbone weights in the given state dict (keys like "
                f"{next(iter(state_dict), None)!r}); was the extractor built with another backbone?"
            )
        first = self.backbone.pretrained_cfg.get("first_conv")
        loaded = {}
        for key in target:
            value = state_dict[prefix + key]
            if first and key == f"{first}.weight" and value.shape != target[key].shape:
                value = adapt_input_conv(target[key].shape[1], value)
            loaded[key] = value
        self.backbone.load_state_dict(loaded)

    def freeze(self) -> None:
        """Train the head only: backbone weights fixed, backbone in eval mode (batch-norm stats fixed)."""
        self.train_backbone = False
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def unfreeze(self) -> None:
        self.train_backbone = True
        self.backbone.requires_grad_(True)
        self.backbone.train(self.training)

    def train(self, mode: bool = True) -> PairwiseModel:
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()
        return self

    def forward(self, images1: Tensor, images2: Tensor) -> Tensor:
        """Logits (B,) that each pair (images1[i], images2[i]) shows the same label."""
        x = torch.cat([images1, images2], dim=1 if self.concat == "channels" else 2)
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            features = self.backbone(x)
        return self.head(features).squeeze(-1)

    def transforms(self, train: bool = False):
        """The image transform for each image of a pair (`labkit.data.make_transforms` of `data_config`)."""
        from labkit.data import make_transforms

        return make_transforms(self.data_config, train=train)


def _find_prefix(source: dict[str, Tensor], target: dict[str, Tensor]) -> str | None:
    """The prefix p such that every target key k exists in source as p + k (shortest first)."""
    probe = next(iter(target))
    for key in sorted(source, key=len):
        if key.endswith(probe):
            prefix = key[: len(key) - len(probe)]
            if all(prefix + k in source for k in target):
                return prefix
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def save_pairwise(
    model: PairwiseModel | FeaturePairModel | TunedPairModel | CombinedPairModel,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Save config + weights (a `FeaturePairModel`, `TunedPairModel` or `CombinedPairModel`: its extractor's
    too) to `path`; refuses to replace an existing file unless overwrite=True."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, _EncodedPairModel):
        payload = {
            "kind": f"labkit.{type(model).__name__}",
            "config": model.config,
            "extractor_config": model.extractor.config,
            "state_dict": model.state_dict(),
        }
    else:
        payload = {"kind": "labkit.PairwiseModel", "config": model.config, "state_dict": model.state_dict()}
    torch.save(payload, path)
    return path


def load_pairwise(
    path: str | os.PathLike,
) -> PairwiseModel | FeaturePairModel | TunedPairModel | CombinedPairModel:
    """A `PairwiseModel`, `FeaturePairModel`, `TunedPairModel` or `CombinedPairModel` saved by `save_pairwise`
    (all but the first in eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no pairwise model at {path}; train one with rerank.fit_feature_reranker, fit_tuned_reranker, "
            "fit_combined_reranker or train_pairwise"
        )
    data = torch.load(path, map_location="cpu", weights_only=False)
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind in ("labkit.FeaturePairModel", "labkit.TunedPairModel", "labkit.CombinedPairModel"):
        from labkit.models import create_extractor

        extractor, config = create_extractor(**data["extractor_config"]), data["config"]
        if kind == "labkit.CombinedPairModel":
            features = FeaturePairModel(extractor, **config["features"])
            tuned = TunedPairModel(extractor, **config["tuned"])
            model = CombinedPairModel(features, tuned, consensus=config.get("consensus"))
        else:
            kind_class = FeaturePairModel if kind == "labkit.FeaturePairModel" else TunedPairModel
            model = kind_class(extractor, **config)
        model.load_state_dict(data["state_dict"])
        return model.eval()
    if kind != "labkit.PairwiseModel":
        raise ValueError(f"{path} is not a labkit pairwise model (saved by labkit.rerank.save_pairwise)")
    config = dict(data["config"])
    config["data_config"] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in config["data_config"].items()
    }
    model = PairwiseModel(config.pop("backbone"), **config)
    model.load_state_dict(data["state_dict"])
    return model


# --------------------------------------------------------------------------------------------- re-ranker
def _load_images(source: Any, ids: Tensor) -> Tensor:
    """Images of items `ids` from a dataset (items with "input_tensors") or an (N, C, H, W) tensor."""
    if isinstance(source, Tensor):
        if source.ndim != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor; got shape {tuple(source.shape)}")
        return source[ids.to(source.device)]
    items = [source[int(i)] for i in ids]
    if not items or not isinstance(items[0], dict) or "input_tensors" not in items[0]:
        raise ValueError(
            "rerank needs a dataset whose items are dicts with 'input_tensors' (labkit.data.LabeledImages, "
            "with the pairwise model's transform) or an (N, C, H, W) image tensor"
        )
    return torch.stack([item["input_tensors"] for item in items])


class PairwiseReranker:
    """Re-scores each query's first `top_n` results with a pairwise model.

    The top_n items are sorted by the model's score (ties keep their order) and placed before the remaining
    results, whose order is unchanged; every item is kept. A `FeaturePairModel`, `TunedPairModel` or
    `CombinedPairModel` scores a pair as the results' distance plus its correction (lowest first; the new
    distance); a `PairwiseModel` gives a logit (highest first; new distance: 1 - sigmoid(logit), the
    probability that the pair differs).
    The rest keep their distances, shifted up by the least amount that keeps each row ascending. After
    `rerank`, `pairs_scored` and `seconds` describe the last call.
    """

    def __init__(
        self, top_n: int, model: nn.Module, *, batch_size: int = 64, device: str | torch.device = "cpu"
    ) -> None:
        if int(top_n) < 1:
            raise ValueError(f"top_n must be >= 1; got {top_n}")
        self.top_n, self.model, self.batch_size, self.device = int(top_n), model, int(batch_size), device
        self.pairs_scored = 0
        self.seconds = 0.0

    @torch.no_grad()
    def score_pairs(self, images: Any, ids1: Tensor, ids2: Tensor, *, progress: bool = False) -> Tensor:
        """Logits (P,) of the pairs (ids1[i], ids2[i]) of items of `images` (dataset or tensor), batched."""
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval().to(self.device)
        logits = []
        try:
            starts = range(0, len(ids1), self.batch_size)
            for start in tqdm(starts, desc="pairs", disable=not progress, leave=False):
                a, b = ids1[start : start + self.batch_size], ids2[start : start + self.batch_size]
                unique, inverse = torch.unique(torch.cat([a, b]), return_inverse=True)
                batch = _load_images(images, unique).to(self.device)
                out = self.model(batch[inverse[: len(a)]], batch[inverse[len(a) :]])
                logits.append(out.float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(logits) if logits else torch.zeros(0)

    def rerank(self, results, dataset_or_images: Any, *, progress: bool = False):
        """`results` (a `labkit.retrieval.RetrievalResults`) with each query's top_n re-ordered by the model.

        `dataset_or_images`: a dataset whose item i is item id i of the results (items with
        "input_tensors", transformed for the model) or an (N, C, H, W) tensor."""
        started = time.perf_counter()
        if isinstance(self.model, _EncodedPairModel):
            return self._rerank_features(results, dataset_or_images, started)
        retrieved, distances = results.retrieved, results.distances
        n = min(self.top_n, retrieved.shape[1])
        top = retrieved[:, :n]
        valid, queries, items = listed_pairs(results, n)
        logits = torch.full(top.shape, -float("inf"))
        logits[valid] = self.score_pairs(dataset_or_images, queries, items, progress=progress)
        order = torch.argsort(-logits, dim=1, stable=True)  # padding (-inf) stays last
        new_top = top.gather(1, order)
        new_top_dist = torch.where(valid.gather(1, order), torch.sigmoid(-logits.gather(1, order)), torch.inf)
        rest, rest_dist = retrieved[:, n:], distances[:, n:].float()
        if rest.shape[1]:
            top_max = torch.where(torch.isfinite(new_top_dist), new_top_dist, -torch.inf).amax(dim=1)
            shift = (top_max - rest_dist[:, 0]).clamp(min=0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
            # max(): (a + (b - a)) can round below b, and the rows must ascend across the boundary
            rest_dist = torch.maximum(rest_dist + shift[:, None], top_max.clamp(min=0)[:, None])
        self.pairs_scored = int(valid.sum())
        self.seconds = time.perf_counter() - started
        new_dist = torch.cat([new_top_dist, rest_dist], dim=1).to(distances.dtype)
        return results.reordered(torch.cat([new_top, rest], dim=1), new_dist)

    def _rerank_features(self, results, images: Any, started: float):
        """A `FeaturePairModel`, `TunedPairModel` or `CombinedPairModel`: every item among the queries and
        their top_n is encoded once, then each pair is scored as distance + correction (the results' own
        distances)."""
        n = min(self.top_n, results.retrieved.shape[1])
        top = results.retrieved[:, :n]
        encoded = encode_listed(
            self.model, results, images, n, batch_size=self.batch_size, device=self.device
        )
        out = rerank_encoded(results, encoded, self.model, n)
        self.pairs_scored = int((top >= 0).sum())
        self.seconds = time.perf_counter() - started
        return out


# ------------------------------------------------------------------------------------------------ training
class PairwiseModule(L.LightningModule):
    """Lightning module: pairs mined with a frozen extractor inside each batch, BCE-with-logits on the pair
    model's logits (target 1 = same label). Each pair's image order is swapped at random (`swap_prob`), as
    the channel-concatenating model is not symmetric. Logs `train_loss` (per step and epoch) and `pairs`."""

    def __init__(
        self,
        model: PairwiseModel,
        extractor: nn.Module,
        *,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        hard: bool = True,
        swap_prob: float = 0.5,
    ) -> None:
        super().__init__()
        self.model = model
        self.extractor = extractor.eval().requires_grad_(False)
        self.lr, self.weight_decay, self.hard, self.swap_prob = lr, weight_decay, hard, swap_prob
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.loss_history: list[dict[str, float]] = []  # {"epoch", "loss", "pairs"} per finished epoch
        self._loss_sum, self._pairs, self._steps = 0.0, 0, 0

    def epoch_loss(self) -> float:
        """Mean training loss of the current epoch so far (NaN before any step)."""
        return self._loss_sum / self._steps if self._steps else float("nan")

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._pairs, self._steps = 0.0, 0, 0

    def on_train_epoch_end(self) -> None:
        epoch = self.current_epoch + 1
        self.loss_history.append({"epoch": epoch, "loss": self.epoch_loss(), "pairs": self._pairs})

    def train(self, mode: bool = True) -> PairwiseModule:
        super().train(mode)
        self.extractor.eval()  # mining embeddings never use batch statistics
        return self

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, labels = batch["input_tensors"], batch["labels"]
        with torch.no_grad():
            embeddings = self.extractor(images)
        ids1, ids2, is_negative = mine_pairs(embeddings, labels, hard=self.hard)
        swap = torch.rand(len(ids1), device=ids1.device) < self.swap_prob
        ids1, ids2 = torch.where(swap, ids2, ids1), torch.where(swap, ids1, ids2)
        logits = self.model(images[ids1], images[ids2])
        loss = self.loss_fn(logits, (~is_negative).float())
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(ids1))
        self._loss_sum, self._pairs, self._steps = (
            self._loss_sum + float(loss.detach()),
            self._pairs + len(ids1),
            self._steps + 1,
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def select_queries(results, positions: Sequence[int] | Tensor | np.ndarray):
    """The `RetrievalResults` of the queries at `positions` (rows of `results`), same items and labels."""
    from labkit.retrieval import RetrievalResults

    rows = torch.as_tensor(np.asarray(positions), dtype=torch.int64).to(results.retrieved.device)
    return RetrievalResults(
        distances=results.distances[rows],
        retrieved=results.retrieved[rows],
        query_ids=results.query_ids[rows],
        relevant=results.relevant[rows],
        n_relevant=results.n_relevant[rows],
        labels=results.labels,
    )


class RerankValidation(L.Callback):
    """Re-ranks fixed validation results with the model in training and records the metrics.

    Epoch 0 (before training) holds the metrics of `results` as they are; then after every
    `every_n_epochs` epochs (and the last) the re-ranked metrics, logged as `val/<metric>` and kept in
    `history` (dicts: epoch, metric columns). `max_queries` re-ranks a fixed random subset of the queries
    (seeded) to keep validation cheap; None uses them all.
    """

    def __init__(
        self,
        results,
        dataset: Any,
        *,
        top_n: int = 5,
        batch_size: int = 64,
        every_n_epochs: int = 1,
        max_queries: int | None = None,
        categories: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        if max_queries is not None and max_queries < len(results):
            rng = np.random.default_rng(seed)
            results = select_queries(results, np.sort(rng.choice(len(results), max_queries, replace=False)))
        self.results, self.dataset, self.top_n, self.batch_size = results, dataset, top_n, batch_size
        self.every_n_epochs, self.categories = max(1, int(every_n_epochs)), categories
        self.history: list[dict[str, float]] = []

    def _flat(self, results) -> dict[str, float]:
        from labkit.metrics import flatten_metrics, metrics_from_results

        flat = flatten_metrics(metrics_from_results(results, categories=self.categories))
        return {k: float(v) for k, v in flat.items() if not k.endswith(("n_queries", "n_skipped"))}

    def measure(self, model: nn.Module, device: Any = "cpu") -> dict[str, float]:
        """Metrics of the validation results re-ranked by `model` now."""
        reranker = PairwiseReranker(self.top_n, model, batch_size=self.batch_size, device=device)
        return self._flat(reranker.rerank(self.results, self.dataset))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not any(row["epoch"] == 0 for row in self.history):
            self.history.append({"epoch": 0, **self._flat(self.results)})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        values = self.measure(pl_module.model, pl_module.device)
        self.history.append({"epoch": epoch, **values})
        pl_module.log_dict({f"val/{k}": v for k, v in values.items()}, on_step=False, on_epoch=True)


class _RepeatedBatches(torch.utils.data.Sampler):
    """A batch sampler chaining `repeats` passes of another (more steps per Lightning epoch)."""

    def __init__(self, sampler: torch.utils.data.Sampler, repeats: int) -> None:
        self.sampler, self.repeats = sampler, max(1, int(repeats))

    def __len__(self) -> int:
        return len(self.sampler) * self.repeats

    def __iter__(self):
        for _ in range(self.repeats):
            yield from self.sampler


def train_pairwise(
    model: PairwiseModel,
    extractor: nn.Module,
    train_data: torch.utils.data.Dataset,
    *,
    epochs: int = 2,
    n_labels: int = 8,
    n_instances: int = 4,
    passes_per_epoch: int = 1,
    lr: float = 3e-4,
    weight_decay: float = 1e-4,
    hard: bool = True,
    val_results=None,
    val_data: Any = None,
    top_n: int = 5,
    every_n_epochs: int = 1,
    val_max_queries: int | None = None,
    val_batch_size: int = 64,
    categories: Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
    max_steps: int | None = None,
) -> tuple[PairwiseModel, pd.DataFrame]:
    """Train `model` in place on pairs mined by `extractor` in balanced batches; return it and its history.

    `train_data` is a `labkit.data.LabeledImages` whose transform suits both the extractor and the pair
    model. One epoch = `passes_per_epoch` passes of `labkit.samplers.BalancedBatchSampler(n_labels,
    n_instances)`; `max_steps` (None = no limit) stops earlier. With `val_results` (the extractor's
    `RetrievalResults` on the validation set) and `val_data` (its dataset or images, same item ids), a
    `RerankValidation` callback measures the metrics re-ranked by the model (top_n; `val_max_queries`
    queries at most) after every `every_n_epochs` epochs. `out_dir` receives Lightning's CSV log
    (`out_dir/logs/metrics.csv`). History: one row per epoch (0 = before training): `epoch`, `loss` (mean
    BCE), `pairs` (pairs trained on), and the flattened validation metrics ("cmc@1", ...) where measured.
    """
    from labkit.samplers import BalancedBatchSampler
    from labkit.training import _quiet_lightning

    if epochs < 1:
        raise ValueError(f"epochs={epochs}: train at least 1 epoch")
    labels = getattr(train_data, "labels", None)
    if labels is None:
        raise ValueError("train_data needs a `labels` array (a labkit.data.LabeledImages)")
    if val_results is not None and val_data is None:
        raise ValueError("val_results given without val_data (the images those results refer to)")
    L.seed_everything(seed, workers=True, verbose=False)
    sampler = BalancedBatchSampler(labels, n_labels, n_instances, seed=seed)
    loader = torch.utils.data.DataLoader(
        train_data, batch_sampler=_RepeatedBatches(sampler, passes_per_epoch), num_workers=num_workers
    )
    module = PairwiseModule(model, extractor, lr=lr, weight_decay=weight_decay, hard=hard)
    validation = None
    if val_results is not None:
        validation = RerankValidation(
            val_results,
            val_data,
            top_n=top_n,
            batch_size=val_batch_size,
            every_n_epochs=every_n_epochs,
            max_queries=val_max_queries,
            categories=categories,
            seed=seed,
        )
    logger: Any = False
    if out_dir is not None:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(str(out_dir), name="logs", version="")
    with _quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen extractor
        trainer = L.Trainer(
            max_epochs=epochs,
            max_steps=-1 if max_steps is None or max_steps < 0 else int(max_steps),
            accelerator=accelerator,
            devices=1,
            logger=logger,
            callbacks=[validation] if validation is not None else [],
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            log_every_n_steps=1,
            default_root_dir=str(out_dir) if out_dir is not None else None,
        )
        trainer.fit(module, loader)
    model.cpu().eval()
    extractor.cpu()
    history = pd.DataFrame([{"epoch": 0, "loss": float("nan"), "pairs": 0}, *module.loss_history])
    if validation is not None and validation.history:
        history = history.merge(pd.DataFrame(validation.history), on="epoch", how="left")
    return model, history


# ------------------------------------------------------------------------------------------------ reporting
def ranking_changes(before, after, k: int) -> Tensor:
    """(Q,) how many of the first `k` positions hold another item in `after` than in `before`."""
    if not torch.equal(before.query_ids, after.query_ids):
        raise ValueError("ranking_changes needs results of the same queries in the same order")
    k = min(k, before.retrieved.shape[1], after.retrieved.shape[1])
    return (before.retrieved[:, :k] != after.retrieved[:, :k]).sum(dim=1)


def most_changed_query(before, after, *, k: int = 5, metric: str = "map@5", improved: bool = False) -> int:
    """Position of the query whose first `k` results changed most (ties: largest change of `metric`,
    then the first such query). improved=True: among the queries whose `metric` went up (all queries when
    none did)."""
    from labkit.metrics import metrics_from_results

    name, _, at = metric.partition("@")
    if name not in ("cmc", "precision", "map") or not at.isdigit():
        raise ValueError(f"metric must look like 'map@5', 'cmc@1' or 'precision@5'; got {metric!r}")
    per_query = [
        metrics_from_results(r, **{f"{name}_k": (int(at),)}, reduce=False)["overall"][name][int(at)]
        for r in (before, after)
    ]
    delta = (per_query[1] - per_query[0]).abs().nan_to_num(0.0)
    changes = ranking_changes(before, after, k).double()
    score = changes * 2 + delta.double() / (delta.max().double() + 1)
    if improved:
        gained = (per_query[1] - per_query[0]).nan_to_num(0.0) > 0
        if bool(gained.any()):
            score = score.masked_fill(~gained, -torch.inf)
    return int(torch.argmax(score))


def method_summary(
    results,
    *,
    seconds: float,
    pairs_scored: int = 0,
    columns: Sequence[str] = ("cmc@1", "precision@5", "map@5"),
    categories: Sequence[str] | None = None,
) -> dict[str, float]:
    """One row of a comparison table: the flattened metrics named by `columns`, `seconds`, `pairs_scored`."""
    from labkit.metrics import flatten_metrics, metrics_from_results

    wanted: dict[str, set[int]] = {"cmc": set(), "precision": set(), "map": set()}
    for column in columns:
        name, _, at = column.rpartition("/")[2].partition("@")
        if name not in wanted or not at.isdigit():
            raise ValueError(f"column {column!r} is not a cmc@k, precision@k or map@k metric")
        wanted[name].add(int(at))
    m = metrics_from_results(
        results,
        categories=categories,
        **{f"{name}_k": tuple(sorted(ks)) or (1,) for name, ks in wanted.items()},
    )
    flat = flatten_metrics(m)
    return {
        **{c: float(flat[c]) for c in columns},
        "seconds": float(seconds),
        "pairs_scored": int(pairs_scored),
    }


# ---------------------------------------------------------------------------------- feature pair model
def _pool_map(fmap: Tensor, side: int) -> Tensor:
    """A (B, C, H, W) map average-pooled to at most side x side."""
    h, w = fmap.shape[-2:]
    return nn.functional.adaptive_avg_pool2d(fmap, (min(side, h), min(side, w)))


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)


# `views` -> the view numbers used (see `_view`; 0 = the image as it is): subsets of the square's 8 symmetries
_VIEW_ORDER = {1: (0,), 2: (0, 4), 4: (0, 1, 2, 3), 8: (0, 1, 2, 3, 4, 5, 6, 7)}


def _view(images: Tensor, view: int) -> Tensor:
    """View `view` (0-7) of (B, C, H, W) images: mirrored left-right when view >= 4, then turned view % 4
    quarter turns."""
    x = torch.flip(images, dims=(-1,)) if view >= 4 else images
    return torch.rot90(x, k=view % 4, dims=(-2, -1)) if view % 4 else x


class _EncodedPairModel(nn.Module):
    """A pair model scored from one encoded vector per image: subclasses give `extractor`, `encode(images)`,
    `embeddings(encoded)` and `score(encoded1, encoded2, distances, head)` (distance + correction);
    `PairwiseReranker` encodes each item once for them."""

    def forward(self, images1: Tensor, images2: Tensor, distances: Tensor | None = None) -> Tensor:
        """(B,) scores of image pairs (`distances` default: the extractor's Euclidean one)."""
        e1, e2 = self.encode(images1), self.encode(images2)
        if distances is None:
            distances = (self.embeddings(e1) - self.embeddings(e2)).norm(dim=1)
        return self.score(e1, e2, distances)

    def transforms(self, train: bool = False):
        return self.extractor.transforms(train=train)


class FeaturePairModel(_EncodedPairModel):
    """A learned correction of the extractor's distance: score(a, b) = distance(a, b) + head(interactions).

    Both images go through the same frozen extractor (shared backbone, never trained here). `encode` keeps,
    per image, its embedding and the feature maps of the backbone's last `n_stages` stages, each pooled to
    at most `map_side` x `map_side` (one flat vector per image, so a gallery is encoded once). A pair's
    interactions are, for the embedding and each stage: cosine similarity of the average-pooled and of the
    max-pooled features, and the spatial correlation of the two maps (mean over locations of the best
    matching location's cosine, both ways, and the mean cosine over all location pairs); with
    `elementwise=True` also |a - b| and a * b of the last stage's pooled features; and the distance itself.
    With `views` > 1 every image is also embedded turned and/or mirrored (2: mirrored; 4: the four quarter
    turns; 8: both), and two more interactions compare the pair across views: the cosine of the view-averaged
    embeddings and the best cosine between one image as it is and any view of the other (both ways, averaged)
    — a geometric check that a plain embedding distance does not make.
    They are standardised (statistics set by `fit_feature_reranker`) and fed to the head: one linear layer
    (`hidden_dims=()`, the default: a learned weighting of the similarities, which transfers to new classes
    better than an MLP did on held-out train classes) or an MLP. Its last layer is zero-initialised: the
    untrained model scores every pair with its distance, so re-ranking with it reproduces the baseline order
    exactly. `n_heads` heads (one per fold of `fit_feature_reranker`'s cross-fitting) are averaged. The
    interactions are symmetric in (a, b).
    """

    def __init__(
        self,
        extractor: nn.Module,
        *,
        n_stages: int = 4,
        map_side: int = 4,
        hidden_dims: Sequence[int] = (),
        dropout: float = 0.0,
        elementwise: bool = False,
        n_heads: int = 4,
        views: int = 1,
    ) -> None:
        super().__init__()
        if int(n_heads) < 1:
            raise ValueError(f"n_heads must be >= 1; got {n_heads}")
        if int(views) not in _VIEW_ORDER:
            raise ValueError(f"views must be one of {sorted(_VIEW_ORDER)} (1: no extra views); got {views!r}")
        if getattr(extractor, "backbone_name", None) is None:
            raise ValueError(
                "FeaturePairModel needs a labkit Extractor (labkit.models.load_extractor or "
                f"create_extractor); got {type(extractor).__name__}"
            )
        if isinstance(hidden_dims, str) or not all(isinstance(d, int) and d > 0 for d in hidden_dims):
            raise ValueError(
                f"hidden_dims must be a list of positive integers, e.g. [32]; got {hidden_dims!r}"
            )
        self.extractor = extractor.eval().requires_grad_(False)
        self.n_stages, self.map_side, self.elementwise = int(n_stages), int(map_side), bool(elementwise)
        self.views = int(views)
        self.data_config = dict(extractor.data_config)
        side = self.data_config["input_size"][-2:]
        if self.views > 2 and side[0] != side[1]:
            raise ValueError(
                f"views={views} turns images, which needs square inputs; got {tuple(side)} (use views 1 or 2)"
            )
        with torch.no_grad():
            probe = self._parts(torch.zeros(1, *self.data_config["input_size"]))
        # embedding (D,), stage maps (C, h, w), then the other views' embeddings (views - 1, D)
        self.shapes = [tuple(p.shape[1:]) for p in probe]
        self.n_maps = len(self.shapes) - 1 - (self.views > 1)
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        n_inputs = 1 + 2 + 5 * self.n_maps + (2 * self.shapes[self.n_maps][0] if elementwise else 0)
        n_inputs += 2 if self.views > 1 else 0
        dims = [n_inputs, *hidden_dims]

        def make_head() -> nn.Sequential:
            layers: list[nn.Module] = []
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
                layers += [nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout)]
            last = nn.Linear(dims[-1], 1)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            return nn.Sequential(*layers, last)

        self.heads = nn.ModuleList(make_head() for _ in range(int(n_heads)))
        self.register_buffer("input_mean", torch.zeros(n_inputs))
        self.register_buffer("input_std", torch.ones(n_inputs))
        self.config = {
            "n_stages": self.n_stages,
            "map_side": self.map_side,
            "hidden_dims": list(hidden_dims),
            "dropout": dropout,
            "elementwise": self.elementwise,
            "n_heads": int(n_heads),
            "views": self.views,
        }

    @property
    def n_inputs(self) -> int:
        return int(self.input_mean.numel())

    def train(self, mode: bool = True) -> FeaturePairModel:
        super().train(mode)
        self.extractor.eval()  # frozen: batch-norm statistics never change
        return self

    def _parts(self, images: Tensor) -> list[Tensor]:
        extractor = self.extractor
        backbone = extractor.backbone
        if self.n_stages and not hasattr(backbone, "forward_intermediates"):
            raise ValueError(
                f"backbone {extractor.backbone_name!r} has no timm forward_intermediates; use n_stages=0"
            )
        if self.n_stages:
            final, maps = backbone.forward_intermediates(images, indices=self.n_stages)
            features = backbone.forward_head(final)
        else:
            features, maps = backbone(images), []
        if extractor.projection is not None:
            features = extractor.projection(features)
        if extractor.normalize:
            features = nn.functional.normalize(features, p=2, dim=1)
        parts = [features, *(_pool_map(m, self.map_side) for m in maps)]
        if self.views > 1:
            others = [extractor(_view(images, v)) for v in _VIEW_ORDER[self.views][1:]]
            parts.append(torch.stack(others, dim=1))
        return parts

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, F) one flat vector per image: the embedding, then each pooled stage map."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([p.flatten(1) for p in self._parts(images)], dim=1)
        finally:
            self.train(was_training)

    def embeddings(self, encoded: Tensor) -> Tensor:
        """The extractor's embeddings inside encoded vectors."""
        return encoded[:, : self.sizes[0]]

    def _split(self, encoded: Tensor) -> list[Tensor]:
        parts = torch.split(encoded, self.sizes, dim=1)
        return [p.reshape(len(encoded), *s) for p, s in zip(parts, self.shapes, strict=True)]

    def interactions(self, encoded1: Tensor, encoded2: Tensor, distances: Tensor) -> Tensor:
        """(P, n_inputs) raw (unstandardised) interaction features of the pairs (encoded1[i], encoded2[i])."""
        parts1, parts2 = self._split(encoded1), self._split(encoded2)
        d = distances.float()[:, None]
        columns = [d, _cosine(parts1[0], parts2[0])[:, None], d * d]
        maps = 1 + self.n_maps
        for m1, m2 in zip(parts1[1:maps], parts2[1:maps], strict=True):
            a1, a2 = m1.mean(dim=(2, 3)), m2.mean(dim=(2, 3))
            x1, x2 = m1.amax(dim=(2, 3)), m2.amax(dim=(2, 3))
            l1 = nn.functional.normalize(m1.flatten(2), dim=1)  # (P, C, L) unit vector per location
            l2 = nn.functional.normalize(m2.flatten(2), dim=1)
            corr = l1.transpose(1, 2) @ l2  # (P, L, L)
            best = 0.5 * (corr.amax(dim=2).mean(dim=1) + corr.amax(dim=1).mean(dim=1))
            aligned = torch.diagonal(corr, dim1=1, dim2=2).mean(dim=1)
            columns += [
                _cosine(a1, a2)[:, None],
                _cosine(x1, x2)[:, None],
                best[:, None],
                corr.mean(dim=(1, 2))[:, None],
                aligned[:, None],
            ]
        if self.elementwise:
            a1, a2 = parts1[maps - 1].mean(dim=(2, 3)), parts2[maps - 1].mean(dim=(2, 3))
            columns += [(a1 - a2).abs(), a1 * a2]
        if self.views > 1:
            v1 = nn.functional.normalize(torch.cat([parts1[0][:, None], parts1[-1]], dim=1), dim=2)
            v2 = nn.functional.normalize(torch.cat([parts2[0][:, None], parts2[-1]], dim=1), dim=2)
            across = v1 @ v2.transpose(1, 2)  # (P, V, V): view i of the first against view j of the second
            best = 0.5 * (across[:, 0, :].amax(dim=1) + across[:, :, 0].amax(dim=1))
            columns += [_cosine(v1.mean(dim=1), v2.mean(dim=1))[:, None], best[:, None]]
        return torch.cat(columns, dim=1)

    def correction_from_interactions(self, raw: Tensor, head: int | None = None) -> Tensor:
        """(P,) the correction: the mean of the heads' outputs, or head number `head` alone."""
        x = (raw - self.input_mean) / self.input_std
        if head is not None:
            return self.heads[head](x).squeeze(-1)
        return torch.stack([h(x).squeeze(-1) for h in self.heads]).mean(dim=0)

    def score(self, encoded1: Tensor, encoded2: Tensor, distances: Tensor, head: int | None = None) -> Tensor:
        """(P,) corrected distances of encoded pairs: `distances` + the correction."""
        raw = self.interactions(encoded1, encoded2, distances)
        return distances.float() + self.correction_from_interactions(raw, head)


def encode_items(
    model: nn.Module, images: Any, ids: Tensor, *, batch_size: int = 64, device: Any = "cpu"
) -> Tensor:
    """(len(ids), F) `model.encode` of the items `ids` of a dataset or an (N, C, H, W) tensor, batched (a
    model without `encode`, e.g. an extractor: its output, without gradients)."""
    model.to(device)
    encode = getattr(model, "encode", None) or torch.no_grad()(model)
    chunks = [
        encode(_load_images(images, ids[start : start + batch_size]).to(device)).float().cpu()
        for start in range(0, len(ids), batch_size)
    ]
    model.cpu()
    return torch.cat(chunks) if chunks else torch.zeros(0, sum(getattr(model, "sizes", [0])))


def encode_listed(
    model: FeaturePairModel | TunedPairModel,
    results,
    images: Any,
    top_n: int,
    *,
    batch_size: int = 64,
    device: Any = "cpu",
) -> Tensor:
    """(N, F) encoded items for `rerank_encoded(results, ..., top_n)`: row i is item i's `model.encode` when
    item i is a query of `results` or among a query's first top_n, zeros otherwise (never read)."""
    top = results.retrieved[:, :top_n]
    ids = torch.unique(torch.cat([results.query_ids, top[top >= 0]]))
    encoded = torch.zeros(len(results.labels), sum(model.sizes))
    encoded[ids] = encode_items(model, images, ids, batch_size=batch_size, device=device)
    return encoded


def listed_pairs(results, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (query, item) pairs of every query's first n results, as `(valid, queries, items)`: `valid` (Q, n)
    marks the real results (not padding), `queries` and `items` list the valid pairs' ids row by row."""
    top = results.retrieved[:, :n]
    valid = top >= 0
    return valid, results.query_ids[:, None].expand_as(top)[valid], top[valid]


def _rerank_scores(results, scores: Tensor, n: int):
    """`results` with each row's first n items sorted by `scores` (Q, n; ascending, +inf = padding)."""
    retrieved, distances = results.retrieved, results.distances
    top = retrieved[:, :n]
    order = torch.argsort(scores, dim=1, stable=True)  # padding (+inf) stays last
    new_top, new_top_dist = top.gather(1, order), scores.gather(1, order)
    rest, rest_dist = retrieved[:, n:], distances[:, n:].float()
    if rest.shape[1]:
        top_max = torch.where(torch.isfinite(new_top_dist), new_top_dist, -torch.inf).amax(dim=1)
        shift = (top_max - rest_dist[:, 0]).clamp(min=0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        # max(): (a + (b - a)) can round below b, and the rows must ascend across the boundary
        rest_dist = torch.maximum(rest_dist + shift[:, None], top_max.clamp(min=0)[:, None])
    new_dist = torch.cat([new_top_dist, rest_dist], dim=1).to(distances.dtype)
    return results.reordered(torch.cat([new_top, rest], dim=1), new_dist)


@torch.no_grad()
def rerank_encoded(
    results,
    encoded: Tensor,
    model: FeaturePairModel,
    top_n: int,
    *,
    batch_size: int = 4096,
    head: int | None = None,
):
    """`results` with each query's top_n re-ordered by `model.score` from encoded items (row i = item i;
    only the rows of queries and top_n items are read; `head`: one head alone). Ties keep their order. A
    model with a `consensus` (`CombinedPairModel`) orders by `consensus_scores` of its `score_parts`."""
    n = min(int(top_n), results.retrieved.shape[1])
    valid, queries, items = listed_pairs(results, n)
    base = results.distances[:, :n][valid]
    consensus = getattr(model, "consensus", None)
    scorer = model.score_parts if consensus else model.score
    was_training = model.training
    model.eval()
    try:
        out = [
            scorer(
                encoded[queries[at : at + batch_size]],
                encoded[items[at : at + batch_size]],
                base[at : at + batch_size],
                head,
            )
            for at in range(0, len(items), batch_size)
        ]
    finally:
        model.train(was_training)

    def as_lists(parts: list[Tensor]) -> Tensor:  # (P,) pieces -> (Q, n), +inf = padding
        lists = torch.full(valid.shape, torch.inf)
        lists[valid] = torch.cat(parts) if parts else torch.zeros(0)
        return lists

    if not consensus:
        return _rerank_scores(results, as_lists(out), n)
    head_alone, copy_alone, combined = (as_lists([part[k] for part in out]) for k in range(3))
    scores = consensus_scores(as_lists([base.float()]), head_alone, copy_alone, combined, consensus)
    return _rerank_scores(results, scores, n)


class _FixedLists:
    """The raw interactions of results' (query, top_n item) pairs, computed once: re-ranking them again
    with a changed head only re-applies the head (the features never change while the head trains)."""

    def __init__(self, results, encoded: Tensor, model: FeaturePairModel, top_n: int) -> None:
        self.results, self.n = results, min(int(top_n), results.retrieved.shape[1])
        self.valid, queries, items = listed_pairs(results, self.n)
        self.base = results.distances[:, : self.n][self.valid].float()
        with torch.no_grad():
            self.raw = model.interactions(encoded[queries], encoded[items], self.base)

    @torch.no_grad()
    def rerank(self, model: FeaturePairModel, head: int | None = None):
        scores = torch.full(self.valid.shape, torch.inf)
        scores[self.valid] = self.base + model.correction_from_interactions(self.raw, head)
        return _rerank_scores(self.results, scores, self.n)


# ----------------------------------------------------------------------------- training the feature model
def split_train_classes(
    labels: Sequence[int] | np.ndarray | Tensor, holdout_fraction: float = 0.25, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (fit, holdout) over items: a seeded `holdout_fraction` of the classes (at least 2, and
    at least 2 left to fit on) is held out whole, so the two sets share no class."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 4:
        raise ValueError(
            f"holding out training classes needs at least 4 classes; got {len(classes)} "
            "(use a dataset with more train classes)"
        )
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1); got {holdout_fraction}")
    n_hold = min(max(2, int(round(len(classes) * holdout_fraction))), len(classes) - 2)
    held = np.random.default_rng(seed).permutation(classes)[:n_hold]
    holdout = np.isin(labels, held)
    return ~holdout, holdout


def neighbour_lists(embeddings: Tensor, mask: np.ndarray | Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """For every item of `mask`: its `n` nearest other items of `mask` by Euclidean distance, as
    `(query_ids (Q,), neighbour_ids (Q, n'), distances (Q, n'))` with n' = min(n, |mask| - 1); ties keep
    item order."""
    ids = torch.nonzero(torch.as_tensor(np.asarray(mask))).squeeze(1)
    x = embeddings[ids].double()
    sq = (x * x).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0).sqrt().float()
    dist.fill_diagonal_(torch.inf)
    k = min(int(n), len(ids) - 1)
    order = torch.argsort(dist, dim=1, stable=True)[:, :k]
    return ids, ids[order], dist.gather(1, order)


def neighbour_pairs(
    embeddings: Tensor, labels: Sequence[int] | np.ndarray | Tensor, mask: np.ndarray | Tensor, n: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (query, neighbour) pairs of `neighbour_lists` flattened: `(ids1, ids2, distances, same_label)`."""
    queries, neighbours, dist = neighbour_lists(embeddings, mask, n)
    labels = torch.as_tensor(np.asarray(labels))
    ids1 = queries[:, None].expand_as(neighbours).reshape(-1)
    ids2 = neighbours.reshape(-1)
    return ids1, ids2, dist.reshape(-1), labels[ids1] == labels[ids2]


def class_folds(
    labels: Sequence[int] | np.ndarray | Tensor, folds: int, *, seed: int = 0
) -> list[np.ndarray]:
    """`folds` boolean holdout masks over items, each holding out a disjoint seeded group of whole classes
    (together: every class once)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if folds < 2 or len(classes) < 2 * folds:
        raise ValueError(
            f"{folds} folds of held-out classes need folds >= 2 and at least {2 * folds} classes; got "
            f"{len(classes)} classes (use fewer folds)"
        )
    groups = np.array_split(np.random.default_rng(seed).permutation(classes), folds)
    return [np.isin(labels, group) for group in groups]


def _list_metrics(results) -> dict[str, float]:
    from labkit.metrics import flatten_metrics, metrics_from_results

    flat = flatten_metrics(metrics_from_results(results, cmc_k=(1,), precision_k=(5,), map_k=(5,)))
    return {k: float(flat[k]) for k in ("cmc@1", "precision@5", "map@5")}


class _Fold:
    """Training lists, mined hard pairs and held-out results of one fold (tensors on the CPU)."""

    def __init__(self, model, encoded, labels, holdout, list_size, top_n) -> None:
        from labkit.retrieval import retrieve

        emb = model.embeddings(encoded)
        fit = ~holdout
        self.queries, self.neighbours, self.dist = neighbour_lists(emb, fit, list_size)
        q_flat = self.queries[:, None].expand_as(self.neighbours).reshape(-1)
        raw = model.interactions(encoded[q_flat], encoded[self.neighbours.reshape(-1)], self.dist.reshape(-1))
        self.raw = raw.reshape(*self.neighbours.shape, -1)
        same = labels[self.neighbours] == labels[self.queries][:, None]
        self.pair_mask = same[:, :, None] & ~same[:, None, :]  # [q, i, j]: i same label as q, j not
        self.n_pairs = same.numel()
        fit_ids = torch.nonzero(torch.as_tensor(fit)).squeeze(1)
        h1, h2, self.h_negative = mine_pairs(emb[fit_ids], labels[fit_ids])
        h1, h2 = fit_ids[h1], fit_ids[h2]
        self.h_dist = (emb[h1] - emb[h2]).norm(dim=1)
        self.h_raw = model.interactions(encoded[h1], encoded[h2], self.h_dist)
        hold_ids = torch.nonzero(torch.as_tensor(holdout)).squeeze(1)
        every = torch.ones(len(hold_ids), dtype=torch.bool)
        self.hold_results = retrieve(emb[hold_ids], labels[hold_ids], every, every, k=max(top_n, 5))
        self.hold_encoded = encoded[hold_ids]
        listed = torch.cat([labels[self.queries], labels[self.neighbours].flatten()])
        self.fit_classes = sorted(set(listed.tolist()))
        self.holdout_classes = sorted(set(labels[hold_ids].tolist()))


def fit_feature_reranker(
    model: FeaturePairModel,
    train_images: Any,
    labels: Sequence[int] | np.ndarray,
    *,
    top_n: int = 5,
    list_size: int | None = None,
    holdout_fraction: float = 0.25,
    epochs: int = 10,
    lists_per_batch: int = 4096,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    hard_pair_weight: float = 0.0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    val_results=None,
    val_images: Any = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[FeaturePairModel, pd.DataFrame]:
    """Train `model`'s heads on the train split, cross-fitted over held-out train classes, and keep the epoch
    that re-ranks the held-out classes best.

    `train_images`: the train split as a dataset (items with "input_tensors", evaluation transform) or an (N,
    C, H, W) tensor; `labels` (N,) its labels. Every image is encoded once (`model.encode`). The train classes
    are split into `model`'s n_heads folds (`class_folds`; with fewer than 2 * n_heads classes into fewer
    folds, head i taking fold i mod n_folds; with one head or fewer than 4 classes: a `holdout_fraction` of
    the classes held out, `split_train_classes`). Head f trains on the classes outside fold f: every item is a
    query whose `list_size` (default 2 * top_n) nearest neighbours under the extractor form its list; the loss
    is a pairwise ranking loss inside each list (every same-label neighbour should score below every other-
    label one: softplus of the score gap over the lists' distance spread), plus `hard_pair_weight` (default 0:
    on held-out train classes it made re-ranking worse) times a class-balanced binary cross-entropy on the
    hardest positive and hardest negative of every query (`mine_pairs`) with a learned threshold. An epoch is
    one pass over the lists in batches of `lists_per_batch` lists (default: all at once, which keeps a linear
    head's path smooth). After every epoch each head re-ranks the top_n lists of its own held-out classes; the
    epoch with the best mean held-out cmc@1 + map@5 is kept for all heads (epoch 0, the untrained model = the
    baseline, included; ties go to the earlier epoch), and the model averages the heads. So every train class
    is held out once and no choice rests on a handful of classes. With `val_results` (the extractor's
    validation `RetrievalResults`) and `val_images`, the validation metrics of the averaged heads are recorded
    per epoch for the plot only: they never choose anything. The default cap of 10 epochs (was 40) did best
    among 5, 10, 20 and 40 on class folds of the train split unseen by the extractor too, and again against 20
    and 40 over seeds 0-4 (`benchmarks/rerank.py --nested-candidates`).

    History: one row per epoch (0 = before training) with `loss`, `holdout/cmc@1`, `holdout/precision@5`,
    `holdout/map@5` (means over the folds), the validation metrics when given, and `chosen` (True on the
    kept epoch); `history.attrs` holds `best_epoch`, `folds` (per fold: `fit_classes` its lists hold,
    `holdout_classes`), `encode_seconds`, `train_seconds`, `n_pairs`.
    """
    if epochs < 0:
        raise ValueError(f"epochs={epochs}: must be >= 0")
    if val_results is not None and val_images is None:
        raise ValueError("val_results given without val_images (the images those results refer to)")
    labels_t = torch.as_tensor(np.asarray(labels)).long()
    list_size = int(list_size or 2 * top_n)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    all_ids = torch.arange(len(labels_t))
    encoded = encode_items(model, train_images, all_ids, batch_size=batch_size, device=device)
    val_encoded = None
    if val_results is not None:
        val_encoded = encode_listed(
            model, val_results, val_images, top_n, batch_size=batch_size, device=device
        )
    encode_seconds = time.perf_counter() - started
    n_heads = len(model.heads)
    n_folds = min(n_heads, len(np.unique(labels_t.numpy())) // 2)
    if n_folds < 2:
        holdouts = [split_train_classes(labels_t.numpy(), holdout_fraction, seed=seed)[1]]
    else:
        holdouts = class_folds(labels_t.numpy(), n_folds, seed=seed)
    distinct = [_Fold(model, encoded, labels_t, h, list_size, top_n) for h in holdouts]
    folds = [distinct[i % len(distinct)] for i in range(n_heads)]  # head i trains on fold i mod n_folds
    all_raw = torch.cat([t for f in distinct for t in (f.raw.reshape(-1, f.raw.shape[-1]), f.h_raw)])
    model.input_mean.copy_(all_raw.mean(dim=0))
    model.input_std.copy_(all_raw.std(dim=0).clamp(min=1e-6))
    temperature = float(torch.cat([f.dist.reshape(-1) for f in distinct]).std().clamp(min=1e-6))
    thresholds = [
        nn.Parameter(torch.tensor(float(f.h_dist.median()) if len(f.h_dist) else 0.0)) for f in folds
    ]
    optimizers = [
        torch.optim.AdamW([*model.heads[i].parameters(), thresholds[i]], lr=lr, weight_decay=weight_decay)
        for i in range(n_heads)
    ]

    fixed_holdout = {id(f): _FixedLists(f.hold_results, f.hold_encoded, model, top_n) for f in distinct}
    fixed_val = _FixedLists(val_results, val_encoded, model, top_n) if val_encoded is not None else None

    def measure(epoch: int, loss: float) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": epoch, "loss": loss}
        model.eval()
        held = [_list_metrics(fixed_holdout[id(f)].rerank(model, i)) for i, f in enumerate(folds)]
        row.update({f"holdout/{k}": float(np.mean([h[k] for h in held])) for k in held[0]})
        if fixed_val is not None:
            row.update(_list_metrics(fixed_val.rerank(model)))
        return row

    def heads_state() -> dict[str, Tensor]:
        return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("heads.")}

    history = [measure(0, float("nan"))]
    best_score = history[0]["holdout/cmc@1"] + history[0]["holdout/map@5"]
    best_state, best_epoch = heads_state(), 0
    from tqdm.auto import tqdm

    for epoch in tqdm(range(1, epochs + 1), desc="epochs", disable=not progress, leave=False):
        model.train()
        losses = []
        for i, fold in enumerate(folds):
            order = torch.randperm(len(fold.queries), generator=generator)
            h_order = torch.randperm(len(fold.h_dist), generator=generator)
            n_batches = max(1, (len(order) + lists_per_batch - 1) // lists_per_batch)
            for b in range(n_batches):
                rows = order[b * lists_per_batch : (b + 1) * lists_per_batch]
                r = fold.raw[rows]
                correction = model.correction_from_interactions(r.reshape(-1, r.shape[-1]), i)
                scores = fold.dist[rows] + correction.view(len(rows), -1)
                gaps = (scores[:, :, None] - scores[:, None, :]) / temperature  # pos - neg: want < 0
                mask = fold.pair_mask[rows]
                loss = nn.functional.softplus(gaps[mask]).mean() if mask.any() else scores.sum() * 0
                if hard_pair_weight and len(h_order):
                    hb = h_order[b::n_batches]
                    h_scores = fold.h_dist[hb] + model.correction_from_interactions(fold.h_raw[hb], i)
                    negative = fold.h_negative[hb]
                    pos_weight = (negative.sum() / (~negative).sum().clamp(min=1)).float()
                    bce = nn.functional.binary_cross_entropy_with_logits(
                        (thresholds[i] - h_scores) / temperature, (~negative).float(), pos_weight=pos_weight
                    )
                    loss = loss + hard_pair_weight * bce
                optimizers[i].zero_grad()
                loss.backward()
                optimizers[i].step()
                losses.append(float(loss.detach()))
        model.eval()
        row = measure(epoch, float(np.mean(losses)))
        history.append(row)
        score = row["holdout/cmc@1"] + row["holdout/map@5"]
        if score > best_score + 1e-9:
            best_score, best_epoch, best_state = score, epoch, heads_state()
    model.load_state_dict(best_state, strict=False)
    model.eval()
    frame = pd.DataFrame(history)
    frame["chosen"] = frame["epoch"] == best_epoch
    frame.attrs.update(
        best_epoch=best_epoch,
        folds=[{"fit_classes": f.fit_classes, "holdout_classes": f.holdout_classes} for f in distinct],
        encode_seconds=encode_seconds,
        train_seconds=time.perf_counter() - started,
        n_pairs=int(sum(f.n_pairs + len(f.h_dist) for f in distinct)),
    )
    return model, frame


# ------------------------------------------------------------------------------------ fine-tuned pair model
class TunedPairModel(_EncodedPairModel):
    """score(a, b) = distance(a, b) + weight * tuned distance(a, b): the extractor's distance plus that of a
    copy of the extractor fine-tuned (whole backbone) on the extractor's own confusions.

    `extractor` stays frozen; `tuned` starts as an exact copy, so the untrained model scores every pair
    (1 + weight) * distance and re-ranking with it reproduces the baseline order exactly. `fit_tuned_reranker`
    trains `tuned`. With `flip`, the tuned distance is `distances` + (the tuned copy's - the extractor's
    distance, both between embeddings averaged over each image and its mirror image): the change the
    fine-tuning made, measured on two views; an untrained copy still reproduces the baseline order. Both
    embeddings of an image are encoded once (one flat vector: extractor's, then `encode_tuned`'s), so a
    gallery is encoded once; scoring a pair is a subtraction. Same interface as `FeaturePairModel`
    (`encode`, `embeddings`, `score`, `sizes`), so `PairwiseReranker`, `rerank_encoded`, `save_pairwise`
    and `load_pairwise` take either.
    """

    def __init__(self, extractor: nn.Module, *, weight: float = 1.0, flip: bool = False) -> None:
        super().__init__()
        if getattr(extractor, "backbone_name", None) is None:
            raise ValueError(
                "TunedPairModel needs a labkit Extractor (labkit.models.load_extractor or "
                f"create_extractor); got {type(extractor).__name__}"
            )
        if not float(weight) >= 0:
            raise ValueError(f"weight must be >= 0 (0: the baseline distance alone); got {weight!r}")
        self.extractor = extractor.eval().requires_grad_(False)
        self.tuned = copy.deepcopy(self.extractor).requires_grad_(True)
        self.weight = float(weight)
        self.flip = bool(flip)
        self.data_config = dict(extractor.data_config)
        with torch.no_grad():
            dim = int(self.extractor(torch.zeros(1, *self.data_config["input_size"])).shape[1])
        self.sizes = [dim, dim, dim] if self.flip else [dim, dim]
        self.config = {"weight": self.weight, "flip": self.flip}

    def train(self, mode: bool = True) -> TunedPairModel:
        super().train(mode)
        self.extractor.eval()  # frozen: batch-norm statistics never change
        return self

    def _mirror_averaged(self, model: nn.Module, images: Tensor, plain: Tensor | None = None) -> Tensor:
        """`model`'s embedding averaged over the images and their mirror images (normalised again when the
        extractor normalises); `plain`: `model(images)` when already computed."""
        mean = ((model(images) if plain is None else plain) + model(images.flip(-1))) / 2
        return nn.functional.normalize(mean, dim=1) if getattr(self.extractor, "normalize", False) else mean

    @torch.no_grad()
    def encode_tuned(self, images: Tensor, plain: Tensor | None = None) -> Tensor:
        """(B, D) the tuned copy's embedding, or with `flip` (B, 2 D): the extractor's and the tuned copy's
        embeddings, each averaged over the images and their mirror images. `tuned_distances` reads it.
        `plain`: the extractor's embedding of `images` when already computed (with `flip` it is reused)."""
        was_training = self.training
        self.eval()
        try:
            if not self.flip:
                return self.tuned(images)
            averaged = [
                self._mirror_averaged(self.extractor, images, plain),
                self._mirror_averaged(self.tuned, images),
            ]
            return torch.cat(averaged, dim=1)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 2 D), or (B, 3 D) with `flip`: the extractor's embedding, then `encode_tuned`'s (the plain
        embedding computed once)."""
        was_training = self.training
        self.eval()
        try:
            plain = self.extractor(images)
            return torch.cat([plain, self.encode_tuned(images, plain)], dim=1)
        finally:
            self.train(was_training)

    def embeddings(self, encoded: Tensor) -> Tensor:
        """The extractor's embeddings inside encoded vectors."""
        return encoded[:, : self.sizes[0]]

    def tuned_distances(self, tuned1: Tensor, tuned2: Tensor, distances: Tensor) -> Tensor:
        """(P,) the fine-tuned copy's distances of pairs from their `encode_tuned` parts: the tuned copy's
        distance; with `flip`, `distances` + (tuned copy's - extractor's distance, both mirror-averaged): what
        the fine-tuning changed, measured on both views, so an untrained copy still gives `distances`."""
        if not self.flip:
            return (tuned1 - tuned2).norm(dim=1)
        d = self.sizes[0]
        extractor_part = (tuned1[:, :d] - tuned2[:, :d]).norm(dim=1)
        return distances.float() + (tuned1[:, d:] - tuned2[:, d:]).norm(dim=1) - extractor_part

    def score(self, encoded1: Tensor, encoded2: Tensor, distances: Tensor, head: int | None = None) -> Tensor:
        """(P,) `distances` + weight * the tuned copy's distances of encoded pairs (`head` is ignored)."""
        d = self.sizes[0]
        tuned = self.tuned_distances(encoded1[:, d:], encoded2[:, d:], distances)
        return distances.float() + self.weight * tuned


def _tensor_augmentation(data_config: dict):
    """The extractor's training augmentation (`labkit.data.make_transforms`: a mild random resized crop and
    a horizontal flip, no colour change) on one normalised (C, H, W) tensor."""
    import torchvision.transforms.v2 as T

    from labkit.data import TRAIN_CROP_RATIO, TRAIN_CROP_SCALE

    side = tuple(data_config["input_size"][-2:])
    crop = T.RandomResizedCrop(side, scale=TRAIN_CROP_SCALE, ratio=TRAIN_CROP_RATIO, antialias=True)
    return T.Compose([crop, T.RandomHorizontalFlip()])


def fit_tuned_reranker(
    model: TunedPairModel,
    train_images: Any,
    labels: Sequence[int] | np.ndarray,
    *,
    top_n: int = 5,
    list_size: int | None = None,
    epochs: int = 9,
    steps_per_epoch: int = 10,
    queries_per_step: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    margin: float = 0.2,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    val_results=None,
    val_images: Any = None,
    on_epoch: Any = None,
    on_step: Any = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[TunedPairModel, pd.DataFrame]:
    """Fine-tune `model.tuned` (the whole backbone) on the extractor's confusions among the train classes.

    `train_images`: the train split as a dataset (items with "input_tensors", evaluation transform) or an (N,
    C, H, W) tensor; `labels` (N,) its labels. Every train image is a query whose `list_size` (default 2 *
    top_n) nearest other train images under the frozen extractor form its list — the lists re-ranking will
    face. Every step takes `queries_per_step` lists, augments their images (`_tensor_augmentation`), and
    minimises, with the tuned copy's distances, a hinge ranking loss inside each list (every same-label
    neighbour nearer than every other-label one by `margin`) plus a batch-all triplet loss over the step's
    images (keeps the embedding's overall structure). An epoch is `steps_per_epoch` steps; all `epochs` are
    run and the last state is kept. The default length (`epochs`) and `TunedPairModel`'s weight tied best
    (with weight 0.5) among the fine-tuned settings within the extractor's CPU budget on class folds of the
    train split that neither the extractor nor this model trained on (`benchmarks/rerank.py
    --select-nested`); `queries_per_step`, `lr` and the losses were set on a separate development draw of
    "figures". Early stopping on a slice of one run's train classes proved too noisy to pick an epoch.

    With `val_results` (the extractor's validation `RetrievalResults`) and `val_images`, every epoch re-ranks
    the validation top_n for the history plot only: nothing is chosen by them. `on_epoch(epoch, model)` is
    called after every epoch (0 = before training; e.g. to measure held-out classes); `on_step(step,
    model)` after every optimiser step (1, 2, ...; e.g. to keep an average of the weights).

    On the CPU a seed gives the same weights run after run (the thread count fixed); on a GPU the list
    gather's backward is not deterministic.

    History: one row per epoch (0 = untrained = the baseline) with `step`, `loss` (mean over the epoch's
    steps), the validation metrics when given, and `chosen` (True on the last epoch); `history.attrs` holds
    `best_epoch` (the last), `encode_seconds`, `train_seconds`, `n_lists`.
    """
    if epochs < 0 or steps_per_epoch < 1 or queries_per_step < 1:
        raise ValueError(
            f"epochs must be >= 0, steps_per_epoch and queries_per_step >= 1; got epochs={epochs}, "
            f"steps_per_epoch={steps_per_epoch}, queries_per_step={queries_per_step}"
        )
    if val_results is not None and val_images is None:
        raise ValueError("val_results given without val_images (the images those results refer to)")
    labels_t = torch.as_tensor(np.asarray(labels)).long()
    if len(np.unique(labels_t.numpy())) < 2:
        raise ValueError("fit_tuned_reranker needs at least 2 train classes (lists need other-label items)")
    list_size = int(list_size or 2 * top_n)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    all_ids = torch.arange(len(labels_t))
    embedded = encode_items(model.extractor, train_images, all_ids, batch_size=batch_size, device=device)
    every = np.ones(len(labels_t), dtype=bool)
    queries, neighbours, _ = neighbour_lists(embedded, every, list_size)
    same = labels_t[neighbours] == labels_t[queries][:, None]
    encode_seconds = time.perf_counter() - started
    augment = _tensor_augmentation(model.data_config)
    optimizer = torch.optim.AdamW(model.tuned.parameters(), lr=lr, weight_decay=weight_decay)

    def measure(epoch: int, loss: float) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": epoch, "step": epoch * steps_per_epoch, "loss": loss}
        model.eval()
        if val_results is not None:
            kwargs = {"batch_size": batch_size, "device": device}
            val_encoded = encode_listed(model, val_results, val_images, top_n, **kwargs)
            row.update(_list_metrics(rerank_encoded(val_results, val_encoded, model, top_n)))
        if on_epoch is not None:
            on_epoch(epoch, model)
        return row

    history = [measure(0, float("nan"))]
    from tqdm.auto import tqdm

    for epoch in tqdm(range(1, epochs + 1), desc="epochs", disable=not progress, leave=False):
        model.to(device)  # encode_items (measure) hands the model back on the CPU
        losses = []
        for _ in range(steps_per_epoch):
            model.train()
            rows = torch.randperm(len(queries), generator=generator)[:queries_per_step]
            q, nb, s = queries[rows], neighbours[rows], same[rows]
            ids, inverse = torch.unique(torch.cat([q, nb.reshape(-1)]), return_inverse=True)
            images = torch.stack([augment(image) for image in _load_images(train_images, ids)]).to(device)
            z = model.tuned(images)
            # index_select, not z[index]: the latter's backward on CPU accumulates repeated rows in a
            # thread-dependent order (runs with the same seed differed); index_select's does not
            zq = z.index_select(0, inverse[: len(q)].to(device))
            zn = z.index_select(0, inverse[len(q) :].to(device)).view(len(q), nb.shape[1], -1)
            dist = (zq[:, None] - zn).norm(dim=-1)
            in_list = s[:, :, None] & ~s[:, None, :]  # [q, i, j]: neighbour i same label as q, j not
            hinge = nn.functional.relu(dist[:, :, None] - dist[:, None, :] + margin)[in_list.to(device)]
            batch_labels = labels_t[ids].to(device)
            d_all = torch.cdist(z, z)
            same_all = batch_labels[:, None] == batch_labels[None, :]
            positive = same_all & ~torch.eye(len(ids), dtype=torch.bool, device=device)
            triplets = positive[:, :, None] & ~same_all[:, None, :]
            batch_all = nn.functional.relu(d_all[:, :, None] - d_all[:, None, :] + margin)[triplets]
            loss = sum(part.mean() for part in (hinge, batch_all) if part.numel()) + z.sum() * 0
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step((epoch - 1) * steps_per_epoch + len(losses), model)
        model.eval()
        history.append(measure(epoch, float(np.mean(losses))))
    model.cpu().eval()
    frame = pd.DataFrame(history)
    frame["chosen"] = frame["epoch"] == epochs
    frame.attrs.update(
        best_epoch=int(epochs),
        encode_seconds=encode_seconds,
        train_seconds=time.perf_counter() - started,
        n_lists=int(len(queries)),
    )
    return model, frame


# -------------------------------------------------------------------------------- both corrections at once
# The tuned copy's weight in `CombinedPairModel.from_extractor`: the best of 0.5, 1 and 2 on held-out train
# classes (`benchmarks/rerank.py --select-nested --tuned-epochs 9`, the sixth round: criterion -0.0218,
# -0.0315, -0.0394; the head alone -0.0251).
COMBINED_TUNED_WEIGHT = 0.5
# Whether `CombinedPairModel.from_extractor` measures the fine-tuned copy's change on mirror-averaged
# embeddings (`TunedPairModel(flip=True)`): no; it lost the eighth round on held-out train classes
# (`benchmarks/rerank.py --select-flipped`: criterion -0.0195 at weight 0.5, -0.0280 at 1; the default
# -0.0191).
COMBINED_TUNED_FLIP = False
# How a `CombinedPairModel` orders a query's first results: None = by its score; "agree" = by its score only
# where its two models alone (the head: distance + correction; the copy: distance + weight x tuned distance)
# put the same item first, else the baseline order; "borda" = by the sum of the item's ranks under the two
# models alone, ties by its score. "agree" won the ninth round on held-out train classes
# (`benchmarks/rerank.py --select-consensus`: criterion -0.0086; "borda" -0.0212; ordering by the score, the
# default until then, -0.0191); the tenth round (`--select-depth`) kept it, first 5, against re-ordering the
# first 10, and the eleventh (`--select-copies`) against two averaged fine-tuned copies
# (benchmarks/RERANK_ROUNDS.md).
CONSENSUS_MODES = ("agree", "borda")
COMBINED_CONSENSUS: str | None = "agree"


def _check_consensus(mode: str) -> None:
    if mode not in CONSENSUS_MODES:
        raise ValueError(f"consensus={mode!r} is not one of {CONSENSUS_MODES} (or None)")


def consensus_scores(
    distances: Tensor, head_alone: Tensor, copy_alone: Tensor, combined: Tensor, mode: str
) -> Tensor:
    """(Q, n) scores that order each query's first n results (ascending; +inf where `distances` is padding)
    by a consensus of two models' scores of the same pairs (see `COMBINED_CONSENSUS`): "agree" returns
    `combined` where `head_alone` and `copy_alone` have the same argmin, else `distances`; "borda" the sum of
    each item's ranks under the two (0 = first), plus its rank under `combined` / n to break ties. Both
    return the order of `distances` when the two models keep it."""
    _check_consensus(mode)
    if mode == "agree":
        agree = head_alone.argmin(dim=1) == copy_alone.argmin(dim=1)
        scores = torch.where(agree[:, None], combined, distances)
    else:

        def ranks(values: Tensor) -> Tensor:  # 0 = first; ties keep the baseline order
            return torch.argsort(torch.argsort(values, dim=1, stable=True), dim=1).float()

        n = distances.shape[1]
        scores = ranks(head_alone) + ranks(copy_alone) + ranks(combined) / n
    return torch.where(torch.isfinite(distances), scores, torch.inf)


class CombinedPairModel(_EncodedPairModel):
    """score(a, b) = distance(a, b) + the `FeaturePairModel` head's correction + weight * the distance under a
    fine-tuned copy of the extractor (`TunedPairModel`'s): both second-stage models added to one score.

    Built from a `features` and a `tuned` model over the same extractor; `fit_combined_reranker` trains
    both. Untrained (zero heads, an identical copy) it scores every pair (1 + weight) * distance, so it
    reproduces the baseline order exactly. One flat vector per image (the feature model's encoding, then the
    tuned copy's embedding), so a gallery is encoded once. Same interface as the other two (`encode`,
    `embeddings`, `score`, `sizes`): `PairwiseReranker`, `rerank_encoded`, `save_pairwise` and `load_pairwise`
    take it. `consensus` ("agree", "borda"; None = by the score) makes `rerank_encoded` order each query's
    list by `consensus_scores` of `score_parts` instead of by `score` (`from_extractor`'s default:
    `COMBINED_CONSENSUS`); an untrained model still gives the baseline order.
    """

    def __init__(
        self, features: FeaturePairModel, tuned: TunedPairModel, *, consensus: str | None = None
    ) -> None:
        super().__init__()
        if consensus is not None:
            _check_consensus(consensus)
        if not isinstance(features, FeaturePairModel) or not isinstance(tuned, TunedPairModel):
            raise ValueError(
                "CombinedPairModel needs a FeaturePairModel and a TunedPairModel; got "
                f"{type(features).__name__} and {type(tuned).__name__}"
            )
        if features.extractor is not tuned.extractor:
            raise ValueError("the FeaturePairModel and the TunedPairModel must share one extractor object")
        self.features, self.tuned, self.consensus = features, tuned, consensus
        self.data_config = dict(features.data_config)
        self.sizes = [*features.sizes, *tuned.sizes[1:]]

    @classmethod
    def from_extractor(
        cls,
        extractor: nn.Module,
        *,
        weight: float = COMBINED_TUNED_WEIGHT,
        flip: bool = COMBINED_TUNED_FLIP,
        consensus: str | None = COMBINED_CONSENSUS,
        **feature_kwargs: Any,
    ) -> CombinedPairModel:
        """A `FeaturePairModel(extractor, **feature_kwargs)` and a `TunedPairModel(extractor, weight=weight,
        flip=flip)` over one extractor, ordered by `consensus` (defaults: see `COMBINED_TUNED_WEIGHT`,
        `COMBINED_TUNED_FLIP`, `COMBINED_CONSENSUS`)."""
        tuned = TunedPairModel(extractor, weight=weight, flip=flip)
        return cls(FeaturePairModel(extractor, **feature_kwargs), tuned, consensus=consensus)

    @property
    def extractor(self) -> nn.Module:
        return self.features.extractor

    @property
    def weight(self) -> float:
        return self.tuned.weight

    @property
    def config(self) -> dict[str, Any]:
        config = {"features": dict(self.features.config), "tuned": dict(self.tuned.config)}
        return config if self.consensus is None else {**config, "consensus": self.consensus}

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, F + D), or (B, F + 2 D) with the tuned model's `flip`: the feature model's encoding, then
        the tuned model's `encode_tuned`."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self.features.encode(images), self.tuned.encode_tuned(images)], dim=1)
        finally:
            self.train(was_training)

    def embeddings(self, encoded: Tensor) -> Tensor:
        """The extractor's embeddings inside encoded vectors."""
        return encoded[:, : self.sizes[0]]

    def score(self, encoded1: Tensor, encoded2: Tensor, distances: Tensor, head: int | None = None) -> Tensor:
        """(P,) `distances` + the head's correction (`head`: that head alone) + weight * tuned distances."""
        head_alone, weighted_tuned = self._parts(encoded1, encoded2, distances, head)
        return head_alone + weighted_tuned

    def score_parts(
        self, encoded1: Tensor, encoded2: Tensor, distances: Tensor, head: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(P,) each: the head alone's score (distance + correction), the copy alone's (distance + weight *
        tuned distance) and `score`'s: what `consensus_scores` compares."""
        head_alone, weighted_tuned = self._parts(encoded1, encoded2, distances, head)
        return head_alone, distances.float() + weighted_tuned, head_alone + weighted_tuned

    def _parts(self, encoded1: Tensor, encoded2: Tensor, distances: Tensor, head: int | None) -> tuple:
        split = sum(self.features.sizes)
        head_alone = self.features.score(encoded1[:, :split], encoded2[:, :split], distances, head)
        tuned = self.tuned.tuned_distances(encoded1[:, split:], encoded2[:, split:], distances)
        return head_alone, self.tuned.weight * tuned


def fit_combined_reranker(
    model: CombinedPairModel,
    train_images: Any,
    labels: Sequence[int] | np.ndarray,
    *,
    top_n: int = 5,
    feature_options: dict[str, Any] | None = None,
    tuned_options: dict[str, Any] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    val_results=None,
    val_images: Any = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[CombinedPairModel, pd.DataFrame]:
    """Fit `model.features` with `fit_feature_reranker`, then `model.tuned` with `fit_tuned_reranker`, each
    with its defaults updated by `feature_options` / `tuned_options` and the same `seed` (the two fits are
    independent: the result is that of fitting both models separately and adding their corrections).

    History: the feature head's epochs (0 = the baseline, `stage` "features", its loss in `loss`), then the
    fine-tuning epochs (`stage` "tuned", numbered on, its loss in `tuned_loss`) with the validation metrics of
    the combined model (its `consensus` order) when `val_results` and `val_images` are given — for the plot
    only; nothing is chosen by them. `chosen` marks the feature head's kept epoch and the last fine-tuning
    epoch; `history.attrs`: `best_epoch` (the head's), `tuned_epochs`, `folds`, `encode_seconds`,
    `train_seconds` (both fits).
    """
    common = {"top_n": top_n, "batch_size": batch_size, "device": device, "seed": seed, "progress": progress}
    validation = {"val_results": val_results, "val_images": val_images}
    _, first = fit_feature_reranker(
        model.features, train_images, labels, **validation, **common, **(feature_options or {})
    )
    metric_columns = [c for c in first.columns if c not in ("epoch", "loss", "chosen") and "/" not in c]
    combined_rows: list[dict[str, Any]] = []

    def measure(epoch: int, tuned: TunedPairModel) -> None:
        if val_results is None or val_images is None or epoch == 0:
            return
        encoded = encode_listed(model, val_results, val_images, top_n, batch_size=batch_size, device=device)
        combined_rows.append(
            {"epoch": epoch, **_list_metrics(rerank_encoded(val_results, encoded, model, top_n))}
        )

    _, second = fit_tuned_reranker(
        model.tuned, train_images, labels, on_epoch=measure, **common, **(tuned_options or {})
    )
    tuned = second[second["epoch"] > 0][["epoch", "loss", "chosen"]].rename(columns={"loss": "tuned_loss"})
    tuned = tuned.reset_index(drop=True)
    if combined_rows:
        tuned = tuned.merge(pd.DataFrame(combined_rows)[["epoch", *metric_columns]], on="epoch", how="left")
    last_feature_epoch = int(first["epoch"].max())
    tuned["epoch"] = tuned["epoch"] + last_feature_epoch
    history = pd.concat([first.assign(stage="features"), tuned.assign(stage="tuned")], ignore_index=True)
    history.attrs.update(
        best_epoch=first.attrs["best_epoch"],
        tuned_epochs=int(second.attrs["best_epoch"]),
        folds=first.attrs["folds"],
        encode_seconds=first.attrs["encode_seconds"] + second.attrs["encode_seconds"],
        train_seconds=first.attrs["train_seconds"] + second.attrs["train_seconds"],
    )
    return model.eval(), history
