"""Composites made afresh per sample (``pretrain --cutouts``): deterministic per sample seed, new for every
seed, objects pasted by their alpha matte, and a training run that uses them."""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from pretrain import PretrainConfig, train
from pretrain.composite import Composer, load_cutout, load_scene
from pretrain.data import ImageFolderDataset, MultiCropAugmentation, find_images
from vitdense.errors import DataError

from test_pretrain_run import TINY, photo_dir  # noqa: F401  (fixture)

PURE = (255, 0, 255)  # a colour no photo of the fixture has: where it shows, a cut-out was pasted


@pytest.fixture(scope="module")
def cutout_dir(tmp_path_factory):
    """Four magenta discs of different sizes on transparent PNGs, with some transparent margin."""
    folder = tmp_path_factory.mktemp("cutouts")
    for i, radius in enumerate((10, 14, 18, 22)):
        size = 2 * radius + 12
        yy, xx = np.mgrid[:size, :size]
        alpha = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= radius ** 2).astype(np.uint8) * 255
        rgba = np.dstack([np.full((size, size, 3), PURE, np.uint8), alpha])
        Image.fromarray(rgba, "RGBA").save(folder / f"disc{i}.png")
    return folder


def test_backgrounds_and_cutouts_are_read_upright(tmp_path):
    """Background photos and cut-outs with an EXIF orientation tag are composed as a viewer shows them."""
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(stored).save(tmp_path / "scene.png", exif=exif)
    np.testing.assert_array_equal(load_scene(tmp_path / "scene.png", 100), np.rot90(stored, -1))
    rgba = rng.integers(1, 256, (6, 10, 4), dtype=np.uint8)  # every pixel visible: nothing trimmed
    Image.fromarray(rgba).save(tmp_path / "cut.png", exif=exif)
    np.testing.assert_array_equal(load_cutout(tmp_path / "cut.png"), np.rot90(rgba, -1))


def test_load_cutout_trims_to_the_alpha_and_refuses_opaque_files(cutout_dir, tmp_path):
    rgba = load_cutout(cutout_dir / "disc0.png")
    assert rgba.shape == (21, 21, 4) and rgba[..., 3].max() == 255  # 2·10+1 px: the disc's bounding box
    Image.new("RGB", (20, 20)).save(tmp_path / "opaque.png")
    with pytest.raises(DataError, match="opaque.png: a cut-out needs an alpha channel"):
        load_cutout(tmp_path / "opaque.png")


def test_composites_are_new_per_seed_and_the_same_for_the_same_seed(cutout_dir, photo_dir):  # noqa: F811
    composer = Composer(find_images(cutout_dir), find_images(photo_dir), size=64)
    a = np.asarray(composer.make(np.random.default_rng([5, 1])))
    b = np.asarray(composer.make(np.random.default_rng([5, 1])))
    c = np.asarray(composer.make(np.random.default_rng([6, 1])))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    for image in (a, c):
        magenta = np.all(image == PURE, axis=-1).mean()
        # one disc of 10-40 % of the image (a second of 5-20 % sometimes), seen through its alpha matte
        assert 0.05 < magenta < 0.7


def test_dataset_mixes_composites_and_photos_by_composite_p(cutout_dir, photo_dir):  # noqa: F811
    photos = find_images(photo_dir)
    composer = Composer(find_images(cutout_dir), photos, size=48)
    aug = MultiCropAugmentation(32, 16, 0, global_scale=(1.0, 1.0))
    dataset = ImageFolderDataset(photos, aug, source_size=48, composer=composer, composite_p=0.5)
    is_composite = []
    for seed in range(60):
        (source, _), _ = dataset[(seed % len(photos), 1000 + seed)]
        rgb = source.permute(1, 2, 0).numpy()
        is_composite.append(bool(np.all(rgb == PURE, axis=-1).any()))
        # the same key gives the same source
        assert np.array_equal(dataset[(seed % len(photos), 1000 + seed)][0][0].numpy(), source.numpy())
    expected = [np.random.default_rng([1000 + s, 1]).random() < 0.5 for s in range(60)]
    assert is_composite == expected and 15 < sum(expected) < 45
    none = ImageFolderDataset(photos, aug, source_size=48, composer=composer, composite_p=0.0)
    assert not any(np.all(none[(i, i)][0][0].permute(1, 2, 0).numpy() == PURE, axis=-1).any() for i in range(20))


def test_training_with_fresh_composites(cutout_dir, photo_dir, tmp_path):  # noqa: F811
    cfg = PretrainConfig(data_dir=str(photo_dir), out=str(tmp_path / "run"), **TINY, batch_size=8, epochs=1,
                         cutouts=str(cutout_dir), composite_p=0.5)
    result = train(cfg)
    assert result.steps == 3 and np.isfinite(result.last_loss) and result.export.is_file()


def test_backgrounds_without_cutouts_is_a_user_error(photo_dir, tmp_path):  # noqa: F811
    from vitdense.errors import ConfigError

    cfg = PretrainConfig(data_dir=str(photo_dir), out=str(tmp_path / "run"), **TINY, backgrounds=str(photo_dir))
    with pytest.raises(ConfigError, match="--backgrounds needs --cutouts"):
        train(cfg)


def test_an_opaque_cutout_is_refused_before_anything_is_written(cutout_dir, photo_dir, tmp_path):  # noqa: F811
    import shutil

    folder = tmp_path / "cutouts"
    shutil.copytree(cutout_dir, folder)
    Image.new("RGB", (20, 20)).save(folder / "opaque.png")
    cfg = PretrainConfig(data_dir=str(photo_dir), out=str(tmp_path / "run"), **TINY, batch_size=8, epochs=1,
                         cutouts=str(folder))
    with pytest.raises(DataError, match="opaque.png: a cut-out needs an alpha channel"):
        train(cfg)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
