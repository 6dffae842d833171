"""DAVIS-2017 metrics (vitdense.davis) on hand-made masks, against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vitdense.davis import (DavisResults, boundary_f, boundary_map, boundary_tolerance, disk, evaluate_davis,
                            evaluate_sequence, region_similarity, statistics)
from vitdense.errors import DataError, ImageError


def rect(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


# ------------------------------------------------------------------------------ J

def test_region_similarity_on_rectangles():
    a = rect((20, 30), 2, 12, 3, 13)  # 100 px
    b = rect((20, 30), 7, 17, 8, 18)  # 100 px, overlap 5 × 5
    assert region_similarity(a, b) == pytest.approx(25 / 175)
    assert region_similarity(a, a) == 1.0
    empty = np.zeros((20, 30), bool)
    assert region_similarity(empty, empty) == 1.0  # both empty: 1 (official convention)
    assert region_similarity(a, empty) == 0.0 and region_similarity(empty, a) == 0.0
    per_frame = region_similarity(np.stack([a, empty, a]), np.stack([b, empty, empty]))
    np.testing.assert_allclose(per_frame, [25 / 175, 1.0, 0.0])


# ------------------------------------------------------------------------------ boundaries and F

def loop_boundary(mask):
    """seg2bmap's definition pixel by pixel: compare with the east, south and south-east neighbours that
    exist; the last row only looks east, the last column only south, the bottom-right pixel is never a
    boundary."""
    h, w = mask.shape
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            if y == h - 1 and x == w - 1:
                continue
            if y == h - 1:
                out[y, x] = mask[y, x] != mask[y, x + 1]
            elif x == w - 1:
                out[y, x] = mask[y, x] != mask[y + 1, x]
            else:
                out[y, x] = (mask[y, x] != mask[y, x + 1] or mask[y, x] != mask[y + 1, x]
                             or mask[y, x] != mask[y + 1, x + 1])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_boundary_map_equals_pixel_loop(seed):
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((17, 23)) > 0.5)
    mask[-1, 3:9] = True  # touch the last row and column
    mask[4:8, -1] = True
    np.testing.assert_array_equal(boundary_map(mask), loop_boundary(mask))


def test_disk_matches_skimage():
    from skimage.morphology import disk as sk_disk

    for r in (0, 1, 2, 5, 8):
        np.testing.assert_array_equal(disk(r), sk_disk(r).astype(np.uint8))


def edt_f(gt, pred, radius):
    """F with Euclidean distances: a boundary pixel is matched when a boundary pixel of the other mask lies
    within ``radius`` (the disk x² + y² <= r² of the official dilation)."""
    gb, pb = loop_boundary(gt), loop_boundary(pred)
    if not gb.any() and not pb.any():
        return 1.0
    if not gb.any() or not pb.any():
        return 0.0
    dist_to_gt = ndimage.distance_transform_edt(~gb)
    dist_to_pred = ndimage.distance_transform_edt(~pb)
    precision = np.mean(dist_to_gt[pb] <= radius)
    recall = np.mean(dist_to_pred[gb] <= radius)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_boundary_tolerance_is_0008_of_the_diagonal():
    assert boundary_tolerance((480, 854)) == math.ceil(0.008 * math.hypot(480, 854)) == 8
    assert boundary_tolerance((40, 60)) == 1
    assert boundary_tolerance((40, 60), bound_th=3) == 3


@pytest.mark.parametrize("shift", [0, 1, 2, 3, 6])
def test_boundary_f_equals_distance_transform_version(shift):
    shape = (200, 260)  # tolerance ceil(0.008 × 328) = 3 px
    gt = rect(shape, 40, 120, 50, 170)
    gt[60:80, 100:200] = True
    pred = np.roll(gt, shift, axis=1)
    pred[150:160, 20:40] = True  # a false positive blob
    f = boundary_f(gt, pred)
    assert f == pytest.approx(edt_f(gt, pred, boundary_tolerance(shape)))
    if shift <= 3:
        assert f > 0.8
    else:
        assert f < 0.7  # horizontal edges still match, vertical ones do not


def test_boundary_f_by_hand():
    """Two 10 × 10 squares 10 px apart on a 50 × 50 image (tolerance 1 px): no boundary pixel matched."""
    a, b = rect((50, 50), 5, 15, 5, 15), rect((50, 50), 5, 15, 25, 35)
    assert boundary_f(a, b) == 0.0
    assert boundary_f(a, a) == 1.0
    # b shifted by one pixel: its vertical edges are within 1 px, so everything matches
    assert boundary_f(b, np.roll(b, 1, axis=1)) == 1.0


def test_boundary_f_empty_mask_conventions():
    empty = np.zeros((30, 30), bool)
    a = rect((30, 30), 5, 15, 5, 15)
    assert boundary_f(empty, empty) == 1.0  # nothing to find, nothing found
    assert boundary_f(a, empty) == 0.0  # P = 1, R = 0
    assert boundary_f(empty, a) == 0.0  # P = 0, R = 1
    full = np.ones((30, 30), bool)  # a mask filling the image has no boundary either
    assert boundary_f(full, empty) == 1.0


# ------------------------------------------------------------------------------ statistics

def test_statistics_mean_recall_decay():
    v = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    mean, recall, decay = statistics(v)
    assert mean == pytest.approx(0.45)
    assert recall == pytest.approx(0.4)  # 0.9, 0.8, 0.7, 0.6 are > 0.5; 0.5 is not
    # 10 frames: bin edges round(linspace(1, 10, 5)) - 1 = 0, 2, 5, 7, 9 → first bin v[0:3], last bin v[7:10]
    assert decay == pytest.approx(np.mean([0.9, 0.8, 0.7]) - np.mean([0.2, 0.1, 0.0]))


def test_statistics_ignore_nan_in_mean_but_not_in_recall():
    v = np.array([1.0, np.nan, 0.2, 0.6])
    mean, recall, decay = statistics(v)
    assert mean == pytest.approx(0.6)
    assert recall == pytest.approx(0.5)  # NaN counts as a frame that is not > 0.5
    # 4 frames: edges round(linspace(1, 4, 5)) - 1 = 0, 1, 2, 2, 3 → bins v[0:2], v[1:3], v[2:3], v[2:4]
    assert decay == pytest.approx(1.0 - np.mean([0.2, 0.6]))


# ------------------------------------------------------------------------------ sequences

def test_evaluate_sequence_objects_void_and_skipped_frames():
    shape = (40, 60)
    gt = np.zeros((5, *shape), np.uint8)
    gt[:, 5:15, 5:15] = 1
    gt[:, 20:30, 30:50] = 2
    gt[:, 0:3, :] = 255  # void: background for the semi-supervised task
    pred = gt[1:-1].copy()
    pred[pred == 255] = 0
    pred[1][pred[1] == 2] = 0  # object 2 lost in frame 2
    pred[2, 5:15, 15:25] = 1  # object 1 too wide in frame 3: J = 100 / 200
    res = evaluate_sequence(gt, pred, "seq")
    assert [r.name for r in res] == ["seq_1", "seq_2"]
    np.testing.assert_allclose(res[0].j, [1.0, 1.0, 0.5])
    np.testing.assert_allclose(res[1].j, [1.0, 0.0, 1.0])
    np.testing.assert_allclose(res[1].f, [1.0, 0.0, 1.0])
    with pytest.raises(DataError, match="object id 3"):
        evaluate_sequence(gt, np.where(pred == 2, 3, pred), "seq")
    with pytest.raises(DataError, match="frames 1..N-2"):
        evaluate_sequence(gt, gt, "seq")


def test_results_tables():
    res = DavisResults("val")
    res.objects = evaluate_sequence(*_two_object_sequence(), "bear")
    row = res.global_row()
    j_means = [o.j.mean() for o in res.objects]
    f_means = [o.f.mean() for o in res.objects]
    assert row["J-Mean"] == pytest.approx(np.mean(j_means))
    assert row["J&F-Mean"] == pytest.approx((np.mean(j_means) + np.mean(f_means)) / 2)
    lines = res.global_csv().splitlines()
    assert lines[0] == "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay"
    assert lines[1].split(",")[1] == f"{np.mean(j_means):.3f}"
    seq_lines = res.sequence_csv().splitlines()
    assert seq_lines[0] == "Sequence,J-Mean,F-Mean"
    assert seq_lines[1] == f"bear_1,{j_means[0]:.3f},{f_means[0]:.3f}"


def _two_object_sequence():
    gt = np.zeros((6, 30, 40), np.uint8)
    for t in range(6):
        gt[t, 5:15, 2 + t: 12 + t] = 1
        gt[t, 18:26, 20:34] = 2
    pred = gt[1:-1].copy()
    pred[:, 5:15, :] = np.where(pred[:, 5:15, :] == 1, 0, pred[:, 5:15, :])
    pred[:, 5:15, 2:12] = 1  # object 1 never moves: J falls over time
    return gt, pred


def write_davis(root, sequences, with_results=None):
    """A tiny DAVIS-2017 layout: JPEGImages/480p, Annotations/480p (indexed PNGs), ImageSets/2017/val.txt."""
    from vitdense.viz import palette

    pal = palette(256).flatten().tolist()
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(sequences) + "\n")
    for seq, (frames, masks) in sequences.items():
        (root / "JPEGImages" / "480p" / seq).mkdir(parents=True)
        (root / "Annotations" / "480p" / seq).mkdir(parents=True)
        for i, (frame, mask) in enumerate(zip(frames, masks)):
            Image.fromarray(frame).save(root / "JPEGImages" / "480p" / seq / f"{i:05d}.jpg", quality=95)
            im = Image.fromarray(mask.astype(np.uint8), mode="L").convert("P")
            im.putpalette(pal)
            im.save(root / "Annotations" / "480p" / seq / f"{i:05d}.png")
    return pal


def test_evaluate_davis_folder(tmp_path):
    gt, pred = _two_object_sequence()
    frames = np.zeros((*gt.shape, 3), np.uint8)
    write_davis(tmp_path / "davis", {"bear": (frames, gt), "cows": (frames[:4], gt[:4])})
    results = tmp_path / "res"
    for seq, masks in (("bear", np.concatenate([gt[:1], pred, gt[-1:]])), ("cows", gt[:4])):
        (results / seq).mkdir(parents=True)
        for i, m in enumerate(masks):
            Image.fromarray(m).save(results / seq / f"{i:05d}.png")
    res = evaluate_davis(tmp_path / "davis", results, progress=False)
    assert [o.name for o in res.objects] == ["bear_1", "bear_2", "cows_1", "cows_2"]
    # object 1 moves one column per frame while the prediction stays: in frame t the two 10x10 squares
    # share 10 - t columns out of 10 + t
    np.testing.assert_allclose(res.objects[0].j, [(10 - t) / (10 + t) for t in range(1, 5)])
    assert all(o.j.mean() == 1.0 and o.f.mean() == 1.0 for o in res.objects[1:])
    paths = res.write(results)
    assert [p.name for p in paths] == ["global_results-val.csv", "per-sequence_results-val.csv",
                                       "davis_results-val.json"]
    assert (results / "per-sequence_results-val.csv").read_text().count("\n") == 5
    (results / "cows" / "00002.png").unlink()
    with pytest.raises(ImageError, match="cows/00002.png: result mask not found"):
        evaluate_davis(tmp_path / "davis", results, progress=False)
    with pytest.raises(DataError, match="ImageSets"):
        evaluate_davis(tmp_path / "nowhere", results, progress=False)


def test_annotations_of_another_size_are_one_error_naming_the_sequence_file_and_sizes(tmp_path):
    """An annotation whose size is not the sequence's first one is refused (as the official evaluation does),
    not resized: the error names the sequence, the first such file and both sizes, and nothing is written."""
    from conftest import assert_user_error, run_cli

    gt, pred = _two_object_sequence()
    frames = np.zeros((*gt.shape, 3), np.uint8)
    write_davis(tmp_path / "davis", {"bear": (frames, gt)})
    results = tmp_path / "res"
    (results / "bear").mkdir(parents=True)
    for i, m in enumerate(np.concatenate([gt[:1], pred, gt[-1:]])):
        Image.fromarray(m).save(results / "bear" / f"{i:05d}.png")
    annotations = tmp_path / "davis" / "Annotations" / "480p" / "bear"
    for i in (3, 4):  # two of another size: the first one is named
        Image.fromarray(gt[i, :20]).save(annotations / f"{i:05d}.png")
    with pytest.raises(DataError, match=r"sequence bear: annotation .*00003\.png is 40x20 px .* 00000\.png is 40x30"):
        evaluate_davis(tmp_path / "davis", results, progress=False)
    r = run_cli("eval-davis", "--davis-root", tmp_path / "davis", "--results", results)
    assert_user_error(r, "bear", "00003.png", "40x20", "40x30")
    assert sorted(p.name for p in results.iterdir()) == ["bear"]  # no table written
