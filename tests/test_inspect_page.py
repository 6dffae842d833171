"""The inspect page's descriptor compression and its measured error against a plain recomputation, and the
page's content (self-contained, the data it carries decodes to what was compressed)."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from vitdense.inspect_page import (InspectImage, InspectView, build_inspect_page, colormap_lut, compress_descriptors,
                                   similarity_error)


def _low_rank(n: int, d: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) + 0.05 * rng.normal(size=(n, d)) + 0.5
            ).astype(np.float32)


def _plain_cosine(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    return u @ u.T


def test_compression_codes_and_measured_error():
    desc = _low_rank(300, 48, rank=6)
    comp = compress_descriptors(desc, dims=12)
    assert comp.codes.shape == (300, 12) and comp.codes.dtype == np.uint8
    assert (comp.codes.min(axis=0) == 0).all() and (comp.codes.max(axis=0) == 255).all()  # full 8-bit range used
    # independent decoding: value = offset + code * step, unit rows, cosine
    values = comp.offset.astype(np.float64) + comp.codes * comp.step.astype(np.float64)
    approx = _plain_cosine(values)
    diff = np.abs(approx - _plain_cosine(desc))
    err = similarity_error(desc, comp, queries=1000)  # all 300 tokens are queries: every pair
    assert err.pairs == 300 * 300 and err.queries == 300
    assert err.max == pytest.approx(diff.max(), abs=1e-5)
    assert err.mean == pytest.approx(diff.mean(), abs=1e-6)
    assert 0 < err.max < 0.05  # rank 6 + noise in 12 dimensions at 8 bits
    assert comp.energy > 0.99
    sampled = similarity_error(desc, comp, queries=50, seed=1)
    assert sampled.queries == 50 and sampled.max <= err.max + 1e-6


def test_fewer_dimensions_lose_more():
    desc = _low_rank(200, 64, rank=40, seed=2)
    errors = [similarity_error(desc, compress_descriptors(desc, dims)).mean for dims in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2]
    assert compress_descriptors(desc, dims=500).dims == 64  # at most D


def test_page_is_self_contained_and_carries_the_codes():
    rng = np.random.default_rng(0)
    grids = [(3, 4), (2, 5)]
    images = [InspectImage("a<b>.png", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), grids[0],
                           rng.random(12)),
              InspectImage("b.png", rng.integers(0, 255, (16, 28, 3), dtype=np.uint8), grids[1], None)]
    descs = [rng.normal(size=(12, 10)).astype(np.float32), rng.normal(size=(10, 10)).astype(np.float32)]
    page = build_inspect_page(images, [InspectView("key, layer 3", descs)], patch=8, stride=4, dims=6,
                              info={"model": "tiny"})
    doc = page.html
    assert doc.startswith("<!DOCTYPE html>") and page.fragment in doc
    assert not re.search(r"(src|href)=\"(https?:)?//", doc) and "<link" not in doc  # nothing fetched
    data = json.loads(re.search(r'<script type="application/json" class="vd-data">(.*?)</script>', doc, re.S)
                      .group(1).replace("<\\/", "</"))
    view = data["views"][0]
    comp = compress_descriptors(np.concatenate(descs), dims=6)
    codes = np.frombuffer(base64.b64decode(view["codes"]), np.uint8).reshape(22, 6)
    np.testing.assert_array_equal(codes, comp.codes)
    np.testing.assert_allclose(view["offset"], comp.offset)
    # exact nearest neighbours from the full descriptors, both directions
    sim = _plain_cosine(np.concatenate(descs))[:12, 12:]
    nn01 = np.frombuffer(base64.b64decode(view["nn"]["0,1"]), "<u2")
    nn10 = np.frombuffer(base64.b64decode(view["nn"]["1,0"]), "<u2")
    np.testing.assert_array_equal(nn01, sim.argmax(axis=1))
    np.testing.assert_array_equal(nn10, sim.argmax(axis=0))
    assert data["images"][1]["saliency"] is None and data["images"][0]["saliency"].startswith("data:image/png")
    assert data["start"] == int(np.argmax(images[0].saliency))
    lut = np.frombuffer(base64.b64decode(data["colormap"]), np.uint8).reshape(256, 3)
    np.testing.assert_array_equal(lut, colormap_lut())
    assert page.report["page_bytes"] == len(doc.encode())
    err = page.report["views"][0]["similarity_error"]
    assert f"max {err['max']:.4f}" in doc and "6 dimensions" in doc  # the footer reports the error


def test_colormap_brightness_rises():
    lut = colormap_lut().astype(float)
    luminance = lut @ [0.299, 0.587, 0.114]
    assert (np.diff(luminance) > 0).all()
    assert len({tuple(c) for c in colormap_lut()}) == 256  # a colour gives back its level
