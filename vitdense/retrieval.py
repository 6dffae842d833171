"""Global image descriptors and an on-disk faiss index for image retrieval (DINO, Caron et al. 2021, §4.2).

Shapes:
    N  images in the collection (index)   Q  query images   B  images in a batch
    T  patch tokens of one image            D  channels of a token   D'  channels of a global descriptor
    K  results per query

Pipeline: image → (resize, normalise) → ViT → last-layer tokens after the final LayerNorm → global
descriptor (CLS token, GeM-pooled patch tokens, or both concatenated), optionally averaged over the scales
1, 1/√2, 1/2 → L2-normalised (D',) vector → faiss inner-product index (exact ``IndexFlatIP``, or
``IndexIVFPQ`` for collections that do not fit in memory, optionally re-ranked with exact scores).

The index folder holds

    index.json           settings (descriptor config, backbone identity), one entry per image
                         (path, size, mtime, sha256), skipped files, faiss settings; written last
    vectors-G.npy        (N, D') float32 descriptors (memory-mapped for re-ranking and re-indexing)
    faiss-G.index        the faiss index over those vectors

where G is a generation number bumped by every save, so a reader never sees the json of one save with the
vectors of another (files are written atomically, json last; older generations are deleted afterwards).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .backbones import atomic_write
from .descriptors import DESCRIPTORS, DTYPES, MULTISCALES, DescriptorConfig, faiss_search  # noqa: F401
from .errors import ConfigError, DataError, ImageError
from .extractor import ViTExtractor, resize_size
from .io import load_image, to_rgb

LOG = logging.getLogger(__name__)

INDEX_VERSION = 1


# ============================================================================ global descriptors

def gem(tokens: torch.Tensor, p: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling (Radenović et al. 2018) of tokens (B, T, D) → (B, D).

    ``(mean_t max(x, eps)^p)^(1/p)``; values are clamped at ``eps`` first, as DINO does, so negative
    channels contribute nothing.
    """
    return tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def global_descriptors(extractor: ViTExtractor, batch: torch.Tensor, config: DescriptorConfig) -> torch.Tensor:
    """L2-normalised global descriptors (B, D') of a normalised image batch (B, 3, H, W).

    D' = D for "cls" and "gem", 2D for "both". With ``config.multiscale`` the batch is also resized
    (bilinear, as DINO) by 1/√2 and 1/2 and the un-normalised descriptors of the three scales are
    averaged before the L2 normalisation.
    """
    return global_and_patch_descriptors(extractor, batch, config, patches=False)[0]


