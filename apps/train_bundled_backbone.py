"""Train the backbone that ships inside vitdense, within a fixed time budget, and export it.

The recipe of the bundled model (see ``vitdense/weights/README.md``): DINO as ``vitdense pretrain`` runs it,
on the package-installable image set of ``apps/build_pretrain_set.py``, for 100 epochs whose length
(``--repeat`` passes over the ~120 images) is set so the run fills ``--minutes`` on this machine. A short
probe run measures images/s first; the command actually run is written to ``OUT/command.txt``.

    python apps/train_bundled_backbone.py --arch vit_small_patch8_224 --minutes 8 --out runs/bundled
    python apps/train_bundled_backbone.py ... --repeat 40      # skip the probe: exactly this recipe

Outputs in ``OUT``: the pretrain run (checkpoint, log.jsonl, curves.png), ``command.txt``, and
``NAME.safetensors``, the teacher backbone in fp16 with its metadata, ready to be copied to
``vitdense/weights/``.

On a lent GPU machine (files come back at most 16 MiB each): ``--init vitdense_vits8`` continues from the
shipped weights, ``--parts-dir $OUT`` also writes the export in parts of ``--split-mb`` MiB with a SHA-256,
and here ``--join $OUT_FILES --to vitdense/weights/vitdense_vits8.safetensors`` puts them back together
(checked). Grade the result with ``vitdense evaluate`` before shipping it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 100


def recipe(args: argparse.Namespace, out: Path, repeat: int, epochs: int, max_steps: int = 0) -> list[str]:
    """The ``python -m pretrain`` command line of the bundled model's recipe."""
    cmd = [sys.executable, "-m", "pretrain", str(args.data), "--out", str(out), "--arch", args.arch,
           "--batch-size", str(args.batch_size), "--epochs", str(epochs), "--repeat", str(repeat),
           "--local-crops", str(args.local_crops), "--out-dim", str(args.out_dim),
           "--workers", str(args.workers), "--seed", "0", "--cache-mb", "256",
           # a probe (max_steps) saves only at its end
           "--save-every-epochs", "1000" if max_steps else "10",
           # a short schedule: a faster teacher and a smaller head than the 100-epoch ImageNet recipe
           "--momentum-teacher", str(args.momentum_teacher), "--teacher-temp", "0.04",
           "--warmup-teacher-temp-epochs", "0"]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    if args.init:
        cmd += ["--init", args.init]
    return cmd + args.extra


def run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def probe_images_per_s(args: argparse.Namespace, n_images: int) -> float:
    """Median images/s of the steps after warm-up of a short run with the same settings."""
    out = args.out / "probe"
    steps = 16
    repeat = max(1, -(-args.batch_size * steps // n_images))
    run(recipe(args, out, repeat, 1, max_steps=steps))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][steps // 2:]
    return statistics.median(rates)


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/pretrain_set"),
                        help="image folder (built by apps/build_pretrain_set.py when missing)")
    parser.add_argument("--out", type=Path, default=Path("runs/bundled"))
    parser.add_argument("--arch", default="vit_small_patch8_224")
    parser.add_argument("--name", default="vitdense_vits8", help="name of the exported model")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget (sets --repeat)")
    parser.add_argument("--repeat", type=int, default=0, help="passes over the images per epoch (skips the probe)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--out-dim", type=int, default=8192)
    parser.add_argument("--momentum-teacher", type=float, default=0.99)
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
        run([sys.executable, str(REPO / "apps" / "build_pretrain_set.py"), "--out", str(args.data)])
    from pretrain import find_images

    n_images = len(find_images(args.data))
    repeat = args.repeat
    if not repeat:
        ips = probe_images_per_s(args, n_images)
        repeat = max(1, round(ips * args.minutes * 60 / (EPOCHS * n_images)))
        print(f"probe: {ips:.0f} images/s -> --repeat {repeat} for {args.minutes} min", flush=True)
    cmd = recipe(args, args.out / "run", repeat, EPOCHS)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "command.txt").write_text(shlex.join(["python"] + cmd[1:]) + "\n")
    start = time.perf_counter()
    run(cmd)
    minutes = (time.perf_counter() - start) / 60

    import torch

    from vitdense import read_weights, save_backbone

    state, meta = read_weights(args.out / "run" / "teacher_backbone.pth")
    name = args.name
    meta = {**meta, "name": name, "data_dir": "apps/build_pretrain_set.py", "train_minutes": round(minutes, 1),
            "recipe": (args.out / "command.txt").read_text().strip()}
    export = args.out / f"{name}.safetensors"
    save_backbone(state, export, meta, dtype=torch.float16)
    print(f"exported {export} after {minutes:.1f} min of training", flush=True)
    if args.parts_dir is not None:
        parts = split_file(export, args.parts_dir, args.split_mb)
        print(f"wrote {len(parts)} part(s) of at most {args.split_mb:g} MiB to {args.parts_dir}", flush=True)


if __name__ == "__main__":
    main()
