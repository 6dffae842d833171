"""Run dino-vit-features (the peer) on our weights, offline, for side-by-side benchmarks.

The peer builds its models with ``torch.hub.load('facebookresearch/dino:main', ...)``, which needs the
network. :func:`import_peer` imports a local checkout of it (``--peer PATH``; never committed here) and
replaces that factory with one returning :class:`DinoStyleViT`, a wrapper that gives a timm ViT the
interface of the official DINO ``VisionTransformer`` the peer patches: an int ``patch_embed.patch_size``,
a forward that calls ``self.interpolate_pos_encoding(x, w, h)``, and non-fused attention (the peer reads
attention maps from ``attn_drop``'s output, as the official model computes them).
"""
from __future__ import annotations

import copy
import importlib
import sys
import types
from pathlib import Path

import torch
from torch import nn


class DinoStyleViT(nn.Module):
    """A timm VisionTransformer (deep-copied) behind the official DINO ViT's forward and attributes."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        vit = copy.deepcopy(vit)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = vit.patch_embed.proj
        self.patch_embed.patch_size = int(vit.patch_embed.patch_size[0])
        self.cls_token, self.pos_embed = vit.cls_token, vit.pos_embed
        self.blocks, self.norm = vit.blocks, vit.norm
        for block in self.blocks:
            block.attn.fused_attn = False  # the official model materialises the attention matrix

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        return self.pos_embed  # native size only; the peer installs its own version for other strides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, _, w, h = x.shape  # the official code calls the height "w"
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(bsz, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def import_peer(peer_path: str | Path, vit: nn.Module, module: str = "extractor") -> types.ModuleType:
    """Import ``module`` from a dino-vit-features checkout, its models built from ``vit``'s weights."""
    peer_path = Path(peer_path).resolve()
    if not (peer_path / "extractor.py").is_file():
        raise SystemExit(f"--peer {peer_path}: not a dino-vit-features checkout (no extractor.py)")
    if str(peer_path) not in sys.path:
        sys.path.insert(0, str(peer_path))
    extractor = importlib.import_module("extractor")
    extractor.ViTExtractor.create_model = staticmethod(lambda model_type: DinoStyleViT(vit))
    return importlib.import_module(module)
