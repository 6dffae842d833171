"""The torch-free half of retrieval: how a global descriptor is computed (:class:`DescriptorConfig`, kept
in every index) and :func:`faiss_search` (top-k with exact re-ranking).

Building and searching an index from embedding shards (vitdense/collection/index.py) needs only these, so
they live apart from vitdense/retrieval.py, which imports torch (~0.5 GB resident) for the network; that
module re-exports both names.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

DESCRIPTORS = ("cls", "gem", "both")
DTYPES = ("float32", "bfloat16", "float16")
# Scales of DINO's multi-scale retrieval descriptor (utils.multi_scale in facebookresearch/dino).
MULTISCALES = (1.0, 1 / math.sqrt(2), 0.5)


@dataclass(frozen=True)
class DescriptorConfig:
    """How a global descriptor is computed; stored in the index so queries use exactly the same settings.

    descriptor: "cls" (CLS token), "gem" (GeM over patch tokens) or "both" (concatenated, as DINO's
        copy-detection evaluation).
    layer: transformer layer whose output tokens are used (-1 = last); the model's final LayerNorm is
        applied, as DINO's ``get_intermediate_layers``.
    gem_p: GeM exponent; 4 as in DINO's eval_copy_detection.py.
    multiscale: average the descriptor over the scales 1, 1/√2, 1/2 (DINO's retrieval evaluation).
    load_size: shorter image side in pixels (None: keep the size); with ``square`` both sides.
    square: resize to load_size × load_size (DINO's copy detection) instead of keeping the aspect ratio.
    stride: patch-embedding stride (None: the patch size, i.e. the network as trained).
    dtype: precision of the forward pass ("float32", "bfloat16", "float16"): reduced precision moves the
        descriptors by ~1e-3, enough to reorder near ties, so queries must use the index's.
    """

    descriptor: str = "cls"
    layer: int = -1
    gem_p: float = 4.0
    multiscale: bool = False
    load_size: int | None = 224
    square: bool = False
    stride: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.descriptor not in DESCRIPTORS:
            raise ConfigError.argument("descriptor", self.descriptor, f"choose one of {', '.join(DESCRIPTORS)}")
        if self.gem_p <= 0:
            raise ConfigError.argument("gem_p", self.gem_p, "the GeM exponent must be positive")
        if self.load_size is not None and self.load_size <= 0:
            raise ConfigError.argument("load_size", self.load_size, "must be positive")
        if self.dtype not in DTYPES:
            raise ConfigError.argument("dtype", self.dtype, f"choose one of {', '.join(DTYPES)}")

    def dim(self, embed_dim: int) -> int:
        """Channels D' of the descriptor of a backbone with ``embed_dim`` channels per token."""
        return 2 * embed_dim if self.descriptor == "both" else embed_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DescriptorConfig":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def faiss_search(index: Any, queries: np.ndarray, k: int, vectors: np.ndarray | None = None,
                 rerank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of queries (Q, D') → (scores (Q, k), ids (Q, k)); missing results have id -1.

    With ``rerank > k`` and the exact ``vectors`` (N, D') (a memory map is fine), the approximate index
    proposes ``rerank`` candidates whose exact scores decide the final top k.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, index.ntotal)
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if vectors is None or rerank <= k:
        return index.search(queries, k)
    _, cand = index.search(queries, min(rerank, index.ntotal))  # (Q, R)
    valid = cand >= 0
    rows = np.asarray(vectors[np.where(valid, cand, 0).ravel()], dtype=np.float32).reshape(*cand.shape, -1)
    exact = np.einsum("qrd,qd->qr", rows, queries)
    exact[~valid] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(exact, order, axis=1)
    ids = np.take_along_axis(cand, order, axis=1)
    ids[~np.isfinite(scores)] = -1
    return scores.astype(np.float32), ids
