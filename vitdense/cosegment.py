"""Object and part co-segmentation from ViT descriptors and saliency (Amir et al. 2021, "Deep ViT Features as
Dense Visual Descriptors", sections 4.1 and 4.2; dino-vit-features' cosegmentation.py and
part_cosegmentation.py give the defaults).

Notation: N images; image i has a token grid (h_i, w_i), T_i = h_i * w_i tokens, descriptors (T_i, D) and
saliency (T_i,) in [0, 1]; k clusters of the first stage, K parts; (H_i, W_i) the image size the CRF works
at (the resized image the descriptors came from). Descriptors are compared after L2 normalisation, so
squared distances lie in [0, 4].

Object co-segmentation (:func:`cosegment`):
  1. optional outlier images: cosine similarity of each image's CLS descriptor to the mean one;
  2. k-means (faiss) on every i-th descriptor of every image; k from the elbow rule or given;
  3. each cluster gets a vote from every image in which its tokens' mean saliency exceeds ``thresh``;
     clusters voted for by ``votes_percentage`` % of the images are the common foreground.
Part co-segmentation (:func:`part_cosegment`): k-means of the foreground descriptors into parts; each token
scored against the part centroids and the nearest background centroid; a dense CRF at image resolution
(:mod:`vitdense.crf`). The three-stage variant first clusters the foreground freely, keeps the clusters
present in every image (drops non-common objects), and clusters those into the final parts.

Memory: descriptors are read one image at a time from any sequence (e.g. :class:`DescriptorStore`,
float16, spilled to disk past a RAM budget); k-means sees only a subsample; nothing is ever T × T or
all-images × k.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from .crf import CrfParams, crf_labels, grabcut_mask, refine_mask

LOG = logging.getLogger("vitdense.cosegment")

# dino-vit-features' defaults.
ELBOW = 0.975            # first-stage elbow coefficient
PART_ELBOW = 0.94        # elbow coefficient when the number of parts is chosen automatically
SALIENCY_THRESH = 0.065  # a cluster is salient in an image when its mean saliency there exceeds this
VOTES_PERCENTAGE = 75    # ... in at least this percentage of the images
SAMPLE_INTERVAL = 100    # k-means is trained on every 100th descriptor
MAX_CLUSTERS = 14        # the elbow search tries k = 1 .. 14
OUTLIER_THRESH = 0.7     # cosine similarity of an image's CLS descriptor to the mean below which it is an outlier
FAISS_SEED = 1234       # faiss.Kmeans' default seed, the one the reference runs with: seed s runs FAISS_SEED + s
SINGLE_THREAD_WORK = 2_000_000  # k-means with fewer points x clusters runs on one thread (see kmeans)
MAX_SQDIST = 4.0         # largest squared distance between unit vectors: the energy of "no such cluster"
# The pipeline's steps, dino-vit-features' way by default (measured against the other choices on the report
# card: apps/ablate_cosegment.py and the README's "Differences from the reference implementations").
MIN_SAMPLE = 0           # lower the sample interval so k-means sees at least this many descriptors (0: never)
ELBOW_K = "after"        # which k the elbow rule keeps (see choose_k)
ELBOW_OBJECTIVE = "all"  # what the elbow rule's objective is measured on (see elbow_objective)
SALIENCY_RES = "low"     # dino-vit-features' half-size saliency pass, or the descriptors' own ("full")
REFINE = "grabcut"       # refinement of the object masks at image resolution (see refine_objects)
REFINEMENTS = ("grabcut", "crf", "none")
ELBOW_KS = ("after", "before")           # see choose_k
ELBOW_OBJECTIVES = ("all", "heldout")    # see elbow_objective
SALIENCY_RESOLUTIONS = ("low", "full")   # see low_res_saliency


# ---------------------------------------------------------------------------------------------- storage

def unit(x: np.ndarray) -> np.ndarray:
    """Rows of x (T, D) as float32 unit vectors (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class DescriptorStore(Sequence):
    """Per-image descriptors (T_i, D), L2-normalised and kept as float16.

    Images are held in RAM until ``ram_mb`` is used; later ones go to ``.npy`` files in a temporary folder
    and are read back memory-mapped, so hundreds of images (or log-binned descriptors, D = 6528) fit.
    ``store[i]`` is a float16 (T_i, D) array. Use as a context manager, or call :meth:`close`, to delete the
    folder.
    """

    def __init__(self, ram_mb: float = 1024.0, tmp_dir: str | Path | None = None):
        self._budget = int(ram_mb * 2**20)
        self._in_ram = 0
        self._items: list[np.ndarray | Path] = []
        self._tmp_parent = tmp_dir
        self._tmp: Path | None = None

    def append(self, desc: np.ndarray) -> None:
        """Add one image's descriptors (T, D) (any float dtype; normalised here)."""
        arr = unit(desc).astype(np.float16)
        if self._in_ram + arr.nbytes <= self._budget:
            self._items.append(arr)
            self._in_ram += arr.nbytes
            return
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="vitdense-desc-", dir=self._tmp_parent))
        path = self._tmp / f"{len(self._items)}.npy"
        np.save(path, arr)
        self._items.append(path)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        item = self._items[i]
        return item if isinstance(item, np.ndarray) else np.load(item, mmap_mode="r")

    def __len__(self) -> int:
        return len(self._items)

    @property
    def spilled(self) -> int:
        """How many images live on disk."""
        return sum(isinstance(item, Path) for item in self._items)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._items = []

    def __enter__(self) -> "DescriptorStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- k-means

