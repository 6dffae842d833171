"""vitdense: dense visual analysis with self-supervised ViT features.

The public API is what this module exports (``__all__``); the submodules hold the implementations and may
change. The co-segmentation function is exported as ``cosegment_objects`` because ``vitdense.cosegment``
is the name of its module.

HOW TO ADD AN EXPORT: add ``"name": "module"`` to ``_EXPORTS`` below (``"module"`` is the submodule of
vitdense that defines it; ``"module:attr"`` exports it under another name) and add the name to
``__all__``. Do not write ``from .module import name`` here: the exports are imported lazily, on first
use (PEP 562 ``__getattr__``), so that ``import vitdense`` and the command line start without torch.
An export must not have the name of a submodule (the submodule would shadow it once imported).
tests/test_api.py checks that every name of ``__all__`` resolves.
"""
from __future__ import annotations

import importlib
from typing import Any

# The errors are cheap (no torch): imported eagerly.
from .errors import CheckpointError, ConfigError, DataError, ImageError, VitdenseError  # noqa: F401

__version__ = "0.1.0"

# public name -> "submodule" or "submodule:attribute" (see the docstring: how to add an export)
_EXPORTS: dict[str, str] = {
    "Features": "extractor", "ViTExtractor": "extractor", "log_bin": "extractor",
    "IMAGENET_MEAN": "backbones", "IMAGENET_STD": "backbones", "MODELS": "backbones", "backbone_meta": "backbones",
    "create_vit": "backbones", "default_model_name": "backbones", "get_spec": "backbones",
    "load_backbone": "backbones", "read_weights": "backbones", "save_backbone": "backbones",
    "IMAGE_SUFFIXES": "io", "list_images": "io", "load_image": "io", "natural_key": "io", "save_json": "io",
    "save_npz": "io", "save_png": "io", "to_rgb": "io", "load_mask": "io",
    "contact_sheet": "viz", "heatmap": "viz", "overlay": "viz", "palette": "viz", "pca_rgb": "viz",
    "similarity_map": "viz",
    "AttentionMaps": "attention", "attention_maps": "attention", "cls_attention": "attention",
    "keep_mass": "attention",
    "CompressedDescriptors": "inspect_page", "InspectImage": "inspect_page", "InspectPage": "inspect_page",
    "InspectView": "inspect_page", "SimilarityError": "inspect_page", "build_inspect_page": "inspect_page",
    "compress_descriptors": "inspect_page", "similarity_error": "inspect_page",
    "ari": "metrics", "jaccard": "metrics", "nmi": "metrics", "part_scores": "metrics", "precision": "metrics",
    "CosegResult": "cosegment", "PartResult": "cosegment", "part_cosegment": "cosegment",
    "refine_objects": "cosegment", "cosegment_objects": "cosegment:cosegment",
    "PCK_ALPHAS": "correspond", "CorrespondenceResult": "correspond", "Correspondences": "correspond",
    "default_layer": "correspond", "describe_image": "correspond", "disparity_targets": "correspond",
    "draw_correspondences": "correspond", "find_correspondences": "correspond", "homography_targets": "correspond",
    "keypoint_threshold": "correspond", "pck": "correspond", "transfer_keypoints": "correspond",
    "LabelPropagator": "video", "PropagationConfig": "video", "SegmentedFrame": "video", "VideoFrames": "video",
    "read_mask": "video", "segment_video": "video",
    "DavisResults": "davis", "evaluate_davis": "davis",
    "DescriptorConfig": "retrieval", "FaissConfig": "retrieval", "ImageIndex": "retrieval",
    "build_faiss": "retrieval", "embed_images": "retrieval", "faiss_search": "retrieval",
    "global_descriptors": "retrieval", "update_index": "retrieval",
    "is_reserved_stamp": "splits", "photo_split": "splits", "stamp_split": "splits",
    "fetch_package": "evalset", "is_non_commercial": "evalset", "wallpaper_name": "evalset",
    "wallpaper_photos": "evalset",
    "prepare_eval_data": "evalset", "load_manifest": "evalset", "eval_data_dir": "evalset:default_data_dir",
    "evaluate_backbones": "evaluate", "Candidate": "evaluate", "EvalSettings": "evaluate",
    "EvalReport": "evaluate:Report", "random_floor": "evaluate", "knn_accuracy": "metrics",
    "compare_coseg_settings": "evaluate", "low_res_saliency": "cosegment",
    "build_pretrain_set": "pretrainset", "select_pretraining": "pretrainset",
    "PRETRAIN_SOURCES": "pretrainsources:SOURCES", "gather_pretrain_photos": "pretrainsources:gather",
    "pretrain_cutouts": "pretrainsources:train_cutouts", "left_out_kind": "pretrainsources",
    "embed_collection": "collection.engines", "ExtractorSpec": "collection.embed", "EmbedReport": "collection.engines",
    "build_index": "collection.index", "ShardedIndex": "collection.index", "open_index": "collection.index",
    "choose_index": "collection.index", "read_patches": "collection.shards",
    "index_service": "serve", "create_serve_app": "serve:create_app",
}

