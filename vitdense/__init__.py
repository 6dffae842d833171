"""vitdense: dense visual analysis with self-supervised ViT features."""
from __future__ import annotations

from .errors import CheckpointError, ConfigError, DataError, ImageError, VitdenseError
from .extractor import Features, ViTExtractor, log_bin
from .backbones import MODELS, load_backbone, save_backbone, backbone_meta, create_vit
from .viz import pca_rgb, similarity_map

__version__ = "0.1.0"

__all__ = [
    "ViTExtractor", "Features", "log_bin", "MODELS", "load_backbone", "save_backbone", "backbone_meta",
    "create_vit", "pca_rgb", "similarity_map", "VitdenseError", "ImageError", "CheckpointError", "ConfigError", "DataError",
]
