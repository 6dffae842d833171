"""Object-centric composites made afresh for every sample: photographic cut-outs pasted on background photos.

A fixed set of composites is seen again and again; here each training sample that draws a composite gets a
new one (background, crop, objects, their size, place and mirroring all drawn from the sample's own seed),
by the rule of :func:`vitdense.pretrainset.compose_one` (one object covering 10-40 % of the image, a second
one of 5-20 % with probability 0.4). Files are decoded on first use and kept, per loader worker.

Shapes: cut-outs (h, w, 4) uint8 with their alpha matte, trimmed to it; scenes (H, W, 3) uint8; a composite
(size, size, 3) uint8.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from vitdense.errors import DataError
from vitdense.io import to_rgb, upright


class _Decoded(Sequence):
    """``len()`` and ``[k]`` over files, each decoded by ``load`` on first access and then kept."""

    def __init__(self, paths: Sequence[Path], load: Callable[[Path], np.ndarray]):
        self.paths, self.load = list(paths), load
        self.cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> np.ndarray:  # type: ignore[override]
        if k not in self.cache:
            self.cache[k] = self.load(self.paths[k])
        return self.cache[k]


def _check_alpha(path: Path, im: Image.Image) -> None:
    if "A" not in im.getbands() and "transparency" not in im.info:
        raise DataError(f"{path}: a cut-out needs an alpha channel (PNG or WebP with transparency)")


def check_cutout(path: Path) -> None:
    """DataError when a cut-out file cannot be read or has no transparency (its header only: cheap)."""
    try:
        with Image.open(path) as im:
            _check_alpha(path, im)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None


def load_cutout(path: Path) -> np.ndarray:
    """A cut-out file as (h, w, 4) uint8 trimmed to its alpha; DataError when it has no transparency."""
    from vitdense.evalset import _trim

    with Image.open(path) as im:
        _check_alpha(path, im)
        rgba = np.asarray(upright(im).convert("RGBA"))
    return _trim(rgba)


def load_scene(path: Path, shorter: int) -> np.ndarray:
    """A background photo as (H, W, 3) uint8 as the shared loader reads it (upright, ...), shrunk so its
    shorter side is at most ``shorter``."""
    with Image.open(path) as im:
        im = to_rgb(im)
        scale = shorter / min(im.size)
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC,
                           reducing_gap=2.0)
        return np.asarray(im)


class Composer:
    """``make(rng)``: a new (size, size) composite of ``cutouts`` on ``backgrounds`` (files), as a PIL image."""

    def __init__(self, cutouts: Sequence[Path], backgrounds: Sequence[Path], size: int):
        if not cutouts or not backgrounds:
            raise DataError(f"composites need cut-outs and backgrounds: got {len(cutouts)} cut-out and "
                            f"{len(backgrounds)} background file(s)")
        for path in cutouts:  # before training starts, not in a loader worker mid-run
            check_cutout(path)
        self.size = size
        self.cutouts = _Decoded(cutouts, load_cutout)
        self.scenes = _Decoded(backgrounds, lambda p: load_scene(p, 2 * size))

    def make(self, rng: np.random.Generator) -> Image.Image:
        from vitdense.pretrainset import compose_one

        scene = self.scenes[int(rng.integers(len(self.scenes)))]
        rgb, _, _ = compose_one(self.cutouts, scene, rng, self.size)
        return Image.fromarray(rgb)
