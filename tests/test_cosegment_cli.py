"""`vitdense cosegment / part-cosegment` end to end on real photos, bad input, and apps/eval_cosegmentation.py."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli, save_tiny_weights

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--load-size", "48", "--niter", "20", "--nredo", "2"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", depth=12)


@pytest.fixture
def images(tmp_path, photos):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        im = Image.fromarray(photos[name])
        im.thumbnail((160, 160))  # different sizes and aspect ratios
        im.save(folder / f"{name}.jpg")
    (folder / "readme.txt").write_text("not an image, ignored by suffix")
    return folder


def test_cosegment_end_to_end_and_deterministic(tmp_path, images, weights):
    outs = []
    for run_id, ram_mb in enumerate([1024, 0]):  # the second run keeps every descriptor on disk
        out = tmp_path / f"out{run_id}"
        result = run_cli("cosegment", images, "--out", out, "--weights", weights, "--seed", 3, "--ram-mb", ram_mb,
                     *FAST)
        assert result.exit_code == 0, result.output
        outs.append(out)
    assert json.loads((outs[1] / "summary.json").read_text())["descriptors_on_disk"] == 3
    summary = json.loads((outs[0] / "summary.json").read_text())
    assert summary["descriptors_on_disk"] == 0
    assert summary["n_images"] == 3 and summary["k"] == len(summary["votes"]) >= 1
    assert set(summary["timings_s"]) == {"extract", "cluster", "refine", "write"}
    assert (outs[0] / "contact_sheet.png").is_file()
    for entry in summary["images"]:
        name = Path(entry["file"]).stem
        with Image.open(images / f"{name}.jpg") as im:
            size = (im.height, im.width)
        mask = np.asarray(Image.open(outs[0] / f"{name}_mask.png"))
        assert mask.shape == size and set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(outs[0] / f"{name}_overlay.png")).shape == size + (3,)
        # the resized image has shorter side 48; the stride-4 grid of an 8-px patch: 1 + (48 - 8) / 4 = 11
        assert min(entry["resized"]) == 48 and min(entry["grid"]) == 11
        assert entry["foreground_fraction"] == pytest.approx((mask > 0).mean())
        # same seed, same masks
        assert (outs[1] / f"{name}_mask.png").read_bytes() == (outs[0] / f"{name}_mask.png").read_bytes()


def test_part_cosegment_end_to_end(tmp_path, images, weights):
    out = tmp_path / "parts"
    result = run_cli("part-cosegment", images, "--out", out, "--weights", weights, "--parts", 3, "--clusters", 4,
                 "--votes-percentage", 1, "--thresh", 0, *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_parts"] == 3 and summary["k"] == 4
    palettes = []
    for entry in summary["images"]:
        with Image.open(out / entry["mask"]) as im:
            assert im.mode == "P"
            labels = np.asarray(im)
            palettes.append(im.getpalette()[:3 * 4])
        assert labels.max() <= 3 and labels.shape == tuple(entry["size"])
        assert sum(entry["part_fractions"]) == pytest.approx(1.0)
    # the same part has the same colour in every image; background black, parts distinct
    assert all(p == palettes[0] for p in palettes)
    colours = [tuple(palettes[0][3 * i:3 * i + 3]) for i in range(4)]
    assert colours[0] == (0, 0, 0) and len(set(colours)) == 4
    # three stages with crop augmentations: augmentations are clustered but not written
    out3 = tmp_path / "parts3"
    result = run_cli("part-cosegment", images, "--out", out3, "--weights", weights, "--parts", "auto",
                 "--three-stages", "--crop-augmentations", 1, "--votes-percentage", 1, "--thresh", 0, *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out3 / "summary.json").read_text())
    assert summary["n_augmentations"] == 6 and summary["stage2_k"] >= 1
    assert len(list(out3.glob("*_mask.png"))) == 3


def test_remove_outliers_leaves_out_the_image_farthest_from_the_mean_cls(tmp_path, images, weights):
    from vitdense.cli import build_extractor

    # independent: each image's CLS key descriptor (layer 11) and its cosine similarity to the mean one
    extractor = build_extractor(model=None, weights=str(weights), device="cpu", dtype="float32", stride=4)
    paths = sorted(images.glob("*.jpg"))
    cls = []
    for path in paths:
        feats = extractor.extract(extractor.preprocess(path, 48)[0], [11], "key", include_cls=True)
        cls.append(feats.descriptors[11][0, 0].double().numpy())
    cls = np.stack(cls)
    mean = cls.mean(axis=0)
    sims = cls @ mean / np.linalg.norm(cls, axis=1) / np.linalg.norm(mean)
    order = np.argsort(sims)
    assert sims[order[1]] - sims[order[0]] > 1e-4  # a threshold between them is not a float tie
    thresh = float(sims[order[0]] + sims[order[1]]) / 2
    out = tmp_path / "o"
    result = run_cli("cosegment", images, "--out", out, "--weights", weights, "--remove-outliers",
                     "--outliers-thresh", thresh, "--refine", "none", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    outlier = paths[order[0]]
    assert summary["outliers"] == [str(outlier)]
    assert sorted(summary["inliers"]) == sorted(str(p) for p in paths if p != outlier)
    assert not np.asarray(Image.open(out / f"{outlier.stem}_mask.png")).any()
    assert sum(summary["cluster_tokens"]) == sum(  # tokens of the inliers only
        int(np.prod(e["grid"])) for e in summary["images"] if e["file"] != str(outlier))
    # a threshold no image reaches leaves fewer than 2 inliers: a user error, nothing written
    assert_user_error(run_cli("cosegment", images, "--out", tmp_path / "none", "--weights", weights,
                              "--remove-outliers", "--outliers-thresh", 1.5, *FAST), "--remove-outliers")
    assert not (tmp_path / "none").exists()


def test_unreadable_files_are_skipped_or_fatal_with_strict(tmp_path, images, weights):
    (images / "broken.jpg").write_bytes(b"definitely not a jpeg")
    out = tmp_path / "o"
    result = run_cli("cosegment", images, "--out", out, "--weights", weights, "--refine", "none", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 3
    assert summary["skipped"] == [{"file": str(images / "broken.jpg"), "reason": "not an image file"}]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipped 1 unreadable file(s): {images / 'broken.jpg'} (not an image file) "
                        f"(--strict stops at the first)"]
    strict_out = tmp_path / "strict"
    assert_user_error(run_cli("cosegment", images, "--out", strict_out, "--weights", weights, "--strict", *FAST),
                      "broken.jpg")
    assert not strict_out.exists()  # nothing written half-way


def test_overlays_of_large_photos_are_capped_and_outlined(tmp_path, images, weights, monkeypatch):
    """A 2600-px photo: the mask keeps the photo's size, the overlay's longer side is 2048 px, and the mask
    is outlined (white line inside a black one) so a red tint on a red object is still visible."""
    import vitdense.cosegment
    from vitdense.commands.cosegment import OVERLAY_MAX_SIDE
    from vitdense.viz import label_edges

    def centre_square(resized, result, refine, progress=True):  # a random network's masks may be all one
        masks = []
        for i in range(len(resized)):
            h, w = resized[i].shape[:2]
            mask = np.zeros((h, w), bool)
            mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
            masks.append(mask)
        return masks

    monkeypatch.setattr(vitdense.cosegment, "refine_objects", centre_square)
    Image.open(images / "astronaut.jpg").resize((2600, 2600)).save(images / "astronaut.jpg")
    out = tmp_path / "o"
    result = run_cli("cosegment", images, "--out", out, "--weights", weights, "--refine", "none",
                     "--clusters", 4, *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["weights_used"] == str(weights) and summary["settings"]["model"] == "tiny"
    mask = np.asarray(Image.open(out / "astronaut_mask.png"))
    vis = np.asarray(Image.open(out / "astronaut_overlay.png"))
    assert mask.shape == (2600, 2600) and vis.shape == (OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE, 3)
    assert 0 < (mask > 0).mean() < 1, "need a boundary to outline"
    small = np.asarray(Image.fromarray(mask).resize((OVERLAY_MAX_SIDE,) * 2, Image.NEAREST)) > 0
    white = (vis == 255).all(axis=-1)
    edges = label_edges(small)
    assert white[edges].mean() > 0.9  # the boundary is drawn ...
    assert white[~edges].mean() < 0.05  # ... and little else turned white


def test_bad_input_errors(tmp_path, images, weights):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_cli("cosegment", empty, "--out", tmp_path / "o", "--weights", weights), "no image files")
    single = tmp_path / "single"
    single.mkdir()
    (images / "chelsea.jpg").rename(single / "chelsea.jpg")
    assert_user_error(run_cli("cosegment", single, "--out", tmp_path / "o", "--weights", weights), "at least 2")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"x")
    (bad / "b.png").write_bytes(b"y")
    assert_user_error(run_cli("cosegment", bad, "--out", tmp_path / "o", "--weights", weights, *FAST),
                      "at least 2 readable", "a.jpg")
    assert_user_error(run_cli("part-cosegment", images, "--out", tmp_path / "o", "--weights", weights, "--parts", "x"),
                      "--parts x")
    assert_user_error(run_cli("cosegment", images, "--out", tmp_path / "o", "--weights", weights, "--elbow", 1.5),
                      "--elbow")
    assert_user_error(run_cli("cosegment", images, "--out", tmp_path / "o", "--weights", weights, "--min-sample", -1),
                      "--min-sample")
    assert not (tmp_path / "o").exists()


def test_pipeline_options_reach_the_clustering(tmp_path, images, weights):
    """--elbow-k after keeps the k at which the elbow search stopped, one more than --elbow-k before (the
    objectives are the same: same sample, same seed); every option is recorded in summary.json."""
    summaries = {}
    for rule in ("after", "before"):
        out = tmp_path / rule
        result = run_cli("cosegment", images, "--out", out, "--weights", weights, "--elbow-k", rule,
                         "--elbow-objective", "all", "--saliency-res", "low", "--min-sample", 0, "--refine",
                         "grabcut", *FAST)
        assert result.exit_code == 0, result.output
        summaries[rule] = json.loads((out / "summary.json").read_text())
    after, before = summaries["after"], summaries["before"]
    assert after["elbow_objectives"] == before["elbow_objectives"]
    assert after["k"] == before["k"] + 1 == len(after["elbow_objectives"])
    assert {k: after["settings"][k] for k in ("elbow_k", "elbow_objective", "saliency_res", "min_sample", "refine")} \
        == {"elbow_k": "after", "elbow_objective": "all", "saliency_res": "low", "min_sample": 0, "refine": "grabcut"}


def test_eval_app_scores_predictions(tmp_path, images, weights):
    spec = importlib.util.spec_from_file_location("eval_cosegmentation", ROOT / "apps" / "eval_cosegmentation.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    pred = tmp_path / "pred"
    gt = tmp_path / "gt"
    gt.mkdir()
    # ground truth: the left half of each image is the object
    truths = {}
    for path in sorted(images.glob("*.jpg")):
        with Image.open(path) as im:
            truth = np.zeros((im.height, im.width), np.uint8)
        truth[:, : truth.shape[1] // 2] = 255
        truths[path.stem] = truth > 0
        Image.fromarray(truth).save(gt / f"{path.stem}.png")
    scores_file = tmp_path / "scores.json"
    code = app.main([str(images), str(gt), "--out", str(pred), "--json", str(scores_file), "--",
                     "--weights", str(weights), *FAST])
    assert code == 0
    scores = json.loads(scores_file.read_text())
    jac, prec = [], []
    for stem, truth in truths.items():  # independent computation from the written masks
        mask = np.asarray(Image.open(pred / f"{stem}_mask.png")) > 0
        jac.append((mask & truth).sum() / max((mask | truth).sum(), 1))
        prec.append((mask == truth).mean())
    assert scores["n_scored"] == 3
    assert scores["mean"]["jaccard"] == pytest.approx(np.mean(jac))
    assert scores["mean"]["precision"] == pytest.approx(np.mean(prec))
    # predictions scored against themselves are perfect; parts NMI/ARI included with --parts
    assert app.main([str(images), str(pred), "--pred", str(pred), "--parts", "--json", str(scores_file)]) == 0
    assert json.loads(scores_file.read_text())["mean"] == pytest.approx(
        {"jaccard": 1.0, "precision": 1.0, "nmi": 1.0, "ari": 1.0})


def test_extract_set_batches_match_single_images(tmp_path, photos, make_extractor):
    from vitdense.commands.cosegment import extract_set

    folder = tmp_path / "same"
    folder.mkdir()
    sizes = [(96, 64), (96, 64), (96, 64), (64, 96)]  # three share a batch, the last has its own
    for i, (name, size) in enumerate(zip(["chelsea", "coffee", "astronaut", "rocket"], sizes)):
        Image.fromarray(photos[name]).resize(size).save(folder / f"{i}.png")
    paths = sorted(folder.glob("*.png"))
    extractor = make_extractor()
    data = extract_set(extractor, paths, 40, -1, "key", use_bin=False, need_cls=True, crops=1, seed=0,
                       batch_size=4, saliency_res="full", progress=False)
    with data.store:
        assert data.n_images == 4 and len(data.store) == 4 + 4 * 2
        assert data.augmented == [False] * 4 + [True] * 8
        assert data.cls.shape == (4, 96)
        for i, path in enumerate(paths):  # independent: one image at a time through the extractor
            batch, _ = extractor.preprocess(path, 40)
            feats = extractor.extract(batch, [-1], "key", include_cls=True, saliency=True)
            desc = feats.descriptors[-1][0].numpy()
            want = desc[1:] / np.linalg.norm(desc[1:], axis=1, keepdims=True)
            np.testing.assert_allclose(data.store[i].astype(np.float32), want, atol=3e-3)
            np.testing.assert_allclose(data.saliency[i], feats.saliency[0].numpy(), atol=1e-4)
            np.testing.assert_allclose(data.cls[i], desc[0], rtol=1e-3, atol=1e-4)
            assert data.grids[i] == feats.num_patches and data.sizes[i] == feats.load_size
        assert data.original == [(64, 96)] * 3 + [(96, 64)]
        # crops: 95 % of the resized image, resized back to a shorter side of 40
        assert all(min(s) == 40 for s in data.sizes[4:])


def test_low_res_saliency_is_the_references_half_size_pass(tmp_path, photos, make_extractor):
    """dino-vit-features' saliency for co-segmentation, computed here as its script does: the original image
    resized to half the descriptors' input size, a second extractor at stride = patch size, the map resized
    to the descriptors' grid with PIL's NEAREST."""
    from vitdense import ViTExtractor
    from vitdense.commands.cosegment import extract_set
    from vitdense.cosegment import low_res_saliency

    path = tmp_path / "coffee.png"
    Image.fromarray(photos["coffee"]).resize((150, 100)).save(path)
    extractor = make_extractor()
    batch, _ = extractor.preprocess(path, 64)
    feats = extractor.extract(batch, [-1], "key")
    (hgt, wid), (h, w) = feats.load_size, feats.num_patches
    coarse = ViTExtractor("custom", stride=8, model=extractor.model, device="cpu")
    small, _ = coarse.preprocess(path, (hgt // 2, wid // 2))
    sal = coarse.extract_saliency_maps(small)[0].numpy()
    grid = (1 + (hgt // 2 - 8) // 8, 1 + (wid // 2 - 8) // 8)
    want = np.asarray(Image.fromarray(sal.reshape(grid).astype(np.float32)).resize((w, h), Image.NEAREST))
    got = low_res_saliency(extractor, path, feats.load_size, feats.num_patches)
    assert got.shape == (h * w,) and grid != (h, w)
    np.testing.assert_allclose(got, want.reshape(-1), atol=1e-6)
    data = extract_set(extractor, [path, path], 64, -1, "key", use_bin=False, need_cls=False, saliency_res="low",
                       progress=False)
    with data.store:
        np.testing.assert_allclose(data.saliency[0], want.reshape(-1), atol=1e-6)
