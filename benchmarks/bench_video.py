"""Label propagation throughput and peak memory: vitdense vs DINO's eval_video_segmentation loop, same run.

A synthetic video (textured background, two textured objects moving across it; JPEG frames + an indexed
first-frame mask, DAVIS layout) is segmented by

* ``vitdense``  — :func:`vitdense.video.segment_video` (banded/chunked affinity, cached vectorised
  neighbourhood mask, ring-buffer context), PNGs written as the CLI does;
* ``baseline``  — a faithful re-implementation, in this file, of the reference loop of
  facebookresearch/dino ``eval_video_segmentation.py``: cv2 frame reading, DINO-style ViT forward
  (``get_intermediate_layers``, attention matrix materialised), the four-nested-loop neighbourhood mask,
  a dense (n, T, T) affinity, ``queue.Queue`` of the previous frames, the per-channel ``norm_mask`` loop;
* ``peer``      — with ``--peer PATH``: the reference file itself from a dino checkout, its
  ``VisionTransformer`` loaded with the same weights (on a CPU-only machine ``Tensor.cuda`` is made a no-op).

Both sides use the same random-weight ViT and the reference's colour normalisation (std 0.228 for red),
so the masks can be compared pixel for pixel. Two modes: ``e2e`` (read frames → features → propagate →
write PNGs; frames/s over the whole video, the reference's mask building included) and ``prop`` (features
precomputed with one extractor for both; times propagation + upsampling only, so the masks must agree up
to floating-point summation order). Every case runs in a fresh subprocess, so its peak RSS is its own.

    python benchmarks/bench_video.py                                  # 50 frames, 480 x 854, ViT-S/8, stride 8
    python benchmarks/bench_video.py --frames 10 --height 240 --width 427 --tiny
    python benchmarks/bench_video.py --peer /tmp/dino_ref --device cuda
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import queue
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from _isolated import run_isolated  # noqa: E402  (benchmarks/ is the script's folder)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

REF_MEAN, REF_STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)  # the reference's color_normalize


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
    img_dir = folder / "JPEGImages" / "480p" / "synth"
    ann_dir = folder / "Annotations" / "480p" / "synth"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    span = wid - 2 * radius - 8
    for t in range(n):
        frame, mask = bg.copy(), np.zeros((hgt, wid), np.uint8)
        centres = [(hgt // 3, radius + 4 + int(span * t / max(1, n - 1))),
                   (2 * hgt // 3, wid - radius - 4 - int(span * t / max(1, n - 1) / 2))]
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


def build_vit(tiny: bool):
    from vitdense import create_vit

    torch.manual_seed(0)
    if tiny:
        return create_vit("vit_small_patch8_224", embed_dim=96, depth=4, num_heads=3, img_size=224, patch_size=8)
    return create_vit("vit_small_patch8_224")


class DinoViT(nn.Module):
    """A timm ViT (deep-copied) behind the official DINO ViT's ``get_intermediate_layers``: patch
    embedding, CLS token, bicubic position-embedding resampling with the +0.1 offset, blocks computing the
    attention matrix explicitly (as the official model does), final norm."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        vit = copy.deepcopy(vit)
        self.proj, self.cls_token, self.pos_embed = vit.patch_embed.proj, vit.cls_token, vit.pos_embed
        self.blocks, self.norm = vit.blocks, vit.norm
        self.patch_size = int(vit.patch_embed.patch_size[0])
        for block in self.blocks:
            block.attn.fused_attn = False

    def pos_encoding(self, npatch: int, hgt: int, wid: int) -> torch.Tensor:
        n = self.pos_embed.shape[1] - 1
        if npatch == n and hgt == wid:
            return self.pos_embed
        side = int(math.sqrt(n))
        dim = self.pos_embed.shape[-1]
        h0, w0 = hgt // self.patch_size + 0.1, wid // self.patch_size + 0.1
        grid = F.interpolate(self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
                             scale_factor=(h0 / side, w0 / side), mode="bicubic")
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        hgt, wid = x.shape[-2:]
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_encoding(x.shape[1] - 1, hgt, wid)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out


