"""The GPU device suite: every speed claim measured in one call, each against its baseline on the same GPU.

    python benchmarks/device_suite.py --out DIR            # on the GPU: about 6 minutes, at most 8
    python benchmarks/device_suite.py --out DIR --toy      # the same code at toy sizes (CPU: a few minutes)
    python benchmarks/device_suite.py --out DIR --parts extract --toy --no-peers

Three parts, each in a process of its own with its own time budget (run as extract, analyses, pretrain: the time
the first two leave over rolls over to the last); inside a part every case runs in its own process with a
deadline too, so a case that fails, hangs or runs out of memory is reported as such and the rest still run:

1. ``pretrain``  DINO training steps, ViT-S/16 and ViT-S/8, 2x224 + 10x96 crops, bf16, fused AdamW, resident
   sources with the crops made on the device, with and without ``torch.compile``: images/s end to end (loader
   included), compute only (the same steps on one fixed batch) and of the loader alone; model FLOPs per image
   (counted by ``torch.utils.flop_counter`` on one training step), MFU against the card's dense bf16 peak,
   peak GPU memory. Baseline: facebookresearch/dino's ``main_dino.py`` (``benchmarks/_main_dino.py``) on the
   same JPEGs, with its own defaults (fp16, its loader, workers = cores - 2) and the same batch, timed over the
   same steps after the same warm-up.
2. ``extract``   ViT-S/8, stride 4, key facet, layer 11, with and without log-binning, at 224, 448 and 896 px
   short side (``bench_extract.build_case``): images/s and peak GPU memory of vitdense in fp32 and bf16 against
   dino-vit-features' extractor (fp32). A peer that runs out of memory is a result ("oom").
3. ``analyses``  correspondences (448-px pair, ``bench_correspond.py``), co-segmentation (20 photos,
   ``bench_cosegment.py``) and video propagation (50 frames of 854x480, ``bench_video.py``) against the peers'
   own code, with the checks those benchmarks make (shared correspondences, k, identical masks).

Writes ``DIR/<part>.json`` and ``DIR/<part>.md`` for each part and ``DIR/summary.md`` (seven files), and prints
the tables. Peers (never committed): ``.peers/dino`` (facebookresearch/dino) and ``.peers/dino-vit-features``
(ShirAmir/dino-vit-features); all models have random weights. How to run it on the device machine (carry
list, timeout, budgets): ``benchmarks/device_suite.md``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from _isolated import run_json  # noqa: E402

PARTS = ("pretrain", "extract", "analyses")  # the issue's order, kept in the reports
# Run order: pretraining last, so that the time the two shorter parts leave over goes to its lowest-priority
# cases (the compiled ViT-S/8), while their own budgets stay hard limits.
RUN_ORDER = ("extract", "analyses", "pretrain")
TITLES = {"pretrain": "1. Pretraining throughput", "extract": "2. Extraction", "analyses": "3. Analyses"}
# Seconds per part on the GPU: 480 s = 8 minutes in all (a device session has 15 minutes, start-up included,
# and room is left for one re-run of a part). A part that finishes early leaves its time to the next one.
BUDGET_S = {"pretrain": 230, "extract": 100, "analyses": 150}
TOY_BUDGET_S = {"pretrain": 300, "extract": 200, "analyses": 300}
# Shares of a --budget (the device session's ~200 s): the cases that measure the targets first (extraction
# ours + peer at 224/448 px; ViT-S/16 eager + main_dino.py), the analyses with what is left over.
SHARED_BUDGET = {"extract": 0.35, "analyses": 0.20, "pretrain": 0.45}
GRACE_S = 20  # for a part to write its file after its own deadline, before the driver kills it
SHARED_GRACE_S = 8  # the same under --budget (a part's report is a few KB, written after every case anyway)
MIN_CASE_S = 5  # a case is not started with less time than this left


def plan(toy: bool) -> dict[str, dict[str, Any]]:
    """The settings of every part: the issue's on the GPU, tiny ones with ``--toy`` (same code paths)."""
    workers = max(1, (os.cpu_count() or 2) - 2)  # main_dino.py's loader: workers = cores - 2
    # Warm-up and timed steps are multiples of the workers: each worker makes whole batches, so a CPU-bound
    # loader delivers them in waves of `workers` batches, and a window of whole waves measures its true rate.
    if toy:
        return {
            "pretrain": dict(archs=[["vit_small_patch16_224", 2], ["vit_small_patch8_224", 2]], min_batch=1,
                             global_size=32, local_size=16, local_crops=2, out_dim=256, warmup=1, steps=2,
                             compute_warmup=1, workers=workers, distinct_images=8, dino_steps=2,
                             dino_archs=["vit_small_patch16_224"], compile_archs=["vit_small_patch16_224"],
                             compile_backend="aot_eager", caps=dict(ours=150, compiled=240, dino=120)),
            "extract": dict(sizes=[32, 48, 64], large=[64], target_size=48, bins=[False, True],
                            dtypes=["float32", "bfloat16"], repeats=2, case_cap_s=2.0, caps=dict(small=90, large=60)),
            "analyses": dict(correspond_size=64, cosegment_n=3, cosegment_load=96, video_frames=4,
                             video_hw=[96, 160], video_load=96, video_tiny=True,
                             shares=dict(correspond=80, cosegment=120, video=100)),
        }
    return {
        "pretrain": dict(archs=[["vit_small_patch16_224", 256], ["vit_small_patch8_224", 128]], min_batch=32,
                         global_size=224, local_size=96, local_crops=10, out_dim=65536, warmup=workers,
                         steps=2 * workers,
                         compute_warmup=3, workers=workers, distinct_images=512,
                         dino_archs=["vit_small_patch16_224"],
                         compile_archs=["vit_small_patch16_224", "vit_small_patch8_224"],
                         # main_dino.py: one timed wave (its CPU crops take ~45 s for two; the rate of whole
                         # waves is the same), and what it finished is reported if it meets its cap
                         dino_steps=workers, compile_backend="inductor", caps=dict(ours=60, compiled=100, dino=80)),
        "extract": dict(sizes=[224, 448, 896], large=[896], target_size=448, bins=[False, True],
                        dtypes=["float32", "bfloat16"], repeats=5, case_cap_s=5.0, caps=dict(small=40, large=45)),
        "analyses": dict(correspond_size=448, cosegment_n=20, cosegment_load=224, video_frames=50,
                         video_hw=[480, 854], video_load=480, video_tiny=False,
                         shares=dict(correspond=45, cosegment=55, video=50)),
    }


