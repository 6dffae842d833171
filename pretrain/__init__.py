"""DINO self-distillation pretraining (Caron et al. 2021), or BYOL (Grill et al. 2020, ``method="byol"``):
from a folder of images to a teacher backbone that ``vitdense.ViTExtractor(weights=RUN/teacher_backbone.pth)``
loads.

    from pretrain import PretrainConfig, train
    train(PretrainConfig(data_dir="photos", out="runs/mine", arch="vit_tiny", global_size=128, local_size=64))

Command lines: ``vitdense pretrain DATA_DIR --out RUN ...``, ``python -m pretrain DATA_DIR ...`` and
``torchrun --nproc-per-node N -m pretrain DATA_DIR ...``.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# Exports are imported on first use (PEP 562), so that `vitdense --help` can read pretrain.config (the
# options of `vitdense pretrain`) without importing torch. To add one: name -> submodule here, and __all__.
_EXPORTS: dict[str, str] = {
    "PretrainConfig": "config", "MultiCropAugmentation": "data", "find_images": "data", "DINOHead": "heads",
    "MultiCropWrapper": "heads", "BYOLHead": "byol", "BYOLLoss": "byol",
    "knn_accuracy": "knn", "knn_scores": "knn", "DINOLoss": "loss", "Schedules": "schedules",
    "TrainResult": "train", "train": "train",
}

__all__ = ["PretrainConfig", "DINOHead", "MultiCropWrapper", "DINOLoss", "BYOLHead", "BYOLLoss", "MultiCropAugmentation", "Schedules",
           "train", "TrainResult", "knn_scores", "knn_accuracy", "find_images"]


def __getattr__(name: str) -> Any:
    """Import the submodule of an exported name on first use and cache the name here."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``pretrain.train`` is both a submodule and the exported training function. Importing the submodule
    makes the import system set the package attribute to the module; keep the function there instead, as
    the eager ``from .train import train`` did."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType) and hasattr(value, "train"):
            value = value.train
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
