"""Semi-supervised video object segmentation by label propagation through ViT patch features.

The protocol of the DINO paper (Caron et al. 2021, facebookresearch/dino ``eval_video_segmentation.py``):
the labels of frame t are a weighted vote of the labels of the context frames (the first frame, whose
mask is given, and the ``n_last_frames`` previous frames, whose soft labels were propagated before). Each
target patch looks only at source patches within ``radius`` grid cells of its own position, keeps the
``topk`` most similar sources over all context frames, and weights them by ``exp(cos / temperature)``.
The soft labels are upsampled bilinearly, min-max normalised per label and arg-maxed.

Shapes used below:
    N  frames        n  context frames (1 + up to n_last_frames)     C  labels (background = 0 included)
    H0, W0  original frame size    H, W  resized frame size    h, w  token grid    T = h * w    D  channels
    k  topk          c  target tokens of one tile                    L  source tokens of its window

What differs from the reference, keeping its results:

* the neighbourhood mask is built vectorised and cached per (grid, device) by :class:`LabelPropagator`,
  not with four nested Python loops;
* the affinity is never materialised as (n, T, T): target tokens are processed in square tiles of grid
  cells, each against the window of source cells within ``radius`` of it (at 480p, stride 8, radius 12:
  8 x 8 targets against 32 x 32 sources per context frame, 1/6 of the reference's multiply-adds, masking
  and top-k work), so memory is bounded whatever the video length or resolution;
* only the k best sources are gathered; rows whose k-th value is tied with the (k+1)-th fall back to the
  reference's "keep every source >= the k-th value" rule, so ties are treated identically;
* weights are ``exp((cos - max) / temperature)`` normalised, equal to the reference's ``exp(cos / 0.1)``
  normalised but without overflow or underflow at small temperatures;
* the context lives in a ring buffer of 1 + n_last_frames slots (the order of context frames does not
  matter for the result), so memory is bounded for long videos.

Frames are normalised as the reference does (red std 0.228, where DINO trained with 0.229); pass
``normalization="model"`` for the model's own statistics (:func:`frame_normalization`).
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbones import IMAGENET_MEAN, IMAGENET_STD
from .errors import ConfigError, DataError, ImageError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
NORMALIZATIONS = ("model", "reference")  # see frame_normalization
# DINO's eval_video_segmentation.py (color_normalize) divides red by 0.228; DINO trained with 0.229.
REFERENCE_STD = (0.228, 0.224, 0.225)


@dataclass(frozen=True)
class PropagationConfig:
    """Hyper-parameters of label propagation, with the defaults of DINO's DAVIS-2017 evaluation.

    chunk_elems bounds the affinity entries (float32) held at once; None = 2**22 (16 MiB) on the CPU, where
    tiles are small (side ~ 2/3 of the radius: least work), and 2**26 (256 MiB) on a GPU, where tiles are as
    large as that allows (fewer kernel launches).
    """

    n_last_frames: int = 7  # previous frames kept as context besides the first frame
    topk: int = 5  # sources voting for each target patch
    radius: int = 12  # neighbourhood half-size in grid cells; <= 0 = no spatial restriction
    temperature: float = 0.1  # affinity exp(cos / temperature)
    chunk_elems: int | None = None

    def __post_init__(self) -> None:
        if self.n_last_frames < 0:
            raise ConfigError.argument("n_last_frames", self.n_last_frames, "must be >= 0")
        if self.topk < 1:
            raise ConfigError.argument("topk", self.topk, "must be >= 1")
        if not self.temperature > 0:
            raise ConfigError.argument("temperature", self.temperature, "must be > 0")


# --------------------------------------------------------------------------------- neighbourhood mask

def neighborhood_mask(grid: tuple[int, int], radius: int, target_rows: tuple[int, int] | None = None,
                      source_rows: tuple[int, int] | None = None, target_cols: tuple[int, int] | None = None,
                      source_cols: tuple[int, int] | None = None, device: str | torch.device = "cpu"
                      ) -> torch.Tensor:
    """Which source tokens each target token may take labels from: |Δrow| <= radius and |Δcol| <= radius.

    grid: (h, w). target_rows / source_rows / target_cols / source_cols: half-open ranges of grid rows and
    columns (default: all). Returns a bool tensor (c, L), c = target rows * target cols, L = source rows *
    source cols, cells in row-major order within each block. With the defaults it is the full (T, T) mask
    of the reference's ``restrict_neighborhood``.
    """
    hgt, wid = grid

    def near(a: tuple[int, int], b: tuple[int, int]) -> torch.Tensor:
        return (torch.arange(*a, device=device)[:, None] - torch.arange(*b, device=device)[None]).abs() <= radius

    rows = near(target_rows or (0, hgt), source_rows or (0, hgt))  # (rows_t, rows_s)
    cols = near(target_cols or (0, wid), source_cols or (0, wid))  # (cols_t, cols_s)
    mask = rows[:, None, :, None] & cols[None, :, None, :]  # (rows_t, cols_t, rows_s, cols_s)
    return mask.reshape(rows.shape[0] * cols.shape[0], rows.shape[1] * cols.shape[1])


@dataclass(frozen=True)
class Tile:
    """Target cells rows [t0, t1) x cols [c0, c1) and the window of source cells rows [s0, s1) x cols
    [u0, u1) that their neighbourhoods can reach.

    mask: (c, L) bool neighbourhood mask, or None when every source is allowed (radius <= 0).
    """

    t0: int
    t1: int
    c0: int
    c1: int
    s0: int
    s1: int
    u0: int
    u1: int
    mask: torch.Tensor | None


def plan_tiles(grid: tuple[int, int], radius: int, n_context: int, chunk_elems: int, side: int | None = None,
               device: str | torch.device = "cpu") -> list[Tile]:
    """Cover the target grid with tiles whose affinity (c, L * n_context) has at most ``chunk_elems`` entries
    where possible, each with its source window and neighbourhood mask.

    side: tile side in cells; None = ceil(2 * radius / 3) (least multiply-adds + masking + top-k work per
    target on the CPU); shrunk until a tile fits ``chunk_elems`` (down to single cells). radius <= 0: every
    source is a neighbour, the tiles are full-width row bands against the whole grid.
    """
    hgt, wid = grid
    if radius <= 0:
        rows = max(1, min(hgt, chunk_elems // (wid * hgt * wid * n_context)))
        return [Tile(t0, min(hgt, t0 + rows), 0, wid, 0, hgt, 0, wid, None) for t0 in range(0, hgt, rows)]

    def elems(a: int) -> int:
        return min(a, hgt) * min(a, wid) * min(hgt, a + 2 * radius) * min(wid, a + 2 * radius) * n_context

    side = max(1, min(max(hgt, wid), side or math.ceil(2 * radius / 3)))
    while side > 1 and elems(side) > chunk_elems:
        side -= 1
    tiles = []
    for t0 in range(0, hgt, side):
        for c0 in range(0, wid, side):
            t1, c1 = min(hgt, t0 + side), min(wid, c0 + side)
            s0, s1, u0, u1 = max(0, t0 - radius), min(hgt, t1 + radius), max(0, c0 - radius), min(wid, c1 + radius)
            mask = neighborhood_mask(grid, radius, (t0, t1), (s0, s1), (c0, c1), (u0, u1), device)
            tiles.append(Tile(t0, t1, c0, c1, s0, s1, u0, u1, mask))
    return tiles


# --------------------------------------------------------------------------------- one propagation step

def propagate_labels(target: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int],
                     tiles: Sequence[Tile], topk: int = 5, temperature: float = 0.1) -> torch.Tensor:
    """Soft labels of a target frame from its context frames.

    target: (T, D) L2-normalised features of the target frame. keys: (T, n, D) L2-normalised features of
    the n context frames, token-major (the order of the n frames does not matter). labels: (T, n, C) soft
    labels of the context frames. tiles: from :func:`plan_tiles` for this grid. Returns (T, C): for each
    target token the normalised ``exp(cos / temperature)``-weighted sum of the labels of its top-k sources
    (all context frames together, within the neighbourhood). Memory: one (c, L * n) affinity tile at a time.
    """
    tokens, n_ctx, dim = keys.shape
    hgt, wid = grid
    assert target.shape == (tokens, dim) and labels.shape[:2] == (tokens, n_ctx), (target.shape, keys.shape,
                                                                                   labels.shape)
    n_labels = labels.shape[2]
    out = torch.empty(hgt, wid, n_labels, dtype=labels.dtype, device=labels.device)
    target, keys, labels = target.view(hgt, wid, dim), keys.view(hgt, wid, n_ctx, dim), labels.view(hgt, wid, n_ctx, -1)
    for tile in tiles:
        query = target[tile.t0: tile.t1, tile.c0: tile.c1].reshape(-1, dim)  # (c, D)
        src = keys[tile.s0: tile.s1, tile.u0: tile.u1].reshape(-1, dim)  # (L * n, D)
        src_labels = labels[tile.s0: tile.s1, tile.u0: tile.u1].reshape(-1, n_labels)  # (L * n, C)
        cos = query @ src.T  # (c, L * n)
        if tile.mask is not None:
            cos.view(cos.shape[0], -1, n_ctx).masked_fill_(~tile.mask[:, :, None], -math.inf)
        k = min(topk, cos.shape[1])
        # one extra value tells whether the k-th is tied with the next (duplicated frames)
        vals, idx = cos.topk(min(k + 1, cos.shape[1]), dim=1)  # (c, k + 1), best first
        weights = torch.exp((vals[:, :k] - vals[:, :1]) / temperature)
        chunk = torch.einsum("ck,ckl->cl", weights / weights.sum(1, keepdim=True), src_labels[idx[:, :k]])
        # Reference rule: every source >= the k-th value votes; differs from top-k only where the k-th
        # value is tied with the next one: recompute those rows densely.
        tied = (vals[:, k] == vals[:, k - 1]).nonzero()[:, 0] if vals.shape[1] > k else idx[:0, 0]
        if tied.numel():
            sub = cos[tied]
            dense = torch.where(sub >= vals[tied, k - 1: k], torch.exp((sub - vals[tied, :1]) / temperature),
                                torch.zeros((), dtype=sub.dtype, device=sub.device))
            chunk[tied] = (dense / dense.sum(1, keepdim=True)) @ src_labels
        out[tile.t0: tile.t1, tile.c0: tile.c1] = chunk.view(tile.t1 - tile.t0, tile.c1 - tile.c0, n_labels)
    return out.view(tokens, n_labels)


class LabelPropagator:
    """Label propagation over a video, one target frame at a time, with a bounded context.

    ``start(features, labels, grid)`` takes the first frame's (T, D) features and (C, T) labels (one-hot);
    each ``step(features)`` returns the (C, T) soft labels of the next frame and adds it to the context.
    The context is the first frame plus the last ``n_last_frames`` frames, held in a ring buffer; tile
    plans (neighbourhood masks) are cached per (grid, device) across videos.
    """

    def __init__(self, config: PropagationConfig | None = None):
        self.config = config or PropagationConfig()
        self._tiles: dict[tuple, list[Tile]] = {}
        self._keys: torch.Tensor | None = None  # (T, 1 + n_last, D)
        self._labels: torch.Tensor | None = None  # (T, 1 + n_last, C)
        self._grid: tuple[int, int] = (0, 0)
        self._filled = 0  # context slots in use
        self._next = 1  # ring slot the next frame goes to
        self.last_keys: torch.Tensor | None = None  # (T, D) normalised features of the last frame taken in

    def tiles(self, grid: tuple[int, int], device: torch.device) -> list[Tile]:
        """Tile plan for a grid, built once per (grid, device)."""
        key = (grid, str(device))
        if key not in self._tiles:
            cfg = self.config
            gpu = torch.device(device).type == "cuda"
            elems = cfg.chunk_elems or (2 ** 26 if gpu else 2 ** 22)
            self._tiles[key] = plan_tiles(grid, cfg.radius, 1 + cfg.n_last_frames, elems,
                                          side=max(grid) if gpu else None, device=device)
        return self._tiles[key]

    def start(self, features: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int]) -> None:
        """Reset the context to the first frame: features (T, D), labels (C, T)."""
        tokens, dim = features.shape
        assert tokens == grid[0] * grid[1] and labels.shape[1] == tokens, (features.shape, labels.shape, grid)
        slots = 1 + self.config.n_last_frames
        self._keys = features.new_zeros(tokens, slots, dim, dtype=torch.float32)
        self._labels = labels.new_zeros(tokens, slots, labels.shape[0], dtype=torch.float32)
        self._keys[:, 0] = F.normalize(features.float(), dim=1)
        self._labels[:, 0] = labels.T.float()
        self._grid, self._filled, self._next = grid, 1, 1
        self.last_keys = self._keys[:, 0]

    def restore(self, state: "ContextState") -> None:
        """Continue a video from kept state (see :class:`ContextState`): the context is exactly what it was
        after the state's last finished frame (same values, same ring slots), so the following frames come
        out as in an uninterrupted run."""
        cfg = self.config
        first_keys, first_labels = state.first_keys.float(), state.first_labels.float()
        tokens, dim = first_keys.shape
        slots = 1 + cfg.n_last_frames
        self._keys = first_keys.new_zeros(tokens, slots, dim)
        self._labels = first_labels.new_zeros(tokens, slots, first_labels.shape[1])
        self._keys[:, 0], self._labels[:, 0] = first_keys, first_labels
        self._grid, self._filled = tuple(state.grid), 1
        recent = state.recent[-cfg.n_last_frames:] if cfg.n_last_frames > 0 else []
        stepped = state.n_done - 1  # frames after the first already propagated
        assert len(recent) == min(cfg.n_last_frames, stepped), (len(recent), stepped)
        # frame j >= 1 went to ring slot 1 + (j - 1) % n_last_frames
        self._next = 1 + (stepped - len(recent)) % cfg.n_last_frames if cfg.n_last_frames > 0 else 1
        for keys, soft in recent:
            self._remember(keys.float(), soft.float())
        self.last_keys = recent[-1][0] if recent else self._keys[:, 0]

    def _remember(self, keys: torch.Tensor, soft: torch.Tensor) -> None:
        """The oldest previous frame leaves the context, this one (keys (T, D), soft labels (T, C)) enters."""
        if self.config.n_last_frames > 0:
            self._keys[:, self._next] = keys
            self._labels[:, self._next] = soft
            self._filled = min(self._filled + 1, self._keys.shape[1])
            self._next = 1 + self._next % self.config.n_last_frames

    @property
    def first_labels(self) -> torch.Tensor:
        """(T, C) labels of the first frame, as held in the context."""
        assert self._labels is not None, "call start() first"
        return self._labels[:, 0]

    def step(self, features: torch.Tensor) -> torch.Tensor:
        """Soft labels (C, T) of the next frame from its features (T, D); the frame then joins the context."""
        assert self._keys is not None, "call start() first"
        if features.shape != (self._keys.shape[0], self._keys.shape[2]):
            raise DataError(f"frame features {tuple(features.shape)} do not match the first frame's "
                            f"{(self._keys.shape[0], self._keys.shape[2])}: frame sizes must not change")
        cfg = self.config
        target = F.normalize(features.float(), dim=1)
        n = self._filled
        keys = self._keys if n == self._keys.shape[1] else self._keys[:, :n]
        labels = self._labels if n == self._labels.shape[1] else self._labels[:, :n]
        soft = propagate_labels(target, keys, labels, self._grid, self.tiles(self._grid, target.device),
                                cfg.topk, cfg.temperature)
        self._remember(target, soft)
        self.last_keys = target
        return soft.T

    def run(self, first_features: torch.Tensor, first_labels: torch.Tensor, grid: tuple[int, int],
            features: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Soft labels (C, T) of every frame after the first, given their (T, D) features in order."""
        self.start(first_features, first_labels, grid)
        for feats in features:
            yield self.step(feats)