# ------------------------------------------------------------------------------------------ small helpers

def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader (the driver, after a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def meta() -> dict[str, Any]:
    """Which machine, software and commit gave the numbers."""
    import torch

    cuda = torch.cuda.is_available()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"device": torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)",
            "cuda": cuda, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "cuda_version": torch.version.cuda, "python": platform.python_version(),
            "cpu_cores": os.cpu_count(), "commit": commit}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def fmt(value: Any, spec: str = ".1f", none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, str):
        return value
    return format(value, spec)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gpu_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ cases (own process)

def case_pretrain_ours(a: dict, emit: Callable[[dict], None]) -> dict:
    """DINO steps of ``bench_pretrain.Stepper`` (the loop of pretrain/train.py) on resident sources cropped on the
    device, bf16, fused AdamW on CUDA: end to end, compute only (one fixed batch), loader alone."""
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.flop_counter import FlopCounterMode

    from bench_pretrain import Stepper, batches
    from pretrain.config import PretrainConfig
    from pretrain.data import ImageFolderDataset, MultiCropAugmentation, ResidentSources, StepBatchSampler, collate_crops
    from pretrain.gpu_augment import GPUMultiCrop
    from pretrain.train import batch_crops
    from vitdense.backbones import IMAGENET_MEAN, IMAGENET_STD

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    workers, warmup, steps = a["workers"], a["warmup"], a["steps"]
    paths = sorted(Path(a["images"]).rglob("*.jpg"))
    out: dict[str, Any] = {"arch": a["arch"], "compile": a["compile"], "precision": "bf16",
                           "optimizer": "AdamW fused" if cuda else "AdamW foreach", "workers": workers,
                           "images": len(paths), "oom_batches": []}
    cfg = PretrainConfig(arch=a["arch"], global_size=a["global_size"], local_size=a["local_size"],
                         local_crops=a["local_crops"], batch_size=a["batch"], out_dim=a["out_dim"])
    augment = MultiCropAugmentation(cfg.global_size, cfg.local_size, cfg.local_crops)
    dataset = ImageFolderDataset(paths, augment, source_size=cfg.global_size * 3 // 2)  # train.py's default
    start = time.perf_counter()
    sources = ResidentSources(dataset, device, workers)
    out["decode_s"] = time.perf_counter() - start
    on_device = GPUMultiCrop(IMAGENET_MEAN, IMAGENET_STD)

    def loader_for(batch: int) -> DataLoader:
        return DataLoader(sources, batch_sampler=StepBatchSampler(len(sources), batch, seed=0), num_workers=workers,
                          collate_fn=collate_crops, pin_memory=cuda, persistent_workers=workers > 0,
                          prefetch_factor=4 if workers else None)

    def measure(batch: int) -> None:
        cfg.batch_size = batch
        out["batch"] = batch
        loader = loader_for(batch)
        stepper = Stepper(cfg, device, bf16=True, compile_model=False, fused=cuda)
        if a["compile"]:  # --toy: "aot_eager" traces the same graphs (dynamo, autograd) without inductor's build
            stepper.fwd_s = torch.compile(stepper.student, backend=a["compile_backend"])
            stepper.fwd_t = torch.compile(stepper.teacher, backend=a["compile_backend"])
        if a["count_flops"]:
            crops = batch_crops(next(iter(batches(loader, 1))), device, on_device, sources)
            with FlopCounterMode(display=False) as counter:
                Stepper(cfg, device, bf16=True, compile_model=False, fused=cuda)([c[:2] for c in crops])
            out["flops_per_image"] = counter.get_total_flops() / 2
            del crops
            free_memory()

        # end to end: steps queued as in training, no wait per step; timed after the warm-up (and compilation)
        gpu_peak_reset()
        crops = None
        for i, views in enumerate(batches(loader, warmup + steps)):
            crops = batch_crops(views, device, on_device, sources)
            stepper(crops)
            if i == warmup - 1:
                gpu_sync()
                start = time.perf_counter()
        gpu_sync()
        seconds = time.perf_counter() - start
        out["e2e"] = {"images_per_s": batch * steps / seconds, "seconds": seconds, "peak_gib": gpu_peak_gib()}
        emit(out)

        # compute only: the same steps on the last batch, over and over (no loader, no crop-making)
        fixed = [c.clone() for c in crops]
        for _ in range(a["compute_warmup"]):
            stepper(fixed)
        gpu_peak_reset()
        start = time.perf_counter()
        for _ in range(steps):
            stepper(fixed)
        gpu_sync()
        seconds = time.perf_counter() - start
        out["compute"] = {"images_per_s": batch * steps / seconds, "seconds": seconds, "peak_gib": gpu_peak_gib()}
        emit(out)
        del stepper, fixed, crops
        free_memory()

        if a["loader"]:  # the data path alone: workers draw crop parameters, the device gathers and crops
            for i, views in enumerate(batches(loader, warmup + steps)):
                batch_crops(views, device, on_device, sources)
                if i == warmup - 1:
                    gpu_sync()
                    start = time.perf_counter()
            gpu_sync()
            seconds = time.perf_counter() - start
            out["loader"] = {"images_per_s": batch * steps / seconds, "seconds": seconds}
            emit(out)

    batch = a["batch"]
    while True:  # "batch as large as fits": halve it after running out of memory
        try:
            measure(batch)
            return out
        except torch.cuda.OutOfMemoryError:
            if batch // 2 < a["min_batch"]:
                raise
        out["oom_batches"].append(batch)  # out of the except block: the traceback's tensors are gone
        for key in ("e2e", "compute", "loader"):
            out.pop(key, None)
        free_memory()
        batch //= 2


def case_pretrain_dino(a: dict, emit: Callable[[dict], None]) -> dict:
    """facebookresearch/dino's main_dino.py on the same images (see _main_dino.py)."""
    import re

    from _main_dino import run

    match = re.match(r"(vit_\w+?)_patch(\d+)", a["arch"])
    return run(a["peer"], a["images_root"], a["work"], match.group(1), int(match.group(2)), a["batch"],
               a["local_crops"], a["out_dim"], a["workers"], a["warmup"], a["steps"], emit)


def case_extract(a: dict, emit: Callable[[dict], None]) -> dict:
    """One implementation at several sizes, bins and precisions in one process (one CUDA start-up); per case
    the peak GPU memory from a reset allocator and images/s from the median of up to ``repeats`` images."""
    import torch

    from bench_extract import build_case

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: list[dict] = []
    out = {"impl": a["impl"], "rows": rows}
    for size in a["sizes"]:
        for use_bin in a["bins"]:
            for dtype in a["dtypes"]:
                row: dict[str, Any] = {"impl": a["impl"], "dtype": dtype, "size": size, "bin": use_bin}
                one = None
                try:
                    free_memory()
                    gpu_peak_reset()
                    one, info = build_case(a["impl"], size, use_bin, device, a.get("peer"), getattr(torch, dtype))
                    start = time.perf_counter()
                    one()  # warm-up: kernels, allocator, the peer's position-embedding interpolation
                    row["first_s"] = time.perf_counter() - start
                    seconds: list[float] = []
                    while len(seconds) < a["repeats"] and (len(seconds) < 2 or sum(seconds) < a["case_cap_s"]):
                        start = time.perf_counter()
                        one()
                        seconds.append(time.perf_counter() - start)
                    row.update(status="ok", tokens=info["tokens"], seconds=seconds,
                               images_per_s=1 / statistics.median(seconds))
                except Exception as err:  # noqa: BLE001  (one case's failure is its row's result)
                    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                    oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower()
                    row.update(status="oom" if oom else "error", error=text)
                finally:
                    peak = gpu_peak_gib()
                    row["gpu_peak_mb"] = peak * 1024 if peak is not None else None
                    del one
                    free_memory()
                rows.append(row)
                emit(out)
    return out


CASES = {"pretrain-ours": case_pretrain_ours, "pretrain-dino": case_pretrain_dino, "extract": case_extract}


def run_case(name: str, case_args: dict, result: Path) -> None:
    """Entry point of a case's process: the case's dict goes to ``result``, rewritten as it grows."""
    def emit(data: dict) -> None:
        write_json(result, data)

    emit(CASES[name](case_args, emit))
    sys.stdout.flush()
    os._exit(0)  # loader workers and the peer's process group are not waited for


# ------------------------------------------------------------------------------------------ parts (own process)

class Part:
    """A running part: its report (rewritten after every case) and its deadline."""

    def __init__(self, name: str, out: Path, budget: float, args: argparse.Namespace):
        self.name, self.args = name, args
        self.path = out / f"{name}.json"
        self.deadline = Deadline(budget)
        self.settings = plan(args.toy)[name]
        self.peers = None if args.no_peers else Path(args.peers).resolve()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"device_suite_{name}_"))
        self.data: dict[str, Any] = {"part": name, "title": TITLES[name], "status": "running", "toy": args.toy,
                                     "budget_s": round(budget), "meta": meta(), "settings": self.settings,
                                     "rows": [], "targets": [], "notes": [], "cases": []}
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def peer(self, name: str) -> str | None:
        """Path of a peer checkout, or None (and a note) when peers are off or it is missing."""
        if self.peers is None:
            return None
        path = self.peers / name
        if not path.is_dir():
            self.note(f"peer {path} not found: peer cases skipped (see benchmarks/device_suite.md)")
            return None
        return str(path)

    def note(self, text: str) -> None:
        if text not in self.data["notes"]:
            self.data["notes"].append(text)
            self.save()

    def run(self, label: str, cmd: list, cap: float, result_file: Path | None = None) -> dict | None:
        """Run one case with ``min(cap, time left)``; record how it ended. The case's result (possibly partial)
        or None when it was not started or reported nothing."""
        limit = min(cap, self.deadline.left())
        if limit < MIN_CASE_S:
            self.data["cases"].append({"case": label, "status": "skipped", "seconds": 0,
                                       "error": "no time left in its budget"})
            self.save()
            return None
        r = run_json(cmd, limit, result_file)
        self.data["cases"].append({"case": label, "status": r["status"], "seconds": round(r["seconds"], 1),
                                   "limit_s": round(limit), "error": r["error"][-1500:]})
        self.save()
        if r["result"] is not None:
            r["result"]["_status"] = r["status"]
        return r["result"]

    def own_case(self, label: str, name: str, case_args: dict, cap: float) -> dict | None:
        result = self.tmp / f"{label.replace(' ', '_').replace('/', '')}.json"
        return self.run(label, [sys.executable, __file__, "--case", name, "--args", json.dumps(case_args),
                                "--result", result], cap, result)


