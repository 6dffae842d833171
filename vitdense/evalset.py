"""The evaluation set of ``vitdense evaluate``: photos from Debian packages, composed into graded tasks.

Usage::

    from vitdense.evalset import default_data_dir, load_manifest, prepare_eval_data

    prepare_eval_data()                     # once: ~450 MB of .deb files, then ~1 min of composing
    manifest = load_manifest(default_data_dir())
    manifest["coseg"][0]["images"]          # paths relative to the data folder

``prepare_eval_data`` needs ``apt-get`` and ``dpkg-deb`` (a Debian or Ubuntu system) and a package mirror;
the downloaded packages are kept next to the data folder (``<data dir>-packages``) so a rebuild downloads
nothing. ``build_eval_set`` is the composition step alone: it takes images in memory, never downloads, and
the same seed gives byte-identical files.

What goes in (every photo's train/eval/reserved split is :mod:`vitdense.splits`' rule):

* ``tuxpaint-stamps-default``: ~800 RGBA stamps; the photographic cut-outs with a real alpha matte are
  listed in ``vitdense/data/photo_stamps.txt`` (262 of the 607 non-reserved stamps). The list was made by
  a measured criterion, then checked by eye on contact sheets. Measured on the fully opaque pixels
  (alpha >= 250) of each stamp, converted to RGBA:

  - ``flat``: the fraction whose right and lower neighbours are opaque and have exactly the same RGB.
    Drawings are painted in flat colours (median 0.5-1.0); photos have sensor noise (0.00-0.02).
  - ``texture``: on the opaque pixels eroded by 3 px, the fraction whose summed absolute Laplacian over
    R, G, B lies in [6, 120]: fine texture that photos have and that flat or smoothly shaded
    (gradient) drawings lack.
  - ``size``: the longer side of the alpha bounding box; below 64 px a cut-out would be blown up 2-4x
    in the composites (this drops 19 small photos: apples, coins, vegetables).

  A stamp is photographic if ``size >= 64`` and (``flat < 0.03`` or (``flat < 0.25`` and
  ``texture >= 0.55``)) (:func:`looks_photographic`). Against all 607 stamps labelled by eye the rule
  (size aside) agreed on 585; the eye check then moved 15 accepted drawings out (airbrushed clip art:
  Easter bunnies, party hat, whale, ...) and 7 rejected photos in (palette-quantised flowers, the planets
  on black, a mug), and left out three duplicates (two ``*_mirror.png`` and one picture stored in two
  folders) so that a picture and its copy cannot land in a k-NN bank and its query set.
* ``gcompris-qt-data``: photos inside Qt resource bundles (:func:`read_rcc`). The ``categorization``
  activity's folders of labelled photos (fishes, monuments, renewable, tools) are the labelled k-NN set
  (``others`` is a mixed bag and ``alphabets``/``numbers`` are drawings); the photo bundles of the
  ``erase`` and ``explore_*`` activities (animals, monuments, musicians; checked by eye: all photos) are
  background photos; the animal close-ups among them go only behind the pairs and the videos, since a
  co-segmentation method could rightly call a background animal the common object. Licences come from the
  README beside each file.
* the wallpapers of mate-backgrounds, plasma-workspace-wallpapers, gnome-backgrounds, ukui-wallpapers and
  lomiri-wallpapers (:func:`wallpaper_photos`), as background photos: of the 33 eval-split ones, the 12
  photographs picked by eye (:data:`WALLPAPER_PHOTOS`); the rest are abstract renders and fills.
* scikit-image's Middlebury motorcycle stereo pair with its disparity.

Nothing licensed non-commercially is used. The data folder (``DIR``) and ``DIR/manifest.json``::

    {"format": "vitdense-eval", "version": 1, "seed": 0,
     "coseg": [{"group", "images", "masks", "stamps", "boxes", "backgrounds"}, ...],
     "knn": {"gcompris": {"classes", "bank", "query"}, "stamps": {...}},
     "pairs": [{"name", "kind": "disparity", "a", "b", "disparity"},
               {"name", "kind": "homography", "a", "b", "H", "background"}, ...],
     "video": [{"name", "frames", "masks", "stamps", "background", "boxes", "occluded_frames"}, ...],
     "sources": [{"file", "from": [{"package", "version", "original", "licence"}, ...]}, ...]}

Every path is relative to ``DIR``; ``boxes`` are the [x0, y0, x1, y1) rectangles where each resized
cut-out was pasted (per video frame: object 1's, object 2's; they may reach outside the frame);
``occluded_frames`` are the frames where object 2 hides part of object 1; ``H`` maps pixel coordinates
(x, y, 1) of ``a`` to ``b`` (OpenCV convention). Video masks are indexed PNGs with the DAVIS palette
(1: the visible part of object 1, 2: object 2, which passes in front of it).
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import unquote

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .errors import DataError
from .io import to_rgb
from .splits import photo_split, stamp_split

log = logging.getLogger(__name__)

FORMAT = "vitdense-eval"
VERSION = 1
REBUILD = "(run `vitdense evaluate --prepare` to rebuild it)"

WALLPAPER_PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers", "gnome-backgrounds", "ukui-wallpapers",
                      "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04")
STAMPS_PACKAGE = "tuxpaint-stamps-default"
STAMPS_ROOT = "usr/share/tuxpaint/stamps"
GCOMPRIS_PACKAGE = "gcompris-qt-data"
GCOMPRIS_RCC = "usr/share/gcompris-qt/rcc"
GCOMPRIS_LABELLED = "categorization"
GCOMPRIS_SKIPPED_CLASSES = ("others", "alphabets", "numbers")  # a mixed bag; drawings of glyphs
GCOMPRIS_BACKGROUNDS = ("erase", "explore_farm_animals", "explore_monuments", "explore_world_animals",
                        "explore_world_music")
GCOMPRIS_ANIMAL_PHOTOS = ("erase", "explore_farm_animals", "explore_world_animals")  # close-ups of animals
# The photographs among the eval-split wallpapers, picked by eye: the other wallpapers are abstract renders,
# illustrations and near-uniform fills that make poor backgrounds (and nothing to match in a pair).
WALLPAPER_PHOTOS = frozenset({"Aqua", "Dune", "TwoWings", "Wood", "Ubuntu-Mate-Warm-no-logo", "BytheWater",
                              "ColorfulCups", "OneStandsOut", "wood-l", "friends_by_Aitzol_Berasategi",
                              "greentock_by_Peter_Nerlich", "sunset_by_Aitzol_Berasategi"})
WALLPAPER_SALIENT = frozenset({"friends_by_Aitzol_Berasategi"})  # two dogs: only behind pairs and videos
PHOTO_STAMPS_FILE = Path(__file__).resolve().parent / "data" / "photo_stamps.txt"
RASTER = {".jpg", ".jpeg", ".png", ".webp"}

COSEG_SIZE = 256      # composite side
KNN_SIZE = 224        # k-NN image side
FRAME_SIZE = (320, 240)  # (W, H) of homography pairs and video frames




def davis_palette() -> np.ndarray:
    """(256, 3) uint8: the PASCAL VOC / DAVIS label colours (0 black, 1 (128, 0, 0), 2 (0, 128, 0), ...)."""
    out = np.zeros((256, 3), np.uint8)
    for label in range(256):
        c, rgb = label, [0, 0, 0]
        for bit in range(8):  # the label's bits, interleaved over R, G, B from the most significant down
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << (7 - bit)
            c >>= 3
        out[label] = rgb
    return out


# ---------------------------------------------------------------------------------------------------------
# What goes in: in-memory sources


@dataclass(frozen=True)
class Origin:
    """Where a picture came from: Debian (or Python) package, its version, the path inside it, licence."""

    package: str
    version: str
    original: str
    licence: str

    def as_dict(self) -> dict[str, str]:
        return {"package": self.package, "version": self.version, "original": self.original,
                "licence": self.licence}


@dataclass
class Cutout:
    """A photographic cut-out: ``key`` is its stamp path under ``stamps/`` (the split key), ``category`` its
    folder (``"animals/birds"``), ``rgba`` (H, W, 4) uint8 with a real alpha matte."""

    key: str
    category: str
    rgba: np.ndarray
    origin: Origin | None = None


@dataclass
class Photo:
    """A background photo: ``key`` is ``"PACKAGE/path/in/package"`` (the split key), ``rgb`` (H, W, 3) uint8.
    ``salient``: the photo shows an object of its own (an animal close-up), which a co-segmentation method
    could rightly call the common object: such photos go behind the pairs and videos only."""

    key: str
    rgb: np.ndarray
    origin: Origin | None = None
    salient: bool = False


@dataclass
class LabelledPhoto:
    """A photo of k-NN data set ``dataset`` with class ``label``; ``key`` as for :class:`Photo`."""

    dataset: str
    label: str
    key: str
    rgb: np.ndarray
    origin: Origin | None = None


@dataclass
class StereoPair:
    """Rectified stereo views (H, W, 3) uint8 and the left view's disparity (H, W) float32 (inf: unknown)."""

    left: np.ndarray
    right: np.ndarray
    disparity: np.ndarray
    origin: Origin | None = None
    name: str = "motorcycle"


