"""A faiss index built from the shards of an embeddings folder, under a memory budget, resumable per shard.

Shapes: N vectors in the collection, D' channels, Q queries, K results, R re-ranking candidates.

Stages (each timed in index.json):

    choose   the index type from N, D', the budget and the build's own needs (:func:`choose_index`)
    train    on a random sample of the shards sized from the budget (never all vectors in RAM) → trained.index
    add      per shard: its vectors get global ids (the shard's offset + row) in an index file of its own,
             shards/NAME.index, and a memory-mappable copy vectors/NAME.npy for exact re-ranking; a shard
             whose files exist is skipped, so deleting one rebuilds only that one (parallel Ray tasks
             under engine "ray")
    merge    IVF: the shards' inverted lists merged into one on-disk file (faiss OnDiskInvertedLists),
             written one shard at a time with plain file writes (:func:`_merge_ondisk`), memory-mapped at
             search time, so the index can be larger than RAM; flat: one index in RAM
    evaluate recall@10 of the index, with and without exact re-ranking, against exact search (streamed
             over the shards in blocks of rows) for held-out sample queries (their own row left out of
             both lists), searched in batches whose memory maps fit in an eighth of the budget

Peak memory (VmHWM, which counts the pages of memory-mapped files the process touched) stays within the
budget: nothing here imports torch, and each stage holds one shard, one block or one sample at a time.

The folder: index.json (written last), trained.index, shards/, vectors/, populated-G.index and
merged-G.ivfdata (G bumped by each merge, older generations removed after index.json points at the new).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..backbones import atomic_write
from ..cache import LRU
from ..errors import ConfigError, DataError
from ..descriptors import DescriptorConfig, faiss_search  # not ..retrieval: it imports torch (~0.5 GB)
from .shards import Collection, read_shard

LOG = logging.getLogger(__name__)
INDEX_KINDS = ("auto", "flat", "ivfflat", "ivfpq")
SHARDED_INDEX_VERSION = 1
FLAT_MAX = 100_000  # exact search up to here: a query scans N·D' floats, ~40 ms at 100k × 384 on one core
TRAIN_PER_LIST = 64  # faiss warns below 39 points per centroid; its guidelines say 30–256
EXACT_BLOCK = 8192  # rows per block of the exact search in the evaluation (Q × 8192 scores at a time)
BASE_RSS = 320 << 20  # the build process without its data: Python, numpy, faiss, pyarrow (~0.2 GB measured)
TWO_LEVEL_FROM = 4096  # lists from which the coarse k-means runs in two levels (:func:`coarse_centroids`)
KMEANS_ITER = 25  # faiss' default k-means iterations, for both levels
ASSIGN_DEPTH = 128  # efSearch of an HNSW coarse quantizer while it assigns added vectors to lists
ID_SHARDS = 64  # shards whose ids a ShardedIndex keeps (LRU): at the default 1000 files a shard, 64k id
# strings (~100 B each as Python str, ~6 MB) whatever the collection's size


def parse_size(text: str | int) -> int:
    """Bytes of "8G", "512M", "1.5GB", "2000000" (powers of 1024); ConfigError otherwise."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", str(text))
    if not match:
        raise ConfigError(f"--memory-budget {text}: give a size such as 4G, 512M or 2000000")
    value = float(match.group(1)) * 1024 ** " KMGT".index((match.group(2) or " ").upper())
    if value < 1 << 20:
        raise ConfigError(f"--memory-budget {text}: at least 1M")
    return int(value)