# ------------------------------------------------------------------------------------------ the baseline
# The reference loop, statement for statement (device instead of .cuda()).

def ref_read_frame(path: str, scale: int = 480) -> tuple[torch.Tensor, int, int]:
    import cv2

    img = cv2.imread(path)
    ori_h, ori_w, _ = img.shape
    if ori_h > ori_w:
        tw, th = scale, int(((scale * ori_h) / ori_w // 64) * 64)
    else:
        th, tw = scale, int(((scale * ori_w) / ori_h // 64) * 64)
    img = cv2.resize(img, (tw, th)).astype(np.float32) / 255.0
    img = torch.from_numpy(np.transpose(img[:, :, ::-1].copy(), (2, 0, 1))).float()
    for t, m, s in zip(img, REF_MEAN, REF_STD):
        t.sub_(m).div_(s)
    return img, ori_h, ori_w


def ref_read_seg(path: str, factor: int, scale: int = 480) -> tuple[torch.Tensor, np.ndarray]:
    seg = Image.open(path)
    w, h = seg.size
    if w > h:
        th, tw = scale, int(((scale * w) / h // 64) * 64)
    else:
        tw, th = scale, int(((scale * h) / w // 64) * 64)
    small = torch.from_numpy(np.array(seg.resize((tw // factor, th // factor), 0)).copy()).float()
    n = int(small.max() + 1)
    onehot = torch.zeros(small.numel(), n).scatter_(1, small.long().view(-1, 1), 1)
    return onehot.view(*small.shape, n).permute(2, 0, 1).unsqueeze(0), np.asarray(seg)


def ref_restrict_neighborhood(h: int, w: int, size: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    if i - size + p < 0 or i - size + p >= h:
                        continue
                    if j - size + q < 0 or j - size + q >= w:
                        continue
                    mask[i, j, i - size + p, j - size + q] = 1
    return mask.reshape(h * w, h * w).to(device)


def ref_norm_mask(mask: torch.Tensor) -> torch.Tensor:
    for c in range(mask.shape[0]):
        m = mask[c]
        if m.max() > 0:
            m = m - m.min()
            mask[c] = m / m.max()
    return mask


def ref_label_propagation(opts: dict, feat_tar: torch.Tensor, h: int, w: int, list_feats: list, list_segs: list,
                          mask_neighborhood: torch.Tensor | None):
    return_feat_tar = feat_tar.T
    ncontext = len(list_feats)
    feat_sources = F.normalize(torch.stack(list_feats), dim=1, p=2)
    feat_tar = F.normalize(feat_tar, dim=1, p=2).unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / 0.1)
    if opts["size"] > 0:
        if mask_neighborhood is None:
            mask_neighborhood = ref_restrict_neighborhood(h, w, opts["size"], aff.device)
            mask_neighborhood = mask_neighborhood.unsqueeze(0).repeat(ncontext, 1, 1)
        aff *= mask_neighborhood
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=opts["topk"])
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat(list_segs)
    nmb_context, n_labels = segs.shape[:2]
    segs = segs.reshape(nmb_context, n_labels, -1).transpose(2, 1).reshape(-1, n_labels).T
    seg_tar = torch.mm(segs, aff).reshape(1, n_labels, h, w)
    return seg_tar, return_feat_tar, mask_neighborhood


def ref_track(opts: dict, n_frames: int, feature_of, first_seg: torch.Tensor, size0: tuple[int, int],
              write=None) -> list[np.ndarray]:
    """The reference's eval_video_tracking_davis loop; feature_of(i) → ((T, D) features, h, w)."""
    que: queue.Queue = queue.Queue(opts["n_last"])
    frame1_feat = feature_of(0)[0].T
    mask_neighborhood = None
    outs = []
    for cnt in range(1, n_frames):
        feat_tar, h, w = feature_of(cnt)
        used_feats = [frame1_feat] + [pair[0] for pair in list(que.queue)]
        used_segs = [first_seg] + [pair[1] for pair in list(que.queue)]
        avg, feat_tar, mask_neighborhood = ref_label_propagation(opts, feat_tar, h, w, used_feats, used_segs,
                                                                 mask_neighborhood)
        if que.qsize() == opts["n_last"]:
            que.get()
        que.put([feat_tar, copy.deepcopy(avg)])
        avg = F.interpolate(avg, scale_factor=opts["patch"], mode="bilinear", align_corners=False,
                            recompute_scale_factor=False)[0]
        _, seg = torch.max(ref_norm_mask(avg), dim=0)
        seg = np.array(Image.fromarray(np.array(seg.squeeze().cpu(), dtype=np.uint8)).resize((size0[1], size0[0]), 0))
        if write is not None:
            write(cnt, seg)
        outs.append(seg)
    return outs


# ------------------------------------------------------------------------------------------ one case

def run_case(impl: str, mode: str, args: argparse.Namespace) -> dict:
    """Inside the subprocess: segment the video, time it, save the masks; returns the JSON row."""
    from vitdense import ViTExtractor
    from vitdense.io import save_png
    from vitdense.video import (LabelPropagator, PropagationConfig, VideoFrames, frame_features,
                                preprocess_frame, read_mask, segment_video, soft_to_labels, video_load_size)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data)
    frames_dir = root / "JPEGImages" / "480p" / "synth"
    mask_path = root / "Annotations" / "480p" / "synth" / "00000.png"
    out_dir = Path(args.work) / f"{impl}_{mode}"
    out_dir.mkdir(parents=True, exist_ok=True)
    frame_files = sorted(str(p) for p in frames_dir.glob("*.jpg"))
    n = len(frame_files)
    vit = build_vit(args.tiny)
    extractor = ViTExtractor("custom", stride=8, model=vit, device=device)
    extractor.mean, extractor.std = REF_MEAN, REF_STD  # the reference's normalisation, for equal masks
    mask, pal = read_mask(mask_path)
    config = PropagationConfig(n_last_frames=7, topk=5, radius=12, temperature=0.1)
    opts = {"n_last": 7, "topk": 5, "size": 12, "patch": 8}
    size = video_load_size(mask.shape, args.load_size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def ours_feature(i: int) -> torch.Tensor:
        frame = np.asarray(Image.open(frame_files[i]).convert("RGB"))
        return frame_features(extractor, preprocess_frame(frame, size, REF_MEAN, REF_STD)[None])[0]

    ours_feature(0)  # warm-up: one forward at this size for every case
    ref_model = DinoViT(vit).to(device).eval() if impl == "baseline" else None
    labels: list[np.ndarray] = []
    frame_times: list[float] = []
    sync()
    start = time.perf_counter()
    if mode == "e2e" and impl == "vitdense":
        last = time.perf_counter()
        for seg in segment_video(extractor, VideoFrames(frames_dir), mask, config, load_size=args.load_size):
            save_png(out_dir / f"{seg.index:05d}.png", seg.labels, palette=pal)
            labels.append(seg.labels)
            sync()
            now = time.perf_counter()
            frame_times.append(now - last)
            last = now
        labels = labels[1:]
        frame_times = frame_times[1:]
    elif mode == "e2e" and impl == "baseline":
        first_seg, seg_ori = ref_read_seg(str(mask_path), 8, args.load_size)
        first_seg = first_seg.to(device)

        def feature_of(i: int):
            frame, _, _ = ref_read_frame(frame_files[i], args.load_size)
            out = ref_model.get_intermediate_layers(frame.unsqueeze(0).to(device), n=1)[0][:, 1:, :]
            h, w = frame.shape[1] // 8, frame.shape[2] // 8
            return out[0].reshape(-1, out.shape[-1]), h, w

        def write(i: int, seg: np.ndarray) -> None:
            im = Image.fromarray(seg)
            im.putpalette(np.asarray(pal, np.uint8).ravel())
            im.save(out_dir / f"{i:05d}.png", format="PNG")

        with torch.no_grad():
            labels = _timed(ref_track, frame_times, sync)(opts, n, feature_of, first_seg, seg_ori.shape, write)
    elif mode == "e2e" and impl == "peer":
        labels = _run_peer(args, vit, frame_files, mask_path, out_dir, device, pal)
    else:  # prop: identical precomputed features for both implementations
        feats = [ours_feature(i) for i in range(n)]
        grid = extractor.num_patches
        sync()
        start = time.perf_counter()
        if impl == "vitdense":
            from vitdense.video import downsample_mask, one_hot

            last = time.perf_counter()
            lab0 = one_hot(downsample_mask(mask, grid), int(mask.max()) + 1).to(device)
            for soft in LabelPropagator(config).run(feats[0], lab0, grid, feats[1:]):
                labels.append(soft_to_labels(soft, grid, 8, mask.shape))
                sync()
                now = time.perf_counter()
                frame_times.append(now - last)
                last = now
        else:
            first_seg, seg_ori = ref_read_seg(str(mask_path), 8, args.load_size)
            labels = _timed(ref_track, frame_times, sync)(opts, n, lambda i: (feats[i], *grid),
                                                          first_seg.to(device), seg_ori.shape)
    sync()
    seconds = time.perf_counter() - start
    np.savez_compressed(out_dir / "labels.npz", labels=np.stack(labels))
    row = dict(impl=impl, mode=mode, frames=n, fps=(n - 1) / seconds, seconds=seconds,
               peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               gpu_mb=torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None,
               grid=list(extractor.num_patches or ()))
    if frame_times:
        row["steady_fps"] = 1 / float(np.median(frame_times))
    return row


def _timed(track, frame_times: list, sync):
    """Wrap ref_track's write/feature hooks so every target frame's time is recorded."""
    def run(opts, n, feature_of, first_seg, size0, write=None):
        last = [time.perf_counter()]

        def on_frame(i, seg):
            if write is not None:
                write(i, seg)
            sync()
            now = time.perf_counter()
            frame_times.append(now - last[0])
            last[0] = now

        return track(opts, n, feature_of, first_seg, size0, on_frame)

    return run


def _run_peer(args, vit, frame_files, mask_path, out_dir, device, pal) -> list[np.ndarray]:
    """The reference file itself (dino checkout at --peer), its VisionTransformer with our weights."""
    from functools import partial

    peer = Path(args.peer).resolve()
    if not (peer / "eval_video_segmentation.py").is_file():
        raise SystemExit(f"--peer {peer}: not a facebookresearch/dino checkout (no eval_video_segmentation.py)")
    sys.path.insert(0, str(peer))
    if device.type == "cpu":
        torch.Tensor.cuda = lambda self, *a, **k: self  # the reference hard-codes .cuda()
    import eval_video_segmentation as evs
    import vision_transformer as vits

    blocks = len(vit.blocks)
    model = vits.VisionTransformer(patch_size=8, embed_dim=vit.embed_dim, depth=blocks,
                                   num_heads=vit.blocks[0].attn.num_heads, mlp_ratio=4, qkv_bias=True,
                                   norm_layer=partial(nn.LayerNorm, eps=1e-6))
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    model.to(device).eval()
    evs.args = argparse.Namespace(output_dir=str(out_dir), n_last_frames=7, size_mask_neighborhood=12, topk=5,
                                  patch_size=8)
    video_dir = str(Path(frame_files[0]).parent)
    evs.read_frame = partial(evs.read_frame, scale_size=[args.load_size])
    first_seg, seg_ori = evs.read_seg(str(mask_path), 8, scale_size=[args.load_size])
    evs.eval_video_tracking_davis(evs.args, model, evs.read_frame_list(video_dir), video_dir, first_seg,
                                  seg_ori, np.asarray(pal, np.uint8).reshape(-1, 3))
    written = Path(out_dir) / Path(video_dir).name
    return [np.array(Image.open(written / f"{i:05d}.png")) for i in range(1, len(frame_files))]


# ------------------------------------------------------------------------------------------ driver

def measure(impl: str, mode: str, args: argparse.Namespace) -> dict | None:
    return run_isolated(__file__, [impl, mode, "--device", args.device, "--data", args.data, "--work", args.work,
                                   "--load-size", args.load_size, "--threads", args.threads]
                        + (["--tiny"] if args.tiny else []) + (["--peer", args.peer] if args.peer else []),
                        args.timeout, f"{impl} {mode}")


def agreement(work: Path, a: str, b: str) -> tuple[float, float] | None:
    """(fraction of equal pixels, mean J of the objects) between two cases' masks."""
    from vitdense.davis import region_similarity

    fa, fb = work / a / "labels.npz", work / b / "labels.npz"
    if not (fa.exists() and fb.exists()):
        return None
    la, lb = np.load(fa)["labels"], np.load(fb)["labels"]
    if la.shape != lb.shape:
        return None
    ids = [i for i in np.unique(np.concatenate([la.ravel()[:: 97], lb.ravel()[:: 97]])) if i > 0]
    js = [region_similarity(lb == i, la == i).mean() for i in ids] or [1.0]
    return float(np.mean(la == lb)), float(np.mean(js))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", help="path to a facebookresearch/dino checkout (never committed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=854)
    parser.add_argument("--load-size", type=int, default=480, help="shorter side after resizing (DINO: 480)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per case (0 = torch default)")
    parser.add_argument("--tiny", action="store_true", help="a 4-block, 96-channel ViT/8 instead of ViT-S/8")
    parser.add_argument("--modes", nargs="+", default=["e2e", "prop"], choices=["e2e", "prop"])
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per case before giving up")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], args)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
        args.data, args.work = str(Path(tmp) / "data"), str(Path(tmp) / "work")
        make_video(Path(args.data), args.frames, (args.height, args.width))
        model = "tiny ViT/8 (96 ch, 4 blocks)" if args.tiny else "ViT-S/8"
        print(f"device {args.device}, {model} random weights, stride 8, {args.frames} frames of "
              f"{args.width}x{args.height} (resized to {args.load_size} px short side), n_last 7, topk 5, radius 12\n")
        impls = ["vitdense", "baseline"] + (["peer"] if args.peer else [])
        print(f"{'mode':<5} {'impl':<9} {'frames/s':>9} {'steady f/s':>11} {'peak RSS MB':>12} {'GPU MB':>8} "
              f"{'speed-up':>9} {'mem ratio':>10} {'equal px':>9} {'J vs ours':>10}")
        for mode in args.modes:
            rows = {}
            for impl in impls:
                if impl == "peer" and mode == "prop":
                    continue
                rows[impl] = measure(impl, mode, args)
            ours = rows.get("vitdense")
            for impl, row in rows.items():
                if row is None or row.get("timeout"):
                    print(f"{mode:<5} {impl:<9} {'failed' if row is None else 'timeout':>9}")
                    continue
                speed = mem = ""
                if impl != "vitdense" and ours and not ours.get("timeout"):
                    speed = f"{ours['fps'] / row['fps']:.2f}x"
                    mem = f"{ours['peak_mb'] / row['peak_mb']:.2f}x"
                agree = agreement(Path(args.work), f"vitdense_{mode}", f"{impl}_{mode}") if impl != "vitdense" else None
                gpu = f"{row['gpu_mb']:.0f}" if row.get("gpu_mb") is not None else "-"
                print(f"{mode:<5} {impl:<9} {row['fps']:>9.3f} {row.get('steady_fps', float('nan')):>11.3f} "
                      f"{row['peak_mb']:>12.0f} {gpu:>8} {speed:>9} {mem:>10} "
                      f"{(f'{agree[0]:.5f}' if agree else ''):>9} {(f'{agree[1]:.4f}' if agree else ''):>10}",
                      flush=True)
        print("\nspeed-up = vitdense frames/s / that row's frames/s (whole video incl. one-time setup); steady f/s "
              "= 1 / median frame time; mem ratio = vitdense peak RSS / that row's (lower is better); equal px = "
              "fraction of identical output pixels vs vitdense, J vs ours = mean object IoU between the two outputs")


if __name__ == "__main__":
    main()
