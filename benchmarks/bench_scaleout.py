"""Scale-out benchmark: `vitdense embed` on Ray against the local engine, and the index build from shards.

    python benchmarks/bench_scaleout.py                          # 300 images, 200k vectors (a few minutes, 2 cores)
    python benchmarks/bench_scaleout.py --n 1000000 --n 10000000 --images 5000   # bigger machines

Part 1 (engines): the same generated images (64 px, a tiny random ViT: the engines' overhead, not the
network, is what is compared) embedded with ``--engine local`` (this process) and ``--engine ray`` (a
local Ray with an actor pool of ``--actors``); images/s of each (Ray's start-up counted apart), the ratio,
and whether both gave the same ids and vectors (max |difference|).

Part 2 (index): N synthetic clustered 384-d unit vectors (1000 centres in a random 64-d subspace + noise,
as benchmarks/bench_retrieval.py) written as Parquet shards of ``--shard-rows``; `build_index` runs in a
fresh process per N (so its peak RSS is its own; building an index does not import torch) under
``--memory-budget``, once with the automatic choice and once forced to IVF-PQ. Reported: the
choice, seconds per stage (train / add / merge), peak RSS against the budget, recall@10 of the held-out
queries with and without exact re-ranking. From the measured rates (vectors added per second, k-means
work per second, merge MB/s) it projects 1 B vectors on paper.

autofaiss (``--autofaiss-python PATH``: the interpreter of a separate virtual environment holding it, since
``pip install autofaiss`` pins numpy < 2): its ``build_index`` runs in that interpreter as a subprocess on
the same vectors, saved as .npy shards in the same order, with ``current_memory_available`` = the budget
and ``max_index_memory_usage`` = half of it (autofaiss refuses less than 10 % headroom), ``metric_type="ip"``
and ``should_be_memory_mappable=True`` (our index's lists are on disk too; ``--autofaiss-in-ram`` lets it
pick any index). Both sides are then measured alike by this script: wall time of the build process, its
peak RSS (VmHWM, which each process reads of itself: ru_maxrss would also count this script's size at the
fork), index size on disk, and recall@10 of the same 200 held-out queries
against exact search written plainly here (each query's own row left out); ours with and without exact
re-ranking, autofaiss with the search parameters it tuned. Without ``--autofaiss-python`` the comparison is
skipped with a printed reason.

    python -m venv .venv-autofaiss && .venv-autofaiss/bin/pip install autofaiss "pyarrow<21"
    python benchmarks/bench_scaleout.py --skip-engines --autofaiss-python .venv-autofaiss/bin/python
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
    """Clustered unit vectors written as embedding shards (see the module doc), and the same vectors as
    root/npy/shard-NNNNN.npy (what autofaiss reads; the sorted file names keep the shards' order)."""
    from vitdense.collection.embed import ShardRows
    from vitdense.collection.shards import Collection, write_shard
    from vitdense.collection.sources import ShardSpec
    from vitdense.retrieval import DescriptorConfig

    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, 64)))[0]  # (dim, 64)
    centres = rng.normal(size=(1000, 64))
    (root / "inputs").mkdir(parents=True)
    (root / "npy").mkdir()
    specs = []
    for s, start in enumerate(range(0, n, shard_rows)):
        count = min(shard_rows, n - start)
        spec = ShardSpec(f"shard-{s:05d}", "files", tuple(f"synthetic/{start + i}" for i in range(count)))
        (root / "inputs" / f"{spec.name}.txt").write_text("\n".join(spec.items) + "\n")
        low = centres[rng.integers(0, 1000, count)] + 0.6 * rng.normal(size=(count, 64))
        v = low @ basis.T + 0.15 * rng.normal(size=(count, dim))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        write_shard(root, spec.name, ShardRows(list(spec.items), [""] * count, [""] * count, v), 0.0)
        np.save(root / "npy" / f"{spec.name}.npy", v)
        specs.append(spec)
    Collection(root, {"fingerprint": "synthetic", "stride": 0, "model": "synthetic"}, DescriptorConfig(), dim,
               specs).write_manifest()


