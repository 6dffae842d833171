"""ViTExtractor against timm's own forward, hand-written attention, and a naive log-bin loop."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_extractor, tiny_vit
from vitdense import ViTExtractor, log_bin
from vitdense.errors import ConfigError, ImageError
from vitdense.extractor import interpolate_pos_embed


def random_batch(hgt: int, wid: int, bsz: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(bsz, 3, hgt, wid, generator=torch.Generator().manual_seed(seed))


def timm_qkv_hooks(model, layers):
    """Capture the raw qkv projections of ``layers`` while timm runs its own forward."""
    captured = {}
    handles = [model.blocks[l].attn.qkv.register_forward_hook(
        lambda mod, inp, out, l=l: captured.__setitem__(l, out.detach())) for l in layers]
    return captured, handles


@pytest.mark.parametrize("facet", ["key", "query", "value"])
def test_qkv_facets_equal_timm_forward_at_native_stride(facet):
    ext = tiny_extractor(stride=8)
    batch = random_batch(64, 64, bsz=2)
    captured, handles = timm_qkv_hooks(ext.model, [1, 3])
    with torch.no_grad():
        ext.model.forward_features(batch)
    for h in handles:
        h.remove()
    feats = ext.extract(batch, [1, -1], facet)
    heads, d = ext.num_heads, ext.embed_dim // ext.num_heads
    for layer, ours in [(1, feats.descriptors[1]), (3, feats.descriptors[-1])]:
        qkv = captured[layer].reshape(2, 65, 3, heads, d)[:, 1:]  # drop CLS
        part = qkv[:, :, ["query", "key", "value"].index(facet)]  # (B, T, heads, d)
        expected = part.permute(0, 1, 3, 2).reshape(2, 64, heads * d)  # channel = i * heads + j
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_token_facet_equals_timm_forward_features():
    ext = tiny_extractor(stride=8)
    batch = random_batch(64, 64, bsz=2, seed=1)
    with torch.no_grad():
        expected = ext.model.forward_features(batch)  # final norm applied by timm
    tokens = ext.extract(batch, -1, "token", include_cls=True).descriptors[-1]
    torch.testing.assert_close(ext.model.norm(tokens), expected, rtol=1e-5, atol=1e-5)


def test_position_embedding_exact_at_native_grid_and_resampled_otherwise():
    vit = tiny_vit(img=64)
    pos = vit.pos_embed[:, 1:].detach()
    assert interpolate_pos_embed(pos, (8, 8)) is pos
    out = interpolate_pos_embed(pos, (15, 22))
    assert out.shape == (1, 15 * 22, pos.shape[-1])
    # A position embedding that is constant over the grid stays constant after resampling.
    const = torch.ones(1, 64, 4) * 0.7
    torch.testing.assert_close(interpolate_pos_embed(const, (15, 22)), torch.full((1, 330, 4), 0.7))


def test_overlapping_patches_on_non_square_images():
    ext = tiny_extractor(stride=4)
    batch = random_batch(50, 77)
    feats = ext.extract(batch, 2, "key", saliency=True)
    grid = (1 + (50 - 8) // 4, 1 + (77 - 8) // 4)
    assert feats.num_patches == grid == ext.num_patches
    assert feats.descriptors[2].shape == (1, grid[0] * grid[1], ext.embed_dim)
    assert feats.saliency.shape == (1, grid[0] * grid[1])
    assert ext.load_size == (50, 77)
    # an image exactly one patch large has one token
    assert ext.extract(random_batch(8, 8), 0).descriptors[0].shape == (1, 1, ext.embed_dim)


def test_stride_that_does_not_divide_patch_is_rejected():
    with pytest.raises(ConfigError, match="divisor of the patch size 8"):
        tiny_extractor(stride=3)


def test_image_smaller_than_patch_is_rejected(tmp_path):
    ext = tiny_extractor()
    with pytest.raises(ImageError, match="smaller than one 8x8 patch"):
        ext.preprocess(np.zeros((6, 20, 3), np.uint8))


def test_several_layers_in_one_pass_equal_separate_calls():
    ext = tiny_extractor(stride=4)
    batch = random_batch(40, 48)
    together = ext.extract(batch, [0, 2, -1], "value").descriptors
    for layer in (0, 2, -1):
        alone = ext.extract_descriptors(batch, layer, "value")
        assert alone.shape[1] == 1
        torch.testing.assert_close(together[layer], alone[:, 0])
    torch.testing.assert_close(together[-1], ext.extract(batch, 3, "value").descriptors[3])
    concat = ext.extract_descriptors(batch, [0, 2], "value")
    assert concat.shape[-1] == 2 * ext.embed_dim


def test_saliency_equals_hand_computed_cls_attention():
    ext = tiny_extractor(stride=8)
    ext.saliency_heads = (0, 2)
    batch = random_batch(64, 72, seed=3)
    sal = ext.extract_saliency_maps(batch)
    # independent: run the blocks by hand, softmax(q k^T / sqrt(d)) of the last layer, CLS row
    model = ext.model
    with torch.no_grad():
        x = model.patch_embed.proj(batch).flatten(2).transpose(1, 2)
        pos = interpolate_pos_embed(model.pos_embed[:, 1:], (8, 9))
        x = torch.cat([model.cls_token + model.pos_embed[:, :1], x + pos], dim=1)
        for block in model.blocks[:-1]:
            x = block(x)
        last = model.blocks[-1]
        qkv = last.attn.qkv(last.norm1(x)).reshape(1, x.shape[1], 3, 3, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        attn = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        row = attn[0, [0, 2], 0, 1:].mean(0)
        expected = (row - row.min()) / (row.max() - row.min())
    torch.testing.assert_close(sal[0], expected, rtol=1e-4, atol=1e-5)


def naive_log_bin(desc: np.ndarray, hgt: int, wid: int) -> np.ndarray:
    """Per-token loops: level 0 = 3x3 single cells, level 1 = 3x3-averaged cells at offsets of 3."""
    tokens, dim = desc.shape
    grid = desc.reshape(hgt, wid, dim)

    def avg3(y: int, x: int) -> np.ndarray:  # mean over the in-grid cells of the 3x3 window at (y, x)
        cells = [grid[yy, xx] for yy in range(y - 1, y + 2) for xx in range(x - 1, x + 2)
                 if 0 <= yy < hgt and 0 <= xx < wid]
        return np.mean(cells, axis=0)

    out = np.zeros((tokens, 17 * dim), dtype=np.float64)
    for y in range(hgt):
        for x in range(wid):
            bins = []
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    bins.append(grid[min(max(y + dy, 0), hgt - 1), min(max(x + dx, 0), wid - 1)])
            for dy in (-3, 0, 3):
                for dx in (-3, 0, 3):
                    if dy == dx == 0:
                        continue
                    bins.append(avg3(min(max(y + dy, 0), hgt - 1), min(max(x + dx, 0), wid - 1)))
            out[y * wid + x] = np.concatenate(bins)
    return out


@pytest.mark.parametrize("hgt,wid", [(7, 9), (4, 4), (1, 5)])
def test_log_bin_equals_naive_loop(hgt, wid):
    rng = np.random.default_rng(hgt * wid)
    desc = rng.normal(size=(hgt * wid, 5)).astype(np.float32)
    ours = log_bin(torch.from_numpy(desc)[None], (hgt, wid))[0].numpy()
    np.testing.assert_allclose(ours, naive_log_bin(desc.astype(np.float64), hgt, wid), rtol=1e-5, atol=1e-5)


def test_binned_descriptors_through_extractor():
    ext = tiny_extractor(stride=4)
    batch = random_batch(40, 56)
    plain = ext.extract_descriptors(batch, 1, "key")[0, 0]
    binned = ext.extract_descriptors(batch, 1, "key", bin=True)[0, 0]
    hgt, wid = ext.num_patches
    expected = naive_log_bin(plain.double().numpy(), hgt, wid)
    np.testing.assert_allclose(binned.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_include_cls_prepends_cls_token_and_conflicts_with_bin():
    ext = tiny_extractor(stride=8)
    batch = random_batch(64, 64)
    with_cls = ext.extract_descriptors(batch, 1, "key", include_cls=True)
    without = ext.extract_descriptors(batch, 1, "key")
    assert with_cls.shape[2] == without.shape[2] + 1
    torch.testing.assert_close(with_cls[:, :, 1:], without)
    with pytest.raises(ConfigError):
        ext.extract_descriptors(batch, 1, "key", bin=True, include_cls=True)


def test_bad_layer_and_facet_are_rejected():
    ext = tiny_extractor()
    with pytest.raises(ConfigError, match="4 layers"):
        ext.extract(random_batch(16, 16), 4)
    with pytest.raises(ConfigError, match="facet"):
        ext.extract(random_batch(16, 16), 1, "attn")


def test_preprocess_resizes_shorter_side_and_normalises(photos):
    ext = tiny_extractor()
    batch, pil = ext.preprocess(photos["chelsea"], 100)  # chelsea is 300 x 451
    assert pil.size == (150, 100)
    assert batch.shape == (1, 3, 100, 150)
    raw = np.asarray(pil, np.float32) / 255.0
    expected = (raw[..., 0] - 0.485) / 0.229
    np.testing.assert_allclose(batch[0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_close_to_float32():
    vit = tiny_vit()
    ext32 = ViTExtractor("custom", stride=4, model=vit, device="cpu")
    ext16 = ViTExtractor("custom", stride=4, model=vit, device="cpu", dtype=torch.bfloat16)
    batch = random_batch(48, 48)
    a = ext32.extract(batch, 3, "key").descriptors[3]
    b = ext16.extract(batch, 3, "key").descriptors[3]
    assert F.cosine_similarity(a, b, dim=-1).min() > 0.98


def test_load_batch_stacks_equal_sizes_and_rejects_mixed(photos):
    ext = tiny_extractor()
    batch, pils = ext.load_batch([photos["chelsea"], photos["coffee"]], (64, 80))
    assert batch.shape == (2, 3, 64, 80) and len(pils) == 2
    with pytest.raises(ImageError, match="different sizes"):
        ext.load_batch([photos["chelsea"], photos["astronaut"]], 64)


def test_all_facet_layer_combinations_have_expected_dims():
    ext = tiny_extractor(stride=8)
    batch = random_batch(32, 32)
    for facet, layer in itertools.product(["key", "query", "value", "token"], [0, -1]):
        out = ext.extract_descriptors(batch, layer, facet)
        assert out.shape == (1, 1, 16, ext.embed_dim)


def _cubic_matrix(n_in: int, n_out: int, scale_factor: float) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bicubic resampling as PyTorch defines it for align_corners=False and a
    given scale factor: source x = (i + 0.5) / scale_factor - 0.5, Keys' cubic kernel with a = -0.75,
    indices clamped at the border."""
    a = -0.75

    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
        if d < 2:
            return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
        return 0.0

    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) / scale_factor - 0.5
        base = int(np.floor(x))
        for k in range(base - 1, base + 3):
            out[i, min(max(k, 0), n_in - 1)] += kernel(x - k)
    return out


