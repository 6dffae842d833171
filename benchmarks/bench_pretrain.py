"""Throughput of DINO training steps: data loader alone, compute alone, end to end.

For each architecture it measures, on whatever device is present (CUDA if available, else CPU):

* loader       images/s of the multi-crop DataLoader alone (JPEG folder → crops), with N workers and with 0;
* compute      images/s of training steps on pre-made crop tensors (fp32, and bf16 autocast), with the
               model FLOPs per image (counted by torch.utils.flop_counter), MFU on CUDA (against the bf16
               dense peak of known GPUs) and peak GPU memory;
* end to end   images/s of the real loop: loader → student/teacher forward → loss → backward → AdamW → EMA.

The baseline row of each architecture is end to end with fp32 and the crops made by the CPU loader
workers; the ratio column is images/s divided by the baseline's. "device crops" rows make the crops on
the accelerator (pretrain/gpu_augment.py; the workers only decode and shrink); "resident" rows decode every
image once and keep the sources on the device (what training does when they fit in --resident-mb), so the
workers only draw the crop parameters. "loader / e2e" > 1 means the loader is not the bottleneck.

    python benchmarks/bench_pretrain.py                  # small CPU settings, or the issue's GPU settings
    python benchmarks/bench_pretrain.py --arch vit_small_patch16_224 --global-size 224 --local-size 96 \\
        --local-crops 10 --batch-size 256 --workers 14 --steps 20
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.data import (ImageFolderDataset, MultiCropAugmentation, ResidentSources, StepBatchSampler,  # noqa: E402
                           collate_crops)
from pretrain.gpu_augment import GPUMultiCrop  # noqa: E402
from pretrain.loss import DINOLoss  # noqa: E402
from vitdense.backbones import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pretrain.train import batch_crops, build_model, clip_gradients, param_groups, update_teacher  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s, vendor data sheets) for MFU; other devices print "n/a". The first key
# found in the device's name wins, so the PCIe and NVL variants of the H100 come before the SXM one.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def make_jpegs(folder: Path, count: int) -> None:
    """``count`` JPEGs of about ImageNet's typical size (500×375) cut from the scikit-image photos."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(count):
        img = Image.fromarray(photos[i % len(photos)])
        left, top = int(rng.integers(0, img.width // 4)), int(rng.integers(0, img.height // 4))
        img.crop((left, top, left + img.width * 3 // 4, top + img.height * 3 // 4)).resize((500, 375)).save(
            folder / f"{i:05d}.jpg", quality=90)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class Stepper:
    """The training step of pretrain/train.py (forward, loss, backward, clip, AdamW, EMA) on given crops."""

    def __init__(self, cfg: PretrainConfig, device: torch.device, bf16: bool, compile_model: bool,
                 fused: bool = False):
        torch.manual_seed(0)
        self.student = build_model(cfg, student=True).to(device)
        self.teacher = build_model(cfg, student=False).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.fwd_s = torch.compile(self.student) if compile_model else self.student
        self.fwd_t = torch.compile(self.teacher) if compile_model else self.teacher
        self.loss_fn = DINOLoss(cfg.out_dim, 2 + cfg.local_crops).to(device)
        # fused=True: one kernel for the whole AdamW update (CUDA); the default is the multi-tensor (foreach) one
        self.opt = torch.optim.AdamW(param_groups(self.student), lr=1e-4, weight_decay=0.04,
                                     **({"fused": True} if fused else {}))
        self.device, self.bf16, self.clip = device, bf16, cfg.clip_grad

    def __call__(self, crops: list[torch.Tensor]) -> None:
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            with torch.no_grad():
                t_out = self.fwd_t(crops[:2])
            s_out = self.fwd_s(crops)
        loss = self.loss_fn(s_out, t_out, 0.04).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(self.student, self.clip)
        self.opt.step()
        update_teacher(self.student, self.teacher, 0.996)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_loader(cfg: PretrainConfig, paths: list[Path], workers: int, device: torch.device,
                source_size: int = 0) -> DataLoader:
    """The training loader; ``source_size`` > 0: the device-augmentation path (workers only decode)."""
    augment = MultiCropAugmentation(cfg.global_size, cfg.local_size, cfg.local_crops)
    dataset = ImageFolderDataset(paths, augment, source_size=source_size)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, seed=0)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_crops,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None)


def batches(loader: DataLoader, count: int):
    """``count`` batches from a loader, cycling through epochs."""
    epoch, given = 0, 0
    while given < count:
        loader.batch_sampler.set_epoch(epoch)
        for crops, _ in loader:
            yield crops
            given += 1
            if given == count:
                return
        epoch += 1


def images_per_s(batch: int, durations: list[float]) -> float:
    """Images/s from per-step durations: the median step, so other processes' bursts on a shared machine
    do not decide the result."""
    return batch / float(np.median(durations))


def time_loader(cfg: PretrainConfig, paths: list[Path], workers: int, steps: int, device: torch.device) -> float:
    loader = make_loader(cfg, paths, workers, device)
    it = batches(loader, steps + 1)
    next(it)  # worker start-up is not throughput
    durations, start = [], time.perf_counter()
    for _ in it:
        durations.append(time.perf_counter() - start)
        start = time.perf_counter()
    return images_per_s(cfg.batch_size, durations)


def time_compute(cfg: PretrainConfig, device: torch.device, bf16: bool, compile_model: bool, steps: int,
                 warmup: int) -> tuple[float, float | None, float]:
    """(images/s, peak GPU memory in GiB or None, FLOPs per image) of steps on pre-made crops."""
    from torch.utils.flop_counter import FlopCounterMode

    step = Stepper(cfg, device, bf16, compile_model)
    gen = torch.Generator().manual_seed(0)
    crops = [torch.randn(cfg.batch_size, 3, s, s, generator=gen).to(device)
             for s in [cfg.global_size] * 2 + [cfg.local_size] * cfg.local_crops]
    with FlopCounterMode(display=False) as counter:
        Stepper(cfg, device, bf16, False)(crops)
    flops_per_image = counter.get_total_flops() / cfg.batch_size
    for _ in range(warmup):
        step(crops)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    durations = []
    for _ in range(steps):
        start = time.perf_counter()
        step(crops)
        sync(device)
        durations.append(time.perf_counter() - start)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return images_per_s(cfg.batch_size, durations), mem, flops_per_image


def time_end_to_end(cfg: PretrainConfig, paths: list[Path], device: torch.device, bf16: bool, workers: int,
                    compile_model: bool, steps: int, warmup: int, device_augment: bool = False,
                    resident: bool = False) -> float:
    """Images/s of the real loop; ``device_augment``: crops made on the device (pretrain/gpu_augment.py);
    ``resident``: with the sources decoded once and kept on the device (pretrain.data.ResidentSources).

    On CUDA the steps are queued as in training (no wait per step) and timed together; on the CPU each step
    is timed and the median taken, so other processes' bursts on a shared machine do not decide it."""
    step = Stepper(cfg, device, bf16, compile_model)
    loader = make_loader(cfg, paths, workers, device, cfg.global_size * 3 // 2 if device_augment else 0)
    sources = ResidentSources(loader.dataset, device, workers) if resident else None
    if sources is not None:
        loader = DataLoader(sources, batch_sampler=loader.batch_sampler, num_workers=workers,
                            collate_fn=collate_crops, pin_memory=device.type == "cuda",
                            persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    on_device = GPUMultiCrop(IMAGENET_MEAN, IMAGENET_STD)
    durations, start = [], time.perf_counter()
    for i, views in enumerate(batches(loader, warmup + steps)):
        step(batch_crops(views, device, on_device if device_augment else None, sources))
        if i == warmup - 1 or device.type != "cuda":
            sync(device)
            if i >= warmup:
                durations.append(time.perf_counter() - start)
            start = time.perf_counter()
    if device.type == "cuda":
        sync(device)
        return cfg.batch_size * steps / (time.perf_counter() - start)
    return images_per_s(cfg.batch_size, durations)


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["vit_small_patch16_224", "vit_small_patch8_224"] if cuda
                        else ["vit_tiny_patch16_224"])
    parser.add_argument("--global-size", type=int, default=224 if cuda else 64)
    parser.add_argument("--local-size", type=int, default=96 if cuda else 32)
    parser.add_argument("--local-crops", type=int, default=10 if cuda else 4)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256, 64] if cuda else [16],
                        help="Global batch per architecture (the last one repeats).")
    parser.add_argument("--out-dim", type=int, default=65536 if cuda else 4096)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--steps", type=int, default=20 if cuda else 3)
    parser.add_argument("--warmup", type=int, default=5 if cuda else 1)
    parser.add_argument("--images", type=int, default=0, help="JPEGs in the generated folder (0 = enough).")
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile'd models.")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default; 1 gives stable numbers on a shared machine).")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    dev_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    peak = peak_flops(device)

    print(f"device: {dev_name}; crops 2x{args.global_size} + {args.local_crops}x{args.local_size}; "
          f"out_dim {args.out_dim}; {args.steps} timed steps after {args.warmup} warm-up")
    if not cuda:
        print("GPU: not measured (no device)")
    header = f"{'arch':<24} {'batch':>5} {'measurement':<56} {'img/s':>9} {'ratio':>7} {'GFLOP/img':>9} " \
             f"{'MFU':>6} {'peak GiB':>8}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for i, arch in enumerate(args.arch):
            batch = args.batch_size[min(i, len(args.batch_size) - 1)]
            cfg = PretrainConfig(arch=arch, global_size=args.global_size, local_size=args.local_size,
                                 local_crops=args.local_crops, batch_size=batch, out_dim=args.out_dim)
            n_images = args.images or batch * 4
            folder = Path(tmp) / f"jpegs{n_images}"
            if not folder.exists():
                folder.mkdir()
                make_jpegs(folder, n_images)
            paths = sorted(folder.glob("*.jpg"))

            rows = []
            # Baseline: the plain set-up (fp32, crops made by the CPU workers).
            base = time_end_to_end(cfg, paths, device, False, args.workers, False, args.steps, args.warmup)
            rows.append((f"end to end, fp32, {args.workers} workers (baseline)", base, None, None))
            for bf16, dev_aug, resident in ([(True, False, False), (True, True, False), (True, True, True)]
                                            if cuda else [(False, True, False), (False, True, True)]):
                label = (f"end to end, {'bf16' if bf16 else 'fp32'}, {args.workers} workers"
                         + (", device crops" if dev_aug else "") + (", resident" if resident else ""))
                rows.append((label, time_end_to_end(cfg, paths, device, bf16, args.workers, False, args.steps,
                                                    args.warmup, dev_aug, resident), None, None))
            flops = 0.0
            for bf16 in (False, True):
                ips, mem, flops = time_compute(cfg, device, bf16, False, args.steps, args.warmup)
                rows.append((f"compute only, {'bf16' if bf16 else 'fp32'}", ips, mem, flops))
            if args.compile:
                ips, mem, flops = time_compute(cfg, device, cuda, True, args.steps, args.warmup)
                rows.append((f"compute only, {'bf16' if cuda else 'fp32'}, compiled", ips, mem, flops))
            loader_n = time_loader(cfg, paths, args.workers, args.steps * 2, device)
            loader_0 = time_loader(cfg, paths, 0, 2, device)
            rows.append((f"loader only, {args.workers} workers", loader_n, None, None))
            rows.append(("loader only, 0 workers", loader_0, None, None))
            for label, ips, mem, fl in rows:
                gflop = f"{fl / 1e9:9.1f}" if fl else f"{'':>9}"
                if fl and peak and "bf16" in label:
                    mfu = f"{100 * ips * fl / peak:5.1f}%"
                else:
                    mfu = "n/a" if fl else ""
                mem_s = f"{mem:8.2f}" if mem is not None else f"{'':>8}"
                print(f"{arch:<24} {batch:>5} {label:<56} {ips:9.1f} {ips / base:6.2f}x {gflop} {mfu:>6} {mem_s}")
            e2e_best = max(ips for label, ips, _, _ in rows if label.startswith("end to end"))
            print(f"{arch:<24} {batch:>5} {'loader / best end to end':<56} {loader_n / e2e_best:9.2f} "
                  f"{'(>1: loader is not the bottleneck)'}")


if __name__ == "__main__":
    main()