def child(emb: str, out: str, budget: str, kind: str) -> None:
    """Build one index in this (fresh) process and print index.json."""
    from vitdense.collection.index import build_index

    print(json.dumps(build_index(emb, out, budget, index_type=kind, progress=False)))


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """Run ``cmd`` to the end; (its stdout, wall seconds). Peak memory is what the child reports of itself
    (VmHWM): ru_maxrss from os.wait4 would count this script's own size at the fork too."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{cmd[0]} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout, time.perf_counter() - t0


def build(emb: Path, out: Path, budget: str, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(emb), str(out), budget, kind]
    text, wall = run_measured(cmd, {**os.environ, "PYTHONPATH": str(ROOT)})
    meta = json.loads(text.strip().splitlines()[-1])
    meta["process"] = {"wall_s": wall, "peak_rss": meta["peak_rss"],
                       "index_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()
                                          and (f.suffix in (".ivfdata",) or f.name.startswith("populated-")))}
    return meta


# Runs in autofaiss' own interpreter (no vitdense there): build, then print the seconds and its infos.
AUTOFAISS_CHILD = """
import json, logging, os, sys, time
t0 = time.perf_counter()
from autofaiss import build_index
t1 = time.perf_counter()
emb, out, budget, index_budget, mmap = sys.argv[1:6]
_, infos = build_index(embeddings=emb, index_path=os.path.join(out, "knn.index"),
                       index_infos_path=os.path.join(out, "infos.json"), metric_type="ip",
                       current_memory_available=budget, max_index_memory_usage=index_budget,
                       should_be_memory_mappable=mmap == "1", nb_cores=os.cpu_count(), verbose=logging.WARNING)
