"""Retrieval benchmark: indexing images/s, search queries/s, memory and recall@10 of IVF-PQ vs exact search.

    python benchmarks/bench_retrieval.py                       # 10k and 1M synthetic vectors, 384-d
    python benchmarks/bench_retrieval.py --sizes 10000 100000 --images 64   # a quick run

Part 1 (indexing): images/s of `embed_images` + faiss add for a randomly initialised ViT-S/16 at 224 px
(weights do not change the speed), against the baseline of timm's own forward on pre-made tensors (the
network alone, no loading/resizing/pooling); the ratio shows the pipeline's overhead.

Part 2 (search): synthetic L2-normalised vectors shaped like global descriptors — clusters in a 64-d subspace
of the 384-d space plus isotropic noise (real ViT descriptors have low intrinsic dimension; with
``--data gaussian`` isotropic noise only, the worst case for PQ). Queries are fresh samples of the same
distribution. Baseline: exact IndexFlatIP. IVF-PQ memory is the serialized index (codes + ids + centroids);
its re-ranking reads the candidates' exact vectors from the memory-mapped vectors file on disk, which the
index folder keeps anyway.

GPU: extraction runs on CUDA when available; faiss-cpu has no GPU index, so GPU search is "not measured".
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vitdense import ViTExtractor, create_vit  # noqa: E402
from vitdense.retrieval import (DescriptorConfig, FaissConfig, build_faiss, embed_images,  # noqa: E402
                                faiss_search)


def synthetic(n: int, dim: int, rng: np.random.Generator, kind: str, centers: int = 1000,
              basis: np.ndarray | None = None, means: np.ndarray | None = None) -> np.ndarray:
    """n L2-normalised (n, dim) float32 vectors; "clustered": cluster means in a 64-d subspace + noise."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        if kind == "gaussian":
            x = rng.standard_normal((m, dim), dtype=np.float32)
        else:
            z = means[rng.integers(0, len(means), m)] + 0.6 * rng.standard_normal((m, basis.shape[0]), dtype=np.float32)
            x = z @ basis + 0.15 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def index_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def bench_indexing(n_images: int, device: str, batch: int) -> list[tuple[str, float, str]]:
    model = create_vit("vit_small_patch16_224")
    ext = ViTExtractor("custom", stride=16, model=model, device=device)
    rng = np.random.default_rng(0)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)) for _ in range(n_images)]
    cfg = DescriptorConfig("cls", load_size=224, square=True, stride=16)
    tensors = torch.randn(batch, 3, 224, 224, device=ext.device)
    with torch.inference_mode():
        model(tensors[:2])  # warm-up
        t0 = time.perf_counter()
        for _ in range(max(1, n_images // batch)):
            model.forward_features(tensors)
        if ext.device.type == "cuda":
            torch.cuda.synchronize()
        base = max(1, n_images // batch) * batch / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    res = embed_images(ext, images, cfg, batch_size=batch, num_workers=0, progress=False)
    build_faiss(res.vectors, FaissConfig("flat"))
    ours = n_images / (time.perf_counter() - t0)
    return [(f"timm forward only ({device})", base, "baseline"),
            (f"embed_images + faiss add ({device})", ours, f"{ours / base:.2f}x")]


def bench_search(n: int, dim: int, n_queries: int, kind: str, nlist: int | None, m: int, nprobe: int,
                 rerank: int, rng: np.random.Generator) -> dict:
    basis = np.linalg.qr(rng.standard_normal((dim, 64)))[0].T.astype(np.float32)  # (64, dim) orthonormal rows
    means = rng.standard_normal((1000, 64)).astype(np.float32)
    db = synthetic(n, dim, rng, kind, basis=basis, means=means)
    queries = synthetic(n_queries, dim, rng, kind, basis=basis, means=means)
    flat = build_faiss(db, FaissConfig("flat"))
    t0 = time.perf_counter()
    _, exact = flat.search(queries, 10)
    flat_qps = n_queries / (time.perf_counter() - t0)
    nlist = nlist or int(4 * math.sqrt(n))
    t0 = time.perf_counter()
    ivf = build_faiss(db, FaissConfig("ivfpq", nlist=nlist, m=m, nprobe=nprobe))
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:  # re-rank from a memory-mapped file, as the index folder does
        path = os.path.join(tmp, "v.npy")
        np.save(path, db)
        mm = np.load(path, mmap_mode="r")
        rows = {}
        for label, rr in (("IVF-PQ", 0), (f"IVF-PQ + rerank {rerank}", rerank)):
            t0 = time.perf_counter()
            _, ids = faiss_search(ivf, queries, 10, mm if rr else None, rr)
            qps = n_queries / (time.perf_counter() - t0)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
            rows[label] = (qps, recall)
        del mm
    return {"n": n, "flat_qps": flat_qps, "flat_bytes": index_bytes(flat), "ivf_bytes": index_bytes(ivf),
            "rows": rows, "nlist": ivf.nlist, "build_s": build_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4*sqrt(N))")
    parser.add_argument("--m", type=int, default=48, help="PQ bytes per vector")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--rerank", type=int, default=100)
    parser.add_argument("--images", type=int, default=64, help="images for the indexing benchmark (0: skip)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    if args.images:
        rows = bench_indexing(args.images, "cpu", args.batch)
        if torch.cuda.is_available():
            rows += bench_indexing(args.images * 4, "cuda", args.batch)
        print(f"\nIndexing (random-init ViT-S/16, 224x224, CLS descriptor, {args.images} images, "
              f"torch threads {torch.get_num_threads()})")
        print(f"{'pipeline':<40} {'images/s':>10} {'ratio':>10}")
        for name, ips, ratio in rows:
            print(f"{name:<40} {ips:>10.1f} {ratio:>10}")
        if not torch.cuda.is_available():
            print(f"{'(GPU)':<40} {'not measured (no device)':>21}")

    rng = np.random.default_rng(0)
    print(f"\nSearch ({args.data} synthetic vectors, dim {args.dim}, {args.queries} queries, k=10, "
          f"PQ m={args.m}, nprobe={args.nprobe})")
    print(f"{'N':>9} {'index':<24} {'queries/s':>10} {'speed':>7} {'memory MB':>10} {'mem ratio':>9} "
          f"{'recall@10':>9}")
    for n in args.sizes:
        r = bench_search(n, args.dim, args.queries, args.data, args.nlist, args.m, args.nprobe, args.rerank, rng)
        print(f"{n:>9} {'flat (exact)':<24} {r['flat_qps']:>10.0f} {'1.00x':>7} {r['flat_bytes'] / 2**20:>10.1f} "
              f"{'1':>9} {1.0:>9.3f}")
        for label, (qps, recall) in r["rows"].items():
            print(f"{n:>9} {label:<24} {qps:>10.0f} {qps / r['flat_qps']:>6.2f}x "
                  f"{r['ivf_bytes'] / 2**20:>10.1f} {'1/' + format(r['flat_bytes'] / r['ivf_bytes'], '.1f'):>9} "
                  f"{recall:>9.3f}")
        print(f"{'':>9} (nlist {r['nlist']}, IVF-PQ train + add {r['build_s']:.1f} s)")
    print("GPU search: not measured (faiss-cpu)")


if __name__ == "__main__":
    main()
