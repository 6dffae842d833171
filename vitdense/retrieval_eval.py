"""Retrieval evaluations: Revisited Oxford/Paris mAP, weighted k-NN classification, copy detection.

Pure functions on rankings and descriptors (no files, no network):

* :func:`compute_map` / :func:`revisited_map`: mean average precision of Radenović et al. 2018 ("Revisiting
  Oxford and Paris", the revisitop code): junk images are removed from the ranking before the AP is
  computed, and the Easy / Medium / Hard setups decide which images count as positives or junk.
* :func:`knn_classify`: weighted k-NN of Wu et al. 2018 as in DINO's eval_knn (k=20, T=0.07).
* :func:`copy_detection_scores` and :func:`strong_augment`: copies of collection images as queries,
  top-1 accuracy and mAP (the Copydays protocol of DINO's eval_copy_detection).

Shapes: N database images, Q queries, K results per query, D descriptor channels, C classes.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from .errors import DataError


# ============================================================================ average precision

def average_precision(pos_ranks: np.ndarray, n_pos: int) -> float:
    """AP from the 0-based ranks of the retrieved positives (sorted), out of ``n_pos`` positives.

    The area under the precision-recall curve by trapezoids, as revisitop's ``compute_ap``: the positive
    at rank r (the j-th positive, 0-based) adds a trapezoid of width 1/n_pos between the precision j/r
    just before it (1 when r = 0) and (j + 1)/(r + 1) at it. Positives never retrieved add nothing.
    """
    ranks = np.asarray(pos_ranks, dtype=np.float64)
    if n_pos <= 0 or len(ranks) == 0:
        return 0.0
    j = np.arange(len(ranks), dtype=np.float64)
    before = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1))
    at = (j + 1) / (ranks + 1)
    return float(((before + at) / 2).sum() / n_pos)


@dataclass
class MapResult:
    """mAP over the queries with at least one positive; per-query AP (NaN for queries without
    positives), mean precision at each kappa and per-query precision at kappa."""

    map: float
    aps: np.ndarray  # (Q,)
    mp_at_k: np.ndarray  # (len(kappas),)
    p_at_k: np.ndarray  # (Q, len(kappas))
    kappas: tuple[int, ...]


def compute_map(ranks: np.ndarray, gnd: Sequence[Mapping[str, Sequence[int]]],
                kappas: Sequence[int] = (1, 5, 10)) -> MapResult:
    """mAP of rankings with ground truth, ignoring junk (Radenović et al. 2018, revisitop protocol).

    ranks: (N, Q) database indices, column q = the ranking of query q (best first, as revisitop stores it).
    gnd[q]: {"ok": positive database indices, "junk": indices ignored}. A junk image is removed from the
    ranking, so the positives behind it move up by one. Queries without positives get AP NaN and are
    left out of the mean (ok and junk are expected to be disjoint, as in the data sets). Precision at k counts positives within the first min(k, last positive rank)
    places of the junk-free ranking, as revisitop does.
    """
    ranks = np.asarray(ranks)
    n_queries = len(gnd)
    assert ranks.ndim == 2 and ranks.shape[1] == n_queries, (ranks.shape, n_queries)
    aps = np.full(n_queries, np.nan)
    p_at_k = np.full((n_queries, len(kappas)), np.nan)
    for q in range(n_queries):
        ok = np.asarray(gnd[q].get("ok", []), dtype=np.int64)
        if ok.size == 0:
            continue
        junk = np.asarray(gnd[q].get("junk", []), dtype=np.int64)
        column = ranks[:, q]
        pos = np.flatnonzero(np.isin(column, ok))
        junk_pos = np.flatnonzero(np.isin(column, junk))
        pos = pos - np.searchsorted(junk_pos, pos, side="left")  # junk ranked before a positive is removed
        aps[q] = average_precision(pos, ok.size)
        if pos.size:
            last = pos.max() + 1
            for j, kappa in enumerate(kappas):
                kq = min(last, kappa)
                p_at_k[q, j] = (pos + 1 <= kq).sum() / kq
        else:
            p_at_k[q] = 0.0
    valid = ~np.isnan(aps)
    mean_ap = float(aps[valid].mean()) if valid.any() else float("nan")
    mp = p_at_k[valid].mean(axis=0) if valid.any() else np.full(len(kappas), np.nan)
    return MapResult(mean_ap, aps, mp, p_at_k, tuple(kappas))


REVISITED_SETUPS = ("easy", "medium", "hard")


def revisited_gnd(gnd: Sequence[Mapping[str, Any]], setup: str) -> list[dict[str, np.ndarray]]:
    """Positives/junk of a Revisited Oxford/Paris setup from gnd entries with "easy", "hard", "junk".

    Easy: positives = easy, junk = junk + hard. Medium: positives = easy + hard, junk = junk.
    Hard: positives = hard, junk = junk + easy (Radenović et al. 2018, §3).
    """
    out = []
    for g in gnd:
        easy, hard, junk = (np.asarray(g.get(key, []), dtype=np.int64) for key in ("easy", "hard", "junk"))
        if setup == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif setup == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        elif setup == "hard":
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
        else:
            raise ValueError(f"unknown setup {setup}")
    return out


def revisited_map(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]],
                  kappas: Sequence[int] = (1, 5, 10)) -> dict[str, MapResult]:
    """:func:`compute_map` for the Easy, Medium and Hard setups; ranks (N, Q) as there."""
    return {setup: compute_map(ranks, revisited_gnd(gnd, setup), kappas) for setup in REVISITED_SETUPS}


def ranks_from_similarity(sim: np.ndarray) -> np.ndarray:
    """Similarities (Q, N) → revisitop-style rankings (N, Q): column q lists database indices best first."""
    return np.argsort(-np.asarray(sim), axis=1, kind="stable").T


class _GndUnpickler(pickle.Unpickler):
    """Reads the revisitop ground-truth pickles (dicts, lists, numpy arrays) and nothing that runs code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_revisited_gnd(path: str | Path) -> dict[str, Any]:
    """The ground truth of a Revisited Oxford/Paris data set (``gnd_roxford5k.pkl`` or the same as JSON).

    Returns {"imlist": [N names], "qimlist": [Q names], "gnd": [Q dicts with easy/hard/junk/bbx]}.
    The pickle is read with an unpickler that only accepts containers and numpy arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ground-truth file not found")
    try:
        if path.suffix == ".json":
            import json

            cfg = json.loads(path.read_text())
        else:
            with open(path, "rb") as f:
                cfg = _GndUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, ValueError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable revisitop ground-truth file ({err})") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("imlist", "qimlist", "gnd")):
        raise DataError(f"{path}: ground truth needs the keys imlist, qimlist and gnd")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise DataError(f"{path}: {len(cfg['gnd'])} gnd entries for {len(cfg['qimlist'])} queries")
    n = len(cfg["imlist"])
    for q, g in enumerate(cfg["gnd"]):
        for key in ("easy", "hard", "junk"):
            idx = np.asarray(g.get(key, []), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise DataError(f"{path}: query {q} '{key}' refers to image {idx.max()} of {n}")
    return cfg


# ============================================================================ k-NN classification

@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 k: int = 20, T: float = 0.07, num_classes: int | None = None,
                 chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-NN classification (Wu et al. 2018; DINO's eval_knn: k=20, T=0.07).

    Each test sample takes its k most cosine-similar training samples; neighbour j votes for its class
    with weight exp(s_j / T). train_feats: (N, D), train_labels: (N,) int in [0, C), test_feats: (M, D)
    → (votes (M, C), predictions (M,) = argmax of the votes). Features are L2-normalised here. Test rows
    are processed ``chunk`` at a time, so only a (chunk, N) similarity block exists at once.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    classes = int(num_classes if num_classes is not None else labels.max().item() + 1)
    k = min(k, train.shape[0])
    votes = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        block = torch.zeros(sim.shape[0], classes, dtype=torch.float32, device=train.device)
        block.scatter_add_(1, labels[top_idx], (top_sim / T).exp())
        votes.append(block)
    votes_all = torch.cat(votes) if votes else torch.zeros(0, classes)
    return votes_all, votes_all.argmax(dim=1)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, T: float = 0.07,
                 num_classes: int | None = None) -> tuple[float, float | None]:
    """(top-1, top-5) accuracy in percent of :func:`knn_classify` (top-5: label among the 5 best votes;
    None with 5 classes or fewer, see :func:`vitdense.metrics.top5_accuracy`)."""
    from .metrics import top5_accuracy

    classes = num_classes if num_classes is not None else int(max(train_labels.max(), test_labels.max())) + 1
    votes, pred = knn_classify(train_feats, train_labels, test_feats, k, T, classes)
    target = test_labels.long().to(votes.device)
    top1 = (pred == target).float().mean().item() * 100
    return top1, top5_accuracy(votes, target)


# ============================================================================ copy detection

@dataclass
class CopyDetectionResult:
    """top1: fraction of queries whose first result is a source; map: mean AP over queries (Copydays
    protocol); aps: (Q,) per-query AP; first_hit: (Q,) rank of the first positive (-1 if none in K)."""

    top1: float
    map: float
    aps: np.ndarray
    first_hit: np.ndarray


def copy_detection_scores(ids: np.ndarray, positives: Sequence[Sequence[int]]) -> CopyDetectionResult:
    """Score result lists ids (Q, K) against the positives of each query (usually one source image).

    AP is the trapezoid AP of :func:`average_precision` over the K results, as DINO's
    ``score_ap_from_ranks_1``: positives beyond rank K count as not retrieved.
    """
    ids = np.asarray(ids)
    aps = np.zeros(len(ids))
    first = np.full(len(ids), -1)
    for q, row in enumerate(ids):
        pos = np.flatnonzero(np.isin(row, np.asarray(positives[q])))
        aps[q] = average_precision(pos, len(positives[q]))
        if pos.size:
            first[q] = pos[0]
    return CopyDetectionResult(float((first == 0).mean()) if len(ids) else float("nan"),
                               float(aps.mean()) if len(ids) else float("nan"), aps, first)


def strong_augment(image: Image.Image, rng: np.random.Generator, strength: float = 1.0,
                   color: float = 1.0) -> Image.Image:
    """A "strong" copy of an image in the spirit of Copydays' strong block: crop, flip, rotation (with the empty corners cropped away),
    colour/contrast change, blur, noise and JPEG re-compression, each drawn from ``rng``.

    strength scales the geometric and degradation magnitudes (1.0: crops keep ≥ 50 % of the area, rotation
    ≤ 10°, blur σ ≤ 1.5 px, noise σ ≤ 8 grey levels, JPEG quality 30–70); color scales the photometric ones
    (1.0: brightness, contrast and saturation each ×[0.6, 1.4]).
    """
    img = image.convert("RGB")
    wid, hgt = img.size
    # crop keeping at least 1 - 0.5 * strength of the area, aspect ratio within [3/4, 4/3] of the original's
    area = rng.uniform(1 - 0.5 * strength, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)) * strength)
    cw = int(round(min(wid, wid * np.sqrt(area * ratio))))
    ch = int(round(min(hgt, hgt * np.sqrt(area / ratio))))
    x0, y0 = rng.integers(0, wid - cw + 1), rng.integers(0, hgt - ch + 1)
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    angle = rng.uniform(-10, 10) * strength
    if abs(angle) > 0.01:
        img = img.rotate(angle, resample=Image.BILINEAR, expand=False)
        # crop the largest centred rectangle of the same aspect ratio without the empty corners
        w, h = img.size
        theta = np.deg2rad(abs(angle))
        scale = min(w / (w * np.cos(theta) + h * np.sin(theta)), h / (w * np.sin(theta) + h * np.cos(theta)))
        cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
        img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(1 + rng.uniform(-0.4, 0.4) * color)
    sigma = rng.uniform(0, 1.5) * strength
    if sigma > 0.1:
        img = img.filter(ImageFilter.GaussianBlur(sigma))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0, 8 * strength, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(30, 71)))
    buf.seek(0)
    with Image.open(buf) as jpg:
        return jpg.convert("RGB")
