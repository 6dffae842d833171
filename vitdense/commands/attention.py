"""``vitdense attention``: the CLS attention of every head of a layer (DINO's attention maps) and the masks
keeping a fraction of its mass, for images or for the frames of a video.

Per image (or frame) NAME, in ``OUT/NAME/``: ``head_JJ.png`` (heat map of head JJ, upsampled to the resized
image), ``mean.png`` (the mean of the heads), ``mask_head_JJ.png`` and ``mask_mean.png`` (0/255: the
fewest tokens holding ``--keep`` of the mass), ``sheet.png`` (heat maps over mask overlays) and
``attention.npz`` (the maps at token resolution). Then ``OUT/contact_sheet.png`` (image, mean, mean mask
per image; for a video at most 12 frames), ``OUT/summary.json``, and for ``--video`` the mean maps as
``OUT/attention.gif`` (always) and ``OUT/attention.mp4`` (when OpenCV can write mp4v).

Everything that can be checked is checked before the first file is written: the images (decoded in full)
or the video's frame list, the output folder, the backbone, the layer and the CLS token.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import click

from ..cli import OutputPath, build_extractor, extractor_options, load_size_arg, main
from ..errors import ConfigError, DataError

CELL = 192  # contact-sheet cell size in pixels
MAX_GIF_FRAMES = 80
SHEET_FRAMES = 12


def extractor_at_patch_stride(opts: dict[str, Any]) -> Any:
    """Extractor from the shared options; --stride unset means the patch size (DINO's visualize_attention)."""
    stride = opts.get("stride")
    extractor = build_extractor(**{**opts, "stride": stride or 1})
    if not stride:
        extractor.stride = (extractor.p, extractor.p)  # stride 1 divides every patch size; now the real one
    return extractor


@main.command("attention")
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", type=OutputPath(folder=True), required=True, help="Folder to write.")
@click.option("--keep", type=float, default=0.6, show_default=True,
              help="Fraction of the attention mass the masks keep (0.6 in the DINO paper).")
@click.option("--video", "video", type=click.Path(), default=None,
              help="A folder of frames or a video file instead of IMAGES; also writes attention.gif/.mp4.")
@click.option("--fps", type=float, default=10.0, show_default=True, help="Frame rate of the GIF and MP4.")
@extractor_options(stride=None, layer=-1, facet=None, load_size=480)
def attention_command(images: tuple[str, ...], out_dir: str, keep: float, video: str | None, fps: float,
                      layer: int, **opts: Any) -> None:
    """Heat maps of the CLS attention of every head of --layer (default: the last) for IMAGES (files or
    folders) or the frames of --video, their mean, and masks keeping --keep of the attention mass.

    Writes OUT/NAME/head_JJ.png, mean.png, mask_head_JJ.png, mask_mean.png, sheet.png, attention.npz per
    image, OUT/contact_sheet.png and OUT/summary.json; with --video also OUT/attention.gif and
    OUT/attention.mp4 of the mean map. The default stride is the patch size (as DINO's
    visualize_attention.py); registers and other prefix tokens take part in the softmax and are left out
    of the maps.
    """
    from tqdm import tqdm

    from ..attention import check_keep
    from ..io import expand_inputs, load_image, output_names, replace_outputs, save_json, save_png
    from ..video import VideoFrames
    from ..viz import contact_sheet

    check_keep(keep)
    if not fps > 0:
        raise ConfigError(f"--fps {fps}: must be positive")
    if bool(images) == (video is not None):
        raise ConfigError("give IMAGES (files or folders) or --video FRAMES_OR_FILE, not both and not neither")
    if video is None:
        paths = expand_inputs(images)
        names = output_names(paths)  # x.jpg, x.png: OUT/x_0/, OUT/x_1/
        # decode every image now: a corrupt one fails before anything is written
        sizes = [(im.height, im.width) for im in map(load_image, paths)]
        frames: Any = None
        source: Iterable[Any] = paths
    else:
        frames = VideoFrames(video)
        names = frames.names
        paths, sizes = [Path(video)], [frames.size]
        source = frames
    out = Path(out_dir)  # checked when the options were parsed (OutputPath)
    extractor = extractor_at_patch_stride(opts)
    extractor.layer_index(layer)
    if not extractor.has_cls:
        raise ConfigError(f"model {extractor.model_type} has no CLS token: attention maps need one")
    _check_sizes(extractor, paths, sizes, load_size_arg(opts["load_size"]))

    records, sheet_rows, video_frames = [], [], []
    keep_every = max(1, math.ceil(len(names) / MAX_GIF_FRAMES)) if frames is not None else 1
    sheet_every = max(1, math.ceil(len(names) / SHEET_FRAMES)) if frames is not None else 1
    with _Mp4Writer(out / "attention.mp4", fps) if frames is not None else _NoWriter() as mp4:
        for i, (item, name) in enumerate(tqdm(_named(source, names), total=len(names), desc="attention",
                                              unit="frame" if frames is not None else "img",
                                              disable=len(names) < 2)):
            record, pictures = _one_image(extractor, item, name, layer, keep, load_size_arg(opts["load_size"]),
                                          out / name)
            records.append(record)
            if i % sheet_every == 0:
                sheet_rows.extend(_thumbnail(pictures[k], CELL) for k in ("image", "mean", "mean_mask"))
            if frames is not None:
                mp4.write(pictures["mean"])
                if i % keep_every == 0:
                    video_frames.append(_thumbnail(pictures["mean"], 320))
    titles = [t for r in records[::sheet_every] for t in (r["name"], "mean", f"mean, keep {keep:g}")]
    save_png(out / "contact_sheet.png", contact_sheet(sheet_rows, titles, cols=3, cell=CELL))
    summary: dict[str, Any] = {"command": "attention", "settings": _settings(extractor, opts, layer, keep),
                               "images": records}
    if frames is not None:
        _save_gif(out / "attention.gif", video_frames, fps / keep_every)
        summary["video"] = {"source": str(video), "frames": len(records), "gif": "attention.gif",
                            "mp4": "attention.mp4" if mp4.written else None, "fps": fps}
    save_json(out / "summary.json", summary)
    replace_outputs(out, list(names) + ["contact_sheet.png", "summary.json"]
                    + (["attention.gif", "attention.mp4"] if frames is not None else []))
    extra = "" if frames is None else (", attention.gif" + (", attention.mp4" if mp4.written else
                                                              " (no mp4: OpenCV cannot write mp4v here)"))
    click.echo(f"attention of layer {extractor.layer_index(layer)} ({extractor.num_heads} heads) for "
               f"{len(records)} {'frame' if frames is not None else 'image'}(s) → {out}{extra}")


def _check_sizes(extractor: Any, paths: list[Path], sizes: list[tuple[int, int]], load_size: int | None) -> None:
    """ImageError (before anything is written) for an image smaller than a patch after resizing."""
    from ..errors import ImageError
    from ..extractor import resize_size

    for path, size in zip(paths, sizes):
        if min(size) < extractor.p:
            raise ImageError(f"{path}: image of {size[1]}x{size[0]} px is smaller than one "
                             f"{extractor.p}x{extractor.p} patch; no load size makes it usable")
        hgt, wid = resize_size(size, load_size)
        if min(hgt, wid) < extractor.p:
            raise ImageError(f"{path}: image of {wid}x{hgt} px (after resizing) is smaller than one "
                             f"{extractor.p}x{extractor.p} patch; use a larger image or --load-size")


def _named(source: Iterable[Any], names: list[str]) -> Iterator[tuple[Any, str]]:
    """(item, name) pairs; names are read as the items come (a video file's frame count is an estimate)."""
    for i, item in enumerate(source):
        yield item, names[i]


def _one_image(extractor: Any, item: Any, name: str, layer: int, keep: float, load_size: int | None,
               folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Attention maps of one image or frame written to ``folder``; returns its summary record and the
    pictures the contact sheet and the video need."""
    import numpy as np

    from ..attention import attention_maps
    from ..io import record_path, save_npz, save_png
    from ..viz import contact_sheet, heatmap, overlay, upsample

    batch, pil = extractor.preprocess(item, load_size)
    maps = attention_maps(extractor, batch, layer)[0]
    size = (pil.height, pil.width)
    image = np.asarray(pil)
    masks, mean_mask = maps.masks(keep), maps.mean_mask(keep)
    heats = [heatmap(upsample(m, size, nearest=True)) for m in maps.heads]
    mean = heatmap(upsample(maps.mean, size, nearest=True))
    overlays = [overlay(image, upsample(m.astype(np.uint8), size, nearest=True), alpha=0.6)
                for m in [mean_mask, *masks]]
    digits = max(2, len(str(len(heats) - 1)))
    for j, (heat, mask) in enumerate(zip(heats, masks)):
        save_png(folder / f"head_{j:0{digits}d}.png", heat)
        save_png(folder / f"mask_head_{j:0{digits}d}.png", _mask_png(mask, size))
    save_png(folder / "mean.png", mean)
    save_png(folder / "mask_mean.png", _mask_png(mean_mask, size))
    titles = ["mean"] + [f"head {j}" for j in range(len(heats))]
    titles += [f"mean, keep {keep:g}"] + [f"head {j}, keep {keep:g}" for j in range(len(heats))]
    save_png(folder / "sheet.png", contact_sheet([mean, *heats, *overlays], titles, cols=len(heats) + 1, cell=CELL))
    save_npz(folder / "attention.npz", heads=maps.heads, mean=maps.mean, masks=masks, mean_mask=mean_mask,
             grid=np.array(maps.grid), load_size=np.array(maps.load_size), keep=np.array(keep))
    record = {"name": name, "path": record_path(item) if isinstance(item, (str, Path)) else None,
              "load_size": list(maps.load_size), "grid": list(maps.grid),
              "mask_fraction": [round(float(m.mean()), 4) for m in masks],
              "mean_mask_fraction": round(float(mean_mask.mean()), 4),
              "prefix_mass": [round(float(v), 4) for v in maps.prefix_mass]}
    return record, {"image": image, "mean": mean, "mean_mask": overlays[0]}


def _mask_png(mask: Any, size: tuple[int, int]) -> Any:
    import numpy as np

    from ..viz import upsample

    return (upsample(mask.astype(np.uint8), size, nearest=True) > 0).astype(np.uint8) * 255


def _thumbnail(picture: Any, side: int) -> Any:
    import numpy as np
    from PIL import Image

    im = Image.fromarray(picture)
    im.thumbnail((side, side))
    return np.asarray(im)


def _save_gif(path: Path, frames: list[Any], fps: float) -> None:
    from PIL import Image

    from ..backbones import atomic_write

    ims = [Image.fromarray(f) for f in frames]
    atomic_write(path, lambda tmp: ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:],
                                               duration=max(20, int(round(1000 / fps))), loop=0))


def _settings(extractor: Any, opts: dict[str, Any], layer: int, keep: float) -> dict[str, Any]:
    return {"model": extractor.model_type, "weights": getattr(extractor, "weights_used", None),
            "layer": extractor.layer_index(layer), "heads": extractor.num_heads, "stride": extractor.stride[0],
            "patch_size": extractor.p, "load_size": opts["load_size"], "keep": keep,
            "prefix_tokens": extractor.num_prefix}


class _NoWriter:
    written = False

    def __enter__(self) -> "_NoWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def write(self, frame: Any) -> None:
        return None


class _Mp4Writer:
    """Frames → an MP4 (OpenCV, mp4v) written to a temporary file beside ``path`` and renamed onto it only
    when every frame was written; when OpenCV cannot open an mp4v writer nothing is written."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.writer: Any = None
        self.tmp: str | None = None
        self.failed = False
        self.written = False

    def __enter__(self) -> "_Mp4Writer":
        return self

    def write(self, frame: Any) -> None:
        import cv2

        if self.failed:
            return
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".mp4")
            os.close(fd)
            height, width = frame.shape[:2]
            self.size = (width, height)
            self.writer = cv2.VideoWriter(self.tmp, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                self.failed = True
                return
        if (frame.shape[1], frame.shape[0]) != self.size:  # frames of a video share a size; be safe anyway
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_NEAREST)
        self.writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self.writer is not None:
            self.writer.release()
        if self.tmp is not None:
            if exc_type is None and not self.failed and os.path.getsize(self.tmp) > 0:
                os.chmod(self.tmp, 0o644)
                os.replace(self.tmp, self.path)
                self.written = True
            elif os.path.exists(self.tmp):
                os.unlink(self.tmp)
