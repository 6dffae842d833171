"""DINO (or BYOL) training, top to bottom: set up processes, data, models and optimiser, then one loop.

``--method byol`` swaps three pieces (:mod:`pretrain.byol`): the head (projector, and a predictor on the
student/online side), the loss, and the augmentation (two views); the teacher is BYOL's target network.

Runs unchanged on one CPU, one GPU, or many GPUs/nodes under ``torchrun`` (DDP, ``env://``; gloo on CPU,
nccl on CUDA). The global batch ``--batch-size`` is split across processes and every schedule is a
function of the global step, so the number of processes changes speed, not the curves.

Outputs in ``--out``: checkpoint.pth (resume), teacher_backbone.pth (``ViTExtractor(weights=...)``),
log.jsonl, curves.png, config.json, and knn.json when ``--knn-data`` is given.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from vitdense.backbones import FORMAT_KEY, IMAGENET_MEAN, IMAGENET_STD, backbone_meta, create_vit, save_backbone
from vitdense.errors import ConfigError, DataError
from vitdense.extractor import resolve_device
from vitdense.io import check_output, describe_skipped, save_json

from .byol import BYOLHead, BYOLLoss, byol_augmentation
from .checkpoint import check_compatible, load_checkpoint, resolve_resume, rng_state, save_checkpoint, set_rng_state
from .config import DEFAULT_ARCH, MODEL_FIELDS, PretrainConfig
from .data import (ImageFolderDataset, MultiCropAugmentation, ResidentSources, StepBatchSampler, collate_crops,
                   find_images, readable_images)
from .gpu_augment import GPUMultiCrop
from .heads import DINOHead, MultiCropWrapper
from .loss import DINOLoss
from .monitor import JsonlLog, collapse_warning, plot_curves
from .schedules import Schedules
from .warmstart import WarmStart, apply_to_config, load_warm_start

LOG = logging.getLogger("pretrain")


@dataclass
class TrainResult:
    """What a finished (or ``--max-steps``-stopped) run leaves behind."""

    steps: int
    last_loss: float
    checkpoint: Path
    export: Path
    log: Path
    plot: Path
    skipped_files: int
    start_step: int = 0  # where this run began (a resumed run trained steps - start_step steps)
    stopped_by_clock: bool = False


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------

@dataclass
class Processes:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_processes(cfg: PretrainConfig) -> Processes:
    """Join the torchrun process group when launched by it (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return Processes(rank, world, local_rank, device)


class RunClock:
    """``--time-limit``: when to fit the schedules to the steps that fit, and when to stop to save in time.

    The horizon is planned once, after ``WARM`` steps (compilation, allocator, first batches) and ``MEASURE``
    more: the median iteration time, waits included, times the steps the time left allows, less the final
    save's time and a margin. After that every step checks that one more step and the save still fit.
    """

    WARM, MEASURE, MARGIN = 3, 8, 0.06

    def __init__(self, limit: float, start: float, save_estimate: float):
        self.limit, self.start = limit, start
        self.save_s = save_estimate  # raised to 1.5 x a measured save
        self.durations: list[float] = []
        self.planned = False

    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.start)

    def step_s(self) -> float:
        return statistics.median(self.durations[self.WARM:] or self.durations)

    def plan(self, step: int) -> int | None:
        """The last step the time allows, once enough steps were timed (else None)."""
        if self.planned or len(self.durations) < self.WARM + self.MEASURE:
            return None
        self.planned = True
        usable = (self.left() - self.save_s) * (1 - self.MARGIN)
        return step + max(1, int(usable / self.step_s()))

    def must_stop(self) -> bool:
        """True when another step would leave too little time for the final save."""
        step_s = self.step_s() if self.durations else 0.0
        return self.left() < self.save_s + 1.5 * step_s


def save_estimate_s(*modules: nn.Module, write_mb_per_s: float = 150.0) -> float:
    """Seconds a checkpoint (student, teacher, AdamW's two moments) plus the export and plot take, on a disk
    writing ``write_mb_per_s`` (conservative for local disks) and 3 s for the plot."""
    nbytes = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return 3.0 + 2.2 * nbytes / (write_mb_per_s * 1e6)


