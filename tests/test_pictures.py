"""The pictures people read: a labelled confusion matrix with counts, file names with accents in contact
sheets, outlined propagation overlays and the report card's video example (prediction against truth)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vitdense.viz import confusion_picture, contact_sheet

BORDER = (200, 200, 200)  # the grey of the confusion matrix's cell borders


def edges(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label, written plainly."""
    h, w = labels.shape
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                if 0 <= y + dy < h and 0 <= x + dx < w and labels[y + dy, x + dx] != labels[y, x]:
                    out[y, x] = True
    return out


def test_confusion_picture_labels_the_classes_and_writes_the_counts():
    confusion = np.array([[3, 1, 0, 0], [0, 4, 0, 0], [1, 0, 2, 1], [0, 0, 0, 12]])
    classes = ["cat", "dog", "cow", "owl"]
    pic = confusion_picture(confusion, classes)
    assert pic.dtype == np.uint8 and pic.ndim == 3
    border = np.all(pic == BORDER, axis=2)
    ys, xs = np.nonzero(border)
    top, left, bottom, right = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    cell_h, cell_w = (bottom - top) / 4, (right - left) / 4
    assert cell_h == cell_w and cell_h >= 20  # square cells large enough to read, not a 256-px blur
    fraction = confusion / confusion.sum(1, keepdims=True)
    for i in range(4):
        for j in range(4):
            y0, x0 = int(top + i * cell_h), int(left + j * cell_w)
            inner = pic[y0 + 2:int(y0 + cell_h) - 2, x0 + 2:int(x0 + cell_w) - 2].astype(int)
            fill = inner[1, 1]
            text = np.abs(inner - fill).sum(axis=2) > 150  # pixels of the count written in the cell
            assert text.sum() >= 6, (i, j)  # every cell shows its count, zeros too
            ty, tx = np.nonzero(text)
            assert abs(ty.mean() - inner.shape[0] / 2) < 4 and abs(tx.mean() - inner.shape[1] / 2) < 4
            # darker cells for larger fractions of the row (white → blue)
            assert abs(int(fill.sum()) - round(3 * 250 - fraction[i, j] * (3 * 250 - 163))) < 30
    # "12" has more ink than "3"; equal counts look alike
    ink = lambda i, j: (np.abs(pic[int(top + i * cell_h) + 3:int(top + (i + 1) * cell_h) - 3,
                                   int(left + j * cell_w) + 3:int(left + (j + 1) * cell_w) - 3].astype(int)
                               - pic[int(top + i * cell_h) + 3, int(left + j * cell_w) + 3]).sum(2) > 150).sum()
    assert ink(3, 3) > ink(0, 0) and ink(0, 2) == ink(1, 0)
    # class names: ink left of every row and above every column, and different names look different
    rows = [pic[int(top + i * cell_h) + 2:int(top + (i + 1) * cell_h) - 2, :left - 2] for i in range(4)]
    cols = [pic[:top - 2, int(left + j * cell_w) + 2:int(left + (j + 1) * cell_w) - 2] for j in range(4)]
    for strip in rows + cols:
        assert (strip.min(axis=2) < 100).sum() >= 10
    assert not np.array_equal(rows[0], rows[1]) and not np.array_equal(cols[0], cols[1])


def test_contact_sheet_titles_draw_accented_letters():
    """café vs cafe: the titles differ only above the letters (the accent), where a font without é would
    draw a box in the letter's place."""
    img = [np.full((40, 40, 3), 200, np.uint8)]
    with_accent = contact_sheet(img, ["café_über.jpg"], cell=160)
    plain = contact_sheet(img, ["cafe_uber.jpg"], cell=160)
    strip_a, strip_p = with_accent[:18].astype(int), plain[:18].astype(int)
    differ = np.nonzero(np.abs(strip_a - strip_p).sum(axis=2) > 60)[0]
    assert len(differ) > 0
    ink = np.nonzero((strip_p.min(axis=2) < 128).any(axis=1))[0]  # rows the plain title covers
    x_height_top = ink.min() + (ink.max() - ink.min()) // 3
    assert differ.max() < x_height_top + 2, "letters themselves differ: a glyph is missing"


def test_propagation_overlay_outlines_the_objects():
    from vitdense.commands.video import THUMB, _colors, _thumbnail

    rng = np.random.default_rng(0)
    frame = np.full((160, 240, 3), (200, 30, 30), np.uint8)  # a red object on red: a red tint alone vanishes
    frame = np.clip(frame + rng.integers(-10, 10, frame.shape), 0, 255).astype(np.uint8)
    y, x = np.mgrid[:160, :240]
    labels = ((y - 80) ** 2 + (x - 100) ** 2 < 40 ** 2).astype(np.uint8)
    labels[20:40, 180:220] = 2
    out = _thumbnail(frame, labels, _colors(None, [1, 2]))
    assert out.shape == frame.shape
    edge = edges(labels)
    assert np.all(out[edge] == 255)  # a white line on the boundary ...
    ring = np.zeros_like(edge)
    ring[1:] |= edge[:-1]
    ring[:-1] |= edge[1:]
    ring &= ~edge
    assert (out[ring].max(axis=1) == 0).mean() > 0.9  # ... inside a black one
    far = np.ones_like(edge)
    for dy in range(-2, 3):
        far &= ~np.roll(np.roll(edge, dy, 0), dy, 1)
    assert not np.any(np.all(out[far] == 255, axis=1))  # nothing else is drawn white
    big = np.repeat(np.repeat(frame, 3, 0), 3, 1)  # larger than a thumbnail: outlined after shrinking
    small = _thumbnail(big, np.repeat(np.repeat(labels, 3, 0), 3, 1), _colors(None, [1, 2]))
    assert max(small.shape[:2]) == THUMB and np.all(small == 255, axis=2).sum() > 0.8 * edge.sum()


def test_report_card_video_example_shows_prediction_against_ground_truth(tmp_path):
    from conftest import tiny_vit
    from test_evaluate import ColourExtractor, write_tiny_eval_set

    from vitdense.evaluate import EvalSettings, run_video
    from vitdense.video import read_mask

    root = write_tiny_eval_set(tmp_path / "eval")
    manifest = json.loads((root / "manifest.json").read_text())
    ext = ColourExtractor("colour", stride=4, model=tiny_vit(depth=2), device="cpu")
    result = run_video(ext, root, manifest, EvalSettings(load_size=64, knn_load_size=64), progress=False)
    assert result.pictures
    seq = manifest["video"][0]
    for picture, title in result.pictures:
        index = int(title.split("#")[1])
        truth = read_mask(root / seq["masks"][index])[0]
        frame = np.asarray(Image.open(root / seq["frames"][index]).convert("RGB"))
        green = np.all(picture == (40, 255, 40), axis=2)
        assert np.array_equal(green, edges(truth)), title  # ground truth outlined in green, nothing else
        # both objects (ids 1 and 2) are predicted in the same red, not in per-object colours
        for obj in (1, 2):
            inside = (truth == obj) & ~green
            tint = picture[inside].astype(int) - frame[inside].astype(int)
            assert (tint[:, 0] >= tint[:, 1]).mean() > 0.8 and (tint[:, 2] >= -5).mean() > 0.8, (title, obj)
