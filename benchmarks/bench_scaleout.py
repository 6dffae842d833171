"""Scale-out benchmark: `vitdense embed` on Ray against the local engine, and the index build from shards.

    python benchmarks/bench_scaleout.py                          # 300 images, 200k vectors (a few minutes, 2 cores)
    python benchmarks/bench_scaleout.py --n 1000000 --n 10000000 --images 5000   # bigger machines

Part 1 (engines): the same generated images (64 px, a tiny random ViT: the engines' overhead, not the
network, is what is compared) embedded with ``--engine local`` (this process) and ``--engine ray`` (a
local Ray with an actor pool of ``--actors``); images/s of each (Ray's start-up counted apart), the ratio,
and whether both gave the same ids and vectors (max |difference|).

Part 2 (index): N synthetic clustered 384-d unit vectors (1000 centres in a random 64-d subspace + noise,
as benchmarks/bench_retrieval.py) written as Parquet shards of ``--shard-rows``; `build_index` runs in a
fresh process per N (so its peak RSS is its own; it includes ~0.4 GB of torch that importing vitdense
loads) under ``--memory-budget``, once with the automatic choice and once forced to IVF-PQ. Reported: the
choice, seconds per stage (train / add / merge), peak RSS against the budget, recall@10 of the held-out
queries with and without exact re-ranking. From the measured rates (vectors added per second, k-means
work per second, merge MB/s) it projects 1 B vectors on paper.

autofaiss is compared only when it is installed (its pip install downgrades numpy here, so by default it
is not; the script says so).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = np.linspace(0, 255, 64)[None, :, None] * rng.random(3)[None, None, :]
        img = np.clip(base + rng.normal(0, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def engines(tmp: Path, images: int, actors: int) -> dict:
    import torch

    from vitdense import backbone_meta, create_vit, save_backbone
    from vitdense.collection.embed import ExtractorSpec
    from vitdense.collection.engines import embed_collection
    from vitdense.collection.shards import Collection, read_shard
    from vitdense.retrieval import DescriptorConfig

    make_images(tmp / "img", images)
    torch.manual_seed(0)
    kw = dict(embed_dim=192, depth=6, num_heads=3, img_size=64, patch_size=8)
    save_backbone(create_vit("vit_small_patch8_224", **kw), tmp / "w.safetensors",
                  backbone_meta("vit_small_patch8_224", kw))
    spec = ExtractorSpec("auto", str(tmp / "w.safetensors"), "cpu")
    cfg = DescriptorConfig(load_size=64, stride=8)
    shard = max(10, images // 8)
    local = embed_collection([tmp / "img"], tmp / "local", spec, cfg, shard_size=shard, num_workers=1,
                             batch_size=16, progress=False)
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=max(os.cpu_count() or 1, actors + 2), include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - t0
    try:
        on_ray = embed_collection([tmp / "img"], tmp / "ray", spec, cfg, engine="ray", shard_size=shard,
                                  actors=actors, batch_size=16, progress=False)
    finally:
        ray.shutdown()

    def rows(root):
        ids, vec = [], []
        for name, _ in Collection.load(root).done_rows():
            s = read_shard(root, name)
            ids += s["id"]
            vec.append(s["vector"])
        return ids, np.concatenate(vec)

    (il, vl), (ir, vr) = rows(tmp / "local"), rows(tmp / "ray")
    return {"images": images, "local_img_s": local.images_per_second, "ray_img_s": on_ray.images_per_second,
            "ray_startup_s": startup, "same_ids": il == ir, "max_diff": float(np.abs(vl - vr).max())}


def synthetic(root: Path, n: int, dim: int, shard_rows: int, seed: int = 0) -> None:
    """Clustered unit vectors written as embedding shards (see the module doc)."""
    from vitdense.collection.embed import ShardRows
    from vitdense.collection.shards import Collection, write_shard
    from vitdense.collection.sources import ShardSpec
    from vitdense.retrieval import DescriptorConfig

    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, 64)))[0]  # (dim, 64)
    centres = rng.normal(size=(1000, 64))
    (root / "inputs").mkdir(parents=True)
    specs = []
    for s, start in enumerate(range(0, n, shard_rows)):
        count = min(shard_rows, n - start)
        spec = ShardSpec(f"shard-{s:05d}", "files", tuple(f"synthetic/{start + i}" for i in range(count)))
        (root / "inputs" / f"{spec.name}.txt").write_text("\n".join(spec.items) + "\n")
        low = centres[rng.integers(0, 1000, count)] + 0.6 * rng.normal(size=(count, 64))
        v = low @ basis.T + 0.15 * rng.normal(size=(count, dim))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        write_shard(root, spec.name, ShardRows(list(spec.items), [""] * count, [""] * count, v), 0.0)
        specs.append(spec)
    Collection(root, {"fingerprint": "synthetic", "stride": 0, "model": "synthetic"}, DescriptorConfig(), dim,
               specs).write_manifest()


def child(emb: str, out: str, budget: str, kind: str) -> None:
    """Build one index in this (fresh) process and print index.json."""
    from vitdense.collection.index import build_index

    print(json.dumps(build_index(emb, out, budget, index_type=kind, progress=False)))


def build(emb: Path, out: Path, budget: str, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(emb), str(out), budget, kind]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode:
        raise SystemExit(res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--n", type=int, action="append", help="vectors for the index part (repeatable); "
                                                          "default 200000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--memory-budget", default="2G")
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    tmp = Path(tempfile.mkdtemp(prefix="bench_scaleout_"))
    try:
        if not args.skip_engines:
            e = engines(tmp / "engines", args.images, args.actors)
            print(f"\nengines, {e['images']} images of 64 px, tiny ViT (192-d, 6 blocks), {args.actors} Ray actors, "
                  f"{os.cpu_count()} cores")
            print(f"  local {e['local_img_s']:.1f} img/s   ray {e['ray_img_s']:.1f} img/s   ray/local "
                  f"{e['ray_img_s'] / e['local_img_s']:.2f}   (Ray start-up {e['ray_startup_s']:.1f} s apart)")
            print(f"  same ids: {e['same_ids']}   max |vector difference| {e['max_diff']:.2g}")
        from vitdense.collection.index import parse_size

        budget = parse_size(args.memory_budget)
        print(f"\nindex build, synthetic clustered {args.dim}-d vectors, shards of {args.shard_rows}, "
              f"budget {args.memory_budget}")
        print(f"  {'N':>9} {'index':<16} {'train s':>8} {'add s':>7} {'merge s':>8} {'peak RSS':>9} "
              f"{'/budget':>7} {'R@10':>6} {'R@10 rr':>7}")
        rates = None
        for n in args.n or [200_000]:
            emb = tmp / f"emb-{n}"
            synthetic(emb, n, args.dim, args.shard_rows)
            from vitdense.collection.index import choose_index

            auto = choose_index(n, args.dim, budget)
            print(f"  {n:>9} auto choice: {auto.factory} ({auto.reason})")
            for kind in ("ivfflat", "ivfpq"):
                meta = build(emb, tmp / f"idx-{n}-{kind}", args.memory_budget, kind)
                sec, rec = meta["stages"]["seconds"], meta["recall"]
                print(f"  {n:>9} {meta['choice']['factory']:<16} {sec['train']:>8.1f} {sec['add']:>7.1f} "
                      f"{sec['merge']:>8.1f} {meta['peak_rss'] / 2**20:>7.0f}Mi {meta['peak_rss'] / budget:>7.2f} "
                      f"{rec['recall_at_10']:>6.3f} {rec['recall_at_10_reranked']:>7.3f}")
                c = meta["choice"]
                if kind == "ivfflat":  # coarse k-means only: its work rate
                    kmeans = c["n_train"] * c["nlist"] * args.dim / max(sec["train"], 1e-9)
                else:
                    ivfdata = sum(p.stat().st_size for p in (tmp / f"idx-{n}-{kind}").glob("merged-*.ivfdata"))
                    rates = {"add_per_s": n / max(sec["add"], 1e-9), "kmeans_per_s": kmeans,
                             "pq_train_s": max(sec["train"] - c["n_train"] * c["nlist"] * args.dim / kmeans, 0),
                             "merge_bytes_s": ivfdata / max(sec["merge"], 1e-9)}
            shutil.rmtree(emb)
        try:
            import autofaiss  # noqa: F401
            print("\nautofaiss is installed but the side-by-side run is not implemented in this script")
        except ImportError:
            print("\nautofaiss: not compared (pip install autofaiss would downgrade numpy to 1.26.4 in this "
                  "environment, so it is not installed)")
        if rates:
            from vitdense.collection.index import choose_index

            c = choose_index(10**9, args.dim, 64 * 2**30, "auto")
            # the add stage includes reading the Parquet shard and writing the .npy copy, so it scales with N
            add_h = 1e9 / rates["add_per_s"] / 3600
            train_h = (c.n_train * c.nlist * args.dim / rates["kmeans_per_s"] + rates["pq_train_s"]) / 3600
            merge_h = 1e9 * (c.m + 8) / rates["merge_bytes_s"] / 3600
            print(f"\n1 B vectors on paper, one machine like this one ({os.cpu_count()} cores), 64 GiB budget: "
                  f"{c.factory}")
            print(f"  train {train_h:.1f} h (coarse k-means work N_train x nlist x D at the IVF-Flat run's "
                  f"rate, + the PQ codebooks' measured time; OPQ and the HNSW quantizer not in it), add {add_h:.1f} h ({rates['add_per_s']:.0f} vectors/s; "
                  f"divide by the Ray workers), merge {merge_h:.1f} h ({rates['merge_bytes_s'] / 2**20:.0f} MiB/s "
                  f"of codes), codes on disk {1e9 * (c.m + 8) / 2**30:.0f} GiB, exact vectors "
                  f"{1e9 * args.dim * 4 / 2**40:.2f} TiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
