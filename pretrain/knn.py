"""Weighted k-nearest-neighbour classification on frozen features (DINO's ``eval_knn``, Wu et al. 2018).

Pure functions on tensors. Shapes: N bank (train) samples, M query samples, D feature channels,
C classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                 query_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 exclude_self: bool = False) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent of :func:`knn_scores` (top-5 over min(5, C) classes)."""
    scores = knn_scores(bank, bank_labels, queries, num_classes, k, temperature, exclude_self)
    ranked = scores.argsort(dim=1, descending=True)
    correct = ranked == query_labels.view(-1, 1)
    return {"top1": 100.0 * correct[:, :1].any(1).float().mean().item(),
            "top5": 100.0 * correct[:, :min(5, num_classes)].any(1).float().mean().item()}