if infos is None:
    sys.exit("autofaiss build_index returned nothing (see its log above)")
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"import_s": t1 - t0, "build_s": time.perf_counter() - t1, "infos": infos, "peak_rss": hwm}))
"""


def autofaiss_build(python: str, emb: Path, out: Path, budget: int, in_ram: bool) -> dict:
    """autofaiss' build_index on emb/npy in ``python`` (its own virtual environment), measured like ours."""
    out.mkdir()
    cmd = [python, "-c", AUTOFAISS_CHILD, str(emb / "npy"), str(out), f"{budget}B", f"{budget // 2}B",
           "0" if in_ram else "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    text, wall = run_measured(cmd, env)
    res = json.loads(text.strip().splitlines()[-1])
    res.update(wall_s=wall, index_bytes=(out / "knn.index").stat().st_size)
    return res


def exact_queries(emb: Path, n: int, k: int = 11, count: int = 200, seed: int = 1) -> tuple[np.ndarray, np.ndarray,
                                                                                              np.ndarray]:
    """``count`` random rows of the collection as queries (Q, D'), their exact top-k global ids by inner
    product over every vector (plain numpy, shard by shard), and the rows themselves."""
    rows = np.sort(np.random.default_rng(seed).choice(n, count, replace=False))
    files = sorted((emb / "npy").glob("*.npy"))
    arrays = [np.load(f, mmap_mode="r") for f in files]
    starts = np.cumsum([0] + [len(a) for a in arrays])
    q = np.stack([arrays[s][r - starts[s]] for r in rows for s in [np.searchsorted(starts, r, "right") - 1]])
    scores = np.concatenate([q @ np.asarray(a).T for a in arrays], axis=1)  # (Q, N): 200 × N floats
    return q, np.argsort(-scores, axis=1, kind="stable")[:, :k], rows


def recall10(exact: np.ndarray, got: np.ndarray, own: np.ndarray) -> float:
    """Mean recall@10 of ``got`` (Q, 11) against ``exact`` (Q, 11), each query's own row left out of both."""
    total = 0.0
    for e, g, o in zip(exact, got, own):
        truth = [i for i in e if i != o][:10]
        total += len({i for i in g if i != o and i >= 0}.intersection(truth)) / len(truth)
    return total / len(exact)


def our_recall(index_dir: Path, q: np.ndarray, exact: np.ndarray, own: np.ndarray) -> tuple[float, float]:
    from vitdense.collection.index import ShardedIndex

    idx = ShardedIndex(index_dir)
    reranked = recall10(exact, idx.search(q, 11)[1], own)
    idx.rerank = 0
    return recall10(exact, idx.search(q, 11)[1], own), reranked


def autofaiss_recall(out: Path, infos: dict, q: np.ndarray, exact: np.ndarray, own: np.ndarray) -> float:
    import faiss

    index = faiss.read_index(str(out / "knn.index"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
    return recall10(exact, index.search(q, 11)[1], own)


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
    ap.add_argument("--autofaiss-python", help="python of a virtual environment with autofaiss installed: "
                                               "compare with its build_index (default: not compared)")
    ap.add_argument("--autofaiss-in-ram", action="store_true",
                    help="let autofaiss pick indexes that cannot be memory-mapped (e.g. HNSW)")
    ap.add_argument("--kinds", default="ivfflat,ivfpq", help="our index types to build (comma-separated; the "
                                                               "1 B projection needs both)")
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
        side: list[tuple] = []  # (N, builder, factory, wall s, peak RSS, index bytes, R@10, R@10 re-ranked)
        if not args.autofaiss_python:
            print("  (autofaiss not compared: give --autofaiss-python PATH, the python of a virtual environment "
                  "with autofaiss; see the module doc)")
        for n in args.n or [200_000]:
            emb = tmp / f"emb-{n}"
            synthetic(emb, n, args.dim, args.shard_rows)
            q, exact, own = exact_queries(emb, n)
            from vitdense.collection.index import choose_index

            auto = choose_index(n, args.dim, budget, shard_rows=min(n, args.shard_rows))
            print(f"  {n:>9} auto choice: {auto.factory} ({auto.reason})")
            kmeans = None
            for kind in args.kinds.split(","):
                out = tmp / f"idx-{n}-{kind}"
                meta = build(emb, out, args.memory_budget, kind)
                sec, rec, proc = meta["stages"]["seconds"], meta["recall"], meta["process"]
                print(f"  {n:>9} {meta['choice']['factory']:<16} {sec['train']:>8.1f} {sec['add']:>7.1f} "
                      f"{sec['merge']:>8.1f} {meta['peak_rss'] / 2**20:>7.0f}Mi {meta['peak_rss'] / budget:>7.2f} "
                      f"{rec['recall_at_10']:>6.3f} {rec['recall_at_10_reranked']:>7.3f}   peak RSS after "
                      + " / ".join(f"{k} {v / 2**20:.0f}Mi" for k, v in meta["stages"]["peak_rss"].items()))
                plain, reranked = our_recall(out, q, exact, own)
                side.append((n, f"vitdense {kind}", meta["choice"]["factory"], proc["wall_s"], proc["peak_rss"],
                             proc["index_bytes"], plain, reranked))
                c = meta["choice"]
                if kind == "ivfflat":  # coarse k-means only: its work rate
                    kmeans = c["n_train"] * c["nlist"] * args.dim / max(sec["train"], 1e-9)
                elif kmeans:
                    ivfdata = sum(p.stat().st_size for p in out.glob("merged-*.ivfdata"))
                    rates = {"add_per_s": n / max(sec["add"], 1e-9), "kmeans_per_s": kmeans,
                             "pq_train_s": max(sec["train"] - c["n_train"] * c["nlist"] * args.dim / kmeans, 0),
                             "merge_bytes_s": ivfdata / max(sec["merge"], 1e-9)}
                shutil.rmtree(out)
            if args.autofaiss_python:
                out = tmp / f"autofaiss-{n}"
                af = autofaiss_build(args.autofaiss_python, emb, out, budget, args.autofaiss_in_ram)
                side.append((n, "autofaiss", af["infos"]["index_key"], af["wall_s"], af["peak_rss"],
                             af["index_bytes"], autofaiss_recall(out, af["infos"], q, exact, own), None))
                print(f"  {n:>9} autofaiss {af['infos']['index_key']} ({af['infos']['index_param']}): build_index "
                      f"{af['build_s']:.1f} s + import {af['import_s']:.1f} s")
                shutil.rmtree(out)
            shutil.rmtree(emb)
        print(f"\nside by side: each build in a fresh process, its wall time and peak RSS (its VmHWM); recall@10 of "
              f"the same {len(q)} held-out queries against exact search; ratios against autofaiss")
        print(f"  {'N':>9} {'builder':<18} {'index':<34} {'wall s':>7} {'peak RSS':>9} {'/budget':>7} "
              f"{'index MiB':>9} {'R@10':>6} {'R@10 rr':>7} {'time/af':>7} {'RSS/af':>6}")
        for row in side:
            n, who, factory, wall, rss, size, r, rr = row
            ref = next((x for x in side if x[0] == n and x[1] == "autofaiss"), None)
            ratio = f"{wall / ref[3]:>7.2f} {rss / ref[4]:>6.2f}" if ref else f"{'-':>7} {'-':>6}"
            print(f"  {n:>9} {who:<18} {factory:<34} {wall:>7.1f} {rss / 2**20:>7.0f}Mi {rss / budget:>7.2f} "
                  f"{size / 2**20:>9.1f} {r:>6.3f} {'-' if rr is None else format(rr, '.3f'):>7} {ratio}")
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