# --------------------------------------------------------------------------------- labels in and out

def one_hot(labels: np.ndarray | torch.Tensor, n_labels: int | None = None) -> torch.Tensor:
    """(h, w) integer labels → (C, h * w) float one-hot, C = n_labels or max label + 1."""
    lab = labels.long() if isinstance(labels, torch.Tensor) else torch.from_numpy(np.array(labels, np.int64))
    lab = lab.flatten()
    n_labels = int(lab.max()) + 1 if n_labels is None else n_labels
    return F.one_hot(lab, n_labels).T.float()


def downsample_mask(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H0, W0) uint8 labels → (h, w) by nearest-neighbour resizing (PIL), as the reference's ``read_seg``."""
    return np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize((grid[1], grid[0]),
                                                                                Image.NEAREST))


def soft_to_labels(soft: torch.Tensor, grid: tuple[int, int], scale: int, size: tuple[int, int]) -> np.ndarray:
    """Soft labels (C, T) → (H0, W0) uint8 labels.

    Bilinear upsampling by ``scale`` (the stride; = the patch size in the reference), min-max
    normalisation of each label's map that has a positive maximum (a constant positive map becomes 1),
    arg-max over labels, then nearest-neighbour resizing (PIL) to the original ``size`` (H0, W0).
    """
    n_labels = soft.shape[0]
    maps = F.interpolate(soft.reshape(1, n_labels, *grid).float(), scale_factor=scale, mode="bilinear",
                         align_corners=False, recompute_scale_factor=False)[0]  # (C, h*s, w*s)
    lo, hi = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    normed = torch.where(span > 0, (maps - lo) / span.clamp_min(1e-30), torch.ones_like(maps))
    maps = torch.where(hi > 0, normed, maps)
    labels = maps.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))


