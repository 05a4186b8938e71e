"""Feature extractors: any timm backbone, an optional linear projection and L2 normalisation.

Weights come from random initialisation, timm's pretrained weights on the Hugging Face hub, or a local file
(a ``.pth``/``.safetensors`` state dict, a labkit export made by :func:`save_extractor`, or a Lightning
checkpoint written by :mod:`labkit.training`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

EXPORT_FORMAT = "labkit.extractor"
EXPORT_VERSION = 1
CHECKPOINT_CONFIG_KEY = (
    "extractor_config"  # key of the extractor config in a labkit Lightning checkpoint's hparams
)

#: Names used by open-metric-learning (OML) for timm backbones.
BACKBONE_ALIASES: dict[str, str] = {
    "vits16_dino": "vit_small_patch16_224.dino",
    "vits8_dino": "vit_small_patch8_224.dino",
    "vitb16_dino": "vit_base_patch16_224.dino",
    "vitb8_dino": "vit_base_patch8_224.dino",
}


class HubUnavailableError(RuntimeError):
    """Pretrained weights were asked for but the model hub cannot be reached (and they are not cached)."""


class Extractor(nn.Module):
    """A timm backbone's pooled features (``num_classes=0``), an optional projection, L2 normalisation."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        backbone_name: str,
        embedding_size: int | None = None,
        normalize: bool = True,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_name = backbone_name
        self.normalize = normalize
        self.image_size = image_size
        self.feature_size = int(backbone.num_features)
        self.projection = nn.Linear(self.feature_size, embedding_size) if embedding_size else None
        self.embedding_size = int(embedding_size) if embedding_size else self.feature_size
        data_config = dict(resolve_data_config({}, model=backbone))
        if image_size:
            data_config["input_size"] = (3, int(image_size), int(image_size))
        self.data_config: dict[str, Any] = data_config

    @property
    def config(self) -> dict[str, Any]:
        """Arguments of :func:`create_extractor` that rebuild this architecture (weights aside)."""
        return {
            "backbone": self.backbone_name,
            "embedding_size": self.embedding_size if self.projection is not None else None,
            "normalize": self.normalize,
            "image_size": self.image_size,
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        if self.projection is not None:
            features = self.projection(features)
        if self.normalize:
            features = F.normalize(features, p=2, dim=1)
        return features

    def transforms(self, train: bool = False):
        """Image transform for this extractor (timm's data config; augmentations when ``train``)."""
        from labkit.data import make_transforms

        return make_transforms(self.data_config, train=train)

    def extra_repr(self) -> str:
        return f"backbone_name={self.backbone_name!r}, embedding_size={self.embedding_size}"


def resolve_backbone_name(backbone: str) -> str:
    """Map OML aliases (``vits16_dino``) to timm names; raise ValueError for names timm does not know."""
    name = BACKBONE_ALIASES.get(backbone, backbone)
    if not timm.is_model(name):
        raise ValueError(
            f"Unknown backbone {backbone!r}: not a timm model name nor one of the aliases "
            f"{sorted(BACKBONE_ALIASES)}. List candidates with timm.list_models('{backbone.split('_')[0]}*')."
        )
    return name


def create_extractor(
    backbone: str = "resnet18",
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    embedding_size: int | None = None,
    normalize: bool = True,
    image_size: int | None = None,
) -> Extractor:
    """Build an :class:`Extractor` from a timm backbone name.

    ``pretrained=True`` downloads timm's weights from the hub (or uses the local hub cache); offline this
    raises :class:`HubUnavailableError`. ``weights`` loads a local file instead: a backbone state dict
    (``.pth``, ``.safetensors``; a classifier head in it is ignored), a labkit export or Lightning checkpoint.

    ``image_size`` sets the input size of the data config (and of fixed-size models such as ViTs).
    """
    if pretrained and weights:
        raise ValueError("Pass either pretrained=True (hub weights) or weights=<local file>, not both.")
    if embedding_size is not None and int(embedding_size) <= 0:
        raise ValueError(f"embedding_size must be a positive integer or None, got {embedding_size!r}.")
    if image_size is not None and int(image_size) <= 0:
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}.")
    name = resolve_backbone_name(backbone)
    model = _create_backbone(name, pretrained=pretrained, image_size=image_size)
    extractor = Extractor(
        model,
        backbone_name=name,
        embedding_size=int(embedding_size) if embedding_size else None,
        normalize=normalize,
        image_size=int(image_size) if image_size else None,
    )
    if weights:
        state_dict, _ = _read_weights(weights)
        _load_weights(extractor, state_dict, source=str(weights))
    return extractor