# ---------------------------------------------------------------------------------------------------------
# Debian packages


@dataclass
class DebPackage:
    """An unpacked Debian package: ``root`` holds its files, ``copyright`` its DEP-5 copyright text."""

    name: str
    version: str
    root: Path
    copyright: str = ""

    def licence(self, relpath: str) -> str:
        """Licence of the file at ``relpath`` (inside the package) by its copyright file."""
        return licence_of(self.copyright, relpath)


def _require_tools() -> None:
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise DataError(f"{' and '.join(missing)} not found: building the evaluation set needs a Debian or "
                        "Ubuntu system with apt and dpkg (install them, or prepare the data on such a machine)")


def fetch_package(name: str, cache_dir: Path | str, workdir: Path | str) -> DebPackage:
    """``apt-get download`` Debian package ``name`` into ``cache_dir`` (unless a ``name_*.deb`` is there
    already) and unpack it with ``dpkg-deb -x`` into ``workdir/name``; raises DataError when either fails."""
    _require_tools()
    cache_dir, workdir = Path(cache_dir), Path(workdir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache_dir.glob(f"{name}_*.deb"))
    if not debs:
        # download into a scratch folder first: an interrupted download must not look cached
        with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
            done = subprocess.run(["apt-get", "download", name], cwd=scratch, capture_output=True, text=True)
            got = sorted(Path(scratch).glob(f"{name}_*.deb"))
            if done.returncode != 0 or not got:
                why = (done.stderr.strip().splitlines() or ["no .deb file written"])[-1]
                raise DataError(f"apt-get download {name} failed: {why} (check the network; if apt cannot "
                                "locate the package, run `apt-get update` as root)")
            os.replace(got[0], cache_dir / got[0].name)
        debs = sorted(cache_dir.glob(f"{name}_*.deb"))
    deb = debs[-1]
    version = unquote(deb.name.split("_")[1])
    root = workdir / name
    if root.exists():
        shutil.rmtree(root)
    workdir.mkdir(parents=True, exist_ok=True)  # dpkg-deb -x makes only the last folder of the path
    done = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise DataError(f"{deb}: dpkg-deb -x failed: {why} (delete the file to download it again)")
    copyright_file = root / "usr/share/doc" / name / "copyright"
    if not copyright_file.is_file():
        copyright_file = next(root.glob("usr/share/doc/*/copyright"), copyright_file)
    text = copyright_file.read_text(errors="replace") if copyright_file.is_file() else ""
    return DebPackage(name, version, root, text)


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


def is_non_commercial(licence: str) -> bool:
    """True for licences that forbid commercial use (CC BY-NC...): such files are never used."""
    return re.search(r"\bNC\b|non-?commercial", licence, flags=re.IGNORECASE) is not None


def _landscape_area(path: Path) -> int:
    with Image.open(path) as im:
        return im.width * im.height if im.width >= im.height else 0


def wallpaper_photos(package: DebPackage) -> list[str]:
    """Paths (inside the package) of a wallpaper package's pictures, one per picture, sorted.

    Plasma wallpapers come in several resolutions of the same picture (``NAME/contents/images/WxH.jpg``),
    mate's as ``NAME_WxH.jpg``: only the largest landscape one is kept. Screenshots, documentation and dark
    variants are skipped.
    """
    root = package.root
    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in RASTER and p.is_file()
                        and "screenshot" not in p.name and "/doc/" not in str(p) and "images_dark" not in str(p))
    chosen: dict[str, Path] = {}
    for path in candidates:
        group = (str(path.parent.parent.parent) if path.parent.name == "images"
                 else re.sub(r"_\d+x\d+$", "", str(path.with_suffix(""))))
        previous = chosen.get(group)
        if previous is None or _landscape_area(path) > _landscape_area(previous):
            chosen[group] = path
    return sorted(str(path.relative_to(root)) for path in chosen.values())


# ---------------------------------------------------------------------------------------------------------
# Qt resource bundles (.rcc)


