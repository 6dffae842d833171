"""``vitdense cosegment IMAGES --out OUT`` and ``vitdense part-cosegment IMAGES --out OUT``.

Runs the extractor over the images (one at a time, descriptors kept as float16 in a
:class:`~vitdense.cosegment.DescriptorStore`), calls :mod:`vitdense.cosegment`, and writes, once everything
is computed: per image ``NAME_mask.png`` (0/255 object mask, or part labels 0..K as a palette PNG) and
``NAME_overlay.png`` at the original resolution, ``contact_sheet.png`` of all overlays, and
``summary.json`` (settings, chosen k, votes, timings, per-image files and areas).
"""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import click
import numpy as np

from ..cli import OutputPath, build_extractor, extractor_options, load_size_arg, main, warn_skipped
from ..cosegment import REFINE, REFINEMENTS, SALIENCY_RES
from ..errors import ConfigError, DataError, ImageError

# Longer side of the overlay pictures: a 12-megapixel photo's overlay was an 8.6 MB PNG. Masks keep the
# photo's full size.
OVERLAY_MAX_SIDE = 2048


# ---------------------------------------------------------------------------------- extraction

@dataclass
class ExtractedSet:
    """Descriptors and saliency of the readable images (originals first, then crop augmentations).

    paths: per original image; store: per entry (T_i, D) float16; saliency: per entry (T_i,); grids:
    per entry (h_i, w_i); sizes: per entry the resized (H_i, W_i); original: per original the file's
    (H, W); cls: (N, D) CLS descriptors of the originals or None; augmented: per entry bool; skipped:
    (path, reason) of unreadable files; on_disk: entries the store spilled to disk.
    """

    paths: list[Path]
    store: Any
    saliency: list[np.ndarray] = field(default_factory=list)
    grids: list[tuple[int, int]] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    original: list[tuple[int, int]] = field(default_factory=list)
    cls: np.ndarray | None = None
    augmented: list[bool] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    on_disk: int = 0

    @property
    def n_images(self) -> int:
        return len(self.paths)


class ResizedImages(Sequence):
    """The resized RGB images (H_i, W_i, 3) uint8 the descriptors came from, re-read on demand (memory stays
    flat for hundreds of images); entries past the originals (crop augmentations) are None."""

    def __init__(self, extractor: Any, paths: Sequence[Path], load_size: int | None, total: int):
        self.extractor, self.paths, self.load_size, self.total = extractor, list(paths), load_size, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> np.ndarray | None:  # type: ignore[override]
        if not 0 <= i < self.total:
            raise IndexError(i)
        if i >= len(self.paths):
            return None
        return np.asarray(self.extractor.preprocess(self.paths[i], self.load_size)[1])


