"""`vitdense extract / pca / models` end to end, and one-line errors for bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_user_error, run_cli, save_tiny_weights
from vitdense import ViTExtractor


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", depth=12)


@pytest.fixture
def images(tmp_path, photos):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(photos[name]).save(folder / f"{name}.jpg")
    return folder


def test_extract_writes_npz_equal_to_python_api(weights, images, tmp_path):
    out = tmp_path / "feats.npz"
    result = run_cli("extract", images, "--weights", weights, "--device", "cpu", "--load-size", 48,
                 "--layer", 2, "--facet", "value", "--bin", "--out", out)
    assert result.exit_code == 0, result.output
    data = np.load(out)
    assert [p.split("/")[-1] for p in data["paths"]] == ["chelsea.jpg", "coffee.jpg"]
    ext = ViTExtractor(None, stride=4, weights=weights, device="cpu")
    batch, _ = ext.preprocess(images / "coffee.jpg", 48)
    expected = ext.extract_descriptors(batch, 2, "value", bin=True)[0, 0].numpy()
    assert data["desc_1"].shape == expected.shape == (np.prod(data["grid_1"]), 17 * 96)
    np.testing.assert_allclose(data["desc_1"].astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    assert data["saliency_0"].shape == (np.prod(data["grid_0"]),)


def test_pca_writes_one_png_per_image(weights, images, tmp_path):
    out = tmp_path / "pca"
    result = run_cli("pca", images, "--weights", weights, "--device", "cpu", "--load-size", 40, "--layer", -1, "--out", out)
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["chelsea_pca.png", "coffee_pca.png"]
    with Image.open(out / "chelsea_pca.png") as im:
        assert im.size == (60, 40)  # chelsea 451x300 resized to shorter side 40


def test_pca_png_shows_pca_rgb(weights, images, tmp_path):
    """The written picture is pca_rgb's map (scaled to 0..255), each token filling its grid cell."""
    from vitdense import pca_rgb

    out = tmp_path / "pca"
    result = run_cli("pca", images, "--weights", weights, "--device", "cpu", "--load-size", 48, "--out", out)
    assert result.exit_code == 0, result.output
    ext = ViTExtractor(weights=weights, device="cpu")
    descs, grids = [], []
    for name in ("chelsea", "coffee"):
        batch, _ = ext.preprocess(images / f"{name}.jpg", 48)
        descs.append(ext.extract_descriptors(batch, 11, "key")[0, 0])
        grids.append(ext.num_patches)
    for name, rgb in zip(("chelsea", "coffee"), pca_rgb(descs, grids)):
        png = np.asarray(Image.open(out / f"{name}_pca.png").convert("RGB")).astype(int)
        assert png.std() > 10, "blank picture"
        (h, w), (height, width) = rgb.shape[:2], png.shape[:2]
        rows, cols = ((np.arange(h) + 0.5) * height / h).astype(int), ((np.arange(w) + 0.5) * width / w).astype(int)
        centres = png[rows][:, cols]
        np.testing.assert_allclose(centres, np.round(rgb * 255), atol=2)


def test_outputs_name_the_weights_used(weights, images, tmp_path):
    out = tmp_path / "f.npz"
    assert run_cli("extract", images, "--weights", weights, "--device", "cpu", "--load-size", 32, "--out", out
                   ).exit_code == 0
    assert str(np.load(out)["weights"]) == str(weights)


def test_default_model_is_auto_and_says_which_weights(images, tmp_path, monkeypatch):
    """Offline, `--model auto` (the default) takes the bundled backbone and says so in one stderr line."""
    from vitdense.backbones import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "vitdense_vits8.safetensors").exists():
        pytest.skip("bundled weights not in this checkout")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "f.npz"
    result = run_cli("extract", images / "coffee.jpg", "--device", "cpu", "--load-size", 32, "--out", out)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("weights:")]
    assert len(notes) == 1 and notes[0].startswith("weights: vitdense_vits8 (bundled): ")
    assert "HF_HUB_OFFLINE" in notes[0]
    assert str(np.load(out)["weights"]) == "vitdense_vits8 (bundled)"
    help_text = run_cli("extract", "--help").output
    assert "--model TEXT" in help_text and "[default: auto]" in help_text


def test_named_model_and_a_file_of_another_architecture(weights, images, tmp_path):
    """--model dino_vitb8 with a width-96 file: one line naming the file and both shapes, never silently
    the file's network."""
    result = run_cli("extract", images, "--model", "dino_vitb8", "--weights", weights, "--out", tmp_path / "o.npz")
    assert_user_error(result, str(weights), "--model dino_vitb8", "width 96", "width 768")
    assert not (tmp_path / "o.npz").exists()


def test_weights_errors_name_the_file(images, tmp_path):
    no_vit = tmp_path / "linear.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, no_vit)
    assert_user_error(run_cli("extract", images, "--weights", no_vit), f"{no_vit}: not a ViT backbone",
                      "patch_embed.proj.weight")
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes, not weights\n")
    result = run_cli("extract", images, "--weights", text)
    assert_user_error(result, f"{text}: not a readable PyTorch weights file (it is a text file)")
    assert not result.output.strip().endswith(")")  # no bare "(101)" from the unpickler