def build_model(cfg: PretrainConfig, student: bool, init: WarmStart | None = None) -> MultiCropWrapper:
    """A timm ViT + DINO head (BYOL: projector, and the predictor on the student); the student gets stochastic
    depth, the teacher none. With ``init`` the ViT has the warm start's architecture and weights (the head is
    always new)."""
    arch, kwargs = (init.arch, init.kwargs) if init is not None else cfg.timm_arch()
    backbone = create_vit(arch, **kwargs, dynamic_img_size=True, drop_path_rate=cfg.drop_path if student else 0.0)
    if init is not None:
        backbone.load_state_dict(init.state)
    if cfg.method == "byol":
        return MultiCropWrapper(backbone, BYOLHead(backbone.embed_dim, cfg.projector_hidden_dim, cfg.projector_dim,
                                                   predictor=student))
    head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                    norm_last_layer=cfg.norm_last_layer)
    return MultiCropWrapper(backbone, head)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: biases and norm scales (1-D parameters) get none, as in DINO."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, max_norm: float) -> None:
    """Scale each parameter's gradient to norm at most ``max_norm`` (per parameter, as DINO's clip_gradients)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA: teacher <- m * teacher + (1 - m) * student, parameter by parameter (paired by name: BYOL's
    student has a predictor the teacher lacks)."""
    t_named = dict(teacher.named_parameters())
    pairs = [(p.detach(), t_named[name]) for name, p in student.named_parameters() if name in t_named]
    assert len(pairs) == len(t_named), "every teacher parameter has a student counterpart"
    s_params, t_params = [s for s, _ in pairs], [t for _, t in pairs]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def batch_crops(views: Any, device: torch.device, device_augment: GPUMultiCrop | None = None,
                resident: ResidentSources | None = None) -> list[torch.Tensor]:
    """The V crop tensors of a loader batch on ``device``, whichever path made the batch (see
    :func:`pretrain.data.collate_crops`): CPU-made views, sources to crop on the device, or resident indices."""
    if resident is not None:
        indices, params = views
        return device_augment(resident.gather(indices), params)
    if device_augment is not None:
        images, params = views
        return device_augment(images.to(device, non_blocking=True), params)
    return [c.to(device, non_blocking=True) for c in views]


def export_meta(cfg: PretrainConfig, step: int, init: WarmStart | None = None, seconds: float = 0.0
                ) -> dict[str, Any]:
    """Backbone metadata: ``ViTExtractor(weights=...)`` rebuilds the architecture from it alone; ``chain``
    lists the runs the weights came from, oldest first (a warm start's own chain, then this run)."""
    arch, kwargs = (init.arch, init.kwargs) if init is not None else cfg.timm_arch()
    mean, std = (init.mean, init.std) if init is not None else (IMAGENET_MEAN, IMAGENET_STD)
    run = {"out": str(cfg.out), "init": init.weights if init is not None else None, "data_dir": str(cfg.data_dir),
           "steps": step, "minutes": round(seconds / 60, 2), "batch_size": cfg.batch_size, "lr": cfg.lr,
           "global_size": cfg.global_size, "local_crops": cfg.local_crops, "out_dim": cfg.out_dim,
           "method": cfg.method}
    if cfg.method == "byol":
        run["out_dim"] = cfg.projector_dim
    chain = (init.chain if init is not None else []) + [run]
    return backbone_meta(arch, kwargs, mean, std, name=f"{cfg.method}_{Path(cfg.out).name}", trained_steps=step,
                         data_dir=str(cfg.data_dir), init=run["init"], chain=chain, method=cfg.method)


def make_checkpoint(cfg: PretrainConfig, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                    loss_fn: DINOLoss, step: int, epoch: int, rng: list[dict[str, Any]], meta: dict[str, Any]
                    ) -> dict[str, Any]:
    return {"student": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
            "loss": loss_fn.state_dict(), "step": step, "epoch": epoch, "config": cfg.to_dict(), "rng": rng,
            FORMAT_KEY: meta}