# --------------------------------------------------------------------------------- frames → features

def video_load_size(size: tuple[int, int], load_size: int | None, multiple: int = 64) -> tuple[int, int]:
    """(H, W) a frame of (H0, W0) is resized to: the shorter side = ``load_size``, the longer side scaled
    and floored to a multiple of ``multiple`` (64, as the reference's ``read_frame``; floored to 1 when the
    side is shorter than it). None keeps the size."""
    hgt, wid = size
    if load_size is None:
        return hgt, wid
    if hgt > wid:
        return _floor_to(load_size * hgt / wid, multiple), load_size
    return load_size, _floor_to(load_size * wid / hgt, multiple)


def _floor_to(value: float, multiple: int) -> int:
    return int(value // multiple) * multiple or int(value)


def frame_normalization(mean: Sequence[float], std: Sequence[float], normalization: str = "reference"
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the frames are normalised with. "reference": those of DINO's eval_video_segmentation.py,
    i.e. ImageNet statistics with red std 0.228 instead of 0.229, for a model trained with ImageNet
    statistics (any other model keeps its own: the reference only runs DINO models); "model": the model's
    own statistics (``mean``, ``std``). The report card's video J&F is the same with either (±0.0003), so
    the reference's is the default."""
    if normalization not in NORMALIZATIONS:
        raise ConfigError.argument("normalization", normalization, f"choose one of {', '.join(NORMALIZATIONS)}")
    mean, std = tuple(mean), tuple(std)
    if normalization == "reference" and np.allclose(mean, IMAGENET_MEAN) and np.allclose(std, IMAGENET_STD):
        return mean, REFERENCE_STD
    return mean, std


def preprocess_frame(frame: np.ndarray, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
                     ) -> torch.Tensor:
    """(H0, W0, 3) uint8 RGB → (3, H, W) normalised float tensor; bilinear resizing with OpenCV (as the
    reference)."""
    import cv2

    if frame.shape[:2] != tuple(size):
        frame = cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    img = torch.from_numpy(np.require(frame, requirements=["C", "W"])).permute(2, 0, 1).float() / 255.0
    return (img - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def frame_features(extractor, batch: torch.Tensor, layer: int = -1, facet: str = "token") -> torch.Tensor:
    """Features (B, T, D) of a (B, 3, H, W) batch. The token facet is passed through the model's final norm,
    as DINO's ``get_intermediate_layers`` (the reference's features: last layer, normed, no CLS)."""
    feats = extractor.extract(batch, [layer], facet).descriptors[layer]
    if facet == "token":
        with torch.inference_mode():
            feats = extractor.model.norm(feats)
    return feats


@dataclass
class SegmentedFrame:
    """One output frame: its labels (H0, W0) uint8 and the (H0, W0, 3) RGB frame it came from.

    keys (T, D) and soft (T, C): what this frame adds to the propagation context (its normalised features
    and soft labels; the first frame's one-hot labels), to keep for :class:`ContextState`. A frame that a
    resumed run skips (``resumed``) has none of the three: its labels are the kept ones.
    """

    index: int
    labels: np.ndarray | None
    frame: np.ndarray
    keys: torch.Tensor | None = None
    soft: torch.Tensor | None = None
    resumed: bool = False


@dataclass
class ContextState:
    """What label propagation needs to continue a video whose first ``n_done`` frames are finished.

    first_keys (T, D), first_labels (T, C): the first frame's normalised features and one-hot labels;
    recent: (keys (T, D), soft (T, C)) of the last min(n_last_frames, n_done - 1) finished frames, oldest
    first; grid: (h, w). Kept as float32, these restore the context bit for bit (float16 would not: the
    following frames could change), and only 1 + n_last_frames frames are ever needed.
    """

    n_done: int
    grid: tuple[int, int]
    first_keys: torch.Tensor
    first_labels: torch.Tensor
    recent: list[tuple[torch.Tensor, torch.Tensor]]


def segment_video(extractor, frames: Iterable[np.ndarray], first_mask: np.ndarray,
                  config: PropagationConfig | None = None, layer: int = -1, facet: str = "token",
                  load_size: int | None = 480, batch_size: int = 1,
                  propagator: LabelPropagator | None = None, normalization: str = "reference",
                  resume: ContextState | None = None, with_state: bool = False) -> Iterator[SegmentedFrame]:
    """Segment every frame of a video given the first frame's labels.

    frames: (H0, W0, 3) uint8 RGB arrays, the first one annotated by ``first_mask`` (H0, W0) integer labels
    (0 = background). Only the ids present are propagated (C = their number, background included), so
    ids need not be contiguous: a 0/255 mask is one object, as cheap as a 0/1 mask, and its outputs keep
    the id 255. Yields a :class:`SegmentedFrame` per frame, the first with ``first_mask`` itself. Features
    are extracted ``batch_size`` frames per forward pass; propagation is sequential. ``normalization``:
    the frames' colour statistics, see :func:`frame_normalization`. ``resume``: the kept state of an
    interrupted run (same frames, mask and settings); its first ``n_done`` frames are read (for their size
    check and pictures) but not computed again, and yielded with ``resumed=True``. ``with_state``: fill
    each frame's ``keys`` and ``soft`` (what a caller keeps to resume; off by default, since they are
    several times the size of the frame itself). Raises ImageError when a frame's size
    differs from the mask's, DataError when the mask has no object.
    """
    mean, std = frame_normalization(extractor.mean, extractor.std, normalization)
    propagator = propagator or LabelPropagator(config)
    first_mask = np.asarray(first_mask).astype(np.int64)
    if first_mask.min() < 0 or first_mask.max() > 255:
        raise DataError(f"the first-frame mask holds ids {first_mask.min()}..{first_mask.max()}; use 0..255")
    ids = np.union1d([0], np.unique(first_mask)).astype(np.uint8)  # label c propagates object id ids[c]
    if len(ids) < 2:
        raise DataError("the first-frame mask has no object: every pixel is 0 (background)")
    compact = np.zeros(256, np.uint8)
    compact[ids] = np.arange(len(ids))
    size0 = first_mask.shape[:2]
    size = video_load_size(size0, load_size)
    scale = extractor.stride[0]
    it = iter(frames)
    try:
        first = next(it)
    except StopIteration:
        raise DataError("the video has no frames") from None
    _check_size(first, size0, 0)
    if resume is not None and resume.n_done > 0:
        device = next(extractor.model.parameters()).device
        yield SegmentedFrame(0, None, first, resumed=True)
        for index in range(1, resume.n_done):
            frame = next(it, None)
            if frame is None:
                return
            _check_size(frame, size0, index)
            yield SegmentedFrame(index, None, frame, resumed=True)
        following = next(it, None)
        if following is None:  # every frame was finished
            return
        it = itertools.chain([following], it)
        grid = tuple(resume.grid)
        propagator.restore(ContextState(resume.n_done, grid, resume.first_keys.to(device),
                                        resume.first_labels.to(device),
                                        [(k.to(device), v.to(device)) for k, v in resume.recent]))
        index = resume.n_done
    else:
        first_feats = frame_features(extractor, preprocess_frame(first, size, mean, std)[None], layer, facet)[0]
        grid = extractor.num_patches
        labels0 = one_hot(downsample_mask(compact[first_mask], grid), len(ids))
        propagator.start(first_feats, labels0.to(first_feats.device), grid)
        state = (propagator.last_keys, propagator.first_labels) if with_state else (None, None)
        yield SegmentedFrame(0, first_mask.astype(np.uint8), first, *state)
        index = 1
    while True:
        batch = []
        for frame in it:
            _check_size(frame, size0, index + len(batch))
            batch.append(frame)
            if len(batch) == batch_size:
                break
        if not batch:
            return
        tensors = torch.stack([preprocess_frame(f, size, mean, std) for f in batch])
        feats = frame_features(extractor, tensors, layer, facet)
        assert tuple(extractor.num_patches) == tuple(grid), (extractor.num_patches, grid)
        for frame, frame_feats in zip(batch, feats):
            soft = propagator.step(frame_feats)
            state = (propagator.last_keys, soft.T) if with_state else (None, None)
            yield SegmentedFrame(index, ids[soft_to_labels(soft, grid, scale, size0)], frame, *state)
            index += 1


def _check_size(frame: np.ndarray, size0: tuple[int, int], index: int) -> None:
    if frame.shape[:2] != tuple(size0):
        raise ImageError(f"frame {index}: {frame.shape[1]}x{frame.shape[0]} px, but the first-frame mask is "
                         f"{size0[1]}x{size0[0]}; every frame must have the mask's size")


# --------------------------------------------------------------------------------- reading frames and masks
# File access for the CLI, kept apart from the algorithm above.

class VideoFrames:
    """Frames of a folder of images (natural order) or of a video file (OpenCV), read one at a time.

    names: output stems, one per frame (file stems, or 00000, 00001, ... for a video file); size: (H0, W0).
    A folder is checked up front: every file must be an image of the first file's size.
    """

    def __init__(self, path: str | os.PathLike):
        from .io import list_images, output_names

        self.path = Path(path)
        if not self.path.exists():
            raise ImageError(f"{self.path}: not found (expected a folder of frames or a video file)")
        if self.path.is_dir():
            self.files: list[Path] | None = list_images(self.path)
            self.names = output_names(self.files)  # a.jpg, a.png: a_0, a_1 (DAVIS names never repeat)
            sizes = [_image_size(p) for p in self.files]
            self.size = sizes[0]
            for p, s in zip(self.files, sizes):
                if s != self.size:
                    raise ImageError(f"{p}: frame is {s[1]}x{s[0]} px but {self.files[0].name} is "
                                     f"{self.size[1]}x{self.size[0]}; all frames of a video must have one size")
        else:
            import cv2

            self.files = None
            cap = cv2.VideoCapture(str(self.path))
            ok = cap.isOpened()
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if ok else 0
            self.size = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
            cap.release()
            if not ok or count <= 0 or min(self.size) <= 0:
                raise ImageError(f"{self.path}: cannot be read as a video by OpenCV (expected a folder of "
                                 f"frames or a video file such as {', '.join(VIDEO_SUFFIXES[:3])})")
            self.names = [f"{i:05d}" for i in range(count)]  # OpenCV's count can be an estimate

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[np.ndarray]:
        """(H0, W0, 3) uint8 RGB frames."""
        from .io import load_image

        if self.files is not None:
            for p in self.files:
                frame = np.asarray(load_image(p))
                if frame.shape[:2] != self.size:
                    raise ImageError(f"{p}: frame is {frame.shape[1]}x{frame.shape[0]} px but "
                                     f"{self.files[0].name} is {self.size[1]}x{self.size[0]}")
                yield frame
            return
        import cv2

        cap = cv2.VideoCapture(str(self.path))
        try:
            index = 0
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                if index >= len(self.names):
                    self.names.append(f"{index:05d}")
                index += 1
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            del self.names[index:]
        finally:
            cap.release()


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from an image file's header, EXIF orientation applied; ImageError names the file."""
    from .io import image_size

    return image_size(path)


def read_mask(path: str | os.PathLike) -> tuple[np.ndarray, list[int] | None]:
    """An annotation PNG → ((H0, W0) uint8 labels, its palette as 768 ints, or None for a grayscale file).

    Read by :func:`vitdense.io.load_mask` (EXIF orientation applied, as to the frames): indexed (palette),
    grayscale, 1-bit and 16-bit label maps whose ids fit 0..255; ImageError naming the file for anything else.
    """
    from .io import load_mask

    arr, pal = load_mask(path, "first-frame mask")
    if arr.size and arr.max() > 255:
        raise ImageError(f"{path}: the first-frame mask holds ids up to {arr.max()}; propagation takes ids 0..255")
    return arr.astype(np.uint8), pal