def make_image_folder(root: Path, count: int, distinct: int) -> Path:
    """root/train/0/*.jpg (an ImageFolder with one class): ``distinct`` photos of ImageNet's typical size
    (bench_pretrain.make_jpegs), hard-linked up to ``count`` files. Decoding costs the same for a copy."""
    from bench_pretrain import make_jpegs

    source, folder = root / "distinct", root / "train" / "0"
    source.mkdir(parents=True)
    folder.mkdir(parents=True)
    make_jpegs(source, distinct)
    files = sorted(source.glob("*.jpg"))
    for i in range(count):
        target = folder / f"{i:06d}.jpg"
        try:
            os.link(files[i % len(files)], target)
        except OSError:
            target.write_bytes(files[i % len(files)].read_bytes())
    return root / "train"


def part_pretrain(part: Part) -> None:
    from bench_pretrain import peak_flops

    import torch

    s = part.settings
    peak = peak_flops(torch.device("cuda")) if torch.cuda.is_available() else None
    dino = part.peer("dino")
    batch_of = dict(map(tuple, s["archs"]))
    steps_needed = s["warmup"] + s["steps"] + 2  # main_dino.py must not reach the end of its epoch
    count = max(batch_of.values()) * steps_needed
    start = time.perf_counter()
    images = make_image_folder(part.tmp / "images", count, s["distinct_images"])
    part.data["images"] = {"files": count, "distinct": s["distinct_images"], "size": "500x375 JPEG",
                           "seconds_to_make": round(time.perf_counter() - start, 1)}
    part.data["peak_bf16_tflops"] = peak / 1e12 if peak else None
    common = {k: s[k] for k in ("global_size", "local_size", "local_crops", "out_dim", "warmup", "steps",
                                "compute_warmup", "workers", "min_batch", "compile_backend")}
    results: dict[tuple[str, str], dict] = {}

    def ours(arch: str, compiled: bool) -> None:
        args = dict(common, arch=arch, batch=batch_of[arch], images=str(images), compile=compiled,
                    count_flops=not compiled, loader=not compiled)
        label = f"ours {arch} {'compiled' if compiled else 'eager'}"
        res = part.own_case(label, "pretrain-ours", args, s["caps"]["compiled" if compiled else "ours"])
        if res:
            results[(arch, "compiled" if compiled else "eager")] = res

    def baseline(arch: str) -> None:
        if dino is None:
            return
        args = dict(arch=arch, batch=batch_of[arch], peer=dino, images_root=str(images), work=str(part.tmp / arch),
                    local_crops=s["local_crops"], out_dim=s["out_dim"], workers=s["workers"], warmup=s["warmup"],
                    steps=s.get("dino_steps", s["steps"]))
        res = part.own_case(f"main_dino.py {arch}", "pretrain-dino", args, s["caps"]["dino"])
        if res:
            results[(arch, "dino")] = res

    archs = [a for a, _ in s["archs"]]
    # Most important first: ViT-S/16 and its baseline, then ViT-S/8, then the compiled models (long to build).
    ours(archs[0], False)
    if archs[0] in s["dino_archs"]:
        baseline(archs[0])
    for arch in archs[1:]:
        ours(arch, False)
    for arch in s["compile_archs"]:
        ours(arch, True)
    for arch in s["dino_archs"]:
        if arch != archs[0]:
            baseline(arch)

    rows, targets = part.data["rows"], part.data["targets"]
    for arch in archs:
        eager, compiled, ref = (results.get((arch, k), {}) for k in ("eager", "compiled", "dino"))
        flops = eager.get("flops_per_image")
        ref_ips = ref.get("images_per_s")
        for mode, res in (("eager", eager), ("compiled", compiled)):
            for key, label in (("e2e", "end to end"), ("compute", "compute only"), ("loader", "loader alone")):
                if key not in res:
                    continue
                ips = res[key]["images_per_s"]
                rows.append({"arch": arch, "batch": res["batch"], "measurement": label, "mode": mode,
                             "images_per_s": ips, "vs_main_dino": ips / ref_ips if ref_ips and key == "e2e" else None,
                             "gflop_per_image": flops / 1e9 if flops and key != "loader" else None,
                             "mfu": ips * flops / peak if flops and peak and key != "loader" else None,
                             "peak_gib": res[key].get("peak_gib")})
        if ref_ips:
            rows.append({"arch": arch, "batch": ref["batch"], "measurement": "main_dino.py end to end (baseline)",
                         "mode": f"{ref['precision']}, {ref['workers']} workers"
                                 + (f", {ref['steps']} timed steps before its deadline" if ref.get("partial") else ""),
                         "images_per_s": ref_ips,
                         "vs_main_dino": 1.0, "gflop_per_image": None, "mfu": None, "peak_gib": ref.get("peak_gib")})
        e2e = [r for r in rows if r["arch"] == arch and r["measurement"] == "end to end"]
        best = max(e2e, key=lambda r: r["images_per_s"], default=None)
        loader = eager.get("loader", {}).get("images_per_s")
        if best:
            compute = next((r["images_per_s"] for r in rows if r["arch"] == arch and r["mode"] == best["mode"]
                            and r["measurement"] == "compute only"), None)
            part.data.setdefault("loader_check", []).append({
                "arch": arch, "best_end_to_end": best["images_per_s"], "mode": best["mode"],
                "compute_only": compute, "loader_alone": loader,
                "loader_limited": bool(loader and compute and loader < compute)})
            if loader and compute and loader < compute:
                part.note(f"{arch}: the loader limits (loader alone {loader:.0f} images/s < compute only "
                          f"{compute:.0f} images/s)")
        mfu = max((r["mfu"] for r in rows if r["arch"] == arch and r["measurement"] == "compute only"
                   and r["mfu"] is not None), default=None)
        if "patch16" in arch:
            targets.append(target("ViT-S/16 end to end >= 2000 images/s", best and best["images_per_s"], 2000))
            targets.append(target("ViT-S/16 compute-only MFU >= 40%", mfu, 0.40, pct=True))
            targets.append(target("ViT-S/16 end to end >= 4x main_dino.py", best and best["vs_main_dino"], 4.0,
                                  unit="x"))
        elif "patch8" in arch:
            targets.append(target("ViT-S/8 end to end >= 600 images/s", best and best["images_per_s"], 600))
    if peak is None:
        part.note("MFU: n/a (no known bf16 peak for this device)")
    part.note(f"crops 2x{s['global_size']} + {s['local_crops']}x{s['local_size']}, out_dim {s['out_dim']}, "
              f"{s['steps']} timed steps after {s['warmup']} warm-up; ours: bf16 autocast, "
              f"{'fused ' if torch.cuda.is_available() else ''}AdamW, resident sources, crops on the device, "
              f"{s['workers']} loader workers; main_dino.py: its defaults (fp16 on CUDA, CPU crops, "
              f"{s['workers']} workers), same batch and images")


