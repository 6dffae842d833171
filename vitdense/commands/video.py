"""``vitdense propagate`` (video object segmentation by label propagation) and ``vitdense eval-davis``.

``propagate FRAMES --mask FIRST.png --out OUT`` segments one video (a folder of frames or a video file)
and writes, per frame, ``OUT/NAME.png`` (indexed PNG with the mask's palette; the first frame gets the
given mask), then ``overlay.gif``, ``contact_sheet.png`` and ``summary.json``.
``propagate --davis-root ROOT --out OUT`` does the same for every sequence of a DAVIS-2017 layout
(``OUT/SEQ/NAME.png``, overlays under ``OUT/overlays/``), ready for the official evaluation or for
``eval-davis`` (``--evaluate`` runs it right after).

Each PNG is written atomically as soon as its frame is segmented (memory stays flat for long videos);
everything that can be checked before the first frame (every video's frame list and frame sizes from the
image headers, its first-frame mask and the mask's size) is checked first, for all DAVIS sequences too.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from ..cli import OutputPath, build_extractor, extractor_options, load_size_arg, main
from ..errors import ConfigError, DataError, ImageError

THUMB = 320  # longer side of the overlay frames kept for the GIF / contact sheet
MAX_GIF_FRAMES = 80
SHEET_FRAMES = 12


def _propagation_config(opts: dict[str, Any]):
    from ..video import PropagationConfig

    return PropagationConfig(n_last_frames=opts.pop("n_last_frames"), topk=opts.pop("topk"),
                             radius=opts.pop("neighborhood"), temperature=opts.pop("temperature"))


def _colors(palette: list[int] | None, ids: Sequence[int] = ()) -> np.ndarray:
    """(256, 3) colour per id: the mask's own palette, else distinct colours given to the ids present in
    order (a grayscale 0/255 mask's object gets the first colour, not the palette's near-white 255)."""
    from ..viz import palette as default_palette

    if palette:
        return np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    colors = default_palette(256)
    present = sorted({0, *ids})
    colors[present] = default_palette(len(present))
    return colors


def _thumbnail(frame: np.ndarray, labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """The frame at most THUMB px with its objects tinted and outlined (as cosegment's overlays are: a tint
    alone vanishes on an object of its own colour); outlined after shrinking, so the lines stay whole."""
    from PIL import Image

    from ..viz import fit_within, outline_width, overlay, upsample

    shown = fit_within(Image.fromarray(frame), THUMB)
    if (shown.height, shown.width) != labels.shape:
        labels = upsample(labels, (shown.height, shown.width), nearest=True)
    return overlay(shown, labels, alpha=0.55, colors=colors, outline=outline_width((shown.height, shown.width)))


def _save_gif(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> None:
    from PIL import Image

    from ..backbones import atomic_write

    ims = [Image.fromarray(f) for f in frames]
    atomic_write(path, lambda tmp: ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:],
                                               duration=int(1000 / fps), loop=0))


@dataclass
class Job:
    """One video to segment: its frames, first-frame mask (H0, W0) and palette, and where outputs go."""

    frames_path: Path
    mask_path: Path
    out_dir: Path
    gif_path: Path | None
    sheet_path: Path | None
    label: str
    frames: Any = None  # VideoFrames, set by open_job
    mask: np.ndarray | None = None
    palette: list[int] | None = None


def open_job(job: Job) -> Job:
    """Read the mask and the frame list (image headers only) and check that their sizes agree."""
    from ..video import VideoFrames, read_mask

    job.frames = VideoFrames(job.frames_path)
    job.mask, job.palette = read_mask(job.mask_path)
    if not job.mask.any():
        raise ImageError(f"{job.mask_path}: the first-frame mask has no object (every pixel is 0); mark the "
                         f"object(s) with ids 1, 2, ... (or 255 for a single object)")
    if job.mask.shape != job.frames.size:
        raise ImageError(f"{job.mask_path}: mask is {job.mask.shape[1]}x{job.mask.shape[0]} px but the frames of "
                         f"{job.frames_path} are {job.frames.size[1]}x{job.frames.size[0]} "
                         "(EXIF orientation applied to both)")
    return job


# Entries of a video's resume store (OUT/.resume, OUT/SEQ/.resume for DAVIS): a finished frame's labels,
# and the propagation state (features, soft labels) of the frames the context still holds.
FRAME_ENTRY = "frame-{:06d}"
STATE_ENTRY = "state-{:06d}"
DONE_ENTRY = "done"  # the video is finished (its state entries are gone; its labels are kept)


def _fingerprint(paths: Sequence[Path]) -> str:
    """One hash of the files' resolved paths, sizes and modification times: edited frames start over."""
    import hashlib
    import os

    text = "\n".join(f"{p.resolve()}|{os.stat(p).st_size}|{os.stat(p).st_mtime_ns}" for p in paths)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _open_store(job: Job, settings: dict[str, Any]) -> Any:
    """The resume store of one video: valid for these settings, these frame files (or this video file) and
    this first-frame mask; anything else changed, and the kept frames are computed again."""
    from ..resume import ResumeStore

    sources = job.frames.files if job.frames.files is not None else [job.frames_path]
    return ResumeStore(job.out_dir / ".resume", {**settings, "frames": _fingerprint(sources),
                                                 "mask": _fingerprint([job.mask_path])})


