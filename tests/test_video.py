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
from vitdense.errors import ConfigError, DataError, ImageError
from vitdense.video import (LabelPropagator, PropagationConfig, VideoFrames, frame_features, frame_normalization,
                            neighborhood_mask, one_hot, plan_tiles, preprocess_frame, read_mask, segment_video,
                            soft_to_labels, video_load_size)


# ------------------------------------------------------------------------------ independent references

def loop_neighborhood(h: int, w: int, r: int) -> torch.Tensor:
    """The (T, T) neighbourhood mask by brute force: every (target cell, source cell) pair of the row-major
    grid, allowed when the two cells are at most r rows and at most r columns apart."""
    cells = [(y, x) for y in range(h) for x in range(w)]
    mask = np.zeros((h * w, h * w), np.float32)
    for t, (ty, tx) in enumerate(cells):
        for s, (sy, sx) in enumerate(cells):
            if abs(ty - sy) <= r and abs(tx - sx) <= r:
                mask[t, s] = 1.0
    return torch.from_numpy(mask)


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


@pytest.mark.parametrize("h,w,r,n,budget,side", [(11, 6, 2, 4, 10 ** 6, None), (11, 13, 3, 2, 10 ** 6, 4),
                                                  (9, 10, 2, 3, 300, None), (7, 5, 0, 2, 2 * 35 * 35, None)])
def test_tiles_cover_the_grid_and_the_mask(h, w, r, n, budget, side):
    """Every target cell is in exactly one tile; a tile's mask is the loop mask restricted to its targets and
    its source window, and no neighbour lies outside the window; tiles fit the budget when they can."""
    full = loop_neighborhood(h, w, max(r, max(h, w)) if r <= 0 else r)
    tiles = plan_tiles((h, w), r, n, budget, side=side)
    seen = np.zeros((h, w), int)
    for t in tiles:
        seen[t.t0: t.t1, t.c0: t.c1] += 1
        targets = [y * w + x for y in range(t.t0, t.t1) for x in range(t.c0, t.c1)]
        sources = [y * w + x for y in range(t.s0, t.s1) for x in range(t.u0, t.u1)]
        assert len(targets) * len(sources) * n <= budget or (t.t1 - t.t0, t.c1 - t.c0) == (1, 1) and r > 0
        mask = t.mask.float() if t.mask is not None else torch.ones(len(targets), len(sources))
        assert torch.equal(mask, full[targets][:, sources])
        assert full[targets].sum() == mask.sum()
    assert (seen == 1).all()
    if side is not None:
        assert max(t.t1 - t.t0 for t in tiles) == side


# ------------------------------------------------------------------------------ propagation

@pytest.mark.parametrize("radius,chunk", [(2, 2 ** 30), (2, 500), (0, 700), (1, 2 ** 30), (3, 2 ** 30)])
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


@pytest.mark.parametrize("side", [1, 2, 3, 5, 9])
def test_one_step_equals_dense_reference_for_any_tile_side(side):
    from vitdense.video import propagate_labels

    torch.manual_seed(side)
    grid, n = (7, 9), 3
    ctx = [torch.randn(63, 12) for _ in range(n)]
    labs = [torch.rand(4, 63) for _ in range(n)]
    target = torch.randn(63, 12)
    keys = torch.stack([F.normalize(f, dim=1) for f in ctx], dim=1)  # (T, n, D)
    ours = propagate_labels(F.normalize(target, dim=1), keys, torch.stack([lab.T for lab in labs], dim=1), grid,
                            plan_tiles(grid, 2, n, 2 ** 30, side=side), topk=5)
    torch.testing.assert_close(ours.T, dense_step(target, ctx, labs, grid, 2, 5, 0.1), atol=2e-5, rtol=1e-4)


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
    frames, masks = synthetic_video(n=3)
    frames = list(frames) + [np.zeros((90, 128, 3), np.uint8)]
    with pytest.raises(ImageError, match="frame 3: 128x90"):
        list(segment_video(tiny_extractor(stride=8), frames, masks[0], load_size=None))


def test_segment_video_with_many_objects_and_gaps_in_the_ids():
    """Ids 3, 4 and 9 (none of 1, 2, 5..8): each object keeps its id, no other id appears."""
    frames, masks = synthetic_video(n=4)
    frames, first = frames.copy(), masks[0] * 9
    for obj, (y, x) in ((3, (8, 90)), (4, (70, 8))):  # two static coloured squares
        frames[:, y: y + 16, x: x + 24] = (40 * obj, 230, 255 - 40 * obj)
        first[y: y + 16, x: x + 24] = obj
    out = list(segment_video(tiny_extractor(stride=8), frames, first, load_size=None))
    for o, m in zip(out[1:], masks[1:]):
        assert set(np.unique(o.labels)) <= {0, 3, 4, 9}
        assert region_similarity(m == 1, o.labels == 9) > 0.7
        for obj in (3, 4):
            assert region_similarity(first == obj, o.labels == obj) > 0.6


def test_a_0_255_mask_is_one_object_as_cheap_as_a_0_1_mask():
    """What cosegment writes (0/255) propagates two label channels, not 256, and gives the 0/1 result x 255."""
    frames, masks = synthetic_video(n=4)
    seen = []

    class Spy(LabelPropagator):
        def start(self, features, labels, grid):
            seen.append(labels.shape[0])
            super().start(features, labels, grid)

    ex = tiny_extractor(stride=8)
    ones = [o.labels for o in segment_video(ex, frames, masks[0], load_size=None, propagator=Spy())]
    full = [o.labels for o in segment_video(ex, frames, masks[0] * 255, load_size=None, propagator=Spy())]
    assert seen == [2, 2]
    for a, b in zip(ones, full):
        np.testing.assert_array_equal(b, a.astype(np.uint8) * 255)


