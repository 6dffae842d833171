"""DAVIS-2017 semi-supervised evaluation: region similarity J, boundary accuracy F, their statistics.

Follows the official davis2017-evaluation (``davis2017/metrics.py``, ``utils.py``, ``evaluation.py``,
``evaluation_method.py``) so numbers and tables agree with it:

* objects are the ids 1..K with K the largest id of the first ground-truth frame; the value 255 (void)
  is set to background in the ground truth; no void mask is used in the semi-supervised task;
* the first and the last frame of every sequence are not evaluated;
* J = |pred ∩ gt| / |pred ∪ gt|, and 1 when both are empty;
* F = boundary F-measure: 1-pixel boundaries (a pixel differing from its east, south or south-east
  neighbour), matched within a disk of radius ceil(0.008 × image diagonal); when one boundary is empty
  F = 0, when both are empty F = 1;
* per object: Mean (nan-mean), Recall (fraction of frames > 0.5) and Decay (mean of the first quarter of
  the frames minus mean of the last quarter, quarters as the official ``db_statistics``);
* global: means over all objects of all sequences, J&F-Mean = (J-Mean + F-Mean) / 2; CSV tables
  ``global_results-SET.csv`` and ``per-sequence_results-SET.csv`` with 3 decimals.

Shapes: N frames, H × W pixels, K objects. One difference: the official decay casts its bin edges to
uint8, which wraps for sequences longer than 256 frames; here they are plain integers (equal up to 256).
"""
from __future__ import annotations

import csv
import io as _io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import DataError, ImageError

BOUND_TH = 0.008  # boundary tolerance as a fraction of the image diagonal (official default)
VOID = 255
GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")


# --------------------------------------------------------------------------------- per-frame metrics

