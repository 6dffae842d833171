"""Scale-out benchmark: `vitdense embed` on Ray against the local engine, and the index build from shards.

    python benchmarks/bench_scaleout.py                          # 300 images, 200k vectors (a few minutes, 2 cores)
    python benchmarks/bench_scaleout.py --skip-engines --n 1000000 --memory-budget 4G
    python benchmarks/bench_scaleout.py --skip-engines --n 10000000 --memory-budget 8G --kinds auto
    python benchmarks/bench_scaleout.py --images 1200 --rounds 3 --engine-model vits16 --n 20000

Part 1 (engines): the same generated images embedded ``--rounds`` times by each engine in turn (local,
ray, local, ray, ...: a drift of the machine's speed hits both alike): ``--engine local`` (this process,
one DataLoader worker decoding for all shards, batches embedded in ``local_lanes`` lanes: one torch thread
each up to 4 threads) and ``--engine ray`` (a local Ray, an actor pool of ``--actors``, one torch thread
each). ``--engine-model tiny`` (64 px, a 6-block 192-d ViT) shows the
engines' own costs most; ``vits16`` (ViT-S/16 at 224 px, random weights) is a real model's work per image.
Per run: images/s end to end (Ray's actor start and extractor builds included; ``ray.init`` once, apart)
and steady (each worker from its first finished shard to its last, summed); the ratios are medians over
the rounds; and whether both gave the same ids and vectors (max |difference|).

Part 2 (index): N synthetic clustered 384-d unit vectors (1000 centres in a random 64-d subspace + noise,
as benchmarks/bench_retrieval.py) written as Parquet shards of ``--shard-rows``, each shard drawn from its
own generator so the exact search of the 200 held-out queries regenerates them instead of reading them
back; `build_index` runs in a fresh process per index (so its peak RSS is its own; building an index does
not import torch) under ``--memory-budget``, for each of ``--kinds`` (``auto`` = the automatic choice; a
kind that gives the same index as one before it is skipped). Reported: the choice, how its lists were
trained, seconds per stage (train / add / merge), peak RSS against the budget, recall@10 of the held-out
queries with and without exact re-ranking. From the largest automatic build it projects 1 B vectors on
paper (training scaled by the coarse k-means work, add and merge by their measured rates).

autofaiss (``--autofaiss-python PATH``: the interpreter of a separate virtual environment holding it, since
``pip install autofaiss`` pins numpy < 2 and needs a faiss-cpu of its time): its ``build_index`` runs in
that interpreter as a subprocess on the same vectors, saved as .npy shards in the same order (written after
our builds are deleted: at 10 M they take 15 GB of disk), with ``current_memory_available`` = the budget
and ``max_index_memory_usage`` = half of it (autofaiss refuses less than 10 % headroom), ``metric_type="ip"``
and ``should_be_memory_mappable=True`` (our index's lists are on disk too; ``--autofaiss-in-ram`` lets it
pick any index); ``--autofaiss-timeout S`` stops it and says so. Both sides are then measured alike by this
script: wall time of the build process, its peak RSS (VmHWM, which each process reads of itself: ru_maxrss
would also count this script's size at the fork), index size on disk, and recall@10 of the same 200
held-out queries against exact search written plainly here (each query's own row left out); ours with and
without exact re-ranking, autofaiss with the search parameters it tuned. Without ``--autofaiss-python`` the
comparison is skipped with a printed reason.

    python -m venv .venv-autofaiss && .venv-autofaiss/bin/pip install autofaiss "pyarrow<21" "faiss-cpu==1.8.0.post1"
    python benchmarks/bench_scaleout.py --skip-engines --autofaiss-python .venv-autofaiss/bin/python
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, n: int, size: int = 64) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = np.linspace(0, 255, size)[None, :, None] * rng.random(3)[None, None, :]
        img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.png")


# the engine part's backbones (random weights): "tiny" shows the engines' own overhead most, "vits16" is the
# work per image of a real ViT-S/16 at 224 px
ENGINE_MODELS = {"tiny": (dict(embed_dim=192, depth=6, num_heads=3, img_size=64, patch_size=8), 64),
                 "vits16": (dict(embed_dim=384, depth=12, num_heads=6, img_size=224, patch_size=16), 224)}


def engines(tmp: Path, images: int, actors: int, rounds: int, shard: int, model: str = "tiny") -> dict:
    """The same images embedded ``rounds`` times by each engine, in turn (local, ray, local, ray, ...), so a
    drift of the machine's speed hits both alike. Per run: images/s end to end (Ray's actor start and
    extractor builds included; ``ray.init`` measured apart, once) and steady (first to last finished
    shard); the ratios are medians over rounds of ray/local within the round."""
    import ray
    import torch

    from vitdense import backbone_meta, create_vit, save_backbone
    from vitdense.collection.embed import ExtractorSpec
    from vitdense.collection.engines import embed_collection
    from vitdense.collection.shards import Collection, read_shard
    from vitdense.retrieval import DescriptorConfig

    kw, size = ENGINE_MODELS[model]
    make_images(tmp / "img", images, size)
    torch.manual_seed(0)
    save_backbone(create_vit("vit_small_patch8_224", **kw), tmp / "w.safetensors",
                  backbone_meta("vit_small_patch8_224", kw))
    spec = ExtractorSpec("auto", str(tmp / "w.safetensors"), "cpu")
    cfg = DescriptorConfig(load_size=size, stride=kw["patch_size"])

    def rows(root):
        ids, vec = [], []
        for name, _ in Collection.load(root).done_rows():
            s = read_shard(root, name)
            ids += s["id"]
            vec.append(s["vector"])
        return ids, np.concatenate(vec)

    t0 = time.perf_counter()
    ray.init(num_cpus=max(os.cpu_count() or 1, actors + 2), include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - t0
    runs: list[dict] = []
    try:
        for r in range(rounds):
            run = {}
            for engine in ("local", "ray"):
                out = tmp / f"{engine}-{r}"
                rep = embed_collection([tmp / "img"], out, spec, cfg, engine=engine, shard_size=shard,
                                       num_workers=1, actors=actors, batch_size=16, progress=False)
                run[engine] = (rep.images_per_second, rep.steady_images_per_second)
                if r == 0:
                    run[engine + "_rows"] = rows(out)
                shutil.rmtree(out)
            runs.append(run)
            print(f"  round {r + 1}: local {run['local'][0]:.1f} img/s (steady {run['local'][1]:.1f})   ray "
                  f"{run['ray'][0]:.1f} (steady {run['ray'][1]:.1f})   ray/local {run['ray'][0] / run['local'][0]:.2f} "
                  f"(steady {run['ray'][1] / run['local'][1]:.2f})", flush=True)
    finally:
        ray.shutdown()
    (il, vl), (ir, vr) = runs[0]["local_rows"], runs[0]["ray_rows"]
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {"images": images, "shards": -(-images // shard), "rounds": rounds, "ray_startup_s": startup,
            "local_img_s": med([x["local"][0] for x in runs]), "ray_img_s": med([x["ray"][0] for x in runs]),
            "ratio": med([x["ray"][0] / x["local"][0] for x in runs]),
            "steady_ratio": med([x["ray"][1] / x["local"][1] for x in runs]),
            "ratios": [x["ray"][0] / x["local"][0] for x in runs],
            "steady_ratios": [x["ray"][1] / x["local"][1] for x in runs],
            "same_ids": il == ir, "max_diff": float(np.abs(vl - vr).max())}


class Synthetic:
    """N clustered unit vectors (1000 centres in a random 64-d subspace + noise, as
    benchmarks/bench_retrieval.py), shard by shard: shard s is drawn from its own generator, so any shard can
    be made again without keeping or reading it (the exact search of the queries regenerates them)."""

    def __init__(self, n: int, dim: int, shard_rows: int, seed: int = 0):
        self.n, self.dim, self.shard_rows, self.seed = n, dim, shard_rows, seed
        rng = np.random.default_rng(seed)
        self.basis = np.linalg.qr(rng.normal(size=(dim, 64)))[0]  # (dim, 64)
        self.centres = rng.normal(size=(1000, 64))
        self.starts = list(range(0, n, shard_rows))

    def shard(self, s: int) -> np.ndarray:
        count = min(self.shard_rows, self.n - self.starts[s])
        rng = np.random.default_rng([self.seed, s])
        low = self.centres[rng.integers(0, 1000, count)] + 0.6 * rng.normal(size=(count, 64))
        v = low @ self.basis.T + 0.15 * rng.normal(size=(count, self.dim))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    def write(self, root: Path) -> None:
        """The vectors as an embeddings folder (Parquet shards + manifest) under root."""
        from vitdense.collection.embed import ShardRows
        from vitdense.collection.shards import Collection, write_shard
        from vitdense.collection.sources import ShardSpec
        from vitdense.retrieval import DescriptorConfig

        (root / "inputs").mkdir(parents=True)
        specs = []
        for s, start in enumerate(self.starts):
            v = self.shard(s)
            spec = ShardSpec(f"shard-{s:05d}", "files", tuple(f"synthetic/{start + i}" for i in range(len(v))))
            (root / "inputs" / f"{spec.name}.txt").write_text("\n".join(spec.items) + "\n")
            write_shard(root, spec.name, ShardRows(list(spec.items), [""] * len(v), [""] * len(v), v), 0.0)
            specs.append(spec)
        Collection(root, {"fingerprint": "synthetic", "stride": 0, "model": "synthetic"}, DescriptorConfig(),
                   self.dim, specs).write_manifest()

    def write_npy(self, folder: Path) -> None:
        """The same vectors as folder/shard-NNNNN.npy (what autofaiss reads; sorted names keep the order)."""
        folder.mkdir(parents=True)
        for s in range(len(self.starts)):
            np.save(folder / f"shard-{s:05d}.npy", self.shard(s))

    def exact_queries(self, k: int = 11, count: int = 200, seed: int = 1
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``count`` random rows as queries (Q, D'), their exact top-k global ids by inner product over every
        vector (plain numpy, a regenerated shard at a time, a running top-k) and the rows themselves."""
        rows = np.sort(np.random.default_rng(seed).choice(self.n, count, replace=False))
        shard_of = np.searchsorted(self.starts, rows, "right") - 1
        q = np.empty((count, self.dim), np.float32)
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            q[where] = self.shard(s)[rows[where] - self.starts[s]]
        best_s = np.full((count, 0), -np.inf, np.float32)
        best_i = np.zeros((count, 0), np.int64)
        for s, start in enumerate(self.starts):
            scores = q @ self.shard(s).T  # (Q, rows of shard s)
            ids = np.broadcast_to(start + np.arange(scores.shape[1]), scores.shape)
            if scores.shape[1] > k:  # the shard's own top k first, so the merge stays (Q, 2k)
                part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                scores, ids = np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)
            best_s, best_i = np.concatenate([best_s, scores], 1), np.concatenate([best_i, ids], 1)
            keep = np.lexsort((best_i, -best_s), axis=-1)[:, :k]  # by score, ties by the lower id
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
        return q, best_i, rows


