"""DINO self-distillation pretraining (Caron et al. 2021): from a folder of images to a teacher backbone
that ``vitdense.ViTExtractor(weights=RUN/teacher_backbone.pth)`` loads.

    from pretrain import PretrainConfig, train
    train(PretrainConfig(data_dir="photos", out="runs/mine", arch="vit_tiny", global_size=128, local_size=64))

Command lines: ``vitdense pretrain DATA_DIR --out RUN ...``, ``python -m pretrain DATA_DIR ...`` and
``torchrun --nproc-per-node N -m pretrain DATA_DIR ...``.
"""
from __future__ import annotations

from .config import PretrainConfig
from .data import MultiCropAugmentation
from .heads import DINOHead, MultiCropWrapper
from .knn import knn_accuracy, knn_scores
from .loss import DINOLoss
from .schedules import Schedules
from .train import TrainResult, train

__all__ = ["PretrainConfig", "DINOHead", "MultiCropWrapper", "DINOLoss", "MultiCropAugmentation", "Schedules",
           "train", "TrainResult", "knn_scores", "knn_accuracy"]
