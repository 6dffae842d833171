"""Evaluate a backbone against a randomly initialised one of the same architecture (the floor).

The figures of the bundled model's card (``vitdense/weights/README.md``), reproducible offline:

1. Correspondences: PCK@0.05/0.10 of best-buddy matches on scikit-image's Middlebury motorcycle stereo
   pair against its ground-truth disparity (``apps/eval_correspondence.py``'s protocol).
2. k-NN classification: weighted k-NN (k=20, T=0.07, as DINO's eval_knn) top-1 accuracy on
   scikit-learn's handwritten digits (1797 images, 10 classes; first 1000 = bank, rest = queries),
   upsampled to 64 px, with the CLS token of the last layer.

    python apps/eval_backbone.py                                # the bundled backbone
    python apps/eval_backbone.py --weights runs/x/teacher_backbone.pth --json out.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pretrain.knn import knn_accuracy
from vitdense import DescriptorConfig, ViTExtractor, default_model_name, get_spec, global_descriptors, read_weights


def digits_knn(extractor: ViTExtractor, size: int = 64, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 % of weighted k-NN on sklearn's digits, bank = first 1000 images, queries = the other 797."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float()[:, None]  # (N, 1, 8, 8) in [0, 1]
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(extractor.mean).view(1, 3, 1, 1)
    std = torch.tensor(extractor.std).view(1, 3, 1, 1)
    batch_all = (images.expand(-1, 3, -1, -1) - mean) / std
    config = DescriptorConfig(descriptor="cls", load_size=None)
    feats = torch.cat([global_descriptors(extractor, batch_all[i:i + 256], config)
                       for i in range(0, len(batch_all), 256)])
    labels = torch.from_numpy(digits.target).long()
    result = knn_accuracy(feats[:1000], labels[:1000], feats[1000:], labels[1000:], 10, k, temperature)
    return result["top1"]


def motorcycle_pck(extractor: ViTExtractor) -> dict[str, float]:
    """PCK of best-buddy correspondences on the motorcycle stereo pair (see apps/eval_correspondence.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_correspondence",
                                                  Path(__file__).with_name("eval_correspondence.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.evaluate_motorcycle(extractor)


def build(weights: str | None, model: str | None, random_init: bool, stride: int) -> ViTExtractor:
    """The backbone to evaluate, or (``random_init``) a random one of the same architecture and seed 0."""
    if not random_init:
        return ViTExtractor(model if weights is None else None, stride=stride, weights=weights, device="cpu")
    from vitdense import IMAGENET_MEAN, IMAGENET_STD, create_vit

    if weights is not None:
        _, meta = read_weights(weights)
        arch, kwargs = meta["arch"], meta.get("kwargs", {})
    else:
        spec = get_spec(model or default_model_name())
        arch, kwargs = spec.arch, dict(spec.kwargs)
    torch.manual_seed(0)
    vit = create_vit(arch, **kwargs)
    ext = ViTExtractor("random-init", stride=stride, model=vit, device="cpu")
    ext.mean, ext.std = IMAGENET_MEAN, IMAGENET_STD
    return ext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="weights file (default: the bundled backbone)")
    parser.add_argument("--model", help="backbone name instead of --weights")
    parser.add_argument("--stride", type=int, default=4, help="stride for the correspondence evaluation")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    results = {}
    for label, random_init in (("trained", False), ("random init", True)):
        start = time.perf_counter()
        ext = build(args.weights, args.model, random_init, args.stride)
        pck = motorcycle_pck(ext)
        knn_ext = build(args.weights, args.model, random_init, ext.p)
        knn = digits_knn(knn_ext)
        results[label] = {"model": ext.model_type, **pck, "digits_knn_top1": knn,
                          "seconds": time.perf_counter() - start}
        print(f"{label}: {results[label]}", flush=True)
    keys = [k for k in results["trained"] if k not in ("model", "seconds")]
    print("\n| backbone | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for label, row in results.items():
        print(f"| {label} | " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k])
                                           for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
