"""Extractor creation, weights files, export round trip, offline hub error and embedding."""

from __future__ import annotations

import time

import pytest
import torch

from labkit import models
from labkit.data import load_image, validation_dataset
from labkit.models import (
    Extractor,
    HubUnavailableError,
    create_extractor,
    embed,
    fingerprint,
    load_extractor,
    save_extractor,
)

IMAGES = torch.rand(3, 3, 32, 32)


def outputs(extractor: Extractor, images: torch.Tensor = IMAGES) -> torch.Tensor:
    extractor.eval()
    with torch.no_grad():
        return extractor(images)


def test_default_extractor_is_normalised_resnet18_features():
    torch.manual_seed(0)
    extractor = create_extractor(image_size=32)
    assert extractor.backbone_name == "resnet18" and extractor.embedding_size == 512
    assert extractor.data_config["input_size"] == (3, 32, 32)
    assert extractor.config == {
        "backbone": "resnet18",
        "embedding_size": None,
        "normalize": True,
        "image_size": 32,
    }
    out = outputs(extractor)
    assert out.shape == (3, 512)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_projection_and_no_normalisation():
    extractor = create_extractor("resnet18", embedding_size=16, normalize=False, image_size=32)
    out = outputs(extractor)
    assert out.shape == (3, 16) and extractor.embedding_size == 16
    assert not torch.allclose(out.norm(dim=1), torch.ones(3))
    features = extractor.backbone(IMAGES)
    assert torch.allclose(out, extractor.projection(features), atol=1e-6)


def test_oml_alias_gives_timm_dino_vit_at_the_asked_size():
    extractor = create_extractor("vits16_dino", image_size=32)
    assert extractor.backbone_name == "vit_small_patch16_224.dino"
    assert extractor.data_config["input_size"] == (3, 32, 32)
    assert outputs(extractor, torch.rand(1, 3, 32, 32)).shape == (1, 384)


def test_unknown_backbone_names_it():
    with pytest.raises(ValueError, match="'resnet_nope'"):
        create_extractor("resnet_nope")


def test_transforms_follow_the_data_config(figures_df):
    extractor = create_extractor(image_size=40)
    dataset = validation_dataset(figures_df, extractor.transforms())
    assert dataset[0]["input_tensors"].shape == (3, 40, 40)
    image = load_image(dataset.paths[0])
    assert extractor.transforms(train=True)(image).shape == (3, 40, 40)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_backbone_weights_file_is_loaded_and_classifier_head_ignored(tmp_path, suffix):
    torch.manual_seed(1)
    source = create_extractor(image_size=32)
    state = dict(source.backbone.state_dict())
    state["fc.weight"], state["fc.bias"] = (
        torch.zeros(1000, 512),
        torch.zeros(1000),
    )  # a timm checkpoint's head
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    torch.manual_seed(2)
    loaded = create_extractor(weights=path, image_size=32)
    assert torch.equal(outputs(loaded), outputs(source))


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(create_extractor("resnet10t").backbone.state_dict(), path)
    with pytest.raises(ValueError, match=r"other\.pth.*resnet18 backbone"):
        create_extractor("resnet18", weights=path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_extractor(weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="not both"):
        create_extractor(pretrained=True, weights=path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_round_trip_gives_identical_embeddings(tmp_path, suffix):
    torch.manual_seed(3)
    extractor = create_extractor(embedding_size=8, image_size=32)
    path = save_extractor(extractor, tmp_path / f"extractor{suffix}")
    reloaded = load_extractor(path)
    assert reloaded.config == extractor.config
    assert torch.equal(outputs(reloaded), outputs(extractor))
    assert fingerprint(reloaded) == fingerprint(extractor)
    # also usable as `weights=` of create_extractor with the same architecture
    again = create_extractor(embedding_size=8, image_size=32, weights=path)
    assert fingerprint(again) == fingerprint(extractor)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_extractor(extractor, path)


def test_fingerprint_changes_with_weights_and_config():
    torch.manual_seed(4)
    extractor = create_extractor(image_size=32)
    before = fingerprint(extractor)
    assert fingerprint(extractor) == before
    with torch.no_grad():
        extractor.backbone.conv1.weight[0, 0, 0, 0] += 1.0
    assert fingerprint(extractor) != before
    extractor.normalize = False
    assert len({before, fingerprint(extractor)}) == 2


def test_load_extractor_refuses_a_plain_state_dict(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(create_extractor().backbone.state_dict(), path)
    with pytest.raises(ValueError, match=r"plain\.pth.*not a labkit extractor.*weights=path"):
        load_extractor(path)


def _assert_fast_hub_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # no cached weights
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError) as error:
        create_extractor("resnet18", pretrained=True)
    assert time.perf_counter() - start < 20
    message = str(error.value)
    assert "could not be reached" in message
    assert 'weights="path/to/file.safetensors"' in message


def test_offline_hub_fails_fast_with_a_local_file_hint(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _assert_fast_hub_error(monkeypatch, tmp_path)


def test_unreachable_hub_fails_fast_with_a_local_file_hint(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    _assert_fast_hub_error(monkeypatch, tmp_path)
    assert models._reachable("127.0.0.1:9", timeout=1.0) is False


def test_embed_keeps_dataset_order_and_mode(figures_df):
    torch.manual_seed(5)
    extractor = create_extractor(embedding_size=4, image_size=32)
    dataset = validation_dataset(figures_df, extractor.transforms())
    extractor.train()
    embeddings = embed(extractor, dataset, batch_size=5, progress=False)
    assert extractor.training
    assert embeddings.shape == (len(dataset), 4) and embeddings.dtype == torch.float32
    direct = outputs(extractor, torch.stack([dataset[i]["input_tensors"] for i in (0, 7, len(dataset) - 1)]))
    assert torch.allclose(embeddings[[0, 7, len(dataset) - 1]], direct, atol=1e-5)