def effective_interval(total: int, interval: int, min_sample: int) -> int:
    """Sampling interval for ``total`` descriptors: ``interval``, lowered so at least ``min_sample`` are kept."""
    return max(1, min(interval, total // max(1, min_sample)))


def subsample(descriptors: Sequence[np.ndarray], interval: int, offset: int = 0,
              masks: Sequence[np.ndarray | None] | None = None, images: Sequence[int] | None = None) -> np.ndarray:
    """Every ``interval``-th descriptor (from ``offset``) of each image, unit-normalised → (M, D) float32.

    masks: optional per image (T_i,) bool selecting the tokens to sample from (e.g. the foreground);
    images: indices of the images to sample (default all).
    """
    picked = []
    for i in (range(len(descriptors)) if images is None else images):
        desc = descriptors[i]
        if masks is not None and masks[i] is not None:
            desc = np.asarray(desc)[np.asarray(masks[i], dtype=bool).reshape(-1)]
        picked.append(unit(np.asarray(desc)[offset::interval]))
    if not picked:
        return np.zeros((0, 0), np.float32)
    return np.ascontiguousarray(np.concatenate(picked))


def sq_distances(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Squared Euclidean distances (T, k) of rows x (T, D) to centroids (k, D); rows processed in chunks."""
    x = np.asarray(x, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    c_sq = (c * c).sum(axis=1)
    out = np.empty((x.shape[0], c.shape[0]), np.float32)
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk]
        out[start:start + chunk] = (part * part).sum(axis=1, keepdims=True) + c_sq - 2.0 * part @ c.T
    return np.maximum(out, 0.0, out=out)


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: (labels (T,) int64, squared distances (T,) float32)."""
    dist = sq_distances(x, centroids)
    labels = dist.argmin(axis=1)
    return labels, dist[np.arange(len(labels)), labels]


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 300, nredo: int = 10) -> np.ndarray:
    """Centroids (k, D) of faiss k-means on x (M, D) float32; deterministic for a seed.

    As dino-vit-features calls it: faiss' defaults (seed 0 here is faiss' seed 1234; beyond 256 points per
    centroid faiss trains on a random subsample of that many, drawn with the seed), 300 iterations
    (niter), best of 10 restarts (nredo). The same seed and points give the reference's centroids.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    assert 1 <= k <= len(x), (k, len(x))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=FAISS_SEED + seed, verbose=False,
                      min_points_per_centroid=1)
    threads = faiss.omp_get_max_threads()
    if len(x) * k < SINGLE_THREAD_WORK:
        # OpenMP fan-out costs more than it saves on a subsample this small: on a busy 2-core machine
        # 2 threads were 20x slower than 1 (threads spin waiting for each other).
        faiss.omp_set_num_threads(1)
    try:
        km.train(x)
    finally:
        faiss.omp_set_num_threads(threads)
    return np.asarray(km.centroids, dtype=np.float32).copy()


def first_stall(objectives: Sequence[float], elbow: float) -> int | None:
    """The first k > 1 that improves the objective by less than 1 − elbow on k − 1, i.e.
    ``objectives[k - 1] > elbow * objectives[k - 2]`` (objectives[j]: the k-means objective with j + 1
    clusters); None when every k tried still paid."""
    for k in range(2, len(objectives) + 1):
        if objectives[k - 2] <= 1e-12 or objectives[k - 1] > elbow * objectives[k - 2]:
            return k
    return None


def choose_k(objectives: Sequence[float], elbow: float, elbow_k: str = ELBOW_K) -> int:
    """Elbow rule: the number of clusters from the objectives of k = 1, 2, ... (see :func:`first_stall`).

    elbow_k "after": the stalling k itself (dino-vit-features: its loop stops there and keeps what it
    fitted); "before": k − 1, the last k that still paid. The largest k tried when nothing stalls.
    """
    if elbow_k not in ELBOW_KS:
        raise ValueError(f"elbow_k {elbow_k!r}: choose from {', '.join(ELBOW_KS)}")
    stall = first_stall(objectives, elbow)
    if stall is None:
        return len(objectives)
    return stall if elbow_k == "after" else stall - 1


@dataclass
class Clustering:
    """k-means result. centroids (k, D); objectives[j]: mean squared distance of the held-out sample to
    the nearest of j + 1 centroids (only the k tried); sample: how many descriptors trained it."""

    centroids: np.ndarray
    objectives: list[float]
    sample: int

    @property
    def k(self) -> int:
        return len(self.centroids)


def fit_clusters(train: np.ndarray, objective: Callable[[np.ndarray], float] | None = None,
                 n_clusters: int | None = None, elbow: float = ELBOW, max_clusters: int = MAX_CLUSTERS,
                 seed: int = 0, niter: int = 300, nredo: int = 10, elbow_k: str = ELBOW_K) -> Clustering:
    """k-means of train (M, D) with k given or chosen by :func:`choose_k`.

    objective(centroids) → the mean squared distance the elbow rule compares (default: over ``train``);
    see :func:`mean_sq_distance` for the descriptors of a whole set, one image at a time.
    """
    objective = objective or (lambda centroids: float(assign(train, centroids)[1].mean()))
    if n_clusters is not None:
        k = max(1, min(n_clusters, len(train)))
        centroids = kmeans(train, k, seed, niter, nredo)
        return Clustering(centroids, [objective(centroids)], len(train))
    objectives: list[float] = []
    fitted: list[np.ndarray] = []
    for k in range(1, min(max_clusters, len(train)) + 1):
        fitted.append(kmeans(train, k, seed, niter, nredo))
        objectives.append(objective(fitted[-1]))
        if first_stall(objectives, elbow) is not None:
            return Clustering(fitted[choose_k(objectives, elbow, elbow_k) - 1], objectives, len(train))
    return Clustering(fitted[-1], objectives, len(train))


def mean_sq_distance(descriptors: Sequence[np.ndarray], centroids: np.ndarray, images: Sequence[int],
                     masks: Sequence[np.ndarray | None] | None = None) -> float:
    """Mean squared distance of every (masked) descriptor of ``images`` to its nearest centroid, read one
    image at a time: the k-means objective over the whole set, which dino-vit-features' elbow rule uses."""
    total, count = 0.0, 0
    for i in images:
        desc = np.asarray(descriptors[i])
        if masks is not None and masks[i] is not None:
            desc = desc[np.asarray(masks[i], dtype=bool).reshape(-1)]
        if len(desc):
            total += float(assign(unit(desc), centroids)[1].sum(dtype=np.float64))
            count += len(desc)
    return total / max(count, 1)


def elbow_objective(descriptors: Sequence[np.ndarray], images: Sequence[int], interval: int, mode: str,
                    masks: Sequence[np.ndarray | None] | None = None) -> Callable[[np.ndarray], float] | None:
    """The objective :func:`fit_clusters` compares: "all" descriptors (:func:`mean_sq_distance`), or a
    "heldout" sample, every ``interval``-th descriptor half an interval after the training sample (an
    unbiased estimate at 1/interval of the cost; None = the training sample itself when interval is 1)."""
    if mode not in ELBOW_OBJECTIVES:
        raise ValueError(f"elbow objective {mode!r}: choose from {', '.join(ELBOW_OBJECTIVES)}")
    if mode == "all":
        return lambda centroids: mean_sq_distance(descriptors, centroids, images, masks)
    if interval == 1:
        return None
    heldout = subsample(descriptors, interval, interval // 2, masks, images)
    return lambda centroids: float(assign(heldout, centroids)[1].mean())


def order_by_count(counts: np.ndarray) -> np.ndarray:
    """Permutation putting clusters in decreasing order of ``counts`` (ties: lower index first).

    ``order[new] = old``; relabel with ``np.argsort(order)[old_labels]``. Used so part 1 is the largest part
    in every run, whatever order k-means returned its centroids in.
    """
    return np.lexsort((np.arange(len(counts)), -np.asarray(counts)))


# ---------------------------------------------------------------------------------------------- saliency

def low_res_saliency(extractor: Any, image: Any, size: tuple[int, int] | None, grid: tuple[int, int]
                     ) -> np.ndarray:
    """dino-vit-features' co-segmentation saliency of one image → (h * w,) float32 on the descriptors' grid.

    The image (a path, PIL image or array) is resized to half of ``size`` (H, W), the size the descriptors
    were extracted at (None: its own size, unhalved, as the reference does without a load size), run
    through the same model at stride = patch size, and its saliency map is resized to ``grid`` (h, w)
    by nearest neighbour (PIL's NEAREST, as the reference). About 1/16 of the
    tokens of a stride-4 pass: cheap, and coarser than the stride-4 saliency.
    """
    from PIL import Image

    view = extractor.at_stride(None)
    half = None if size is None else tuple(max(view.p, s // 2) for s in size)
    batch, _ = view.preprocess(image, half)
    sal = view.extract_saliency_maps(batch.to(view.device))[0].float().cpu().numpy()
    coarse = view.grid_size(tuple(batch.shape[-2:]))
    # PIL itself: its NEAREST differs from torch's "nearest-exact" where a pixel centre falls on a boundary
    out = Image.fromarray(sal.reshape(coarse).astype(np.float32)).resize((grid[1], grid[0]), Image.NEAREST)
    return np.asarray(out, dtype=np.float32).reshape(-1)


# ---------------------------------------------------------------------------------------------- voting

def cluster_saliency(labels: Sequence[np.ndarray], saliency: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Mean saliency (N, k) of each cluster's tokens in each image; NaN where a cluster has no token."""
    out = np.full((len(labels), k), np.nan, np.float64)
    for i, (lab, sal) in enumerate(zip(labels, saliency)):
        lab = np.asarray(lab).reshape(-1)
        count = np.bincount(lab, minlength=k)[:k]
        total = np.bincount(lab, weights=np.asarray(sal, np.float64).reshape(-1), minlength=k)[:k]
        present = count > 0
        out[i, present] = total[present] / count[present]
    return out


def vote_salient(mean_saliency: np.ndarray, thresh: float = SALIENCY_THRESH,
                 votes_percentage: float = VOTES_PERCENTAGE, voters: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Saliency votes: (votes (k,) int, salient (k,) bool).

    mean_saliency: (N, k) from :func:`cluster_saliency`; voters: (N,) bool, the images allowed to vote
    (default all). A cluster is salient when at least ceil(n_voters * votes_percentage / 100) voters see it
    with mean saliency above ``thresh`` (absent clusters do not vote).
    """
    voters = np.ones(len(mean_saliency), bool) if voters is None else np.asarray(voters, bool)
    with np.errstate(invalid="ignore"):
        votes = (np.nan_to_num(mean_saliency[voters], nan=-np.inf) > thresh).sum(axis=0)
    needed = math.ceil(int(voters.sum()) * votes_percentage / 100)
    return votes.astype(np.int64), votes >= needed


def cls_inliers(cls: np.ndarray, thresh: float = OUTLIER_THRESH) -> np.ndarray:
    """Images whose CLS descriptor (N, D) has cosine similarity >= thresh to the mean CLS → (N,) bool."""
    cls = np.asarray(cls, dtype=np.float64)
    mean = cls.mean(axis=0)
    sims = cls @ mean / np.maximum(np.linalg.norm(cls, axis=1) * np.linalg.norm(mean), 1e-12)
    return sims >= thresh


# ---------------------------------------------------------------------------------------------- object co-segmentation

@dataclass
class CosegResult:
    """Object co-segmentation on the token grids.

    masks: per image (h_i, w_i) bool foreground; labels: per image (h_i, w_i) cluster index (−1 for
    outlier images); clustering: the first-stage k-means; votes (k,), salient (k,) bool;
    mean_saliency (N, k); inliers (N,) bool; voters (N,) bool (inlier originals, not augmentations).
    """

    masks: list[np.ndarray]
    labels: list[np.ndarray]
    clustering: Clustering
    votes: np.ndarray
    salient: np.ndarray
    mean_saliency: np.ndarray
    inliers: np.ndarray
    voters: np.ndarray
    grids: list[tuple[int, int]] = field(default_factory=list)

    @property
    def fg_centroids(self) -> np.ndarray:
        return self.clustering.centroids[self.salient]

    @property
    def bg_centroids(self) -> np.ndarray:
        return self.clustering.centroids[~self.salient]


def cosegment(descriptors: Sequence[np.ndarray], saliency: Sequence[np.ndarray], grids: Sequence[tuple[int, int]],
              n_clusters: int | None = None, elbow: float = ELBOW, thresh: float = SALIENCY_THRESH,
              votes_percentage: float = VOTES_PERCENTAGE, sample_interval: int = SAMPLE_INTERVAL,
              min_sample: int = MIN_SAMPLE, max_clusters: int = MAX_CLUSTERS, inliers: np.ndarray | None = None,
              voters: np.ndarray | None = None, seed: int = 0, niter: int = 300, nredo: int = 10,
              elbow_k: str = ELBOW_K, elbow_objective_on: str = ELBOW_OBJECTIVE, progress: bool = False
              ) -> CosegResult:
    """Common-object masks on the token grids of N images.

    descriptors: per image (T_i, D) (any sequence; read one image at a time); saliency: per image (T_i,);
    grids: per image (h_i, w_i). n_clusters: k, or None for the elbow rule with ``elbow``. The k-means
    sample is every ``sample_interval``-th descriptor (fewer when that would give under ``min_sample``);
    ``elbow_k`` and ``elbow_objective_on`` ("all" descriptors or a "heldout" sample) choose the variant of
    the elbow rule (:func:`choose_k`, :func:`elbow_objective`). inliers: (N,) bool, images to segment
    (others get empty masks; see :func:`cls_inliers`); voters: (N,) bool, images that vote (default: the
    inliers; crop augmentations should not vote).
    """
    n = len(descriptors)
    assert len(saliency) == n and len(grids) == n, (n, len(saliency), len(grids))
    inliers = np.ones(n, bool) if inliers is None else np.asarray(inliers, bool)
    voters = inliers.copy() if voters is None else np.asarray(voters, bool) & inliers
    members = np.flatnonzero(inliers)
    total = sum(int(np.prod(grids[i])) for i in members)
    interval = effective_interval(total, sample_interval, min_sample)
    train = subsample(descriptors, interval, 0, images=members)
    objective = elbow_objective(descriptors, members, interval, elbow_objective_on)
    clustering = fit_clusters(train, objective, n_clusters, elbow, max_clusters, seed, niter, nredo, elbow_k)
    LOG.info("k-means: k=%d from %d sampled descriptors (interval %d)", clustering.k, len(train), interval)

    labels: list[np.ndarray] = []
    for i in tqdm(range(n), desc="assign", unit="img", disable=not progress):
        if inliers[i]:
            labels.append(assign(unit(descriptors[i]), clustering.centroids)[0].reshape(grids[i]))
        else:
            labels.append(np.full(tuple(grids[i]), -1, np.int64))
    mean_sal = cluster_saliency([labels[i] for i in members], [saliency[i] for i in members], clustering.k)
    full_sal = np.full((n, clustering.k), np.nan)
    full_sal[members] = mean_sal
    votes, salient = vote_salient(full_sal, thresh, votes_percentage, voters)
    if not salient.any():
        LOG.warning("no cluster is salient in %s%% of the images: the masks are empty (lower --votes-percentage "
                    "or --thresh)", votes_percentage)
    masks = [np.isin(lab, np.flatnonzero(salient)) for lab in labels]
    return CosegResult(masks, labels, clustering, votes, salient, full_sal, inliers, voters,
                       [tuple(map(int, g)) for g in grids])


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Token-grid mask (h, w) → soft foreground fraction (H, W) float32 in [0, 1] (bilinear)."""
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def refine_objects(images: Sequence[np.ndarray | None], result: CosegResult, method: str = REFINE,
                   confidence: float = 0.7, progress: bool = False) -> list[np.ndarray]:
    """Object masks at image resolution: per image (H_i, W_i) bool.

    images: per image (H_i, W_i, 3) uint8, the resized image the descriptors came from (None: skip that
    image, its mask is upsampled only). method: "crf" (dense CRF of the bilinearly upsampled mask,
    :func:`vitdense.crf.refine_mask`), "grabcut" (dino-vit-features' refinement: GrabCut of the mask
    upsampled by nearest neighbour) or "none" (bilinear upsampling and a 0.5 threshold). Outlier images get
    empty masks.
    """
    from PIL import Image

    if method not in REFINEMENTS:
        raise ValueError(f"unknown refinement {method!r}")
    out = []
    for i, image in enumerate(tqdm(images, desc=method if method != "none" else "upsample", unit="img",
                                   disable=not progress)):
        size = tuple(np.asarray(image).shape[:2]) if image is not None else result.grids[i]
        if method == "grabcut":  # as the reference: the token mask resized by nearest neighbour
            mask = np.asarray(Image.fromarray(result.masks[i]).resize(size[::-1], Image.NEAREST), bool)
            out.append(grabcut_mask(image, mask) if result.inliers[i] and image is not None else mask)
            continue
        soft = upsample_mask(result.masks[i], size)
        if not result.inliers[i] or image is None or method == "none" or not result.masks[i].any():
            out.append(soft >= 0.5)
        else:
            out.append(refine_mask(image, soft, confidence))
    return out


# ---------------------------------------------------------------------------------------------- parts

def part_energies(desc: np.ndarray, part_centroids: np.ndarray, bg_centroids: np.ndarray) -> np.ndarray:
    """Energies (T, 1 + K): squared distance to the nearest background centroid, then to each part centroid.

    Column index = output label (0 background, 1..K parts). No background centroid → energy 4 (the maximum).
    """
    x = unit(desc)
    bg = sq_distances(x, bg_centroids).min(axis=1) if len(bg_centroids) else np.full(len(x), MAX_SQDIST)
    return np.concatenate([bg[:, None], sq_distances(x, part_centroids)], axis=1).astype(np.float32)


@dataclass
class PartResult:
    """Part co-segmentation.

    parts: per image (H_i, W_i) int16 labels at image resolution (0 background, 1..K parts, the same part
    the same label in every image; (h_i, w_i) when no image was given); coseg: the object stage;
    clustering: the final part k-means (centroids ordered by size, part 1 the largest); stage2: the free
    foreground clustering of the three-stage variant (None otherwise) and common: its clusters kept.
    """

    parts: list[np.ndarray]
    coseg: CosegResult
    clustering: Clustering
    stage2: Clustering | None = None
    common: np.ndarray | None = None

    @property
    def k(self) -> int:
        return self.clustering.k


def _part_labels(descriptors: Sequence[np.ndarray], grids: Sequence[tuple[int, int]],
                 images: Sequence[np.ndarray | None], part_centroids: np.ndarray, bg_centroids: np.ndarray,
                 use: np.ndarray, crf: CrfParams | None, progress: bool, desc: str, on_grid: bool = False
                 ) -> list[np.ndarray | None]:
    """Per image (``use[i]``) labels 0..K at image resolution (CRF), or on the grid when there is no image;
    ``on_grid``: CRF labels brought back to the token grid (nearest), so only grid-sized maps are kept."""
    out: list[np.ndarray | None] = []
    for i in tqdm(range(len(descriptors)), desc=desc, unit="img", disable=not progress):
        if not use[i]:
            out.append(None)
            continue
        energies = part_energies(descriptors[i], part_centroids, bg_centroids).reshape(*grids[i], -1)
        labels = energies.argmin(axis=-1) if images[i] is None else crf_labels(images[i], energies, crf)
        out.append((_to_grid(labels, grids[i]) if on_grid else labels).astype(np.int16))
    return out


def _to_grid(labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Label map (H, W) or (h, w) → (h, w), nearest neighbour."""
    if labels.shape == tuple(grid):
        return labels
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(labels.astype(np.float32))[None, None]
    return F.interpolate(t, size=tuple(grid), mode="nearest")[0, 0].numpy().astype(np.int64)


def part_cosegment(descriptors: Sequence[np.ndarray], saliency: Sequence[np.ndarray],
                   grids: Sequence[tuple[int, int]], images: Sequence[np.ndarray | None] | None = None,
                   n_parts: int | None = 4, three_stages: bool = False, part_elbow: float = PART_ELBOW,
                   crf: CrfParams | None = CrfParams(), coseg: CosegResult | None = None, seed: int = 0,
                   niter: int = 300, nredo: int = 10, sample_interval: int = SAMPLE_INTERVAL,
                   min_sample: int = MIN_SAMPLE, max_clusters: int = MAX_CLUSTERS, elbow_k: str = ELBOW_K,
                   elbow_objective_on: str = ELBOW_OBJECTIVE, progress: bool = False,
                   **coseg_options: object) -> PartResult:
    """Common parts of the common object.

    descriptors/saliency/grids as for :func:`cosegment` (its options pass through ``coseg_options``, or
    give an existing ``coseg``); images: per image (H_i, W_i, 3) uint8 resized images for the CRF, or None
    entries (e.g. crop augmentations, which are clustered but get grid labels only). n_parts: K, or None
    for the elbow rule with ``part_elbow``. three_stages: cluster the foreground with the elbow rule, keep
    the clusters present (after the CRF) in every voting image, cluster their tokens into K parts; the
    background of the final CRF is then the first-stage background plus the dropped clusters.
    """
    n = len(descriptors)
    images = [None] * n if images is None else list(images)
    if coseg is None:
        coseg = cosegment(descriptors, saliency, grids, sample_interval=sample_interval, min_sample=min_sample,
                          max_clusters=max_clusters, seed=seed, niter=niter, nredo=nredo, elbow_k=elbow_k,
                          elbow_objective_on=elbow_objective_on, progress=progress,
                          **coseg_options)  # type: ignore[arg-type]
    fg = [m.reshape(-1) for m in coseg.masks]
    members = np.flatnonzero(coseg.inliers)

    def cluster(masks: list[np.ndarray], k: int | None, elbow: float) -> Clustering:
        total = sum(int(masks[i].sum()) for i in members)
        if total == 0:
            raise ValueError("no foreground tokens to cluster into parts")
        interval = effective_interval(total, sample_interval, min_sample)
        train = subsample(descriptors, interval, 0, masks, members)
        objective = elbow_objective(descriptors, members, interval, elbow_objective_on, masks)
        return fit_clusters(train, objective, k, elbow, max_clusters, seed, niter, nredo, elbow_k)

    bg_centroids = coseg.bg_centroids
    stage2, common = None, None
    if three_stages:
        stage2 = cluster(fg, None, part_elbow)
        grid_labels = _part_labels(descriptors, grids, images, stage2.centroids, bg_centroids, coseg.inliers, crf,
                                   progress, "crf (stage 2)", on_grid=True)
        present = np.zeros(stage2.k, np.int64)
        for i in np.flatnonzero(coseg.voters):
            present[np.unique(grid_labels[i][grid_labels[i] > 0]) - 1] += 1
        common = present == coseg.voters.sum()
        if not common.any():  # no cluster in every image: keep the most widespread ones
            LOG.warning("three stages: no foreground cluster is present in every image; keeping those in the "
                        "most images (%d of %d)", present.max(), coseg.voters.sum())
            common = present == present.max()
        keep = np.flatnonzero(common) + 1
        fg = [np.isin(lab, keep).reshape(-1) if lab is not None else np.zeros(0, bool) for lab in grid_labels]
        bg_centroids = np.concatenate([bg_centroids, stage2.centroids[~common]])

    clustering = cluster(fg, n_parts, part_elbow)
    # Label consistency: part 1 = the part with the most foreground tokens (over all images), etc.
    counts = np.zeros(clustering.k, np.int64)
    for i in members:
        if fg[i].any():
            lab = assign(unit(np.asarray(descriptors[i])[fg[i]]), clustering.centroids)[0]
            counts += np.bincount(lab, minlength=clustering.k)
    clustering.centroids = clustering.centroids[order_by_count(counts)]
    parts = _part_labels(descriptors, grids, images, clustering.centroids, bg_centroids, coseg.inliers, crf,
                         progress, "crf")
    parts = [p if p is not None else np.zeros(tuple(np.asarray(images[i]).shape[:2]) if images[i] is not None
                                              else tuple(grids[i]), np.int16)
             for i, p in enumerate(parts)]
    return PartResult(parts, coseg, clustering, stage2, common)
