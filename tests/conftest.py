"""Shared test fixtures: tiny randomly initialised backbones and real photos from scikit-image."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub that is not there
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_vit(patch: int = 8, dim: int = 96, depth: int = 4, heads: int = 3, img: int = 64, seed: int = 0):
    """A small timm ViT with random weights (deterministic for a seed)."""
    from vitdense import create_vit

    torch.manual_seed(seed)
    return create_vit(f"vit_small_patch{patch}_224", embed_dim=dim, depth=depth, num_heads=heads, img_size=img,
                      patch_size=patch)


def tiny_extractor(stride: int = 4, **kwargs):
    """A ViTExtractor on a tiny random ViT on the CPU."""
    from vitdense import ViTExtractor

    return ViTExtractor("custom", stride=stride, model=tiny_vit(**kwargs), device="cpu")


@pytest.fixture
def make_extractor():
    return tiny_extractor


@pytest.fixture(scope="session")
def photos():
    """Real photos shipped with scikit-image: name -> uint8 (H, W, 3)."""
    from skimage import data

    return {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
            "rocket": data.rocket()}
