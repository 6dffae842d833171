"""The report card (`vitdense evaluate`): metrics against independent computations, a backbone that sees
the objects against the floor, the whole command on a tiny data set, reproducibility and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import assert_user_error, run_cli, save_tiny_weights, tiny_vit

from vitdense import ConfigError, ViTExtractor
from vitdense.evaluate import (Candidate, EvalSettings, evaluate_backbones, mask_scores, pair_targets,
                               random_like)
from vitdense.extractor import Features

SIZE = 96
RED, YELLOW, BLUE = (230, 20, 20), (235, 225, 20), (20, 40, 230)
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (768 - 9)


def _background(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Greenish-blue gradient with noise: nothing red or yellow in it."""
    y, x = np.mgrid[:size, :size]
    base = np.stack([np.full_like(x, 40), 60 + x, 80 + y], -1).astype(np.float64)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _disk(size: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (y - cy) ** 2 + (x - cx) ** 2 < r * r


def write_tiny_eval_set(root: Path, seed: int = 0) -> Path:
    """A data folder in the report card's layout (manifest format 1): red objects on greenish scenes,
    two k-NN classes, a disparity pair and a homography pair, one two-object video."""
    import cv2

    rng = np.random.default_rng(seed)
    man: dict = {"format": "vitdense-eval", "version": 1, "seed": seed, "coseg": [], "knn": {}, "pairs": [],
                 "video": [], "sources": []}
    for g in range(2):
        group = {"group": f"g{g}", "images": [], "masks": [], "stamps": []}
        for i in range(3):
            im = _background(rng)
            r = rng.integers(16, 24)
            cy, cx = rng.integers(r + 2, SIZE - r - 2, 2)
            mask = _disk(SIZE, cy, cx, r)
            im[mask] = RED
            folder = root / "coseg" / group["group"]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(folder / f"{i:02d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{i:02d}_mask.png")
            group["images"].append(f"coseg/{group['group']}/{i:02d}.png")
            group["masks"].append(f"coseg/{group['group']}/{i:02d}_mask.png")
        man["coseg"].append(group)
    spec: dict = {"classes": ["blue", "red"], "bank": [], "query": []}
    for split, n in (("bank", 4), ("query", 3)):
        for c, colour in enumerate((BLUE, RED)):
            for i in range(n):
                im = np.full((64, 64, 3), 128, np.uint8)
                im[12 + i:44 + i, 16:48] = colour
                folder = root / "knn" / "toy" / split / spec["classes"][c]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(im).save(folder / f"{i}.png")
                spec[split].append([f"knn/toy/{split}/{spec['classes'][c]}/{i}.png", c])
    man["knn"]["toy"] = spec
    a = _background(rng)
    a[20:40, 30:60] = RED
    folder = root / "pairs" / "disp"
    folder.mkdir(parents=True)
    disparity = np.full((SIZE, SIZE), 4.0, np.float32)
    disparity[:6] = np.inf
    Image.fromarray(a).save(folder / "a.png")
    Image.fromarray(np.roll(a, -4, axis=1)).save(folder / "b.png")
    np.save(folder / "disparity.npy", disparity)
    man["pairs"].append({"name": "disp", "kind": "disparity", "a": "pairs/disp/a.png", "b": "pairs/disp/b.png",
                         "disparity": "pairs/disp/disparity.npy"})
    hom = np.array([[np.cos(0.2), -np.sin(0.2), 12.0], [np.sin(0.2), np.cos(0.2), -6.0], [0, 0, 1]])
    folder = root / "pairs" / "h00"
    folder.mkdir(parents=True)
    Image.fromarray(a).save(folder / "a.png")
    Image.fromarray(cv2.warpPerspective(a, hom, (SIZE, SIZE))).save(folder / "b.png")
    man["pairs"].append({"name": "h00", "kind": "homography", "a": "pairs/h00/a.png", "b": "pairs/h00/b.png",
                         "H": hom.tolist()})
    seq: dict = {"name": "v00", "frames": [], "masks": []}
    folder = root / "video" / "v00"
    folder.mkdir(parents=True)
    scene = _background(rng)
    for t in range(6):
        im, labels = scene.copy(), np.zeros((SIZE, SIZE), np.uint8)
        first = _disk(SIZE, 40, 24 + 5 * t, 14)
        second = _disk(SIZE, 66, 72 - 4 * t, 9)
        im[first], labels[first] = RED, 1
        im[second], labels[second] = YELLOW, 2
        Image.fromarray(im).save(folder / f"{t:05d}.png")
        pal = Image.fromarray(labels, "P")
        pal.putpalette(PALETTE)
        pal.save(folder / f"{t:05d}_mask.png")
        seq["frames"].append(f"video/v00/{t:05d}.png")
        seq["masks"].append(f"video/v00/{t:05d}_mask.png")
    man["video"].append(seq)
    (root / "manifest.json").write_text(json.dumps(man, indent=1))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_eval_set(tmp_path_factory.mktemp("evaldata") / "eval")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", depth=12)


TINY = EvalSettings(load_size=64, knn_load_size=64)


# ---------------------------------------------------------------------------------------------- metrics

def test_mask_scores_on_known_masks():
    pred = np.zeros((10, 10), bool)
    gt = np.zeros((10, 10), bool)
    pred[:, :5] = True  # 50 px
    gt[:, 3:8] = True  # 50 px, 20 shared
    scores = mask_scores(pred, gt)
    assert scores == pytest.approx({"jaccard": 20 / 80, "precision": 20 / 50, "recall": 20 / 50})
    assert mask_scores(np.zeros_like(gt), gt)["precision"] == 0.0


def test_settings_reject_unknown_variants():
    for field, option in (("correspond_salient", "--correspond-salient"),
                          ("correspond_kmeans", "--correspond-kmeans"),
                          ("video_normalization", "--video-normalization")):
        with pytest.raises(ConfigError, match=option):
            EvalSettings(**{field: "nope"})


def test_pair_targets_disparity_and_homography(tmp_path):
    np.save(tmp_path / "d.npy", np.array([[2.0, np.inf], [3.0, 1.0]], np.float32))
    pts = np.array([[0, 0], [0, 1], [1, 1], [1, 0]], float)  # (y, x)
    targets, valid = pair_targets({"kind": "disparity", "disparity": "d.npy"}, tmp_path, pts, (2, 4))
    assert valid.tolist() == [False, False, True, False]  # x - d < 0 is outside B; inf is unknown
    assert targets[2].tolist() == [1, 0]
    shift = {"kind": "homography", "H": [[1, 0, 5], [0, 1, -1], [0, 0, 1]]}  # x + 5, y - 1
    targets, valid = pair_targets(shift, tmp_path, np.array([[3.0, 2.0], [0.0, 2.0]]), (10, 10))
    assert targets[0].tolist() == [2.0, 7.0] and valid.tolist() == [True, False]


def test_random_like_reinitialises_every_parameter_and_is_seeded():
    model = tiny_vit(depth=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(5.0)  # "trained" weights far from any initialisation
    a, b = random_like(model, seed=1), random_like(model, seed=1)
    for (name, p), q, r in zip(model.named_parameters(), a.parameters(), b.parameters()):
        assert p.shape == q.shape
        assert not torch.allclose(p, q), name
        assert torch.equal(q, r), name
    assert not torch.equal(next(random_like(model, seed=2).parameters()), next(a.parameters()))


# ---------------------------------------------------------------------------------- a backbone that sees the objects

class ColourExtractor(ViTExtractor):
    """A 'backbone' whose descriptors are the mean colour of each patch and whose saliency is how red and
    yellow the patch is: on the tiny data set it sees every object, so the report must grade it well."""

    def extract(self, batch, layers=11, facet="key", bin=False, include_cls=False, saliency=False):
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        pix = batch * torch.tensor(self.std).view(1, 3, 1, 1) + torch.tensor(self.mean).view(1, 3, 1, 1)
        pooled = F.avg_pool2d(pix, self.p, self.stride[0])  # (B, 3, h, w)
        grid = tuple(pooled.shape[-2:])
        colour = pooled.flatten(2).transpose(1, 2)  # (B, T, 3)
        desc = colour.repeat(1, 1, self.embed_dim // 3)
        if include_cls:
            desc = torch.cat([desc.mean(dim=1, keepdim=True), desc], dim=1)
        warm = (colour[..., 0] - colour[..., 2]).clamp_min(0)  # red and yellow: high R, low B
        sal = warm / warm.amax(dim=1, keepdim=True).clamp_min(1e-6)
        self.load_size, self.num_patches = tuple(batch.shape[-2:]), grid
        return Features({l: desc for l in layer_list}, sal if saliency else None, grid, self.load_size)


def test_a_backbone_that_sees_the_objects_beats_the_floor(data):
    ext = ColourExtractor("colour", stride=4, model=tiny_vit(depth=12), device="cpu")
    report = evaluate_backbones([Candidate("colour", ext, "test")], data, TINY, progress=False)
    assert list(report.results) == ["colour", "random init"]
    good, floor = report.results["colour"], report.results["random init"]
    assert good["coseg"].scores["jaccard"] > 0.8
    assert good["coseg"].scores["jaccard"] > floor["coseg"].scores["jaccard"] + 0.2
    # a uniformly salient object: keeping 60 % of the mass keeps ~60 % of it and nothing else
    assert good["saliency"].scores["precision"] > 0.95
    assert good["saliency"].scores["recall"] == pytest.approx(0.6, abs=0.12)
    assert good["knn"].scores["cls_top1"] == 100.0
    # 96-px frames on a 12x12 token grid: coarse boundaries (random features track flat colours too)
    assert good["video"].scores["jf"] > 0.6
    assert good["correspond"].scores == pytest.approx(_correspond_scores_by_hand(ext, data))
    # marking every pixel scores the objects' share of the images (disks of radius 16-23 in 96x96 images)
    shares = [[np.mean(np.asarray(Image.open(data / m)) > 0) for m in g["masks"]]
              for g in json.loads((data / "manifest.json").read_text())["coseg"]]
    assert report.data["whole_image_jaccard"] == pytest.approx(np.mean([np.mean(s) for s in shares]))
    assert report.data["knn_majority_top1"] == 50.0  # two classes, three queries each
    # the detail rows are the per-image scores the means come from
    rows = good["coseg"].detail
    assert len(rows) == 6
    assert good["coseg"].scores["jaccard"] == pytest.approx(
        np.mean([np.mean([r["jaccard"] for r in rows if r["group"] == g]) for g in ("g0", "g1")]))


def _phone_copy(data: Path, dest: Path) -> Path:
    """The tiny data set as a phone stores it: every co-segmentation and video image and mask turned
    counter-clockwise and tagged EXIF orientation 6 (turn clockwise to view)."""
    import shutil

    shutil.copytree(data, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    files = [f for g in manifest["coseg"] for f in g["images"] + g["masks"]]
    files += [f for seq in manifest["video"] for f in seq["frames"] + seq["masks"]]
    for rel in files:
        with Image.open(data / rel) as im:
            stored = im.transpose(Image.Transpose.ROTATE_90)  # keeps the palette of an indexed mask
        exif = Image.Exif()
        exif[0x0112] = 6
        stored.save(dest / rel, exif=exif)
    return dest


def test_rotated_photos_and_masks_score_as_the_upright_ones(tmp_path, data, weights):
    """Images and their ground-truth masks saved with the same orientation tag are read upright, both:
    the Jaccard of co-segmentation and saliency and the J&F of the video are those of the upright files.
    A mask whose (upright) size is not its image's is a one-line error naming the mask."""
    from vitdense.evalset import load_manifest
    from vitdense.evaluate import run_coseg_and_saliency, run_video

    phone = _phone_copy(data, tmp_path / "phone")
    ext = ColourExtractor("colour", stride=4, model=tiny_vit(depth=12), device="cpu")
    settings = EvalSettings(load_size=64, knn_load_size=64, quick=True, quick_groups=1, quick_frames=4)
    scores = {}
    for name, root in (("upright", data), ("phone", phone)):
        manifest = load_manifest(root)
        coseg = run_coseg_and_saliency(ext, root, manifest, settings, progress=False)
        scores[name] = {**{f"coseg_{k}": v for k, v in coseg["coseg"].scores.items()},
                        **{f"saliency_{k}": v for k, v in coseg["saliency"].scores.items()},
                        **run_video(ext, root, manifest, settings, progress=False).scores}
    assert scores["upright"]["coseg_jaccard"] > 0.8 and scores["upright"]["jf"] > 0.5
    assert scores["phone"] == pytest.approx(scores["upright"], abs=1e-9)

    mask = phone / "coseg" / "g0" / "01_mask.png"
    with Image.open(mask) as im:
        im.crop((0, 0, 80, 96)).save(mask, exif=im.getexif())  # upright 96x80
    assert_user_error(run_cli("evaluate", "--weights", weights, "--data", phone, "--out", tmp_path / "out", *FAST),
                      "01_mask.png", "mask is 96x80 px but its image coseg/g0/01.png is 96x96", "orientation")
    assert not (tmp_path / "out").exists()


def _correspond_scores_by_hand(ext, data: Path) -> dict[str, float]:
    """The report card's correspondence scores recomputed from the best buddies (and the shown pairs) of the
    two pairs: B is A moved 4 px left (rows 0-5 unknown), and A rotated by 0.2 rad and moved by (12, -6);
    true positions that fall outside B's 96x96 pixels are not scored; PCK at α · 96 px, averaged over the
    two pairs."""
    from vitdense import find_correspondences

    disparity_b = lambda y, x: (np.round(y) >= 6, y, x - 4)
    c, s = np.cos(0.2), np.sin(0.2)
    rotated_b = lambda y, x: (np.ones(len(y), bool), s * x + c * y - 6, c * x - s * y + 12)
    rows = []
    for name, truth in (("disp", disparity_b), ("h00", rotated_b)):
        res = find_correspondences(ext, data / "pairs" / name / "a.png", data / "pairs" / name / "b.png",
                                   load_size=64, bin=True, thresh=0.05, seed=0)
        errors = []
        for matches in (res.buddies, res.pairs):  # every buddy, then the pairs the command shows
            (ya, xa), (yb, xb) = matches.points_a.T, matches.points_b.T
            known, ty, tx = truth(ya, xa)
            known &= (ty >= 0) & (ty <= 95) & (tx >= 0) & (tx <= 95)
            errors.append(np.hypot(yb - ty, xb - tx)[known])
        err, shown = errors
        rows.append({**{f"pck@{a:g}": np.mean(err <= a * 96) for a in (0.01, 0.02, 0.05)}, "epe_px": err.mean(),
                     "buddies": len(res.buddies.points_a), "pairs_pck@0.05": np.mean(shown <= 0.05 * 96)})
    return {key: np.mean([r[key] for r in rows]) for key in rows[0]}


def test_coseg_variants_share_one_extraction_and_match_separate_report_cards(data):
    from dataclasses import replace

    from vitdense.evaluate import compare_coseg_settings

    ext = ColourExtractor("colour", stride=4, model=tiny_vit(depth=12), device="cpu")
    variants = {"reference": {"refine": "grabcut", "coseg_saliency": "low", "elbow_k": "after",
                              "elbow_objective": "all", "min_sample": 0},
                "ours": {"refine": "crf", "coseg_saliency": "full", "elbow_k": "before",
                         "elbow_objective": "heldout", "min_sample": 1000}}
    table = compare_coseg_settings([Candidate("colour", ext, "test")], data, variants, TINY, progress=False,
                                   add_floor=False)
    assert list(table) == ["colour"] and list(table["colour"]) == ["reference", "ours"]
    for name, options in variants.items():
        alone = evaluate_backbones([Candidate("colour", ext, "test")], data,
                                   replace(TINY, tasks=("coseg",), **options), progress=False, add_floor=False)
        scores = alone.results["colour"]["coseg"]
        assert {k: table["colour"][name][k] for k in scores.scores} == pytest.approx(scores.scores), name
        assert table["colour"][name]["mean_k"] == pytest.approx(np.mean([r["k"] for r in scores.detail]))
        assert table["colour"][name]["jaccard"] > 0.7, name  # both pipelines find the objects it sees
    with pytest.raises(ConfigError, match="only co-segmentation options, not load_size"):
        compare_coseg_settings([Candidate("colour", ext, "test")], data, {"x": {"load_size": 32}}, TINY)
    with pytest.raises(ConfigError, match="elbow_k 'middle'"):
        compare_coseg_settings([Candidate("colour", ext, "test")], data, {"x": {"elbow_k": "middle"}}, TINY)


# ---------------------------------------------------------------------------------------------- the command

FAST = ["--load-size", "64", "--knn-size", "64", "--device", "cpu"]


def test_evaluate_command_writes_the_report_and_is_reproducible(tmp_path, data, weights):
    outs = []
    for run in range(2):
        out = tmp_path / f"report{run}"
        result = run_cli("evaluate", "--weights", weights, "--compare", weights, "--data", data, "--out", out,
                         *FAST)
        assert result.exit_code == 0, result.output
        outs.append(out)
    report = json.loads((outs[0] / "report.json").read_text())
    assert [b["label"] for b in report["backbones"]] == ["tiny", "tiny (2)", "random init"]
    for label in ("tiny", "tiny (2)", "random init"):
        assert set(report["scores"][label]) == {"coseg", "saliency", "knn", "correspond", "video"}
    # the same weights twice give the same numbers, and a second run reproduces the first
    assert report["scores"]["tiny"] == report["scores"]["tiny (2)"]
    assert json.loads((outs[1] / "report.json").read_text())["scores"] == report["scores"]
    table = (outs[0] / "report.md").read_text()
    assert "| coseg | jaccard |" in table and "random init" in table
    for task in ("coseg", "saliency", "knn", "correspond", "video"):
        chart = np.asarray(Image.open(outs[0] / "charts" / f"{task}.png"))
        assert chart.std() > 10  # a drawn chart, not a blank picture
    for name in ("tiny_coseg", "tiny_saliency", "tiny_correspond", "tiny_video", "random_init_coseg"):
        picture = np.asarray(Image.open(outs[0] / "examples" / f"{name}.png"))
        assert picture.std() > 10, name
    assert not list(tmp_path.glob(".report*"))  # no temporary folder left behind


def test_quick_and_task_subset(tmp_path, data, weights):
    out = tmp_path / "quick"
    result = run_cli("evaluate", "--weights", weights, "--data", data, "--out", out, "--quick", "--tasks",
                     "coseg,knn", "--correspond-salient", "both", "--correspond-kmeans", "torch",
                     "--video-normalization", "model", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]["tiny"]) == {"coseg", "knn"}
    settings = report["settings"]
    assert (settings["correspond_salient"], settings["correspond_kmeans"], settings["video_normalization"]) == \
        ("both", "torch", "model")
    assert [r["group"] for r in report["detail"]["tiny"]["coseg"]] == ["g0"] * 3 + ["g1"] * 3
    knn = report["detail"]["tiny"]["knn"][0]
    assert (knn["bank"], knn["query"]) == (8, 4)  # quick keeps up to 4 bank and 2 query images per class


def test_quick_subset_takes_first_images_of_first_groups_and_homography_pairs():
    from vitdense.evaluate import EvalSettings, _coseg_groups, _correspond_pairs

    manifest = {"coseg": [{"group": f"g{g}", "images": [f"g{g}/{i}.png" for i in range(6)],
                           "masks": [f"g{g}/{i}_mask.png" for i in range(6)]} for g in range(4)]}
    quick = _coseg_groups(manifest, EvalSettings(quick=True, quick_groups=2, quick_group_images=3))
    assert [g["group"] for g in quick] == ["g0", "g1"]
    assert [g["images"] for g in quick] == [[f"g{g}/{i}.png" for i in range(3)] for g in range(2)]
    assert [g["masks"] for g in quick] == [[f"g{g}/{i}_mask.png" for i in range(3)] for g in range(2)]
    assert len(manifest["coseg"][0]["images"]) == 6  # the manifest itself is left whole
    assert _coseg_groups(manifest, EvalSettings()) == manifest["coseg"]

    manifest["pairs"] = [{"name": "stereo", "kind": "disparity"}] + \
        [{"name": f"h{i}", "kind": "homography"} for i in range(3)]
    assert [p["name"] for p in _correspond_pairs(manifest, EvalSettings(quick=True, quick_pairs=2))] == ["h0", "h1"]
    assert [p["name"] for p in _correspond_pairs(manifest, EvalSettings(quick=True, quick_pairs=5))] == \
        ["h0", "h1", "h2", "stereo"]
    assert _correspond_pairs(manifest, EvalSettings()) == manifest["pairs"]


def test_bad_input(tmp_path, data, weights):
    out = tmp_path / "out"
    assert_user_error(run_cli("evaluate", "--model", "no_such_model", "--data", data, "--out", out, *FAST),
                      "no_such_model")
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    assert_user_error(run_cli("evaluate", "--weights", bad, "--data", data, "--out", out, *FAST), str(bad))
    assert_user_error(run_cli("evaluate", "--weights", weights, "--data", data, "--out", out, "--tasks", "nope",
                              *FAST), "--tasks")
    assert_user_error(run_cli("evaluate", "--weights", weights, "--data", data, *FAST), "--out")
    # an incomplete data folder, and one from another version
    broken = tmp_path / "broken"
    write_tiny_eval_set(broken)
    (broken / "coseg" / "g1" / "02_mask.png").unlink()
    assert_user_error(run_cli("evaluate", "--weights", weights, "--data", broken, "--out", out, *FAST),
                      "02_mask.png")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["version"] = 99
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(run_cli("evaluate", "--weights", weights, "--data", broken, "--out", out, *FAST), "99")
    assert not out.exists()  # nothing half-written


def test_video_frames_of_another_size_are_one_error_before_any_task(tmp_path, weights):
    """A video whose frames (each with a mask of its size) change size midway: the check of the data folder
    names the video, the first frame of another size and both sizes, before any backbone runs."""
    broken = write_tiny_eval_set(tmp_path / "broken")
    folder = broken / "video" / "v00"
    for name in ("00003.png", "00003_mask.png", "00004.png", "00004_mask.png"):
        with Image.open(folder / name) as im:
            im.crop((0, 0, SIZE, SIZE - 16)).save(folder / name)
    out = tmp_path / "out"
    r = run_cli("evaluate", "--weights", weights, "--data", broken, "--out", out, "--tasks", "video", *FAST)
    assert_user_error(r, "video v00", "00003.png is 96x80", "00000.png is 96x96")
    assert not out.exists()


def test_ablation_app_runs_each_variant_per_seed(tmp_path, data, weights):
    """apps/ablate_cosegment.py: the reference plus the chosen variants, each over k-means seeds; the table's
    means and spreads are those of the per-seed scores it also writes."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "apps" / "ablate_cosegment.py"
    spec = importlib.util.spec_from_file_location("ablate_cosegment", path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    out = tmp_path / "ablation"
    assert app.main(["--weights", str(weights), "--data", str(data), "--out", str(out), "--seeds", "2",
                     "--variants", "--elbow-k before"]) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert list(result["variants"]) == ["reference", "--elbow-k before"]
    assert result["variants"]["--elbow-k before"] == {**app.REFERENCE, "elbow_k": "before"}
    for label in ("tiny", "random init"):
        assert set(result["per_seed"][label]) == {"reference @0", "reference @1", "--elbow-k before @0",
                                                  "--elbow-k before @1"}
        runs = [result["per_seed"][label][f"reference @{s}"]["jaccard"] for s in (0, 1)]
        assert result["scores"][label]["reference"]["jaccard"] == pytest.approx(np.mean(runs))
        assert result["scores"][label]["reference"]["jaccard_std"] == pytest.approx(np.std(runs))
    assert "| --elbow-k before |" in (out / "ablation.md").read_text()
    assert app.main(["--weights", str(weights), "--data", str(data), "--out", str(tmp_path / "x"),
                     "--variants", "--elbow-k sideways"]) == 2
    assert not (tmp_path / "x").exists()
