"""Retrieval benchmark: indexing images/s, search queries/s, memory and recall@10 of IVF-PQ vs exact search.

    python benchmarks/bench_retrieval.py                        # 10k and 1M synthetic vectors, 384-d
    python benchmarks/bench_retrieval.py --sizes 10000 100000 --images 16   # a quick run
    python benchmarks/bench_retrieval.py --data gaussian --sizes 10000      # the structure-free worst case

Part 1 (indexing): images/s of ``update_index`` (listing, hashing, DataLoader decoding + resizing, forward,
pooling, faiss add, writing the index folder) over a folder of real photos, with the default backbone (the
bundled one; a random-init ViT-S/8 when it is absent: weights do not change the speed), default descriptor
(CLS, shorter side 224 px). Baseline: timm's own ``forward_features`` on pre-made 224x224 tensors of the
same batch size (the network alone); the ratio shows the pipeline's overhead. A re-run over the unchanged
folder (nothing to embed) is timed too. The photos: ``--photos DIR``, default data/pretrain_set (the 117
photos of apps/build_pretrain_set.py) when present, else scikit-image's and scikit-learn's 14 photos.

Part 2 (search): faiss cannot be timed at 1M images on a CPU through the network, so the collections are
synthetic L2-normalised 384-d vectors. How they are made (``--data clustered``, the default): 1000 cluster
centres drawn from N(0, I) in a random 64-d subspace; a vector = its centre + N(0, 0.6²) in that subspace
+ N(0, 0.15²) in all 384 dimensions, then L2-normalised; queries are fresh draws (not in the database).
Real descriptors are clustered and of low intrinsic dimension, uniform random ones are neither; the script
prints the statistics that matter for quantisation (effective dimension = participation ratio of the PCA
spectrum, variance share of the top PCs, median nearest-neighbour cosine) for the synthetic data next to
the descriptors of part 1's real photos, so the reader can judge how realistic the generator is. The
generator was not tuned to pass: its effective dimension is far above that of the real descriptors
measured here (so it is the harder case), and ``--data gaussian`` (isotropic, no structure) shows the
worst case.

The IVF-PQ index is the one ``vitdense index --compressed`` builds, with its defaults: nlist = 4·√N,
m = D/4 bytes per vector (8-bit codes), nprobe 32, the top 100 re-ranked with exact scores read from the
memory-mapped vectors file that the index folder keeps on disk. Memory: flat = the N x D float32 the
IndexFlatIP holds; IVF-PQ = its serialised size (codes, ids, coarse and PQ centroids), which is what it
holds in RAM; re-ranking reads 100 rows per query from the disk file (not counted: they are not held).

GPU: extraction runs on CUDA when available; faiss-cpu has no GPU index, so GPU search is "not measured".
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vitdense import MODELS, ViTExtractor, create_vit  # noqa: E402
from vitdense.io import list_images  # noqa: E402
from vitdense.retrieval import (DescriptorConfig, FaissConfig, build_faiss, faiss_search,  # noqa: E402
                                update_index)

REPO = Path(__file__).resolve().parents[1]


# ============================================================================ data

def synthetic(n: int, dim: int, rng: np.random.Generator, kind: str, basis: np.ndarray,
              means: np.ndarray) -> np.ndarray:
    """n L2-normalised (n, dim) float32 vectors (see the module docstring), made 100k at a time."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        if kind == "gaussian":
            x = rng.standard_normal((m, dim), dtype=np.float32)
        else:
            z = means[rng.integers(0, len(means), m)] + 0.6 * rng.standard_normal((m, basis.shape[0]),
                                                                                  dtype=np.float32)
            x = z @ basis + 0.15 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def generator(dim: int, rng: np.random.Generator, clusters: int = 1000, subspace: int = 64):
    """The fixed parts of the clustered generator: an orthonormal (subspace, dim) basis and the centres."""
    basis = np.linalg.qr(rng.standard_normal((dim, subspace)))[0].T.astype(np.float32)
    means = rng.standard_normal((clusters, subspace)).astype(np.float32)
    return basis, means


def structure(x: np.ndarray) -> dict[str, float]:
    """Statistics of descriptors (n, D) that decide how well they quantise."""
    xc = x - x.mean(axis=0)
    lam = np.linalg.eigvalsh(xc.T.astype(np.float64) @ xc)[::-1].clip(min=0)
    lam = lam / lam.sum()
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return {"n": len(x), "eff_dim": float(1 / np.sum(lam ** 2)), "top8": float(lam[:8].sum()),
            "top64": float(lam[:64].sum()), "nn_cos": float(np.median(sim.max(axis=1)))}


