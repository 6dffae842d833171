"""Weighted k-nearest-neighbour classification on frozen features (DINO's ``eval_knn``): the functions live
in :mod:`vitdense.metrics` (the report card uses them too) and are re-exported here for the training
monitor."""
from __future__ import annotations

from vitdense.metrics import knn_accuracy, knn_scores

__all__ = ["knn_scores", "knn_accuracy"]
