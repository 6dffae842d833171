"""Every image mode Pillow opens is read as a person sees it, by one loader used everywhere.

The expected pixels are computed here with numpy from the arrays the test files were written from.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitdense import ImageError
from vitdense.io import BACKGROUND, image_size, load_binary_mask, load_image, load_mask, to_rgb

H, W = 6, 10


def gray3(arr: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(arr, np.uint8)[:, :, None], 3, axis=2)


def composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha over the white background, the way a viewer shows it."""
    a = alpha.astype(np.float64)[:, :, None] / 255
    return rgb.astype(np.float64) * a + np.asarray(BACKGROUND, np.float64) * (1 - a)


def read(path) -> np.ndarray:
    out = np.asarray(load_image(path))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    return out


@pytest.fixture
def ramp16() -> np.ndarray:
    """A 16-bit ramp over the whole range 0..65535."""
    return np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)


def test_16bit_grayscale_png_is_scaled_by_its_bit_depth_not_clipped_to_white(tmp_path, ramp16):
    Image.fromarray(ramp16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    out = read(tmp_path / "g16.png")
    expected = gray3(np.round(ramp16.astype(np.float64) * 255 / 65535))
    np.testing.assert_array_equal(out, expected)
    assert 100 < out.mean() < 155 and (out == 255).mean() < 0.1  # a ramp, not a white sheet


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I"])
def test_other_16bit_layouts_and_32bit_int(tmp_path, ramp16, mode):
    if mode == "I":
        im = Image.fromarray(ramp16.astype(np.int32))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        im = Image.frombytes(mode, (W, H), ramp16.astype(dtype).tobytes())
    im.save(tmp_path / "g.tif")
    out = read(tmp_path / "g.tif")
    np.testing.assert_array_equal(out, gray3(np.round(ramp16.astype(np.float64) * 255 / 65535)))


def test_32bit_int_outside_16_bits_is_stretched_min_max():
    arr = np.linspace(-1000, 300000, H * W).reshape(H, W).astype(np.int32)
    out = np.asarray(to_rgb(Image.fromarray(arr)))
    lo, hi = -1000, 300000
    np.testing.assert_array_equal(out, gray3(np.round((arr - lo) * 255 / (hi - lo))))


def test_float_images(tmp_path):
    unit = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    Image.fromarray(unit).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    np.testing.assert_array_equal(read(tmp_path / "f.tif"), gray3(np.round(unit.astype(np.float64) * 255)))
    wide = (unit * 40 - 7).astype(np.float32)  # no bit depth to go by: its own range
    expected = gray3(np.round((wide.astype(np.float64) - wide.min()) * 255 / (wide.max() - wide.min())))
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(wide))), expected)


def test_palette_with_and_without_transparency(tmp_path):
    idx = (np.arange(H * W) % 3).reshape(H, W).astype(np.uint8)
    colours = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(colours.ravel().tolist())
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read(tmp_path / "p.png"), colours[idx])
    im.save(tmp_path / "pt.png", transparency=1)  # colour 1 fully transparent: the background shows
    expected = colours[idx].copy()
    expected[idx == 1] = BACKGROUND
    np.testing.assert_array_equal(read(tmp_path / "pt.png"), expected)
    im.save(tmp_path / "pt.gif", transparency=2)
    expected = colours[idx].copy()
    expected[idx == 2] = BACKGROUND
    np.testing.assert_array_equal(read(tmp_path / "pt.gif"), expected)


def test_alpha_modes_are_composited_on_white(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    out = read(tmp_path / "rgba.png")
    assert np.abs(out.astype(int) - composite(rgb, alpha)).max() <= 1
    assert tuple(out[0, 0]) == BACKGROUND and tuple(out[0, 1]) == tuple(rgb[0, 1])

    gray = rgb[:, :, 0]
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(tmp_path / "la.png")
    assert np.abs(read(tmp_path / "la.png").astype(int) - composite(gray3(gray), alpha)).max() <= 1

    colours = np.array([[250, 0, 0], [0, 0, 250]], np.uint8)
    idx = (np.arange(H * W) % 2).reshape(H, W).astype(np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(colours.ravel().tolist())
    pa = p.convert("PA")
    pa.putalpha(Image.fromarray(alpha))
    out = np.asarray(to_rgb(pa))
    assert np.abs(out.astype(int) - composite(colours[idx], alpha)).max() <= 1


def test_cmyk_and_one_bit(tmp_path):
    rng = np.random.default_rng(1)
    cmyk = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    c, m, y, k = (cmyk[:, :, i].astype(np.float64) for i in range(4))
    expected = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], axis=2) / 255
    assert np.abs(read(tmp_path / "c.tif").astype(int) - expected).max() <= 1

    bits = (np.arange(H * W).reshape(H, W) % 3 == 0)
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(read(tmp_path / "b.png"), gray3(bits * 255))


