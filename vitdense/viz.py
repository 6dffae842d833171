"""Pictures people look at: PCA of descriptors as RGB, heat maps, mask overlays, contact sheets.

Functions return uint8 arrays (h, w, 3); writing them is :func:`vitdense.io.save_png`'s job.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def pca_rgb(descriptors: Sequence[np.ndarray | torch.Tensor], grids: Sequence[tuple[int, int]],
            n_components: int = 3, masks: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """Project descriptors of several images on their first 3 principal components → RGB maps.

    descriptors: per image (T, D); grids: per image (h, w); masks: optional per image (T,) bool selecting
    the tokens the PCA is fitted on (e.g. salient ones). The components are fitted jointly over all images
    so colours are comparable across them, then each channel is min-max scaled to [0, 1] over all images.
    Returns per image a float (h, w, 3) array.
    """
    descs = [torch.as_tensor(d, dtype=torch.float32) for d in descriptors]
    fit = torch.cat([d[torch.as_tensor(m, dtype=torch.bool)] if masks is not None else d
                     for d, m in zip(descs, masks if masks is not None else [None] * len(descs))])
    mean = fit.mean(dim=0, keepdim=True)
    # torch.pca_lowrank is randomised; a full SVD of the (D, D) covariance is exact and cheap for D <= 7000.
    cov = (fit - mean).T @ (fit - mean) / max(1, fit.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov.double())
    comps = evecs[:, -n_components:].flip(-1).float()  # largest first
    # Fix each component's sign so the picture does not flip between runs or machines.
    signs = torch.sign(comps[comps.abs().argmax(dim=0), torch.arange(n_components)])
    comps = comps * signs
    projected = [(d - mean) @ comps for d in descs]
    allp = torch.cat(projected)
    lo, hi = allp.min(dim=0).values, allp.max(dim=0).values
    out = []
    for proj, (h, w) in zip(projected, grids):
        rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).reshape(h, w, n_components)
        out.append(rgb.numpy())
    return out


def similarity_map(desc_a: torch.Tensor, index: int, desc_b: torch.Tensor, grid_b: tuple[int, int]
                   ) -> np.ndarray:
    """Cosine similarity of token ``index`` of image A (T_a, D) to every token of image B (T_b, D) → (h, w)."""
    a = torch.nn.functional.normalize(torch.as_tensor(desc_a, dtype=torch.float32)[index], dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(desc_b, dtype=torch.float32), dim=-1)
    return (b @ a).reshape(grid_b).numpy()


def heatmap(values: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """A (h, w) array → uint8 RGB 'jet'-style colour map, min-max scaled, optionally resized to (H, W)."""
    v = np.asarray(values, dtype=np.float32)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-12)
    # piecewise-linear jet: blue → cyan → yellow → red
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    rgb = (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)
    if size is not None:
        rgb = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))
    return rgb


def upsample(grid_map: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize a (h, w) or (h, w, C) float/uint8 map to (H, W) (bilinear, or nearest for labels and cells).

    Float maps stay float (also with ``nearest``: a [0, 1] picture must not be truncated to integers).
    """
    arr = np.asarray(grid_map)
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if arr.ndim == 2:
        mode_arr = arr.astype(np.int32) if nearest and arr.dtype.kind in "biu" else arr.astype(np.float32)
        return np.asarray(Image.fromarray(mode_arr).resize((size[1], size[0]), resample))
    return np.stack([upsample(arr[..., c], size, nearest) for c in range(arr.shape[-1])], axis=-1)