def _kept_context(store: Any, n_last: int) -> tuple[int, Any]:
    """(frames finished, ContextState to continue from or None): the longest run of finished frames from
    the first whose propagation state is complete. (0, None) when nothing can be reused."""
    import torch

    from ..video import ContextState

    done = store.load(DONE_ENTRY)
    if done is not None:
        return int(done["n_frames"]), None
    n = 0
    while store.has(FRAME_ENTRY.format(n)):
        n += 1
    if n == 0:
        return 0, None
    first = store.load(STATE_ENTRY.format(0))
    recent = [store.load(STATE_ENTRY.format(i)) for i in range(max(1, n - n_last), n)] if n_last > 0 else []
    if first is None or any(r is None for r in recent):
        return 0, None  # an entry is missing or unreadable: start over rather than guess
    tensors = [(torch.from_numpy(r["keys"]), torch.from_numpy(r["soft"])) for r in recent]
    return n, ContextState(n, tuple(int(v) for v in first["grid"]), torch.from_numpy(first["keys"]),
                           torch.from_numpy(first["soft"]), tensors)


def segment_one(extractor: Any, job: Job, propagator: Any, opts: dict[str, Any], store: Any = None
                ) -> dict[str, Any]:
    """Segment one opened video and write its PNGs (and overlays); returns its entry of summary.json.

    store: the video's ResumeStore (see :func:`_open_store`), or None. Each finished frame's labels go
    there (and, while the context holds the frame, its features and soft labels), so that an interrupted
    run continues at the first unfinished frame with the very context it had: the result is that of an
    uninterrupted run.
    """
    from tqdm import tqdm

    from ..io import save_png
    from ..video import SegmentedFrame, segment_video
    from ..viz import contact_sheet

    frames, mask, palette, gif_path = job.frames, job.mask, job.palette, job.gif_path
    objects = [int(i) for i in np.unique(mask) if i > 0]  # ids need not be contiguous
    colors = _colors(palette, objects)
    pal = palette or colors.flatten().tolist()
    keep_every = max(1, math.ceil(len(frames) / MAX_GIF_FRAMES))
    thumbs: list[np.ndarray] = []
    names: list[str] = []
    areas: list[list[int]] = []
    n_labels = int(mask.max()) + 1
    n_last = propagator.config.n_last_frames
    kept, context = _kept_context(store, n_last) if store is not None else (0, None)
    if kept:
        click.echo(f"{job.label + ': ' if job.label else ''}resumed: skipped {kept} finished frame(s) kept in "
                   f"{store.folder}", err=True)
    start = time.perf_counter()
    if kept and context is None:  # a finished video: its pictures are made again from the kept labels
        stream = (SegmentedFrame(i, None, frame, resumed=True) for i, frame in enumerate(frames))
    else:
        stream = segment_video(extractor, frames, mask, layer=opts["layer"], facet=opts["facet"],
                               load_size=load_size_arg(opts["load_size"]), batch_size=opts["batch_size"],
                               propagator=propagator, normalization=opts["normalization"], resume=context,
                               with_state=store is not None)
    computed = 0
    try:
        for seg in tqdm(stream, total=len(frames), desc=job.label or "propagate", unit="frame"):
            name, i = frames.names[seg.index], seg.index
            png = job.out_dir / f"{name}.png"
            if seg.resumed:
                labels = store.load(FRAME_ENTRY.format(i))["labels"]
                if not png.is_file():
                    save_png(png, labels, palette=pal)
            else:
                labels = seg.labels
                save_png(png, labels, palette=pal)
                computed += i > 0
                if store is not None:
                    _keep_frame(store, i, seg, labels, n_last, extractor.num_patches)
            names.append(name)
            areas.append(np.bincount(labels.ravel(), minlength=n_labels)[objects].tolist())
            if gif_path is not None and i % keep_every == 0:
                thumbs.append(_thumbnail(seg.frame, labels, colors))
    except KeyboardInterrupt:
        if store is None:
            raise
        raise store.interrupted("frame(s)", n=len(names)) from None
    seconds = time.perf_counter() - start
    if store is not None:  # finished: only the labels stay (for a rerun interrupted in a later video)
        for entry in store.folder.glob("state-*.npz"):
            entry.unlink()
        store.save(DONE_ENTRY, n_frames=np.array(len(names)))
    if gif_path is not None and thumbs:
        _save_gif(gif_path, thumbs)
        pick = np.unique(np.linspace(0, len(thumbs) - 1, min(SHEET_FRAMES, len(thumbs))).round().astype(int))
        sheet = contact_sheet([thumbs[i] for i in pick], titles=[names[i * keep_every] for i in pick],
                              cell=max(thumbs[0].shape[:2]), cols=min(4, len(pick)))
        save_png(job.sheet_path, sheet)
    from ..io import record_path

    return {"frames": record_path(job.frames_path), "mask": record_path(job.mask_path), "n_frames": len(names),
            "frame_names": names, "objects": objects, "seconds": round(seconds, 3), "resumed_frames": kept,
            "frames_per_second": round(computed / seconds, 3) if seconds > 0 and computed else None,
            "outputs": str(job.out_dir), "object_pixels_per_frame": areas}


