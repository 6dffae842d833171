"""vitdense: dense visual analysis with self-supervised ViT features.

The public API is what this module exports (``__all__``); the submodules hold the implementations and may
change. The co-segmentation function is exported as ``cosegment_objects`` because ``vitdense.cosegment``
is the name of its module.
"""
from __future__ import annotations

from .errors import CheckpointError, ConfigError, DataError, ImageError, VitdenseError
from .extractor import Features, ViTExtractor, log_bin
from .backbones import (IMAGENET_MEAN, IMAGENET_STD, MODELS, backbone_meta, create_vit, default_model_name,
                        get_spec, load_backbone, read_weights, save_backbone)
from .io import IMAGE_SUFFIXES, list_images, load_image, natural_key, save_json, save_npz, save_png
from .viz import contact_sheet, heatmap, overlay, palette, pca_rgb, similarity_map
from .metrics import ari, jaccard, nmi, part_scores, precision
from .cosegment import CosegResult, PartResult, part_cosegment, refine_objects
from .cosegment import cosegment as cosegment_objects
from .correspond import (PCK_ALPHAS, CorrespondenceResult, Correspondences, default_layer, describe_image,
                         disparity_targets, draw_correspondences, find_correspondences, homography_targets,
                         keypoint_threshold, pck, transfer_keypoints)
from .video import LabelPropagator, PropagationConfig, SegmentedFrame, VideoFrames, read_mask, segment_video
from .davis import DavisResults, evaluate_davis
from .retrieval import (DescriptorConfig, FaissConfig, ImageIndex, build_faiss, embed_images, faiss_search,
                        global_descriptors, update_index)
from .splits import is_reserved_stamp, photo_split, stamp_split
from .evalset import fetch_package, is_non_commercial, wallpaper_name, wallpaper_photos

__version__ = "0.1.0"

__all__ = [
    # extractor and backbones
    "ViTExtractor", "Features", "log_bin", "MODELS", "load_backbone", "save_backbone", "read_weights",
    "backbone_meta", "create_vit", "default_model_name", "get_spec", "IMAGENET_MEAN", "IMAGENET_STD",
    # pictures and files
    "pca_rgb", "similarity_map", "heatmap", "overlay", "palette", "contact_sheet",
    "load_image", "list_images", "natural_key", "IMAGE_SUFFIXES", "save_png", "save_json", "save_npz",
    # co-segmentation
    "cosegment_objects", "part_cosegment", "refine_objects", "CosegResult", "PartResult",
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
    # data splits and package sources (vitdense.splits, vitdense.evalset)
    "stamp_split", "photo_split", "is_reserved_stamp", "fetch_package", "wallpaper_photos", "wallpaper_name",
    "is_non_commercial",
    # errors
    "VitdenseError", "ImageError", "CheckpointError", "ConfigError", "DataError",
]