def target(name: str, value: float | None, goal: float, unit: str = "", pct: bool = False) -> dict:
    shown = None if value is None else (f"{100 * value:.1f}%" if pct else f"{value:.2f}{unit}" if unit
                                        else f"{value:.0f}")
    return {"target": name, "measured": shown, "met": None if value is None else bool(value >= goal)}


def part_extract(part: Part) -> None:
    s = part.settings
    peer = part.peer("dino-vit-features")
    small = [z for z in s["sizes"] if z not in s["large"]]
    base = {"bins": s["bins"], "repeats": s["repeats"], "case_cap_s": s["case_cap_s"]}
    rows = part.data["rows"]
    # the peer's large size first: it fails fast (out of memory), and that is one of the results
    jobs = [("ours", small, s["dtypes"], "small"), ("peer", small, ["float32"], "small"),
            ("peer", s["large"], ["float32"], "large"), ("ours", s["large"], s["dtypes"], "large")]
    for impl, sizes, dtypes, cap in jobs:
        if impl == "peer" and peer is None:
            continue
        res = part.own_case(f"extract {impl} {'/'.join(map(str, sizes))} px", "extract",
                            dict(base, impl=impl, sizes=sizes, dtypes=dtypes, peer=peer), s["caps"][cap])
        if res:
            rows.extend(res["rows"])
            if res.get("_status") != "ok":  # cases it never reached
                done = {(r["size"], r["bin"], r["dtype"]) for r in res["rows"]}
                rows.extend({"impl": impl, "dtype": d, "size": z, "bin": b, "status": res["_status"]}
                            for z in sizes for b in s["bins"] for d in dtypes if (z, b, d) not in done)
        part.save()
    order = {"ours": 0, "peer": 1}
    rows.sort(key=lambda r: (r["size"], r["bin"], order[r["impl"]], r["dtype"] != "float32"))
    for row in rows:  # ratios against the peer (fp32) at the same size and bin
        ref = next((r for r in rows if r["impl"] == "peer" and r["size"] == row["size"] and r["bin"] == row["bin"]),
                   None)
        if row["impl"] == "ours" and ref:
            if row.get("images_per_s") and ref.get("images_per_s"):
                row["speedup_vs_peer"] = row["images_per_s"] / ref["images_per_s"]
            if row.get("gpu_peak_mb") and ref.get("gpu_peak_mb") and ref.get("status") == "ok":
                row["memory_vs_peer"] = row["gpu_peak_mb"] / ref["gpu_peak_mb"]
    targets = part.data["targets"]
    mid, cuda = s["target_size"], part.data["meta"]["cuda"]
    for row in rows:
        if row["impl"] != "ours" or row.get("status") != "ok":
            continue
        what = f"{row['size']} px, bin {'on' if row['bin'] else 'off'}, {row['dtype']}"
        if row["size"] == mid:
            targets.append(target(f"{what}: >= 5x the peer's images/s", row.get("speedup_vs_peer"), 5.0, unit="x"))
            mem = row.get("memory_vs_peer")
            targets.append({"target": f"{what}: <= 1/4 of the peer's peak GPU memory",
                            "measured": None if mem is None else f"{mem:.3f}x",
                            "met": None if mem is None else bool(mem <= 0.25)})
        if row["size"] in s["large"] and cuda:
            gb = row["gpu_peak_mb"] * 2**20 / 1e9
            targets.append({"target": f"{what}: runs in <= 16 GB", "measured": f"{gb:.1f} GB", "met": gb <= 16})
    part.note("img/s: 1 / median seconds per image (preprocessing of a photo included), after one warm-up image; "
              "GPU peak: torch.cuda.max_memory_allocated from a reset, weights included; the peer (fp32) "
              "materialises the attention matrix, so 'oom' at large sizes is its result")


