"""The backbone shipped inside the package: registered as the offline default, loads offline, fp16 within the size
limit, its metadata rebuilds the architecture, and its features carry more than a random network's."""
from __future__ import annotations


import pytest
import torch
from click.testing import CliRunner

from vitdense import ViTExtractor, create_vit
from vitdense.backbones import MODELS, WEIGHTS_DIR, bundled_model_name, default_model_name, read_weights
from vitdense.cli import main

BUNDLED = WEIGHTS_DIR / "vitdense_vits8.safetensors"
pytestmark = pytest.mark.skipif(not BUNDLED.exists(), reason="bundled weights not in this checkout")


def test_bundled_backbone_is_the_offline_default_and_listed():
    assert default_model_name() == "auto" and bundled_model_name() == "vitdense_vits8"
    assert MODELS["vitdense_vits8"].bundled_file == BUNDLED.name
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0 and "vitdense_vits8" in result.output and "bundled" in result.output
    assert result.output.startswith("* auto ") and "else vitdense_vits8 (bundled" in result.output


def test_bundled_file_is_fp16_and_small_with_a_recipe():
    assert BUNDLED.stat().st_size <= 50 * 2**20
    state, meta = read_weights(BUNDLED)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert meta["arch"] == "vit_small_patch8_224" and "python -m pretrain" in meta["recipe"]


def test_default_extractor_loads_offline_and_extracts(photos, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ext = ViTExtractor("vitdense_vits8", stride=4, device="cpu")
    assert ext.model_type == "vitdense_vits8" and ext.p == 8
    batch, _ = ext.preprocess(photos["chelsea"], load_size=64)
    desc = ext.extract_descriptors(batch, layer=11, facet="key")
    h, w = ext.num_patches
    assert desc.shape == (1, 1, h * w, 384) and torch.isfinite(desc).all()
    saliency = ext.extract_saliency_maps(batch)
    assert saliency.shape == (1, h * w) and float(saliency.max()) == pytest.approx(1.0)


def test_bundled_weights_are_trained_not_random():
    """The teacher's weights differ from timm's initialisation statistics: trained, not a placeholder."""
    state, meta = read_weights(BUNDLED)
    torch.manual_seed(0)
    fresh = create_vit(meta["arch"], **meta["kwargs"]).state_dict()
    qkv = "blocks.0.attn.qkv.weight"
    assert state[qkv].shape == fresh[qkv].shape
    assert not torch.allclose(state[qkv].float(), fresh[qkv], atol=1e-2)
    # timm initialises the CLS token at std 1e-6; DINO training moves it by orders of magnitude
    assert fresh["cls_token"].std() < 1e-5 < 1e-4 < state["cls_token"].float().std()
