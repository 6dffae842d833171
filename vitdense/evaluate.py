"""Report card: grade backbones on the dense tasks vitdense exists for, against ground truth.

The data is a folder built by :mod:`vitdense.evalset` from photos and cut-outs that install from packages
(``manifest.json``, format version 1). Every backbone is graded on the same data with the command line's
defaults; a randomly initialised copy of the first backbone's architecture is always added as the floor.

Tasks and what they report (all per backbone):

- ``coseg``: :func:`vitdense.cosegment.cosegment` + CRF refinement (``vitdense cosegment``'s defaults) on
  groups of composites; Jaccard, foreground precision (how much of the mask is object) and recall (how
  much of the object is masked), mean over the images of a group, then over groups.
- ``saliency``: the CLS-attention saliency of the same forward pass, thresholded to keep 60 % of its mass
  (the DINO paper's attention masks, Caron et al. 2021, sec. 4.2.2 / fig. 3), Jaccard against the same
  masks.
- ``knn``: weighted k-NN (k = 20, T = 0.07, DINO's eval_knn) top-1 accuracy on the CLS token and on the
  mean of the patch tokens (last layer, final LayerNorm, stride = patch size, 128-px images), per
  labelled set.
- ``correspond``: best buddies (``vitdense correspond``'s defaults) on image pairs with known geometry
  (a rectified stereo pair with disparity, homographies); PCK@0.01/0.02/0.05 of the image's longer side,
  end-point error in pixels, number of buddies, all over every salient best buddy; and ``pairs_pck@0.05``,
  the PCK of the 10 well-spread pairs the command shows (what its k-means picks).
- ``video``: label propagation (``vitdense propagate``'s defaults at the frames' own size) on synthetic
  sequences; the DAVIS J&F of :mod:`vitdense.davis`.

Shapes: T tokens of a (h, w) grid, D channels; masks (H, W) bool at the image's resolution.
"""
from __future__ import annotations

import copy
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .attention import keep_mass
from .cosegment import (ELBOW_K, ELBOW_KS, ELBOW_OBJECTIVE, ELBOW_OBJECTIVES, MIN_SAMPLE, REFINE, REFINEMENTS,
                        SALIENCY_RES, SALIENCY_RESOLUTIONS)
from .errors import ConfigError
from .io import load_binary_mask, load_image

LOG = logging.getLogger("vitdense.evaluate")

TASKS = ("coseg", "saliency", "knn", "correspond", "video")
FLOOR_LABEL = "random init"


# ---------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class EvalSettings:
    """What the report card runs. The defaults are the command line's (``vitdense cosegment``,
    ``correspond``, ``propagate``); ``quick`` grades a fixed subset (first groups, pairs, one short video,
    a few k-NN images per class)."""

    tasks: tuple[str, ...] = TASKS
    quick: bool = False
    seed: int = 0
    load_size: int = 224  # shorter side for co-segmentation, saliency and correspondences
    stride: int = 4
    layer: int = 11  # co-segmentation / saliency descriptors
    facet: str = "key"
    coseg_bin: bool = False
    # co-segmentation options (vitdense cosegment's --refine, --saliency-res, --elbow-k, --elbow-objective,
    # --min-sample)
    refine: str = REFINE
    coseg_saliency: str = SALIENCY_RES
    elbow_k: str = ELBOW_K
    elbow_objective: str = ELBOW_OBJECTIVE
    min_sample: int = MIN_SAMPLE
    saliency_keep: float = 0.6  # fraction of the attention mass kept (DINO paper)
    knn_k: int = 20
    knn_temperature: float = 0.07
    # 128 px (16x16 tokens for a /8 model) rather than DINO's 224: 4x less compute keeps the full report
    # for two ViT-S/8 within 15 minutes on 2 CPU cores
    knn_load_size: int = 128
    correspond_bin: bool = True
    correspond_thresh: float = 0.05
    correspond_salient: str = "reference"  # saliency filter of the buddies (vitdense.correspond.salient_buddies)
    correspond_kmeans: str = "sklearn"  # k-means that picks the well-spread pairs (select_pairs)
    pck_alphas: tuple[float, ...] = (0.01, 0.02, 0.05)
    video_load_size: int | None = None  # None: the frames' own size
    video_normalization: str = "reference"  # frames' colour statistics (vitdense.video.frame_normalization)
    # --quick subset (sized for about 3 minutes for a ViT-S/8 and its floor on 2 CPU cores)
    quick_groups: int = 2
    quick_group_images: int = 3  # the first images of each group
    quick_pairs: int = 1
    quick_videos: int = 1
    quick_frames: int = 12
    quick_knn_bank: int = 4  # per class
    quick_knn_query: int = 2  # per class

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError.argument("tasks", ','.join(self.tasks), f"choose from {', '.join(TASKS)}")
        if not 0 < self.saliency_keep <= 1:
            raise ConfigError(f"saliency_keep {self.saliency_keep}: must be in (0, 1]")
        from .correspond import KMEANS_IMPLS, SALIENT_RULES
        from .video import NORMALIZATIONS

        for name, value, allowed in (("refine", self.refine, REFINEMENTS),
                                     ("coseg_saliency", self.coseg_saliency, SALIENCY_RESOLUTIONS),
                                     ("elbow_k", self.elbow_k, ELBOW_KS),
                                     ("elbow_objective", self.elbow_objective, ELBOW_OBJECTIVES),
                                     ("--correspond-salient", self.correspond_salient, SALIENT_RULES),
                                     ("--correspond-kmeans", self.correspond_kmeans, KMEANS_IMPLS),
                                     ("--video-normalization", self.video_normalization, NORMALIZATIONS)):
            if value not in allowed:
                raise ConfigError(f"{name} {value!r}: choose from {', '.join(allowed)}")


