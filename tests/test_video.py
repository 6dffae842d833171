"""Label propagation (vitdense.video) against plain re-statements of DINO's video-segmentation protocol."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_extractor
from vitdense.davis import region_similarity
from vitdense.video import (LabelPropagator, PropagationConfig, frame_features, neighborhood_mask, one_hot,
                            plan_bands, preprocess_frame, segment_video, soft_to_labels, video_load_size)


# ------------------------------------------------------------------------------ independent references

def loop_neighborhood(h: int, w: int, r: int) -> torch.Tensor:
    """The (T, T) mask with four nested loops, as written in DINO's restrict_neighborhood."""
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * r + 1):
                for q in range(2 * r + 1):
                    a, b = i - r + p, j - r + q
                    if 0 <= a < h and 0 <= b < w:
                        mask[i, j, a, b] = 1
    return mask.reshape(h * w, h * w)


def dense_step(target, ctx_feats, ctx_labels, grid, radius, topk, temperature):
    """One step of the reference: full (n, T, T) affinity exp(cos / t), neighbourhood, keep >= k-th, normalise.

    target: (T, D); ctx_feats: list of (T, D); ctx_labels: list of (C, T). Returns (C, T).
    """
    h, w = grid
    src = torch.stack([F.normalize(f, dim=1) for f in ctx_feats])  # (n, T, D)
    aff = torch.exp(F.normalize(target, dim=1)[None] @ src.transpose(1, 2) / temperature)  # (n, T_tar, T_src)
    if radius > 0:
        aff = aff * loop_neighborhood(h, w, radius)[None]
    aff = aff.transpose(2, 1).reshape(-1, h * w)  # (n * T_src, T_tar)
    kth = aff.topk(topk, dim=0).values.min(dim=0).values
    aff = torch.where(aff < kth, torch.zeros(()), aff)
    aff = aff / aff.sum(dim=0, keepdim=True)
    labels = torch.cat([lab.T for lab in ctx_labels])  # (n * T_src, C)
    return labels.T @ aff


def dense_video(feats, labels0, grid, n_last, radius, topk=5, temperature=0.1):
    queue: deque = deque(maxlen=n_last)
    outs = []
    for f in feats[1:]:
        soft = dense_step(f, [feats[0]] + [q[0] for q in queue], [labels0] + [q[1] for q in queue], grid,
                          radius, topk, temperature)
        outs.append(soft)
        if n_last:
            queue.append((f, soft))
    return outs


# ------------------------------------------------------------------------------ neighbourhood mask

@pytest.mark.parametrize("h,w,r", [(5, 7, 1), (6, 4, 2), (9, 11, 3), (3, 3, 5)])
def test_neighborhood_mask_equals_loop(h, w, r):
    assert torch.equal(neighborhood_mask((h, w), r).float(), loop_neighborhood(h, w, r))


def test_bands_cover_the_mask_and_respect_memory_budget():
    h, w, r, n = 11, 6, 2, 4
    full = loop_neighborhood(h, w, r)
    budget = 3 * w * (3 + 2 * r) * w * n
    bands = plan_bands((h, w), r, n, budget)
    assert [b.t0 for b in bands] == list(range(0, h, 3)) and bands[-1].t1 == h
    for b in bands:
        assert b.mask.shape[0] * b.mask.shape[1] * n <= budget
        assert torch.equal(b.mask.float(), full[b.t0 * w: b.t1 * w, b.s0 * w: b.s1 * w])
        # nothing outside the band is a neighbour
        assert full[b.t0 * w: b.t1 * w].sum() == b.mask.sum()


def test_propagator_caches_band_plan_per_grid():
    prop = LabelPropagator(PropagationConfig(radius=2))
    a = prop.bands((4, 5), torch.device("cpu"))
    assert prop.bands((4, 5), torch.device("cpu")) is a
    assert prop.bands((5, 4), torch.device("cpu")) is not a


# ------------------------------------------------------------------------------ propagation