def global_and_patch_descriptors(extractor: ViTExtractor, batch: torch.Tensor, config: DescriptorConfig,
                                 patches: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`global_descriptors` (B, D') and, from the same forward pass, the patch tokens (B, h, w, D) they
    were pooled from (``config.layer``, after the final LayerNorm, no CLS, scale 1; None unless ``patches``)."""
    if config.descriptor in ("cls", "both") and not extractor.has_cls:
        raise ConfigError(f"model {extractor.model_type} has no CLS token: use --descriptor gem")
    layer = extractor.layer_index(config.layer)
    norm = getattr(extractor.model, "norm", None)
    total, grid_tokens = None, None
    scales = MULTISCALES if config.multiscale else (1.0,)
    for scale in scales:
        inp = batch if scale == 1.0 else F.interpolate(batch, scale_factor=scale, mode="bilinear",
                                                       align_corners=False)
        if min(inp.shape[-2:]) < extractor.p:
            raise ImageError(f"image of {inp.shape[-1]}x{inp.shape[-2]} px at scale {scale:.2f} is smaller than "
                             f"one {extractor.p}-px patch: use a larger --load-size or no --multiscale")
        feats = extractor.extract(inp, [layer], "token", include_cls=extractor.has_cls)
        tokens = feats.descriptors[layer]  # (B, [1 +] T, D)
        if norm is not None:
            tokens = norm(tokens)
        if patches and scale == 1.0:
            h, w = feats.num_patches
            grid_tokens = tokens[:, int(extractor.has_cls):].reshape(len(tokens), h, w, -1)
        parts = []
        if config.descriptor in ("cls", "both"):
            parts.append(tokens[:, 0])
        if config.descriptor in ("gem", "both"):
            parts.append(gem(tokens[:, int(extractor.has_cls):], config.gem_p))
        desc = torch.cat(parts, dim=1).float()
        total = desc if total is None else total + desc
    return F.normalize(total / len(scales), dim=1), grid_tokens


# ============================================================================ data loading

def preprocess_image(image: Image.Image, config: DescriptorConfig, mean: Sequence[float],
                     std: Sequence[float]) -> torch.Tensor:
    """Resize (LANCZOS) and normalise one RGB PIL image as ``config`` says → (3, H, W) float tensor."""
    if config.load_size is None:
        size = (image.height, image.width)
    elif config.square:
        size = (config.load_size, config.load_size)
    else:
        size = resize_size((image.height, image.width), config.load_size)
    if size != (image.height, image.width):
        image = image.resize((size[1], size[0]), Image.LANCZOS)
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class ImageListDataset(Dataset):
    """Images of a list of paths (or PIL images), preprocessed for global descriptors.

    Item i is ``(tensor (3, H, W) or None, i, reason)``: unreadable files give None and the reason
    instead of raising, so one bad file does not stop a long indexing run.
    """

    def __init__(self, items: Sequence[str | os.PathLike | Image.Image], config: DescriptorConfig,
                 mean: Sequence[float], std: Sequence[float]):
        self.items = list(items)
        self.config, self.mean, self.std = config, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        item = self.items[i]
        try:
            image = to_rgb(item) if isinstance(item, Image.Image) else load_image(item)
            return preprocess_image(image, self.config, self.mean, self.std), i, ""
        except ImageError as err:
            return None, i, str(err).split(": ", 1)[-1]


def _keep_list(batch: list) -> list:
    """DataLoader collate that keeps the items as a list (images of different sizes cannot be stacked)."""
    return batch


@dataclass
class Embeddings:
    """Result of :func:`embed_images`: descriptors of the readable images and the skipped ones.

    vectors: (N_ok, D') float32, L2-normalised; indices: (N_ok,) positions of those images in the input;
    skipped: (position, reason) of the inputs that could not be read.
    """

    vectors: np.ndarray
    indices: np.ndarray
    skipped: list[tuple[int, str]] = field(default_factory=list)


def embed_images(extractor: ViTExtractor, items: Sequence[str | os.PathLike | Image.Image],
                 config: DescriptorConfig, batch_size: int = 16, num_workers: int = 0,
                 progress: bool = True, desc: str = "embed",
                 on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Embeddings:
    """Global descriptors of many images, loaded by a DataLoader (``num_workers`` processes).

    Images of equal size after resizing are run through the network together; with ``square=True`` (or
    images of one shape) that is the whole batch. ``on_batch(vectors (b, D'), indices (b,))`` is called
    after each batch (used for periodic checkpoints of long indexing runs).
    """
    from tqdm import tqdm

    if config.stride is not None and extractor.stride != (config.stride, config.stride):
        raise ConfigError(f"descriptor config asks for stride {config.stride}, the extractor has "
                          f"{extractor.stride[0]}")
    if getattr(torch, config.dtype) != extractor.dtype:
        raise ConfigError(f"descriptor config asks for --dtype {config.dtype}, the extractor runs in "
                          f"{str(extractor.dtype).removeprefix('torch.')}")
    dataset = ImageListDataset(items, config, extractor.mean, extractor.std)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_keep_list,
                        persistent_workers=False)
    vectors: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    skipped: list[tuple[int, str]] = []
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            groups: dict[tuple[int, ...], list[tuple[torch.Tensor, int]]] = {}
            for tensor, i, reason in batch:
                if tensor is None:
                    skipped.append((i, reason))
                else:
                    groups.setdefault(tuple(tensor.shape), []).append((tensor, i))
            for group in groups.values():
                stacked = torch.stack([t for t, _ in group])
                vec = global_descriptors(extractor, stacked, config).cpu().numpy().astype(np.float32)
                idx = np.array([i for _, i in group], dtype=np.int64)
                vectors.append(vec)
                indices.append(idx)
                if on_batch is not None:
                    on_batch(vec, idx)
            bar.update(len(batch))
    if vectors:
        vecs, idx = np.concatenate(vectors), np.concatenate(indices)
        order = np.argsort(idx, kind="stable")
        vecs, idx = vecs[order], idx[order]
    else:
        vecs, idx = np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return Embeddings(vecs, idx, sorted(skipped))


# ============================================================================ backbone identity

def backbone_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's parameters and buffers (names, shapes, values): equal iff same weights."""
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def backbone_identity(extractor: ViTExtractor, weights: str | os.PathLike | None = None,
                      model_arg: str | None = None) -> dict[str, Any]:
    """What the index records about the network: name, the --model/--weights it was loaded with (so a
    search can rebuild it), parameter fingerprint, patch size, width, stride."""
    return {"model": extractor.model_type, "model_arg": model_arg,
            "weights": str(Path(weights).resolve()) if weights else None,
            "weights_used": getattr(extractor, "weights_used", None),
            "fingerprint": backbone_fingerprint(extractor.model), "patch_size": extractor.p,
            "embed_dim": extractor.embed_dim, "stride": extractor.stride[0]}


# ============================================================================ faiss index

@dataclass(frozen=True)
class FaissConfig:
    """Which faiss index to build.

    kind: "flat" (exact inner product) or "ivfpq" (inverted lists + product quantisation).
    nlist: IVF cells (None: 4·√N, clamped so each cell gets ≥ 39 training vectors, faiss' minimum).
    m: PQ sub-quantisers (bytes per vector at 8 bits; must divide D'). None: D'/4 → 1/16 of float32.
    nbits: bits per sub-quantiser code.
    nprobe: IVF cells visited per query.
    rerank: candidates re-scored with the exact vectors (0: off); the final top K come from those.
    """

    kind: str = "flat"
    nlist: int | None = None
    m: int | None = None
    nbits: int = 8
    nprobe: int = 32
    rerank: int = 100

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivfpq"):
            raise ConfigError(f"faiss index kind '{self.kind}': use flat or ivfpq")

    def check(self, dim: int) -> None:
        """ConfigError for settings that cannot work with descriptors of ``dim`` channels (checked before
        any image is embedded, so a long run does not fail at its end)."""
        if self.kind == "flat":
            return
        for name, value in (("--nlist", self.nlist), ("--pq-m", self.m), ("--nprobe", self.nprobe)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} {value}: must be at least 1")
        if not 1 <= self.nbits <= 16:
            raise ConfigError(f"PQ code bits {self.nbits}: must be in 1..16")
        if self.rerank < 0:
            raise ConfigError.argument("rerank", self.rerank, "must be 0 (off) or more")
        m = self.m or max(1, dim // 4)
        if dim % m:
            raise ConfigError.argument("m", m, f"must divide the descriptor dimension {dim}")

    def resolved(self, n: int, dim: int) -> "FaissConfig":
        """Concrete nlist/m for n vectors of dim channels."""
        if self.kind == "flat":
            return self
        nlist = self.nlist or int(4 * math.sqrt(max(n, 1)))
        nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))
        m = self.m or max(1, dim // 4)
        if dim % m:
            raise ConfigError.argument("m", m, f"must divide the descriptor dimension {dim}")
        # k-means needs at least as many training vectors as centroids: small collections get fewer bits.
        nbits = max(1, min(self.nbits, int(math.log2(max(n, 2)))))
        return FaissConfig(self.kind, nlist, m, nbits, self.nprobe, self.rerank)


def build_faiss(vectors: np.ndarray, config: FaissConfig, trained: Any = None, seed: int = 0) -> Any:
    """A faiss inner-product index over vectors (N, D').

    IVF-PQ is trained on (a sample of 64 vectors per cell, at least 10k, of) the vectors, unless ``trained`` is a
    trained IVF-PQ index of the same shape, whose quantisers are then reused (incremental re-indexing).
    """
    import faiss

    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if config.kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index
    cfg = config.resolved(n, dim)
    reusable = (trained is not None and isinstance(trained, faiss.IndexIVFPQ) and trained.is_trained
                and trained.d == dim and trained.pq.M == cfg.m and trained.pq.nbits == cfg.nbits
                and cfg.nlist / 2 <= trained.nlist <= cfg.nlist * 2)  # else the cells no longer fit N
    if reusable:
        index = trained
        index.reset()
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, cfg.nlist, cfg.m, cfg.nbits, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        # 64 vectors per cell: above faiss' minimum of 39, and keeps k-means affordable at millions of vectors
        n_train = min(n, max(64 * cfg.nlist, 10_000))
        sample = vectors if n_train == n else vectors[np.sort(rng.choice(n, n_train, replace=False))]
        index.cp.seed = seed
        index.train(sample)
    index.add(vectors)
    index.nprobe = min(cfg.nprobe, cfg.nlist)
    return index


# ============================================================================ the index folder

def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class IndexEntry:
    """One indexed image: where it was and the file state its vector was computed from."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass
class UpdatePlan:
    """What an incremental run must do: reuse vectors of unchanged files, embed new and changed ones.

    reuse: current index row → kept; embed: paths to embed; removed: paths no longer in the collection.
    """

    keep: list[tuple[IndexEntry, int]]
    embed: list[IndexEntry]
    removed: list[str]
    changed: list[str]


@dataclass
class ImageIndex:
    """An image collection's global descriptors and faiss index, stored in a folder (see module doc).

    entries[i] is the image of row i of ``vectors`` (N, D') and of id i in ``index``.
    """

    root: Path
    descriptor: DescriptorConfig
    backbone: dict[str, Any]
    faiss_config: FaissConfig
    entries: list[IndexEntry]
    vectors: np.ndarray
    index: Any = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    complete: bool = True
    generation: int = 0
    source: str | None = None  # the collection folder the images were listed from (None: not recorded)

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, root: str | os.PathLike, mmap: bool = True, load_faiss: bool = True) -> Any:
        """Open an index folder; DataError naming the folder when it is missing, partial or corrupt.

        A folder built by ``vitdense index --embeddings`` (index.json ``kind: sharded``) opens as a
        :class:`vitdense.ShardedIndex` (always memory-mapped, ``mmap``/``load_faiss`` ignored): the same
        ``search``/``ids``/``descriptor``/``check_backbone`` as an ImageIndex, so one call opens either kind.
        """
        import faiss

        root = Path(root)
        meta_path = root / "index.json"
        if not meta_path.is_file():
            raise DataError(f"{root}: not a vitdense index (no index.json); build one with `vitdense index`")
        try:
            meta = json.loads(meta_path.read_text())
            if isinstance(meta, dict) and meta.get("kind") == "sharded":
                # imported here: the collection package builds on this module, not the other way round
                from .collection.index import ShardedIndex

                return ShardedIndex(root)
            gen = int(meta["generation"])
            entries = [IndexEntry(**e) for e in meta["entries"]]
            descriptor = DescriptorConfig.from_dict(meta["descriptor"])
            faiss_config = FaissConfig(**meta["faiss"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{meta_path}: corrupt index metadata ({err}); rebuild the index") from None
        if meta.get("version") != INDEX_VERSION:
            raise DataError(f"{meta_path}: index format version {meta.get('version')}, this vitdense reads "
                            f"{INDEX_VERSION}; rebuild the index")
        vec_path = root / f"vectors-{gen}.npy"
        try:
            vectors = np.load(vec_path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as err:
            raise DataError(f"{vec_path}: cannot read the index vectors ({err}); rebuild the index") from None
        if vectors.shape[0] != len(entries):
            raise DataError(f"{root}: {vectors.shape[0]} vectors for {len(entries)} images; rebuild the index")
        index = None
        if load_faiss and meta["complete"]:
            try:
                index = faiss.read_index(str(root / f"faiss-{gen}.index"))
            except RuntimeError as err:
                raise DataError(f"{root / f'faiss-{gen}.index'}: cannot read the faiss index "
                                f"({str(err).splitlines()[0]}); re-run `vitdense index`") from None
        return cls(root, descriptor, meta["backbone"], faiss_config, entries, vectors, index,
                   meta.get("skipped", []), bool(meta["complete"]), gen, meta.get("source"))

    def check_backbone(self, identity: dict[str, Any]) -> None:
        """ConfigError when ``identity`` (see :func:`backbone_identity`) is not the network the index used."""
        own = self.backbone
        if identity["fingerprint"] != own["fingerprint"] or identity["stride"] != own["stride"]:
            what = f"model '{own['model']}'" + (f" with --weights {own['weights']}" if own.get("weights") else "")
            raise ConfigError(
                f"{self.root}: the index was built with {what} (stride {own['stride']}, weights fingerprint "
                f"{own['fingerprint']}), but the requested backbone is '{identity['model']}' (stride "
                f"{identity['stride']}, fingerprint {identity['fingerprint']}); query with the index's backbone "
                f"or rebuild the index with this one into a new folder")

    def check_descriptor(self, config: DescriptorConfig) -> None:
        """ConfigError when ``config`` differs from the index's descriptor settings (names the options)."""
        ours, theirs = self.descriptor.to_dict(), config.to_dict()
        diff = [f"{k}: index {ours[k]!r} vs requested {theirs[k]!r}" for k in ours if ours[k] != theirs[k]]
        if diff:
            raise ConfigError(f"{self.root}: descriptor settings differ from the index's ({'; '.join(diff)}); "
                              f"use the index's settings or build a new index into another folder")

    # ------------------------------------------------------------------ updating
    def plan_update(self, paths: Sequence[Path]) -> UpdatePlan:
        """Compare files on disk with the entries: unchanged files (same size and mtime, or same content
        hash) keep their vector; new and changed ones are embedded; missing ones are removed."""
        old = {e.path: (e, i) for i, e in enumerate(self.entries)}
        keep, embed, changed = [], [], []
        for path in paths:
            key = str(Path(path).resolve())
            st = os.stat(path)
            if key in old:
                entry, row = old[key]
                if entry.size == st.st_size and entry.mtime_ns == st.st_mtime_ns:
                    keep.append((entry, row))
                    continue
                digest = file_sha256(path)
                if digest == entry.sha256:  # touched, not changed: refresh the recorded state
                    keep.append((IndexEntry(key, st.st_size, st.st_mtime_ns, digest), row))
                    continue
                changed.append(key)
                embed.append(IndexEntry(key, st.st_size, st.st_mtime_ns, digest))
            else:
                embed.append(IndexEntry(key, st.st_size, st.st_mtime_ns, file_sha256(path)))
        seen = {str(Path(p).resolve()) for p in paths}
        removed = [p for p in old if p not in seen]
        return UpdatePlan(keep, embed, removed, changed)

    # ------------------------------------------------------------------ writing
    def save(self, build_index: bool = True) -> None:
        """Write vectors, (when ``build_index``) the faiss index, then index.json, each atomically."""
        import faiss

        gen = self.generation + 1
        vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if build_index:  # built before anything is written: a failure leaves the folder as it was
            if len(vectors) == 0:
                raise DataError(f"{self.root}: no image could be embedded, nothing to index")
            self.index = build_faiss(vectors, self.faiss_config, trained=self.index)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / f"vectors-{gen}.npy", lambda tmp: _save_npy(tmp, vectors))
        if build_index:
            atomic_write(self.root / f"faiss-{gen}.index", lambda tmp: faiss.write_index(self.index, tmp))
        self.complete = build_index
        meta = {"version": INDEX_VERSION, "generation": gen, "complete": self.complete,
                "descriptor": self.descriptor.to_dict(), "backbone": self.backbone,
                "faiss": asdict(self.faiss_config), "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
                "count": len(self.entries), "entries": [asdict(e) for e in self.entries],
                "skipped": self.skipped, "source": self.source, "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
        text = json.dumps(meta, indent=1)
        atomic_write(self.root / "index.json", lambda tmp: Path(tmp).write_text(text + "\n"))
        self.generation = gen
        self.vectors = vectors
        for old in list(self.root.glob("vectors-*.npy")) + list(self.root.glob("faiss-*.index")):
            if old.name not in (f"vectors-{gen}.npy", f"faiss-{gen}.index"):
                old.unlink(missing_ok=True)

    # ------------------------------------------------------------------ searching
    def ids(self, rows: np.ndarray) -> list[str | None]:
        """The image paths of result ids (rows of ``entries``; None for -1), as :meth:`ShardedIndex.ids`."""
        return [self.entries[int(r)].path if r >= 0 else None for r in np.asarray(rows).ravel()]

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k results of queries (Q, D') → (scores (Q, k), ids (Q, k)), ids index ``entries``."""
        if self.index is None:
            raise DataError(f"{self.root}: the index is incomplete (an indexing run was interrupted); "
                            f"re-run `vitdense index` to finish it")
        if queries.shape[1] != self.index.d:
            raise ConfigError(f"{self.root}: query descriptors have {queries.shape[1]} channels, the index "
                              f"{self.index.d}")
        rerank = self.faiss_config.rerank if self.faiss_config.kind == "ivfpq" else 0
        return faiss_search(self.index, queries, k, self.vectors, rerank)


def _save_npy(tmp: str, array: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, array)


def update_index(root: str | os.PathLike, paths: Sequence[Path], extractor: ViTExtractor,
                 descriptor: DescriptorConfig, faiss_config: FaissConfig, weights: str | os.PathLike | None = None,
                 model_arg: str | None = None, batch_size: int = 16, num_workers: int = 0, progress: bool = True,
                 checkpoint_every: int = 2000, source: str | os.PathLike | None = None
                 ) -> tuple[ImageIndex, UpdatePlan]:
    """Create or incrementally update the index folder ``root`` for the images ``paths``.

    An existing index must have been built with the same backbone and descriptor settings (ConfigError
    otherwise). Only new and changed files are embedded; vectors of unchanged files are reused; files no
    longer present are dropped. The progress is saved (vectors and entries, without a faiss index) after
    every ``checkpoint_every`` newly embedded images, or after a quarter of the index's rows when that
    is more (each checkpoint rewrites all vectors, so fixed intervals would cost O(N²) writes on large
    collections; this way the total is O(N) and an interruption loses at most a quarter of the work), so an
    interrupted run resumes where it stopped. Unreadable files are skipped and listed in ``index.skipped``.
    ``source``: the collection folder, recorded so that ``vitdense serve`` serves no file outside it.
    """
    root = Path(root)
    if not paths:
        raise DataError("no images to index")
    faiss_config.check(descriptor.dim(extractor.embed_dim))
    identity = backbone_identity(extractor, weights, model_arg)
    if (root / "index.json").exists():
        current = ImageIndex.load(root, mmap=False, load_faiss=True)
        current.check_backbone(identity)
        current.check_descriptor(descriptor)
        if current.faiss_config.kind != faiss_config.kind:
            LOG.info("switching the faiss index from %s to %s", current.faiss_config.kind, faiss_config.kind)
            current.index = None
        current.faiss_config = faiss_config
    else:
        if root.exists() and any(root.iterdir()):
            raise DataError(f"{root}: folder exists and is not a vitdense index; choose an empty or new --out")
        current = ImageIndex(root, descriptor, identity, faiss_config, [], np.zeros((0, 0), np.float32))
    if source is not None:
        current.source = str(Path(source).resolve())
    plan = current.plan_update(paths)
    kept_rows = [row for _, row in plan.keep]
    entries = [e for e, _ in plan.keep]
    vectors = [np.asarray(current.vectors)[kept_rows]] if kept_rows else []
    done: list[IndexEntry] = []
    pending = {"count": 0}

    def checkpoint(vec: np.ndarray, idx: np.ndarray) -> None:
        vectors.append(vec)
        done.extend(plan.embed[i] for i in idx)
        pending["count"] += len(idx)
        if pending["count"] >= max(checkpoint_every, (len(entries) + len(done)) // 4):
            pending["count"] = 0
            current.entries, current.vectors = entries + done, np.concatenate(vectors)
            current.save(build_index=False)

    try:
        result = embed_images(extractor, [e.path for e in plan.embed], descriptor, batch_size, num_workers,
                              progress, desc="index", on_batch=checkpoint)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: commit every embedded image, a rerun embeds the rest
        if not done:
            raise
        current.entries, current.vectors = entries + done, np.concatenate(vectors)
        current.save(build_index=False)
        raise KeyboardInterrupt(f"kept {len(done)} newly embedded image(s) in {root} ({len(current.entries)} in "
                                f"all); run `vitdense index` again to embed the rest") from None
    skipped = [{"path": plan.embed[i].path, "reason": reason} for i, reason in result.skipped]
    current.entries = entries + done
    current.vectors = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
    current.skipped = skipped
    if not current.entries:
        raise DataError(f"no image could be read ({len(skipped)} skipped, e.g. {skipped[0]['path']}: "
                        f"{skipped[0]['reason']})" if skipped else "no images to index")
    current.save(build_index=True)
    return current, plan