def extract_set(extractor: Any, paths: Sequence[Path], load_size: int | None, layer: int, facet: str,
                use_bin: bool, need_cls: bool, crops: int = 0, seed: int = 0, strict: bool = False,
                ram_mb: float = 1024.0, batch_size: int = 4, saliency_res: str = SALIENCY_RES,
                progress: bool = True, cache: Any = None) -> ExtractedSet:
    """Descriptors, saliency (and CLS) of every image; one forward pass gives all three.

    Consecutive images of the same resized size share a forward pass (up to ``batch_size``: on a CPU that
    alone was ~15 % faster per image at 4k tokens). Unreadable images are skipped and listed (``strict``:
    the first one raises ImageError). ``crops``: per image that many random 95 % crops of the resized image
    and of its mirror image (dino-vit-features' crop augmentation, seeded), each resized back to
    ``load_size``; they are clustered but do not vote. Only crop boxes are kept; the crops are cut from the
    re-read image when their turn comes, so memory does not grow with them. ``saliency_res`` "full": the
    saliency of the descriptors' own pass; "low": dino-vit-features' half-size pass at stride = patch
    (:func:`vitdense.cosegment.low_res_saliency`). ``cache``: a :class:`~vitdense.resume.ResumeStore`; each
    original image's descriptors and saliency (and CLS) are kept there as soon as they are computed, and
    images already there are not run through the network again.
    """
    import torch
    from PIL import Image
    from tqdm import tqdm

    from ..cosegment import DescriptorStore, low_res_saliency
    from ..extractor import log_bin

    rng = np.random.default_rng(seed)
    out = ExtractedSet([], DescriptorStore(ram_mb))
    boxes: list[tuple[Path, bool, tuple[int, int, int, int]]] = []
    cls: list[np.ndarray] = []
    pending: list[Any] = []  # (1, 3, H, W) tensors of one size, waiting for a forward pass
    sources: list[Any] = []  # the image (path or PIL crop) of each pending tensor
    originals: list[tuple[int, int]] = []  # the file's (H, W) of each pending original
    low_res = saliency_res == "low"

    def flush(augmented: bool) -> None:
        if not pending:
            return
        feats = extractor.extract(torch.cat(pending), [layer], facet, include_cls=need_cls and not augmented,
                                  saliency=not low_res)
        desc = feats.descriptors[layer]
        batch_cls = None
        if need_cls and not augmented:
            batch_cls = desc[:, 0].cpu().numpy()
            cls.extend(batch_cls)
            desc = desc[:, 1:]
        if use_bin:
            desc = log_bin(desc, feats.num_patches)
        for j in range(len(pending)):
            one = desc[j].cpu().numpy()
            sal = (low_res_saliency(extractor, sources[j], feats.load_size, feats.num_patches)
                   if low_res else feats.saliency[j].cpu().numpy().astype(np.float32))
            append(one, sal, tuple(feats.num_patches), tuple(feats.load_size), augmented)
            if cache is not None and not augmented:
                extra = {"cls": batch_cls[j]} if batch_cls is not None else {}
                cache.put(sources[j], desc=one, saliency=sal, grid=np.array(feats.num_patches),
                          size=np.array(feats.load_size), original=np.array(originals[j]), **extra)
        pending.clear()
        sources.clear()
        originals.clear()

    def append(desc: np.ndarray, sal: np.ndarray, grid: tuple, size: tuple, augmented: bool) -> None:
        out.store.append(desc)
        out.saliency.append(sal)
        out.grids.append(grid)
        out.sizes.append(size)
        out.augmented.append(augmented)

    def push(batch: Any, source: Any, augmented: bool) -> None:
        if pending and (pending[0].shape != batch.shape or len(pending) >= batch_size):
            flush(augmented)
        pending.append(batch)
        sources.append(source)

    try:
        for path in tqdm(paths, desc="extract", unit="img", disable=not progress or len(paths) < 2):
            kept = cache.get(path) if cache is not None else None
            if kept is not None and (not need_cls or "cls" in kept):
                flush(False)  # what is pending comes first: images keep their order
                append(kept["desc"], kept["saliency"], tuple(kept["grid"].tolist()), tuple(kept["size"].tolist()),
                       False)
                if need_cls:
                    cls.append(kept["cls"])
                original = tuple(kept["original"].tolist())
                height, width = out.sizes[-1]
            else:
                try:
                    batch, pil = extractor.preprocess(path, load_size)
                    original = _image_size(path)
                except ImageError as err:
                    if strict:
                        raise
                    out.skipped.append((Path(path), str(err).split(": ", 1)[-1]))
                    continue
                push(batch, path, False)
                originals.append(original)
                height, width = pil.height, pil.width
            out.paths.append(Path(path))
            out.original.append(original)
            for _ in range(crops):
                for flip in (False, True):
                    ch, cw = int(height * 0.95), int(width * 0.95)
                    top, left = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
                    boxes.append((Path(path), flip, (left, top, left + cw, top + ch)))
        flush(False)
        # Augmentations go after all originals, so originals keep indices 0..N-1.
        for path, flip, box in tqdm(boxes, desc="extract crops", unit="img", disable=not progress or not boxes):
            pil = extractor.preprocess(path, load_size)[1]
            if flip:
                pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop = pil.crop(box)
            push(extractor.preprocess(crop, load_size)[0], crop, True)
        flush(True)
    except BaseException:
        out.store.close()
        raise
    out.cls = np.stack(cls) if cls else None
    out.on_disk = out.store.spilled
    return out


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file as shown (EXIF orientation applied) from its header (the pixels were already
    decoded by preprocess)."""
    from ..io import image_size

    return image_size(path)


# ---------------------------------------------------------------------------------- shared options

def coseg_options(fn: Callable) -> Callable:
    """Options shared by ``cosegment`` and ``part-cosegment`` (defaults: dino-vit-features)."""
    from ..cosegment import (ELBOW, ELBOW_K, ELBOW_KS, ELBOW_OBJECTIVE, ELBOW_OBJECTIVES, MIN_SAMPLE, OUTLIER_THRESH,
                             SALIENCY_RESOLUTIONS, SALIENCY_THRESH, SAMPLE_INTERVAL, VOTES_PERCENTAGE)

    opts = [
        click.argument("images", nargs=-1, required=True, type=click.Path()),
        click.option("--out", "out_dir", type=OutputPath(folder=True), required=True,
                     help="Folder for masks, overlays, contact_sheet.png and summary.json."),
        click.option("--clusters", type=int, default=None,
                     help="Number of first-stage k-means clusters (default: elbow rule)."),
        click.option("--elbow", type=float, default=ELBOW, show_default=True,
                     help="Elbow coefficient: stop adding clusters once the objective falls by less than "
                          "1 - ELBOW."),
        click.option("--thresh", type=float, default=SALIENCY_THRESH, show_default=True,
                     help="Mean saliency above which a cluster counts as salient in an image."),
        click.option("--votes-percentage", type=float, default=VOTES_PERCENTAGE, show_default=True,
                     help="Percentage of images that must find a cluster salient for it to be foreground."),
        click.option("--elbow-k", type=click.Choice(ELBOW_KS), default=ELBOW_K, show_default=True,
                     help="Which k the elbow rule keeps: 'after', the first k that improved the objective by "
                          "less than 1 - ELBOW (dino-vit-features), or 'before', the k before it."),
        click.option("--elbow-objective", type=click.Choice(ELBOW_OBJECTIVES), default=ELBOW_OBJECTIVE,
                     show_default=True,
                     help="What the elbow rule's objective is measured on: all descriptors (dino-vit-features) "
                          "or a held-out sample."),
        click.option("--saliency-res", type=click.Choice(SALIENCY_RESOLUTIONS), default=SALIENCY_RES,
                     show_default=True,
                     help="Saliency for the votes: 'low', a half-size pass at stride = patch size "
                          "(dino-vit-features), or 'full', the descriptors' own pass."),
        click.option("--sample-interval", type=int, default=SAMPLE_INTERVAL, show_default=True,
                     help="k-means trains on every i-th descriptor."),
        click.option("--min-sample", type=int, default=MIN_SAMPLE, show_default=True,
                     help="Lower the sample interval so that k-means sees at least this many descriptors "
                          "(0: the interval as given, as dino-vit-features)."),
        click.option("--remove-outliers", is_flag=True,
                     help="Leave out images whose CLS descriptor is far from the mean (empty masks)."),
        click.option("--outliers-thresh", type=float, default=OUTLIER_THRESH, show_default=True,
                     help="Cosine similarity to the mean CLS below which an image is an outlier."),
        click.option("--bin/--no-bin", "use_bin", default=False, show_default=True,
                     help="Log-binned descriptors."),
        click.option("--niter", type=int, default=300, show_default=True, help="k-means iterations."),
        click.option("--nredo", type=int, default=10, show_default=True, help="k-means restarts (best kept)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of k-means and crops (faiss runs with seed 1234 + SEED: 0 is the reference's)."),
        click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of skipping it."),
        click.option("--ram-mb", type=float, default=1024.0, show_default=True,
                     help="Descriptors beyond this many MB go to a temporary folder on disk."),
        click.option("--batch-size", type=int, default=4, show_default=True,
                     help="Images of the same resized size per forward pass."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return extractor_options(stride=4, layer=11, facet="key", load_size=224)(fn)


def _check(opts: dict[str, Any]) -> None:
    """Option values that cannot work → ConfigError naming the option."""
    if opts["clusters"] is not None and opts["clusters"] < 1:
        raise ConfigError(f"--clusters {opts['clusters']}: must be at least 1")
    if not 0 < opts["elbow"] <= 1:
        raise ConfigError(f"--elbow {opts['elbow']}: must be in (0, 1]")
    if not 0 < opts["votes_percentage"] <= 100:
        raise ConfigError(f"--votes-percentage {opts['votes_percentage']}: must be in (0, 100]")
    if opts["sample_interval"] < 1:
        raise ConfigError(f"--sample-interval {opts['sample_interval']}: must be at least 1")
    if opts["min_sample"] < 0:
        raise ConfigError(f"--min-sample {opts['min_sample']}: must be 0 or more")
    if opts["niter"] < 1 or opts["nredo"] < 1:
        raise ConfigError("--niter and --nredo must be at least 1")
    if opts["batch_size"] < 1:
        raise ConfigError(f"--batch-size {opts['batch_size']}: must be at least 1")


def _prepare(opts: dict[str, Any], out_dir: Path, need_cls: bool, crops: int = 0
             ) -> tuple[Any, ExtractedSet, float]:
    """Expand the inputs, build the extractor, extract everything → (extractor, set, seconds)."""
    from ..io import expand_inputs

    _check(opts)
    paths = expand_inputs(opts["images"])
    if len(paths) < 2:
        raise DataError(f"{paths[0]}: co-segmentation needs at least 2 images, got 1")
    extractor = build_extractor(**opts)
    extractor.layer_index(opts["layer"])  # fail before any work
    if not extractor.has_cls:
        raise ConfigError(f"model {extractor.model_type} has no CLS token: co-segmentation needs its saliency")
    start = time.perf_counter()
    cache = _resume_store(opts, out_dir, extractor, need_cls)
    for line in cache.notes():
        click.echo(line, err=True)
    try:
        data = extract_set(extractor, paths, load_size_arg(opts["load_size"]), opts["layer"], opts["facet"],
                           opts["use_bin"], need_cls, crops, opts["seed"], opts["strict"], opts["ram_mb"],
                           opts["batch_size"], opts["saliency_res"], cache=cache)
    except KeyboardInterrupt:
        raise cache.interrupted("image(s)' descriptors") from None
    if cache.reused:
        click.echo(f"resumed: skipped {cache.reused} finished image(s) (descriptors kept in {cache.folder}); "
                   f"the clustering runs again over all images", err=True)
    if data.n_images < 2:
        data.store.close()
        listed = "; ".join(f"{p}: {why}" for p, why in data.skipped[:3])
        raise DataError(f"co-segmentation needs at least 2 readable images, got {data.n_images} "
                        f"(unreadable: {listed})")
    warn_skipped(data.skipped)
    return extractor, data, time.perf_counter() - start


def _resume_store(opts: dict[str, Any], out_dir: Path, extractor: Any, need_cls: bool) -> Any:
    """OUT/.resume: every image's descriptors and saliency as soon as they are computed. Co-segmentation is
    a joint analysis (the clusters depend on every image), so no mask is final before all are extracted;
    what an interruption keeps is the extraction, by far the longest part. Deleted once the outputs are
    written."""
    from ..resume import ResumeStore

    keys = ("layer", "facet", "use_bin", "load_size", "saliency_res", "dtype")
    return ResumeStore(out_dir / ".resume",
                       {**{k: opts[k] for k in keys}, "model": extractor.model_type,
                        "weights_used": extractor.weights_used, "stride": extractor.stride[0], "cls": need_cls})


@contextmanager
def _kept_only_on_interrupt(out: Path) -> Iterator[None]:
    """An interruption keeps OUT/.resume for the rerun; any other failure removes it (and OUT when this run
    created it and it is empty): nothing is left half-written."""
    existed = out.exists()
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        shutil.rmtree(out / ".resume", ignore_errors=True)
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _inliers(data: ExtractedSet, opts: dict[str, Any]) -> np.ndarray:
    """Inlier flags (len(store),): CLS outlier test of the originals when asked; augmentations are kept."""
    from ..cosegment import cls_inliers

    flags = np.ones(len(data.store), bool)
    if opts["remove_outliers"]:
        flags[:data.n_images] = cls_inliers(data.cls, opts["outliers_thresh"])
        if flags[:data.n_images].sum() < 2:
            raise DataError(f"--remove-outliers: only {int(flags[:data.n_images].sum())} of {data.n_images} "
                            f"images are inliers at --outliers-thresh {opts['outliers_thresh']}; lower it")
    return flags


def _names(paths: Sequence[Path]) -> list[str]:
    """Output name per image: :func:`vitdense.io.output_names`, the rule of every command."""
    from ..io import output_names

    return output_names(paths)


def _settings(opts: dict[str, Any], extractor: Any) -> dict[str, Any]:
    keep = {k: v for k, v in opts.items() if k != "images"}
    keep["model"] = extractor.model_type
    keep["weights_used"] = extractor.weights_used
    return keep


def _write(out_dir: Path, data: ExtractedSet, masks: list[np.ndarray], n_labels: int, binary: bool,
           summary: dict[str, Any], progress: bool = True) -> float:
    """Write per-image masks (original resolution), overlays (longer side at most OVERLAY_MAX_SIDE), the
    contact sheet and summary.json."""
    from PIL import Image
    from tqdm import tqdm

    from ..io import load_image, record_path, replace_outputs, save_json, save_png
    from ..viz import contact_sheet, fit_within, outline_width, overlay, palette, upsample

    start = time.perf_counter()
    colors = np.array([[0, 0, 0], [255, 40, 40]], np.uint8) if binary else palette(n_labels)
    flat_palette = colors.reshape(-1).tolist() + [0] * (768 - colors.size)
    thumbs, titles, per_image = [], [], []
    for i, (path, name) in enumerate(tqdm(list(zip(data.paths, _names(data.paths))), desc="write", unit="img",
                                          disable=not progress)):
        image = load_image(path)
        labels = upsample(masks[i].astype(np.int32), data.original[i], nearest=True)
        if binary:
            save_png(out_dir / f"{name}_mask.png", (labels > 0).astype(np.uint8) * 255)
        else:
            save_png(out_dir / f"{name}_mask.png", labels.astype(np.uint8), palette=flat_palette)
        shown = fit_within(image, OVERLAY_MAX_SIDE)
        shown_labels = labels if shown is image else upsample(labels, (shown.height, shown.width), nearest=True)
        vis = overlay(shown, shown_labels, alpha=0.55, colors=colors,
                      outline=outline_width((shown.height, shown.width)))
        save_png(out_dir / f"{name}_overlay.png", vis)
        thumb = Image.fromarray(vis)
        thumb.thumbnail((256, 256))
        thumbs.append(np.asarray(thumb))
        titles.append(name)
        counts = np.bincount(labels.reshape(-1), minlength=n_labels) / labels.size
        entry = {"file": record_path(path), "mask": f"{name}_mask.png", "overlay": f"{name}_overlay.png",
                 "size": list(data.original[i]), "resized": list(data.sizes[i]), "grid": list(data.grids[i])}
        if binary:
            entry["foreground_fraction"] = float(counts[1:].sum())
        else:
            entry["part_fractions"] = [float(c) for c in counts]
        per_image.append(entry)
    save_png(out_dir / "contact_sheet.png", contact_sheet(thumbs, titles))
    summary["images"] = per_image
    summary["skipped"] = [{"file": record_path(p), "reason": why} for p, why in data.skipped]
    summary["timings_s"]["write"] = time.perf_counter() - start
    save_json(out_dir / "summary.json", summary)
    replace_outputs(out_dir, [name for e in per_image for name in (e["mask"], e["overlay"])]
                    + ["contact_sheet.png", "summary.json"])
    shutil.rmtree(out_dir / ".resume", ignore_errors=True)  # the outputs are written: nothing to resume
    return time.perf_counter() - start


def _coseg_summary(result: Any, data: ExtractedSet) -> dict[str, Any]:
    from ..io import record_path

    n = data.n_images
    sizes = np.zeros(result.clustering.k, np.int64)  # tokens per cluster over the original inlier images
    for labels in result.labels[:n]:
        sizes += np.bincount(labels[labels >= 0].reshape(-1), minlength=result.clustering.k)
    return {
        "n_images": n, "n_augmentations": len(data.augmented) - n,
        "k": result.clustering.k, "elbow_objectives": result.clustering.objectives,
        "kmeans_sample": result.clustering.sample, "cluster_tokens": sizes,
        "votes": result.votes, "salient_clusters": np.flatnonzero(result.salient),
        "inliers": [record_path(p) for p, ok in zip(data.paths, result.inliers[:n]) if ok],
        "outliers": [record_path(p) for p, ok in zip(data.paths, result.inliers[:n]) if not ok],
        "cluster_saliency": np.round(np.nan_to_num(result.mean_saliency[:n], nan=-1.0), 4),
        "descriptors_on_disk": data.on_disk,
    }


# ---------------------------------------------------------------------------------- commands

@main.command("cosegment")
@coseg_options
@click.option("--refine", type=click.Choice(REFINEMENTS), default=REFINE, show_default=True,
              help="Refinement of the masks at image resolution: GrabCut (as dino-vit-features), a dense CRF, or none.")
def cosegment_command(images: tuple[str, ...], out_dir: str, refine: str, **opts: Any) -> None:
    """Find the object common to IMAGES (files or folders; at least 2) without labels.

    Per image OUT/NAME_mask.png (0/255) and OUT/NAME_overlay.png, OUT/contact_sheet.png, OUT/summary.json.
    """
    opts["images"] = images
    with _kept_only_on_interrupt(Path(out_dir)):
        _cosegment(out_dir, refine, opts)


def _cosegment(out_dir: str, refine: str, opts: dict[str, Any]) -> None:
    from ..cosegment import cosegment, refine_objects

    extractor, data, t_extract = _prepare(opts, Path(out_dir), need_cls=opts["remove_outliers"])
    with data.store:
        start = time.perf_counter()
        result = cosegment(data.store, data.saliency, data.grids, n_clusters=opts["clusters"],
                           elbow=opts["elbow"], thresh=opts["thresh"], votes_percentage=opts["votes_percentage"],
                           sample_interval=opts["sample_interval"], min_sample=opts["min_sample"],
                           inliers=_inliers(data, opts), seed=opts["seed"], niter=opts["niter"],
                           nredo=opts["nredo"], elbow_k=opts["elbow_k"],
                           elbow_objective_on=opts["elbow_objective"], progress=True)
        t_cluster = time.perf_counter() - start
        start = time.perf_counter()
        resized = ResizedImages(extractor, data.paths, load_size_arg(opts["load_size"]), data.n_images)
        masks = refine_objects(resized, result, refine, progress=True)
        t_refine = time.perf_counter() - start
    summary = {"command": "cosegment", "settings": {**_settings(opts, extractor), "refine": refine},
               **_coseg_summary(result, data),
               "timings_s": {"extract": t_extract, "cluster": t_cluster, "refine": t_refine}}
    out = Path(out_dir)
    _write(out, data, masks, 2, True, summary)
    click.echo(f"co-segmented {data.n_images} image(s): k={result.clustering.k}, foreground clusters "
               f"{np.flatnonzero(result.salient).tolist()}, {len(data.skipped)} skipped; wrote {out}")


def _parts_arg(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        parts = int(value)
    except ValueError:
        raise ConfigError(f"--parts {value}: give a number of parts or 'auto'") from None
    if parts < 1:
        raise ConfigError(f"--parts {value}: must be at least 1")
    return parts


@main.command("part-cosegment")
@coseg_options
@click.option("--parts", "parts", default="4", show_default=True,
              help="Number of common parts, or 'auto' (elbow rule with --part-elbow).")
@click.option("--part-elbow", type=float, default=0.94, show_default=True,
              help="Elbow coefficient for the parts (and the second stage of --three-stages).")
@click.option("--three-stages", is_flag=True,
              help="Drop non-common objects first (helps small sets with distractors).")
@click.option("--crop-augmentations", type=int, default=0, show_default=True,
              help="Random 95 percent crops (and mirrored ones) per image, added to the clustering only.")
@click.option("--crf/--no-crf", "use_crf", default=True, show_default=True,
              help="Dense-CRF refinement at image resolution.")
def part_cosegment_command(images: tuple[str, ...], out_dir: str, parts: str, part_elbow: float,
                           three_stages: bool, crop_augmentations: int, use_crf: bool, **opts: Any) -> None:
    """Find the common parts of the object common to IMAGES (at least 2).

    Per image OUT/NAME_mask.png (labels 0 = background, 1..K parts, same part = same label in every image)
    and OUT/NAME_overlay.png, OUT/contact_sheet.png, OUT/summary.json.
    """
    n_parts = _parts_arg(parts)
    if not 0 < part_elbow <= 1:
        raise ConfigError(f"--part-elbow {part_elbow}: must be in (0, 1]")
    if crop_augmentations < 0:
        raise ConfigError(f"--crop-augmentations {crop_augmentations}: must be 0 or more")
    opts["images"] = images
    with _kept_only_on_interrupt(Path(out_dir)):
        _part_cosegment(out_dir, n_parts, parts, part_elbow, three_stages, crop_augmentations, use_crf, opts)


def _part_cosegment(out_dir: str, n_parts: int | None, parts: str, part_elbow: float, three_stages: bool,
                    crop_augmentations: int, use_crf: bool, opts: dict[str, Any]) -> None:
    from ..cosegment import cosegment, part_cosegment
    from ..crf import CrfParams

    extractor, data, t_extract = _prepare(opts, Path(out_dir), need_cls=opts["remove_outliers"],
                                          crops=crop_augmentations)
    with data.store:
        start = time.perf_counter()
        voters = np.array([not a for a in data.augmented])
        coseg = cosegment(data.store, data.saliency, data.grids, n_clusters=opts["clusters"],
                          elbow=opts["elbow"], thresh=opts["thresh"], votes_percentage=opts["votes_percentage"],
                          sample_interval=opts["sample_interval"], min_sample=opts["min_sample"],
                          inliers=_inliers(data, opts), voters=voters, seed=opts["seed"], niter=opts["niter"],
                          nredo=opts["nredo"], elbow_k=opts["elbow_k"], elbow_objective_on=opts["elbow_objective"],
                          progress=True)
        t_cluster = time.perf_counter() - start
        if not coseg.salient.any():
            raise DataError("no cluster is salient in enough images: no common object to split into parts "
                            "(try a lower --votes-percentage or --thresh)")
        start = time.perf_counter()
        resized = ResizedImages(extractor, data.paths, load_size_arg(opts["load_size"]), len(data.store))
        result = part_cosegment(data.store, data.saliency, data.grids, resized, n_parts=n_parts,
                                three_stages=three_stages, part_elbow=part_elbow,
                                crf=CrfParams() if use_crf else None, coseg=coseg, seed=opts["seed"],
                                niter=opts["niter"], nredo=opts["nredo"], sample_interval=opts["sample_interval"],
                                min_sample=opts["min_sample"], elbow_k=opts["elbow_k"],
                                elbow_objective_on=opts["elbow_objective"], progress=True)
        t_parts = time.perf_counter() - start
    summary = {"command": "part-cosegment",
               "settings": {**_settings(opts, extractor), "parts": parts, "part_elbow": part_elbow,
                            "three_stages": three_stages, "crop_augmentations": crop_augmentations,
                            "crf": use_crf},
               **_coseg_summary(coseg, data),
               "n_parts": result.k, "part_objectives": result.clustering.objectives,
               "stage2_k": result.stage2.k if result.stage2 is not None else None,
               "stage2_common": np.flatnonzero(result.common) if result.common is not None else None,
               "timings_s": {"extract": t_extract, "cluster": t_cluster, "parts_and_crf": t_parts}}
    out = Path(out_dir)
    _write(out, data, result.parts[:data.n_images], result.k + 1, False, summary)
    click.echo(f"part co-segmented {data.n_images} image(s): {result.k} parts (object k={coseg.clustering.k}), "
               f"{len(data.skipped)} skipped; wrote {out}")