__all__ = [
    # extractor and backbones
    "ViTExtractor", "Features", "log_bin", "MODELS", "load_backbone", "save_backbone", "read_weights",
    "backbone_meta", "create_vit", "default_model_name", "get_spec", "IMAGENET_MEAN", "IMAGENET_STD",
    # pictures and files
    "pca_rgb", "similarity_map", "heatmap", "overlay", "palette", "contact_sheet",
    "load_image", "to_rgb", "load_mask", "list_images", "natural_key", "IMAGE_SUFFIXES", "save_png", "save_json",
    "save_npz",
    # attention maps (DINO's pictures) and the inspect page
    "attention_maps", "AttentionMaps", "cls_attention", "keep_mass",
    "build_inspect_page", "InspectImage", "InspectView", "InspectPage", "compress_descriptors",
    "CompressedDescriptors", "similarity_error", "SimilarityError",
    # co-segmentation
    "cosegment_objects", "part_cosegment", "refine_objects", "low_res_saliency", "CosegResult", "PartResult",
    "jaccard", "precision", "part_scores", "nmi", "ari",
    # correspondences
    "find_correspondences", "Correspondences", "CorrespondenceResult", "draw_correspondences", "describe_image",
    "default_layer", "transfer_keypoints", "pck", "keypoint_threshold", "disparity_targets",
    "homography_targets", "PCK_ALPHAS",
    # video
    "segment_video", "LabelPropagator", "PropagationConfig", "SegmentedFrame", "VideoFrames", "read_mask",
    "evaluate_davis", "DavisResults",
    # retrieval
    "DescriptorConfig", "global_descriptors", "embed_images", "ImageIndex", "update_index", "FaissConfig",
    "build_faiss", "faiss_search",
    # collections past one machine (vitdense.collection)
    "embed_collection", "ExtractorSpec", "EmbedReport", "build_index", "ShardedIndex", "open_index", "choose_index",
    "read_patches",
    # an index as a service (vitdense.serve; the serve extra)
    "index_service", "create_serve_app",
    # data splits and package sources (vitdense.splits, vitdense.evalset)
    "stamp_split", "photo_split", "is_reserved_stamp", "fetch_package", "wallpaper_photos", "wallpaper_name",
    "is_non_commercial",
    # the report card (vitdense.evaluate)
    "evaluate_backbones", "Candidate", "EvalSettings", "EvalReport", "prepare_eval_data", "load_manifest",
    "eval_data_dir", "random_floor", "knn_accuracy", "compare_coseg_settings",
    # the pretraining set (vitdense.pretrainset, vitdense.pretrainsources)
    "build_pretrain_set", "select_pretraining", "PRETRAIN_SOURCES", "gather_pretrain_photos", "pretrain_cutouts",
    "left_out_kind",
    # errors
    "VitdenseError", "ImageError", "CheckpointError", "ConfigError", "DataError",
]


def __getattr__(name: str) -> Any:
    """Import the submodule of an exported name on first use (PEP 562) and cache the name here."""
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

