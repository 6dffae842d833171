"""Gather a small pretraining image set from installable packages, and record where every file came from.

Sources (all installable offline-from-the-web, only a package registry is needed):

* ``skimage.data``: the colour photographs scikit-image ships (chelsea, coffee, astronaut, ...).
* ``sklearn.datasets.load_sample_images``: china.jpg and flower.jpg.
* Debian wallpaper packages (``apt-get download``, unpacked with ``dpkg-deb``): the photographs in
  mate-backgrounds, plasma-workspace-wallpapers, gnome-backgrounds, ukui-wallpapers and the
  lomiri-wallpapers sets (each file's licence is read from its package's copyright file and recorded in
  the manifest: GPL-2+, CC-BY-SA, CC-BY).

Every image is resized so its longer side is at most ``--max-side`` pixels and written as JPEG under
``OUT/<source>/``. ``OUT/manifest.json`` lists every file with its source, package version, original
path and licence. Re-running gives the same files (sorted, deterministic).

    python apps/build_pretrain_set.py --out data/pretrain_set
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEBIAN_PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers", "gnome-backgrounds", "ukui-wallpapers",
                   "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04")
RASTER = {".jpg", ".jpeg", ".png", ".webp"}
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "colorwheel", "logo", "skin", "lily")  # data.cat() is chelsea again


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
    # the stereo pair's left view is a fine photograph too (the right one would be a near-duplicate)
    left, _, _ = data.stereo_motorcycle()
    out.append(("motorcycle_left", Image.fromarray(left), "Middlebury 2014 stereo (skimage.data)"))
    return out


def sklearn_images() -> list[tuple[str, Image.Image, str]]:
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return [(Path(f).stem, Image.fromarray(img), "scikit-learn sample images (CC BY 2.0 / public domain)")
            for f, img in zip(bunch.filenames, bunch.images)]


def licence_of(copyright_text: str, relpath: str) -> str:
    """``License`` (and ``Copyright``) of the last DEP-5 ``Files:`` stanza whose patterns match ``relpath``."""
    found = "see the package's copyright file"
    for stanza in copyright_text.split("\n\n"):
        fields: dict[str, str] = {}
        current = None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and current:
                fields[current] += " " + line.strip()
            elif ":" in line:
                current, _, value = line.partition(":")
                fields[current] = value.strip()
        if "Files" not in fields or "License" not in fields:
            continue
        for pattern in fields["Files"].split():
            # Patterns name paths of the source tree, files are installed elsewhere: match the tail too.
            if (fnmatch.fnmatch(relpath, pattern) or fnmatch.fnmatch(relpath, "*/" + pattern)
                    or Path(relpath).name == Path(pattern).name):
                holder = fields.get("Copyright", "")
                found = fields["License"].split()[0] + (f" (© {holder})" if holder else "")
                break
    return found


def debian_images(package: str, workdir: Path) -> tuple[list[tuple[str, Image.Image, str, str]], str]:
    """Download and unpack one Debian package; return its photographs and the package version.

    Plasma wallpapers come in several resolutions of the same picture: only the largest landscape one is
    kept. Screenshots, SVGs and dark variants are skipped.
    """
    subprocess.run(["apt-get", "download", package], cwd=workdir, check=True, capture_output=True)
    deb = next(workdir.glob(f"{package}_*.deb"))
    version = deb.name.split("_")[1].replace("%3a", ":")
    root = workdir / package
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    copyright_file = next(root.glob("usr/share/doc/*/copyright"), None)
    copyright_text = copyright_file.read_text(errors="replace") if copyright_file else ""

    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in RASTER and p.is_file()
                        and "screenshot" not in p.name and "/doc/" not in str(p) and "images_dark" not in str(p))
    chosen: dict[str, Path] = {}
    for path in candidates:
        # one picture in several resolutions: plasma's NAME/contents/images/WxH.jpg, mate's NAME_WxH.jpg
        group = (str(path.parent.parent.parent) if path.parent.name == "images"
                 else re.sub(r"_\d+x\d+$", "", str(path.with_suffix(""))))
        with Image.open(path) as im:
            area = im.width * im.height if im.width >= im.height else 0
        previous = chosen.get(group)
        if previous is None or area > _landscape_area(previous):
            chosen[group] = path
    out = []
    for group, path in sorted(chosen.items()):
        rel = str(path.relative_to(root))
        name = Path(group).name
        out.append((name, Image.open(path), licence_of(copyright_text, rel), rel))
    return out, version


def _landscape_area(path: Path) -> int:
    with Image.open(path) as im:
        return im.width * im.height if im.width >= im.height else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/pretrain_set"), help="output folder")
    parser.add_argument("--max-side", type=int, default=512, help="longer side of the written images")
    parser.add_argument("--no-debian", action="store_true", help="only the Python-package photos")
    args = parser.parse_args()

    if args.out.exists():
        shutil.rmtree(args.out)
    manifest = []

    def add(source: str, name: str, image: Image.Image, licence: str, **extra: str) -> None:
        dest = args.out / source / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.jpg"
        width, height = save_resized(image, dest, args.max_side)
        manifest.append({"file": str(dest.relative_to(args.out)), "source": source, "licence": licence,
                         "width": width, "height": height, **extra})

    for name, image, licence in skimage_images():
        add("skimage", name, image, licence)
    for name, image, licence in sklearn_images():
        add("sklearn", name, image, licence)
    if not args.no_debian:
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            print("apt-get/dpkg-deb not found: Debian wallpapers skipped (use --no-debian to silence)",
                  file=sys.stderr)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                for package in DEBIAN_PACKAGES:
                    try:
                        images, version = debian_images(package, Path(tmp))
                    except (subprocess.CalledProcessError, StopIteration) as err:
                        print(f"skip {package}: {err}", file=sys.stderr)
                        continue
                    for name, image, licence, rel in images:
                        add(package, name, image, licence, package_version=version, original=rel)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    by_source: dict[str, int] = {}
    for entry in manifest:
        by_source[entry["source"]] = by_source.get(entry["source"], 0) + 1
    print(f"wrote {len(manifest)} images to {args.out}: " + ", ".join(f"{k} {v}" for k, v in by_source.items()))


if __name__ == "__main__":
    main()
