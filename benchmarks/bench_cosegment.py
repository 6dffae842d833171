"""Co-segmentation time and peak memory: ``vitdense cosegment`` vs dino-vit-features' find_cosegmentation.

Same random ViT-S/8 weights (seed 0) and the same N real photos (scikit-image's and the repo's examples,
randomly cropped/flipped and resized to 400x300 or 300x400, seeded), load size 224, stride 4, key facet of
layer 11, defaults of both implementations (elbow 0.975, sample interval 100, k-means 300 iterations x 10
restarts). Each case runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own.

Ours runs the real CLI command with its defaults, the peer's pipeline (GrabCut refinement, the half-size
saliency pass; writing PNGs/summary is timed apart); its extractor is built from the same ViT with the
DINO saliency heads (0, 2, 4, 5) the peer uses. The peer's stages are
measured by wrapping its extractor calls (extraction) and cv2.grabCut (refinement); the rest of its run
(k-means, voting, resizing) is "cluster". The object masks are compared pixel for pixel (at the load size;
the peer's GrabCut seeded per image as ours, which its own code leaves unseeded). With ``--parts`` both part
co-segmentations run as well (peer: find_part_cosegmentation; its CRF and clustering are not separable, so
they are reported together).

    python benchmarks/bench_cosegment.py                       # 10 images, peer from /tmp/peer when present
    python benchmarks/bench_cosegment.py --n 10 50 --parts --peer /path/to/dino-vit-features
    python benchmarks/bench_cosegment.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from _isolated import run_isolated  # noqa: E402  (benchmarks/ is the script's folder)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n photos of about 400x300 px: crops (70-100 %) and mirror images of real photos, seeded."""
    from PIL import Image
    from skimage import data

    bases = [Image.fromarray(getattr(data, name)()) for name in ("chelsea", "coffee", "astronaut", "rocket")]
    bases += [Image.open(p).convert("RGB") for p in sorted((ROOT / "examples").glob("*/*.jpg"))]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        im = bases[i % len(bases)]
        scale = rng.uniform(0.7, 1.0)
        cw, ch = int(im.width * scale), int(im.height * scale)
        left, top = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
        crop = im.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = crop.resize((400, 300) if crop.width >= crop.height else (300, 400), Image.BICUBIC)
        path = folder / f"img_{i:03d}.jpg"
        crop.save(path, quality=92)
        paths.append(path)
    return paths


def vit_s8() -> torch.nn.Module:
    sys.path.insert(0, str(ROOT))
    from vitdense import create_vit

    torch.manual_seed(0)
    return create_vit("vit_small_patch8_224")


def run_ours(folder: Path, out: Path, device: str, parts: bool, load_size: int = 224) -> dict:
    """Inside the subprocess: the CLI command on folder; stage timings from its summary.json."""
    from vitdense import ViTExtractor
    from vitdense.cli import main
    import vitdense.commands.cosegment as command

    masks: list[np.ndarray] = []
    if not parts:  # keep the object masks at the load size (the command writes them at the photos' size)
        import vitdense.cosegment as library

        refine = library.refine_objects

        def keep_masks(*a, **kw):
            out = refine(*a, **kw)
            masks.extend(out)
            return out

        library.refine_objects = keep_masks
    vit = vit_s8()
    # The command builds its extractor from --model/--weights; here it gets the same in-memory ViT as the peer.
    command.build_extractor = lambda **opts: ViTExtractor("dino_vits8", stride=opts["stride"], model=vit,
                                                          device=device)
    args = ["part-cosegment" if parts else "cosegment", str(folder), "--out", str(out), "--device", device,
            "--load-size", str(load_size)]
    start = time.perf_counter()
    main.main(args, standalone_mode=False)
    total = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    t = summary["timings_s"]
    stages = {"extract": t["extract"], "cluster": t["cluster"],
              "refine": t["refine"] if not parts else t["parts_and_crf"], "write": t["write"]}
    if masks:
        np.savez(out.parent / f"masks_ours_{len(masks)}.npz", *masks)
    return dict(total=total, compute=total - t["write"], stages=stages, k=summary["k"])


class PeerTimeLimit(Exception):
    """The peer's run reached --timeout: its time so far is a lower bound."""


