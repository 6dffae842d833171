"""Extractor throughput and peak memory: vitdense vs dino-vit-features (the peer), same weights, same run.

ViT-S/8 (random weights, the same for both), stride 4, key facet, layer 11, with and without log-bin, at
224 px and 448 px (shorter side; 448 px gives ~12k tokens). Every case runs in a fresh subprocess so its
peak resident memory (ru_maxrss) is its own; the two implementations' processes stay alive side by side
and take turns, one image each, so a shared machine's changing speed hits both alike. Images/s counts
preprocess + descriptor extraction of a real photo (skimage's chelsea).

    python benchmarks/bench_extract.py                      # vitdense only
    python benchmarks/bench_extract.py --peer /path/to/dino-vit-features
    python benchmarks/bench_extract.py --device cuda --sizes 224 448
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from _isolated import TurnTaker, serve  # noqa: E402  (benchmarks/ is the script's folder)

HERE = Path(__file__).resolve().parent


def build_case(impl: str, size: int, use_bin: bool, device: str, peer: str | None,
               dtype: torch.dtype = torch.float32) -> tuple[Callable[[], None], dict]:
    """Inside the case's process: the extractor and the work timed per image; ``info`` gets the token count.

    ``dtype``: vitdense's forward precision (``ViTExtractor(dtype=...)``); the peer always runs in fp32."""
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

        extractor = ViTExtractor("dino_vits8", stride=4, model=vit, device=device, dtype=dtype)
    info: dict = {}

    def one() -> None:
        batch, _ = extractor.preprocess(str(image), size)
        with torch.no_grad():
            desc = extractor.extract_descriptors(batch.to(device), layer=11, facet="key", bin=use_bin)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        info["tokens"] = desc.shape[2]

    return one, info


def measure(size: int, use_bin: bool, args: argparse.Namespace) -> dict[str, dict]:
    """Time ours and the peer turn by turn (order alternating per round) → impl → {seconds: [...], ...}."""
    impls = ["ours"] + (["peer"] if args.peer else [])
    takers = {impl: TurnTaker(__file__, [impl, size, int(use_bin), "--device", args.device]
                              + (["--peer", args.peer] if args.peer else []), f"{impl} {size} px")
              for impl in impls}
    results: dict[str, dict] = {impl: {"seconds": []} for impl in impls}
    try:
        for impl in impls:
            reply = takers[impl].ask("ready", args.timeout)
            results[impl].update(reply or {"failed": True})
        for round_ in range(args.repeats):
            for impl in impls if round_ % 2 == 0 else impls[::-1]:
                res = results[impl]
                if res.get("timeout") or res.get("failed"):
                    continue
                reply = takers[impl].ask("go", args.timeout)
                if reply is None or reply.get("timeout"):
                    res.update(reply or {"failed": True})
                else:
                    res["seconds"].append(reply["seconds"])
        for impl in impls:
            res = results[impl]
            if not (res.get("timeout") or res.get("failed")):
                res.update(takers[impl].ask("stop", args.timeout) or {"failed": True})
    finally:
        for taker in takers.values():
            taker.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", help="path to a dino-vit-features checkout (never committed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--bin", choices=("both", "on", "off"), default="both", help="log-binned cases to run")
    parser.add_argument("--repeats", type=int, default=5, help="timed images per implementation and case")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per image before giving up")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        impl, size, use_bin = args.serve
        info: dict = {}

        def setup() -> Callable[[], None]:
            one, case_info = build_case(impl, int(size), bool(int(use_bin)), args.device, args.peer)
            info.update(case_info=case_info)
            return one

        def extra() -> dict:
            gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
            return dict(info["case_info"], gpu_mb=gpu_mb)

        serve(setup, extra)
        return

    print(f"device {args.device}, ViT-S/8 stride 4, key facet layer 11, {args.repeats} timed images per "
          f"implementation and case, taken turn by turn\n")
    header = f"{'size':>5} {'bin':>5} {'tokens':>7} {'img/s':>8} {'peak MB':>8}"
    if args.peer:
        header += f" {'peer img/s':>11} {'peer MB':>8} {'speed-up (min-max)':>19} {'mem ratio':>10}"
    print(header)
    for size in args.sizes:
        for use_bin in {"both": (False, True), "on": (True,), "off": (False,)}[args.bin]:
            res = measure(size, use_bin, args)
            ours = res["ours"]
            if not ours["seconds"] or "peak_mb" not in ours:
                print(f"{size:>5} {str(use_bin):>5} failed or timed out", flush=True)
                continue
            row = (f"{size:>5} {str(use_bin):>5} {ours['tokens']:>7} "
                   f"{1 / statistics.median(ours['seconds']):>8.3f} {ours['peak_mb']:>8.0f}")
            if args.peer:
                theirs = res["peer"]
                if theirs.get("timeout"):
                    row += f" {'> ' + str(args.timeout) + ' s':>11}"
                elif not theirs["seconds"] or "peak_mb" not in theirs:
                    row += f" {'failed':>11}"
                else:
                    # per-round ratios: each pair of images was timed back to back
                    ratios = [p / o for o, p in zip(ours["seconds"], theirs["seconds"])]
                    spread = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                    row += (f" {1 / statistics.median(theirs['seconds']):>11.3f} {theirs['peak_mb']:>8.0f} "
                            f"{spread:>19} {ours['peak_mb'] / theirs['peak_mb']:>9.2f}x")
            print(row, flush=True)
    print("\nimg/s = 1 / median seconds per image; speed-up = median over rounds of peer seconds / our "
          "seconds (higher is better); mem ratio = our peak RSS / peer peak RSS (lower is better)")


if __name__ == "__main__":
    main()
