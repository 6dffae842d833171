"""Segmentation metrics: Jaccard and precision of binary masks, NMI and ARI of part labels.

Masks are (H, W) arrays (non-zero = foreground); label maps are (H, W) or (P,) integer arrays. Every
function takes one image; average over images yourself (the co-segmentation literature reports the mean of
the per-image values).

Also the weighted k-nearest-neighbour classifier on frozen features (DINO's ``eval_knn``, Wu et al. 2018),
on tensors: N bank (train) samples, M query samples, D feature channels, C classes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two binary masks; 1.0 when both are empty."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    assert pred.shape == gt.shape, (pred.shape, gt.shape)
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def precision(pred: np.ndarray, gt: np.ndarray) -> float:
    """Fraction of pixels labelled correctly (foreground and background), the "P" of the co-segmentation
    benchmarks (Rubinstein et al. 2013, "Unsupervised joint object discovery and segmentation")."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    assert pred.shape == gt.shape, (pred.shape, gt.shape)
    return float((pred == gt).mean())


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts (n_a, n_b) of co-occurring labels of two labelings of the same elements."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    assert a.shape == b.shape, (a.shape, b.shape)
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max(initial=-1) + 1, ib.max(initial=-1) + 1), np.int64)
    np.add.at(table, (ia, ib), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(pred: np.ndarray, gt: np.ndarray) -> float:
    """Normalised mutual information, I(pred; gt) / mean(H(pred), H(gt)) (arithmetic mean, as scikit-learn).

    Two labelings with a single cluster each count as identical (1.0).
    """
    table = contingency(pred, gt)
    n = table.sum()
    if n == 0:
        return 1.0
    h_a, h_b = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
    if h_a == 0 and h_b == 0:
        return 1.0
    nz = table > 0
    joint = table[nz] / n
    outer = np.outer(table.sum(axis=1), table.sum(axis=0))[nz] / n**2
    mutual = float((joint * (np.log(joint) - np.log(outer))).sum())
    denom = (h_a + h_b) / 2
    return 0.0 if denom == 0 else max(0.0, mutual / denom)


def ari(pred: np.ndarray, gt: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985): pair-counting agreement corrected for chance."""
    table = contingency(pred, gt).astype(np.float64)
    n = table.sum()

    def pairs(x: np.ndarray) -> np.ndarray:
        return x * (x - 1) / 2

    sum_cells = pairs(table).sum()
    sum_a, sum_b = pairs(table.sum(axis=1)).sum(), pairs(table.sum(axis=0)).sum()
    total = pairs(np.array(n))
    if total == 0:
        return 1.0
    expected = sum_a * sum_b / total
    maximum = (sum_a + sum_b) / 2
    if maximum == expected:  # both labelings trivial (one cluster, or all singletons)
        return 1.0
    return float((sum_cells - expected) / (maximum - expected))


def part_scores(pred: np.ndarray, gt: np.ndarray, foreground_only: bool = True) -> tuple[float, float]:
    """(NMI, ARI) of predicted part labels against ground-truth part labels (0 = background).

    foreground_only: score the pixels the ground truth calls foreground, as in the part co-segmentation
    literature (SCOPS, Hung et al. 2019; Amir et al. 2021), so the background does not dominate.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    assert pred.shape == gt.shape, (pred.shape, gt.shape)
    if foreground_only:
        keep = gt > 0
        pred, gt = pred[keep], gt[keep]
    return nmi(pred, gt), ari(pred, gt)

@torch.no_grad()
def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, exclude_self: bool = False,
               chunk: int = 1024) -> torch.Tensor:
    """Class votes (M, C) of each query from its k most cosine-similar bank samples.

    Each neighbour votes for its class with weight exp(similarity / temperature) (k=20, T=0.07 in DINO).
    ``exclude_self``: the queries are the bank itself (leave-one-out), so query i never votes for itself.
    Queries are processed in chunks of ``chunk`` rows so the (M, N) similarity matrix never exists whole.

    bank: (N, D), bank_labels: (N,) int in [0, C), queries: (M, D).
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0] - int(exclude_self))
    assert k >= 1, "the bank needs more samples than that"
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.T  # (m, N)
        if exclude_self:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + start] = float("-inf")
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()  # (m, k)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def top5_accuracy(votes: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Top-5 accuracy (%) of class votes (M, C): the label among the 5 highest votes. None with 5 classes
    or fewer, where every label is among the 5 best by construction (100 %, saying nothing): every k-NN
    report (retrieval-eval knn, the pretraining monitor) then leaves top-5 out."""
    if votes.shape[1] <= 5:
        return None
    best = votes.topk(5, dim=1).indices
    return 100.0 * (best == labels.long().view(-1, 1).to(best.device)).any(1).float().mean().item()


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                 query_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 exclude_self: bool = False) -> dict[str, float]:
    """``{"top1": %, "top5": %}`` of :func:`knn_scores`; "top5" only with more than 5 classes
    (:func:`top5_accuracy`)."""
    scores = knn_scores(bank, bank_labels, queries, num_classes, k, temperature, exclude_self)
    top1 = 100.0 * (scores.argmax(dim=1) == query_labels.long().view(-1)).float().mean().item()
    top5 = top5_accuracy(scores, query_labels)
    return {"top1": top1, **({"top5": top5} if top5 is not None else {})}
