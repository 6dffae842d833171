"""CLS attention maps (vitdense.attention) against attention computed plainly from a block's qkv weights, with
and without register tokens; keep_mass against DINO's ascending-cumsum threshold."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from vitdense import ViTExtractor, attention_maps, create_vit, keep_mass


def test_keep_mass_matches_dino_attention_threshold():
    """Independent: DINO's visualize_attention keeps, after an ascending sort, the tokens whose cumulative
    normalised mass exceeds 1 - keep."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = rng.random(200) ** 3
        keep = float(rng.uniform(0.2, 0.9))
        order = np.argsort(values)
        cum = np.cumsum(values[order] / values.sum())
        expected = np.zeros(200, bool)
        expected[order[cum > 1 - keep]] = True
        assert np.array_equal(keep_mass(values, keep), expected)
    assert keep_mass(np.zeros(5), 0.6).sum() == 0


@lru_cache(maxsize=None)  # built once per test session (the extractor only reads it)
def _tiny(reg_tokens: int, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dict(embed_dim=96, depth=4, num_heads=3, img_size=64, patch_size=8)
    if reg_tokens:  # as DINOv2 with registers: no position embedding on the prefix tokens
        kwargs.update(reg_tokens=reg_tokens, no_embed_class=True)
    return create_vit("vit_small_patch8_224", **kwargs).eval()


def _plain_cls_attention(model, image: torch.Tensor, layer: int) -> torch.Tensor:
    """(heads, T) CLS attention of ``layer`` from timm's own forward up to the block's input, then the block's
    LayerNorm and qkv weights, a per-head softmax over all tokens, prefix columns dropped."""
    captured = {}
    handle = model.blocks[layer].register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model.forward_features(image)
    handle.remove()
    block = model.blocks[layer]
    x = block.norm1(captured["x"])[0]  # (N, D)
    dim = x.shape[-1]
    heads = block.attn.num_heads
    d = dim // heads
    qkv = x @ block.attn.qkv.weight.T + block.attn.qkv.bias  # (N, 3 D), columns: q | k | v, head-major
    n_prefix = 1 + getattr(model, "num_reg_tokens", 0)
    out = []
    for h in range(heads):
        q = qkv[0, h * d:(h + 1) * d]  # the CLS token's query
        k = qkv[:, dim + h * d: dim + (h + 1) * d]
        logits = (k @ q) / np.sqrt(d)
        weights = torch.exp(logits - logits.max())
        out.append((weights / weights.sum())[n_prefix:])
    return torch.stack(out)


@pytest.mark.parametrize("reg_tokens", [0, 4])
@pytest.mark.parametrize("layer", [1, -1])
def test_attention_maps_match_plain_computation(reg_tokens, layer):
    model = _tiny(reg_tokens)
    extractor = ViTExtractor("custom", stride=8, model=model, device="cpu")
    assert extractor.num_prefix == 1 + reg_tokens
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    maps = attention_maps(extractor, image, layer)
    assert len(maps) == 2
    for b in range(2):
        expected = _plain_cls_attention(model, image[b:b + 1], layer % 4).numpy()
        assert maps[b].heads.shape == (3, 8, 8) and maps[b].grid == (8, 8) and maps[b].layer == layer % 4
        np.testing.assert_allclose(maps[b].heads.reshape(3, -1), expected, rtol=1e-4, atol=1e-6)
        # what the heads do not give the patches went to CLS and the registers
        np.testing.assert_allclose(maps[b].prefix_mass, 1 - expected.sum(axis=1), atol=1e-5)
        np.testing.assert_allclose(maps[b].mean, expected.mean(axis=0).reshape(8, 8), rtol=1e-4, atol=1e-6)


def test_masks_keep_the_mass_of_each_head():
    extractor = ViTExtractor("custom", stride=4, model=_tiny(4, seed=3), device="cpu")
    maps = attention_maps(extractor, torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(2)))[0]
    assert maps.grid == (11, 15) and maps.load_size == (48, 64)
    masks = maps.masks(0.6)
    for head, mask in zip(maps.heads, masks):
        total = head.sum()
        kept = np.sort(head[mask])
        assert kept.sum() >= 0.6 * total - 1e-6  # holds the mass ...
        assert kept.sum() - kept[0] < 0.6 * total  # ... and no token could be dropped
        assert head[mask].min() >= head[~mask].max()  # the largest values
    assert np.array_equal(maps.mean_mask(0.6), keep_mass(maps.mean, 0.6).reshape(maps.grid))


def test_last_layer_mean_is_the_extractor_saliency():
    """The extractor's saliency is the mean CLS attention of the last layer over its saliency heads,
    min-max scaled: the same numbers from the other code path (at stride 4, resampled position embedding)."""
    extractor = ViTExtractor("custom", stride=4, model=_tiny(0, seed=5), device="cpu", saliency_heads=(0, 2))
    image = torch.randn(1, 3, 56, 72, generator=torch.Generator().manual_seed(3))
    maps = attention_maps(extractor, image)[0]
    sal = extractor.extract(image, [], saliency=True).saliency[0].numpy()
    mean = maps.heads[[0, 2]].mean(axis=0).reshape(-1)
    np.testing.assert_allclose((mean - mean.min()) / (mean.max() - mean.min()), sal, atol=1e-5)


def test_model_without_cls_token_is_a_user_error():
    from vitdense import ConfigError

    torch.manual_seed(0)
    model = create_vit("vit_small_patch8_224", embed_dim=96, depth=2, num_heads=3, img_size=64, patch_size=8,
                       class_token=False, global_pool="avg")
    extractor = ViTExtractor("custom", stride=8, model=model, device="cpu")
    with pytest.raises(ConfigError, match="no CLS token"):
        attention_maps(extractor, torch.zeros(1, 3, 64, 64))