def photo_folder(args: argparse.Namespace, tmp: Path) -> Path:
    """The folder of real photos part 1 indexes (see the module docstring)."""
    if args.photos:
        return Path(args.photos)
    default = REPO / "data" / "pretrain_set"
    if default.is_dir():
        return default
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    folder = tmp / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "hubble_deep_field",
                 "immunohistochemistry", "moon", "page", "brick", "retina"):
        arr = getattr(data, name)()
        Image.fromarray(np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]).save(folder / f"{name}.png")
    for i, arr in enumerate(load_sample_images().images):
        Image.fromarray(arr).save(folder / f"sklearn{i}.png")
    return folder


# ============================================================================ part 1: indexing

def default_extractor(device: str) -> tuple[ViTExtractor, str]:
    bundled = [name for name, spec in MODELS.items() if spec.bundled_file]
    if bundled:
        ext = ViTExtractor(bundled[0], stride=8, device=device)
        return ext, f"{bundled[0]} (bundled)"
    model = create_vit("vit_small_patch8_224")
    return ViTExtractor("custom", stride=8, model=model, device=device), "random-init ViT-S/8"


def bench_indexing(paths: list[Path], device: str, batch: int, workers: int, tmp: Path) -> dict:
    ext, label = default_extractor(device)
    cfg = DescriptorConfig("cls", load_size=224, stride=ext.stride[0])
    tensors = torch.randn(batch, 3, 224, 224, device=ext.device)
    with torch.inference_mode():
        ext.model.forward_features(tensors[:2])  # warm-up
        rounds = max(1, len(paths) // batch)
        t0 = time.perf_counter()
        for _ in range(rounds):
            ext.model.forward_features(tensors)
        if ext.device.type == "cuda":
            torch.cuda.synchronize()
        base = rounds * batch / (time.perf_counter() - t0)
    root = tmp / f"index-{device}"
    t0 = time.perf_counter()
    idx, _ = update_index(root, paths, ext, cfg, FaissConfig("flat"), batch_size=batch, num_workers=workers,
                          progress=False)
    ours = len(paths) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    update_index(root, paths, ext, cfg, FaissConfig("flat"), batch_size=batch, num_workers=workers,
                 progress=False)
    rerun = time.perf_counter() - t0
    return {"label": label, "device": device, "base": base, "ours": ours, "rerun_s": rerun,
            "vectors": np.asarray(idx.vectors)}


# ============================================================================ part 2: search

def recall_at(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(ids, exact)]))


def bench_search(n: int, db: np.ndarray, queries: np.ndarray, faiss_config: FaissConfig, tmp: Path) -> dict:
    t0 = time.perf_counter()
    flat = build_faiss(db, FaissConfig("flat"))
    flat_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, exact = flat.search(queries, 10)
    flat_qps = len(queries) / (time.perf_counter() - t0)
    flat_bytes = flat.ntotal * flat.d * 4
    del flat
    t0 = time.perf_counter()
    ivf = build_faiss(db, faiss_config)
    ivf_build = time.perf_counter() - t0
    import faiss

    ivf_bytes = int(faiss.serialize_index(ivf).nbytes)
    path = tmp / f"vectors-{n}.npy"  # re-rank from a memory-mapped file, as the index folder does
    np.save(path, db)
    mm = np.load(path, mmap_mode="r")
    rows = {}
    for label, rerank in (("IVF-PQ", 0), (f"IVF-PQ + rerank {faiss_config.rerank}", faiss_config.rerank)):
        t0 = time.perf_counter()
        _, ids = faiss_search(ivf, queries, 10, mm if rerank else None, rerank)
        rows[label] = (len(queries) / (time.perf_counter() - t0), recall_at(ids, exact))
    del mm
    path.unlink()
    return {"flat_qps": flat_qps, "flat_bytes": flat_bytes, "flat_build": flat_build, "ivf_bytes": ivf_bytes,
            "ivf_build": ivf_build, "rows": rows, "nlist": ivf.nlist, "m": ivf.pq.M, "nprobe": ivf.nprobe}


