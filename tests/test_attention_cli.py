"""`vitdense attention` end to end: the pictures match the maps they show, the maps match the library, video
frames give a GIF and an MP4, bad input is one line and nothing written."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli, save_tiny_weights

from vitdense import ViTExtractor, attention_maps, heatmap, keep_mass
from vitdense.viz import upsample

FAST = ["--device", "cpu", "--load-size", "0"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", depth=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("imgs")
    for name in ("chelsea", "coffee"):
        Image.fromarray(photos[name]).resize((80, 56), Image.LANCZOS).save(folder / f"{name}.png")
    return folder


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_attention_images(tmp_path, images, weights):
    out = tmp_path / "out"
    result = run_cli("attention", images / "chelsea.png", images / "coffee.png", "--out", out, "--weights",
                     weights, "--keep", "0.5", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["stride"] == 8 and summary["settings"]["layer"] == 3  # patch size, last layer
    extractor = ViTExtractor(weights=weights, stride=8, device="cpu")
    for name in ("chelsea", "coffee"):
        folder = out / name
        data = np.load(folder / "attention.npz")
        batch, _ = extractor.preprocess(images / f"{name}.png")
        expected = attention_maps(extractor, batch)[0]
        np.testing.assert_allclose(data["heads"], expected.heads, rtol=1e-5, atol=1e-7)
        assert data["heads"].shape == (3, 7, 10)
        for j in range(3):
            heat = _png(folder / f"head_{j:02d}.png")
            assert heat.shape == (56, 80, 3) and heat.std() > 0  # not blank
            np.testing.assert_array_equal(heat, heatmap(upsample(data["heads"][j], (56, 80), nearest=True)))
            mask = _png(folder / f"mask_head_{j:02d}.png")
            token_mask = keep_mass(data["heads"][j], 0.5).reshape(7, 10)
            np.testing.assert_array_equal(data["masks"][j], token_mask)
            np.testing.assert_array_equal(mask > 0, upsample(token_mask.astype(np.uint8), (56, 80), nearest=True) > 0)
            assert 0 < (mask > 0).mean() < 1
        np.testing.assert_array_equal(_png(folder / "mean.png"),
                                      heatmap(upsample(data["heads"].mean(0), (56, 80), nearest=True)))
        np.testing.assert_array_equal(data["mean_mask"], keep_mass(data["heads"].mean(0), 0.5).reshape(7, 10))
        sheet = _png(folder / "sheet.png")
        assert sheet.std() > 0
    entry = summary["images"][0]
    assert entry["name"] == "chelsea" and entry["grid"] == [7, 10] and len(entry["mask_fraction"]) == 3
    assert _png(out / "contact_sheet.png").std() > 0


def test_attention_video(tmp_path, photos, weights):
    import cv2

    base = np.asarray(Image.fromarray(photos["astronaut"]).resize((64, 48)))
    frames = [np.roll(base, 4 * i, axis=1) for i in range(4)]
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "out"
    result = run_cli("attention", "--video", video, "--out", out, "--weights", weights, "--layer", "2",
                     "--stride", "4", *FAST)
    assert result.exit_code == 0, result.output
    names = [f"{i:05d}" for i in range(4)]
    for name in names:
        assert (out / name / "mean.png").is_file() and (out / name / "attention.npz").is_file()
    with Image.open(out / "attention.gif") as gif:
        assert gif.n_frames == 4
        gif.seek(1)
        first = np.asarray(gif.convert("RGB")).astype(int)
    # GIF frames are the mean maps (palette-quantised): close to the frame's mean.png
    assert np.abs(first - _png(out / names[1] / "mean.png").astype(int)).mean() < 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["video"]["frames"] == 4 and summary["settings"]["stride"] == 4
    assert summary["video"]["mp4"] == "attention.mp4"  # pip's OpenCV writes mp4v
    cap = cv2.VideoCapture(str(out / "attention.mp4"))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert count == 4


def test_attention_bad_input(tmp_path, images, weights):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    assert_user_error(run_cli("attention", images / "chelsea.png", bad, "--out", out, "--weights", weights, *FAST),
                      str(bad))
    assert not out.exists()
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (6, 5)).save(tiny)  # smaller than a patch: found before the first image is written
    assert_user_error(run_cli("attention", images, tiny, "--out", out, "--weights", weights, *FAST), str(tiny))
    assert not out.exists()
    assert_user_error(run_cli("attention", images, "--out", out, "--weights", weights, "--layer", "9", *FAST),
                      "--layer 9")
    assert not out.exists()
    assert_user_error(run_cli("attention", images, "--out", out, "--weights", weights, "--keep", "1.5", *FAST),
                      "--keep")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert_user_error(run_cli("attention", images, "--out", blocker / "out", "--weights", weights, *FAST),
                      "cannot be written")
    assert_user_error(run_cli("attention", images, "--out", blocker, "--weights", weights, *FAST), "not a folder")
    assert_user_error(run_cli("attention", "--out", out, "--weights", weights, *FAST), "IMAGES")
    assert_user_error(run_cli("attention", images, "--video", images, "--out", out, "--weights", weights, *FAST),
                      "--video")
    assert not out.exists()