def _keep_frame(store: Any, index: int, seg: Any, labels: np.ndarray, n_last: int, grid: tuple[int, int]) -> None:
    """Keep a finished frame: its propagation state first, then its labels (the entry that marks it finished),
    then drop the state of the frame that just left the context."""
    if index == 0 or n_last > 0:
        extra = {"grid": np.array(grid)} if index == 0 else {}
        store.save(STATE_ENTRY.format(index), keys=seg.keys.float().cpu().numpy(),
                   soft=seg.soft.float().cpu().numpy(), **extra)
    store.save(FRAME_ENTRY.format(index), compress=True, labels=labels)
    if n_last > 0 and index - n_last >= 1:
        store.remove(STATE_ENTRY.format(index - n_last))


def _settings(extractor: Any, opts: dict[str, Any], config: Any) -> dict[str, Any]:
    return {"model": extractor.model_type, "weights_used": extractor.weights_used, "layer": opts["layer"],
            "facet": opts["facet"],
            "stride": extractor.stride[0], "load_size": opts["load_size"], "n_last_frames": config.n_last_frames,
            "topk": config.topk, "neighborhood": config.radius, "temperature": config.temperature,
            "batch_size": opts["batch_size"], "normalization": opts["normalization"]}


@main.command("propagate")
@click.argument("frames", required=False, type=click.Path())
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False), default=None,
              help="First-frame annotation: indexed (palette) or grayscale PNG, ids 0 (background), 1, 2, ...")
@click.option("--davis-root", type=click.Path(file_okay=False), default=None,
              help="Run every sequence of a DAVIS-2017 folder (JPEGImages/, Annotations/, ImageSets/2017/).")
@click.option("--subset", default="val", show_default=True, help="DAVIS ImageSets/2017 list to run.")
@click.option("--sequences", default=None, help="DAVIS: comma-separated sequence names (default: the whole list).")
@click.option("--resolution", default="480p", show_default=True, help="DAVIS: JPEGImages/Annotations subfolder.")
@click.option("--out", "out_dir", type=OutputPath(folder=True), required=True, help="Output folder.")
@click.option("--n-last-frames", type=int, default=7, show_default=True,
              help="Previous frames kept as context besides the first frame.")
@click.option("--topk", type=int, default=5, show_default=True, help="Source patches voting for each target patch.")
@click.option("--neighborhood", type=int, default=12, show_default=True,
              help="Neighbourhood half-size in token-grid cells, i.e. patches when --stride is the patch size "
                   "(0 = no spatial restriction).")