def run_peer(folder: Path, peer: str, device: str, parts: bool, limit: float, load_size: int = 224) -> dict:
    """Inside the subprocess: dino-vit-features' find_(part_)cosegmentation with stage timers around it.

    After ``limit`` seconds of the peer's own run (imports and model building not counted) it is stopped and
    reported with ``timeout: True``: its seconds and peak memory so far are lower bounds.
    """
    sys.path.insert(0, str(ROOT))
    from benchmarks._peer import DinoStyleViT, import_peer
    from vitdense.extractor import interpolate_pos_embed

    class AnySizeDinoViT(DinoStyleViT):
        """The official DINO ViT's position-embedding interpolation, which the peer's saliency pass relies on
        (stride 8 = patch size at half the load size, so the peer leaves the model's own method in place)."""

        def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
            p = self.patch_embed.patch_size
            patch_pos = interpolate_pos_embed(self.pos_embed[:, 1:], (w // p, h // p))
            return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    vit = vit_s8()
    module = import_peer(peer, vit, module="part_cosegmentation" if parts else "cosegmentation")
    extractor_mod = sys.modules["extractor"]
    extractor_mod.ViTExtractor.create_model = staticmethod(lambda model_type: AnySizeDinoViT(vit))
    spent = {"extract": 0.0, "refine": 0.0}

    def timed(fn, key):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - start
        return wrapper

    for name in ("preprocess", "extract_descriptors", "extract_saliency_maps"):
        setattr(extractor_mod.ViTExtractor, name, timed(getattr(extractor_mod.ViTExtractor, name), "extract"))
    if not parts:
        grabcut = module.cv2.grabCut

        def seeded_grabcut(*a, **kw):
            # seeded as vitdense seeds it (the peer leaves OpenCV's generator where the last image left it),
            # so that the masks can be compared pixel for pixel
            module.cv2.setRNGSeed(0)
            return grabcut(*a, **kw)

        module.cv2.grabCut = timed(seeded_grabcut, "refine")  # this case's own process: patched for it alone
    trained_k: list[int] = []  # the peer returns no k: record each k-means it builds (the last is the one used)
    kmeans_class = module.faiss.Kmeans

    def recording_kmeans(*a, **kw):
        trained_k.append(int(kw.get("k", a[1] if len(a) > 1 else 0)))
        return kmeans_class(*a, **kw)

    module.faiss = types.SimpleNamespace(**{**vars(module.faiss), "Kmeans": recording_kmeans})
    paths = sorted(folder.glob("*.jpg"))

    def stop(signum: int, frame: object) -> None:
        raise PeerTimeLimit

    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, limit)
    timed_out = False
    start = time.perf_counter()
    try:
        with torch.no_grad():  # as the peer's __main__ does
            if parts:
                module.find_part_cosegmentation(paths, load_size=load_size, stride=4)
            else:
                masks, _ = module.find_cosegmentation(paths, load_size=load_size, stride=4)
                np.savez(folder.parent / f"masks_peer_{len(paths)}.npz", *[np.asarray(m, bool) for m in masks])
    except PeerTimeLimit:
        timed_out = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    total = time.perf_counter() - start
    stages = {"extract": spent["extract"], "cluster": total - spent["extract"] - spent["refine"],
              "refine": spent["refine"], "write": 0.0}
    if parts:  # clustering and CRF interleave in the peer's code
        stages["refine"], stages["cluster"] = stages["cluster"], 0.0
    # object stage: the k of the last k-means of the first elbow search (parts: before the part k-means)
    k = None if timed_out or not trained_k else trained_k[-1] if not parts else (trained_k[:-1] or trained_k)[-1]
    return dict(total=total, compute=total, stages=stages, k=k, timeout=timed_out)


def compare_masks(workdir: Path, n: int) -> str:
    """Our object masks against the peer's (both at the load size, saved by the cases), pixel for pixel."""
    files = [workdir / f"masks_{impl}_{n}.npz" for impl in ("ours", "peer")]
    if not all(f.is_file() for f in files):
        return "not compared (a case saved none)"
    ours, peer = ([z[f"arr_{i}"] for i in range(len(z.files))] for z in map(np.load, files))
    if len(ours) != len(peer) or any(a.shape != b.shape for a, b in zip(ours, peer)):
        return f"not comparable ({len(ours)} vs {len(peer)} masks, or their sizes differ)"
    differ = [int((a != b).sum()) for a, b in zip(ours, peer)]
    total = sum(a.size for a in ours)
    return (f"{sum(d == 0 for d in differ)}/{len(differ)} identical, {sum(differ)} of {total} pixels differ "
            f"(the peer's GrabCut seeded as ours)")


def case(impl: str, n: int, parts: bool, args: argparse.Namespace) -> dict | None:
    # The peer stops itself after --timeout seconds and reports its partial run; the hard limit here only
    # catches a case stuck in one long native call (then nothing is known but that it timed out).
    return run_isolated(__file__, [impl, n, int(parts), "--device", args.device, "--workdir", args.workdir,
                                   "--timeout", args.timeout, "--load-size", args.load_size]
                        + (["--peer", args.peer] if args.peer else []),
                        args.timeout + 600, f"{impl} n={n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10], help="numbers of images (issue: 10 and 50)")
    parser.add_argument("--peer", default="/tmp/peer" if Path("/tmp/peer/cosegmentation.py").is_file() else None,
                        help="dino-vit-features checkout (default: /tmp/peer when present; 'none' to skip)")
    parser.add_argument("--parts", action="store_true", help="also benchmark part co-segmentation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=int, default=3600,
                        help="seconds the peer may run per case; past it the peer is stopped and its time so far "
                             "reported as a lower bound (ratios marked >=)")
    parser.add_argument("--load-size", type=int, default=224, help="shorter side the images are resized to (both)")
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer == "none":
        args.peer = None
    if args.case:
        impl, n, parts = args.case[0], int(args.case[1]), bool(int(args.case[2]))
        folder = Path(args.workdir) / f"images_{n}"
        if impl == "ours":
            result = run_ours(folder, Path(args.workdir) / f"out_{n}_{int(parts)}", args.device, parts, args.load_size)
        else:
            result = run_peer(folder, args.peer, args.device, parts, args.timeout, args.load_size)
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if args.device.startswith("cuda"):
            result["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = tmp
        print(f"device {args.device}, random ViT-S/8, load size {args.load_size}, stride 4, key facet layer 11; "
              f"peer: {args.peer or 'not run'}\n")
        header = (f"{'task':<6} {'N':>3} {'impl':<5} {'extract s':>9} {'cluster s':>9} {'refine s':>9} "
                  f"{'compute s':>9} {'write s':>8} {'peak MB':>8} {'k':>3}")
        print(header)
        ratios = []
        for n in args.n:
            make_images(Path(tmp) / f"images_{n}", n)
            for parts in ([False, True] if args.parts else [False]):
                task = "parts" if parts else "coseg"
                rows = {}
                for impl in ["ours"] + (["peer"] if args.peer else []):
                    res = case(impl, n, parts, args)
                    if res is None or "stages" not in res:
                        print(f"{task:<6} {n:>3} {impl:<5} {'killed at the hard limit' if res else 'failed'}")
                        continue
                    rows[impl] = res
                    s, cut = res["stages"], ">" if res.get("timeout") else " "
                    print(f"{task:<6} {n:>3} {impl:<5} {cut}{s['extract']:>8.1f} {cut}{s['cluster']:>8.2f} "
                          f"{cut}{s['refine']:>8.2f} {cut}{res['compute']:>8.1f} {s['write']:>8.2f} "
                          f"{cut}{res['peak_mb']:>7.0f} {res['k'] if res['k'] is not None else '-':>3}"
                          + ("  (stopped at --timeout: lower bounds)" if res.get("timeout") else ""), flush=True)
                if len(rows) == 2:
                    ours, peer = rows["ours"], rows["peer"]
                    if not parts and not peer.get("timeout"):
                        print(f"{'':<6} {n:>3} masks: {compare_masks(Path(tmp), n)}", flush=True)
                    ratios.append((task, n, peer["stages"]["extract"] / ours["stages"]["extract"],
                                   peer["compute"] / ours["compute"], peer["compute"] / ours["total"],
                                   ours["peak_mb"] / peer["peak_mb"], bool(peer.get("timeout"))))
        if ratios:
            print(f"\n{'task':<6} {'N':>3} {'extract speed-up':>17} {'compute speed-up':>17} "
                  f"{'end-to-end speed-up':>20} {'peak RAM ratio':>15}")
            for task, n, ext, comp, e2e, mem, cut in ratios:
                ge, le = (">=", "<=") if cut else ("  ", "  ")
                print(f"{task:<6} {n:>3} {ge}{ext:>14.2f}x {ge}{comp:>14.2f}x {ge}{e2e:>17.2f}x {le}{mem:>12.2f}x")
            print("\nspeed-up = peer seconds / our seconds (higher is better); compute = extract + cluster + "
                  "refine; end-to-end counts our PNG/JSON writing too (the peer's function writes nothing); "
                  "peak RAM ratio = our peak RSS / peer peak RSS (lower is better); >= / <=: the peer was "
                  "stopped at --timeout, so its numbers are lower bounds.")


if __name__ == "__main__":
    main()