# ============================================================================ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4*sqrt(N), as the CLI)")
    parser.add_argument("--m", type=int, default=None, help="PQ bytes per vector (default D/4, as the CLI)")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--rerank", type=int, default=100)
    parser.add_argument("--photos", default=None, help="folder of photos for part 1 (see above)")
    parser.add_argument("--images", type=int, default=120, help="photos indexed in part 1 (0: skip part 1)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of part 1 (CLI default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        real = None
        if args.images:
            folder = photo_folder(args, tmp)
            paths = list_images(folder, recursive=True)[:args.images]
            runs = [bench_indexing(paths, "cpu", args.batch, args.workers, tmp)]
            if torch.cuda.is_available():
                runs.append(bench_indexing(paths, "cuda", args.batch, args.workers, tmp))
            real = runs[0]["vectors"]
            print(f"\nIndexing {len(paths)} photos of {folder} with `update_index` ({runs[0]['label']}, CLS, "
                  f"shorter side 224 px, batch {args.batch}, {args.workers} workers, torch threads "
                  f"{torch.get_num_threads()})")
            print(f"{'pipeline':<44} {'images/s':>9} {'ratio':>7}")
            for r in runs:
                print(f"{'timm forward_features only, 224x224 (' + r['device'] + ')':<44} {r['base']:>9.2f} "
                      f"{'1.00x':>7}")
                print(f"{'update_index: files -> index folder (' + r['device'] + ')':<44} {r['ours']:>9.2f} "
                      f"{r['ours'] / r['base']:>6.2f}x")
                print(f"{'  re-run, nothing changed (' + r['device'] + ')':<44} "
                      f"{len(paths) / r['rerun_s']:>9.1f} {'':>7} ({r['rerun_s']:.2f} s)")
            if not torch.cuda.is_available():
                print(f"{'(GPU)':<44} not measured (no device)")

        rng = np.random.default_rng(0)
        basis, means = generator(args.dim, rng)
        queries = synthetic(args.queries, args.dim, rng, args.data, basis, means)
        how = ("1000 centres ~ N(0, I) in a random 64-d subspace; vector = centre + N(0, 0.6^2) in the subspace "
               "+ N(0, 0.15^2) in all dims" if args.data == "clustered" else "isotropic N(0, I), no structure")
        print(f"\nSynthetic vectors ({args.data}): {how}; L2-normalised, dim {args.dim}; queries are fresh draws")
        print(f"{'descriptors':<40} {'n':>6} {'eff. dim':>9} {'top-8 PCs':>10} {'top-64 PCs':>11} {'NN cos':>7}")
        rows = [("synthetic, " + args.data, synthetic(len(real) if real is not None else 1000, args.dim,
                                                      np.random.default_rng(1), args.data, basis, means))]
        if real is not None:
            rows.append((f"real: {runs[0]['label']}, CLS", real))
        for name, x in rows:
            s = structure(x)
            print(f"{name:<40} {s['n']:>6} {s['eff_dim']:>9.1f} {s['top8']:>10.3f} {s['top64']:>11.3f} "
                  f"{s['nn_cos']:>7.3f}")
        print("(eff. dim: participation ratio of the PCA spectrum; NN cos: median cosine to the nearest other "
              "vector at that n)")

        faiss_config = FaissConfig("ivfpq", args.nlist, args.m, 8, args.nprobe, args.rerank)
        print(f"\nSearch ({args.queries} queries, k=10; IVF-PQ as `vitdense index --compressed`: nlist "
              f"{args.nlist or '4*sqrt(N)'}, m {args.m or 'D/4'}, nprobe {args.nprobe}; flat = exact IndexFlatIP, "
              f"the baseline)")
        print(f"{'N':>9} {'index':<24} {'queries/s':>10} {'speed':>7} {'memory MB':>10} {'mem ratio':>9} "
              f"{'recall@10':>9}")
        for n in args.sizes:
            db = synthetic(n, args.dim, rng, args.data, basis, means)
            r = bench_search(n, db, queries, faiss_config, tmp)
            del db
            print(f"{n:>9} {'flat (exact)':<24} {r['flat_qps']:>10.0f} {'1.00x':>7} "
                  f"{r['flat_bytes'] / 2**20:>10.1f} {'1':>9} {1.0:>9.3f}")
            for label, (qps, recall) in r["rows"].items():
                print(f"{n:>9} {label:<24} {qps:>10.0f} {qps / r['flat_qps']:>6.2f}x "
                      f"{r['ivf_bytes'] / 2**20:>10.1f} {'1/' + format(r['flat_bytes'] / r['ivf_bytes'], '.1f'):>9} "
                      f"{recall:>9.3f}")
            print(f"{'':>9} (nlist {r['nlist']}, m {r['m']}, nprobe {r['nprobe']}; build: flat "
                  f"{r['flat_build']:.1f} s, IVF-PQ train + add {r['ivf_build']:.1f} s)", flush=True)
        print("GPU search: not measured (faiss-cpu)")


if __name__ == "__main__":
    main()