def read_rcc(path: Path | str) -> dict[str, bytes]:
    """Files of a Qt binary resource bundle: ``{"dir/sub/name.ext": bytes}`` (no leading slash).

    The format (qtbase src/tools/rcc): header ``qres``, u32 version, u32 offsets of the tree, the data and
    the names (version >= 3 adds u32 flags), all big-endian. Tree nodes are 14 bytes (22 from version 2,
    with a u64 modification time): u32 name offset, u16 flags (0x02 directory, 0x01 zlib, 0x04 zstd), then
    for a directory u32 child count and u32 index of the first child, for a file u16 country, u16 language
    and u32 data offset. A name is u16 length, u32 hash and UTF-16BE characters; a data entry is u32 length
    and bytes, zlib entries starting with the u32 uncompressed size. zstd entries need the ``zstandard``
    package; without it they are skipped (and counted in the log).
    """
    path = Path(path)
    buf = path.read_bytes()
    if len(buf) < 20 or buf[:4] != b"qres":
        raise DataError(f"{path}: not a Qt resource bundle (no 'qres' magic)")
    version, tree, data, names = struct.unpack(">4I", buf[4:20])
    node_size = 14 if version < 2 else 22
    files: dict[str, bytes] = {}
    skipped = 0

    def name_at(offset: int) -> str:
        (length,) = struct.unpack(">H", buf[names + offset:names + offset + 2])
        start = names + offset + 6  # skip the u32 hash
        return buf[start:start + 2 * length].decode("utf-16-be")

    stack = [(0, "")]  # (node index, its path); node 0 is the unnamed root directory
    while stack:
        index, prefix = stack.pop()
        offset = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", buf[offset:offset + 6])
        here = f"{prefix}/{name_at(name_offset)}".lstrip("/") if index else ""
        if flags & 0x02:
            count, first = struct.unpack(">II", buf[offset + 6:offset + 14])
            stack.extend((child, here) for child in range(first, first + count))
            continue
        (data_offset,) = struct.unpack(">I", buf[offset + 10:offset + 14])
        (length,) = struct.unpack(">I", buf[data + data_offset:data + data_offset + 4])
        blob = buf[data + data_offset + 4:data + data_offset + 4 + length]
        if flags & 0x01:
            blob = zlib.decompress(blob[4:])
        elif flags & 0x04:
            try:
                import zstandard
            except ImportError:
                skipped += 1
                continue
            blob = zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 30)
        files[here] = blob
    if skipped:
        log.warning("%s: %d zstd-compressed files skipped (pip install zstandard to read them)", path, skipped)
    return dict(sorted(files.items()))


def readme_licences(text: str) -> dict[str, str]:
    """GCompris resource READMEs: file name → ``"LICENCE (© holder)"`` from stanzas of ``Copyright:``,
    ``License:`` and ``Files:`` (the files on the same line or the lines below)."""
    out: dict[str, str] = {}
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        files: list[str] = []
        current = None
        for line in stanza.splitlines():
            match = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
            if match:
                current = match.group(1).lower()
                fields[current] = match.group(2).strip()
                if current == "files":
                    files += match.group(2).split()
            elif current == "files":
                files += line.split()
            elif current:
                fields[current] += " " + line.strip()
        if fields.get("license"):
            holder = fields.get("copyright", "")
            for name in files:
                out[Path(name).name] = fields["license"] + (f" (© {holder})" if holder else "")
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading the sources


def _decode(data: bytes | Path, mode: str, max_side: int | None = None) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im = to_rgb(im) if mode == "RGB" else im.convert(mode)
        if max_side and max(im.size) > max_side:
            scale = max_side / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        return np.asarray(im).copy()


def stamp_photo_measures(rgba: np.ndarray) -> tuple[float, float, int]:
    """(flat, texture, size) of a stamp (H, W, 4) uint8: the measures of the photo criterion (module doc)."""
    from scipy import ndimage

    rgba = np.asarray(rgba)
    alpha = rgba[..., 3]
    visible = np.nonzero(alpha > 0)
    size = int(max(np.ptp(visible[0]), np.ptp(visible[1])) + 1) if visible[0].size else 0
    rgb = rgba[..., :3].astype(np.int16)
    opaque = alpha >= 250
    inner = opaque[:-1, :-1] & opaque[1:, :-1] & opaque[:-1, 1:]
    if opaque.sum() < 50 or not inner.any():
        return 1.0, 0.0, size
    same = ((rgb[:-1, :-1] == rgb[1:, :-1]).all(-1)) & ((rgb[:-1, :-1] == rgb[:-1, 1:]).all(-1))
    flat = float((same & inner).sum() / inner.sum())
    core = ndimage.binary_erosion(opaque, iterations=3)
    if core.sum() < 50:
        return flat, 0.0, size
    lap = np.abs(np.stack([ndimage.laplace(rgb[..., c].astype(np.float32)) for c in range(3)], -1)).sum(-1)
    texture = float(((lap >= 6) & (lap <= 120))[core].mean())
    return flat, texture, size


def looks_photographic(rgba: np.ndarray) -> bool:
    """The measured photo criterion for stamps (module doc); the committed list adds the eye check."""
    flat, texture, size = stamp_photo_measures(rgba)
    return size >= 64 and (flat < 0.03 or (flat < 0.25 and texture >= 0.55))


def read_photo_stamp_list(path: Path | str = PHOTO_STAMPS_FILE) -> list[str]:
    """The stamp paths (under ``stamps/``) of ``vitdense/data/photo_stamps.txt``, comments skipped."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def load_stamp_cutouts(package: DebPackage, relpaths: Iterable[str], max_side: int = 400) -> list[Cutout]:
    """The listed stamps of an unpacked tuxpaint-stamps package as cut-outs; reserved ones are never read."""
    out = []
    root = package.root / STAMPS_ROOT
    for rel in relpaths:
        if stamp_split(rel) == "reserved":
            continue
        path = root / rel
        if not path.is_file():
            log.warning("%s: listed photo stamp %s is not in this version of the package", package.name, rel)
            continue
        licence = package.licence(f"stamps/{rel}")
        if is_non_commercial(licence):
            continue
        origin = Origin(package.name, package.version, f"{STAMPS_ROOT}/{rel}", licence)
        out.append(Cutout(rel, str(Path(rel).parent), _decode(path, "RGBA", max_side), origin))
    return out


def load_gcompris(package: DebPackage, max_side: int = 720) -> tuple[list[LabelledPhoto], list[Photo]]:
    """The labelled ``categorization`` photos and the background photos of the GCompris data package."""
    labelled: list[LabelledPhoto] = []
    backgrounds: list[Photo] = []
    for bundle in (GCOMPRIS_LABELLED,) + GCOMPRIS_BACKGROUNDS:
        rcc_rel = f"{GCOMPRIS_RCC}/{bundle}.rcc"
        files = read_rcc(package.root / rcc_rel)
        readmes = {str(Path(k).parent): readme_licences(v.decode("utf-8", "replace"))
                   for k, v in files.items() if Path(k).name == "README"}
        for inner, data in files.items():
            if Path(inner).suffix.lower() not in RASTER:
                continue
            licence = readmes.get(str(Path(inner).parent), {}).get(Path(inner).name)
            if licence is None:
                licence = package.licence(inner)
            if is_non_commercial(licence):
                continue
            key = f"{package.name}/{rcc_rel}/{inner}"
            origin = Origin(package.name, package.version, f"{rcc_rel}:/{inner}", licence)
            if bundle == GCOMPRIS_LABELLED:
                parts = Path(inner).parts
                if "images" not in parts or parts[-2] in GCOMPRIS_SKIPPED_CLASSES:
                    continue
                labelled.append(LabelledPhoto("gcompris", parts[-2], key, _decode(data, "RGB", max_side), origin))
            else:
                rgb = _decode(data, "RGB", max_side)
                if min(rgb.shape[:2]) >= 240:  # thumbnails and icons are not backgrounds
                    backgrounds.append(Photo(key, rgb, origin, salient=bundle in GCOMPRIS_ANIMAL_PHOTOS))
    return labelled, backgrounds


def wallpaper_name(relpath: str) -> str:
    """A wallpaper's name: plasma's ``NAME/contents/images/WxH.jpg`` → NAME, else the file's stem."""
    parts = Path(relpath).parts
    return parts[-4] if len(parts) >= 4 and parts[-3:-1] == ("contents", "images") else Path(relpath).stem


