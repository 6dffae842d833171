"""`vitdense correspond` end to end, batch layouts, errors; apps/eval_correspondence.py PCK per ground truth."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli, save_tiny_weights, tiny_extractor
from vitdense import ViTExtractor
from vitdense.correspond import CorrespondenceResult, Correspondences

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", depth=4)


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("eval_correspondence", ROOT / "apps" / "eval_correspondence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shifted(photos, shift=16):
    img = photos["chelsea"][60:124, 120:216 + shift]
    return img[:, shift:], img[:, :-shift]  # A(x) = B(x + shift)


@pytest.fixture
def pair(tmp_path, photos):
    a, b = shifted(photos)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    return tmp_path / "a.png", tmp_path / "b.png"


def _descriptors(weights, path):
    """Layer-3 log-binned key descriptors (T, D) and saliency (T,) of an image at its own size, as
    `vitdense correspond --load-size 0` computes them."""
    ext = ViTExtractor(None, stride=4, weights=weights, device="cpu")
    batch, _ = ext.preprocess(path, None)
    out = ext.extract(batch, [3], "key", bin=True, saliency=True)
    return out.descriptors[3][0].numpy(), out.saliency[0].numpy()


def _token(point):
    """Token index of a written point of a 64x96 image: patch 8, stride 4 → centres 4k + 3.5, grid 15x23."""
    row, col = (point["y"] - 3.5) / 4, (point["x"] - 3.5) / 4
    assert row == int(row) and col == int(col) and 0 <= row < 15 and 0 <= col < 23, point
    return int(row) * 23 + int(col)


def test_cli_writes_png_and_json(weights, pair, tmp_path):
    out = tmp_path / "out"
    result = run_cli("correspond", *pair, "--weights", weights, "--device", "cpu", "--load-size", 0,
                 "--num-pairs", 5, "--thresh", 0, "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "correspondences.json").read_text())
    assert len(data["pairs"]) == 5 and data["size_a"] == [64, 96] and data["settings"]["layer"] == 3
    # recomputed here: cosine similarities of the layer-3 descriptors, best buddies by argmax both ways
    (desc_a, sal_a), (desc_b, sal_b) = (_descriptors(weights, path) for path in pair)
    unit_a, unit_b = (d / np.linalg.norm(d, axis=1, keepdims=True) for d in (desc_a, desc_b))
    sim = unit_a @ unit_b.T  # (15 * 23 tokens of A, 15 * 23 of B)
    for p in data["pairs"]:
        assert p["b"]["x"] - p["a"]["x"] == pytest.approx(16) and p["b"]["y"] == p["a"]["y"]
        ta, tb = _token(p["a"]), _token(p["b"])
        assert sim[ta].argmax() == tb and sim[:, tb].argmax() == ta
        assert p["similarity"] == pytest.approx(sim[ta, tb], abs=1e-4)
        assert p["saliency_a"] == pytest.approx(sal_a[ta], abs=1e-4)
        assert p["saliency_b"] == pytest.approx(sal_b[tb], abs=1e-4)
    with Image.open(out / "correspondences.png") as im:
        assert im.size == (96 + 8 + 96, 64)
    assert data["settings"]["weights_used"] == str(weights)
    # 20-30 s at the defaults on a CPU: a bar names the stage it is in
    assert "correspond: " in result.stderr and "describing image B" in result.stderr
    assert "matching best buddies" in result.stderr

    out_all = tmp_path / "all"
    result = run_cli("correspond", *pair, "--weights", weights, "--device", "cpu", "--load-size", 0, "--all",
                 "--thresh", 0, "--out", out_all, "--backend", "faiss", "--salient", "both", "--kmeans", "torch")
    assert result.exit_code == 0, result.output
    data_all = json.loads((out_all / "correspondences.json").read_text())
    assert (data_all["settings"]["salient"], data_all["settings"]["kmeans"]) == ("both", "torch")
    assert len(data_all["pairs"]) == data_all["num_salient_buddies"] > 5
    buddies = {(ta, int(sim[ta].argmax())) for ta in range(len(sim)) if sim[:, sim[ta].argmax()].argmax() == ta}
    salient = {(ta, tb) for ta, tb in buddies if sal_a[ta] > 0 and sal_b[tb] > 0}  # --thresh 0
    assert {(_token(p["a"]), _token(p["b"])) for p in data_all["pairs"]} == salient
    every = {(p["a"]["x"], p["a"]["y"]) for p in data_all["pairs"]}
    assert {(p["a"]["x"], p["a"]["y"]) for p in data["pairs"]} <= every


def test_tiny_image_warns_on_a_line_of_its_own(weights, pair, tmp_path):
    """A 10x10 image enlarged 6x (4x4 is now an error: smaller than a patch): the real command (own process, real stderr) says so on a line of its own,
    not glued to the progress bar."""
    import subprocess
    import sys

    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((10, 10, 3), 90, np.uint8)).save(tiny)
    proc = subprocess.run([sys.executable, "-m", "vitdense", "correspond", str(pair[0]), str(tiny), "--weights",
                           str(weights), "--device", "cpu", "--load-size", "64", "--thresh", "-1", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stderr.replace("\r", "\n").splitlines() if "upscaled" in line]
    assert lines == [f"{tiny}: image of 10x10 px upscaled 6x to 64x64 px; its descriptors (and anything found in "
                     f"it) carry little information: use a larger image or a smaller --load-size"], proc.stderr


def test_cli_batch_layouts(weights, pair, tmp_path, photos):
    a, b = pair
    folder = tmp_path / "pairs"
    (folder / "cat").mkdir(parents=True)
    Image.open(a).save(folder / "cat" / "1.png")
    Image.open(b).save(folder / "cat" / "2.png")
    Image.open(a).save(folder / "shift_a.png")
    Image.open(b).save(folder / "shift_b.png")
    out = tmp_path / "batch"
    result = run_cli("correspond", folder, "--weights", weights, "--device", "cpu", "--load-size", 32, "--out", out,
                 "--num-pairs", 3, "--thresh", 0)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [p["name"] for p in summary["pairs"]] == ["cat", "shift"]
    for name in ("cat", "shift"):
        assert (out / name / "correspondences.png").is_file()
        assert len(json.loads((out / name / "correspondences.json").read_text())["pairs"]) == 3

    (tmp_path / "broken.jpg").write_bytes(b"junk")
    listing = tmp_path / "list.txt"
    listing.write_text("# pairs\na.png b.png\nb.png broken.jpg  # bad one\n")
    out = tmp_path / "listed"
    result = run_cli("correspond", "--pairs", listing, "--weights", weights, "--device", "cpu", "--load-size", 32,
                 "--out", out, "--thresh", 0)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())["pairs"]
    assert summary[0]["name"] == "0000_a_b" and summary[0]["pairs"] == 10
    assert "broken.jpg" in summary[1]["error"]
    assert (out / "0000_a_b" / "correspondences.json").is_file() and not (out / "0001_b_broken").exists()

    listing.write_text("b.png broken.jpg\n")  # no pair works: a user error, and nothing written
    out = tmp_path / "none"
    assert_user_error(run_cli("correspond", "--pairs", listing, "--weights", weights, "--device", "cpu",
                              "--out", out), "broken.jpg", "no pair of 1 could be processed")
    assert not out.exists()


def test_cli_errors(weights, pair, tmp_path, photos):
    a, _ = pair
    common = ["--weights", weights, "--device", "cpu", "--out", tmp_path / "o"]
    assert_user_error(run_cli("correspond", a, tmp_path / "nope.jpg", *common), "nope.jpg", "not found")
    (tmp_path / "notes.txt").write_text("hello")
    assert_user_error(run_cli("correspond", tmp_path / "notes.txt", a, *common), "notes.txt", "not an image")
    Image.fromarray(photos["coffee"][:6, :6]).save(tmp_path / "tiny.png")
    assert_user_error(run_cli("correspond", a, tmp_path / "tiny.png", "--load-size", 0, *common), "tiny.png",
                      "smaller than one")
    assert_user_error(run_cli("correspond", a, *common), "expected two images")
    assert_user_error(run_cli("correspond", a, a, "--layer", 9, *common), "--layer 9")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_cli("correspond", empty, *common), "no pairs found")
    assert not (tmp_path / "o").exists()  # nothing written on errors


def test_cli_no_salient_region_writes_empty_result(weights, pair, tmp_path):
    out = tmp_path / "empty"
    result = run_cli("correspond", *pair, "--weights", weights, "--device", "cpu", "--thresh", 1.0, "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "correspondences.json").read_text())
    assert data["pairs"] == [] and "no salient region" in data["message"]
    assert (out / "correspondences.png").is_file()


# ------------------------------------------------------------------------------ eval_correspondence

def synthetic_result(points_a, points_b, size=(20, 40), pairs=None):
    n = len(points_a)
    matches = Correspondences(np.array(points_a, float), np.array(points_b, float), np.ones(n), np.ones(n),
                              np.ones(n), np.arange(n), np.arange(n))
    chosen = matches.subset(pairs if pairs is not None else np.arange(n))
    return CorrespondenceResult(chosen, matches, size, size, size, size, (1, 1), (1, 1))


def test_eval_disparity_pck_by_hand(app):
    disp = np.full((20, 40), 4.0)
    disp[5, 5] = np.inf
    # truths: (10, 16) and (10, 26); third point has no disparity. Errors 0 and 6 px, L = 40.
    result = synthetic_result([[10, 20], [10, 30], [5, 5]], [[10, 16], [10, 20], [0, 0]], pairs=[1])
    got = app.evaluate_disparity(result, disp, alphas=(0.05, 0.10, 0.15))
    assert got["pck@0.05"] == 0.5 and got["pck@0.10"] == 0.5 and got["pck@0.15"] == 1.0
    assert got["evaluated"] == 2 and got["epe_px"] == pytest.approx(3.0)
    assert got["pairs_pck@0.10"] == 0.0 and got["pairs_pck@0.15"] == 1.0 and got["pairs_evaluated"] == 1
    # zero motion: errors 4 and 4 px
    assert got["identity_pck@0.05"] == 0.0 and got["identity_pck@0.10"] == 1.0


def test_eval_homography_pck_by_hand(app):
    hom = np.array([[2.0, 0, 1], [0, 2.0, 3], [0, 0, 1]])
    # truths (5, 5) and (3, 1): errors 0 and 3 px; L = 40 → thresholds 2, 4, 6
    result = synthetic_result([[1, 2], [0, 0]], [[5, 5], [3, 4]])
    got = app.evaluate_homography(result, hom, alphas=(0.05, 0.10, 0.15))
    assert (got["pck@0.05"], got["pck@0.10"], got["pck@0.15"]) == (0.5, 1.0, 1.0)
    assert got["epe_px"] == pytest.approx(1.5) and got["pairs_evaluated"] == 2


def test_eval_keypoints_spair_and_pfpascal_layouts(app, photos, tmp_path):
    a, b = shifted(photos)
    # SPair-71k layout; keypoints at token centres of A, moved 16 px in B; the last two annotated 3 and 6 px off
    root = tmp_path / "SPair-71k"
    (root / "JPEGImages" / "cat").mkdir(parents=True)
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    Image.fromarray(a).save(root / "JPEGImages" / "cat" / "a.jpg", quality=100)
    Image.fromarray(b).save(root / "JPEGImages" / "cat" / "b.jpg", quality=100)
    xy_a = np.array([[3.5 + 4 * c, 3.5 + 4 * r] for r, c in ((2, 3), (5, 6), (8, 10), (10, 12))])
    xy_b = xy_a + [16, 0]
    xy_b[2, 1] += 3
    xy_b[3, 1] += 6
    ann = dict(category="cat", src_imname="a.jpg", trg_imname="b.jpg", src_kps=xy_a.tolist(),
               trg_kps=xy_b.tolist(), trg_bndbox=[0, 0, 40, 20])
    (root / "PairAnnotation" / "test" / "000001-a-b:cat.json").write_text(json.dumps(ann))
    pairs = app.load_spair(root)
    np.testing.assert_allclose(pairs[0].kps_a, xy_a[:, ::-1])
    got = app.evaluate_keypoints(tiny_extractor(), pairs, load_size=None)
    # image's longer side L = 96: α · L = 4.8, 9.6, 14.4 px → errors 0, 0, 3, 6 give 3/4, 4/4, 4/4
    assert (got["pck@0.05"], got["pck@0.10"], got["pck@0.15"]) == (0.75, 1.0, 1.0)
    # bounding box's longer side L = 40: 2, 4, 6 px → 2/4, 3/4, 4/4
    assert (got["bbox_pck@0.05"], got["bbox_pck@0.10"], got["bbox_pck@0.15"]) == (0.5, 0.75, 1.0)
    assert got["keypoints"] == 4 and got["mutual"] == 1.0 and got["bbox_pair_mean_pck@0.10"] == 0.75

    # PF-PASCAL layout: 1-based coordinates, -1 = missing; L = longer image side (96) → 4.8, 9.6, 14.4 px
    pf = tmp_path / "PF-dataset-PASCAL"
    (pf / "JPEGImages").mkdir(parents=True)
    Image.fromarray(a).save(pf / "JPEGImages" / "x.png")
    Image.fromarray(b).save(pf / "JPEGImages" / "y.png")
    xb = xy_a + [16, 0]
    xb[2, 1] += 7  # wrong at 0.05, right at 0.10
    xb[3, 0] -= 12  # wrong at 0.05 and 0.10, right at 0.15

    def col(values):
        return ";".join(f"{v:g}" for v in values)

    (pf / "test_pairs_pf_pascal.csv").write_text(
        "source_image,target_image,class,XA,YA,XB,YB\n"
        f"PF-dataset-PASCAL/JPEGImages/x.png,PF-dataset-PASCAL/JPEGImages/y.png,8,"
        f"{col(list(xy_a[:, 0] + 1) + [-1])},{col(list(xy_a[:, 1] + 1) + [-1])},"
        f"{col(list(xb[:, 0] + 1) + [-1])},{col(list(xb[:, 1] + 1) + [-1])}\n")
    pairs = app.load_pfpascal(pf)
    assert len(pairs[0].kps_a) == 4 and pairs[0].bbox_b is None
    got = app.evaluate_keypoints(tiny_extractor(), pairs, load_size=None)
    assert (got["pck@0.05"], got["pck@0.10"], got["pck@0.15"]) == (0.5, 0.75, 1.0)
    assert "bbox_pck@0.05" not in got


def test_eval_script_end_to_end(app, weights, pair, tmp_path):
    hfile = tmp_path / "H.txt"
    hfile.write_text("1 0 16\n0 1 0\n0 0 1\n")
    out = tmp_path / "eval"
    report = app.main(["homography", *map(str, pair), str(hfile), "--weights", str(weights), "--device", "cpu",
                       "--load-size", "0", "--thresh", "0", "--out", str(out)])
    saved = json.loads((out / "homography.json").read_text())
    assert saved["scores"] == report["scores"] and saved["layer"] == 3
    assert report["scores"]["pck@0.05"] > 0.9 and report["scores"]["pairs_pck@0.05"] > 0.8
    assert (out / "homography.png").is_file()
    with pytest.raises(SystemExit):
        app.main(["spair", str(tmp_path / "missing"), "--weights", str(weights), "--out", str(out)])


def test_motorcycle_pck_recomputed_from_the_written_matches(app, weights, tmp_path):
    """The script's motorcycle PCK equals the PCK computed here, from the Middlebury disparity map, of the
    matches `vitdense correspond` writes for the same pair and settings (all buddies, and the 10 pairs)."""
    from skimage import data

    left, right, disparity = data.stereo_motorcycle()
    Image.fromarray(left).save(tmp_path / "left.png")
    Image.fromarray(right).save(tmp_path / "right.png")
    common = ["--weights", weights, "--device", "cpu", "--load-size", 48]
    written = {}
    for name, extra in (("buddies", ["--all"]), ("pairs", ["--num-pairs", 10])):
        result = run_cli("correspond", tmp_path / "left.png", tmp_path / "right.png", *common, *extra,
                         "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        written[name] = json.loads((tmp_path / name / "correspondences.json").read_text())["pairs"]
    report = app.main(["motorcycle", *map(str, common), "--out", str(tmp_path / "eval")])
    scores = report["scores"]
    assert (tmp_path / "eval" / "motorcycle.png").is_file()
    assert scores["buddies"] == len(written["buddies"]) > 10

    length = 741  # the longer side of the right image
    for prefix, pairs in (("", written["buddies"]), ("pairs_", written["pairs"])):
        ya, xa, yb, xb = (np.array([p[k][c] for p in pairs]) for k, c in (("a", "y"), ("a", "x"), ("b", "y"),
                                                                          ("b", "x")))
        # left (y, x) ↔ right (y, x - d), d read at the nearest pixel; inf = unknown
        d = disparity[np.round(ya).astype(int), np.round(xa).astype(int)]
        known = np.isfinite(d)
        err = np.hypot(yb - ya, xb - (xa - d))[known]
        assert scores[f"{prefix}evaluated"] == known.sum() > 0
        assert scores[f"{prefix}epe_px"] == pytest.approx(err.mean(), abs=0.01)
        for alpha in (0.01, 0.02, 0.05, 0.10, 0.15):
            assert scores[f"{prefix}pck@{alpha:.2f}"] == pytest.approx(np.mean(err <= alpha * length)), alpha
            if not prefix:  # the zero-motion guess b = a is off by the disparity itself
                assert scores[f"identity_pck@{alpha:.2f}"] == pytest.approx(np.mean(d[known] <= alpha * length))


def test_a_missing_second_image_fails_before_any_model_work(weights, pair, tmp_path, monkeypatch):
    import vitdense.commands.correspond as command

    def no_model(**opts):
        raise AssertionError("the backbone was built before the inputs were checked")

    monkeypatch.setattr(command, "build_extractor", no_model)
    a, _ = pair
    assert_user_error(run_cli("correspond", a, tmp_path / "nope.jpg", "--weights", weights, "--out", tmp_path / "o"),
                      "nope.jpg", "not found")


def test_cli_pairs_rerun_with_fewer_pairs_removes_the_previous_runs_folders(weights, pair, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.png b.png\nb.png a.png\na.png a.png\n")
    out = tmp_path / "out"
    args = ["correspond", "--pairs", listing, "--weights", weights, "--device", "cpu", "--load-size", 32,
            "--out", out, "--num-pairs", 2, "--thresh", 0]
    assert run_cli(*args).exit_code == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["0000_a_b", "0001_b_a", "0002_a_a", "summary.json"]
    (out / "mine.txt").write_text("the user's")
    (out / "0002_a_a" / "notes.txt").write_text("the user's, inside a pair folder")
    listing.write_text("a.png b.png\n")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["0000_a_b", "0002_a_a", "mine.txt", "summary.json"]
    assert not (out / "0001_b_a").exists()  # a previous run's pair: gone
    assert sorted(p.name for p in (out / "0002_a_a").iterdir() if not p.name.startswith(".")) == ["notes.txt"]
    assert (out / "0000_a_b" / "correspondences.png").is_file()
