"""Time facebookresearch/dino's own training loop (``main_dino.py``) in one process, offline, on its defaults.

The checkout (``.peers/dino``; never committed) runs unchanged: its loader, augmentations, fp16 and
``train_one_epoch``. Around it only what a one-process, offline run needs:

* ``torch.hub.list`` answers [] (its ``--arch`` choices list XCiT models from the hub, which needs the network);
* the environment of a one-process ``torch.distributed`` job (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*);
* ``MetricLogger.log_every`` (its progress wrapper around the loader) is replaced by one that stamps the time
  at each request for a batch and stops training after ``warmup + steps`` steps. A request comes after the
  previous step's ``torch.cuda.synchronize()`` and ``loss.item()``, so stamp k+1 - stamp k is one whole
  step, loader wait included;
* on a machine without CUDA (the suite's ``--toy`` check): ``.cuda()`` is a no-op, gloo replaces nccl, DDP
  gets no device ids, fp16 is off (``torch.cuda.amp`` disables itself there anyway).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn


class StopTraining(Exception):
    """Raised from the loader wrapper once the timed steps are done."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_patches() -> None:
    import torch.distributed as dist

    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.set_device = lambda *a, **k: None
    init = dist.init_process_group
    dist.init_process_group = lambda *a, **k: init(*a, **{**k, "backend": "gloo"})
    ddp = nn.parallel.DistributedDataParallel

    class CpuDDP(ddp):
        def __init__(self, module: nn.Module, device_ids=None, **kwargs):
            super().__init__(module, **kwargs)

    nn.parallel.DistributedDataParallel = CpuDDP


def run(peer: str, images: str, out_dir: str, arch: str, patch: int, batch: int, local_crops: int, out_dim: int,
        workers: int, warmup: int, steps: int, emit: Callable[[dict], None] | None = None) -> dict:
    """Images/s of ``main_dino.train_dino`` over ``steps`` steps after ``warmup``; ``images``: an ImageFolder root.

    ``emit`` receives a provisional result (``"partial": True``) after every whole wave of ``workers`` timed
    steps, so a run stopped at its deadline still reports the rate of the waves it finished."""
    peer_path = Path(peer).resolve()
    if not (peer_path / "main_dino.py").is_file():
        raise SystemExit(f"{peer_path}: not a facebookresearch/dino checkout (no main_dino.py)")
    sys.path.insert(0, str(peer_path))
    cuda = torch.cuda.is_available()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    torch.hub.list = lambda *a, **k: []
    if not cuda:
        _cpu_patches()
    import main_dino
    import utils

    stamps: list[float] = []

    def result(timed_steps: int, partial: bool) -> dict:
        timed = stamps[warmup + timed_steps] - stamps[warmup]
        return {"images_per_s": batch * timed_steps / timed, "seconds": timed, "steps": timed_steps,
                "warmup": warmup, "batch": batch, "workers": workers, "partial": partial,
                "precision": "fp16" if cuda else "fp32"}

    def log_every(self, iterable, print_freq, header=None):
        for item in iterable:
            stamps.append(time.perf_counter())
            done = len(stamps) - 1 - warmup  # timed steps finished
            if emit is not None and 0 < done < steps and done % max(1, workers) == 0:
                emit(result(done, partial=True))
            if len(stamps) > warmup + steps:
                raise StopTraining
            yield item
        raise RuntimeError(f"main_dino.py's epoch ended after {len(stamps)} steps: give it more images")

    utils.MetricLogger.log_every = log_every
    parser = argparse.ArgumentParser("DINO", parents=[main_dino.get_args_parser()])
    args = parser.parse_args([
        "--arch", arch, "--patch_size", str(patch), "--data_path", images, "--output_dir", out_dir,
        "--batch_size_per_gpu", str(batch), "--num_workers", str(workers), "--local_crops_number", str(local_crops),
        "--out_dim", str(out_dim), "--saveckp_freq", "0"] + ([] if cuda else ["--use_fp16", "False"]))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    try:
        main_dino.train_dino(args)
    except StopTraining:
        pass
    timed = stamps[warmup + steps] - stamps[warmup]
    return {"images_per_s": batch * steps / timed, "seconds": timed, "steps": steps, "warmup": warmup,
            "batch": batch, "workers": workers, "precision": "fp16" if args.use_fp16 else "fp32",
            "median_step_s": sorted(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:]))[steps // 2],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