# The eight EXIF orientations: how the stored pixels must be turned to look upright, written plainly.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # stored lying on its left side: turn clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def exif_file(path, arr: np.ndarray, orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif)
    return path


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied_and_the_header_size_agrees(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = exif_file(tmp_path / "phone.png", stored, orientation)
    out = read(path)
    np.testing.assert_array_equal(out, UPRIGHT[orientation](stored))
    assert image_size(path) == out.shape[:2]


def test_exif_orientation_of_a_jpeg_in_every_reader(tmp_path, make_extractor):
    """The extractor (path and PIL image), the pretraining loader (with its reduced-scale JPEG decoding)
    and the header size all see the upright photo."""
    from pretrain.data import ImageFolderDataset, MultiCropAugmentation

    stored = np.zeros((240, 480, 3), np.uint8)
    stored[:, :240] = (250, 0, 0)  # left half red, right half blue; upright (orientation 6) red is on top
    stored[:, 240:] = (0, 0, 250)
    path = exif_file(tmp_path / "phone.jpg", stored, 6)
    upright = np.rot90(stored, -1)
    assert np.abs(read(path).astype(int) - upright).mean() < 2  # JPEG: small errors at the colour edge
    assert image_size(path) == (480, 240)

    extractor = make_extractor()
    for given in (path, Image.open(path)):
        _, pil = extractor.preprocess(given, load_size=48)
        assert (pil.height, pil.width) == (96, 48)
        arr = np.asarray(pil).astype(int)
        assert arr[:40, :, 0].mean() > 200 and arr[56:, :, 2].mean() > 200

    augment = MultiCropAugmentation(global_size=32, local_size=16)
    assert min(stored.shape[:2]) > 2 * augment.min_source_side()  # the loader decodes at a reduced scale
    loaded = np.asarray(ImageFolderDataset([path], augment).load(path)).astype(int)
    assert loaded.shape[0] == 2 * loaded.shape[1] and loaded.shape[0] < 480
    third = loaded.shape[0] // 3
    assert loaded[:third, :, 0].mean() > 200 and loaded[-third:, :, 2].mean() > 200


def test_16bit_images_reach_the_api_and_the_pretraining_loader_as_they_look(tmp_path, make_extractor):
    from pretrain.data import ImageFolderDataset, MultiCropAugmentation

    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (32, 1))
    path = tmp_path / "scan.png"
    Image.fromarray(ramp).save(path)
    expected = gray3(np.round(ramp.astype(np.float64) * 255 / 65535))
    extractor = make_extractor()
    for given in (path, Image.open(path), ramp):  # a file, a PIL image, a uint16 array
        _, pil = extractor.preprocess(given)
        np.testing.assert_array_equal(np.asarray(pil), expected)
    loaded = ImageFolderDataset([path], MultiCropAugmentation()).load(path)
    np.testing.assert_array_equal(np.asarray(loaded), expected)


def exif_mask(path, ids: np.ndarray, orientation: int, palette: list[int] | None = None):
    """A label map file (indexed when ``palette`` is given, else grayscale or 16-bit) with an orientation tag."""
    im = Image.fromarray(ids)
    if palette is not None:
        im = im.convert("P")
        im.putpalette(palette)
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif)
    return path


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_masks_are_read_upright_as_their_images_with_ids_and_palette_kept(tmp_path, orientation):
    """A photo and its mask saved with the same orientation tag line up: both read upright; palette indices
    stay indices (not colours), 16-bit ids stay 16-bit."""
    rng = np.random.default_rng(orientation)
    ids = rng.integers(0, 6, (H, W), dtype=np.uint8)
    upright = UPRIGHT[orientation](ids[:, :, None])[:, :, 0]
    pal = rng.integers(0, 256, 768).tolist()
    path = exif_mask(tmp_path / "mask.png", ids, orientation, pal)
    assert Image.open(path).mode == "P"
    got, got_pal = load_mask(path)
    assert got.dtype == np.uint8 and got_pal == pal
    np.testing.assert_array_equal(got, upright)
    np.testing.assert_array_equal(load_binary_mask(path), upright > 0)

    photo = exif_file(tmp_path / "photo.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8), orientation)
    assert got.shape == read(photo).shape[:2] == image_size(path) == image_size(photo)

    ids16 = ids.astype(np.uint16) * 9000  # ids beyond 255
    path16 = exif_mask(tmp_path / "labels16.png", ids16, orientation)
    got16, no_pal = load_mask(path16)
    assert got16.dtype == np.uint16 and no_pal is None
    np.testing.assert_array_equal(got16, UPRIGHT[orientation](ids16[:, :, None])[:, :, 0])


def test_mask_modes_and_errors(tmp_path):
    grey = np.zeros((H, W), np.uint8)
    grey[1:4, 2:7] = 255
    grey[1, 2] = 100  # a soft edge: below half is background in a grayscale mask
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "grey.png")[0], grey)
    np.testing.assert_array_equal(load_binary_mask(tmp_path / "grey.png"), grey >= 128)
    Image.fromarray(grey > 0).convert("1").save(tmp_path / "bits.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "bits.png")[0], (grey > 0).astype(np.uint8))

    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(ImageError, match=r"rgb\.png: a RGB image; the mask must be an indexed"):
        load_mask(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "rgb.png", grey=True)[0], grey)  # a mask drawn in colour
    np.testing.assert_array_equal(load_binary_mask(tmp_path / "rgb.png"), grey >= 128)

    Image.fromarray(np.full((H, W), 70000, np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ImageError, match=r"big\.tif: label values 70000\.\.70000"):
        load_mask(tmp_path / "big.tif")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match=r"junk\.png: ground truth is not an image file"):
        load_mask(tmp_path / "junk.png", "ground truth")
    with pytest.raises(ImageError, match=r"nothere\.png: first-frame mask not found"):
        load_mask(tmp_path / "nothere.png", "first-frame mask")
