"""Label propagation throughput and peak memory: vitdense against DINO's own video-segmentation script.

A synthetic video (textured background, two textured objects moving across it; JPEG frames and an indexed
first-frame mask in the DAVIS layout) is segmented by

* ``vitdense`` -- :func:`vitdense.video.segment_video` (banded affinity, cached vectorised neighbourhood
  mask, ring-buffer context), every mask written as an indexed PNG as ``vitdense propagate`` does;
* ``peer``     -- the reference itself: ``eval_video_segmentation.py`` of the facebookresearch/dino checkout
  given by ``--peer PATH`` (its frame reader, its ``VisionTransformer`` holding the same weights, its
  propagation loop and PNG writer). On a CPU-only machine ``Tensor.cuda`` is made a no-op, because the
  reference calls it unconditionally; nothing else of it is changed.

Both use the same random-weight ViT and the reference's colour normalisation (std 0.228 for red, vitdense's
default ``normalization="reference"``), so the masks can be compared pixel for pixel. Two modes:

* ``e2e``  -- read frames, extract features, propagate, write PNGs; frames/s over the whole video, the
  one-time setup included (for the reference that includes building its neighbourhood mask with four
  nested Python loops).
* ``prop`` -- features computed once beforehand (by a separate process, saved to disk) and handed to
  both: to ours directly, to the reference through a stand-in model that replays them in frame order.
  This times propagation, upsampling, arg-max and PNG writing only; the masks must agree up to
  floating-point summation order.

Every case runs in a fresh subprocess, so its peak RSS is its own; "work MB" is how far the peak rose
while the video was processed (above what loading the model/features had already reached).

    python benchmarks/bench_video.py --peer .peers/dino                    # 50 frames 854x480, ViT-S/8
    python benchmarks/bench_video.py --peer .peers/dino --tiny --frames 20  # same resolution, small ViT
    python benchmarks/bench_video.py --peer .peers/dino --device cuda
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from _isolated import run_isolated  # noqa: E402  (benchmarks/ is the script's folder)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SEQ = "synth"


# ------------------------------------------------------------------------------------------ data and model

def make_video(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """folder/JPEGImages/480p/synth/%05d.jpg and folder/Annotations/480p/synth/00000.png (objects 1, 2)."""
    from vitdense.viz import palette

    rng = np.random.default_rng(seed)
    hgt, wid = size

    def texture(h: int, w: int, cell: int, lo, hi) -> np.ndarray:
        coarse = rng.uniform(lo, hi, (h // cell + 2, w // cell + 2, 3)).astype(np.uint8)
        big = Image.fromarray(coarse).resize(((w // cell + 2) * cell, (h // cell + 2) * cell), Image.BICUBIC)
        return np.asarray(big)[:h, :w]

    bg = texture(hgt, wid, max(8, hgt // 6), (0, 90, 60), (60, 200, 255))
    radius = hgt // 6
    objects = [texture(2 * radius + 1, 2 * radius + 1, max(4, radius // 3), (180, 0, 0), (255, 120, 80)),
               texture(2 * radius + 1, 2 * radius + 1, max(4, radius // 3), (200, 200, 0), (255, 255, 90))]
    yy, xx = np.mgrid[:hgt, :wid]
    img_dir = folder / "JPEGImages" / "480p" / SEQ
    ann_dir = folder / "Annotations" / "480p" / SEQ
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    span = wid - 2 * radius - 8
    for t in range(n):
        frame, mask = bg.copy(), np.zeros((hgt, wid), np.uint8)
        progress = t / max(1, n - 1)
        centres = [(hgt // 3, radius + 4 + int(span * progress)),
                   (2 * hgt // 3, wid - radius - 4 - int(span * progress / 2))]
        for obj, ((cy, cx), tex) in enumerate(zip(centres, objects), start=1):
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
            ys, xs = np.nonzero(inside)
            frame[ys, xs] = tex[ys - cy + radius, xs - cx + radius]
            mask[inside] = obj
        Image.fromarray(frame).save(img_dir / f"{t:05d}.jpg", quality=92)
        if t == 0:
            im = Image.fromarray(mask, mode="L").convert("P")
            im.putpalette(palette(256).flatten().tolist())
            im.save(ann_dir / "00000.png")


def build_vit(tiny: bool) -> nn.Module:
    from vitdense import create_vit

    torch.manual_seed(0)
    if tiny:
        return create_vit("vit_small_patch8_224", embed_dim=96, depth=4, num_heads=3, img_size=224, patch_size=8)
    return create_vit("vit_small_patch8_224")


def our_extractor(args: argparse.Namespace, vit: nn.Module):
    from vitdense import ViTExtractor

    return ViTExtractor("custom", stride=8, model=vit, device=torch.device(args.device))


def frame_files(args: argparse.Namespace) -> list[Path]:
    return sorted((Path(args.data) / "JPEGImages" / "480p" / SEQ).glob("*.jpg"))


def mask_file(args: argparse.Namespace) -> Path:
    return Path(args.data) / "Annotations" / "480p" / SEQ / "00000.png"


# ------------------------------------------------------------------------------------------ the reference

def import_reference(peer: str, device: torch.device):
    """(eval_video_segmentation, vision_transformer) modules of a facebookresearch/dino checkout."""
    peer_path = Path(peer).resolve()
    if not (peer_path / "eval_video_segmentation.py").is_file():
        raise SystemExit(f"--peer {peer_path}: not a facebookresearch/dino checkout (no eval_video_segmentation.py)")
    sys.path.insert(0, str(peer_path))
    if device.type == "cpu":
        torch.Tensor.cuda = lambda self, *a, **k: self  # the reference moves everything to CUDA unconditionally
    import eval_video_segmentation
    import vision_transformer

    return eval_video_segmentation, vision_transformer


def reference_vit(vits, vit: nn.Module) -> nn.Module:
    """The reference's VisionTransformer with the timm model's weights (same parameter names)."""
    model = vits.VisionTransformer(patch_size=8, embed_dim=vit.embed_dim, depth=len(vit.blocks),
                                   num_heads=vit.blocks[0].attn.num_heads, mlp_ratio=4, qkv_bias=True,
                                   norm_layer=partial(nn.LayerNorm, eps=1e-6))
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


class FeatureReplay(nn.Module):
    """Stands in for the reference's model in ``prop`` mode: hands out precomputed (T, D) features, one
    frame per call, with a dummy CLS row in front (the reference drops the first token)."""

    def __init__(self, feats: torch.Tensor, patch: int = 8):
        super().__init__()
        self.feats = feats
        self.calls = 0
        self.patch_embed = nn.Module()
        self.patch_embed.patch_size = patch

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        feats = self.feats[self.calls].to(x.device)
        self.calls += 1
        return [torch.cat([feats[:1], feats])[None]]


def run_reference(args: argparse.Namespace, evs, model: nn.Module, out_dir: Path, pal: list[int],
                  stamps: list[float], fake_frames: tuple[int, int] | None = None) -> None:
    """The reference's per-video function on the synthetic sequence. ``stamps`` gets a time after every
    PNG it writes. fake_frames (H, W): skip JPEG decoding (``prop`` mode; the model replays features)."""
    import cv2

    evs.args = argparse.Namespace(output_dir=str(out_dir), n_last_frames=7, size_mask_neighborhood=12, topk=5,
                                  patch_size=8)
    files = [str(p) for p in frame_files(args)]
    if fake_frames is None:
        evs.read_frame = partial(evs.read_frame, scale_size=[args.load_size])
    else:
        ori_h, ori_w = cv2.imread(files[0]).shape[:2]
        evs.read_frame = lambda path: (torch.zeros(3, *fake_frames), ori_h, ori_w)
    write = evs.imwrite_indexed

    def timed_write(*a):
        write(*a)
        stamps.append(time.perf_counter())

    evs.imwrite_indexed = timed_write
    first_seg, seg_ori = evs.read_seg(str(mask_file(args)), 8, scale_size=[args.load_size])
    video_dir = str(Path(files[0]).parent)
    evs.eval_video_tracking_davis(evs.args, model, files, video_dir, first_seg, seg_ori,
                                  np.asarray(pal, np.uint8).reshape(-1, 3))


# ------------------------------------------------------------------------------------------ one case

def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_features(args: argparse.Namespace) -> dict:
    """Subprocess: features of every frame with our extractor, saved for the ``prop`` cases."""
    from vitdense.io import load_image
    from vitdense.video import frame_features, frame_normalization, preprocess_frame, read_mask, video_load_size

    extractor = our_extractor(args, build_vit(args.tiny))
    size = video_load_size(read_mask(mask_file(args))[0].shape, args.load_size)
    mean, std = frame_normalization(extractor.mean, extractor.std)  # the default: the reference's
    feats = torch.stack([frame_features(extractor, preprocess_frame(np.asarray(load_image(p)), size, mean,
                                                                    std)[None])[0].cpu()
                         for p in frame_files(args)])
    torch.save({"feats": feats, "grid": list(extractor.num_patches)}, Path(args.work) / "features.pt")
    return {"frames": len(feats), "grid": list(extractor.num_patches)}


def run_case(impl: str, mode: str, args: argparse.Namespace) -> dict:
    """Subprocess: segment the video, time it, save the masks; returns the JSON row."""
    from vitdense.io import save_png
    from vitdense.video import (LabelPropagator, PropagationConfig, VideoFrames, downsample_mask, one_hot,
                                read_mask, segment_video, soft_to_labels)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out_dir = Path(args.work) / f"{impl}_{mode}"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = frame_files(args)
    n = len(files)
    mask, pal = read_mask(mask_file(args))
    config = PropagationConfig(n_last_frames=7, topk=5, radius=12, temperature=0.1)  # DINO's DAVIS settings
    stamps: list[float] = []  # time after each output frame, the first frame's included

    if mode == "e2e":
        vit = build_vit(args.tiny)
        warm = torch.zeros(1, 3, args.load_size, args.load_size, device=device)
        with torch.inference_mode():  # one forward first: allocator and kernels warm on both sides
            if impl == "vitdense":
                extractor = our_extractor(args, vit)
                extractor.extract(warm, [-1], "token")
            else:
                evs, vits = import_reference(args.peer, device)
                model = reference_vit(vits, vit).to(device).eval()
                model.get_intermediate_layers(warm)
        del vit, warm
    else:
        saved = torch.load(Path(args.work) / "features.pt")
        feats, grid = saved["feats"].to(device), tuple(saved["grid"])
        if impl == "peer":
            evs, _ = import_reference(args.peer, device)
            model = FeatureReplay(feats)
    sync()
    before = peak_mb()
    start = time.perf_counter()
    if impl == "vitdense" and mode == "e2e":
        frames = VideoFrames(files[0].parent)
        for seg in segment_video(extractor, frames, mask, config, load_size=args.load_size):
            save_png(out_dir / f"{frames.names[seg.index]}.png", seg.labels, palette=pal)
            sync()
            stamps.append(time.perf_counter())
    elif impl == "vitdense":
        save_png(out_dir / f"{files[0].stem}.png", mask, palette=pal)
        stamps.append(time.perf_counter())
        labels0 = one_hot(downsample_mask(mask, grid), int(mask.max()) + 1).to(device)
        for i, soft in enumerate(LabelPropagator(config).run(feats[0], labels0, grid, feats[1:]), start=1):
            save_png(out_dir / f"{files[i].stem}.png", soft_to_labels(soft, grid, 8, mask.shape), palette=pal)
            sync()
            stamps.append(time.perf_counter())
    else:
        with torch.no_grad():
            run_reference(args, evs, model, out_dir, pal, stamps, None if mode == "e2e" else
                          (grid[0] * 8, grid[1] * 8))
        out_dir = out_dir / SEQ  # the reference writes into OUTPUT_DIR/VIDEO_NAME/
    sync()
    seconds = time.perf_counter() - start
    assert len(stamps) == n, (len(stamps), n)
    labels = np.stack([np.array(Image.open(out_dir / f"{p.stem}.png")) for p in files[1:]])
    np.savez_compressed(Path(args.work) / f"{impl}_{mode}.npz", labels=labels)
    gaps = np.diff(stamps)
    return dict(impl=impl, mode=mode, frames=n, fps=(n - 1) / seconds, steady_fps=1 / float(np.median(gaps)),
                seconds=seconds, peak_mb=peak_mb(), work_mb=peak_mb() - before,
                gpu_mb=torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------ driver

def measure(what: list[str], args: argparse.Namespace) -> dict | None:
    return run_isolated(__file__, what + ["--device", args.device, "--data", args.data, "--work", args.work,
                                          "--load-size", args.load_size, "--threads", args.threads]
                        + (["--tiny"] if args.tiny else []) + (["--peer", args.peer] if args.peer else []),
                        args.timeout, " ".join(what))


def agreement(work: Path, a: str, b: str) -> tuple[float, float] | None:
    """(fraction of equal pixels, mean over objects of the IoU) between two cases' masks."""
    from vitdense.davis import region_similarity

    fa, fb = work / f"{a}.npz", work / f"{b}.npz"
    if not (fa.exists() and fb.exists()):
        return None
    la, lb = np.load(fa)["labels"], np.load(fb)["labels"]
    if la.shape != lb.shape:
        return None
    ids = [i for i in np.union1d(np.unique(la), np.unique(lb)) if i > 0]
    js = [float(np.mean(region_similarity(lb == i, la == i))) for i in ids] or [1.0]
    return float(np.mean(la == lb)), float(np.mean(js))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", help="path to a facebookresearch/dino checkout (never committed); without it "
                                       "only vitdense is measured")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=854)
    parser.add_argument("--load-size", type=int, default=480, help="shorter side after resizing (DINO: 480)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per case (0 = torch default)")
    parser.add_argument("--tiny", action="store_true", help="a 4-block, 96-channel ViT/8 instead of ViT-S/8 "
                                                            "(same token grid, cheaper forward passes)")
    parser.add_argument("--modes", nargs="+", default=["e2e", "prop"], choices=["e2e", "prop"])
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per case before giving up")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        row = run_features(args) if args.case == ["features"] else run_case(args.case[0], args.case[1], args)
        print(json.dumps(row))
        return

    with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
        args.data, args.work = str(Path(tmp) / "data"), str(Path(tmp) / "work")
        Path(args.work).mkdir()
        make_video(Path(args.data), args.frames, (args.height, args.width))
        model = "tiny ViT/8 (96 ch, 4 blocks)" if args.tiny else "ViT-S/8"
        print(f"device {args.device}, {model} random weights, stride 8, {args.frames} frames of "
              f"{args.width}x{args.height} (resized to {args.load_size} px short side), n_last 7, topk 5, "
              f"radius 12, torch threads {args.threads or torch.get_num_threads()}\n")
        impls = ["vitdense"] + (["peer"] if args.peer else [])
        print(f"{'mode':<5} {'impl':<9} {'frames/s':>9} {'steady f/s':>11} {'peak MB':>8} {'work MB':>8} "
              f"{'GPU MB':>7} {'speed-up':>9} {'steady x':>9} {'work mem':>9} {'equal px':>9} {'J vs ours':>10}")
        for mode in args.modes:
            if mode == "prop" and measure(["features"], args) is None:
                print(f"{mode:<5} feature extraction failed")
                continue
            rows = {impl: measure([impl, mode], args) for impl in impls}
            ours = rows["vitdense"]
            for impl, row in rows.items():
                if row is None or row.get("timeout"):
                    print(f"{mode:<5} {impl:<9} {'failed' if row is None else 'timeout':>9}", flush=True)
                    continue
                speed = steady = mem = ""
                agree = None
                if impl != "vitdense" and ours and not ours.get("timeout"):
                    speed = f"{ours['fps'] / row['fps']:.2f}x"
                    steady = f"{ours['steady_fps'] / row['steady_fps']:.2f}x"
                    mem = f"{ours['work_mb'] / max(row['work_mb'], 1):.3f}x"
                    agree = agreement(Path(args.work), f"vitdense_{mode}", f"{impl}_{mode}")
                gpu = f"{row['gpu_mb']:.0f}" if row.get("gpu_mb") is not None else "-"
                print(f"{mode:<5} {impl:<9} {row['fps']:>9.3f} {row['steady_fps']:>11.3f} {row['peak_mb']:>8.0f} "
                      f"{row['work_mb']:>8.0f} {gpu:>7} {speed:>9} {steady:>9} {mem:>9} "
                      f"{(f'{agree[0]:.6f}' if agree else ''):>9} {(f'{agree[1]:.5f}' if agree else ''):>10}",
                      flush=True)
        print("\nframes/s: (frames - 1) / time for the whole video, one-time setup included; steady f/s: 1 / median "
              "time per frame; peak MB: peak RSS of the case's process; work MB: rise of that peak while the video "
              "was processed; speed-up, steady x = vitdense / peer; work mem = vitdense work MB / peer work MB "
              "(lower is better); equal px: fraction of identical output pixels, J vs ours: mean object IoU "
              "between the peer's masks and ours (frames 1..N-1)")


if __name__ == "__main__":
    main()