def _create_backbone(name: str, *, pretrained: bool, image_size: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": 0}
    cfg = timm.get_pretrained_cfg(name)
    if image_size and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = int(image_size)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    host = _weights_host(cfg)
    offline = _hub_offline_mode() or not _reachable(host)
    try:
        with _forced_hub_offline(offline):
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as error:
        if _is_network_error(error):
            raise HubUnavailableError(_hub_message(name, host)) from error
        raise


def _hub_message(name: str, host: str) -> str:
    return (
        f"Could not get pretrained weights for {name!r}: the model hub ({host}) could not be reached "
        "(no internet connection, or HF_HUB_OFFLINE is set) and the weights are not in the local cache. "
        'Pass a local weights file instead, e.g. create_extractor(..., weights="path/to/file.safetensors") '
        '(the notebooks\' parameter weights="path/to/file.safetensors"; a .pth or .safetensors state dict, '
        "or a labkit extractor export/checkpoint), or use pretrained=False for random initialisation."
    )


def _weights_host(cfg: Any) -> str:
    from huggingface_hub import constants

    if cfg is not None and not getattr(cfg, "hf_hub_id", None) and getattr(cfg, "url", None):
        return urlparse(cfg.url).netloc or "the weights URL"
    return urlparse(constants.ENDPOINT).netloc or str(constants.ENDPOINT)


def _hub_offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` (``name[:port]``, https by default) opens within ``timeout``."""
    hostname, _, port = host.partition(":")
    try:
        with socket.create_connection((hostname, int(port or 443)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _forced_hub_offline(offline: bool) -> Iterator[None]:
    """Make huggingface_hub use its local cache only (no retries against an unreachable hub)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _is_network_error(error: BaseException) -> bool:
    for e in (error, error.__cause__, error.__context__):
        if e is None:
            continue
        module = type(e).__module__.split(".")[0]
        if isinstance(e, OSError) or module in {
            "huggingface_hub",
            "httpx",
            "httpcore",
            "requests",
            "urllib3",
        }:
            return True
    return False


# ------------------------------------------------------------------------------------------- weights files


def _read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """State dict and (for labkit exports/checkpoints) extractor config of a weights file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        config = json.loads(metadata["labkit_config"]) if "labkit_config" in metadata else None
        return load_file(str(path), device="cpu"), config
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"Could not read weights file {str(path)!r} as a torch state dict ({error}). "
            "Save plain tensors (torch.save(model.state_dict(), path)) or use a .safetensors file."
        ) from error
    if not isinstance(obj, Mapping):
        raise ValueError(f"Weights file {str(path)!r} holds a {type(obj).__name__}, not a state dict.")
    if obj.get("format") == EXPORT_FORMAT:
        return dict(obj["state_dict"]), dict(obj["config"])
    hparams = obj.get("hyper_parameters") or {}
    if "state_dict" in obj and CHECKPOINT_CONFIG_KEY in hparams:
        prefix = "extractor."
        state = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        return state, dict(hparams[CHECKPOINT_CONFIG_KEY])
    for key in ("state_dict", "model", "teacher", "state_dict_ema"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"Weights file {str(path)!r} holds no tensors.")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state, None


def _load_weights(extractor: Extractor, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Load a full-extractor state dict (keys ``backbone.*``) or a bare backbone state dict."""
    if any(k.startswith("backbone.") for k in state_dict):
        module: nn.Module = extractor
        target = "extractor"
    else:
        module = extractor.backbone
        state_dict = _adapt_backbone_state(extractor.backbone, state_dict)
        target = f"{extractor.backbone_name} backbone"
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"Weights file {source!r} does not fit the {target}: missing keys {_few(missing)}, "
            f"unexpected keys {_few(unexpected)}, keys with other shapes {_few(mismatched)}. Check backbone= "
            "and embedding_size= (a labkit export is rebuilt exactly by labkit.models.load_extractor(path))."
        )
    module.load_state_dict(state_dict, strict=True)


def _adapt_backbone_state(
    backbone: nn.Module, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apply timm's checkpoint filter (e.g. ViT position-embedding resampling); drop classifier keys."""
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):
        state_dict = filter_fn(state_dict, backbone)
    own = backbone.state_dict()
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return {
        k: v
        for k, v in state_dict.items()
        if k in own or not any(k == h or k.startswith(h + ".") for h in heads)
    }


def _few(keys: list[str], n: int = 5) -> str:
    keys = list(keys)
    return (
        "[]"
        if not keys
        else "[" + ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "") + "]"
    )


def save_extractor(extractor: Extractor, path: str | Path, *, overwrite: bool = False) -> Path:
    """Export extractor-only weights and the config rebuilding it (``.pt``/``.pth`` or ``.safetensors``)."""
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in extractor.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(
            state,
            str(path),
            metadata={"labkit_config": json.dumps(extractor.config), "format": EXPORT_FORMAT},
        )
    else:
        payload = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "config": extractor.config,
            "state_dict": state,
            "fingerprint": fingerprint(extractor),
        }
        torch.save(payload, path)
    return path


def load_extractor(path: str | Path) -> Extractor:
    """Rebuild an extractor from a labkit export (:func:`save_extractor`) or a labkit Lightning checkpoint."""
    state_dict, config = _read_weights(path)
    if config is None:
        raise ValueError(
            f"{str(path)!r} is not a labkit extractor export or checkpoint (no extractor config in it). "
            "For a plain backbone state dict use create_extractor(backbone, weights=path)."
        )
    extractor = create_extractor(**config)
    _load_weights(extractor, state_dict, source=str(path))
    return extractor


def fingerprint(extractor: Extractor) -> str:
    """sha256 over the config and every state-dict tensor (dtype, shape, bytes); stable across save/load."""
    digest = hashlib.sha256(json.dumps(extractor.config, sort_keys=True).encode())
    for key, tensor in sorted(extractor.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def embed(
    extractor: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Embeddings (N, D) float32 on the CPU, in dataset order (extractor in eval mode meanwhile)."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    was_training = extractor.training
    extractor.eval()
    extractor.to(device)
    chunks = []
    try:
        for batch in tqdm(loader, desc="embed", disable=not progress, leave=False):
            chunks.append(extractor(batch_images(batch).to(device)).float().cpu())
    finally:
        extractor.train(was_training)
    if not chunks:
        raise ValueError("embed() got an empty dataset.")
    return torch.cat(chunks)


def batch_images(batch: Any) -> torch.Tensor:
    """Images of a batch: ``input_tensors`` of a labkit dict batch, the first item of a tuple, or a tensor."""

    if isinstance(batch, Mapping):
        return batch["input_tensors"]
    if isinstance(batch, list | tuple):
        return batch[0]
    return batch
