"""Gather a small pretraining image set from installable packages, and record where every file came from.

Sources (all installable offline-from-the-web, only a package registry is needed):

* ``skimage.data``: the colour photographs scikit-image ships (chelsea, coffee, astronaut, ...).
* ``sklearn.datasets.load_sample_images``: china.jpg and flower.jpg.
* Debian wallpaper packages (``apt-get download``, unpacked with ``dpkg-deb``): the photographs in
  mate-backgrounds, plasma-workspace-wallpapers, gnome-backgrounds, ukui-wallpapers and the
  lomiri-wallpapers sets (each file's licence is read from its package's copyright file and recorded in
  the manifest: GPL-2+, CC-BY-SA, CC-BY).

Only training-split photos are used (:func:`select_pretraining`): a photo whose key (``PACKAGE/path`` or
``skimage/NAME``) has ``vitdense.photo_split(key) == "eval"`` belongs to the evaluation set of
``vitdense evaluate`` and is left out, and so is the motorcycle stereo pair (an evaluation pair); Tux Paint
stamps (none are used today) would need ``vitdense.stamp_split(path) == "train"``, reserved ones never.

Every image is resized so its longer side is at most ``--max-side`` pixels and written as JPEG under
``OUT/<source>/``. ``OUT/manifest.json`` lists every file with its source, package version, original
path and licence. Re-running gives the same files (sorted, deterministic).

    python apps/build_pretrain_set.py --out data/pretrain_set
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from vitdense import (DataError, fetch_package, is_non_commercial, photo_split, stamp_split, wallpaper_name,
                      wallpaper_photos)

DEBIAN_PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers", "gnome-backgrounds", "ukui-wallpapers",
                   "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "colorwheel", "logo", "skin", "lily")  # data.cat() is chelsea again
STAMPS_PREFIX = "tuxpaint-stamps-default/usr/share/tuxpaint/stamps/"
EVALUATION_ONLY = ("skimage/motorcycle_left", "skimage/motorcycle_right")  # the stereo pair of vitdense evaluate


def select_pretraining(keys: Iterable[str]) -> list[str]:
    """The keys, in order, of the photos pretraining may use: training-split ones only.

    A key is ``PACKAGE/path/in/package`` (``skimage/NAME`` for scikit-image's photos). Tux Paint stamps
    (``tuxpaint-stamps-default/usr/share/tuxpaint/stamps/...``) follow the stamp rule (train only, never
    reserved or eval), every other photo the photo rule; the motorcycle stereo pair is evaluation-only.
    """
    out = []
    for key in keys:
        if key in EVALUATION_ONLY:
            continue
        if key.startswith(STAMPS_PREFIX):
            if stamp_split(key[len(STAMPS_PREFIX):]) == "train":
                out.append(key)
        elif photo_split(key) == "train":
            out.append(key)
    return out


def save_resized(image: Image.Image, dest: Path, max_side: int) -> tuple[int, int]:
    """Write ``image`` as RGB JPEG with its longer side at most ``max_side``; returns (width, height)."""
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    image.save(dest, quality=92)
    return image.size


def skimage_images() -> list[tuple[str, Image.Image, str]]:
    """(name, image, licence note) of the colour photos in skimage.data (grey ones are skipped)."""
    from skimage import data

    out = []
    for name in SKIMAGE_PHOTOS:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            array = np.asarray(loader())
        except Exception as err:  # a data file missing from this install: note and go on
            print(f"skip skimage.data.{name}: {err}", file=sys.stderr)
            continue
        if array.ndim != 3:
            continue
        if array.dtype != np.uint8:
            array = (255 * (array - array.min()) / max(np.ptp(array), 1e-8)).astype(np.uint8)
        out.append((name, Image.fromarray(array[..., :3]), "scikit-image data (see skimage/data/README)"))
    # (not the motorcycle stereo pair: it is an evaluation pair of vitdense evaluate)
    return out


def sklearn_images() -> list[tuple[str, Image.Image, str]]:
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return [(Path(f).stem, Image.fromarray(img), "scikit-learn sample images (CC BY 2.0 / public domain)")
            for f, img in zip(bunch.filenames, bunch.images)]


def debian_images(package: str, cache_dir: Path, workdir: Path
                  ) -> tuple[list[tuple[str, Image.Image, str, str]], str]:
    """Download and unpack one Debian wallpaper package; return (name, image, licence, path in package) of
    its pictures (one resolution each: ``vitdense.wallpaper_photos``) and the package version."""
    pkg = fetch_package(package, cache_dir, workdir)
    out = []
    for rel in wallpaper_photos(pkg):
        licence = pkg.licence(rel)
        if is_non_commercial(licence):
            continue
        out.append((wallpaper_name(rel), Image.open(pkg.root / rel), licence, rel))
    return out, pkg.version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/pretrain_set"), help="output folder")
    parser.add_argument("--max-side", type=int, default=512, help="longer side of the written images")
    parser.add_argument("--no-debian", action="store_true", help="only the Python-package photos")
    args = parser.parse_args()

    if args.out.exists():
        shutil.rmtree(args.out)
    manifest = []
    skipped = []

    def add(source: str, name: str, image: Image.Image, licence: str, key: str, **extra: str) -> None:
        if not select_pretraining([key]):
            skipped.append(key)
            return
        dest = args.out / source / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.jpg"
        width, height = save_resized(image, dest, args.max_side)
        manifest.append({"file": str(dest.relative_to(args.out)), "source": source, "key": key,
                         "licence": licence, "width": width, "height": height, **extra})

    for name, image, licence in skimage_images():
        add("skimage", name, image, licence, f"skimage/{name}")
    for name, image, licence in sklearn_images():
        add("sklearn", name, image, licence, f"sklearn/{name}")
    if not args.no_debian:
        with tempfile.TemporaryDirectory() as tmp:
            for package in DEBIAN_PACKAGES:
                try:
                    images, version = debian_images(package, Path(tmp), Path(tmp))
                except DataError as err:
                    print(f"skip {package}: {err}", file=sys.stderr)
                    continue
                for name, image, licence, rel in images:
                    add(package, name, image, licence, f"{package}/{rel}", package_version=version, original=rel)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"left out {len(skipped)} evaluation-split photos", file=sys.stderr)
    by_source: dict[str, int] = {}
    for entry in manifest:
        by_source[entry["source"]] = by_source.get(entry["source"], 0) + 1
    print(f"wrote {len(manifest)} images to {args.out}: " + ", ".join(f"{k} {v}" for k, v in by_source.items()))


if __name__ == "__main__":
    main()