def load_wallpapers(package: DebPackage, split: str | None = "eval", photos_only: bool = True,
                    max_side: int = 720) -> list[Photo]:
    """A wallpaper package's pictures as background photos: those of ``split`` (all for None), and with
    ``photos_only`` only the photographs (:data:`WALLPAPER_PHOTOS`)."""
    out = []
    for rel in wallpaper_photos(package):
        key = f"{package.name}/{rel}"
        licence = package.licence(rel)
        if (split is not None and photo_split(key) != split) or is_non_commercial(licence):
            continue
        if photos_only and wallpaper_name(rel) not in WALLPAPER_PHOTOS:
            continue
        out.append(Photo(key, _decode(package.root / rel, "RGB", max_side),
                         Origin(package.name, package.version, rel, licence),
                         salient=wallpaper_name(rel) in WALLPAPER_SALIENT))
    return out


def load_motorcycle() -> StereoPair:
    """scikit-image's Middlebury 2014 motorcycle pair (left, right, disparity of the left view)."""
    import skimage
    from skimage import data

    try:
        left, right, disparity = data.stereo_motorcycle()
    except Exception as err:  # a data file missing from this install
        raise DataError(f"skimage.data.stereo_motorcycle: {err} (reinstall scikit-image)") from err
    origin = Origin("scikit-image", skimage.__version__, "skimage.data.stereo_motorcycle",
                    "Middlebury 2014 stereo data set (Scharstein et al.), as shipped with scikit-image")
    return StereoPair(np.asarray(left), np.asarray(right), np.asarray(disparity, np.float32), origin)


# ---------------------------------------------------------------------------------------------------------
# Composition helpers (pure functions on arrays)


def _fit(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (aspect kept) so the image covers ``size`` = (W, H), then centre-crop → (H, W, 3) uint8."""
    w, h = size
    im = Image.fromarray(np.asarray(rgb, np.uint8))
    scale = max(w / im.width, h / im.height)
    new = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
    if new != im.size:
        im = im.resize(new, Image.BICUBIC)
    x0, y0 = (new[0] - w) // 2, (new[1] - h) // 2
    return np.asarray(im)[y0:y0 + h, x0:x0 + w].copy()


def _trim(rgba: np.ndarray) -> np.ndarray:
    """Crop an RGBA cut-out to the bounding box of its non-zero alpha."""
    ys, xs = np.nonzero(rgba[..., 3] > 0)
    if ys.size == 0:
        return rgba
    return rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _longer_for_area(rgba: np.ndarray, area: float, cap: float) -> float:
    """Longer side (px) at which a trimmed cut-out's opaque part (alpha >= 128) covers ``area`` px, at most
    ``cap``."""
    h, w = rgba.shape[:2]
    fill = max(float((rgba[..., 3] >= 128).mean()), 1e-3)  # opaque fraction of the bounding box
    return float(min(cap, np.sqrt(area / fill * max(h, w) / min(h, w))))


def _resize_cutout(rgba: np.ndarray, longer: int) -> np.ndarray:
    """Resize a trimmed cut-out so its longer side is ``longer`` px (Pillow resizes RGBA premultiplied)."""
    h, w = rgba.shape[:2]
    scale = longer / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgba), "RGBA").resize(size, Image.BICUBIC))


def _paste(canvas: np.ndarray, rgba: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Alpha-blend ``rgba`` onto ``canvas`` (H, W, 3) float32 in place with its top-left at (x0, y0), clipped
    to the canvas; returns the cut-out's alpha on the canvas grid, (H, W) uint8."""
    H, W = canvas.shape[:2]
    h, w = rgba.shape[:2]
    alpha_full = np.zeros((H, W), np.uint8)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if cx0 >= cx1 or cy0 >= cy1:
        return alpha_full
    part = rgba[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    a = part[..., 3:].astype(np.float32) / 255.0
    region = canvas[cy0:cy1, cx0:cx1]
    region[:] = region * (1 - a) + part[..., :3].astype(np.float32) * a
    alpha_full[cy0:cy1, cx0:cx1] = part[..., 3]
    return alpha_full


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _on_grey(rgba: np.ndarray, size: int = KNN_SIZE, fill: float = 0.8) -> np.ndarray:
    """A cut-out centred on mid-grey (128), its longer side ``fill`` of the square image's side."""
    obj = _resize_cutout(_trim(rgba), round(fill * size))
    canvas = np.full((size, size, 3), 128.0, np.float32)
    _paste(canvas, obj, (size - obj.shape[1]) // 2, (size - obj.shape[0]) // 2)
    return _to_uint8(canvas)


def _bezier(points: np.ndarray, t: float) -> np.ndarray:
    """Point at ``t`` in [0, 1] of the Bézier curve with control points (K, 2) (de Casteljau)."""
    pts = np.asarray(points, np.float64)
    while len(pts) > 1:
        pts = (1 - t) * pts[:-1] + t * pts[1:]
    return pts[0]


def random_homography(rng: np.random.Generator, size: tuple[int, int] = FRAME_SIZE, max_angle: float = 30.0,
                      scale: tuple[float, float] = (0.7, 1.4), perspective: float = 0.1,
                      shift: float = 0.1) -> np.ndarray:
    """A random 3x3 homography about the image centre: rotation within ±``max_angle`` degrees, isotropic
    scale in ``scale`` (log-uniform), perspective terms that move the corners by up to ~``perspective``
    of their distance from the centre, and a translation of up to ``shift`` of the image size.
    Maps pixel coordinates (x, y, 1) of the source to the target (OpenCV convention)."""
    w, h = size
    cx, cy = (w - 1) / 2, (h - 1) / 2
    angle = np.deg2rad(rng.uniform(-max_angle, max_angle))
    s = float(np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]))))
    # the projective denominator 1 + px*x + py*y stays within 1 ± perspective at the corners
    px = rng.uniform(-1, 1) * perspective / 2 / cx
    py = rng.uniform(-1, 1) * perspective / 2 / cy
    tx, ty = rng.uniform(-shift, shift) * w, rng.uniform(-shift, shift) * h
    to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    proj = np.array([[1, 0, 0], [0, 1, 0], [px, py, 1]])
    rot = np.array([[s * np.cos(angle), -s * np.sin(angle), 0], [s * np.sin(angle), s * np.cos(angle), 0],
                    [0, 0, 1]])
    back = np.array([[1, 0, cx + tx], [0, 1, cy + ty], [0, 0, 1]])
    H = back @ rot @ proj @ to_centre
    return H / H[2, 2]


