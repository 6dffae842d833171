"""Score co-segmentation against ground-truth masks: mean Jaccard and precision, and NMI / ARI for parts.

Runs ``vitdense cosegment`` (or ``part-cosegment`` with ``--parts``) on a folder of images, or reads masks
already written by it (``--pred``), and compares each ``NAME_mask.png`` with the ground-truth file of the
same stem in GT (any image suffix; ``NAME_mask``/``NAME_gt`` also match). Object ground truth: non-zero =
foreground. Part ground truth: integer labels, 0 = background; NMI and ARI are computed on the ground
truth's foreground pixels. Predictions are resized (nearest) to the ground truth when sizes differ.

    python apps/eval_cosegmentation.py IMAGES GT                          # runs vitdense cosegment
    python apps/eval_cosegmentation.py IMAGES GT --parts -- --parts 4     # part co-segmentation
    python apps/eval_cosegmentation.py IMAGES GT --pred OUT --json scores.json
    python apps/eval_cosegmentation.py IMAGES GT -- --weights w.pth --load-size 224   # options after --
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vitdense import (IMAGE_SUFFIXES, DataError, VitdenseError, jaccard, list_images, load_mask, natural_key,
                      part_scores, precision)


def find_gt(gt_dir: Path, stem: str) -> Path | None:
    """The ground-truth file for an image stem: STEM.*, STEM_mask.* or STEM_gt.* (first found)."""
    for name in (stem, f"{stem}_mask", f"{stem}_gt"):
        for suffix in IMAGE_SUFFIXES:
            path = gt_dir / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def read_labels(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask/label PNG as (H, W) ints (vitdense's mask reader: upright, palette indices and 16-bit ids
    kept, RGB read as grey), resized nearest."""
    labels = load_mask(path, "ground-truth mask", grey=True)[0]
    if size is not None and labels.shape != tuple(size):
        labels = np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))
    return labels.astype(np.int64)


def evaluate(images: Path, gt_dir: Path, pred_dir: Path, parts: bool) -> dict:
    """Per-image and mean scores of the masks in pred_dir against gt_dir."""
    rows = []
    for image in list_images(images):
        pred_path = pred_dir / f"{image.stem}_mask.png"
        gt_path = find_gt(gt_dir, image.stem)
        if gt_path is None or not pred_path.is_file():
            rows.append({"image": image.name, "missing": "ground truth" if gt_path is None else "prediction"})
            continue
        gt = read_labels(gt_path)
        pred = read_labels(pred_path, gt.shape)
        row = {"image": image.name, "jaccard": jaccard(pred > 0, gt > 0), "precision": precision(pred > 0, gt > 0)}
        if parts:
            row["nmi"], row["ari"] = part_scores(pred, gt)
        rows.append(row)
    scored = [r for r in rows if "missing" not in r]
    if not scored:
        raise DataError(f"{gt_dir}: no ground truth matches the images of {images} (expected NAME.png per image)")
    keys = ["jaccard", "precision"] + (["nmi", "ari"] if parts else [])
    mean = {k: float(np.mean([r[k] for r in scored])) for k in keys}
    return {"mean": mean, "n_scored": len(scored), "n_missing": len(rows) - len(scored),
            "images": sorted(rows, key=lambda r: natural_key(r["image"]))}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", type=Path, help="Folder of images.")
    parser.add_argument("gt", type=Path, help="Folder of ground-truth masks (same stems).")
    parser.add_argument("--pred", type=Path, default=None, help="Folder of NAME_mask.png already written.")
    parser.add_argument("--parts", action="store_true", help="Part co-segmentation (adds NMI and ARI).")
    parser.add_argument("--out", type=Path, default=None, help="Where the co-segmentation writes (default: temp).")
    parser.add_argument("--json", type=Path, default=None, help="Write the scores here.")
    args = parser.parse_args(argv)
    try:
        pred_dir = args.pred
        with tempfile.TemporaryDirectory() as tmp:
            if pred_dir is None:
                from vitdense.cli import main as cli

                pred_dir = args.out or Path(tmp) / "pred"
                command = "part-cosegment" if args.parts else "cosegment"
                try:
                    cli.main([command, str(args.images), "--out", str(pred_dir), *extra], standalone_mode=False)
                except SystemExit as err:  # a VitdenseError already printed by the CLI
                    return int(err.code or 0)
            scores = evaluate(args.images, args.gt, pred_dir, args.parts)
    except VitdenseError as err:
        print(f"eval_cosegmentation: error: {err}", file=sys.stderr)
        return 2
    width = max(len(r["image"]) for r in scores["images"])
    keys = list(scores["mean"])
    print(f"{'image':<{width}}  " + "  ".join(f"{k:>9}" for k in keys))
    for row in scores["images"]:
        cells = [f"{row[k]:9.4f}" for k in keys] if "missing" not in row else [f"(no {row['missing']})"]
        print(f"{row['image']:<{width}}  " + "  ".join(cells))
    print(f"{'mean':<{width}}  " + "  ".join(f"{scores['mean'][k]:9.4f}" for k in keys))
    if args.json is not None:
        args.json.write_text(json.dumps(scores, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
