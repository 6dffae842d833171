"""Train the backbone that ships inside vitdense under a hard wall-clock deadline, and export it.

The recipe of the bundled model (see ``vitdense/weights/README.md``): DINO as ``vitdense pretrain`` runs it, on
the package-installable data pack of ``apps/build_pretrain_set.py --pack`` (photos, plus a new composite of the
photographic cut-outs on a background photo for half the samples), continuing from ``--init``. The run stops on
the clock: ``--deadline-s`` is the whole command's wall time, Python's start-up, image decoding, the final
checkpoint, the fp16 export and its parts included; pretraining gets ``--time-limit`` = what is left less
those, fits its schedules to the steps that fit and saves in time (see ``pretrain --time-limit``).

    python apps/train_bundled_backbone.py --data data/pretrain_pack --init vitdense_vits8 --deadline-s 300 \
        --out runs/bundled --parts-dir $OUT

Outputs in ``OUT``: the pretrain run (``run/``: checkpoint, log.jsonl, curves.png), ``command.txt``,
``train_summary.json`` (steps, seconds, whether the clock stopped it) and ``NAME.safetensors``, the teacher
backbone in fp16 whose metadata lists every run of the chain it came from (``meta["chain"]``). ``--parts-dir``
also writes it in parts of ``--split-mb`` MiB with a SHA-256 (a device machine's files come back at most 16 MiB
each); here ``--join DIR --to FILE`` puts them back together (checked). Grade the result with
``vitdense evaluate`` before shipping it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 100  # the schedules' horizon when the clock allows it (it is fitted to the steps that fit)
MIN_EPOCH_STEPS = 100  # --repeat 0 makes epochs at least this long (each epoch restart refills the loader)
# Seconds of the deadline that are not training (--reserve-s): the interpreter and imports before
# pretraining's clock starts (20 s), then loading the last export, writing it in fp16 and its parts (20 s).
RESERVE_S = 40.0


def pack_paths(data: Path) -> tuple[Path, Path | None, Path | None]:
    """(images, cut-outs, backgrounds) of a data pack (``photos/``, ``cutouts/``, ``backgrounds/``), or
    (data, None, None) for a plain image folder."""
    if (data / "photos").is_dir():
        cutouts, backgrounds = data / "cutouts", data / "backgrounds"
        return data / "photos", cutouts if cutouts.is_dir() else None, backgrounds if backgrounds.is_dir() else None
    return data, None, None


def recipe(args: argparse.Namespace, out: Path, repeat: int, time_limit: float) -> list[str]:
    """The ``python -m pretrain`` command line of the bundled model's recipe."""
    images, cutouts, backgrounds = pack_paths(args.data)
    cmd = [sys.executable, "-m", "pretrain", str(images), "--out", str(out), "--arch", args.arch,
           "--batch-size", str(args.batch_size), "--epochs", str(EPOCHS), "--repeat", str(repeat),
           "--local-crops", str(args.local_crops), "--out-dim", str(args.out_dim),
           "--workers", str(args.workers), "--seed", str(args.seed), "--cache-mb", "256",
           "--save-every-epochs", "1000",  # one save, at the end: the clock keeps time for it
           "--time-limit", f"{time_limit:.0f}",
           # a short schedule: a faster teacher and a smaller head than the 100-epoch ImageNet recipe
           "--momentum-teacher", str(args.momentum_teacher), "--teacher-temp", "0.04",
           "--warmup-teacher-temp-epochs", "0"]
    if cutouts is not None:
        cmd += ["--cutouts", str(cutouts), "--composite-p", str(args.composite_p)]
        if backgrounds is not None:
            cmd += ["--backgrounds", str(backgrounds)]
    if args.init:
        cmd += ["--init", args.init]
    return cmd + args.extra