def gather_rng(procs: Processes) -> list[dict[str, Any]]:
    """Every process's generator states (rank order), so a resumed run draws the same drop-path masks."""
    if procs.world_size == 1:
        return [rng_state()]
    states: list[Any] = [None] * procs.world_size
    dist.all_gather_object(states, rng_state())
    return states


@torch.no_grad()
def knn_features(backbone: nn.Module, paths: list[Path], size: int, device: torch.device,
                 autocast: Any) -> torch.Tensor:
    """CLS features (N, D) of images resized to size·256/224 (shorter side) and centre-cropped to size."""
    from vitdense.io import load_image

    import torchvision.transforms.functional as TF

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    feats = []
    for start in range(0, len(paths), 32):
        batch = []
        for path in paths[start:start + 32]:
            image = TF.center_crop(TF.resize(load_image(path), int(size * 256 / 224), antialias=True), size)
            batch.append((TF.to_tensor(image) - mean) / std)
        with autocast():
            feats.append(backbone(torch.stack(batch).to(device)).float().cpu())
    return torch.cat(feats)


def run_knn(cfg: PretrainConfig, backbone: nn.Module, device: torch.device, autocast: Any) -> dict[str, float]:
    """k-NN accuracy of the teacher backbone on ``--knn-data`` (leave-one-out without train/val split)."""
    from .data import labelled_folder
    from .knn import knn_accuracy

    train_split, val_split, classes = labelled_folder(cfg.knn_data)
    was_training = backbone.training
    backbone.eval()
    bank = knn_features(backbone, train_split.paths, cfg.global_size, device, autocast)
    bank_labels = torch.tensor(train_split.labels)
    if val_split is None:
        result = knn_accuracy(bank, bank_labels, bank, bank_labels, len(classes), cfg.knn_k, cfg.knn_temp,
                              exclude_self=True)
    else:
        queries = knn_features(backbone, val_split.paths, cfg.global_size, device, autocast)
        result = knn_accuracy(bank, bank_labels, queries, torch.tensor(val_split.labels), len(classes),
                              cfg.knn_k, cfg.knn_temp)
    backbone.train(was_training)
    return result


