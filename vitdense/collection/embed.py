"""The work every engine runs: decode the rows of a shard, embed them in batches, hand back the rows.

Shapes: B images in a batch, D' channels of a global descriptor, (h, w) an image's patch grid, D channels
of a token.

:func:`embed_batch` is the one per-batch function; :func:`embed_shards` reads shards one after another,
decodes their images (in ``num_workers`` DataLoader processes started once, or in the calling process),
calls it on batches that never span two shards and hands back each shard's rows once it is complete;
:func:`embed_shard` does that for one shard. The engines (:mod:`.engines`) only decide where they run: the
local engine streams all its shards through one :func:`embed_shards`, a Ray actor calls :func:`embed_shard`
per shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import ConfigError
from ..io import to_rgb
from ..extractor import ViTExtractor
from ..retrieval import DescriptorConfig, _keep_list, global_and_patch_descriptors, preprocess_image
from .sources import ShardSpec, read_records


@dataclass(frozen=True)
class ExtractorSpec:
    """How to build the extractor (what a remote worker needs to build its own copy).

    model/weights/device/dtype as the command line's options; stride None: the patch size.
    """

    model: str | None = "auto"
    weights: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    stride: int | None = None

    def build(self) -> ViTExtractor:
        extractor = ViTExtractor(model_type=self.model, stride=self.stride or 1, device=self.device,
                                 weights=self.weights, dtype=getattr(torch, self.dtype))
        if not self.stride:
            extractor.stride = (extractor.p, extractor.p)  # stride 1 divides every patch size; now the real one
        return extractor


@dataclass
class ShardRows:
    """What embedding one shard gives: the readable rows (ids, content hashes, metadata as JSON,
    vectors (N, D') float32 L2-normalised) in the shard's order, and (id, reason) of the skipped ones;
    ``patches``: with --patch-descriptors, each row's patch tokens (h, w, D) float16, else None."""

    ids: list[str]
    sha256: list[str]
    meta: list[str]
    vectors: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    patches: list[np.ndarray] | None = None


def decode_image(data: bytes) -> Image.Image:
    """An encoded image → RGB PIL image as the shared loader reads files (:func:`vitdense.io.to_rgb`: EXIF
    orientation, 16-bit, transparency on white); ValueError with a short reason when it cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return to_rgb(im)
    except UnidentifiedImageError:
        raise ValueError("not an image file") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"corrupt image ({err})") from None


def embed_batch(extractor: ViTExtractor, config: DescriptorConfig, images: Sequence[torch.Tensor],
                patches: bool = False) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Global descriptors (B, D') of preprocessed images (each (3, H, W)); images of one size run together.
    With ``patches`` also each image's patch tokens (h, w, D) as float16 (see
    :func:`~vitdense.retrieval.global_and_patch_descriptors`), else None."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    out = None
    grids: list[np.ndarray | None] = [None] * len(images)
    for rows in groups.values():
        vec, tokens = global_and_patch_descriptors(extractor, torch.stack([images[i] for i in rows]), config,
                                                   patches)
        vec = vec.cpu().numpy().astype(np.float32)
        if out is None:
            out = np.zeros((len(images), vec.shape[1]), np.float32)
        out[rows] = vec
        if tokens is not None:
            half = tokens.float().cpu().numpy().astype(np.float16)  # (b, h, w, D)
            for j, i in enumerate(rows):
                grids[i] = half[j]
    vectors = out if out is not None else np.zeros((0, 0), np.float32)
    return vectors, (grids if patches else None)  # type: ignore[return-value]


def _decoded_rows(spec: ShardSpec, config: DescriptorConfig, mean: Sequence[float], std: Sequence[float],
                  worker: int = 0, workers: int = 1) -> Iterator[tuple]:
    """Rows ``worker``, ``worker + workers``, ... of one shard as (position, id, tensor or None, reason,
    sha256, meta json); every worker reads the shard itself and decodes only its own rows."""
    for pos, record in enumerate(read_records(spec)):
        if pos % workers != worker:
            continue
        if record.data is None:
            yield pos, record.id, None, record.reason, "", ""
            continue
        digest = hashlib.sha256(record.data).hexdigest()
        try:
            tensor = preprocess_image(decode_image(record.data), config, mean, std)
        except ValueError as err:
            yield pos, record.id, None, str(err), digest, ""
            continue
        yield pos, record.id, tensor, "", digest, json.dumps(record.meta) if record.meta else ""


class _ShardStream(IterableDataset):
    """The rows of several shards, shard after shard, as batches ``(shard index, rows, last)``; rows as
    :func:`_decoded_rows` gives them. With W DataLoader workers, worker w decodes rows w, w + W, ... of every
    shard and cuts its own rows of a shard into batches of ``batch_size`` (a batch never spans two shards, so
    the batches are the ones a loader per shard would give); its last batch of a shard, possibly empty, says
    ``last``: a shard is complete once every worker has said so."""

    def __init__(self, specs: Sequence[ShardSpec], config: DescriptorConfig, mean: Sequence[float],
                 std: Sequence[float], batch_size: int):
        self.specs, self.config, self.mean, self.std = list(specs), config, tuple(mean), tuple(std)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[int, list[tuple], bool]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index, spec in enumerate(self.specs):
            batch: list[tuple] = []
            for row in _decoded_rows(spec, self.config, self.mean, self.std, worker, workers):
                if len(batch) == self.batch_size:
                    yield index, batch, False
                    batch = []
                batch.append(row)
            yield index, batch, True


@dataclass
class _PartialShard:
    """The rows of one shard embedded so far (in the order their batches were embedded) and how many
    workers are done with it."""

    rows: list[tuple[int, str, str, str]] = field(default_factory=list)  # (position, id, sha256, meta)
    vectors: list[np.ndarray] = field(default_factory=list)
    grids: list[np.ndarray] = field(default_factory=list)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (position, id, reason)
    ended: int = 0

    def add(self, batch: list[tuple], embedded: tuple[np.ndarray, list[np.ndarray] | None] | None) -> None:
        """A batch of rows and :func:`embed_batch`'s output for its readable ones (None when it has none)."""
        self.skipped += [(item[0], item[1], item[3]) for item in batch if item[2] is None]
        if embedded is not None:
            vec, tokens = embedded
            self.vectors.append(vec)
            self.grids += tokens or []
            self.rows += [(item[0], item[1], item[4], item[5]) for item in batch if item[2] is not None]

    def finish(self, dim: int, patches: bool) -> ShardRows:
        """The rows in the shard's order (by position, whatever order the workers' batches came in)."""
        order = np.argsort([r[0] for r in self.rows], kind="stable")
        vecs = np.concatenate(self.vectors)[order] if self.vectors else np.zeros((0, dim), np.float32)
        rows = [self.rows[i] for i in order]
        return ShardRows([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], vecs,
                         [(i, reason) for _, i, reason in sorted(self.skipped)],
                         [self.grids[i] for i in order] if patches else None)


def embed_shards(specs: Sequence[ShardSpec], extractor: ViTExtractor, config: DescriptorConfig,
                 batch_size: int = 16, num_workers: int = 0, patches: bool = False, lanes: int = 1
                 ) -> Iterator[tuple[ShardSpec, ShardRows]]:
    """Embed every readable image of ``specs``, shard after shard, yielding each shard's rows (in the shard's
    order; unreadable ones skipped) as soon as it is complete; ``patches``: keep each image's patch tokens
    too (float16).

    One DataLoader for all the shards: its ``num_workers`` processes start once and decode ahead across
    shard boundaries. ``lanes`` > 1: that many batches are embedded at once, each in a thread of this
    process, on the one extractor (its forward pass keeps no state another call reads); give each lane its
    share of torch's threads (e.g. one each), so that a lane held up by another process does not stall the
    others as one pass's threads stall each other. The batches, and so the rows, are those of one
    :func:`embed_shard` per shard, whatever ``num_workers`` and ``lanes``.
    """
    if getattr(torch, config.dtype) != extractor.dtype:
        raise ConfigError(f"descriptor config asks for --dtype {config.dtype}, the extractor runs in "
                          f"{str(extractor.dtype).removeprefix('torch.')}")
    specs = list(specs)
    if not specs:
        return
    if all(spec.kind == "files" for spec in specs):  # file shards smaller than the workers need fewer
        num_workers = min(num_workers, max(max(len(spec.items) for spec in specs), 1))
    data = _ShardStream(specs, config, extractor.mean, extractor.std, batch_size)
    loader = DataLoader(data, batch_size=None, num_workers=num_workers, collate_fn=_keep_list)
    dim = config.dim(extractor.embed_dim)

    def embed(batch: list[tuple]) -> tuple[np.ndarray, list[np.ndarray] | None] | None:
        images = [item[2] for item in batch if item[2] is not None]
        return embed_batch(extractor, config, images, patches) if images else None

    partial: dict[int, _PartialShard] = {}

    def collect(index: int, batch: list[tuple], last: bool, embedded: tuple | None
                ) -> Iterator[tuple[ShardSpec, ShardRows]]:
        # batches are collected in the loader's order and each worker goes through the shards in order:
        # when the last worker's last batch of a shard is collected, every batch of it has been
        shard = partial.setdefault(index, _PartialShard())
        shard.add(batch, embedded)
        shard.ended += last
        if shard.ended == max(num_workers, 1):
            del partial[index]
            yield specs[index], shard.finish(dim, patches)

    if lanes <= 1:
        for index, batch, last in loader:
            yield from collect(index, batch, last, embed(batch))
        return
    pool = ThreadPoolExecutor(lanes, thread_name_prefix="vitdense-embed")
    queue: deque[tuple[int, list[tuple], bool, Future]] = deque()
    try:
        for index, batch, last in loader:
            queue.append((index, batch, last, pool.submit(embed, batch)))
            # up to 2 batches a lane submitted: a lane that finishes finds the next one waiting
            while queue and (len(queue) > 2 * lanes or queue[0][3].done()):
                index, batch, last, future = queue.popleft()
                yield from collect(index, batch, last, future.result())
        while queue:
            index, batch, last, future = queue.popleft()
            yield from collect(index, batch, last, future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def embed_shard(spec: ShardSpec, extractor: ViTExtractor, config: DescriptorConfig, batch_size: int = 16,
                num_workers: int = 0, patches: bool = False) -> ShardRows:
    """Embed every readable image of one shard (rows in the shard's order; unreadable ones skipped);
    ``patches``: keep each image's patch tokens too (float16)."""
    for _, rows in embed_shards([spec], extractor, config, batch_size, num_workers, patches):
        return rows
    raise AssertionError("embed_shards gave no rows for a shard")
