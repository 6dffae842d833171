"""Device crops: each operation on the images that draw it (``GPUMultiCrop``) against every operation on every
image with a mask per slot (the way ``GPUMultiCrop`` worked before, written out here as the baseline).

    python benchmarks/bench_gpu_augment.py                  # CPU: batch 32, 2x96 + 6x48 px
    python benchmarks/bench_gpu_augment.py --device cuda --batch 128 --global-size 224 --local-size 96 --local-crops 10

Prints one table: milliseconds per batch of views (median of --repeats), the ratio to the baseline, and the
largest difference between the two outputs (they must agree to float rounding).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data import MultiCropAugmentation  # noqa: E402
from pretrain.gpu_augment import (_COL, GPUMultiCrop, _gray, _JITTER, _per_image, crop_resize,  # noqa: E402
                                  gaussian_blur, params_to_tensor)
from vitdense.backbones import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


class MaskedMultiCrop(GPUMultiCrop):
    """The baseline: in each of the 4 jitter slots every operation runs on all images, kept by a mask."""

    def view(self, images, p_cpu, p):
        import math

        def on(column):
            return p[:, _COL[column]] > 0.5

        x = crop_resize(images, p, int(p_cpu[0, _COL["size"]]))
        jitter_on = p_cpu[:, _COL["jitter"]] > 0.5
        for slot in range(4):
            order = p_cpu[:, _COL[f"order{slot}"]].long()
            order_dev = p[:, _COL[f"order{slot}"]].long()
            for k, (name, op) in enumerate(_JITTER.items()):
                if (jitter_on & (order == k)).any():
                    chosen = on("jitter") & (order_dev == k)
                    x = torch.where(_per_image(chosen), op(x, p[:, _COL[name]]), x)
        if (p_cpu[:, _COL["grayscale"]] > 0.5).any():
            x = torch.where(_per_image(on("grayscale")), _gray(x).expand_as(x), x)
        sigma = p_cpu[:, _COL["blur_sigma"]]
        if (sigma > 0).any():
            radius = max(1, math.ceil(3.0 * float(sigma.max())))
            blurred = gaussian_blur(x, p[:, _COL["blur_sigma"]], radius)
            x = torch.where(_per_image(p[:, _COL["blur_sigma"]] > 0), blurred, x)
        if (p_cpu[:, _COL["solarize"]] > 0.5).any():
            x = torch.where(_per_image(on("solarize")) & (x >= 128 / 255), 1.0 - x, x)
        return (x - self.mean) / self.std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--global-size", type=int, default=96)
    parser.add_argument("--local-size", type=int, default=48)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    source = args.global_size * 3 // 2
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, source, source), generator=gen, dtype=torch.uint8).to(device)
    aug = MultiCropAugmentation(args.global_size, args.local_size, args.local_crops)
    params = torch.stack([params_to_tensor(aug.sample_params(random.Random(i), source, source))
                          for i in range(args.batch)])
    if device.type == "cuda":
        params = params.pin_memory()

    def timed(crops: GPUMultiCrop) -> tuple[float, list[torch.Tensor]]:
        out = crops(images, params)  # warm-up
        seconds = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = crops(images, params)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds), out

    base_s, base_out = timed(MaskedMultiCrop(IMAGENET_MEAN, IMAGENET_STD))
    ours_s, ours_out = timed(GPUMultiCrop(IMAGENET_MEAN, IMAGENET_STD))
    diff = max(float((a - b).abs().max()) for a, b in zip(ours_out, base_out))
    print(f"{args.batch} images, 2x{args.global_size} + {args.local_crops}x{args.local_size} px views, {device}")
    print("| implementation | ms per batch | ratio to baseline |")
    print("|---|---|---|")
    print(f"| every operation on every image, masked (baseline) | {1000 * base_s:.1f} | 1.00 |")
    print(f"| each operation on its own images (GPUMultiCrop) | {1000 * ours_s:.1f} | {ours_s / base_s:.2f} |")
    print(f"largest difference between the outputs: {diff:.2e}")


if __name__ == "__main__":
    main()
