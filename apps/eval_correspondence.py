"""PCK of best-buddy correspondences against three kinds of ground truth.

PCK@α: a match (a → b) is correct when b lies within α × L of the true position of a in image B, L the
longer side of image B, α = 0.05, 0.10, 0.15 ("pck@α"; for SPair-71k also "bbox_pck@α" with L the longer
side of the target bounding box, that data set's usual protocol). The maths are the pure functions of
vitdense's public API (pck, disparity_targets, homography_targets, transfer_keypoints).

(a) ``motorcycle``: scikit-image's Middlebury 2014 motorcycle pair (``skimage.data.stereo_motorcycle()``,
    500×741, left-view disparity from ``motorcycle_disp.npz``, inf = unknown): every salient best buddy of
    the left image with known disparity, and the ``--num-pairs`` selected ones, are scored, also at the
    finer α = 0.01, 0.02, next to the zero-motion floor ("identity_pck") and the mean end-point error.
(b) ``homography A B H.txt``: a 3×3 matrix (text, row-major) mapping A's pixels (x, y, 1) to B's;
    ``homography --synthetic`` warps scikit-image's astronaut by a fixed homography instead.
(c) ``spair ROOT`` / ``pfpascal ROOT``: keypoint transfer on SPair-71k (``PairAnnotation/<split>/*.json``,
    ``JPEGImages/<category>/<name>``, with target bounding boxes) or PF-PASCAL (weakalign's
    ``test_pairs_pf_pascal.csv`` with columns source_image, target_image, class, XA, YA, XB, YB,
    ';'-separated coordinates). Each source keypoint goes to the nearest target token of its token (the
    standard protocol); we also report how many of those are best buddies.

    python apps/eval_correspondence.py motorcycle --weights W.safetensors [--random-init]
    python apps/eval_correspondence.py homography --synthetic
    python apps/eval_correspondence.py spair /data/SPair-71k --split test --limit 100
    python apps/eval_correspondence.py pfpascal /data/PF-dataset-PASCAL

Results are printed, written to OUT/<form>.json, and (motorcycle, homography) drawn to OUT/<form>.png with
green points correct at α = 0.10 and red ones wrong.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from vitdense import (PCK_ALPHAS, CorrespondenceResult, Correspondences, DataError, ViTExtractor, VitdenseError,
                      default_layer, describe_image, disparity_targets, draw_correspondences, find_correspondences,
                      homography_targets, keypoint_threshold, load_image, pck, save_json, save_png,
                      random_floor, transfer_keypoints)


# ---------------------------------------------------------------------------------- scoring (pure)

# On the motorcycle pair the disparities are 7-60 px of a 741-px image, so b = a already scores 0.49 at
# α = 0.05 and 1.0 at 0.10: the finer α = 0.01, 0.02 (7 and 15 px) are what separate good matchers.
STEREO_ALPHAS = (0.01, 0.02) + tuple(PCK_ALPHAS)

def _keys(prefix: str, scores: dict[float, float]) -> dict[str, float]:
    return {f"{prefix}pck@{a:.2f}": v for a, v in scores.items()}


def score_matches(matches: Correspondences, targets: np.ndarray, valid: np.ndarray, length: float,
                  alphas: Sequence[float] = PCK_ALPHAS, prefix: str = "") -> dict[str, float]:
    """PCK of matches' B points against targets (N, 2) (y, x) where valid (N,), threshold α · length; also
    the mean end-point error in pixels ("epe_px") and the number of matches with ground truth."""
    dist = np.linalg.norm(np.asarray(matches.points_b, np.float64).reshape(-1, 2) - targets, axis=1)
    epe = float(dist[valid].mean()) if np.any(valid) else float("nan")
    return {**_keys(prefix, pck(matches.points_b, targets, length, alphas, valid)), f"{prefix}epe_px": epe,
            f"{prefix}evaluated": int(np.sum(valid))}


def evaluate_disparity(result: CorrespondenceResult, disparity: np.ndarray,
                       alphas: Sequence[float] = STEREO_ALPHAS) -> dict[str, float]:
    """PCK of all salient buddies ("pck@α") and of the selected pairs ("pairs_pck@α") against a left-view
    disparity map (H, W) of a rectified pair (A = left, B = right), and the PCK of the zero-motion guess
    b = a at the buddies ("identity_pck@α"): the floor any matcher has to beat."""
    length = float(max(result.size_b))
    out = {}
    for prefix, matches in (("", result.buddies), ("pairs_", result.pairs)):
        targets, valid = disparity_targets(matches.points_a, disparity)
        out.update(score_matches(matches, targets, valid, length, alphas, prefix))
    targets, valid = disparity_targets(result.buddies.points_a, disparity)
    out.update(_keys("identity_", pck(result.buddies.points_a, targets, length, alphas, valid)))
    return out


def evaluate_homography(result: CorrespondenceResult, homography: np.ndarray,
                        alphas: Sequence[float] = PCK_ALPHAS) -> dict[str, float]:
    """PCK of all salient buddies and of the selected pairs against B ~ H · A (H acts on (x, y, 1))."""
    length = float(max(result.size_b))
    out = {}
    for prefix, matches in (("", result.buddies), ("pairs_", result.pairs)):
        targets, valid = homography_targets(matches.points_a, homography)
        out.update(score_matches(matches, targets, valid, length, alphas, prefix))
    return out


class KeypointPair(NamedTuple):
    """One annotated pair: images, keypoints (K, 2) (y, x) in original pixels (row k of A ↔ row k of B),
    and the target bounding box (x1, y1, x2, y2) when the data set has one. (A NamedTuple, not a dataclass,
    so the module also works when loaded from its path, as the tests do.)"""

    name: str
    image_a: Path
    image_b: Path
    kps_a: np.ndarray
    kps_b: np.ndarray
    bbox_b: tuple[float, float, float, float] | None = None


def score_keypoints(pred_b: np.ndarray, kps_b: np.ndarray, length: float,
                    alphas: Sequence[float] = PCK_ALPHAS) -> dict[float, int]:
    """Number of transferred keypoints (K, 2) within α · length of the annotated ones (K, 2)."""
    fractions = pck(pred_b, kps_b, length, alphas)
    return {a: int(round(f * len(kps_b))) if np.isfinite(f) else 0 for a, f in fractions.items()}


def evaluate_keypoints(extractor: ViTExtractor, pairs: Sequence[KeypointPair], load_size: int | None = 224,
                       layer: int | None = None, facet: str = "key", bin: bool = True,
                       alphas: Sequence[float] = PCK_ALPHAS) -> dict[str, float]:
    """Keypoint-transfer PCK over all keypoints of all pairs with L = the target image's longer side
    ("pck@α"), the mean of per-pair PCK ("pair_mean_pck@α"), the same with L = the longer side of the
    target bounding box where the data set has one (SPair-71k's usual protocol: "bbox_pck@α",
    "bbox_pair_mean_pck@α"), and the fraction of transfers that are best buddies ("mutual")."""
    layer = default_layer(extractor.depth) if layer is None else layer
    correct: dict[str, dict[float, int]] = {"": {a: 0 for a in alphas}, "bbox_": {a: 0 for a in alphas}}
    per_pair: dict[str, list[list[float]]] = {"": [], "bbox_": []}
    total, total_bbox, mutual = 0, 0, 0
    for pair in tqdm(pairs, desc="keypoints", unit="pair", disable=len(pairs) < 2):
        if len(pair.kps_b) == 0:
            continue
        desc_a, _, geom_a = describe_image(extractor, pair.image_a, load_size, layer, facet, bin)
        desc_b, _, geom_b = describe_image(extractor, pair.image_b, load_size, layer, facet, bin)
        tokens_b, is_mutual = transfer_keypoints(desc_a, desc_b, geom_a.tokens(pair.kps_a))
        pred = geom_b.pixels(tokens_b)
        lengths = {"": keypoint_threshold(geom_b.size)}
        if pair.bbox_b is not None:
            lengths["bbox_"] = keypoint_threshold(bbox=pair.bbox_b)
            total_bbox += len(pair.kps_b)
        for prefix, length in lengths.items():
            counts = score_keypoints(pred, pair.kps_b, length, alphas)
            for a in alphas:
                correct[prefix][a] += counts[a]
            per_pair[prefix].append([counts[a] / len(pair.kps_b) for a in alphas])
        total += len(pair.kps_b)
        mutual += int(is_mutual.sum())
    if total == 0:
        raise DataError("no keypoints to evaluate")
    out: dict[str, float] = {}
    for prefix, count in (("", total), ("bbox_", total_bbox)):
        if count:
            out.update({f"{prefix}pck@{a:.2f}": correct[prefix][a] / count for a in alphas})
            out.update({f"{prefix}pair_mean_pck@{a:.2f}": float(v)
                        for a, v in zip(alphas, np.mean(per_pair[prefix], axis=0))})
    out.update({"keypoints": total, "pairs": len(per_pair[""]), "mutual": mutual / total})
    return out


# ---------------------------------------------------------------------------------- data sets

def load_spair(root: str | Path, split: str = "test", limit: int | None = None) -> list[KeypointPair]:
    """SPair-71k pairs: ``root/PairAnnotation/<split>/*.json`` (src_imname, trg_imname, category, src_kps,
    trg_kps as [[x, y], ...], trg_bndbox [x1, y1, x2, y2]) with images ``root/JPEGImages/<category>/``."""
    root = Path(root)
    folder = root / "PairAnnotation" / split
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise DataError(f"{folder}: no SPair-71k pair annotations (*.json) found")
    pairs = []
    for path in files[:limit]:
        try:
            ann = json.loads(path.read_text())
            cat = ann["category"]
            kps_a = np.asarray(ann["src_kps"], dtype=np.float64).reshape(-1, 2)[:, ::-1]
            kps_b = np.asarray(ann["trg_kps"], dtype=np.float64).reshape(-1, 2)[:, ::-1]
            pairs.append(KeypointPair(path.stem, root / "JPEGImages" / cat / ann["src_imname"],
                                      root / "JPEGImages" / cat / ann["trg_imname"], kps_a.copy(), kps_b.copy(),
                                      tuple(ann["trg_bndbox"])))
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{path}: not a SPair-71k pair annotation ({err})") from None
    return pairs


def load_pfpascal(root: str | Path, csv_name: str = "test_pairs_pf_pascal.csv",
                  limit: int | None = None) -> list[KeypointPair]:
    """PF-PASCAL pairs from weakalign's CSV (source_image, target_image, class, XA, YA, XB, YB with
    ';'-separated coordinates; negative or non-finite coordinates = missing). Image paths are taken
    relative to ``root`` or its parent (the CSV's paths usually start with PF-dataset-PASCAL/)."""
    root = Path(root)
    table = root / csv_name
    if not table.is_file():
        raise DataError(f"{table}: PF-PASCAL pair list not found")

    def image(rel: str) -> Path:
        for base in (root, root.parent, root / "JPEGImages"):
            if (base / rel).is_file():
                return base / rel
        return root / "JPEGImages" / Path(rel).name

    pairs = []
    with table.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if limit is not None and len(pairs) >= limit:
                break
            try:
                xa, ya, xb, yb = ([float(v) for v in row[k].split(";") if v.strip()] for k in ("XA", "YA", "XB", "YB"))
                src, trg = row["source_image"], row["target_image"]
            except (KeyError, ValueError) as err:
                raise DataError(f"{table}, row {i + 2}: not a PF-PASCAL pair row ({err})") from None
            kps_a, kps_b = np.stack([ya, xa], 1), np.stack([yb, xb], 1)
            # weakalign's coordinates are 1-based (MATLAB); ours put pixel centres at integers from 0.
            ok = np.all(np.isfinite(kps_a) & (kps_a > 0), 1) & np.all(np.isfinite(kps_b) & (kps_b > 0), 1)
            pairs.append(KeypointPair(f"{i:05d}", image(src), image(trg), kps_a[ok] - 1, kps_b[ok] - 1))
    if not pairs:
        raise DataError(f"{table}: no pairs")
    return pairs


# ---------------------------------------------------------------------------------- runs

def _picture(result: CorrespondenceResult, image_a, image_b, targets: np.ndarray, valid: np.ndarray,
             alpha: float = 0.10) -> np.ndarray:
    """Selected pairs drawn green when correct at ``alpha``, red when wrong, grey without ground truth."""
    dist = np.linalg.norm(result.pairs.points_b - targets, axis=1)
    colours = np.where((dist <= alpha * max(result.size_b))[:, None], [[0, 200, 0]], [[230, 0, 0]])
    colours[~valid] = (128, 128, 128)
    return draw_correspondences(image_a, image_b, result.pairs.points_a, result.pairs.points_b,
                                colours=colours.astype(np.uint8))


def evaluate_motorcycle(extractor: ViTExtractor, load_size: int | None = 224, layer: int | None = None,
                        num_pairs: int = 10, thresh: float = 0.05, facet: str = "key", bin: bool = True,
                        out_dir: str | Path | None = None) -> dict[str, float]:
    """PCK on scikit-image's motorcycle stereo pair (A = left, B = right); picture to out_dir if given."""
    from skimage import data

    left, right, disparity = data.stereo_motorcycle()
    result = find_correspondences(extractor, left, right, num_pairs, load_size, layer, facet, bin, thresh)
    scores = evaluate_disparity(result, disparity)
    scores["buddies"] = len(result.buddies)
    if out_dir is not None:
        targets, valid = disparity_targets(result.pairs.points_a, disparity)
        save_png(Path(out_dir) / "motorcycle.png", _picture(result, left, right, targets, valid))
    return scores


def synthetic_homography_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-image's astronaut (512×512) and its warp by a fixed homography (mild rotation, scale,
    perspective) → (image A, image B, H)."""
    import cv2
    from skimage import data

    image = data.astronaut()
    hom = np.array([[0.92, -0.10, 40.0], [0.08, 0.95, 10.0], [1.0e-4, 5.0e-5, 1.0]])
    warped = cv2.warpPerspective(image, hom, (image.shape[1], image.shape[0]), flags=cv2.INTER_LINEAR)
    return image, warped, hom


def evaluate_homography_pair(extractor: ViTExtractor, image_a, image_b, homography: np.ndarray,
                             load_size: int | None = 224, layer: int | None = None, num_pairs: int = 10,
                             thresh: float = 0.05, facet: str = "key", bin: bool = True,
                             out_dir: str | Path | None = None) -> dict[str, float]:
    """PCK of a pair related by a homography; picture to out_dir if given."""
    result = find_correspondences(extractor, image_a, image_b, num_pairs, load_size, layer, facet, bin, thresh)
    scores = evaluate_homography(result, homography)
    scores["buddies"] = len(result.buddies)
    if out_dir is not None:
        targets, valid = homography_targets(result.pairs.points_a, homography)
        pil_a = image_a if isinstance(image_a, np.ndarray) else load_image(image_a)
        pil_b = image_b if isinstance(image_b, np.ndarray) else load_image(image_b)
        save_png(Path(out_dir) / "homography.png", _picture(result, pil_a, pil_b, targets, valid))
    return scores


def read_homography(path: str | Path) -> np.ndarray:
    """A 3×3 matrix from a text file (9 numbers, whitespace- or comma-separated)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: homography file not found")
    try:
        values = np.array(path.read_text().replace(",", " ").split(), dtype=np.float64)
    except ValueError:
        raise DataError(f"{path}: expected 9 numbers (a 3x3 homography)") from None
    if values.size != 9:
        raise DataError(f"{path}: expected 9 numbers (a 3x3 homography), found {values.size}")
    return values.reshape(3, 3)


def build_extractor(args: argparse.Namespace) -> ViTExtractor:
    """The extractor of --model/--weights, or (--random-init) a randomly initialised one of its architecture."""
    model = args.model if args.weights is None else None
    extractor = ViTExtractor(model, stride=args.stride, weights=args.weights, device=args.device)
    return random_floor(extractor, seed=0) if args.random_init else extractor


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("form", choices=["motorcycle", "homography", "spair", "pfpascal"])
    parser.add_argument("paths", nargs="*", help="homography: A B H.txt; spair/pfpascal: the data set root")
    parser.add_argument("--synthetic", action="store_true", help="homography: use the built-in warped pair")
    parser.add_argument("--model", help="backbone name (default: auto, as the vitdense commands)")
    parser.add_argument("--weights", help="weights file")
    parser.add_argument("--random-init", action="store_true", help="random weights of the same architecture")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--load-size", type=int, default=224, help="shorter side fed to the network (0 = keep)")
    parser.add_argument("--layer", type=int, default=None, help="default: 9 of 12 blocks (3/4 of the depth)")
    parser.add_argument("--facet", default="key")
    parser.add_argument("--no-bin", action="store_true", help="plain instead of log-binned descriptors")
    parser.add_argument("--thresh", type=float, default=0.05, help="saliency threshold")
    parser.add_argument("--num-pairs", type=int, default=10)
    parser.add_argument("--split", default="test", help="spair: PairAnnotation sub-folder")
    parser.add_argument("--csv", default="test_pairs_pf_pascal.csv", help="pfpascal: pair list inside ROOT")
    parser.add_argument("--limit", type=int, default=None, help="spair/pfpascal: first N pairs only")
    parser.add_argument("--out", type=Path, default=Path("out/eval_correspondence"), help="output folder")
    args = parser.parse_args(argv)
    try:
        load_size = args.load_size or None
        extractor = build_extractor(args)
        common = dict(load_size=load_size, layer=args.layer, facet=args.facet, bin=not args.no_bin)
        start = time.perf_counter()
        if args.form == "motorcycle":
            scores = evaluate_motorcycle(extractor, num_pairs=args.num_pairs, thresh=args.thresh,
                                         out_dir=args.out, **common)
        elif args.form == "homography":
            if args.synthetic:
                image_a, image_b, hom = synthetic_homography_pair()
            elif len(args.paths) == 3:
                image_a, image_b, hom = Path(args.paths[0]), Path(args.paths[1]), read_homography(args.paths[2])
            else:
                parser.error("homography needs A B H.txt, or --synthetic")
            scores = evaluate_homography_pair(extractor, image_a, image_b, hom, num_pairs=args.num_pairs,
                                              thresh=args.thresh, out_dir=args.out, **common)
        else:
            if len(args.paths) != 1:
                parser.error(f"{args.form} needs the data set root folder")
            pairs = (load_spair(args.paths[0], args.split, args.limit) if args.form == "spair"
                     else load_pfpascal(args.paths[0], args.csv, args.limit))
            scores = evaluate_keypoints(extractor, pairs, **common)
    except VitdenseError as err:
        print(f"eval_correspondence: error: {err}", file=sys.stderr)
        raise SystemExit(2)
    layer = default_layer(extractor.depth) if args.layer is None else args.layer
    report = {"form": args.form, "model": extractor.model_type, "weights": args.weights,
              "random_init": args.random_init, "stride": args.stride, "load_size": load_size, "layer": layer,
              "facet": args.facet, "bin": not args.no_bin, "thresh": args.thresh,
              "seconds": round(time.perf_counter() - start, 2), "scores": scores}
    save_json(args.out / f"{args.form}.json", report)
    width = max(len(k) for k in scores)
    for key, value in scores.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"wrote {args.out / (args.form + '.json')}")
    return report


if __name__ == "__main__":
    main()