def child(emb: str, out: str, budget: str, kind: str) -> None:
    """Build one index in this (fresh) process and print index.json."""
    from vitdense.collection.index import build_index

    print(json.dumps(build_index(emb, out, budget, index_type=kind, progress=False)))


def run_measured(cmd: list[str], env: dict | None = None, timeout: float | None = None
                 ) -> tuple[str | None, float]:
    """Run ``cmd`` to the end; (its stdout, wall seconds), or (None, seconds) when it ran past ``timeout``
    (its whole process group is killed). Peak memory is what the child reports of itself (VmHWM):
    ru_maxrss from os.wait4 would count this script's own size at the fork too."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{err[-3000:]}")
    return out, time.perf_counter() - t0


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


def autofaiss_build(python: str, emb: Path, out: Path, budget: int, in_ram: bool, timeout: float | None = None
                    ) -> dict | None:
    """autofaiss' build_index on emb/npy in ``python`` (its own virtual environment), measured like ours;
    None when it ran past ``timeout`` seconds."""
    out.mkdir()
    cmd = [python, "-c", AUTOFAISS_CHILD, str(emb / "npy"), str(out), f"{budget}B", f"{budget // 2}B",
           "0" if in_ram else "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    text, wall = run_measured(cmd, env, timeout)
    if text is None:
        return None
    res = json.loads(text.strip().splitlines()[-1])
    res.update(wall_s=wall, index_bytes=(out / "knn.index").stat().st_size)
    return res


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


def sweep(index_dir: Path, q: np.ndarray, exact: np.ndarray, own: np.ndarray, nprobes: list[int],
          reranks: list[int]) -> list[tuple[int, int, float, float]]:
    """recall@10 and ms per query (200 queries in one batch, warm page cache) of a built index for each
    (nprobe, rerank): what `vitdense search --nprobe/--rerank` would give."""
    from vitdense.collection.index import ShardedIndex, set_nprobe

    idx = ShardedIndex(index_dir)
    rows = []
    for nprobe in nprobes:
        set_nprobe(idx.index, nprobe)
        for rerank in reranks:
            idx.rerank = rerank
            idx.search(q[:5], 11)  # warm
            t0 = time.perf_counter()
            got = idx.search(q, 11)[1]
            rows.append((nprobe, rerank, recall10(exact, got, own), (time.perf_counter() - t0) / len(q) * 1e3))
    return rows


def autofaiss_recall(out: Path, infos: dict, q: np.ndarray, exact: np.ndarray, own: np.ndarray) -> float:
    import faiss

    index = faiss.read_index(str(out / "knn.index"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
    return recall10(exact, index.search(q, 11)[1], own)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="engine runs of each kind, in turn (default 3)")
    ap.add_argument("--engine-shard", type=int, default=50, help="images per shard in the engine part")
    ap.add_argument("--engine-model", choices=sorted(ENGINE_MODELS), default="tiny",
                    help="the engine part's backbone: tiny (64 px: the engines' overhead shows most) or vits16 "
                         "(ViT-S/16 at 224 px: a real model's work per image)")
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
    ap.add_argument("--kinds", default="auto,ivfpq", help="our index types to build (comma-separated; auto = "
                    "the automatic choice; a kind that gives the same index as one before it is skipped)")
    ap.add_argument("--sweep", help="NPROBES:RERANKS, e.g. 128,512:100,1000: recall@10 and ms/query of each "
                                     "of our IVF builds for each pair")
    ap.add_argument("--autofaiss-timeout", type=float, help="stop autofaiss after this many seconds and say so")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    tmp = Path(tempfile.mkdtemp(prefix="bench_scaleout_"))
    try:
        if not args.skip_engines:
            from vitdense.collection.engines import local_lanes

            kw, size = ENGINE_MODELS[args.engine_model]
            lanes, per_lane = local_lanes("cpu")
            print(f"\nengines, {args.images} images of {size} px in shards of {args.engine_shard}, random ViT "
                  f"({kw['embed_dim']}-d, {kw['depth']} blocks, patch {kw['patch_size']}), {args.actors} Ray actors "
                  f"(1 torch thread each), local: {lanes} lanes of {per_lane} torch thread(s) + 1 decoding worker, "
                  f"{os.cpu_count()} cores, {args.rounds} rounds in turn")
            e = engines(tmp / "engines", args.images, args.actors, args.rounds, args.engine_shard, args.engine_model)
            print(f"  medians: local {e['local_img_s']:.1f} img/s   ray {e['ray_img_s']:.1f} img/s   ray/local "
                  f"{e['ratio']:.2f} end to end (rounds {', '.join(f'{x:.2f}' for x in e['ratios'])}), "
                  f"{e['steady_ratio']:.2f} steady (rounds {', '.join(f'{x:.2f}' for x in e['steady_ratios'])}); "
                  f"Ray start-up {e['ray_startup_s']:.1f} s apart")
            print(f"  same ids: {e['same_ids']}   max |vector difference| {e['max_diff']:.2g}")
        from vitdense.collection.index import parse_size

        budget = parse_size(args.memory_budget)
        print(f"\nindex build, synthetic clustered {args.dim}-d vectors, shards of {args.shard_rows}, "
              f"budget {args.memory_budget}")
        print(f"  {'N':>9} {'index':<16} {'train s':>8} {'add s':>7} {'merge s':>8} {'peak RSS':>9} "
              f"{'/budget':>7} {'R@10':>6} {'R@10 rr':>7}")
        side: list[tuple] = []  # (N, builder, factory, wall s, peak RSS, index bytes, R@10, R@10 re-ranked)
        if not args.autofaiss_python:
            print("  (autofaiss not compared: give --autofaiss-python PATH, the python of a virtual environment "
                  "with autofaiss; see the module doc)")
        projection = None  # (N, IndexChoice, index.json) of the largest automatic build
        for n in args.n or [200_000]:
            emb = tmp / f"emb-{n}"
            data = Synthetic(n, args.dim, args.shard_rows)
            t0 = time.perf_counter()
            data.write(emb)
            written = time.perf_counter() - t0
            t0 = time.perf_counter()
            q, exact, own = data.exact_queries()
            from vitdense.collection.index import choose_index

            auto = choose_index(n, args.dim, budget, shard_rows=min(n, args.shard_rows))
            print(f"  {n:>9} shards written in {written:.0f} s, exact top-11 of {len(q)} queries in "
                  f"{time.perf_counter() - t0:.0f} s; auto choice: {auto.factory} ({auto.reason})", flush=True)
            built = set()
            for kind in args.kinds.split(","):
                factory = auto.factory if kind == "auto" else choose_index(
                    n, args.dim, budget, kind, shard_rows=min(n, args.shard_rows)).factory
                if factory in built:
                    print(f"  {n:>9} {kind}: {factory} again (built above), skipped")
                    continue
                built.add(factory)
                out = tmp / f"idx-{n}-{kind}"
                meta = build(emb, out, args.memory_budget, kind)
                sec, rec, proc = meta["stages"]["seconds"], meta["recall"], meta["process"]
                print(f"  {n:>9} {meta['choice']['factory']:<16} {sec['train']:>8.1f} {sec['add']:>7.1f} "
                      f"{sec['merge']:>8.1f} {meta['peak_rss'] / 2**20:>7.0f}Mi {meta['peak_rss'] / budget:>7.2f} "
                      f"{rec['recall_at_10']:>6.3f} {rec['recall_at_10_reranked']:>7.3f}   {meta['coarse_training']}; "
                      "peak RSS after " + " / ".join(f"{k} {v / 2**20:.0f}Mi"
                                                     for k, v in meta["stages"]["peak_rss"].items()), flush=True)
                plain, reranked = our_recall(out, q, exact, own)
                if args.sweep and meta["choice"]["kind"] != "flat":
                    nprobes, reranks = ([int(x) for x in part.split(",")] for part in args.sweep.split(":"))
                    for nprobe, rerank, r, ms in sweep(out, q, exact, own, nprobes, reranks):
                        print(f"  {n:>9}   sweep nprobe {nprobe:>5} rerank {rerank:>5}: R@10 {r:.3f}, {ms:.1f} ms/query",
                              flush=True)
                side.append((n, f"vitdense {kind}", meta["choice"]["factory"], proc["wall_s"], proc["peak_rss"],
                             proc["index_bytes"], plain, reranked))
                if meta["choice"]["kind"] != "flat" and kind in ("auto", "ivfpq"):
                    meta["ivfdata_bytes"] = sum(f.stat().st_size for f in out.glob("merged-*.ivfdata"))
                    projection = (n, meta)
                shutil.rmtree(out)
            if args.autofaiss_python:
                out = tmp / f"autofaiss-{n}"
                t0 = time.perf_counter()
                data.write_npy(emb / "npy")  # only now: at 10 M the copies take 15 GB of disk
                print(f"  {n:>9} autofaiss' .npy copies written in {time.perf_counter() - t0:.0f} s", flush=True)
                try:
                    af = autofaiss_build(args.autofaiss_python, emb, out, budget, args.autofaiss_in_ram,
                                         args.autofaiss_timeout)
                except SystemExit as err:  # its failure is a row of the table, not the end of the run
                    lines = [x for x in str(err).splitlines() if x.strip()]
                    side.append((n, "autofaiss", f"failed: {lines[-1] if lines else err}", None, None, None, None,
                                 None))
                    print(f"  {n:>9} autofaiss failed:\n{err}", flush=True)
                    af = False
                if af is False:
                    pass
                elif af is None:
                    side.append((n, "autofaiss", f"did not finish in {args.autofaiss_timeout} s", None, None, None,
                                 None, None))
                    print(f"  {n:>9} autofaiss: stopped after {args.autofaiss_timeout} s (--autofaiss-timeout)")
                else:
                    side.append((n, "autofaiss", af["infos"]["index_key"], af["wall_s"], af["peak_rss"],
                                 af["index_bytes"], autofaiss_recall(out, af["infos"], q, exact, own), None))
                    print(f"  {n:>9} autofaiss {af['infos']['index_key']} ({af['infos']['index_param']}): "
                          f"build_index {af['build_s']:.1f} s + import {af['import_s']:.1f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(emb)
        print(f"\nside by side: each build in a fresh process, its wall time and peak RSS (its VmHWM); recall@10 of "
              f"the same {len(q)} held-out queries against exact search; ratios against autofaiss")
        print(f"  {'N':>9} {'builder':<18} {'index':<34} {'wall s':>7} {'peak RSS':>9} {'/budget':>7} "
              f"{'index MiB':>9} {'R@10':>6} {'R@10 rr':>7} {'time/af':>7} {'RSS/af':>6}")
        for row in side:
            n, who, factory, wall, rss, size, r, rr = row
            if wall is None:
                print(f"  {n:>9} {who:<18} {factory}")
                continue
            ref = next((x for x in side if x[0] == n and x[1] == "autofaiss"), None)
            if ref and ref[3] is None:
                ratio = f"{'< ' + format(wall / args.autofaiss_timeout, '.2f'):>7} {'-':>6}"
            else:
                ratio = f"{wall / ref[3]:>7.2f} {rss / ref[4]:>6.2f}" if ref else f"{'-':>7} {'-':>6}"
            print(f"  {n:>9} {who:<18} {factory:<34} {wall:>7.1f} {rss / 2**20:>7.0f}Mi {rss / budget:>7.2f} "
                  f"{size / 2**20:>9.1f} {r:>6.3f} {'-' if rr is None else format(rr, '.3f'):>7} {ratio}")
        if projection:
            from vitdense.collection.index import IndexChoice, TWO_LEVEL_FROM, choose_index, coarse_training

            n, meta = projection
            sec, done = meta["stages"]["seconds"], IndexChoice(**meta["choice"])

            def work(c):  # coarse k-means work: training points x centroids each is compared with x D'
                return c.n_train * (c.nlist if c.nlist < TWO_LEVEL_FROM else 2 * math.sqrt(c.nlist)) * args.dim

            c = choose_index(10**9, args.dim, 64 * 2**30, "auto", shard_rows=args.shard_rows)
            train_h = sec["train"] * work(c) / work(done) / 3600
            add_h = 1e9 / (n / max(sec["add"], 1e-9)) / 3600
            merge_h = 1e9 * (c.m + 8) / (meta["ivfdata_bytes"] / max(sec["merge"], 1e-9)) / 3600
            print(f"\n1 B vectors on paper, one machine like this one ({os.cpu_count()} cores), 64 GiB budget: "
                  f"{c.factory}, {coarse_training(c)}")
            print(f"  from the {n}-vector {done.factory} build ({meta['coarse_training']}): train {train_h:.1f} h "
                  f"(its {sec['train']:.0f} s scaled by the coarse k-means work, N_train x centroids compared x D'), "
                  f"add {add_h:.1f} h ({n / max(sec['add'], 1e-9):.0f} vectors/s; divide by the Ray workers), merge "
                  f"{merge_h:.1f} h, codes on disk {1e9 * (c.m + 8) / 2**30:.0f} GiB, exact vectors "
                  f"{1e9 * args.dim * 4 / 2**40:.2f} TiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
