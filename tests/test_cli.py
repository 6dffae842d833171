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