def inside_fraction(H: np.ndarray, size: tuple[int, int] = FRAME_SIZE) -> float:
    """Fraction of the source's pixels that ``H`` maps inside a target of ``size`` = (W, H)."""
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)]).astype(np.float64)
    mapped = H @ pts
    z = mapped[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = mapped[0] / z, mapped[1] / z
    ok = (z > 0) & (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    return float(ok.mean())


def _jitter(rgb: np.ndarray, valid: np.ndarray, rng: np.random.Generator, amount: float = 0.2,
            noise: float = 2.0) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by 1 ± ``amount``, plus gaussian noise (σ in grey
    levels); pixels outside ``valid`` stay black."""
    x = rgb.astype(np.float32) * rng.uniform(1 - amount, 1 + amount)
    mean = x[valid].mean() if valid.any() else 0.0
    x = (x - mean) * rng.uniform(1 - amount, 1 + amount) + mean
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = grey[..., None] + (x - grey[..., None]) * rng.uniform(1 - amount, 1 + amount)
    x = x + rng.normal(0.0, noise, x.shape).astype(np.float32)
    x[~valid] = 0
    return _to_uint8(x)


def homography_pair(a: np.ndarray, rng: np.random.Generator, min_inside: float = 0.5,
                    tries: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(b, H) for an image ``a`` of (H, W, 3): H random (:func:`random_homography`, redrawn until at least
    ``min_inside`` of a's pixels land inside b), b = a warped by H with photometric jitter."""
    import cv2

    size = (a.shape[1], a.shape[0])
    for _ in range(tries):
        H = random_homography(rng, size)
        if inside_fraction(H, size) >= min_inside:
            break
    else:
        raise AssertionError("no homography within the limits after many draws")
    warped = cv2.warpPerspective(a, H, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    valid = cv2.warpPerspective(np.full(a.shape[:2], 255, np.uint8), H, size, flags=cv2.INTER_NEAREST) > 0
    return _jitter(warped, valid, rng), H


# ---------------------------------------------------------------------------------------------------------
# Composition


class _Writer:
    """Writes the data set's files under ``root`` and records each one's origins for the manifest."""

    def __init__(self, root: Path):
        self.root = root
        self.sources: list[dict[str, Any]] = []

    def _record(self, rel: str, origins: Iterable[Origin | None]) -> str:
        seen: list[dict[str, str]] = []
        for origin in origins:
            if origin is not None and origin.as_dict() not in seen:
                seen.append(origin.as_dict())
        self.sources.append({"file": rel, "from": seen})
        return rel

    def _path(self, rel: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def jpeg(self, rel: str, rgb: np.ndarray, origins: Iterable[Origin | None]) -> str:
        Image.fromarray(rgb).save(self._path(rel), quality=95)
        return self._record(rel, origins)

    def png(self, rel: str, array: np.ndarray, origins: Iterable[Origin | None], labels: bool = False) -> str:
        im = Image.fromarray(array)
        if labels:  # an indexed ('P') PNG with the DAVIS palette
            im = Image.fromarray(array.astype(np.uint8), "P")
            im.putpalette(davis_palette().ravel().tolist())
        im.save(self._path(rel))
        return self._record(rel, origins)

    def npy(self, rel: str, array: np.ndarray, origins: Iterable[Origin | None]) -> str:
        np.save(self._path(rel), array)
        return self._record(rel, origins)


class _Deck:
    """Deals background photos from seeded shuffles, so they repeat as rarely as the data allows."""

    def __init__(self, photos: Sequence[Photo], rng: np.random.Generator):
        self.photos, self.rng, self.queue = list(photos), rng, []

    def deal(self, n: int) -> list[Photo]:
        """``n`` photos, all different (there must be at least ``n``)."""
        assert n <= len(self.photos)
        out: list[Photo] = []
        while len(out) < n:
            if not self.queue:
                self.queue = [self.photos[i] for i in self.rng.permutation(len(self.photos))]
            photo = self.queue.pop(0)
            if all(photo is not other for other in out):
                out.append(photo)
            else:
                self.queue.append(photo)
        return out


def _preview(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A label map (H, W) over an RGB image for the preview: tinted in the DAVIS colours, outlined in white."""
    from .viz import label_edges, overlay  # (viz imports torch: only here)

    labels = np.asarray(labels).astype(np.int64)
    out = overlay(rgb, labels, alpha=0.35, colors=davis_palette())
    out[label_edges(labels)] = 255
    return out


def _stage_rng(seed: int, stage: str) -> np.random.Generator:
    """One generator per stage, so that changing one stage's draws leaves the others' files alone."""
    return np.random.default_rng([seed, int(hashlib.sha1(stage.encode()).hexdigest()[:8], 16)])


def coseg_groups(cutouts: Sequence[Cutout], min_size: int = 6) -> list[tuple[str, list[Cutout]]]:
    """Group cut-outs by the deepest category folder holding at least ``min_size`` of them; a folder with
    fewer hands its cut-outs to its parent folder (top-level leftovers are dropped). Returns
    (folder, cut-outs sorted by key), most populous first, then by folder name."""
    pending: dict[str, list[Cutout]] = defaultdict(list)
    for cutout in cutouts:
        if cutout.category:
            pending[cutout.category.strip("/")].append(cutout)
    groups = []
    while pending:
        folder = max(pending, key=lambda f: (f.count("/"), f))  # deepest first, so children merge before
        items = pending.pop(folder)
        if len(items) >= min_size:
            groups.append((folder, sorted(items, key=lambda c: c.key)))
        elif "/" in folder:
            pending[folder.rsplit("/", 1)[0]].extend(items)
    return sorted(groups, key=lambda g: (-len(g[1]), g[0]))


def _compose_coseg(writer: _Writer, groups: list[tuple[str, list[Cutout]]], deck: _Deck,
                   rng: np.random.Generator, group_size: int, bar: tqdm) -> tuple[list[dict], list[np.ndarray]]:
    entries, previews = [], []
    for folder, members in groups:
        name = folder.replace("/", "_")
        chosen = [members[i] for i in sorted(rng.permutation(len(members))[:group_size])]
        entry: dict[str, Any] = {"group": name, "images": [], "masks": [], "stamps": [], "boxes": [],
                                 "backgrounds": []}
        for i, (cutout, background) in enumerate(zip(chosen, deck.deal(group_size))):
            canvas = _fit(background.rgb, (COSEG_SIZE, COSEG_SIZE)).astype(np.float32)
            obj = _resize_cutout(_trim(cutout.rgba), round(rng.uniform(0.40, 0.75) * COSEG_SIZE))
            h, w = obj.shape[:2]
            x0, y0 = int(rng.integers(0, COSEG_SIZE - w + 1)), int(rng.integers(0, COSEG_SIZE - h + 1))
            alpha = _paste(canvas, obj, x0, y0)
            image, mask = _to_uint8(canvas), np.where(alpha >= 128, 255, 0).astype(np.uint8)
            origins = [cutout.origin, background.origin]
            entry["images"].append(writer.jpeg(f"coseg/{name}/{i:02d}.jpg", image, origins))
            entry["masks"].append(writer.png(f"coseg/{name}/{i:02d}_mask.png", mask, [cutout.origin]))
            entry["stamps"].append(cutout.key)
            entry["boxes"].append([x0, y0, x0 + w, y0 + h])
            entry["backgrounds"].append(background.key)
            if i == 0:  # one per group
                previews.append(_preview(image, mask > 0))
            bar.update()
        entries.append(entry)
    return entries, previews


def _stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(key).stem)


def _knn_set(writer: _Writer, dataset: str, items: list[tuple[str, str, str, np.ndarray, Origin | None]],
             min_bank: int, min_query: int) -> dict[str, Any]:
    """items: (class, split, key, 224x224 RGB, origin) → the manifest entry; classes short of images dropped."""
    count: dict[tuple[str, str], int] = defaultdict(int)
    for label, split, *_ in items:
        count[label, split] += 1
    classes = sorted({label for label, *_ in items
                      if count[label, "train"] >= min_bank and count[label, "eval"] >= min_query})
    entry: dict[str, Any] = {"classes": classes, "bank": [], "query": []}
    used: set[str] = set()
    for label, split, key, rgb, origin in sorted(items, key=lambda it: (it[0], it[2])):
        if label not in classes:
            continue
        part = "bank" if split == "train" else "query"
        rel = f"knn/{dataset}/{part}/{label}/{_stem(key)}.jpg"
        n = 1
        while rel in used:  # two files of one class with the same name
            n += 1
            rel = f"knn/{dataset}/{part}/{label}/{_stem(key)}_{n}.jpg"
        used.add(rel)
        entry[part].append([writer.jpeg(rel, rgb, [origin]), classes.index(label)])
    return entry


def _square(rgb: np.ndarray, side: int = KNN_SIZE) -> np.ndarray:
    """Shorter side resized to ``side``, centre-cropped to side x side."""
    return _fit(rgb, (side, side))


def _render_video(background: np.ndarray, obj1: np.ndarray, obj2: np.ndarray, rng: np.random.Generator,
                  n_frames: int) -> tuple[list[np.ndarray], list[np.ndarray], list[list[list[int]]], list[int]]:
    """Frames (H, W, 3), label maps (H, W) (1: visible part of obj1, 2: obj2), per frame the two pasted
    boxes and the number of obj1 pixels obj2 hides, for one draw of the paths; obj1 and obj2 are trimmed
    RGBA cut-outs."""
    W, H = FRAME_SIZE
    pan = _fit(background, (W + W // 8, H + H // 8))
    start, end = np.array([0, 0]), np.array([pan.shape[1] - W, pan.shape[0] - H])
    if rng.random() < 0.5:
        start, end = end, start
    # Sized by area, not by the longer side: a thin cut-out (a sign post, a candy cane) at the same longer
    # side as a compact one would cover a few hundred pixels, a few tokens at stride 8.
    base1 = _longer_for_area(obj1, rng.uniform(0.06, 0.10) * W * H, 0.9 * H)  # before its scale change
    base2 = _longer_for_area(obj2, rng.uniform(0.035, 0.06) * W * H, 0.8 * H)
    amp, phase = rng.uniform(0.15, 0.30), rng.uniform(0, 2 * np.pi)
    path1 = np.stack([rng.uniform(0.35 * W, 0.65 * W, 4), rng.uniform(0.35 * H, 0.65 * H, 4)], axis=1)
    meet = _bezier(path1, 0.5)  # obj2 crosses obj1's position at mid-sequence: an occlusion
    left_to_right = rng.random() < 0.5
    x_from, x_to = (0.08 * W, 0.92 * W) if left_to_right else (0.92 * W, 0.08 * W)
    p0 = np.array([x_from, rng.uniform(0.25 * H, 0.75 * H)])
    p2 = np.array([x_to, rng.uniform(0.25 * H, 0.75 * H)])
    path2 = np.stack([p0, 2 * meet - (p0 + p2) / 2, p2])  # quadratic Bézier through meet at t = 0.5
    frames, labels, boxes, hidden = [], [], [], []
    for f in range(n_frames):
        t = f / max(n_frames - 1, 1)
        smooth = t * t * (3 - 2 * t)
        ox, oy = np.rint(start + (end - start) * smooth).astype(int)
        canvas = pan[oy:oy + H, ox:ox + W].astype(np.float32)
        frame_boxes = []
        alphas = []
        for obj, longer, centre in ((obj1, base1 * (1 + amp * np.sin(2 * np.pi * t + phase)), _bezier(path1, t)),
                                    (obj2, base2, _bezier(path2, t))):
            resized = _resize_cutout(obj, max(2, round(longer)))
            h, w = resized.shape[:2]
            x0, y0 = int(round(centre[0] - w / 2)), int(round(centre[1] - h / 2))
            alphas.append(_paste(canvas, resized, x0, y0))
            frame_boxes.append([x0, y0, x0 + w, y0 + h])
        label = np.zeros((H, W), np.uint8)
        label[alphas[0] >= 128] = 1
        label[alphas[1] >= 128] = 2
        frames.append(_to_uint8(canvas))
        labels.append(label)
        boxes.append(frame_boxes)
        hidden.append(int(((alphas[0] >= 128) & (alphas[1] >= 128)).sum()))
    return frames, labels, boxes, hidden


def _compose_videos(writer: _Writer, pool: list[Cutout], deck: _Deck, rng: np.random.Generator, n_videos: int,
                    n_frames: int, bar: tqdm) -> tuple[list[dict], list[np.ndarray]]:
    entries, previews = [], []
    order = [pool[i] for i in rng.permutation(len(pool))]
    for v in range(n_videos):
        if len(order) < 2:
            break
        obj1, obj2 = order[(2 * v) % len(order)], order[(2 * v + 1) % len(order)]
        (background,) = deck.deal(1)
        for _ in range(50):  # redraw the paths until both objects show in frame 0 and obj2 hides obj1 a while
            frames, labels, boxes, hidden = _render_video(background.rgb, _trim(obj1.rgba), _trim(obj2.rgba), rng,
                                                          n_frames)
            # both objects clearly visible in the annotated first frame (>= 2 % of it each)
            first_ok = min((labels[0] == 1).sum(), (labels[0] == 2).sum()) >= 0.02 * labels[0].size
            if first_ok and 3 <= sum(h >= 50 for h in hidden) <= max(3, n_frames // 2):
                break
        name = f"v{v:02d}"
        entry: dict[str, Any] = {"name": name, "frames": [], "masks": [], "stamps": [obj1.key, obj2.key],
                                 "background": background.key, "boxes": boxes,
                                 "occluded_frames": [f for f, h in enumerate(hidden) if h > 0]}
        for f, (frame, label) in enumerate(zip(frames, labels)):
            entry["frames"].append(writer.jpeg(f"video/{name}/{f:05d}.jpg", frame,
                                               [background.origin, obj1.origin, obj2.origin]))
            entry["masks"].append(writer.png(f"video/{name}/{f:05d}.png", label, [obj1.origin, obj2.origin],
                                             labels=True))
            if f % 10 == 0 and len(previews) < 6:
                previews.append(_preview(frame, label))
            bar.update()
        entries.append(entry)
    return entries, previews


def replace_folder(new: Path, dest: Path) -> None:
    """Put the finished folder ``new`` in the place of ``dest`` (which may exist): the old one is moved aside
    first and removed only once the new one is in place, so an interruption never leaves half a folder."""
    old = dest.parent / f".{dest.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def build_eval_set(out_dir: Path | str, cutouts: Sequence[Cutout], backgrounds: Sequence[Photo],
                   labelled: Sequence[LabelledPhoto], seed: int = 0, stereo: StereoPair | None = None,
                   progress: bool = False, max_groups: int = 8, group_size: int = 6, n_homographies: int = 6,
                   n_videos: int = 2, n_frames: int = 30, min_bank: int = 4, min_query: int = 2) -> dict[str, Any]:
    """Compose the evaluation set from in-memory sources into ``out_dir``; returns the manifest.

    The split rules (:mod:`vitdense.splits`) are applied here: reserved cut-outs are never used, eval ones
    make the co-segmentation groups, the videos and the stamp k-NN queries, train ones the stamp k-NN
    bank; only eval-split backgrounds are used (``salient`` ones not behind co-segmentation cut-outs);
    labelled photos go to the bank (train) or the queries (eval). ``min_bank``/``min_query`` apply to the
    stamp k-NN classes (labelled classes need one of each). The set is built in a sibling folder and moved
    into place at the end, so an interrupted build leaves ``out_dir`` as it was. Same inputs and seed →
    byte-identical files (with the same Pillow, libjpeg and OpenCV builds).
    """
    out_dir = Path(out_dir)
    usable = [c for c in cutouts if stamp_split(c.key) != "reserved"]
    eval_cutouts = [c for c in usable if stamp_split(c.key) == "eval"]
    eval_backgrounds = sorted((p for p in backgrounds if photo_split(p.key) == "eval"), key=lambda p: p.key)
    groups = coseg_groups(eval_cutouts, group_size)[:max_groups]
    needed = max(group_size if groups else 0, 1 if (n_homographies or n_videos) else 0)
    if len(eval_backgrounds) < needed:
        raise DataError(f"{out_dir}: {len(eval_backgrounds)} eval-split background photos, at least {needed} "
                        "needed (add background photos)")
    plain = [p for p in eval_backgrounds if not p.salient]
    coseg_backgrounds = plain if len(plain) >= group_size else eval_backgrounds

    tmp = out_dir.parent / f".{out_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        writer = _Writer(tmp)
        coseg_deck = _Deck(coseg_backgrounds, _stage_rng(seed, "coseg backgrounds"))
        deck = _Deck(eval_backgrounds, _stage_rng(seed, "backgrounds"))
        total = (len(groups) * group_size + n_homographies + n_videos * n_frames + len(labelled) + len(usable)
                 + (1 if stereo is not None else 0))
        with tqdm(total=total, desc="composing the evaluation set", disable=not progress, unit="img") as bar:
            coseg, coseg_previews = _compose_coseg(writer, groups, coseg_deck, _stage_rng(seed, "coseg"), group_size,
                                                   bar)
            knn: dict[str, Any] = {}
            by_dataset: dict[str, list] = defaultdict(list)
            for photo in labelled:
                by_dataset[photo.dataset].append((photo.label, photo_split(photo.key), photo.key,
                                                  _square(photo.rgb), photo.origin))
                bar.update()
            for dataset in sorted(by_dataset):
                knn[dataset] = _knn_set(writer, dataset, by_dataset[dataset], 1, 1)
            stamp_items = []
            for cutout in sorted(usable, key=lambda c: c.key):
                stamp_items.append((cutout.category.split("/")[0], stamp_split(cutout.key),
                                    cutout.key.replace("/", "_"), _on_grey(cutout.rgba), cutout.origin))
                bar.update()
            knn["stamps"] = _knn_set(writer, "stamps", stamp_items, min_bank, min_query)

            pairs, pair_previews = [], []
            if stereo is not None:
                name = stereo.name
                pairs.append({"name": name, "kind": "disparity",
                              "a": writer.png(f"pairs/{name}/a.png", stereo.left, [stereo.origin]),
                              "b": writer.png(f"pairs/{name}/b.png", stereo.right, [stereo.origin]),
                              "disparity": writer.npy(f"pairs/{name}/disparity.npy",
                                                      np.asarray(stereo.disparity, np.float32), [stereo.origin])})
                pair_previews += [stereo.left, stereo.right]
                bar.update()
            rng = _stage_rng(seed, "homography")
            for i in range(n_homographies):
                (background,) = deck.deal(1)
                a = _fit(background.rgb, FRAME_SIZE)
                b, H = homography_pair(a, rng)
                name = f"h{i:02d}"
                pairs.append({"name": name, "kind": "homography",
                              "a": writer.jpeg(f"pairs/{name}/a.jpg", a, [background.origin]),
                              "b": writer.jpeg(f"pairs/{name}/b.jpg", b, [background.origin]),
                              "H": [[float(v) for v in row] for row in H], "background": background.key})
                if len(pair_previews) < 6:
                    pair_previews += [a, b]
                bar.update()
            # videos prefer stamps no co-segmentation group used, so that no stamp is graded twice
            in_groups = {key for entry in coseg for key in entry["stamps"]}
            video_pool = sorted((c for c in eval_cutouts if c.key not in in_groups), key=lambda c: c.key)
            if len(video_pool) < 2:
                video_pool = sorted(eval_cutouts, key=lambda c: c.key)
            video, video_previews = _compose_videos(writer, video_pool, deck, _stage_rng(seed, "video"), n_videos,
                                                    n_frames, bar)
        from .viz import contact_sheet  # (viz imports torch: only here)

        sheet = contact_sheet(coseg_previews + pair_previews + video_previews, cols=6, cell=200)
        writer.png("preview.png", sheet, [])
        manifest = {"format": FORMAT, "version": VERSION, "seed": seed, "coseg": coseg, "knn": knn,
                    "pairs": pairs, "video": video, "sources": writer.sources}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------------------------------------------------
# The data folder


def default_data_dir() -> Path:
    """``$VITDENSE_DATA`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/vitdense/eval-v1``."""
    if os.environ.get("VITDENSE_DATA"):
        return Path(os.environ["VITDENSE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "vitdense" / f"eval-v{VERSION}"


def _listed_files(manifest: dict[str, Any]) -> list[str]:
    files: list[str] = []
    for group in manifest.get("coseg", []):
        files += group["images"] + group["masks"]
    for entry in manifest.get("knn", {}).values():
        files += [path for path, _ in entry["bank"] + entry["query"]]
    for pair in manifest.get("pairs", []):
        files += [pair[k] for k in ("a", "b", "disparity") if k in pair]
    for seq in manifest.get("video", []):
        files += seq["frames"] + seq["masks"]
    files += [source["file"] for source in manifest.get("sources", [])]
    return list(dict.fromkeys(files))


def load_manifest(data_dir: Path | str) -> dict[str, Any]:
    """Read and check ``DIR/manifest.json``: a missing folder or manifest, another format or version, or
    any listed file missing, or a mask of another size than its image, raises DataError naming it."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no evaluation data folder {REBUILD}")
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise DataError(f"{data_dir}: manifest.json is missing {REBUILD}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable manifest ({err}) {REBUILD}") from None
    found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
    if found != (FORMAT, VERSION):
        raise DataError(f"{data_dir}: manifest format {found[0]!r} version {found[1]!r}, expected {FORMAT!r} "
                        f"version {VERSION} {REBUILD}")
    try:
        files = _listed_files(manifest)
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: malformed manifest ({err!r}) {REBUILD}") from None
    for rel in files:
        if not (data_dir / rel).is_file():
            raise DataError(f"{data_dir}: listed file {rel} is missing {REBUILD}")
    _check_mask_sizes(data_dir, manifest)
    return manifest


def _check_mask_sizes(data_dir: Path, manifest: dict[str, Any]) -> None:
    """DataError naming the mask whose size (EXIF orientation applied, as to its image) is not its
    image's: a mask that does not cover its image would be scored against the wrong pixels; and naming the
    video and its first frame of another size than the video's first. Headers only."""
    from .io import image_size

    pairs = [(img, mask) for group in manifest.get("coseg", []) for img, mask in zip(group["images"], group["masks"])]
    pairs += [(img, mask) for seq in manifest.get("video", []) for img, mask in zip(seq["frames"], seq["masks"])]
    for img, mask in pairs:
        (mh, mw), (ih, iw) = image_size(data_dir / mask), image_size(data_dir / img)
        if (mh, mw) != (ih, iw):
            raise DataError(f"{data_dir / mask}: mask is {mw}x{mh} px but its image {img} is {iw}x{ih} "
                            "(EXIF orientation applied to both)")
    for seq in manifest.get("video", []):  # one size per video: propagation and J&F stack its frames
        frames = seq["frames"]
        sizes = [image_size(data_dir / frame) for frame in frames]
        odd = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
        if odd is not None:
            (h, w), (h0, w0) = sizes[odd], sizes[0]
            raise DataError(f"video {seq['name']}: frame {data_dir / frames[odd]} is {w}x{h} px but its first "
                            f"frame {frames[0]} is {w0}x{h0}; every frame of a video must have one size {REBUILD}")


def prepare_eval_data(data_dir: Path | str | None = None, seed: int = 0, progress: bool = True,
                      cache_dir: Path | str | None = None) -> Path:
    """Download the packages (kept in ``cache_dir``, default ``<data dir>-packages``), pick the photos and
    compose the evaluation set into ``data_dir`` (default :func:`default_data_dir`); returns ``data_dir``."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir.with_name(data_dir.name + "-packages")
    _require_tools()
    cache_dir.mkdir(parents=True, exist_ok=True)
    packages = (STAMPS_PACKAGE, GCOMPRIS_PACKAGE) + WALLPAPER_PACKAGES
    cutouts: list[Cutout] = []
    backgrounds: list[Photo] = []
    labelled: list[LabelledPhoto] = []
    with tempfile.TemporaryDirectory(dir=cache_dir) as work, \
            tqdm(packages, desc="packages", disable=not progress, unit="pkg") as bar:
        for name in bar:
            bar.set_postfix_str(name)
            package = fetch_package(name, cache_dir, work)
            if name == STAMPS_PACKAGE:
                cutouts = load_stamp_cutouts(package, read_photo_stamp_list())
            elif name == GCOMPRIS_PACKAGE:
                labelled, photos = load_gcompris(package)
                backgrounds += [p for p in photos if photo_split(p.key) == "eval"]
            else:
                backgrounds += load_wallpapers(package, split="eval")
            shutil.rmtree(package.root)  # unpacked packages are large; the .deb stays cached
    log.info("%d photo stamps, %d eval background photos, %d labelled photos", len(cutouts), len(backgrounds),
             len(labelled))
    build_eval_set(data_dir, cutouts, backgrounds, labelled, seed=seed, stereo=load_motorcycle(),
                   progress=progress)
    return data_dir