@pytest.mark.parametrize("radius,chunk", [(2, 2 ** 30), (2, 500), (0, 700), (1, 2 ** 30)])
def test_propagation_equals_dense_reference(radius, chunk):
    torch.manual_seed(radius + chunk % 7)
    grid, dim, n_labels = (7, 9), 16, 3
    feats = [torch.randn(63, dim) for _ in range(9)]
    labels0 = one_hot(torch.randint(0, n_labels, grid), n_labels)
    prop = LabelPropagator(PropagationConfig(n_last_frames=3, topk=4, radius=radius, chunk_elems=chunk))
    ours = list(prop.run(feats[0], labels0, grid, feats[1:]))
    ref = dense_video(feats, labels0, grid, n_last=3, radius=radius, topk=4)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # the context never grows beyond first frame + n_last_frames
    assert prop._keys.shape == (63, 4, dim)


def test_propagation_ties_keep_every_source_at_the_kth_value():
    """Duplicated frames give exact ties; the reference keeps every source >= the k-th value."""
    torch.manual_seed(1)
    grid = (5, 6)
    base = torch.randn(30, 8)
    feats = [base.clone() for _ in range(5)]
    labels0 = one_hot(torch.randint(0, 2, grid), 2)
    ours = list(LabelPropagator(PropagationConfig(n_last_frames=2, topk=2, radius=1)).run(
        feats[0], labels0, grid, feats[1:]))
    ref = dense_video(feats, labels0, grid, n_last=2, radius=1, topk=2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_no_previous_frames_uses_only_the_first():
    torch.manual_seed(2)
    grid = (4, 4)
    feats = [torch.randn(16, 8) for _ in range(4)]
    labels0 = one_hot(torch.randint(0, 3, grid), 3)
    ours = list(LabelPropagator(PropagationConfig(n_last_frames=0, radius=1)).run(feats[0], labels0, grid, feats[1:]))
    for f, soft in zip(feats[1:], ours):
        torch.testing.assert_close(soft, dense_step(f, [feats[0]], [labels0], grid, 1, 5, 0.1), atol=1e-5, rtol=1e-5)


def test_step_rejects_features_of_another_size():
    from vitdense.errors import DataError

    prop = LabelPropagator()
    prop.start(torch.randn(12, 4), one_hot(np.zeros((3, 4), int), 2), (3, 4))
    with pytest.raises(DataError, match="frame sizes"):
        prop.step(torch.randn(20, 4))


def test_config_rejects_bad_values():
    from vitdense.errors import ConfigError

    for kwargs in ({"topk": 0}, {"temperature": 0.0}, {"n_last_frames": -1}):
        with pytest.raises(ConfigError):
            PropagationConfig(**kwargs)


# ------------------------------------------------------------------------------ labels in and out

def test_soft_to_labels_matches_loop_version():
    torch.manual_seed(3)
    grid, scale, size = (3, 5), 4, (13, 22)
    soft = torch.rand(4, 15)
    soft[2] = 0.0  # an absent label stays 0
    soft[3] = 0.25  # a constant positive map: normalised to 1 everywhere
    up = F.interpolate(soft.reshape(1, 4, *grid), scale_factor=scale, mode="bilinear", align_corners=False)[0]
    maps = up.clone()
    for c in range(4):
        if maps[c].max() > 0:
            span = maps[c].max() - maps[c].min()
            maps[c] = (maps[c] - maps[c].min()) / span if span > 0 else torch.ones_like(maps[c])
    expected = np.asarray(Image.fromarray(maps.argmax(0).numpy().astype(np.uint8)).resize((22, 13), Image.NEAREST))
    assert (expected == 3).mean() > 0.9  # ties with another label's maximum go to the lower label
    np.testing.assert_array_equal(soft_to_labels(soft, grid, scale, size), expected)
    soft[3] = 0.0
    maps = up.clone()
    maps[3] = 0
    for c in (0, 1):
        maps[c] = (maps[c] - maps[c].min()) / (maps[c].max() - maps[c].min())
    expected = np.asarray(Image.fromarray(maps.argmax(0).numpy().astype(np.uint8)).resize((22, 13), Image.NEAREST))
    np.testing.assert_array_equal(soft_to_labels(soft, grid, scale, size), expected)


def test_one_hot_and_video_load_size():
    lab = np.array([[0, 2], [1, 2]])
    oh = one_hot(lab)
    assert oh.shape == (3, 4) and oh.sum(0).tolist() == [1, 1, 1, 1] and oh[2].tolist() == [0, 1, 0, 1]
    assert video_load_size((480, 854), 480) == (480, 832)  # DAVIS 480p frames → 60 × 104 patches at /8
    assert video_load_size((1080, 1920), 480) == (480, 832)
    assert video_load_size((854, 480), 480) == (832, 480)
    assert video_load_size((500, 500), 480) == (480, 448)  # the reference's rule for square frames
    assert video_load_size((40, 50), 32) == (32, 40)  # shorter than 64: not floored to 0
    assert video_load_size((37, 41), None) == (37, 41)


def test_frame_features_are_dinos_last_layer_output():
    """Token facet of the last layer after the final norm = timm forward_features = DINO get_intermediate_layers."""
    ex = tiny_extractor(stride=8)
    x = torch.randn(2, 3, 64, 64)
    ours = frame_features(ex, x)
    with torch.no_grad():
        ref = ex.model.forward_features(x)[:, 1:]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_preprocess_frame_normalises_after_resizing():
    frame = np.full((10, 20, 3), 128, np.uint8)
    t = preprocess_frame(frame, (5, 10), (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert t.shape == (3, 5, 10)
    np.testing.assert_allclose(t[:, 0, 0].numpy(), [(128 / 255 - 0.5) / s for s in (0.25, 0.5, 1.0)], atol=1e-6)


# ------------------------------------------------------------------------------ a synthetic video

def smooth_texture(rng, h, w, cell, lo, hi):
    coarse = rng.uniform(lo, hi, (h // cell + 2, w // cell + 2, 3)).astype(np.uint8)
    big = Image.fromarray(coarse).resize(((w // cell + 2) * cell, (h // cell + 2) * cell), Image.BICUBIC)
    return np.asarray(big)[:h, :w]


def synthetic_video(n=10, size=(96, 128), step=3, radius=20, seed=0):
    """A red-textured disk moving right by ``step`` px per frame over a blue-green texture.

    Returns frames (n, H, W, 3) uint8 and ground-truth masks (n, H, W) uint8 (1 = the disk).
    """
    rng = np.random.default_rng(seed)
    hgt, wid = size
    bg = smooth_texture(rng, hgt, wid, 16, (0, 90, 60), (60, 200, 255))
    tex = smooth_texture(rng, 2 * radius + 1, 2 * radius + 1, 8, (180, 0, 0), (255, 120, 80))
    yy, xx = np.mgrid[:hgt, :wid]
    frames, masks = [], []
    for t in range(n):
        cy, cx = hgt // 2, radius + 6 + step * t
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        frame = bg.copy()
        ys, xs = np.nonzero(inside)
        frame[ys, xs] = tex[ys - cy + radius, xs - cx + radius]
        frames.append(frame)
        masks.append(inside.astype(np.uint8))
    return np.stack(frames), np.stack(masks)


def test_segments_a_moving_object():
    """A 40-px disk on an 8-px patch grid: quantisation alone limits J to ~0.85, so 0.7 asks for tracking
    to work on every frame; a mask that stays where the first one was scores ~0.35, so tracking must also
    beat that by 0.3 (the object moves 27 px, more than its radius)."""
    frames, masks = synthetic_video()
    out = list(segment_video(tiny_extractor(stride=8), frames, masks[0], load_size=None))
    assert [o.index for o in out] == list(range(len(frames)))
    np.testing.assert_array_equal(out[0].labels, masks[0])
    j = np.array([region_similarity(m == 1, o.labels == 1) for m, o in zip(masks[1:], out[1:])])
    static = np.array([region_similarity(m == 1, masks[0] == 1) for m in masks[1:]])
    assert j.min() > 0.7, j
    assert j.mean() > static.mean() + 0.3, (j.mean(), static.mean())


def test_batched_extraction_gives_the_same_masks():
    frames, masks = synthetic_video(n=5)
    ex = tiny_extractor(stride=8)
    one = [o.labels for o in segment_video(ex, frames, masks[0], load_size=None, batch_size=1)]
    three = [o.labels for o in segment_video(ex, frames, masks[0], load_size=None, batch_size=3)]
    agree = np.mean([np.mean(a == b) for a, b in zip(one, three)])
    assert agree > 0.999


def test_segment_video_rejects_a_frame_of_another_size():
    from vitdense.errors import ImageError

    frames, masks = synthetic_video(n=3)
    frames = list(frames) + [np.zeros((90, 128, 3), np.uint8)]
    with pytest.raises(ImageError, match="frame 3: 128x90"):
        list(segment_video(tiny_extractor(stride=8), frames, masks[0], load_size=None))
