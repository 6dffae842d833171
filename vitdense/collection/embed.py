"""The work every engine runs: decode the rows of a shard, embed them in batches, hand back the rows.

Shapes: B images in a batch, D' channels of a global descriptor, (h, w) an image's patch grid, D channels
of a token.

:func:`embed_batch` is the one per-batch function; :func:`embed_shard` reads one shard, decodes its
images (in ``num_workers`` DataLoader processes, or in the calling process) and calls it. The engines
(:mod:`.engines`) only decide where :func:`embed_shard` runs.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
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


class _ShardImages(IterableDataset):
    """Rows of one shard as (position, id, tensor or None, reason, sha256, meta json); with several
    DataLoader workers, worker w decodes the rows w, w + W, ... (each worker reads the shard itself)."""

    def __init__(self, spec: ShardSpec, config: DescriptorConfig, mean: Sequence[float], std: Sequence[float]):
        self.spec, self.config, self.mean, self.std = spec, config, tuple(mean), tuple(std)

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for pos, record in enumerate(read_records(self.spec)):
            if pos % workers != worker:
                continue
            if record.data is None:
                yield pos, record.id, None, record.reason, "", ""
                continue
            digest = hashlib.sha256(record.data).hexdigest()
            try:
                tensor = preprocess_image(decode_image(record.data), self.config, self.mean, self.std)
            except ValueError as err:
                yield pos, record.id, None, str(err), digest, ""
                continue
            yield pos, record.id, tensor, "", digest, json.dumps(record.meta) if record.meta else ""


def embed_shard(spec: ShardSpec, extractor: ViTExtractor, config: DescriptorConfig, batch_size: int = 16,
                num_workers: int = 0, patches: bool = False) -> ShardRows:
    """Embed every readable image of one shard (rows in the shard's order; unreadable ones skipped);
    ``patches``: keep each image's patch tokens too (float16)."""
    if getattr(torch, config.dtype) != extractor.dtype:
        raise ConfigError(f"descriptor config asks for --dtype {config.dtype}, the extractor runs in "
                          f"{str(extractor.dtype).removeprefix('torch.')}")
    data = _ShardImages(spec, config, extractor.mean, extractor.std)
    # one worker per row stream at most: a file shard with fewer rows than workers needs fewer
    workers = min(num_workers, max(len(spec.items), 1)) if spec.kind == "files" else num_workers
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=_keep_list)
    rows: list[tuple[int, str, str, str]] = []
    vectors: list[np.ndarray] = []
    grids: list[np.ndarray] = []
    skipped: list[tuple[int, str, str]] = []
    for batch in loader:
        good = [item for item in batch if item[2] is not None]
        skipped += [(item[0], item[1], item[3]) for item in batch if item[2] is None]
        if good:
            vec, tokens = embed_batch(extractor, config, [item[2] for item in good], patches)
            vectors.append(vec)
            grids += tokens or []
            rows += [(item[0], item[1], item[4], item[5]) for item in good]
    order = np.argsort([r[0] for r in rows], kind="stable")
    vecs = np.concatenate(vectors)[order] if vectors else np.zeros((0, config.dim(extractor.embed_dim)), np.float32)
    rows = [rows[i] for i in order]
    return ShardRows([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], vecs,
                     [(i, reason) for _, i, reason in sorted(skipped)],
                     [grids[i] for i in order] if patches else None)