def test_reference_normalization_is_dinos_video_script():
    """DINO's eval_video_segmentation.py: mean (0.485, 0.456, 0.406), std (0.228, 0.224, 0.225); the default."""
    import inspect
    imagenet = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert frame_normalization(*imagenet, "reference") == ((0.485, 0.456, 0.406), (0.228, 0.224, 0.225))
    assert frame_normalization(*imagenet) == frame_normalization(*imagenet, "reference")
    assert inspect.signature(segment_video).parameters["normalization"].default == "reference"
    assert frame_normalization(*imagenet, "model") == imagenet
    other = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # a model trained with other statistics keeps them
    assert frame_normalization(*other, "reference") == other
    with pytest.raises(ConfigError, match="normalization=.dino.: choose one of"):
        frame_normalization(*imagenet, "dino")


def test_segment_video_with_the_reference_normalization():
    """normalization="reference" gives what an extractor patched to red std 0.228 gives (the old benchmark
    patch), and other first-frame features than the model's statistics."""
    import copy

    frames, masks = synthetic_video(n=4)
    ex = tiny_extractor(stride=8)
    assert ex.std == (0.229, 0.224, 0.225)
    patched = copy.copy(ex)
    patched.std = (0.228, 0.224, 0.225)
    firsts = []

    class Spy(LabelPropagator):
        def start(self, features, labels, grid):
            firsts.append(features.clone())
            super().start(features, labels, grid)

    runs = [[o.labels for o in segment_video(e, frames, masks[0], load_size=None, propagator=Spy(),
                                             normalization=norm)]
            for e, norm in ((ex, "reference"), (patched, "model"), (ex, "model"))]
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a, b)
    torch.testing.assert_close(firsts[0], firsts[1], rtol=0, atol=0)
    assert not torch.allclose(firsts[0], firsts[2])


def test_an_all_zero_mask_is_an_error():
    frames, masks = synthetic_video(n=2)
    with pytest.raises(DataError, match="no object"):
        list(segment_video(tiny_extractor(stride=8), frames, np.zeros_like(masks[0]), load_size=None))


# ------------------------------------------------------------------------------ reading frames and masks

def test_video_frames_folder_in_natural_order(tmp_path):
    order = ["f1", "f2", "f9", "f10", "f11"]  # plain string sorting would put f10 and f11 before f2
    for i, name in enumerate(order):
        Image.fromarray(np.full((6, 8, 3), 20 * i, np.uint8)).save(tmp_path / f"{name}.png")
    frames = VideoFrames(tmp_path)
    assert frames.names == order and len(frames) == 5 and frames.size == (6, 8)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 20, 40, 60, 80]


def test_video_frames_from_a_video_file(tmp_path):
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 24))
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for c in colours:
        writer.write(cv2.cvtColor(np.full((24, 32, 3), c, np.uint8), cv2.COLOR_RGB2BGR))
    writer.release()
    frames = VideoFrames(path)
    got = list(frames)
    assert frames.size == (24, 32) and frames.names == ["00000", "00001", "00002"]
    for frame, c in zip(got, colours):  # RGB order, up to MJPG compression
        assert frame.shape == (24, 32, 3) and np.abs(frame.mean((0, 1)) - c).max() < 12

    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(ImageError, match="junk.mp4: cannot be read as a video"):
        VideoFrames(tmp_path / "junk.mp4")
    with pytest.raises(ImageError, match="nothere: not found"):
        VideoFrames(tmp_path / "nothere")


def test_read_mask_keeps_ids_and_palette(tmp_path):
    ids = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10  # 24 objects, ids up to 230
    pal = np.random.default_rng(0).integers(0, 256, 768).tolist()
    im = Image.fromarray(ids, mode="L").convert("P")
    im.putpalette(pal)
    im.save(tmp_path / "m.png")
    arr, got = read_mask(tmp_path / "m.png")
    np.testing.assert_array_equal(arr, ids)
    assert got == pal
    Image.fromarray(ids).save(tmp_path / "gray.png")  # grayscale ids: no palette
    arr, got = read_mask(tmp_path / "gray.png")
    np.testing.assert_array_equal(arr, ids)
    assert got is None


def test_label_propagator_restored_from_kept_state_continues_bit_for_bit():
    from vitdense.video import ContextState, LabelPropagator

    gen = torch.Generator().manual_seed(0)
    grid, dim, n = (5, 6), 16, 9
    feats = [torch.randn(30, dim, generator=gen) for _ in range(n)]
    labels0 = one_hot(torch.randint(0, 3, grid, generator=gen), 3)
    config = PropagationConfig(n_last_frames=3, topk=4, radius=2)
    ref = LabelPropagator(config)
    ref.start(feats[0], labels0, grid)
    kept = [(ref.last_keys.clone(), ref.first_labels.clone())]
    softs = []
    for f in feats[1:]:
        softs.append(ref.step(f))
        kept.append((ref.last_keys.clone(), softs[-1].T.clone()))
    for done in (1, 2, 4, 6):  # frames 0 .. done-1 finished; the ring buffer has wrapped for 6
        again = LabelPropagator(config)
        recent = kept[max(1, done - 3): done]
        again.restore(ContextState(done, grid, kept[0][0], kept[0][1], recent))
        for f, want in zip(feats[done:], softs[done - 1:]):
            assert torch.equal(again.step(f), want)