def part_analyses(part: Part) -> None:
    import torch

    import bench_cosegment
    import bench_video

    s = part.settings
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vit_feats, dino = part.peer("dino-vit-features"), part.peer("dino")
    rows = part.data["rows"]
    py = sys.executable
    start, spent_share = time.monotonic(), 0.0
    scale = part.deadline.left() / sum(s["shares"].values())  # the shares are weights of the part's budget

    def task_deadline(share: str) -> Deadline:
        nonlocal spent_share
        spent_share += s["shares"][share] * scale  # time unused by earlier tasks rolls over
        return Deadline(spent_share - (time.monotonic() - start))

    def lower_bound(ours_seconds: float | None) -> dict[str, Any]:
        """A peer case stopped at its deadline: its timed work took more than the deadline less the start-up
        (imports, model, warm-up), which is estimated by what our case of the task spent outside its timing."""
        peer_case, ours_case = part.data["cases"][-1], part.data["cases"][-2]
        if peer_case["status"] != "timeout":
            return {}
        startup = max(0.0, ours_case["seconds"] - ours_seconds) if ours_seconds else 0.0
        bound = peer_case["limit_s"] - startup
        if bound < 1:
            return {}  # nothing known but the timeout
        fields: dict[str, Any] = {"seconds": f"> {bound:.0f}"}
        if ours_seconds:
            fields["speedup"] = f">= {bound / ours_seconds:.1f}"
        return fields

    def add(task: str, impl: str, res: dict | None, **fields: Any) -> dict:
        last = part.data["cases"][-1]["status"] if part.data["cases"] else "not run"  # the case just run
        row = {"task": task, "impl": impl, "status": last if res is None else res.get("_status", "ok")}
        if res is not None and res.get("timeout") is True:
            row["status"] = "timeout (lower bounds)"
        row.update(fields)
        rows.append(row)
        part.save()
        return row

    # correspondences: one pair, both images at the size, log-bin, layer 9 (bench_correspond.py)
    size = s["correspond_size"]
    task = f"correspondences ({size}-px pair)"
    dl = task_deadline("correspond")
    script = HERE / "bench_correspond.py"
    ours = part.run(f"correspond ours {size}", [py, script, "--case", "ours", size, "--device", device],
                    dl.left())
    add(task, "vitdense", ours, seconds=ours and ours.get("seconds"), gpu_mb=ours and ours.get("gpu_mb"))
    if vit_feats:
        theirs = part.run(f"correspond peer {size}", [py, script, "--case", "peer", size, "--device", device,
                                                       "--peer", vit_feats], dl.left())
        fields: dict[str, Any] = {"seconds": theirs and theirs.get("seconds"), "gpu_mb": theirs and theirs.get("gpu_mb")}
        if ours and theirs and ours.get("points") and theirs.get("points"):
            shared = set(map(tuple, ours["points"])) & set(map(tuple, theirs["points"]))
            fields.update(speedup=theirs["seconds"] / ours["seconds"],
                          check=f"{len(shared)}/{len(ours['points'])} pairs shared")
        fields.update(lower_bound(ours and ours.get("seconds")))
        add(task, "dino-vit-features", theirs, **fields)

    # co-segmentation of N photos (bench_cosegment.py: our CLI command vs find_cosegmentation)
    n, load = s["cosegment_n"], s["cosegment_load"]
    task = f"co-segmentation ({n} photos, {load} px)"
    dl = task_deadline("cosegment")
    work = part.tmp / "cosegment"
    bench_cosegment.make_images(work / f"images_{n}", n)
    script = HERE / "bench_cosegment.py"

    def coseg(impl: str, peer: str | None) -> dict | None:
        limit = max(MIN_CASE_S, dl.left() - 15)  # the peer stops itself there (after its imports) with lower bounds
        return part.run(f"cosegment {impl} {n}", [py, script, "--case", impl, n, 0, "--device", device,
                                                  "--workdir", work, "--timeout", int(limit), "--load-size", load,
                                                  "--peer", peer or "none"], dl.left())

    ours = coseg("ours", None)
    add(task, "vitdense", ours, seconds=ours and ours.get("compute"), gpu_mb=ours and ours.get("gpu_mb"),
        k=ours and ours.get("k"))
    if vit_feats:
        theirs = coseg("peer", vit_feats)
        fields = {"seconds": theirs and theirs.get("compute"), "gpu_mb": theirs and theirs.get("gpu_mb"),
                  "k": theirs and theirs.get("k")}
        if ours and theirs and ours.get("compute") and theirs.get("compute"):
            stopped = theirs.get("timeout") is True  # the peer stopped itself: its time is a lower bound
            fields["speedup"] = (f">= {theirs['compute'] / ours['compute']:.2f}" if stopped
                                 else theirs["compute"] / ours["compute"])
            fields["check"] = (f"k {ours.get('k')} vs {theirs.get('k')}; "
                               f"masks {bench_cosegment.compare_masks(work, n)}")
        fields.update(lower_bound(ours and ours.get("compute")))
        add(task, "dino-vit-features", theirs, **fields)

    # video: segment the synthetic DAVIS-layout clip end to end (bench_video.py; peer: DINO's own script)
    frames, (height, width), load = s["video_frames"], s["video_hw"], s["video_load"]
    task = f"video ({frames} frames {width}x{height}, {load} px)"
    dl = task_deadline("video")
    data, work = part.tmp / "video_data", part.tmp / "video_work"
    work.mkdir()
    bench_video.make_video(data, frames, (height, width))
    script = HERE / "bench_video.py"
    common = ["--device", device, "--data", data, "--work", work, "--load-size", load, "--threads", 0] + \
        (["--tiny"] if s["video_tiny"] else [])
    ours = part.run("video ours e2e", [py, script, "--case", "vitdense", "e2e", *common], dl.left())
    add(task, "vitdense", ours, seconds=ours and ours.get("seconds"), fps=ours and ours.get("fps"),
        gpu_mb=ours and ours.get("gpu_mb"))
    if dino:
        theirs = part.run("video peer e2e", [py, script, "--case", "peer", "e2e", *common, "--peer", dino], dl.left())
        fields = {"seconds": theirs and theirs.get("seconds"), "fps": theirs and theirs.get("fps"),
                  "gpu_mb": theirs and theirs.get("gpu_mb")}
        if ours and theirs and ours.get("fps") and theirs.get("fps"):
            fields["speedup"] = ours["fps"] / theirs["fps"]
            agree = bench_video.agreement(work, "vitdense_e2e", "peer_e2e")
            if agree:
                fields["check"] = f"equal px {agree[0]:.6f}, J {agree[1]:.5f}"
                fields["identical"] = agree[0] == 1.0
        fields.update(lower_bound(ours and ours.get("seconds")))
        add(task, "facebookresearch/dino", theirs, **fields)
    part.note("time: the whole task in a fresh process after a warm-up where the benchmark has one (correspondences: "
              "one 64-px pair; video: one forward pass); co-segmentation: extract + cluster + refine, writing "
              "excluded; speed-up = peer time / our time. A peer stopped at its deadline gets '> deadline less "
              "the start-up our case of the task needed' and a speed-up '>=' that bound")


