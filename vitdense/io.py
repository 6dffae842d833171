"""Reading images and writing results: one-line errors for bad files, atomic writes for outputs."""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .backbones import atomic_write
from .errors import ConfigError, DataError, ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def natural_key(path: str | os.PathLike) -> list:
    """Sort key that orders frame_2 before frame_10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


# What a transparent pixel shows: white, as an image viewer or a web page shows it on its default background.
BACKGROUND = (255, 255, 255)
EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (``ImageOps.exif_transpose``), mode and palette
    kept; the image itself when it has no tag (or orientation 1). The rule of every reader: images
    (:func:`to_rgb`), masks (:func:`load_mask`), cut-outs."""
    if image.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1):
        return ImageOps.exif_transpose(image)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of a PIL image as a person sees it in an image viewer.

    * EXIF orientation applied (``ImageOps.exif_transpose``): pixel coordinates of everything vitdense
      writes (masks, points) refer to the upright image;
    * 16-bit integer images (``I;16``, ``I;16B``, ``I;16L``; ``I`` when its values fit in 0..65535, as
      Pillow opens 16-bit PNGs and TIFFs) scaled by their bit depth, ``v * 255 / 65535``; other ``I``
      images and float (``F``) images outside [0, 1] stretched min-max to 0..255; ``F`` in [0, 1] times 255;
    * transparency (``RGBA``, ``LA``, ``PA``, palette or grayscale with a transparent colour) composited
      on :data:`BACKGROUND` (white);
    * palette, 1-bit, CMYK, YCbCr and the rest converted by Pillow.

    The common case (RGB, no orientation tag) costs one copy, as ``image.convert("RGB")`` does.
    """
    image = upright(image)
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) uint8 of a high-bit-depth grayscale array: see :func:`to_rgb` for the rule."""
    arr = arr.astype(np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if mode.startswith("I") and lo >= 0 and hi <= 65535:
        scaled = arr * (255 / 65535)
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = arr * 255
    else:  # no bit depth to go by: the value range is the image's own
        scaled = (arr - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file as :func:`load_image` returns it (EXIF orientation applied), from
    its header without decoding the pixels; ImageError names the file when it is not an image. (A PNG's
    orientation is seen when its eXIf chunk precedes the pixels, where Pillow and cameras write it.)"""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                exif = Image.Image.getexif(im)  # PNG's own getexif would decode the pixels to look further
                swap = exif.get(EXIF_ORIENTATION, 1) in _TRANSPOSED
                return (im.width, im.height) if swap else (im.height, im.width)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        kind = "not an image file" if isinstance(err, UnidentifiedImageError) else f"unreadable ({err})"
        raise ImageError(f"{path}: {kind}") from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image fully (so corrupt data fails here, not later) as RGB, as a person sees it (see
    :func:`to_rgb`: upright, 16-bit scaled, transparency on white); ImageError names the file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, expected an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        kind = "not an image file" if isinstance(err, UnidentifiedImageError) else f"corrupt image ({err})"
        raise ImageError(f"{path}: {kind}") from None


# Modes whose pixel values are ids: palette indices, 8-bit grey, 1-bit, 16-bit (and 32-bit) integers.
LABEL_MODES = ("P", "L", "1", "I;16", "I;16L", "I;16B", "I")


def _open_mask(path: Path, what: str, grey: bool) -> tuple[Image.Image, list[int] | None]:
    """The mask file upright (EXIF orientation applied, as :func:`to_rgb` does for its image) and its
    palette (768 ints) when indexed; ImageError names the file."""
    if not path.is_file():
        raise ImageError(f"{path}: {what} not found" + (" (is a folder)" if path.is_dir() else ""))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                pal = im.getpalette() if im.mode == "P" else None
                turned = upright(im)
                turned = turned.copy() if turned is im else turned
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        kind = "not an image file" if isinstance(err, UnidentifiedImageError) else f"unreadable ({err})"
        raise ImageError(f"{path}: {what} is {kind}") from None
    if turned.mode not in LABEL_MODES:
        if not grey:
            raise ImageError(f"{path}: a {turned.mode} image; the {what} must be an indexed (palette) or "
                             "grayscale PNG whose pixel values are object ids (0 = background)")
        turned = turned.convert("L")
    if pal is not None:
        pal = list(pal) + [0] * (768 - len(pal))
    return turned, pal


def _ids(im: Image.Image, path: Path) -> np.ndarray:
    arr = np.array(im)
    if im.mode == "1":
        return arr.astype(np.uint8)
    if im.mode == "I":  # a 16-bit PNG in older Pillow, a 32-bit TIFF: ids must fit 16 bits
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError(f"{path}: label values {arr.min()}..{arr.max()}; ids must be 0..65535")
        return arr.astype(np.uint16)
    return arr if arr.dtype in (np.uint8, np.uint16) else arr.astype(np.uint16)


def load_mask(path: str | os.PathLike, what: str = "mask", grey: bool = False
              ) -> tuple[np.ndarray, list[int] | None]:
    """A mask or label map file → ((H, W) ids, its palette as 768 ints or None), the one reader of masks.

    Read with the same orientation rule as images (:func:`to_rgb`): EXIF orientation applied, so a mask
    lines up with its (upright) image whether both carry the camera's tag or neither does. Ids are the
    file's values: palette indices as they are (never converted to colours), uint8 for palette, grayscale
    and 1-bit (0/1) files, uint16 for 16-bit label maps. Other modes (RGB, ...) are an ImageError naming the
    file, or with ``grey`` converted to 8-bit grey (a mask drawn in colour). ``what`` names the file in
    errors ("first-frame mask").
    """
    path = Path(path)
    im, pal = _open_mask(path, what, grey)
    return _ids(im, path), pal


def load_binary_mask(path: str | os.PathLike, what: str = "mask") -> np.ndarray:
    """(H, W) bool object pixels of a mask file read by :func:`load_mask`: the non-zero ids of a palette,
    1-bit or 16-bit file; values >= 128 of a grayscale (or colour, converted to grey) one, so a 0/255 mask
    with soft edges keeps its object."""
    path = Path(path)
    im, _ = _open_mask(path, what, grey=True)
    ids = _ids(im, path)
    return ids >= 128 if im.mode == "L" else ids > 0


def array_to_pil(arr: np.ndarray) -> Image.Image:
    """An RGB PIL image of an (H, W) or (H, W, 3|4) array: uint8 as is, uint16 scaled by 255/65535, floats
    with values in [0, 1] times 255, other numbers clipped to 0..255; an alpha channel composited on
    :data:`BACKGROUND`."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint16:
        arr = np.round(arr * (255 / 65535))
    elif arr.dtype.kind == "f" and arr.size and arr.max() <= 1.0:
        arr = arr * 255
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files of a folder (by suffix), naturally sorted; DataError if the folder is missing or empty."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: folder not found")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    files = folder.rglob("*") if recursive else folder.iterdir()
    images = sorted((p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
    if not images:
        raise DataError(f"{folder}: no image files found ({', '.join(IMAGE_SUFFIXES[:5])}, ...)")
    return images


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Paths given on a command line: image files as they are, folders expanded to their images."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out.extend(list_images(path))
        elif not path.exists():
            raise ImageError(f"{path}: file not found")
        else:
            out.append(path)
    if not out:
        raise DataError("no input images given")
    return out


def record_path(path: str | os.PathLike) -> str:
    """How outputs record a file they name: its absolute path (a record must not depend on the folder it
    was written or is read from)."""
    return os.path.abspath(path)


def load_images(paths: Sequence[str | os.PathLike], strict: bool = False
                ) -> tuple[list[Path], list[Image.Image], list[tuple[Path, str]]]:
    """Load many images; unreadable ones are skipped and returned as (path, reason) unless ``strict``."""
    good, images, skipped = [], [], []
    for path in paths:
        try:
            images.append(load_image(path))
            good.append(Path(path))
        except ImageError as err:
            if strict:
                raise
            skipped.append((Path(path), str(err).split(": ", 1)[-1]))
    return good, images, skipped


# -------------------------------------------------------------------------------------------- writing

def save_png(path: str | os.PathLike, image: np.ndarray | Image.Image, palette: Sequence[int] | None = None) -> None:
    """Write a PNG atomically. uint8 arrays (h, w) or (h, w, 3); float arrays in [0, 1] are scaled."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8) if arr.dtype.kind == "f" \
                else arr.astype(np.uint8)
        image = Image.fromarray(arr)
    if palette is not None:
        image = image.convert("P") if image.mode != "P" else image
        image.putpalette(list(palette))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (numpy scalars and arrays converted)."""
    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

    text = json.dumps(data, indent=2, default=default)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write a compressed NPZ atomically (the temp name keeps the .npz suffix numpy insists on)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def write_outputs(writers: Sequence[Callable[[], None]]) -> None:
    """Run output writers in order (each one atomic): used after all computation succeeded."""
    for write in writers:
        write()


def check_output(path: str | os.PathLike, folder: bool, option: str = "--out") -> Path:
    """``path`` as a Path when it is, or can be created as, a writable folder (``folder``) or file; else a
    ConfigError ``PATH: problem`` that names ``option``. Creates nothing, so a command checks its output
    location before any computation (the CLI's ``--out`` options all go through here)."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise ConfigError(f"{path}: exists and is not a folder ({option} needs a folder)")
        if not folder and path.is_dir():
            raise ConfigError(f"{path}: is a folder ({option} needs a file name)")
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest existing folder above is where
        parent = parent.parent                              # anything gets created
    if not parent.is_dir():
        raise ConfigError(f"{path}: cannot be written, {parent} is a file and not a folder ({option})")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{path}: cannot be written, no write permission in {parent} ({option})")
    return path


def output_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Output name per input image, the one rule of every command that writes per-image files: the file's
    stem, with its index in ``paths`` appended where stems repeat (x.jpg, x.png -> x_0, x_1); a name that
    still collides (a third file x_1.jpg) gets a further ``_N``."""
    stems = [Path(p).stem for p in paths]
    names = [s if stems.count(s) == 1 else f"{s}_{i}" for i, s in enumerate(stems)]
    seen: set[str] = set()
    for i, name in enumerate(names):
        n, unique = 2, name
        while unique in seen:
            unique, n = f"{name}_{n}", n + 1
        seen.add(unique)
        names[i] = unique
    return names


def describe_skipped(skipped: Sequence[tuple[Any, str]] | Sequence[Any], cap: int = 5) -> str:
    """``a.jpg (reason), b.png (reason) and 3 more``: every skipped file up to ``cap``, then a count."""
    items = [f"{item[0]} ({item[1]})" if isinstance(item, tuple) else str(item) for item in skipped]
    more = f" and {len(items) - cap} more" if len(items) > cap else ""
    return ", ".join(items[:cap]) + more


OUTPUTS_MANIFEST = ".vitdense-outputs.json"


def replace_outputs(out_dir: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Record the top-level entries (files or folders) of ``out_dir`` this run wrote, and delete those the
    previous run recorded there and this one did not write: re-running a command into its folder leaves
    only the new run's per-image files, never a stale mix. Entries no vitdense run recorded (a user's own
    files) are never touched; a stale folder with a record of its own (a DAVIS sequence's) loses only what
    that record names, and goes only when nothing else is left in it. Returns the names removed."""
    import shutil

    out = Path(out_dir)
    new = sorted(set(names))
    manifest = out / OUTPUTS_MANIFEST
    try:
        old = json.loads(manifest.read_text()).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        old = []
    removed = []
    for name in old:
        if name in new or not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            continue
        path = out / name
        if path.is_dir() and not path.is_symlink() and (path / OUTPUTS_MANIFEST).is_file():
            replace_outputs(path, [])
            (path / OUTPUTS_MANIFEST).unlink(missing_ok=True)
            if any(path.iterdir()):
                continue  # the user's own files are in it
            path.rmdir()
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
        removed.append(name)
    save_json(manifest, {"outputs": new})
    return removed