def test_negative_load_size_is_an_option_error(weights, images, tmp_path):
    for command in ("extract", "cosegment", "correspond", "propagate", "index", "pca"):
        result = run_cli(command, images, "--load-size", -5, "--weights", weights, "--out", tmp_path / "x")
        assert_user_error(result, "--load-size -5: must be a positive number, or 0 to keep the size")
    assert_user_error(run_cli("extract", images, "--stride", 0, "--weights", weights), "--stride 0")


def test_tiny_image_upscaled_more_than_4x_warns(weights, tmp_path, caplog):
    small = tmp_path / "ten.png"
    Image.fromarray(np.full((10, 10, 3), 120, np.uint8)).save(small)
    with caplog.at_level("WARNING", logger="vitdense"):
        result = run_cli("extract", small, "--weights", weights, "--device", "cpu", "--load-size", 48,
                         "--out", tmp_path / "o.npz")
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(warned) == 1 and "ten.png: image of 10x10 px upscaled 5x to 48x48 px" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vitdense"):
        run_cli("extract", small, "--weights", weights, "--device", "cpu", "--load-size", 40,
                "--out", tmp_path / "o.npz")
    assert not [r for r in caplog.records if "upscaled" in r.getMessage()]  # 4x is still fine


def test_image_smaller_than_a_patch_is_an_error_whatever_the_load_size(weights, tmp_path):
    """The README's rule: a 4x4 image (smaller than one 8x8 patch) is an error, not upscaled 56x."""
    small = tmp_path / "four.png"
    Image.fromarray(np.full((4, 4, 3), 120, np.uint8)).save(small)
    for command in ("extract", "pca", "attention"):
        out = tmp_path / command
        assert_user_error(run_cli(command, small, "--weights", weights, "--device", "cpu", "--load-size", 224,
                                  "--out", out), "four.png: image of 4x4 px is smaller than one 8x8 patch")
        assert not out.exists()


def test_stride_default_shown_where_it_is_the_patch_size():
    assert "[default: (the patch size)]" in " ".join(run_cli("index", "--help").output.split())


def test_models_lists_names():
    result = run_cli("models")
    assert result.exit_code == 0
    assert "dino_vits8" in result.output and "dinov2_vits14_reg" in result.output


def test_missing_file(weights, tmp_path):
    assert_user_error(run_cli("extract", tmp_path / "nope.jpg", "--weights", weights, "--out", tmp_path / "o.npz"),
                      "nope.jpg")
    assert not (tmp_path / "o.npz").exists()


def test_corrupt_and_non_image_files(weights, images, tmp_path):
    bad = images / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    out = tmp_path / "o.npz"
    assert_user_error(run_cli("extract", bad, "--weights", weights, "--out", out), "broken.jpg")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_user_error(run_cli("extract", text, "--weights", weights, "--out", out), "notes.txt")
    assert not out.exists()


def test_image_smaller_than_patch(weights, tmp_path):
    small = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((5, 30, 3), np.uint8)).save(small)
    assert_user_error(run_cli("extract", small, "--weights", weights, "--load-size", 0, "--out", tmp_path / "o.npz"),
                      "tiny.png", "smaller than one 8x8 patch")


def test_bad_stride_and_layer(weights, images, tmp_path):
    assert_user_error(run_cli("extract", images, "--weights", weights, "--stride", 3), "--stride 3")
    assert_user_error(run_cli("extract", images, "--weights", weights, "--layer", 12), "--layer 12")


def test_wrong_checkpoint(images, tmp_path):
    ckpt = tmp_path / "vits16.pth"
    torch.save({"teacher": {"backbone.pos_embed": torch.zeros(1, 197, 384)}}, ckpt)
    assert_user_error(run_cli("extract", images, "--model", "dino_vits8", "--weights", ckpt), "vits16.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("junk")
    assert_user_error(run_cli("extract", images, "--weights", junk), "junk.pth", "not a readable")


def test_empty_folder(weights, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_cli("pca", empty, "--weights", weights), "empty")


def test_console_script_exit_code(weights, tmp_path):
    """The installed entry point itself (not CliRunner) exits non-zero with one line on stderr."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vitdense", "extract", str(tmp_path / "nope.jpg"),
                            "--weights", str(weights)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("vitdense: error:") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--help"], ["models"], ["cosegment", "--help"], ["pretrain", "--help"],
                                  ["extract", "x.jpg", "--load-size", "-5"]])
def test_start_up_imports_no_torch(args):
    """`vitdense --help`, `models`, help pages and option errors answer without importing torch or timm (3 s
    and 0.8 GB before); timings are in benchmarks/bench_startup.py."""
    import subprocess
    import sys

    code = ("import sys\nfrom vitdense.cli import main\ntry:\n    main(sys.argv[1:], prog_name='vitdense')\n"
            "except SystemExit as done:\n    code = done.code\n"
            "print('heavy:', sorted(m for m in ('torch', 'timm', 'faiss', 'cv2') if m in sys.modules), code)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] in ("heavy: [] 0", "heavy: [] 2"), proc.stdout + proc.stderr
    import_only = subprocess.run([sys.executable, "-c", "import sys, vitdense; print('torch' in sys.modules)"],
                                 capture_output=True, text=True, timeout=120)
    assert import_only.stdout.strip() == "False"