PART_FUNCS = {"pretrain": part_pretrain, "extract": part_extract, "analyses": part_analyses}


def run_part(name: str, out: Path, budget: float, args: argparse.Namespace) -> None:
    part = Part(name, out, budget, args)
    try:
        PART_FUNCS[name](part)
        if not part.data["meta"]["cuda"]:
            for t in part.data["targets"]:
                t["met"] = None  # the targets are the GPU's
        failed = [c for c in part.data["cases"] if c["status"] != "ok"]
        part.data["status"] = "ok" if not failed else "partial"
    except Exception as err:  # noqa: BLE001  (the report says what broke; the driver goes on)
        import traceback

        part.data["status"] = "failed"
        part.data["error"] = traceback.format_exc()[-3000:]
        print(f"[{name}] {err}", file=sys.stderr)
    part.save()
    sys.stdout.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------ reports

def header_line(data: dict) -> str:
    m = data.get("meta", {})
    return (f"{m.get('device', '?')} · {m.get('date', '?')} · torch {m.get('torch', '?')} · {m.get('cpu_cores', '?')} "
            f"CPU cores · commit {m.get('commit') or '?'}{' · TOY SIZES (a check of the code, not a measurement)' if data.get('toy') else ''}\n\n"
            f"status **{data.get('status')}**, {data.get('wall_s', '?')} s of a {data.get('budget_s', '?')} s budget")