@dataclass
class Candidate:
    """One backbone to grade: a label for the report, the extractor, and where its weights came from."""

    label: str
    extractor: Any  # ViTExtractor
    source: str


# ---------------------------------------------------------------------------------------------- helpers

def random_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` with every parameter re-initialised as a freshly built one (seeded): each
    module's ``reset_parameters`` (PyTorch's defaults) and then timm's ``init_weights`` where it exists
    (truncated-normal position embedding, CLS/register tokens and linear layers)."""
    torch.manual_seed(seed)
    fresh = copy.deepcopy(model).float()
    with torch.no_grad():
        for module in fresh.modules():
            if module is not fresh and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if hasattr(fresh, "init_weights"):
            fresh.init_weights()
    return fresh.eval()


def random_floor(extractor: Any, seed: int = 0) -> Any:
    """A ViTExtractor like ``extractor`` (architecture, preprocessing, stride, device) with randomly
    initialised weights (:func:`random_like`) and saliency over all heads: the floor of the report card."""
    from .extractor import ViTExtractor

    ext = ViTExtractor(FLOOR_LABEL, stride=extractor.stride[0], model=random_like(extractor.model, seed),
                       device=extractor.device, dtype=extractor.dtype)
    ext.mean, ext.std = extractor.mean, extractor.std
    return ext


def floor_candidate(first: Candidate, seed: int = 0) -> Candidate:
    """The random-initialisation floor of the first backbone (see :func:`random_floor`)."""
    return Candidate(FLOOR_LABEL, random_floor(first.extractor, seed),
                     f"random initialisation of {first.label}'s architecture (seed {seed})")


def mask_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Jaccard, foreground precision |P∩G|/|P| and recall |P∩G|/|G| of two (H, W) masks (precision of an
    empty prediction = 0, recall of an empty ground truth = 1)."""
    from .metrics import jaccard

    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    inter = float(np.logical_and(pred, gt).sum())
    return {"jaccard": jaccard(pred, gt),
            "precision": inter / pred.sum() if pred.any() else 0.0,
            "recall": inter / gt.sum() if gt.any() else 1.0}


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from .viz import upsample

    mask = np.asarray(mask)
    if mask.shape == tuple(size):
        return mask.astype(bool)
    return upsample(mask.astype(np.uint8), size, nearest=True) > 0


def _read_mask(path: Path) -> np.ndarray:
    """A ground-truth object mask, upright as its image (:func:`vitdense.io.load_binary_mask`)."""
    return load_binary_mask(path, "ground-truth mask")


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(load_image(path))


def _draw(image: np.ndarray, pred: np.ndarray | None, gt: np.ndarray | None) -> np.ndarray:
    """The image with a predicted mask tinted red (and outlined) and the ground truth outlined in green.

    Masks are bool or label maps (0 = background, object ids): every object is red, and the outlines
    include the boundaries between objects."""
    from .viz import label_edges, overlay

    out = np.asarray(image).copy()
    if pred is not None and pred.any():
        out = overlay(out, (pred > 0).astype(np.int64), alpha=0.5, colors=np.array([[0, 0, 0], [255, 40, 40]]))
        out[label_edges(pred)] = (255, 40, 40)
    if gt is not None:
        out[label_edges(gt)] = (40, 255, 40)
    return out


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "backbone"


# ---------------------------------------------------------------------------------------------- the tasks

@dataclass
class TaskResult:
    """Scores of one task for one backbone (name → value), detail rows, and example pictures."""

    scores: dict[str, float]
    detail: list[dict[str, Any]] = field(default_factory=list)
    pictures: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (RGB uint8, title)
    seconds: float = 0.0


def whole_image_jaccard(root: Path, manifest: dict, settings: EvalSettings) -> float:
    """The co-segmentation Jaccard of a mask that covers every image whole (the object's share of the
    image, mean over images and groups): what marking everything scores, for reading the table."""
    groups = _coseg_groups(manifest, settings)
    if not groups:
        return float("nan")
    return float(np.mean([np.mean([_read_mask(root / m).mean() for m in g["masks"]]) for g in groups]))


def majority_top1(manifest: dict, settings: EvalSettings) -> float:
    """k-NN top-1 (%) of always answering each labelled set's most common query class, mean over sets (the
    floor of any classifier, for reading the table)."""
    rates = []
    for spec in manifest.get("knn", {}).values():
        query = _knn_subset(spec["query"], settings.quick, settings.quick_knn_query, settings.seed)
        if query:
            rates.append(_majority_rate([int(c) for _, c in query]))
    return float(np.mean(rates)) if rates else float("nan")


def _majority_rate(labels: Sequence[int]) -> float:
    """Top-1 (%) of always answering the most common of ``labels``."""
    return 100.0 * np.bincount(labels).max() / len(labels)


def _correspond_pairs(manifest: dict, settings: EvalSettings) -> list[dict]:
    """The correspondence pairs to score; --quick takes homography pairs first (the rectified motorcycle pair
    is the largest and puts every backbone, random ones included, near PCK@0.05 = 1)."""
    pairs = manifest.get("pairs", [])
    if not settings.quick:
        return pairs
    return sorted(pairs, key=lambda pair: pair["kind"] != "homography")[:settings.quick_pairs]


def _coseg_groups(manifest: dict, settings: EvalSettings) -> list[dict]:
    groups = manifest.get("coseg", [])
    if not settings.quick:
        return groups
    n = settings.quick_group_images
    return [g | {"images": g["images"][:n], "masks": g["masks"][:n]} for g in groups[:settings.quick_groups]]


def run_coseg_and_saliency(ext: Any, root: Path, manifest: dict, settings: EvalSettings,
                           progress: bool = True, variants: dict[str, EvalSettings] | None = None
                           ) -> dict[str, TaskResult]:
    """Co-segmentation and saliency masks of every group; one forward pass per image serves both.

    variants: co-segmentation settings to score on the same descriptors (name → settings; their
    extraction fields must equal ``settings``'); returned as "coseg:NAME" besides "coseg" and "saliency".
    """
    from tqdm import tqdm

    from .cosegment import low_res_saliency

    groups = _coseg_groups(manifest, settings)
    runs = ({"coseg": settings} if "coseg" in settings.tasks else {}) | \
        {f"coseg:{name}": v for name, v in (variants or {}).items()}
    want_sal = "saliency" in settings.tasks
    low_res = any(v.coseg_saliency == "low" for v in runs.values())
    rows: dict[str, list[dict]] = {name: [] for name in runs}
    pics: dict[str, list] = {name: [] for name in runs}
    seconds = dict.fromkeys(runs, 0.0)
    sal_rows, sal_pics = [], []
    t_extract = 0.0
    total = sum(len(g["images"]) for g in groups)
    bar = tqdm(total=total, desc="co-segmentation", unit="img", disable=not progress)
    for gi, group in enumerate(groups):
        start = time.perf_counter()
        descs, sals, lows, grids, resized, gts, images = [], [], [], [], [], [], []
        for rel, mask_rel in zip(group["images"], group["masks"]):
            batch, pil = ext.preprocess(root / rel, settings.load_size)
            feats = ext.extract(batch, [settings.layer], settings.facet, bin=settings.coseg_bin, saliency=True)
            descs.append(feats.descriptors[settings.layer][0].cpu().numpy())
            sals.append(feats.saliency[0].cpu().numpy().astype(np.float32))
            grids.append(tuple(feats.num_patches))
            if low_res:
                lows.append(low_res_saliency(ext, root / rel, feats.load_size, feats.num_patches))
            resized.append(np.asarray(pil))
            gts.append(_read_mask(root / mask_rel))
            images.append(_rgb(root / rel))
            bar.update(1)
        t_extract += time.perf_counter() - start
        name = group["group"]
        if want_sal:
            for i, (sal, grid, gt) in enumerate(zip(sals, grids, gts)):
                pred = _resize_mask(keep_mass(sal, settings.saliency_keep).reshape(grid), gt.shape)
                sal_rows.append({"group": name, "image": group["images"][i], **mask_scores(pred, gt)})
                if gi == 0:
                    sal_pics.append((_draw(images[i], pred, gt), Path(group["images"][i]).stem))
        for run, run_settings in runs.items():
            start = time.perf_counter()
            masks, k = cosegment_masks(descs, lows if run_settings.coseg_saliency == "low" else sals, grids,
                                       resized, run_settings)
            seconds[run] += time.perf_counter() - start
            for i, (mask, gt) in enumerate(zip(masks, gts)):
                pred = _resize_mask(mask, gt.shape)
                rows[run].append({"group": name, "image": group["images"][i], "k": k, **mask_scores(pred, gt)})
                if gi == 0:
                    pics[run].append((_draw(images[i], pred, gt), Path(group["images"][i]).stem))
    bar.close()
    out = {}
    for run in runs:
        # the forward passes are counted once, under coseg
        out[run] = TaskResult(_group_means(rows[run], ("jaccard", "precision", "recall")), rows[run], pics[run],
                              seconds[run] + (t_extract if run == "coseg" else 0.0))
        out[run].scores["empty_masks"] = float(np.mean([r["precision"] == 0 for r in rows[run]])) \
            if rows[run] else float("nan")
    if want_sal:
        out["saliency"] = TaskResult(_group_means(sal_rows, ("jaccard", "precision", "recall")), sal_rows,
                                     sal_pics, 0.0 if "coseg" in runs else t_extract)
    return out


def cosegment_masks(descs: Sequence[np.ndarray], saliency: Sequence[np.ndarray], grids: Sequence[tuple[int, int]],
                    resized: Sequence[np.ndarray], settings: EvalSettings) -> tuple[list[np.ndarray], int]:
    """Object masks at the resized images' size with the settings' co-segmentation options → (masks, k)."""
    from .cosegment import cosegment, refine_objects

    result = cosegment(descs, saliency, grids, seed=settings.seed, min_sample=settings.min_sample,
                       elbow_k=settings.elbow_k, elbow_objective_on=settings.elbow_objective)
    return refine_objects(resized, result, settings.refine), result.clustering.k


def _group_means(rows: list[dict], keys: Sequence[str]) -> dict[str, float]:
    """Mean over images within each group, then over groups."""
    if not rows:
        return {k: float("nan") for k in keys}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    return {k: float(np.mean([np.mean([r[k] for r in g]) for g in groups.values()])) for k in keys}


def _knn_subset(items: list, quick: bool, per_class: int, seed: int) -> list:
    if not quick:
        return items
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(int(item[1]), []).append(item)
    keep = []
    for label in sorted(by_class):
        members = by_class[label]
        idx = sorted(rng.permutation(len(members))[:per_class])
        keep.extend(members[i] for i in idx)
    return keep


def embed_global(ext: Any, paths: Sequence[Path], load_size: int, batch_size: int = 16
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS (N, D), mean patch token (N, D)) of the last layer after the final LayerNorm, at the patch
    size as stride. Images of one size share a forward pass."""
    net = ext.at_stride(None)
    norm = getattr(net.model, "norm", None)
    layer = net.depth - 1
    cls_out, mean_out = [], []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if not pending:
            return
        tokens = net.extract(torch.cat(pending), [layer], "token", include_cls=True).descriptors[layer]
        with torch.inference_mode():
            if norm is not None:
                tokens = norm(tokens)
        cls_out.append(tokens[:, 0].float().cpu())
        mean_out.append(tokens[:, 1:].float().mean(dim=1).cpu())
        pending.clear()

    for path in paths:
        batch, _ = net.preprocess(path, load_size)
        if pending and (pending[0].shape != batch.shape or len(pending) >= batch_size):
            flush()
        pending.append(batch)
    flush()
    return torch.cat(cls_out), torch.cat(mean_out)


def run_knn(ext: Any, root: Path, manifest: dict, settings: EvalSettings, progress: bool = True) -> TaskResult:
    """Weighted k-NN top-1 (%) per labelled set, on the CLS token and on the mean patch token."""
    from tqdm import tqdm

    from .metrics import knn_accuracy

    start = time.perf_counter()
    scores: dict[str, float] = {}
    detail = []
    sets = manifest.get("knn", {})
    for name in tqdm(sorted(sets), desc="k-NN", unit="set", disable=not progress):
        spec = sets[name]
        bank = _knn_subset(spec["bank"], settings.quick, settings.quick_knn_bank, settings.seed)
        query = _knn_subset(spec["query"], settings.quick, settings.quick_knn_query, settings.seed)
        if not bank or not query:
            continue
        n_classes = len(spec["classes"])
        bank_cls, bank_mean = embed_global(ext, [root / p for p, _ in bank], settings.knn_load_size)
        query_cls, query_mean = embed_global(ext, [root / p for p, _ in query], settings.knn_load_size)
        bank_y = torch.tensor([int(c) for _, c in bank])
        query_y = torch.tensor([int(c) for _, c in query])
        row = {"set": name, "classes": n_classes, "bank": len(bank), "query": len(query)}
        for kind, b, q in (("cls", bank_cls, query_cls), ("patch_mean", bank_mean, query_mean)):
            acc = knn_accuracy(b, bank_y, q, query_y, n_classes, settings.knn_k, settings.knn_temperature)
            scores[f"{name}_{kind}_top1"] = acc["top1"]
            row[f"{kind}_top1"] = acc["top1"]
        row["chance_top1"] = _majority_rate(query_y.tolist())
        detail.append(row)
    if detail:
        scores["cls_top1"] = float(np.mean([r["cls_top1"] for r in detail]))
        scores["patch_mean_top1"] = float(np.mean([r["patch_mean_top1"] for r in detail]))
    return TaskResult(scores, detail, [], time.perf_counter() - start)


def pair_targets(pair: dict, root: Path, points_a: np.ndarray, size_b: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth positions in B (N, 2) (y, x) of points of A, and which are known and inside B."""
    from .correspond import disparity_targets, homography_targets

    if pair["kind"] == "disparity":
        targets, valid = disparity_targets(points_a, np.load(root / pair["disparity"]))
    elif pair["kind"] == "homography":
        targets, valid = homography_targets(points_a, np.asarray(pair["H"], dtype=np.float64))
    else:
        raise ConfigError(f"pair {pair.get('name')}: unknown kind {pair['kind']!r}")
    inside = ((targets[:, 0] >= 0) & (targets[:, 0] <= size_b[0] - 1) & (targets[:, 1] >= 0)
              & (targets[:, 1] <= size_b[1] - 1))
    return targets, valid & inside


def run_correspond(ext: Any, root: Path, manifest: dict, settings: EvalSettings,
                   progress: bool = True) -> TaskResult:
    """PCK and end-point error of every best buddy on pairs with known geometry."""
    from tqdm import tqdm

    from .correspond import draw_correspondences, find_correspondences, keypoint_threshold, pck

    start = time.perf_counter()
    pairs = _correspond_pairs(manifest, settings)
    rows, pics = [], []
    for pair in tqdm(pairs, desc="correspondences", unit="pair", disable=not progress):
        res = find_correspondences(ext, root / pair["a"], root / pair["b"], load_size=settings.load_size,
                                   bin=settings.correspond_bin, thresh=settings.correspond_thresh,
                                   seed=settings.seed, salient=settings.correspond_salient,
                                   kmeans_impl=settings.correspond_kmeans)
        buddies = res.buddies
        targets, valid = pair_targets(pair, root, buddies.points_a, res.size_b)
        dist = np.linalg.norm(buddies.points_b - targets, axis=1)
        row: dict[str, Any] = {"pair": pair["name"], "buddies": len(buddies), "evaluated": int(valid.sum())}
        ref = keypoint_threshold(size=res.size_b)
        scored = pck(buddies.points_b, targets, ref, settings.pck_alphas, valid)
        for alpha, value in scored.items():
            # no buddy at all scores 0: finding nothing is not a perfect score
            row[f"pck@{alpha:g}"] = 0.0 if not valid.any() else value
        row["epe_px"] = float(dist[valid].mean()) if valid.any() else float("nan")
        # the selected pairs are a subset of the buddies (find the rows by token pair)
        index = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(buddies.tokens_a, buddies.tokens_b))}
        chosen = np.array([index[(int(a), int(b))] for a, b in zip(res.pairs.tokens_a, res.pairs.tokens_b)],
                          dtype=np.int64)
        alpha = max(settings.pck_alphas)
        picked = pck(buddies.points_b[chosen], targets[chosen], ref, (alpha,), valid[chosen])[float(alpha)]
        row[f"pairs_pck@{alpha:g}"] = 0.0 if not valid[chosen].any() else picked
        rows.append(row)
        if len(pics) < 2 and len(buddies):
            order = np.random.default_rng(settings.seed).permutation(len(buddies))[:40]
            ok = valid[order] & (dist[order] <= max(settings.pck_alphas) * ref)
            colours = np.where(ok[:, None], [[40, 220, 40]], [[255, 40, 40]]).astype(np.uint8)
            picture = draw_correspondences(_rgb(root / pair["a"]), _rgb(root / pair["b"]),
                                           buddies.points_a[order], buddies.points_b[order], height=240,
                                           colours=colours, labels=False, lines=True)
            pics.append((picture, pair["name"]))
    keys = [f"pck@{a:g}" for a in settings.pck_alphas]
    scores = {k: float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in keys}
    epes = [r["epe_px"] for r in rows if np.isfinite(r["epe_px"])]
    scores["epe_px"] = float(np.mean(epes)) if epes else float("nan")
    scores["buddies"] = float(np.mean([r["buddies"] for r in rows])) if rows else float("nan")
    picked_key = f"pairs_pck@{max(settings.pck_alphas):g}"
    scores[picked_key] = float(np.mean([r[picked_key] for r in rows])) if rows else float("nan")
    return TaskResult(scores, rows, pics, time.perf_counter() - start)


def run_video(ext: Any, root: Path, manifest: dict, settings: EvalSettings, progress: bool = True) -> TaskResult:
    """J&F of label propagation from the first frame's masks on every sequence."""
    from tqdm import tqdm

    from .davis import evaluate_sequence
    from .video import read_mask, segment_video

    start = time.perf_counter()
    seqs = manifest.get("video", [])
    if settings.quick:
        seqs = seqs[:settings.quick_videos]
    net = ext.at_stride(None)
    rows, pics = [], []
    for seq in tqdm(seqs, desc="video", unit="seq", disable=not progress):
        frames_rel, masks_rel = seq["frames"], seq["masks"]
        if settings.quick:
            frames_rel, masks_rel = frames_rel[:settings.quick_frames], masks_rel[:settings.quick_frames]
        gt = np.stack([read_mask(root / m)[0] for m in masks_rel]).astype(np.int64)
        frames = (_rgb(root / f) for f in frames_rel)
        preds, shown = [], []
        keep = {0, len(frames_rel) // 3, 2 * len(frames_rel) // 3, len(frames_rel) - 2}
        for out in segment_video(net, frames, gt[0], load_size=settings.video_load_size,
                                 normalization=settings.video_normalization):
            if 0 < out.index < len(frames_rel) - 1:
                preds.append(out.labels)
            if out.index in keep and len(pics) < 1:
                shown.append((out.frame, out.labels, gt[out.index], out.index))
        objects = evaluate_sequence(gt, np.stack(preds), seq["name"])
        j = float(np.mean([np.nanmean(o.j) for o in objects]))
        f = float(np.mean([np.nanmean(o.f) for o in objects]))
        rows.append({"sequence": seq["name"], "frames": len(frames_rel), "objects": len(objects),
                     "j": j, "f": f, "jf": (j + f) / 2})
        for frame, labels, truth, index in shown:  # prediction against ground truth, as in the other tasks
            pics.append((_draw(frame, labels, truth), f"{seq['name']} #{index}"))
    scores = {k: float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in ("jf", "j", "f")}
    return TaskResult(scores, rows, pics, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- the report

@dataclass
class Report:
    """Scores of every backbone on every task; ``write`` puts report.json, report.md and PNGs in a folder."""

    backbones: list[dict[str, Any]]
    results: dict[str, dict[str, TaskResult]]  # label → task → result
    settings: EvalSettings
    data: dict[str, Any]
    seconds: float = 0.0

    def score(self, label: str, task: str, metric: str) -> float:
        return self.results[label][task].scores[metric]

    def rows(self) -> list[tuple[str, str]]:
        """(task, metric) rows of the table, in task order."""
        out: list[tuple[str, str]] = []
        for task in self.settings.tasks:
            seen: list[str] = []
            for per_task in self.results.values():
                for metric in per_task.get(task, TaskResult({})).scores:
                    if metric not in seen:
                        seen.append(metric)
            out.extend((task, m) for m in seen)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "vitdense-report", "version": 1,
            "data": self.data, "settings": asdict(self.settings), "backbones": self.backbones,
            "scores": {label: {task: r.scores for task, r in tasks.items()} for label, tasks in self.results.items()},
            "seconds": {label: {task: r.seconds for task, r in tasks.items()} for label, tasks in self.results.items()},
            "detail": {label: {task: r.detail for task, r in tasks.items()} for label, tasks in self.results.items()},
            "total_seconds": self.seconds,
        }

    def markdown(self) -> str:
        labels = list(self.results)
        head = "| task | metric | " + " | ".join(labels) + " |"
        lines = ["# vitdense report card", "",
                 f"Data: `{self.data.get('dir')}` (format {self.data.get('version')}, seed "
                 f"{self.data.get('seed')}){' — quick subset' if self.settings.quick else ''}. "
                 f"Higher is better except `epe_px` and `empty_masks`. A mask of the whole image would score "
                 f"co-segmentation Jaccard {self.data.get('whole_image_jaccard', float('nan')):.3f}; always "
                 f"answering the most common class, k-NN top-1 {self.data.get('knn_majority_top1', float('nan')):.1f}.",
                 "",
                 head, "|---|---|" + "---|" * len(labels)]
        for task, metric in self.rows():
            cells = []
            for label in labels:
                value = self.results[label].get(task, TaskResult({})).scores.get(metric)
                cells.append("–" if value is None or not np.isfinite(value) else _fmt(metric, value))
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
        for task in self.settings.tasks:
            cells = [f"{self.results[label][task].seconds:.0f}" if task in self.results[label] else "–"
                     for label in labels]
            lines.append(f"| {task} | seconds | " + " | ".join(cells) + " |")
        lines += ["", "Backbones:", ""]
        lines += [f"- **{b['label']}**: {b['source']}" for b in self.backbones]
        lines += ["", f"Total time {self.seconds:.0f} s."]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> list[Path]:
        """report.json, report.md, one bar chart per task (charts/TASK.png) and example pictures per
        backbone (examples/LABEL_TASK.png). Everything is written to a temporary folder beside ``out_dir``
        first and moved in at the end, so an error leaves ``out_dir`` as it was."""
        import os
        import shutil
        import tempfile

        from .io import save_json, save_png
        from .viz import contact_sheet

        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            save_json(tmp / "report.json", self.to_json())
            (tmp / "report.md").write_text(self.markdown())
            for task in self.settings.tasks:
                chart = bar_chart(self, task)
                if chart is not None:
                    save_png(tmp / "charts" / f"{task}.png", chart)
            for label, tasks in self.results.items():
                for task, result in tasks.items():
                    if result.pictures:
                        sheet = contact_sheet([p for p, _ in result.pictures], [t for _, t in result.pictures],
                                              cell=320 if task == "correspond" else 256)
                        save_png(tmp / "examples" / f"{_slug(label)}_{task}.png", sheet)
            written = []
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                dest = out / path.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
                written.append(dest)
            return written
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _fmt(metric: str, value: float) -> str:
    if metric.endswith("top1") or metric == "buddies":
        return f"{value:.1f}"
    if metric == "epe_px":
        return f"{value:.1f}"
    return f"{value:.3f}"


def bar_chart(report: Report, task: str) -> np.ndarray | None:
    """Grouped bars of one task's scores (one bar per backbone per metric) as an RGB array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for t, m in report.rows() if t == task and m not in ("buddies", "epe_px")]
    if not metrics:
        return None
    labels = list(report.results)
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(metrics) * max(1, len(labels)) / 2, 3.2), dpi=100)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        scores = report.results[label].get(task, TaskResult({})).scores
        values = [scores.get(m, float("nan")) for m in metrics]
        xs = np.arange(len(metrics)) + (i - (len(labels) - 1) / 2) * width
        ax.bar(xs, np.nan_to_num(values), width, label=label)
    ax.set_xticks(np.arange(len(metrics)), metrics, rotation=20, ha="right", fontsize=8)
    ax.set_title(task)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


# ---------------------------------------------------------------------------------------------- entry point

RUNNERS: dict[str, Callable[..., Any]] = {"knn": run_knn, "correspond": run_correspond, "video": run_video}


def evaluate_backbones(candidates: Sequence[Candidate], data_dir: str | Path, settings: EvalSettings | None = None,
                       progress: bool = True, add_floor: bool = True,
                       on_task: Callable[[str, str, TaskResult], None] | None = None) -> Report:
    """Grade backbones on the report card's tasks; the floor (random initialisation of the first one's
    architecture) is added as the last column unless ``add_floor`` is False.

    candidates: :class:`Candidate` s (label, ViTExtractor at the co-segmentation stride, source text).
    data_dir: a folder built by :func:`vitdense.evalset.prepare_eval_data` (checked first: DataError when
    it is missing, incomplete or of another version). ``on_task(label, task, result)`` is called after
    each task (the CLI prints timings with it).
    """
    from .evalset import load_manifest

    settings = settings or EvalSettings()
    if not candidates:
        raise ConfigError("no backbone to evaluate")
    root = Path(data_dir)
    manifest = load_manifest(root)
    candidates = list(candidates)
    labels = [c.label for c in candidates]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"backbone labels must differ: {labels}")
    if add_floor:
        candidates.append(floor_candidate(candidates[0], settings.seed))
    start = time.perf_counter()
    results: dict[str, dict[str, TaskResult]] = {}
    for cand in candidates:
        ext = cand.extractor.at_stride(settings.stride)
        per_task: dict[str, TaskResult] = {}
        if "coseg" in settings.tasks or "saliency" in settings.tasks:
            torch.manual_seed(settings.seed)
            for task, result in run_coseg_and_saliency(ext, root, manifest, settings, progress).items():
                per_task[task] = result
                if on_task:
                    on_task(cand.label, task, result)
        for task in ("knn", "correspond", "video"):
            if task in settings.tasks:
                torch.manual_seed(settings.seed)
                per_task[task] = RUNNERS[task](ext, root, manifest, settings, progress)
                if on_task:
                    on_task(cand.label, task, per_task[task])
        results[cand.label] = {t: per_task[t] for t in settings.tasks if t in per_task}
    backbones = [{"label": c.label, "source": c.source, "model": c.extractor.model_type,
                  "patch": c.extractor.p, "embed_dim": c.extractor.embed_dim, "depth": c.extractor.depth,
                  "params_m": round(sum(p.numel() for p in c.extractor.model.parameters()) / 1e6, 2)}
                 for c in candidates]
    data = {"dir": str(root), "version": manifest.get("version"), "seed": manifest.get("seed"),
            "coseg_groups": len(_coseg_groups(manifest, settings)),
            "whole_image_jaccard": whole_image_jaccard(root, manifest, settings),
            "knn_majority_top1": majority_top1(manifest, settings)}
    return Report(backbones, results, settings, data, time.perf_counter() - start)


def compare_coseg_settings(candidates: Sequence[Candidate], data_dir: str | Path,
                           variants: dict[str, dict[str, Any]], settings: EvalSettings | None = None,
                           progress: bool = True, add_floor: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """The report card's co-segmentation task under several settings, each backbone's descriptors
    extracted once: label → variant name → scores (jaccard, precision, recall, empty_masks, mean_k).

    variants: name → :class:`EvalSettings` fields that differ from ``settings`` (co-segmentation options
    only: refine, coseg_saliency, elbow_k, elbow_objective, min_sample, and seed, the k-means seed), e.g.
    ``{"grabcut": {"refine": "grabcut"}}``; the floor (random initialisation of the first backbone) is added unless ``add_floor``
    is False.
    """
    from dataclasses import replace

    from .evalset import load_manifest

    base = replace(settings or EvalSettings(), tasks=("coseg",))
    extraction = ("load_size", "stride", "layer", "facet", "coseg_bin", "quick")
    bad = sorted({key for kw in variants.values() for key in kw if key in extraction or not hasattr(base, key)})
    if bad:
        raise ConfigError(f"co-segmentation variants may change only co-segmentation options, not {', '.join(bad)}")
    runs = {name: replace(base, **kw) for name, kw in variants.items()}
    root = Path(data_dir)
    manifest = load_manifest(root)
    candidates = list(candidates) + ([floor_candidate(candidates[0], base.seed)] if add_floor else [])
    table: dict[str, dict[str, dict[str, float]]] = {}
    for cand in candidates:
        results = run_coseg_and_saliency(cand.extractor.at_stride(base.stride), root, manifest,
                                         replace(base, tasks=("saliency",)), progress, runs)
        table[cand.label] = {name: {**results[f"coseg:{name}"].scores,
                                    "mean_k": float(np.mean([r["k"] for r in results[f"coseg:{name}"].detail]))}
                             for name in runs}
    return table