def test_overlapping_patches_equal_a_plain_computation_with_dino_position_resampling():
    """Key facet of layer 0 at stride 4 on a non-square image, computed by hand: a strided convolution, the
    position embedding resampled as DINO and dino-vit-features do (bicubic, scale (h + 0.1)/√N, written out
    here with explicit cubic weights), LayerNorm and the qkv projection of the first block."""
    vit = tiny_vit(img=64).eval()
    ext = ViTExtractor("custom", stride=4, model=vit, device="cpu")
    batch = random_batch(56, 76)
    got = ext.extract(batch, 0, "key").descriptors[0][0]  # (T, D)
    h, w = 1 + (56 - 8) // 4, 1 + (76 - 8) // 4  # 13 x 18 tokens
    with torch.no_grad():
        proj = vit.patch_embed.proj
        patches = F.conv2d(batch, proj.weight, proj.bias, stride=4)[0].flatten(1).T.numpy()  # (T, D)
        pos = vit.pos_embed[0].numpy().astype(np.float64)
        side = int(round((pos.shape[0] - 1) ** 0.5))
        grid = pos[1:].reshape(side, side, -1)
        rows = _cubic_matrix(side, h, (h + 0.1) / side)
        cols = _cubic_matrix(side, w, (w + 0.1) / side)
        pos_patches = np.einsum("ys,stc,xt->yxc", rows, grid, cols).reshape(h * w, -1)
        cls = vit.cls_token[0].numpy() + pos[:1]
        x = torch.from_numpy(np.concatenate([cls, patches + pos_patches]).astype(np.float32))
        block = vit.blocks[0]
        y = F.layer_norm(x, (x.shape[-1],), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        qkv = y @ block.attn.qkv.weight.T + block.attn.qkv.bias
    dim, heads = x.shape[-1], block.attn.num_heads
    key = qkv[1:, dim:2 * dim].reshape(h * w, heads, dim // heads)  # patches only, (T, head, component)
    expected = key.permute(0, 2, 1).reshape(h * w, dim)  # channel = component * heads + head
    assert got.shape == expected.shape == (13 * 18, dim)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