def ignore_interrupts(worker_id: int) -> None:
    """Loader workers ignore SIGINT (a terminal's Ctrl-C goes to every process of the group): the main process
    finishes the step and saves, which needs the workers alive."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM during the loop: the first one only sets ``requested``, so the loop stops
    at the end of a whole step and the run saves a checkpoint of that step; a second one exits at once
    (code 130; the last complete checkpoint stays, every write being atomic). Handlers are installed in
    the main thread only and put back by :meth:`restore`."""

    def __init__(self) -> None:
        import signal
        import threading

        self.requested = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            os.write(2, b"\npretrain: interrupted again: exiting without saving\n")
            os._exit(130)
        self.requested = True
        os.write(2, b"\npretrain: interrupted: saving a checkpoint after this step (again to exit at once)\n")

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def train(cfg: PretrainConfig) -> TrainResult:
    """Train student and teacher as configured; return where the results are (rank 0's view)."""
    t_run = time.perf_counter()  # --time-limit counts from here: decoding and model building included
    check_output(cfg.out, folder=True)  # before any work (with --resume: the run's own folder)
    cfg.make_paths_absolute()  # what config.json and the exports record: absolute paths
    init = load_warm_start(cfg.init) if cfg.init else None
    if init is not None:
        apply_to_config(cfg, init)
    cfg.arch = cfg.arch or DEFAULT_ARCH
    cfg.validate()
    procs = init_processes(cfg)
    device = procs.device
    out = Path(cfg.out)

    # ----- data and checkpoint: fail on bad input before anything is written
    files = find_images(cfg.data_dir)
    paths, unreadable = readable_images(files)
    if not paths:
        raise DataError(f"{cfg.data_dir}: none of the {len(files)} image files can be read")
    if unreadable:
        LOG.warning("skipping %d unreadable image file(s): %s", len(unreadable), describe_skipped(unreadable, 10))
    if cfg.batch_size % procs.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the {procs.world_size} processes")
    if len(paths) * cfg.repeat < cfg.batch_size:
        times = f" x --repeat {cfg.repeat}" if cfg.repeat > 1 else ""
        raise DataError(f"{cfg.data_dir}: {len(paths)} readable images{times}, fewer than --batch-size "
                        f"{cfg.batch_size}")
    if cfg.knn_data:
        from .data import labelled_folder

        labelled_folder(cfg.knn_data)  # a bad k-NN folder fails now, not after hours of training
    ckpt = None
    if cfg.resume:
        ckpt_path = resolve_resume(cfg.resume)
        ckpt = load_checkpoint(ckpt_path)
        check_compatible(ckpt_path, PretrainConfig.from_dict(ckpt["config"]).to_dict(), cfg.to_dict(), MODEL_FIELDS)
    if cfg.method == "byol":
        augment = byol_augmentation(cfg.global_size, cfg.global_scale)
    else:
        augment = MultiCropAugmentation(cfg.global_size, cfg.local_size, cfg.local_crops, cfg.global_scale,
                                        cfg.local_scale)
    on_device = cfg.gpu_augment == "on" or (cfg.gpu_augment == "auto" and device.type == "cuda")
    source_size = (cfg.source_size or cfg.global_size * 3 // 2) if on_device else 0
    composer = None
    if cfg.cutouts:
        from .composite import Composer

        backgrounds = find_images(cfg.backgrounds) if cfg.backgrounds else paths
        composer = Composer(find_images(cfg.cutouts), backgrounds, source_size or cfg.global_size * 3 // 2)
    dataset = ImageFolderDataset(paths, augment, repeat=cfg.repeat, source_size=source_size,
                                 cache_mb=cfg.cache_mb, composer=composer, composite_p=cfg.composite_p)
    device_augment = GPUMultiCrop(IMAGENET_MEAN, IMAGENET_STD) if on_device else None
    resident = None
    # fresh composites are made by the loader workers, so their sources cannot stay on the device
    if on_device and composer is None and \
            ResidentSources.nbytes(len(paths), source_size) <= cfg.resident_mb * 2**20:
        resident = ResidentSources(dataset, device, cfg.workers)
        if resident.failed:
            LOG.warning("skipping %d image file(s) that cannot be decoded: %s", len(resident.failed),
                        describe_skipped(resident.failed, 10))
            unreadable = unreadable + resident.failed
        dataset = resident
        if len(dataset) < cfg.batch_size:
            raise DataError(f"{cfg.data_dir}: {len(resident.images)} decodable images x --repeat {cfg.repeat}, "
                            f"fewer than --batch-size {cfg.batch_size}")
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, procs.rank, procs.world_size, cfg.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate_crops,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                        prefetch_factor=4 if cfg.workers > 0 else None,
                        generator=torch.Generator(),  # keeps the loader off the global RNG (exact resume)
                        worker_init_fn=ignore_interrupts)  # Ctrl-C reaches workers too: the main process decides
    steps_per_epoch = sampler.steps_per_epoch
    schedules = Schedules.from_config(cfg, steps_per_epoch)
    last_step = schedules.total_steps if cfg.max_steps <= 0 else min(cfg.max_steps, schedules.total_steps)

    # ----- models: identical initialisation on every process, teacher starts as a copy of the student
    torch.manual_seed(cfg.seed)
    student = build_model(cfg, student=True, init=init).to(device)
    teacher = build_model(cfg, student=False, init=init).to(device)
    if init is not None:
        LOG.info("warm start from %s", init.weights)
        init.state = {}  # the weights live in the models now
    missing, _ = teacher.load_state_dict(student.state_dict(), strict=False)  # BYOL: no predictor on the teacher
    assert not missing, missing
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.method == "byol":
        loss_fn: nn.Module = BYOLLoss()
    else:
        loss_fn = DINOLoss(cfg.out_dim, augment.ncrops, cfg.student_temp, cfg.center_momentum).to(device)
    # lr and weight decay are set every step; the fused kernel on CUDA (one launch for all parameters)
    optimizer = torch.optim.AdamW(param_groups(student), fused=device.type == "cuda")
    torch.manual_seed(cfg.seed + 1000 * procs.rank + 1)  # drop-path masks differ between processes

    # ----- resume
    step = 0
    resumed_minutes = 0.0
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loss_fn.load_state_dict(ckpt["loss"])
        step = int(ckpt["step"])
        if len(ckpt.get("rng", [])) == procs.world_size:
            set_rng_state(ckpt["rng"][procs.rank])
        else:
            LOG.warning("%s: saved by %d processes, running %d: drop-path masks will differ from the original "
                        "run", cfg.resume, len(ckpt.get("rng", [])), procs.world_size)
            torch.manual_seed(cfg.seed + 1000 * procs.rank + step)
        resumed_minutes = float((ckpt.get(FORMAT_KEY) or {}).get("chain", [{}])[-1].get("minutes", 0.0))
        del ckpt
        LOG.info("resumed from %s at step %d", cfg.resume, step)

    student_ddp: nn.Module = student
    if procs.world_size > 1:
        student_ddp = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    student_fwd, teacher_fwd = student_ddp, teacher
    if cfg.compile:
        student_fwd, teacher_fwd = torch.compile(student_ddp), torch.compile(teacher)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # ----- outputs
    t_start = time.perf_counter() - 60 * resumed_minutes  # training time of the run, resumed parts included
    ckpt_file, export_file = out / "checkpoint.pth", out / "teacher_backbone.pth"
    log_file, plot_file = out / "log.jsonl", out / "curves.png"
    log = None
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / "config.json", cfg.to_dict())
        log = JsonlLog(log_file, resume_step=step)

    clock = RunClock(cfg.time_limit, t_run, save_estimate_s(student, teacher)) if cfg.time_limit > 0 else None
    stopped_by_clock = False
    # PRETRAIN_SYNC_DEBUG=warn|error (CUDA): from the second step on, torch reports every operation that makes
    # the host wait for the device, except the intended ones (reading the last step's numbers, saving).
    sync_debug = os.environ.get("PRETRAIN_SYNC_DEBUG", "") if device.type == "cuda" else ""

    @contextlib.contextmanager
    def intended_sync():
        mode = torch.cuda.get_sync_debug_mode() if sync_debug else 0
        if mode:
            torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            if mode:
                torch.cuda.set_sync_debug_mode(mode)

    def save(epoch: int) -> None:
        """Checkpoint + teacher export + plot (rank 0 writes; every rank joins the RNG gather)."""
        with intended_sync():
            write_checkpoint(epoch)

    def write_checkpoint(epoch: int) -> None:
        report()  # a diverged step must never reach a checkpoint
        started = time.perf_counter()
        rng = gather_rng(procs)
        if procs.main:
            meta = export_meta(cfg, step, init, time.perf_counter() - t_start)
            save_checkpoint(ckpt_file, make_checkpoint(cfg, student, teacher, optimizer, loss_fn, step, epoch, rng,
                                                       meta))
            save_backbone(teacher.backbone.state_dict(), export_file, meta=meta)
            plot_curves(log.records, plot_file, title=f"{cfg.method.upper()} {cfg.arch} on {cfg.data_dir}")
        if clock is not None:
            clock.save_s = max(clock.save_s, 1.5 * (time.perf_counter() - started))

    pending: dict[str, Any] | None = None  # the last step's numbers, still on the device

    def clock_decisions(done: int, stop: float, plan: float) -> None:
        """Apply the clock's plan (the horizon the schedules are fitted to) and stop (end after this step)."""
        nonlocal last_step, schedules, stopped_by_clock
        if plan > 0 and int(plan) < last_step:
            last_step = max(done, int(plan))
            schedules = schedules.fitted(last_step)
            progress.total = last_step
            progress.refresh()
            LOG.info("--time-limit %g s: %d steps fit; schedules fitted to them", cfg.time_limit, last_step)
            if procs.main:
                log.append({"step": done, "planned_steps": last_step, "time_left_s": round(clock.left(), 1)})
        if stop > 0 and step < last_step:
            last_step = step  # the step queued since this one was decided ends the run
            stopped_by_clock = True
            if procs.main:
                log.append({"step": done, "stopped_by": "clock", "time_left_s": round(clock.left(), 1)})

    def report() -> None:
        """Read the pending step's loss and statistics: stop on divergence, log, show progress."""
        nonlocal pending, last_loss, skipped, stopping
        if pending is None:
            return
        done, epoch, values = pending["step"], pending["epoch"], pending["values"]
        seconds = pending["seconds"] or time.perf_counter() - pending["t_data"]
        with intended_sync():  # the step before last: done by now, the device is already on the next one
            read = pending["stats"].tolist()
        numbers, names = read[:1 + len(pending["names"])], pending["names"]
        loss, diagnostics = numbers[0], dict(zip(names, numbers[1:]))
        n_failed, stop_asked, clock_stop, plan = read[len(numbers):] or pending["host"]
        pending_wait = pending["data_wait"]
        pending = None
        if stop_asked > 0:  # read one step late, summed over processes: every process stops at the same step
            stopping = True
        if not math.isfinite(loss):
            raise ConfigError(f"loss is {loss} at step {done}: training diverged; lower --lr or "
                              f"raise --clip-grad/--freeze-last-layer")
        last_loss = loss
        skipped += int(n_failed)
        if clock is not None:
            clock.durations.append(seconds)
            clock_decisions(done, clock_stop, plan)
        if procs.main and (done % cfg.log_every == 0 or done == last_step):
            record = {"step": done, "epoch": epoch, "loss": loss, **diagnostics, "lr": values.lr,
                      "weight_decay": values.weight_decay, "momentum": values.momentum,
                      "teacher_temp": values.teacher_temp, "images_per_s": cfg.batch_size / max(seconds, 1e-9),
                      "data_wait_s": pending_wait, "skipped_files": skipped}
            if cfg.method == "byol":
                del record["teacher_temp"]
            log.append(record)
            warning = collapse_warning(record)
            if warning:
                LOG.warning("step %d: %s", done, warning)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", epoch=epoch)

    knn_at = -1

    def knn_eval(epoch: int) -> None:
        nonlocal knn_at
        knn_at = step
        if procs.main:
            with intended_sync():
                result = run_knn(cfg, teacher.backbone, device, autocast)
            # top-5 only with more than 5 classes (vitdense.metrics.top5_accuracy), as retrieval-eval knn
            log.append({"step": step, "epoch": epoch, "knn_top1": result["top1"],
                        **({"knn_top5": result["top5"]} if "top5" in result else {})})
            save_json(out / "knn.json", {"step": step, "k": cfg.knn_k, "temperature": cfg.knn_temp, **result})
            LOG.info("k-NN at step %d: top-1 %.2f%%%s", step, result["top1"],
                     f", top-5 {result['top5']:.2f}%" if "top5" in result else "")
        if procs.world_size > 1:
            dist.barrier()

    # ----- the loop
    from tqdm import tqdm

    progress = tqdm(total=last_step, initial=step, desc="pretrain", unit="step", disable=not procs.main,
                    dynamic_ncols=True)
    student.train()
    teacher.train()  # no dropout/BN in a ViT: train/eval only matters for the (zero) teacher drop-path
    skipped = len(unreadable)
    last_loss = math.nan
    saved_at = step if cfg.resume else -1
    first_step = step
    stopping = False  # Ctrl-C / SIGTERM seen by any process (see StopRequest)
    stop = StopRequest()
    try:
        while step < last_step:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch, start_step=step % steps_per_epoch)
            t_data = time.perf_counter()
            for views, n_failed in loader:
                crops = batch_crops(views, device, device_augment, resident)
                t_step = time.perf_counter()
                values = schedules.at(step)
                for i, group in enumerate(optimizer.param_groups):
                    group["lr"] = values.lr
                    group["weight_decay"] = values.weight_decay if i == 0 else 0.0

                # Teacher sees the two global views, the student all views (Caron et al. 2021, Alg. 1).
                with autocast():
                    with torch.no_grad():
                        teacher_out = teacher_fwd(crops[:2])
                    student_out = student_fwd(crops)
                terms = loss_fn(student_out, teacher_out, values.teacher_temp)

                optimizer.zero_grad(set_to_none=True)
                terms.loss.backward()
                if cfg.clip_grad > 0:
                    clip_gradients(student, cfg.clip_grad)
                if cfg.method == "dino" and epoch < cfg.freeze_last_layer:
                    for p in student.head.last_layer.parameters():
                        p.grad = None  # AdamW skips parameters without gradient: no step, no decay
                optimizer.step()
                update_teacher(student, teacher, values.momentum)
                step += 1
                if sync_debug and step == first_step + 1:  # after the first step (allocator, cuDNN choices)
                    torch.cuda.set_sync_debug_mode(sync_debug)

                # ----- monitoring (averaged over processes). Reading a value from the device waits for it, so
                # this step's numbers are read after the next step is queued: the device never runs dry.
                # Host values (substituted images, Ctrl-C, the clock's stop and plan; rank 0's clock decides
                # for all) reach the device only to be summed over processes, through pinned memory: no copy
                # that waits.
                diagnostics = terms.diagnostics
                stats = torch.stack([terms.loss.detach(), *diagnostics.values()])
                clock_stop = float(clock is not None and procs.main and clock.must_stop())
                plan = float((clock.plan(step) or 0) if clock is not None and procs.main else 0)
                host = [float(n_failed), float(stop.requested), clock_stop, plan]
                if procs.world_size > 1:
                    n_mean = len(stats)
                    extra = torch.tensor(host)
                    extra = extra.pin_memory() if device.type == "cuda" else extra
                    stats = torch.cat([stats, extra.to(device, non_blocking=True)])
                    dist.all_reduce(stats)
                    stats[:n_mean] /= procs.world_size
                report()
                pending = {"step": step, "epoch": epoch, "stats": stats, "names": list(diagnostics),
                           "values": values, "t_data": t_data, "data_wait": t_step - t_data, "seconds": None,
                           "host": host}
                if cfg.save_every and step % cfg.save_every == 0:
                    save(epoch)
                    saved_at = step
                now = time.perf_counter()
                if pending is not None:
                    pending["seconds"] = now - t_data  # the whole iteration, waits included
                t_data = now
                if step >= last_step or stopping:
                    break
            if stopping:
                break
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch and saved_at != step and (step // steps_per_epoch) % cfg.save_every_epochs == 0:
                save(step // steps_per_epoch)
                saved_at = step
            done_epochs = step // steps_per_epoch
            if cfg.knn_data and end_of_epoch and (done_epochs % cfg.knn_every == 0 or step >= last_step):
                knn_eval(epoch)
    except BaseException:
        stop.restore()
        if sync_debug:
            torch.cuda.set_sync_debug_mode(0)
        raise
    if stopping:
        report()
        progress.close()
        save(step // steps_per_epoch)  # a second Ctrl-C meanwhile exits at once; the write is atomic
        stop.restore()
        if sync_debug:
            torch.cuda.set_sync_debug_mode(0)
        LOG.warning("interrupted at step %d: checkpoint saved to %s; continue with --resume %s", step, ckpt_file, out)
        if procs.world_size > 1:
            dist.destroy_process_group()
        raise KeyboardInterrupt(f"saved the checkpoint of step {step} in {ckpt_file}; continue with "
                                f"`vitdense pretrain --resume {out}`")

    stop.restore()
    if sync_debug:
        torch.cuda.set_sync_debug_mode(0)
    report()
    progress.close()
    if stopped_by_clock:
        LOG.info("--time-limit %g s: stopped by the clock at step %d", cfg.time_limit, step)

    if saved_at != step:
        save(step // steps_per_epoch)
    if cfg.knn_data and knn_at != step:
        knn_eval(step // steps_per_epoch)
    if procs.main:
        plot_curves(log.records, plot_file, title=f"{cfg.method.upper()} {cfg.arch} on {cfg.data_dir}")
    if procs.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(step, last_loss, ckpt_file, export_file, log_file, plot_file, skipped, first_step,
                       stopped_by_clock)