def peak_rss() -> int:
    """Peak resident memory of this process so far, bytes: VmHWM of /proc/self/status where there is one,
    the high-water mark of this program's own memory (ru_maxrss also counts the memory of the process
    that started it, as it was when it forked: a big Python program running `vitdense index` would show
    its own size), else ru_maxrss (Linux reports KiB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class IndexChoice:
    """The faiss index to build and why: ``factory`` is a faiss index_factory string."""

    kind: str
    factory: str
    nlist: int
    m: int
    nprobe: int
    n_train: int
    reason: str


def _nlist(n: int) -> int:
    """IVF lists for N vectors: faiss' guidelines (65536 for 1–10 M, 262144 for 10–100 M, 1048576 beyond),
    below 1 M about 4·√N rounded to a power of two; at most the power of two ≤ N / 39 (faiss' minimum
    points per list), so 16384 at 1 M."""
    if n >= 100_000_000:
        lists = 1 << 20
    elif n >= 10_000_000:
        lists = 1 << 18
    elif n >= 1_000_000:
        lists = 1 << 16
    else:
        lists = 1 << max(0, round(math.log2(4 * math.sqrt(n))))
    cap = 1 << max(0, int(math.log2(max(1, n // 39))))  # a power of two with ≥ 39 points per list
    return int(max(1, min(lists, cap)))


def build_overhead(dim: int, shard_rows: int = 0) -> int:
    """Bytes the build needs besides the index's own lists: the process itself (Python, numpy, faiss,
    pyarrow: ~0.2 GB resident, :data:`BASE_RSS` with room to spare) and the add stage's working set of one
    shard (its vectors as Arrow and as numpy, and its index: 3 copies of shard_rows × D' × 4 B)."""
    return BASE_RSS + 3 * shard_rows * dim * 4


def choose_index(n: int, dim: int, budget: int, kind: str = "auto", nlist: int | None = None,
                 nprobe: int | None = None, shard_rows: int = 0) -> IndexChoice:
    """Pick the index for N vectors of D' channels under ``budget`` bytes of RAM, the largest shard holding
    ``shard_rows`` of them.

    The build holds one shard at a time (:func:`build_overhead`) and a training sample of at most half of
    the rest of the budget (fewer lists than faiss' guideline when 39 points per list would not fit). For fast search the codes should stay
    in RAM, memory-mapped from disk: flat when N ≤ 100k and the vectors fit in half of what the build leaves;
    IVF-Flat when the raw vectors (N·D'·4 B) fit beside the build's overhead; else IVF-PQ with the most bytes
    per vector that fit (D'/4 at most), with an OPQ rotation and an HNSW coarse quantizer from 10 M vectors
    on (faiss' guideline for 10 M–1 B).
    """
    if kind not in INDEX_KINDS:
        raise ConfigError(f"--index-type {kind}: choose one of {', '.join(INDEX_KINDS)}")
    raw = n * dim * 4
    gib = 1024 ** 3
    room = max(budget - build_overhead(dim, shard_rows), budget // 2)  # half when the overhead leaves less
    size = f"{n} × {dim} × 4 B = {raw / gib:.3g} GiB"
    spare = f"the {room / gib:.3g} GiB the build leaves of the budget ({budget / gib:.3g} GiB)"
    if kind == "auto":
        if n <= FLAT_MAX and raw <= room / 2:
            kind, reason = "flat", f"{n} ≤ {FLAT_MAX} vectors and {size} fit in half {spare}: exact search"
        elif raw <= room:
            kind, reason = "ivfflat", f"{size} fit in {spare}: IVF without compression"
        else:
            kind, reason = "ivfpq", f"{size} exceed {spare}: IVF-PQ codes"
    else:
        reason = f"--index-type {kind} given"
    if kind == "flat":
        return IndexChoice("flat", "Flat", 0, 0, 0, 0, reason)
    sample_rows = max(1, room // 2 // (dim * 4))  # the training sample: at most half what the build leaves
    lists = nlist or min(_nlist(n), 1 << max(0, int(math.log2(max(1, sample_rows // 39)))))
    if lists < 1 or lists > n:
        raise ConfigError(f"--nlist {lists}: must be between 1 and the {n} vectors")
    probe = nprobe or max(1, min(lists, 32 if lists < 4096 else 128))
    n_train = int(min(n, TRAIN_PER_LIST * lists, sample_rows))
    if kind == "ivfflat":
        return IndexChoice("ivfflat", f"IVF{lists},Flat", lists, 0, probe, n_train, reason)
    # PQ: the most sub-quantisers (bytes/vector, 8 bits each) that divide D', ≤ D'/4, and fit the budget
    divisors = [m for m in range(1, dim // 4 + 1) if dim % m == 0 and (m % 4 == 0 or m == dim // 4)] or [1]
    fits = [m for m in divisors if n * (m + 8) <= budget]  # 8: the id stored beside each code
    m = max(fits) if fits else min(d for d in divisors if d >= min(8, max(divisors)))
    reason += f"; PQ{m}: {n} × ({m} B code + 8 B id) = {n * (m + 8) / gib:.3g} GiB"
    if not fits:
        reason += " (over the budget: the lists stay on disk, memory-mapped)"
    n_train = max(n_train, min(n, 256 * 39, sample_rows))  # PQ's 256 centroids per sub-quantiser: ≥ 39·256 points
    pq = f"PQ{m}"
    if n_train < 256 * 39:  # too few points for 8-bit codebooks: 16 centroids per sub-quantiser
        pq += "x4"
        reason += "; 4-bit codes (fewer than 9984 training points)"
    if n >= 10_000_000:
        reason += "; ≥ 10 M vectors: OPQ rotation + HNSW coarse quantizer (faiss guideline)"
        return IndexChoice("opq-ivfhnsw-pq", f"OPQ{m},IVF{lists}_HNSW32,{pq}", lists, m, probe, n_train, reason)
    return IndexChoice("ivfpq", f"IVF{lists},{pq}", lists, m, probe, n_train, reason)


# ============================================================================ vectors of the shards

class ShardVectors:
    """The exact vectors of all shards as one (N, D') array-like: ``vectors[global_ids]`` reads those rows
    from the shards' .npy copies (nothing is loaded until asked).

    Rows are read with pread, not through a memory map: a page fault on a map pulls in the pages around it
    too (the kernel's fault-around, ~64 KiB, even with MADV_RANDOM), so re-ranking 100 scattered rows a
    query would keep ~6 MB a query resident instead of 150 KB."""

    def __init__(self, paths: Sequence[Path], offsets: Sequence[int]):
        self.paths = [Path(p) for p in paths]
        self.starts = []  # byte offset of row 0 in each file (after the .npy header)
        dim = 0
        for path in self.paths:
            array = np.load(path, mmap_mode="r")  # reads the header only
            if array.dtype != np.float32 or not array.flags.c_contiguous or array.ndim != 2:
                raise DataError(f"{path}: not a (rows, D') float32 array; re-run `vitdense index --embeddings`")
            self.starts.append(int(array.offset))
            dim = array.shape[1]
            del array
        self.offsets = np.asarray(offsets, np.int64)  # (S + 1,) start row of each shard, then N
        self.shape = (int(self.offsets[-1]), dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64).ravel()
        out = np.empty((len(ids), self.shape[1]), np.float32)
        row_bytes = self.shape[1] * 4
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            with open(self.paths[s], "rb", buffering=0) as f:
                for j in where:
                    data = os.pread(f.fileno(), row_bytes, self.starts[s] + int(ids[j] - self.offsets[s]) * row_bytes)
                    if len(data) != row_bytes:
                        raise DataError(f"{self.paths[s]}: row {ids[j] - self.offsets[s]} missing (file cut "
                                        f"short); re-run `vitdense index --embeddings`")
                    out[j] = np.frombuffer(data, np.float32)
        return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def _add_shard(emb: str, out: str, name: str, offset: int) -> dict[str, Any]:
    """Add one shard to a copy of the trained index with global ids; write its index and vector files."""
    import faiss

    start = time.perf_counter()
    vectors = np.ascontiguousarray(read_shard(emb, name, ["vector"])["vector"], np.float32)
    _save_npy(Path(out) / "vectors" / f"{name}.npy", vectors)
    index = faiss.read_index(str(Path(out) / "trained.index"))
    deepen_assignment(index)
    index.add_with_ids(vectors, np.arange(offset, offset + len(vectors), dtype=np.int64))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # the merge reads only a shard's inverted lists: its file holds an empty quantizer, not a copy of the
        # trained one (65536 HNSW centroids of 384 floats are ~100 MB a shard: 21 GB for 10 M in 200 shards)
        trained = ivf.quantizer
        trained.this.acquire()  # Python frees it below; the index owns the empty one instead
        empty = faiss.IndexFlat(ivf.d, ivf.metric_type)
        empty.this.disown()
        ivf.quantizer = empty
        del trained
    atomic_write(Path(out) / "shards" / f"{name}.index", lambda tmp: faiss.write_index(index, tmp))
    return {"shard": name, "rows": len(vectors), "seconds": time.perf_counter() - start}


# ============================================================================ build

def coarse_training(choice: IndexChoice) -> str:
    """How :func:`train_index` trains the lists of ``choice`` (recorded in index.json)."""
    if choice.kind == "flat":
        return "none (exact search)"
    if choice.nlist < TWO_LEVEL_FROM:
        return "k-means (faiss)"
    return f"two-level k-means ({_top_clusters(choice.n_train, choice.nlist)} clusters, then {choice.nlist} lists)"


def _top_clusters(n_train: int, nlist: int) -> int:
    """Clusters of the first level of :func:`coarse_centroids`: √nlist, at least 2, at most the points."""
    return int(min(n_train, max(2, round(math.sqrt(nlist)))))


def train_index(index: Any, sample: np.ndarray, nlist: int, seed: int = 0, progress: bool = False) -> None:
    """Train the IVF ``index`` (an index_factory product, possibly behind transforms such as OPQ) on
    ``sample`` (N_train, D'), which may be overwritten (:func:`coarse_training` says how).

    From :data:`TWO_LEVEL_FROM` lists on, the transforms are trained first and the sample rotated in place
    (blocks of rows: no second copy of a sample that may take half the budget), the lists come from
    :func:`coarse_centroids`, and faiss then trains only the codes (it keeps a quantizer that already
    holds nlist centroids). Below, faiss' own k-means trains everything."""
    import faiss

    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))  # the IVF-PQ class, not IndexIVF
    ivf.cp.seed = seed
    if hasattr(ivf, "do_polysemous_training"):
        # index_factory turns on polysemous training (Hamming filtering we never use): most of the time
        ivf.do_polysemous_training = False
    if nlist < TWO_LEVEL_FROM:
        index.train(sample)
        return
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = index.chain.at(i)
            if transform.d_in != transform.d_out:
                raise ConfigError(f"{index.__class__.__name__}: a transform that changes the dimension "
                                  f"({transform.d_in} → {transform.d_out}) is not supported with {nlist} lists")
            transform.train(sample)
            for start in range(0, len(sample), EXACT_BLOCK):
                sample[start:start + EXACT_BLOCK] = transform.apply(sample[start:start + EXACT_BLOCK])
    ivf.quantizer.add(coarse_centroids(sample, nlist, seed, ivf.metric_type == faiss.METRIC_INNER_PRODUCT,
                                       progress=progress))
    deepen_assignment(index)  # the codes are trained on residuals from each point's nearest list
    ivf.train(sample)  # the quantizer is full: only the codes (PQ on the residuals) are trained
    index.is_trained = True


def _split_lists(nlist: int, counts: np.ndarray) -> np.ndarray:
    """Lists per top-level cluster: proportional to its points (largest remainders), at most its points."""
    want = nlist * counts / max(1, counts.sum())
    share = np.minimum(np.floor(want).astype(np.int64), counts)
    order = np.argsort(-(want - np.floor(want)), kind="stable")
    while share.sum() < nlist:  # the remainders, then any cluster with points left, one list at a time
        room = order[share[order] < counts[order]]
        if not len(room):
            break
        share[room[: nlist - share.sum()]] += 1
    return share


def coarse_centroids(sample: np.ndarray, nlist: int, seed: int = 0, spherical: bool = True,
                     niter: int = KMEANS_ITER, progress: bool = False) -> np.ndarray:
    """(nlist, D') centroids for the IVF lists by two-level k-means: √nlist clusters of the sample, then
    each cluster split into lists in proportion to its points by a k-means of its own points.

    One k-means of nlist centroids compares every sample point with every centroid each iteration
    (n·nlist·D'); the two levels compare each point with √nlist centroids twice, ~√nlist / 2 times less
    work: 16,384 lists from 1 M points took 632 s on 2 cores as one k-means. The lists come out a little
    less even; searches with the same nprobe lose little recall (bench_scaleout.py measures it).
    ``spherical``: unit-norm centroids, as faiss trains them for inner-product indexes.
    """
    import faiss
    from tqdm import tqdm

    dim = sample.shape[1]
    top = _top_clusters(len(sample), nlist)
    first = faiss.Kmeans(dim, top, niter=niter, seed=seed, spherical=spherical, verbose=False)
    first.train(sample)
    assign = first.index.search(sample, 1)[1].ravel()
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=top)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    share = _split_lists(nlist, counts)
    parts = []
    for c in tqdm(np.flatnonzero(share), desc="train lists", unit="cluster", disable=not progress):
        points = np.ascontiguousarray(sample[order[bounds[c]:bounds[c + 1]]])
        if share[c] >= len(points):  # as many lists as points: each point its own centroid
            parts.append(points[: share[c]])
            continue
        km = faiss.Kmeans(dim, int(share[c]), niter=niter, seed=seed + 1 + int(c), spherical=spherical,
                          verbose=False, min_points_per_centroid=1)
        km.train(points)
        parts.append(km.centroids)
    centroids = np.concatenate(parts).astype(np.float32)
    if len(centroids) != nlist:
        raise DataError(f"{len(sample)} training vectors are too few for {nlist} lists")
    return centroids



def _sample(emb: Path, shards: Sequence[tuple[str, int]], rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows ``rows`` (sorted global ids) of the shards, reading one shard at a time into one array."""
    out = np.empty((len(rows), dim), np.float32)
    offset = filled = 0
    for name, count in shards:
        mine = rows[(rows >= offset) & (rows < offset + count)] - offset
        if len(mine):
            out[filled:filled + len(mine)] = read_shard(emb, name, ["vector"])["vector"][mine]
            filled += len(mine)
        offset += count
    return out


def _exact_topk(paths: Sequence[Path], offsets: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k global ids of queries (Q, D') by inner product, a block of one shard's rows at a time,
    keeping a running top-k (ties: the lower id first, as a stable sort over all N would)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for s, path in enumerate(paths):
        shard = np.load(path, mmap_mode="r")  # read in blocks of rows; the map closes with the shard
        for start in range(0, len(shard), EXACT_BLOCK):
            scores = queries @ np.asarray(shard[start:start + EXACT_BLOCK], np.float32).T  # (Q, block)
            ids = np.broadcast_to(offsets[s] + start + np.arange(scores.shape[1]), scores.shape)
            if scores.shape[1] > k:  # this block's own top k first, so the merge below stays (Q, 2k)
                part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                scores, ids = np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)
            best_s, best_i = np.concatenate([best_s, scores], 1), np.concatenate([best_i, ids], 1)
            keep = _order(best_s, best_i)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
        del shard
    return best_i


def _order(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row, the column order by descending score, then ascending id."""
    return np.lexsort((ids, -scores), axis=-1)


def _recall(exact: np.ndarray, got: np.ndarray, own: np.ndarray, k: int = 10) -> float:
    """Mean recall@k of ``got`` against ``exact`` (both (Q, ≥ k+1)), each query's own row left out."""
    total = 0.0
    for e, g, o in zip(exact, got, own):
        truth = [i for i in e if i != o][:k]
        found = {i for i in g if i != o and i >= 0}
        total += len(found.intersection(truth)) / len(truth)
    return total / len(exact)


def _merge_ondisk(trained: Any, files: Sequence[str], ivfdata: Path) -> np.ndarray:
    """Fill the empty IVF index ``trained`` with the inverted lists of the shard index ``files``, stored in
    ``ivfdata`` as faiss' OnDiskInvertedLists (list by list: its codes, then its ids; within a list the
    shards in order, as faiss.contrib.ondisk.merge_ondisk lays them out).

    faiss' merge_from_multiple maps every shard's lists and writes the merged file through a memory map,
    so all of them end up resident (counted in the process' RSS) at once. Here a first pass reads only the
    list sizes, the file is laid out from them, and a second pass reads one shard at a time into RAM and
    writes its part of each list with plain file writes: one shard's index in memory at a time.
    Returns the size of each list (nlist,).
    """
    import faiss

    ivf = faiss.extract_index_ivf(trained)
    nlist, code_size = ivf.nlist, ivf.code_size
    sizes = np.zeros((len(files), nlist), np.int64)
    for f, path in enumerate(files):  # IO_FLAG_MMAP: the sizes without reading the lists
        shard = faiss.read_index(path, faiss.IO_FLAG_MMAP)
        lists = faiss.extract_index_ivf(shard).invlists
        sizes[f] = [lists.list_size(i) for i in range(nlist)]
        del lists, shard
    total = sizes.sum(0)  # (nlist,)
    starts = np.concatenate([[0], np.cumsum(total * (code_size + 8))])[:-1]  # list i: codes, then ids
    invlists = faiss.OnDiskInvertedLists(nlist, code_size, str(ivfdata))
    invlists.update_totsize(max(1, int(starts[-1] + total[-1] * (code_size + 8))))  # sized, nothing touched
    list_sizes = total.astype(np.uint64)  # held in a name: swig_ptr does not keep its array alive
    invlists.set_all_lists_sizes(faiss.swig_ptr(list_sizes))
    filled = np.zeros(nlist, np.int64)
    with open(ivfdata, "r+b") as out:
        fd = out.fileno()
        for f, path in enumerate(files):
            shard = faiss.read_index(path)
            lists = faiss.extract_index_ivf(shard).invlists
            for i in np.flatnonzero(sizes[f]):
                count = int(sizes[f, i])
                codes = faiss.rev_swig_ptr(lists.get_codes(int(i)), count * code_size)
                ids = faiss.rev_swig_ptr(lists.get_ids(int(i)), count)
                os.pwrite(fd, codes, int(starts[i] + filled[i] * code_size))
                os.pwrite(fd, ids, int(starts[i] + total[i] * code_size + filled[i] * 8))
                filled[i] += count
            del lists, shard
    trained.ntotal = ivf.ntotal = int(total.sum())
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    return total


def build_index(embeddings: str | os.PathLike, out: str | os.PathLike, memory_budget: int | str = "4G",
                index_type: str = "auto", nlist: int | None = None, nprobe: int | None = None, rerank: int = 100,
                engine: str = "local", queries: int = 200, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Build (or resume building) a faiss index of the embeddings folder ``embeddings`` into ``out``.

    Returns the content of ``out/index.json``: the choice and its reason, seconds per stage, peak RSS,
    recall@10 with and without re-ranking, shard offsets. Resumes: a trained index for the same choice
    and the shards' index files already written are kept, so only missing shards are added again.
    """
    import faiss
    from tqdm import tqdm

    budget = parse_size(memory_budget)
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine {engine}: choose local or ray")
    coll = Collection.load(embeddings)
    if coll.pending():
        raise DataError(f"{coll.root}: {len(coll.pending())} of {len(coll.shards)} shard(s) not embedded yet; "
                        f"finish them with `vitdense embed` (same sources, same --out)")
    shards = [(name, rows) for name, rows in coll.done_rows() if rows > 0]
    n = sum(rows for _, rows in shards)
    if n == 0:
        raise DataError(f"{coll.root}: no embedded rows to index")
    offsets = np.concatenate([[0], np.cumsum([rows for _, rows in shards])]).astype(np.int64)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "build.json").exists():
        raise DataError(f"{out}: folder exists and is not a vitdense sharded index; choose an empty or new --out")
    times: dict[str, float] = {}
    rss: dict[str, int] = {}

    # ---- choose
    t0 = time.perf_counter()
    choice = choose_index(n, coll.dim, budget, index_type, nlist, nprobe, max(rows for _, rows in shards))
    plan = {"choice": asdict(choice), "shards": shards, "dim": coll.dim, "seed": seed,
            "backbone": coll.backbone["fingerprint"]}
    build_path = out / "build.json"
    if build_path.exists() and json.loads(build_path.read_text()) != json.loads(json.dumps(plan)):
        LOG.info("%s: another index plan than last time; starting over", out)
        for sub in ("shards", "vectors"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "trained.index").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(build_path, lambda tmp: Path(tmp).write_text(json.dumps(plan) + "\n"))
    times["choose"] = time.perf_counter() - t0

    # ---- train (on a sample; the held-out queries are drawn beside it, never trained on)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_queries = int(min(queries, max(1, n // 10)))
    picked = rng.choice(n, min(n, choice.n_train + n_queries), replace=False)
    query_ids = np.sort(picked[:n_queries])
    trained_now = False
    training = coarse_training(choice)
    if not (out / "trained.index").exists():
        index = faiss.index_factory(coll.dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
        if choice.kind != "flat":
            train_ids = np.sort(picked[n_queries:]) if len(picked) > n_queries else np.sort(picked)
            sample = _sample(coll.root, shards, train_ids, coll.dim)
            train_index(index, sample, choice.nlist, seed, progress)
            del sample
        if choice.kind == "flat":
            index = faiss.IndexIDMap(index)
        atomic_write(out / "trained.index", lambda tmp: faiss.write_index(index, tmp))
        del index
        trained_now = True
    times["train"], rss["train"] = time.perf_counter() - t0, peak_rss()

    # ---- add, shard by shard
    t0 = time.perf_counter()
    (out / "shards").mkdir(exist_ok=True)
    (out / "vectors").mkdir(exist_ok=True)
    todo = [(name, int(offsets[i])) for i, (name, _) in enumerate(shards)
            if not ((out / "shards" / f"{name}.index").exists() and (out / "vectors" / f"{name}.npy").exists())]
    if todo and engine == "ray":
        _add_with_ray(str(coll.root), str(out), todo, progress)
    else:
        for name, offset in tqdm(todo, desc="add", unit="shard", disable=not progress):
            _add_shard(str(coll.root), str(out), name, offset)
    times["add"], rss["add"] = time.perf_counter() - t0, peak_rss()

    # ---- merge into one index (IVF: on-disk inverted lists)
    t0 = time.perf_counter()
    old = json.loads((out / "index.json").read_text()) if (out / "index.json").exists() else {}
    gen = int(old.get("generation", 0)) + 1
    files = [str(out / "shards" / f"{name}.index") for name, _ in shards]
    imbalance = None
    if choice.kind == "flat":
        merged = faiss.read_index(str(out / "trained.index"))
        for name, offset in zip([s for s, _ in shards], offsets):
            vec = np.load(out / "vectors" / f"{name}.npy")
            merged.add_with_ids(vec, np.arange(offset, offset + len(vec), dtype=np.int64))
        atomic_write(out / f"populated-{gen}.index", lambda tmp: faiss.write_index(merged, tmp))
    else:
        merged = faiss.read_index(str(out / "trained.index"))
        ivfdata = out / f"merged-{gen}.ivfdata"
        ivfdata.unlink(missing_ok=True)
        sizes = _merge_ondisk(merged, files, ivfdata)
        # faiss' imbalance factor: 1 when all lists are equal; a search scans about this many times the rows
        # that nprobe lists of equal size would hold
        imbalance = float(len(sizes) * np.square(sizes, dtype=np.float64).sum() / max(1, sizes.sum()) ** 2)
        atomic_write(out / f"populated-{gen}.index", lambda tmp: faiss.write_index(merged, tmp))
    del merged
    times["merge"], rss["merge"] = time.perf_counter() - t0, peak_rss()

    # ---- evaluate: recall@10 against exact search for held-out queries, in batches of queries whose
    # memory-mapped lists and re-ranking rows fit in an eighth of the budget (the maps close after each)
    t0 = time.perf_counter()
    paths = [out / "vectors" / f"{name}.npy" for name, _ in shards]
    q = ShardVectors(paths, offsets)[query_ids]
    k = min(11, n)
    exact = _exact_topk(paths, offsets, q, k)
    batch = len(q)
    if choice.kind != "flat":
        code_size = faiss.extract_index_ivf(faiss.read_index(str(out / "trained.index"))).code_size
        per_query = choice.nprobe * (n / choice.nlist) * (code_size + 8) + rerank * 4096  # a page per row
        batch = int(max(1, min(len(q), budget / 8 // per_query)))
    plain, reranked = [], []
    for b in range(0, len(q), batch):
        index = _open_faiss(out / f"populated-{gen}.index", choice)
        vectors = ShardVectors(paths, offsets)
        plain.append(faiss_search(index, q[b:b + batch], k)[1])
        reranked.append(faiss_search(index, q[b:b + batch], k, vectors, rerank if choice.kind != "flat" else 0)[1])
        del index, vectors
    recall = {"queries": int(len(query_ids)), "k": 10, "nprobe": choice.nprobe, "rerank": rerank,
              "recall_at_10": round(_recall(exact, np.concatenate(plain), query_ids), 4),
              "recall_at_10_reranked": round(_recall(exact, np.concatenate(reranked), query_ids), 4)}
    times["evaluate"], rss["evaluate"] = time.perf_counter() - t0, peak_rss()

    meta = {"version": SHARDED_INDEX_VERSION, "kind": "sharded", "generation": gen,
            "embeddings": str(coll.root.resolve()), "count": n, "dim": coll.dim,
            "descriptor": coll.descriptor.to_dict(), "backbone": coll.backbone,
            "choice": asdict(choice), "coarse_training": training,
            "list_imbalance": None if imbalance is None else round(imbalance, 3), "memory_budget": budget, "rerank": rerank,
            "engine": engine,
            "shards": [{"name": name, "rows": rows, "offset": int(offsets[i])} for i, (name, rows) in enumerate(shards)],
            "stages": {"seconds": {k: round(v, 3) for k, v in times.items()},
                       "peak_rss": rss, "trained_now": trained_now, "shards_added": [name for name, _ in todo]},
            "peak_rss": max(rss.values()), "within_budget": max(rss.values()) <= budget, "recall": recall,
            "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    text = json.dumps(meta, indent=1)
    atomic_write(out / "index.json", lambda tmp: Path(tmp).write_text(text + "\n"))
    for path in list(out.glob("populated-*.index")) + list(out.glob("merged-*.ivfdata")):
        if path.name not in (f"populated-{gen}.index", f"merged-{gen}.ivfdata"):
            path.unlink(missing_ok=True)
    return meta


def _add_with_ray(emb: str, out: str, todo: Sequence[tuple[str, int]], progress: bool) -> None:
    """The add stage as parallel Ray tasks (one per shard; Ray retries a task whose worker died)."""
    from tqdm import tqdm

    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'vitdense[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1, max_retries=3)(_add_shard)
        pending = [task.remote(emb, out, name, offset) for name, offset in todo]
        with tqdm(total=len(pending), desc="add", unit="shard", disable=not progress) as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)
                bar.update(len(ready))
    finally:
        if started:
            ray.shutdown()


def _open_faiss(path: Path, choice: IndexChoice):
    """Read a populated index memory-mapped and set nprobe. IVF: the OnDiskInvertedLists map their .ivfdata
    (looked up beside the index file, so the folder can move) themselves; IO_FLAG_MMAP on top of them
    crashes faiss 1.15 at search time, so it is only used for flat indexes."""
    import faiss

    if choice.kind == "flat":
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    set_nprobe(index, choice.nprobe)
    return index


def deepen_assignment(index: Any) -> None:
    """Let an HNSW coarse quantizer assign added vectors to their nearest list: it finds a vector's list by a
    graph search only efSearch deep (16 by default), and a vector put in another list than its nearest is
    found only by probing far more lists. Measured on 1 M clustered 384-d vectors in 8192 lists: 2.3 % of
    the vectors misplaced at depth 16 capped recall@10 at 0.98 (0.92 at 10 M in 65536 lists) whatever the
    nprobe and re-ranking; 0.5 % at 64, none at 256 (add time ×1.1 and ×3.2)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    quantizer = None if ivf is None else faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, ASSIGN_DEPTH)


def set_nprobe(index: Any, nprobe: int) -> None:
    """Probe ``nprobe`` lists of an IVF index. An HNSW coarse quantizer is told to search 2·nprobe deep
    (its efSearch, 16 by default): asked for 128 lists with efSearch 16 it returns 128, but only ~3/4 of
    the 128 nearest ones, and recall drops with them."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = min(int(nprobe), ivf.nlist)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, 2 * ivf.nprobe)


# ============================================================================ searching

class ShardedIndex:
    """A built sharded index, opened memory-mapped; :meth:`search` re-ranks exactly from the shards'
    vectors and :meth:`ids` names the results by the collection's ids, read per shard on first use and
    kept for the ``id_shards`` shards used last (LRU: memory bounded by that, not by N)."""

    def __init__(self, root: str | os.PathLike, id_shards: int = ID_SHARDS):
        root = Path(root)
        path = root / "index.json"
        try:
            meta = json.loads(path.read_text())
            if meta.get("kind") != "sharded":
                raise DataError(f"{root}: not a sharded index (built from an image folder; open it with ImageIndex)")
            self.choice = IndexChoice(**meta["choice"])
            self.descriptor = DescriptorConfig.from_dict(meta["descriptor"])
            shards = meta["shards"]
            offsets = [s["offset"] for s in shards] + [meta["count"]]
            self.vectors = ShardVectors([root / "vectors" / f"{s['name']}.npy" for s in shards], offsets)
            self.index = _open_faiss(root / f"populated-{meta['generation']}.index", self.choice)
        except FileNotFoundError as err:
            raise DataError(f"{root}: index incomplete ({Path(err.filename or str(err)).name} missing); re-run "
                            f"`vitdense index --embeddings`") from None
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: corrupt index metadata ({err}); re-run `vitdense index --embeddings`") from None
        except RuntimeError as err:
            raise DataError(f"{root}: cannot read the faiss index ({str(err).splitlines()[0]}); re-run "
                            f"`vitdense index --embeddings`") from None
        self.root, self.meta, self.backbone = root, meta, meta["backbone"]
        self.shard_names = [s["name"] for s in shards]
        self.embeddings = Path(meta["embeddings"])
        self.rerank = int(meta.get("rerank", 0))
        self.id_cache = LRU(max(1, id_shards))  # shard index → its ids

    def check_backbone(self, identity: dict[str, Any]) -> None:
        """ConfigError when ``identity`` is not the network the collection was embedded with."""
        from ..retrieval import ImageIndex

        ImageIndex.check_backbone(self, identity)  # type: ignore[arg-type]  (same fields: root, backbone)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of queries (Q, D') → (scores (Q, K), global ids (Q, K)); -1 where fewer results."""
        if queries.shape[1] != self.vectors.shape[1]:
            raise ConfigError(f"{self.root}: query descriptors have {queries.shape[1]} channels, the index "
                              f"{self.vectors.shape[1]}")
        rerank = self.rerank if self.choice.kind != "flat" else 0
        return faiss_search(self.index, queries, k, self.vectors, rerank)

    def shard_ids(self, s: int) -> list[str]:
        """The collection's ids of shard ``s`` (read on first use, kept for the last ``id_shards`` shards)."""
        ids = self.id_cache.get(s)
        if ids is None:
            ids = read_shard(self.embeddings, self.shard_names[s], ["id"])["id"]
            self.id_cache.put(s, ids)
        return ids

    def ids(self, global_ids: np.ndarray) -> list[str | None]:
        """The collection's ids (paths, TAR::MEMBER) of global ids (None for -1), read from the shards.

        Each shard's ids are fetched once per call (results come in score order across shards: fetching
        row by row could evict and re-read a shard within one call when they span more than ``id_shards``)."""
        rows = np.asarray(global_ids, np.int64).ravel()
        shards = np.searchsorted(self.vectors.offsets, rows, side="right") - 1
        out: list[str | None] = [None] * len(rows)
        for s in np.unique(shards[rows >= 0]):
            ids, start = self.shard_ids(int(s)), int(self.vectors.offsets[s])
            for i in np.flatnonzero((shards == s) & (rows >= 0)):
                out[i] = ids[int(rows[i]) - start]
        return out


def open_index(root: str | os.PathLike) -> "ImageIndex | ShardedIndex":
    """Open an index folder for searching: the same as :meth:`ImageIndex.load` — a :class:`ShardedIndex`
    when its index.json says it was built from embedding shards, else the :class:`ImageIndex` of an image
    folder (both have ``search``, ``ids``, ``descriptor`` and ``check_backbone``)."""
    from ..retrieval import ImageIndex

    return ImageIndex.load(root)