@click.option("--temperature", type=float, default=0.1, show_default=True, help="Affinity exp(cos / temperature).")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="Frames per feature-extraction forward pass (propagation stays sequential).")
@click.option("--normalization", type=click.Choice(["reference", "model"]), default="reference",
              show_default=True,
              help="Colour statistics of the frames. reference: DINO's eval_video_segmentation.py (red std "
                   "0.228 instead of the 0.229 of training; models trained with ImageNet statistics only); "
                   "model: those the model was trained with.")
@click.option("--overlay/--no-overlay", "write_overlay", default=True, show_default=True,
              help="Write an overlay GIF and a contact sheet per video.")
@click.option("--evaluate", is_flag=True, help="DAVIS: run eval-davis on the results afterwards.")
@extractor_options(stride=8, layer=-1, facet="token", load_size=480)
def propagate_command(frames: str | None, mask_path: str | None, davis_root: str | None, subset: str,
                      sequences: str | None, resolution: str, out_dir: str, write_overlay: bool, evaluate: bool,
                      **opts: Any) -> None:
    """Segment the objects of a video's first-frame mask in every frame by label propagation (DINO protocol).

    FRAMES is a folder of frames (natural order) or a video file, annotated by --mask. Frames are resized
    to --load-size on the shorter side (longer side floored to a multiple of 64) and normalised with the
    colour statistics of DINO's evaluation (--normalization); the token facet is taken after the model's
    final norm. Use --stride equal to the patch size for the
    reference protocol.
    """
    from ..io import save_json
    from ..video import LabelPropagator

    config = _propagation_config(opts)
    if opts["batch_size"] < 1:
        raise ConfigError(f"--batch-size {opts['batch_size']}: must be >= 1")
    out = Path(out_dir)
    if (frames is None) == (davis_root is None):
        raise ConfigError("give either FRAMES (with --mask) or --davis-root ROOT")
    if davis_root is None:
        if mask_path is None:
            raise ConfigError(f"{frames}: --mask FIRST_FRAME.png is required (the first frame's annotation)")
        if evaluate:
            raise ConfigError("--evaluate needs --davis-root (the ground truth comes from its Annotations/)")
        jobs = [Job(Path(frames), Path(mask_path), out, out / "overlay.gif", out / "contact_sheet.png", "")]
    else:
        if mask_path is not None:
            raise ConfigError("--mask is not used with --davis-root (masks come from Annotations/)")
        jobs = _davis_jobs(Path(davis_root), subset, sequences, resolution, out)
        if evaluate:  # the ground truth the evaluation will read, checked before the first sequence runs
            from ..davis import annotation_files

            for job in jobs:
                annotation_files(davis_root, job.label, resolution)
    for job in jobs:  # every video's frames and mask checked before the first one is segmented
        open_job(job)
        if not write_overlay:
            job.gif_path = job.sheet_path = None
    extractor = build_extractor(**opts)
    extractor.layer_index(opts["layer"])  # fail before any work
    propagator = LabelPropagator(config)
    settings = _settings(extractor, opts, config)
    stores = [_open_store(job, settings) for job in jobs]
    for store in stores:
        for line in store.notes():
            click.echo(line, err=True)
    videos = {}
    for job, store in zip(jobs, stores):
        videos[job.label or job.frames_path.name] = segment_one(extractor, job, propagator, opts, store)
    save_json(out / "summary.json", {"settings": settings, "videos": videos})
    total = sum(v["n_frames"] for v in videos.values())
    click.echo(f"segmented {len(videos)} video(s), {total} frame(s) → {out}")
    written = ["summary.json"]
    if davis_root is not None and evaluate:  # what eval-davis writes (davis.DavisResults.write)
        written += [f"global_results-{subset}.csv", f"per-sequence_results-{subset}.csv",
                    f"davis_results-{subset}.json"]
    _replace_outputs(out, jobs, videos, written, davis_root is not None)  # before the evaluation reads OUT
    for store in stores:  # the outputs are written: nothing to resume
        store.discard()
    if davis_root is not None and evaluate:
        _evaluate(Path(davis_root), out, subset, [job.label for job in jobs], resolution)