def region_similarity(gt: np.ndarray, pred: np.ndarray) -> np.ndarray | float:
    """Jaccard index J of binary masks (..., H, W) → (...) (a float for single masks); 1 where the union
    is empty."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise DataError(f"J: ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    inter = np.count_nonzero(gt & pred, axis=(-2, -1))
    union = np.count_nonzero(gt | pred, axis=(-2, -1))
    j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(j) if j.ndim == 0 else j


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """1-pixel-wide boundary (H, W) bool of a binary mask: pixels that differ from their east, south or
    south-east neighbour inside the image (the official ``seg2bmap`` at the mask's own resolution)."""
    m = np.asarray(mask, dtype=bool)
    b = np.zeros_like(m)
    b[:, :-1] |= m[:, :-1] != m[:, 1:]
    b[:-1, :] |= m[:-1, :] != m[1:, :]
    b[:-1, :-1] |= m[:-1, :-1] != m[1:, 1:]
    return b


def disk(radius: int) -> np.ndarray:
    """(2r + 1, 2r + 1) uint8 structuring element of the points with x² + y² <= r² (as skimage's disk)."""
    r = int(radius)
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
    return (xx ** 2 + yy ** 2 <= r ** 2).astype(np.uint8)


def boundary_tolerance(shape: tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """Matching radius in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th × diagonal)."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(*shape)))


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure of one binary prediction (H, W) against the ground truth (H, W).

    Precision: fraction of predicted boundary pixels within the tolerance disk of a ground-truth boundary
    pixel; recall: the converse. Empty boundaries: only the prediction's → P = 1, R = 0; only the ground
    truth's → P = 0, R = 1; both → F = 1. F = 2PR / (P + R), 0 when P + R = 0.
    """
    import cv2

    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise DataError(f"F: ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    kernel = disk(boundary_tolerance(gt.shape, bound_th))
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = np.count_nonzero(pred_b), np.count_nonzero(gt_b)
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0  # P or R is 0 and the other 1
    pred_near = cv2.dilate(pred_b.astype(np.uint8), kernel) > 0
    gt_near = cv2.dilate(gt_b.astype(np.uint8), kernel) > 0
    precision = np.count_nonzero(pred_b & gt_near) / n_pred
    recall = np.count_nonzero(gt_b & pred_near) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of per-frame values (N,), as the official ``db_statistics``.

    mean ignores NaN; recall = fraction of frames with value > 0.5; decay = mean of bin 0 − mean of bin 3,
    with 4 bins whose edges are round(linspace(1, N, 5)) − 1 and bin i = values[edge_i : edge_(i+1) + 1].
    """
    values = np.asarray(values, dtype=np.float64)
    mean = _nanmean(values)
    recall = float(np.mean(values > 0.5)) if values.size else math.nan
    edges = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
    bins = [values[edges[i]: edges[i + 1] + 1] for i in range(4)]
    return mean, recall, _nanmean(bins[0]) - _nanmean(bins[3])


def _nanmean(values: np.ndarray) -> float:
    ok = values[~np.isnan(values)]
    return float(ok.mean()) if ok.size else math.nan


# --------------------------------------------------------------------------------- one sequence

@dataclass
class ObjectResult:
    """Scores of one object of one sequence: per evaluated frame J (N,) and F (N,), and their statistics."""

    sequence: str
    object_id: int
    j: np.ndarray
    f: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.sequence}_{self.object_id}"

    @property
    def j_stats(self) -> tuple[float, float, float]:
        return statistics(self.j)

    @property
    def f_stats(self) -> tuple[float, float, float]:
        return statistics(self.f)


def evaluate_sequence(gt: np.ndarray, pred: np.ndarray, sequence: str = "sequence",
                      bound_th: float = BOUND_TH) -> list[ObjectResult]:
    """Scores of every object of a sequence.

    gt: (N, H, W) ground-truth ids of all N frames (255 = void, counted as background); pred: (N - 2, H, W)
    predicted ids of frames 1..N-2 (first and last frame are not evaluated). Objects: 1..K, K = max id of
    gt[0]. DataError when pred holds an id above K (as the official evaluation).
    """
    gt = np.where(np.asarray(gt) == VOID, 0, np.asarray(gt))
    pred = np.asarray(pred)
    if gt.ndim != 3 or pred.shape != (gt.shape[0] - 2, *gt.shape[1:]):
        raise DataError(f"{sequence}: expected predictions of shape {(gt.shape[0] - 2, *gt.shape[1:])} "
                        f"(frames 1..N-2 of the ground truth {gt.shape}), got {pred.shape}")
    n_objects = int(gt[0].max())
    if pred.size and int(pred.max()) > n_objects:
        raise DataError(f"{sequence}: the results hold object id {int(pred.max())} but the first annotation "
                        f"has {n_objects} object(s)")
    gt = gt[1:-1]
    out = []
    for obj in range(1, n_objects + 1):
        g, p = gt == obj, pred == obj
        j = np.asarray(region_similarity(g, p), dtype=np.float64).reshape(-1)
        f = np.array([boundary_f(gi, pi, bound_th) for gi, pi in zip(g, p)], dtype=np.float64)
        out.append(ObjectResult(sequence, obj, j, f))
    return out


# --------------------------------------------------------------------------------- a whole data set

@dataclass
class DavisResults:
    """Scores of every object of every evaluated sequence, and the global table."""

    subset: str
    objects: list[ObjectResult] = field(default_factory=list)

    def global_row(self) -> dict[str, float]:
        """The official global table: J&F-Mean, J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay."""
        js = np.array([o.j_stats for o in self.objects], dtype=np.float64).reshape(-1, 3)
        fs = np.array([o.f_stats for o in self.objects], dtype=np.float64).reshape(-1, 3)
        jm, fm = js.mean(axis=0), fs.mean(axis=0)
        return dict(zip(GLOBAL_COLUMNS, [float((jm[0] + fm[0]) / 2), *map(float, jm), *map(float, fm)]))

    def sequence_rows(self) -> list[tuple[str, float, float]]:
        """(SEQ_OBJ, J-Mean, F-Mean) per object, in evaluation order."""
        return [(o.name, o.j_stats[0], o.f_stats[0]) for o in self.objects]

    def global_csv(self) -> str:
        row = self.global_row()
        return _csv([GLOBAL_COLUMNS, [_fmt(row[c]) for c in GLOBAL_COLUMNS]])

    def sequence_csv(self) -> str:
        return _csv([SEQUENCE_COLUMNS] + [[n, _fmt(j), _fmt(f)] for n, j, f in self.sequence_rows()])

    def to_json(self) -> dict:
        """Machine-readable: global row, per object its statistics and per-frame J and F."""
        return {"subset": self.subset, "global": self.global_row(),
                "objects": [{"name": o.name, "sequence": o.sequence, "object": o.object_id,
                             "J": dict(zip(("mean", "recall", "decay"), o.j_stats)),
                             "F": dict(zip(("mean", "recall", "decay"), o.f_stats)),
                             "J_per_frame": o.j.tolist(), "F_per_frame": o.f.tolist()} for o in self.objects]}

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """Write global_results-SET.csv, per-sequence_results-SET.csv and davis_results-SET.json (atomic)."""
        from .backbones import atomic_write
        from .io import save_json

        folder = Path(folder)
        paths = [folder / f"global_results-{self.subset}.csv", folder / f"per-sequence_results-{self.subset}.csv"]
        for path, text in zip(paths, (self.global_csv(), self.sequence_csv())):
            atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
        paths.append(folder / f"davis_results-{self.subset}.json")
        save_json(paths[-1], _json_safe(self.to_json()))
        return paths


def _fmt(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _csv(rows: Iterable[Sequence]) -> str:
    buf = _io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _json_safe(obj):
    """NaN → None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def sequence_names(root: str | os.PathLike, subset: str = "val", year: str = "2017") -> list[str]:
    """Sequence names listed in ROOT/ImageSets/YEAR/SUBSET.txt; DataError naming the file when missing."""
    path = Path(root) / "ImageSets" / year / f"{subset}.txt"
    if not path.is_file():
        raise DataError(f"{path}: not found; --davis-root must hold JPEGImages/, Annotations/ and ImageSets/{year}/")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: lists no sequences")
    return names


def read_indexed(path: Path, what: str) -> np.ndarray:
    """(H, W) ids of an indexed/grayscale PNG (:func:`vitdense.io.load_mask`); ImageError naming the file."""
    from .io import load_mask

    return load_mask(path, what)[0]


def annotation_files(root: str | os.PathLike, sequence: str, resolution: str = "480p") -> list[Path]:
    """The sorted annotation PNGs of ``ROOT/Annotations/RESOLUTION/SEQUENCE``, checked from their headers.

    DataError when there are fewer than 3 (the first and last frames are not evaluated) or when one has
    another size than the first: it names the sequence, the first such file and both sizes. Ground truth
    is never resized, as the official evaluation (which refuses such a sequence): a resampled annotation
    would be scored against pixels nobody drew.
    """
    from .io import image_size

    gt_dir = Path(root) / "Annotations" / resolution / sequence
    files = sorted(gt_dir.glob("*.png")) if gt_dir.is_dir() else []
    if len(files) < 3:
        raise DataError(f"{gt_dir}: needs at least 3 annotation PNGs (the first and last frames are not "
                        f"evaluated), found {len(files)}")
    h0, w0 = image_size(files[0])
    for path in files[1:]:
        h, w = image_size(path)
        if (h, w) != (h0, w0):
            raise DataError(f"sequence {sequence}: annotation {path} is {w}x{h} px but the sequence's first "
                            f"annotation {files[0].name} is {w0}x{h0}; every annotation of a sequence must "
                            "have the frames' size")
    return files


def evaluate_davis(root: str | os.PathLike, results: str | os.PathLike, subset: str = "val",
                   sequences: Sequence[str] | None = None, resolution: str = "480p",
                   bound_th: float = BOUND_TH, progress: bool = True) -> DavisResults:
    """Evaluate result PNGs ``RESULTS/SEQ/NAME.png`` against ``ROOT/Annotations/RESOLUTION/SEQ/NAME.png``.

    sequences: default all of ROOT/ImageSets/2017/SUBSET.txt. Ground-truth frames are the sorted PNGs of
    each annotation folder, all of one size (:func:`annotation_files`); results are read for frames 1..N-2
    by the same names.
    """
    from tqdm import tqdm

    root, results = Path(root), Path(results)
    names = list(sequences) if sequences else sequence_names(root, subset)
    out = DavisResults(subset)
    for seq in tqdm(names, desc="eval-davis", unit="seq", disable=not progress):
        gt_files = annotation_files(root, seq, resolution)
        gt = np.stack([read_indexed(p, "annotation") for p in gt_files])
        preds = []
        for p in gt_files[1:-1]:
            pred = read_indexed(results / seq / p.name, "result mask")
            if pred.shape != gt.shape[1:]:
                raise ImageError(f"{results / seq / p.name}: result mask is {pred.shape[1]}x{pred.shape[0]} "
                                 f"but the annotation is {gt.shape[2]}x{gt.shape[1]}")
            preds.append(pred)
        out.objects.extend(evaluate_sequence(gt, np.stack(preds), seq, bound_th))
    return out