def render(data: dict) -> str:
    """The Markdown of one part's JSON."""
    lines = [f"## {data.get('title', data['part'])}", "", header_line(data), ""]
    rows = data.get("rows", [])
    if data["part"] == "pretrain" and rows:
        lines.append(md_table(
            ["arch", "batch", "measurement", "mode", "img/s", "vs main_dino.py", "GFLOP/img", "MFU", "peak GiB"],
            [[r["arch"], r["batch"], r["measurement"], r["mode"], fmt(r["images_per_s"]),
              fmt(r["vs_main_dino"], ".2f") + ("x" if r["vs_main_dino"] else ""), fmt(r["gflop_per_image"]),
              fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else ""), fmt(r["peak_gib"], ".2f")]
             for r in rows]))
        checks = data.get("loader_check", [])
        if checks:
            lines += ["", md_table(["arch", "best end to end img/s", "compute only img/s", "loader alone img/s",
                                    "loader limits"],
                                   [[c["arch"], fmt(c["best_end_to_end"]), fmt(c["compute_only"]),
                                     fmt(c["loader_alone"]), "yes" if c["loader_limited"] else "no"]
                                    for c in checks])]
    elif data["part"] == "extract" and rows:
        lines.append(md_table(
            ["size", "bin", "tokens", "impl", "dtype", "img/s", "GPU peak MB", "speed-up vs peer", "memory vs peer",
             "status"],
            [[r["size"], "on" if r["bin"] else "off", r.get("tokens", "–"),
              "vitdense" if r["impl"] == "ours" else "dino-vit-features", r["dtype"], fmt(r.get("images_per_s"), ".3f"),
              fmt(r.get("gpu_peak_mb"), ".0f"), fmt(r.get("speedup_vs_peer"), ".2f") + ("x" if r.get("speedup_vs_peer") else ""),
              fmt(r.get("memory_vs_peer"), ".3f") + ("x" if r.get("memory_vs_peer") else ""), r.get("status", "?")]
             for r in rows]))
    elif data["part"] == "analyses" and rows:
        lines.append(md_table(
            ["task", "impl", "seconds", "frames/s", "GPU MB", "speed-up", "check", "status"],
            [[r["task"], r["impl"], fmt(r.get("seconds"), ".2f"), fmt(r.get("fps"), ".2f"), fmt(r.get("gpu_mb"), ".0f"),
              fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""), r.get("check", "–"), r["status"]]
             for r in rows]))
    if data.get("targets"):
        lines += ["", "Targets:", "", md_table(["target", "measured", "met"],
                                               [[t["target"], fmt(t["measured"]),
                                                 {True: "yes", False: "**no**", None: "–"}[t["met"]]]
                                                for t in data["targets"]])]
    for note in data.get("notes", []):
        lines.append(f"\n- {note}")
    bad = [c for c in data.get("cases", []) if c["status"] != "ok"]
    if data.get("cases"):
        lines += ["", "Cases: " + ", ".join(f"{c['case']} {c['status']} ({c['seconds']} s)" for c in data["cases"])]
    for c in bad:
        if c.get("error"):
            lines += ["", f"`{c['case']}` {c['status']}:", "```", c["error"].strip()[-800:], "```"]
    if data.get("error"):
        lines += ["", "Part error:", "```", data["error"].strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"


def summary(parts: list[dict], wall: float, budget: float, packages: dict[str, str] | None = None) -> str:
    """The whole run: parts' status, every target, then each part's report. ``budget``: the parts' budgets
    before any roll-over."""
    first = parts[0] if parts else {}
    lines = ["# vitdense device suite", "", header_line({**first, "status": "see below", "wall_s": round(wall),
                                                          "budget_s": round(budget)}), ""]
    if packages:
        lines += ["Packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()), ""]
    lines.append(md_table(["part", "status", "seconds", "budget s (with roll-over)"],
                          [[p.get("title", p["part"]), p["status"], p.get("wall_s", "–"), p.get("budget_s", "–")]
                           for p in parts]))
    targets = [t for p in parts for t in p.get("targets", [])]
    if targets:
        lines += ["", "All targets:", "", md_table(["target", "measured", "met"],
                                                   [[t["target"], fmt(t["measured"]),
                                                     {True: "yes", False: "**no**", None: "–"}[t["met"]]]
                                                    for t in targets])]
    return "\n".join(lines) + "\n\n" + "\n".join(render(p) for p in parts)


# ------------------------------------------------------------------------------------------ driver

# What the parts import besides torch; the device machine has no network, so a missing one must be carried.
PREFLIGHT = """
import importlib, json
found = {}
for name in ("torchvision", "timm", "numpy", "faiss", "pydensecrf.densecrf", "sklearn", "skimage", "cv2",
             "matplotlib", "click", "safetensors", "vitdense", "pretrain"):
    try:
        module = importlib.import_module(name)
        found[name] = getattr(module, "__version__", "ok")
    except Exception as err:
        found[name] = f"MISSING ({type(err).__name__}: {err})"
print(json.dumps(found))
"""


def preflight(timeout: float = 120.0) -> dict[str, str]:
    """Versions of the packages the parts need (or MISSING), from a fresh interpreter."""
    r = run_json([sys.executable, "-c", PREFLIGHT], timeout)
    return r["result"] or {"preflight": f"{r['status']}: {r['error'][-300:]}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run on the device machine: see benchmarks/device_suite.md.")
    parser.add_argument("--out", help="folder for <part>.json, <part>.md and summary.md (created)")
    parser.add_argument("--toy", action="store_true", help="toy sizes: checks every code path on a CPU in minutes")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="parts to run (run as extract, analyses, pretrain; reported in the issue's order)")
    parser.add_argument("--no-peers", action="store_true", help="skip every baseline (peer) case")
    parser.add_argument("--peers", default=str(ROOT / ".peers"),
                        help="folder holding the checkouts dino/ and dino-vit-features/ (default: .peers)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every part's time budget (e.g. 0.5 for a quick re-run)")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="seconds the whole suite may take, preflight and writing included (0 = the parts' own "
                             "budgets): the parts share what is left in the ratio of their own budgets")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--part-budget", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        run_case(args.case, json.loads(args.args), Path(args.result))
        return
    if not args.out:
        parser.error("--out DIR is required")
    if args.budget_scale <= 0:
        parser.error("--budget-scale must be positive")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        run_part(args.part, out, args.part_budget, args)
        return

    # Every process finds vitdense and pretrain in this checkout (the device machine has no install of them).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    if args.toy:  # on a small shared CPU, two OpenMP threads per process can be 50x slower than one
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    began = time.monotonic()
    budgets = {p: (TOY_BUDGET_S if args.toy else BUDGET_S)[p] * args.budget_scale for p in args.parts}
    packages = preflight(min(60.0, args.budget / 4) if args.budget else 120.0)
    print("packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()), flush=True)
    if args.budget:  # what is left after the preflight, less each part's grace and the summary's writing
        usable = args.budget - (time.monotonic() - began) - SHARED_GRACE_S * len(budgets) - 5
        weight = sum(SHARED_BUDGET[p] for p in budgets)
        budgets = {p: max(2 * MIN_CASE_S, usable * SHARED_BUDGET[p] / weight) for p in budgets}
        print("budgets of the parts (s): " + ", ".join(f"{p} {b:.0f}" for p, b in budgets.items()), flush=True)
    start = time.monotonic()
    allowed, reports = 0.0, []
    for name in [p for p in RUN_ORDER if p in args.parts]:
        allowed += budgets[name]
        budget = max(MIN_CASE_S * 2, allowed - (time.monotonic() - start))  # unused time rolls over
        print(f"== {TITLES[name]}: budget {budget:.0f} s", flush=True)
        path = out / f"{name}.json"
        path.unlink(missing_ok=True)
        t0 = time.monotonic()
        cmd = [sys.executable, __file__, "--part", name, "--out", out, "--part-budget", budget, "--peers", args.peers]
        cmd += (["--toy"] if args.toy else []) + (["--no-peers"] if args.no_peers else [])
        r = run_json(cmd, budget + (SHARED_GRACE_S if args.budget else GRACE_S), path)
        data = r["result"] or {"part": name, "title": TITLES[name], "toy": args.toy, "rows": [], "notes": []}
        if r["status"] != "ok":
            data["status"] = "timeout" if r["status"] == "timeout" else "failed"
            data["error"] = (data.get("error") or "") + r["error"]
        data["wall_s"], data["budget_s"] = round(time.monotonic() - t0), round(budget)
        write_json(path, data)
        text = render(data)
        write_text(out / f"{name}.md", text)
        print(text, flush=True)
        reports.append(data)
    reports.sort(key=lambda d: PARTS.index(d["part"]))
    write_text(out / "summary.md", summary(reports, time.monotonic() - start, sum(budgets.values()), packages))
    print(f"== done in {time.monotonic() - start:.0f} s; files in {out}: "
          + ", ".join(sorted(p.name for p in out.iterdir())), flush=True)


if __name__ == "__main__":
    main()