def _replace_outputs(out: Path, jobs: list[Job], videos: dict[str, Any], written: list[str], davis: bool
                     ) -> None:
    """Record what this run wrote and delete what the previous run into OUT wrote and this one did not (the
    frames of a longer video, sequences no longer asked for); files the user put there stay."""
    from ..io import replace_outputs

    def pictures(job: Job) -> list[Path]:
        return [p for p in (job.gif_path, job.sheet_path) if p is not None]

    if not davis:
        job = jobs[0]
        frames = [f"{n}.png" for n in videos[job.label or job.frames_path.name]["frame_names"]]
        replace_outputs(out, frames + [p.name for p in pictures(job)] + written)
        return
    for job in jobs:
        replace_outputs(job.out_dir, [f"{n}.png" for n in videos[job.label]["frame_names"]])
    replace_outputs(out / "overlays", [p.name for job in jobs for p in pictures(job)])
    replace_outputs(out, [job.label for job in jobs] + ["overlays"] + written)


def _davis_jobs(root: Path, subset: str, sequences: str | None, resolution: str, out: Path) -> list[Job]:
    """A job per sequence of the list (or of --sequences), in list order."""
    from ..davis import sequence_names
    from ..io import list_images

    names = sequence_names(root, subset)
    if sequences:
        wanted = [s.strip() for s in sequences.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in names]
        if unknown:
            raise DataError(f"--sequences: {', '.join(unknown)} not in {root}/ImageSets/2017/{subset}.txt")
        names = wanted
    jobs = []
    for seq in names:
        frames_dir = root / "JPEGImages" / resolution / seq
        first = list_images(frames_dir)[0]
        mask = root / "Annotations" / resolution / seq / f"{first.stem}.png"
        if not mask.is_file():
            raise ImageError(f"{mask}: first-frame annotation of sequence {seq} not found")
        jobs.append(Job(frames_dir, mask, out / seq, out / "overlays" / f"{seq}.gif",
                        out / "overlays" / f"{seq}_sheet.png", seq))
    return jobs


def _evaluate(root: Path, results: Path, subset: str, sequences: list[str] | None, resolution: str) -> list:
    from ..davis import GLOBAL_COLUMNS, evaluate_davis

    res = evaluate_davis(root, results, subset, sequences, resolution)
    paths = res.write(results)
    row = res.global_row()
    click.echo(f"--------------------------- Global results for {subset} ---------------------------")
    click.echo("  ".join(f"{c:>9}" for c in GLOBAL_COLUMNS))
    click.echo("  ".join(f"{row[c]:>9.3f}" for c in GLOBAL_COLUMNS))
    click.echo(f"\n---------- Per sequence results for {subset} ----------")
    click.echo(f"{'Sequence':<24} {'J-Mean':>7} {'F-Mean':>7}")
    for name, j, f in res.sequence_rows():
        click.echo(f"{name:<24} {j:>7.3f} {f:>7.3f}")
    click.echo("wrote " + ", ".join(str(p) for p in paths))
    return list(paths)


@main.command("eval-davis")
@click.option("--davis-root", type=click.Path(file_okay=False), required=True,
              help="DAVIS-2017 folder with Annotations/ and ImageSets/2017/.")
@click.option("--results", type=OutputPath(folder=True), required=True,
              help="Folder with one subfolder of indexed PNGs per sequence; the CSVs are written here.")
@click.option("--set", "subset", default="val", show_default=True, help="ImageSets/2017 list to evaluate.")
@click.option("--sequences", default=None, help="Comma-separated sequence names (default: the whole list).")
@click.option("--resolution", default="480p", show_default=True, help="Annotations subfolder.")
def eval_davis_command(davis_root: str, results: str, subset: str, sequences: str | None, resolution: str) -> None:
    """DAVIS-2017 semi-supervised metrics (J, F, J&F) as the official davis2017-evaluation computes them.

    Writes global_results-SET.csv and per-sequence_results-SET.csv (the official tables) and
    davis_results-SET.json (per-frame scores) into --results. Results are always recomputed.
    """
    results_dir = Path(results)
    if not results_dir.is_dir():
        raise DataError(f"{results_dir}: results folder not found")
    names = [s.strip() for s in sequences.split(",") if s.strip()] if sequences else None
    _evaluate(Path(davis_root), results_dir, subset, names, resolution)