def palette(n: int) -> np.ndarray:
    """n distinct colours (n, 3) uint8; label 0 is black (background), as in the PASCAL/DAVIS palette."""
    out = np.zeros((max(n, 1), 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def overlay(image: np.ndarray | Image.Image, labels: np.ndarray, alpha: float = 0.5,
            colors: np.ndarray | None = None, outline: int = 0) -> np.ndarray:
    """Blend a label map (H, W) of ints (0 = background, left untouched) over an RGB image.

    ``outline`` > 0 also draws every label boundary as a white line inside a black one (``outline`` px
    each side of the boundary): visible where the tint is not, e.g. a red tint on a red object.
    """
    if isinstance(image, Image.Image):
        from .io import to_rgb

        image = to_rgb(image)
    img = np.asarray(image).astype(np.float32)
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != img.shape[:2]:
        labels = upsample(labels, img.shape[:2], nearest=True).astype(np.int64)
    colors = palette(int(labels.max()) + 1) if colors is None else np.asarray(colors)
    out = img.copy()
    fg = labels > 0
    out[fg] = (1 - alpha) * img[fg] + alpha * colors[labels[fg]].astype(np.float32)
    if outline > 0:
        edge = label_edges(labels)
        out[_dilate(edge, outline)] = 0.0
        out[_dilate(edge, outline // 2)] = 255.0
    return out.round().astype(np.uint8)


def outline_width(size: tuple[int, int]) -> int:
    """Outline width for a picture of (H, W): about 1/300 of its longer side, so it survives thumbnails."""
    return max(1, round(max(size) / 300))


def label_edges(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels with a 4-neighbour of another label (both sides of every boundary)."""
    edge = np.zeros(labels.shape, bool)
    vert = labels[1:] != labels[:-1]
    horiz = labels[:, 1:] != labels[:, :-1]
    edge[1:] |= vert
    edge[:-1] |= vert
    edge[:, 1:] |= horiz
    edge[:, :-1] |= horiz
    return edge


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a bool mask by ``steps`` pixels (3x3 square neighbourhood per step)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        out = grown
    return out


def fit_within(image: Image.Image, max_side: int) -> Image.Image:
    """The image scaled down (aspect kept, LANCZOS) so its longer side is at most ``max_side``."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


@functools.lru_cache(maxsize=8)
def label_font(size: int = 11) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The font of every label vitdense draws: DejaVu Sans, which ships with matplotlib and has the accented
    and non-Latin letters of file names (é, ü, ø, Greek, Cyrillic) that Pillow's built-in font draws as
    boxes; Pillow's font only if matplotlib's file is missing."""
    try:
        import matplotlib

        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def contact_sheet(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, cols: int | None = None,
                  cell: int = 256, pad: int = 4) -> np.ndarray:
    """Tile RGB images (each fitted into a cell × cell box, aspect kept) into one uint8 picture."""
    n = len(images)
    if n == 0:
        return np.full((cell, cell, 3), 255, np.uint8)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    title_h = 14 if titles else 0
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + pad + title_h) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = label_font(11)
    for i, img in enumerate(images):
        im = Image.fromarray(np.asarray(img).astype(np.uint8))
        im.thumbnail((cell, cell))
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (cell + pad), pad + r * (cell + pad + title_h)
        sheet.paste(im, (x0 + (cell - im.width) // 2, y0 + title_h + (cell - im.height) // 2))
        if titles:
            draw.text((x0, y0), str(titles[i])[:40], fill="black", font=font)
    return np.asarray(sheet)


def confusion_picture(confusion: np.ndarray, classes: Sequence[str], cell: int | None = None) -> np.ndarray:
    """A labelled confusion matrix as a uint8 RGB picture: rows are the true classes, columns the predicted
    ones, each cell shaded white → blue by the fraction of its row and, when cells are large enough to read
    (up to about 40 classes), its count written in it; class names on both axes."""
    conf = np.asarray(confusion, dtype=np.int64)
    n = conf.shape[0]
    cell = cell or int(np.clip(640 // max(n, 1), 14, 56))
    font = label_font(int(np.clip(cell // 3, 9, 14)))
    names = [str(c) if len(str(c)) <= 24 else str(c)[:23] + "…" for c in classes]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = int(font.size * 1.4) if hasattr(font, "size") else 14
    label_w = int(max([probe.textlength(name, font=font) for name in names] + [probe.textlength("true", font=font)]))
    left, top, pad = label_w + line + 8, label_w + line + 8, 6
    picture = Image.new("RGB", (left + n * cell + pad, top + n * cell + pad), "white")
    draw = ImageDraw.Draw(picture)
    frac = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    light, dark = np.array([247, 251, 255.0]), np.array([8, 48, 107.0])  # white → dark blue
    for i in range(n):
        for j in range(n):
            colour = tuple(int(c) for c in np.round(light + frac[i, j] * (dark - light)))
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(200, 200, 200))
            if cell >= 18:
                text = str(conf[i, j])
                draw.text((x0 + cell / 2, y0 + cell / 2), text, font=font, anchor="mm",
                          fill="white" if frac[i, j] > 0.5 else "black")
    for i, name in enumerate(names):  # row labels: the true class, right-aligned against the matrix
        draw.text((left - 4, top + i * cell + cell / 2), name, font=font, fill="black", anchor="rm")
    for j, name in enumerate(names):  # column labels: the predicted class, written upwards
        strip = Image.new("RGB", (label_w + 4, cell), "white")
        ImageDraw.Draw(strip).text((2, cell / 2), name, font=font, fill="black", anchor="lm")
        strip = strip.rotate(90, expand=True)
        picture.paste(strip, (left + j * cell, top - 4 - strip.height))
    draw.text((left + n * cell / 2, 2), "predicted", font=font, fill="black", anchor="mt")
    strip = Image.new("RGB", (max(n * cell, 1), line), "white")
    ImageDraw.Draw(strip).text((n * cell / 2, 0), "true", font=font, fill="black", anchor="mt")
    picture.paste(strip.rotate(90, expand=True), (2, top))
    return np.asarray(picture)

