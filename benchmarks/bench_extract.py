"""Extractor throughput and peak memory: vitdense vs dino-vit-features (the peer), same weights, same run.

ViT-S/8 (random weights, the same for both), stride 4, key facet, layer 11, with and without log-bin, at
224 px and 448 px (shorter side; 448 px gives ~12k tokens). Every case runs in a fresh subprocess so its
peak resident memory (ru_maxrss) is its own. Images/s counts preprocess + descriptor extraction of a
real photo (skimage's chelsea).

    python benchmarks/bench_extract.py                      # vitdense only
    python benchmarks/bench_extract.py --peer /path/to/dino-vit-features
    python benchmarks/bench_extract.py --device cuda --sizes 224 448
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from _isolated import run_isolated  # noqa: E402  (benchmarks/ is the script's folder)

HERE = Path(__file__).resolve().parent


def run_case(impl: str, size: int, use_bin: bool, device: str, repeats: int, peer: str | None) -> dict:
    """Inside the subprocess: build the extractor, warm up, time ``repeats`` images; print JSON."""
    sys.path.insert(0, str(HERE.parent))
    from PIL import Image
    from skimage import data

    from vitdense import create_vit

    image = HERE / ".chelsea.png"
    if not image.exists():
        Image.fromarray(data.chelsea()).save(image)
    torch.manual_seed(0)
    vit = create_vit("vit_small_patch8_224")
    if impl == "peer":
        from benchmarks._peer import import_peer

        module = import_peer(peer, vit)
        extractor = module.ViTExtractor("dino_vits8", stride=4, device=device)
    else:
        from vitdense import ViTExtractor

        extractor = ViTExtractor("dino_vits8", stride=4, model=vit, device=device)

    def one() -> int:
        batch, _ = extractor.preprocess(str(image), size)
        with torch.no_grad():
            desc = extractor.extract_descriptors(batch.to(device), layer=11, facet="key", bin=use_bin)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return desc.shape[2]

    tokens = one()  # warm-up (also builds caches, as a user's first image would)
    start = time.perf_counter()
    for _ in range(repeats):
        one()
    seconds = (time.perf_counter() - start) / repeats
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return dict(impl=impl, size=size, bin=use_bin, tokens=tokens, img_per_s=1 / seconds, peak_mb=peak_mb,
                gpu_mb=gpu_mb)


def measure(impl: str, size: int, use_bin: bool, args: argparse.Namespace) -> dict | None:
    return run_isolated(__file__, [impl, size, int(use_bin), "--device", args.device, "--repeats", args.repeats]
                        + (["--peer", args.peer] if args.peer else []), args.timeout, f"{impl} {size} px")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", help="path to a dino-vit-features checkout (never committed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per case before giving up")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        impl, size, use_bin = args.case
        print(json.dumps(run_case(impl, int(size), bool(int(use_bin)), args.device, args.repeats, args.peer)))
        return

    print(f"device {args.device}, ViT-S/8 stride 4, key facet layer 11, {args.repeats} timed images per case\n")
    header = f"{'size':>5} {'bin':>4} {'tokens':>7} {'img/s':>8} {'peak MB':>8}"
    if args.peer:
        header += f" {'peer img/s':>11} {'peer MB':>8} {'speed-up':>9} {'mem ratio':>10}"
    print(header)
    for size in args.sizes:
        for use_bin in (False, True):
            ours = measure("ours", size, use_bin, args)
            if ours is None or ours.get("timeout"):
                print(f"{size:>5} {str(use_bin):>4} failed or timed out")
                continue
            row = (f"{size:>5} {str(use_bin):>4} {ours['tokens']:>7} {ours['img_per_s']:>8.3f} "
                   f"{ours['peak_mb']:>8.0f}")
            if args.peer:
                theirs = measure("peer", size, use_bin, args)
                if theirs is None:
                    row += f" {'failed':>11}"
                elif theirs.get("timeout"):
                    row += f" {'> ' + str(args.timeout) + 's':>11}"
                else:
                    row += (f" {theirs['img_per_s']:>11.3f} {theirs['peak_mb']:>8.0f} "
                            f"{ours['img_per_s'] / theirs['img_per_s']:>8.2f}x "
                            f"{ours['peak_mb'] / theirs['peak_mb']:>9.2f}x")
            print(row, flush=True)
    print("\nspeed-up = our images/s / peer images/s (higher is better); "
          "mem ratio = our peak RSS / peer peak RSS (lower is better)")


if __name__ == "__main__":
    main()
