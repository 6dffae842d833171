"""What the CLS token looks at: per-head attention maps of a ViT layer and the masks that keep a fraction of
their mass (the pictures of the DINO paper, Caron et al. 2021, fig. 1 and 3, and of facebookresearch/dino's
``visualize_attention.py`` / ``video_generation.py``).

Shapes:
    B  images in a batch      heads  attention heads      N = P + T  tokens of the sequence
    P  prefix tokens (CLS first, then registers or other extra tokens)     T = h * w  patch tokens

The attention of the CLS token is the softmax of its query against the keys of *all* N tokens (registers
included: they take part in the softmax as in the network's own forward pass); the map keeps the T patch
columns. Only the CLS row is computed, (B, heads, 1, N), never the (N, N) matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

DINO_KEEP = 0.6  # fraction of the attention mass kept by the masks of the DINO paper (sec. 4.2.2, fig. 3)


def keep_mass(values: np.ndarray, keep: float) -> np.ndarray:
    """Boolean mask of the largest values whose sum is the first to reach ``keep`` of the total (as DINO's
    attention masks: the smallest set of tokens holding that fraction of the mass). values: (T,) >= 0."""
    v = np.clip(np.asarray(values, dtype=np.float64).reshape(-1), 0, None)
    total = v.sum()
    if total <= 0:
        return np.zeros(v.shape, bool)
    order = np.argsort(-v, kind="stable")
    before = np.cumsum(v[order]) - v[order]  # mass of the strictly larger tokens
    out = np.zeros(v.shape, bool)
    out[order[before < keep * total]] = True
    return out


def cls_attention(q: torch.Tensor, k: torch.Tensor, num_prefix: int, scale: float | None = None) -> torch.Tensor:
    """Attention of the CLS token (token 0) to the patch tokens, per head.

    q, k: (B, heads, N, d) queries and keys of one attention layer (after any q/k normalisation); the
    first ``num_prefix`` tokens are CLS and the other prefix tokens. scale: the layer's logit scale
    (default d^-0.5). Returns (B, heads, T) float32: softmax over all N tokens, prefix columns dropped, so a
    row sums to 1 minus the mass given to the prefix tokens.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)  # (B, heads, 1, N)
    return logits.softmax(dim=-1)[:, :, 0, num_prefix:]


@dataclass
class AttentionMaps:
    """CLS attention of one layer for one image.

    heads: (heads, h, w) float32, each head's attention to the patch tokens (softmax over all tokens, so
    it sums to at most 1); layer: the 0-based layer; grid: (h, w); load_size: (H, W) of the resized image;
    prefix_mass: (heads,) attention each head gives to the prefix tokens (CLS itself and registers).
    """

    heads: np.ndarray
    layer: int
    grid: tuple[int, int]
    load_size: tuple[int, int]
    prefix_mass: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """(h, w) mean of the heads (the map of DINO's ``video_generation.py``)."""
        return self.heads.mean(axis=0)

    def masks(self, keep: float = DINO_KEEP) -> np.ndarray:
        """(heads, h, w) bool: per head, the fewest tokens holding ``keep`` of its attention mass."""
        return np.stack([keep_mass(m, keep).reshape(self.grid) for m in self.heads])

    def mean_mask(self, keep: float = DINO_KEEP) -> np.ndarray:
        """(h, w) bool: the fewest tokens holding ``keep`` of the mean map's mass."""
        return keep_mass(self.mean, keep).reshape(self.grid)


def check_keep(keep: float) -> float:
    """``keep`` if it is a fraction in (0, 1], else a ConfigError naming --keep."""
    if not 0 < keep <= 1:
        raise ConfigError.argument("keep", keep, "must be a fraction of the attention mass in (0, 1], e.g. 0.6")
    return keep


@torch.inference_mode()
def attention_maps(extractor: Any, batch: torch.Tensor, layer: int = -1) -> list[AttentionMaps]:
    """Per-head CLS attention maps of ``layer`` (negative counts from the end) for a (B, 3, H, W) batch of
    normalised images, one :class:`AttentionMaps` per image.

    ``extractor``: a :class:`vitdense.ViTExtractor`; its stride, position-embedding resampling and prefix
    tokens are used, and the forward pass stops at ``layer``'s attention. ConfigError for a model without
    a CLS token or a layer out of range.
    """
    if not extractor.has_cls:
        raise ConfigError(f"model {extractor.model_type} has no CLS token: attention maps need one")
    idx = extractor.layer_index(layer)
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ConfigError(f"expected a (B, 3, H, W) batch, got {tuple(batch.shape)}")
    batch = batch.to(extractor.device, torch.float32)
    autocast = torch.autocast(extractor.device.type, dtype=extractor.dtype,
                              enabled=extractor.dtype != torch.float32)
    with autocast:
        x, grid = extractor._tokens(batch)
        for block in extractor.model.blocks[:idx]:
            x = block(x)
        block = extractor.model.blocks[idx]
        q, k, _ = extractor._qkv(block, x)
    attn = cls_attention(q, k, extractor.num_prefix, getattr(block.attn, "scale", None)).cpu()
    prefix_mass = 1.0 - attn.sum(dim=-1)
    load_size = (int(batch.shape[-2]), int(batch.shape[-1]))
    extractor.load_size, extractor.num_patches = load_size, grid
    return [AttentionMaps(a.reshape(-1, *grid).numpy(), idx, grid, load_size, pm.numpy())
            for a, pm in zip(attn, prefix_mass)]