def run_until(cmd: list[str], seconds: float, log: Path) -> str:
    """Run ``cmd`` (output to the console and ``log``) in its own process group; kill the group after
    ``seconds``. "ok", "failed (exit N)" or "killed at the deadline"."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print("+", shlex.join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, seconds))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = "killed at the deadline"
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    sys.stdout.write(log.read_text()[-4000:])
    return status


def split_file(path: Path, folder: Path, part_mb: float) -> list[Path]:
    """Write ``path`` as ``NAME.partNN`` files of at most ``part_mb`` MiB plus ``NAME.sha256`` into ``folder``."""
    import hashlib

    data = path.read_bytes()
    size = int(part_mb * 2**20)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(data), size):
        part = folder / f"{path.name}.part{i // size:02d}"
        part.write_bytes(data[i:i + size])
        parts.append(part)
    (folder / f"{path.name}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    return parts


def join_parts(folder: Path, dest: Path) -> Path:
    """Concatenate ``NAME.partNN`` files of ``folder`` into ``dest`` after checking ``NAME.sha256``."""
    import hashlib

    sums = sorted(folder.glob("*.sha256"))
    if len(sums) != 1:
        sys.exit(f"{folder}: expected one NAME.sha256 beside the parts, found {len(sums)}")
    name = sums[0].name[:-len(".sha256")]
    parts = sorted(folder.glob(f"{name}.part*"))
    data = b"".join(p.read_bytes() for p in parts)
    if hashlib.sha256(data).hexdigest() != sums[0].read_text().strip():
        sys.exit(f"{folder}: the {len(parts)} parts of {name} do not match its SHA-256 (a part is missing or cut)")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def main() -> None:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/pretrain_pack"),
                        help="data pack (photos/, cutouts/, backgrounds/) or image folder; built by "
                             "apps/build_pretrain_set.py --pack when missing")
    parser.add_argument("--out", type=Path, default=Path("runs/bundled"))
    parser.add_argument("--arch", default="vit_small_patch8_224")
    parser.add_argument("--name", default="vitdense_vits8", help="name of the exported model")
    parser.add_argument("--deadline-s", type=float, default=300.0,
                        help="wall seconds for this whole command, export and parts included")
    parser.add_argument("--reserve-s", type=float, default=RESERVE_S,
                        help="seconds of the deadline kept for start-up and the export (half each)")
    parser.add_argument("--repeat", type=int, default=0,
                        help="passes over the images per epoch (0: epochs of at least 100 steps)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--out-dim", type=int, default=8192)
    parser.add_argument("--momentum-teacher", type=float, default=0.99)
    parser.add_argument("--composite-p", type=float, default=0.5, help="share of samples that are new composites")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed (give each link of a chain its own)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--init", default="", help="warm start: weights to continue from (e.g. vitdense_vits8)")
    parser.add_argument("--parts-dir", type=Path, default=None, help="also write the export here in parts")
    parser.add_argument("--split-mb", type=float, default=15.0, help="size of the parts in MiB")
    parser.add_argument("--join", type=Path, default=None, metavar="FOLDER",
                        help="only join the parts in FOLDER into --to and exit")
    parser.add_argument("--to", type=Path, default=None, help="file --join writes")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further pretrain options after --")
    args = parser.parse_args()
    if args.join is not None:
        if args.to is None:
            sys.exit("--join needs --to FILE")
        print(f"wrote {join_parts(args.join, args.to)}")
        return
    args.extra = [a for a in args.extra if a != "--"]
    args.data = args.data.resolve()
    args.out = args.out.resolve()

    if not args.data.is_dir():
        subprocess.run([sys.executable, str(REPO / "apps" / "build_pretrain_set.py"), "--pack", "--out",
                        str(args.data)], check=True, cwd=REPO)
    from pretrain import find_images

    n_images = len(find_images(pack_paths(args.data)[0]))
    repeat = args.repeat or max(1, math.ceil(MIN_EPOCH_STEPS * args.batch_size / n_images))
    time_limit = args.deadline_s - (time.monotonic() - started) - args.reserve_s
    if time_limit < 10:
        sys.exit(f"--deadline-s {args.deadline_s:g}: {time_limit:.0f} s left for training after start-up and export")
    cmd = recipe(args, args.out / "run", repeat, time_limit)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "command.txt").write_text(shlex.join(["python"] + cmd[1:]) + "\n")
    train_start = time.monotonic()
    # the backstop: pretraining keeps its own clock; past it (plus its start-up) the group is killed
    status = run_until(cmd, time_limit + args.reserve_s / 2, args.out / "train.log")
    seconds = time.monotonic() - train_start
    summary = {"status": status, "seconds": round(seconds, 1), "time_limit_s": round(time_limit, 1),
               "repeat": repeat, "images": n_images}
    export_pth = args.out / "run" / "teacher_backbone.pth"
    log = args.out / "run" / "log.jsonl"
    if log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        steps = [r for r in records if "loss" in r]
        summary.update(steps=steps[-1]["step"] if steps else 0,
                       planned_steps=next((r["planned_steps"] for r in records if "planned_steps" in r), None),
                       stopped_by_clock=any(r.get("stopped_by") == "clock" for r in records),
                       last_loss=steps[-1]["loss"] if steps else None,
                       images_per_s=sorted(r["images_per_s"] for r in steps)[len(steps) // 2] if steps else None)
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not export_pth.is_file():
        sys.exit(f"pretraining ended ({status}) without an export")

    import torch

    from vitdense import read_weights, save_backbone

    state, meta = read_weights(export_pth)
    name = args.name
    meta = {**meta, "name": name, "data_dir": "apps/build_pretrain_set.py --pack", "train_minutes": round(seconds / 60, 1),
            "recipe": (args.out / "command.txt").read_text().strip()}
    export = args.out / f"{name}.safetensors"
    save_backbone(state, export, meta, dtype=torch.float16)
    print(f"exported {export} after {seconds / 60:.1f} min of training ({status}); "
          f"{time.monotonic() - started:.0f} s of the {args.deadline_s:g} s deadline", flush=True)
    if args.parts_dir is not None:
        parts = split_file(export, args.parts_dir, args.split_mb)
        print(f"wrote {len(parts)} part(s) of at most {args.split_mb:g} MiB to {args.parts_dir}", flush=True)


if __name__ == "__main__":
    main()
