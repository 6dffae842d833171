"""Shared test fixtures: tiny randomly initialised backbones and real photos from scikit-image."""
from __future__ import annotations

import os

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


def save_tiny_weights(path, depth: int = 4, seed: int = 0):
    """Write a tiny random ViT-S/8-shaped backbone as our own weights file; return its path."""
    from vitdense import backbone_meta, save_backbone

    save_backbone(tiny_vit(depth=depth, seed=seed), path, backbone_meta("vit_small_patch8_224", dict(
        embed_dim=96, depth=depth, num_heads=3, img_size=64, patch_size=8)))
    return path


def run_cli(*args):
    """Invoke the `vitdense` command in-process; every argument is turned into a string."""
    from click.testing import CliRunner

    from vitdense.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *fragments):
    """A user error: exit code 2, exactly one `vitdense: error:` line holding every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("vitdense")]
    assert len(lines) == 1 and lines[0].startswith("vitdense: error:"), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def keys_of(pattern: str, want: str, n: int, rule) -> list[str]:
    """The first ``n`` keys ``pattern.format(i)`` whose split under ``rule`` is ``want``."""
    out, i = [], 0
    while len(out) < n:
        key = pattern.format(i)
        if rule(key) == want:
            out.append(key)
        i += 1
    return out
