"""The device-side multi-crop path (pretrain/gpu_augment.py): each operation against torchvision's own
tensor implementation or an exact expectation, the whole path against the PIL path, and training with it.
It is plain torch, so it runs (and is tested) on the CPU."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from pretrain import PretrainConfig, train
from pretrain.data import CropParams, ImageFolderDataset, MultiCropAugmentation, collate_crops, find_images
from pretrain.gpu_augment import (NPARAM, GPUMultiCrop, adjust_brightness, adjust_contrast, adjust_hue,
                                  adjust_saturation, crop_resize, gaussian_blur, params_to_tensor)
from vitdense.backbones import IMAGENET_MEAN, IMAGENET_STD

from test_pretrain_run import TINY, photo_dir  # noqa: F401  (fixture)


@pytest.fixture()
def batch() -> torch.Tensor:
    return torch.rand(5, 3, 20, 24, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("op, reference, factors", [
    (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4, 0.8, 1.2]),
    (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.8, 1.2]),
    (adjust_saturation, TF.adjust_saturation, [0.6, 1.0, 1.4, 0.0, 1.2]),
    (adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.05, 0.1, -0.03]),
])
def test_colour_operations_equal_torchvision_per_image(batch, op, reference, factors):
    out = op(batch, torch.tensor(factors))
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], reference(batch[i], f), atol=2e-5, rtol=0)


def test_blur_equals_torchvision_gaussian_blur_per_image(batch):
    sigma = torch.tensor([0.3, 1.0, 2.0, 0.7, 1.5])
    radius = 6
    out = gaussian_blur(batch, sigma, radius)
    for i, s in enumerate(sigma.tolist()):
        ref = TF.gaussian_blur(batch[i:i + 1], kernel_size=2 * radius + 1, sigma=s)[0]
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def _rows(boxes: list[tuple[int, int, int, int]], size: int, flip: bool) -> torch.Tensor:
    return params_to_tensor([CropParams(b, size, flip, None, (0, 1, 2, 3), False, None, False) for b in boxes])


def test_crop_at_native_scale_is_an_exact_crop_and_flip_mirrors_it():
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    boxes = [(3, 5, 16, 16), (10, 0, 16, 16)]
    out = crop_resize(images, _rows(boxes, 16, False), 16)
    flipped = crop_resize(images, _rows(boxes, 16, True), 16)
    for i, (top, left, h, w) in enumerate(boxes):
        expected = images[i, :, top:top + h, left:left + w].float() / 255
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(flipped[i], expected.flip(-1), atol=1e-5, rtol=0)


def test_solarize_and_grayscale_match_pil():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    rows = params_to_tensor([CropParams((0, 0, 16, 16), 16, False, None, (0, 1, 2, 3), True, None, True)])
    out = GPUMultiCrop((0, 0, 0), (1, 1, 1))(image, rows[None])[0][0]
    from PIL import ImageOps

    expected = np.asarray(ImageOps.solarize(Image.fromarray(pixels).convert("L").convert("RGB"), 128)) / 255
    # PIL rounds the luma to a byte before solarising: one grey level apart at most
    assert np.abs(out.permute(1, 2, 0).numpy() - expected).max() <= 1.5 / 255


def test_device_path_views_match_pil_path_views(photo_dir):  # noqa: F811
    """Same seeds → same boxes and choices; without photometric noise the pixels differ only by resampling."""
    plain = MultiCropAugmentation(48, 24, 3, jitter_p=0.0, grayscale_p=0.0, blur_p=(0, 0, 0), solarize_p=0.0)
    paths = find_images(photo_dir)[:6]
    cpu = ImageFolderDataset(paths, plain)
    dev = ImageFolderDataset(paths, plain, source_size=96)  # the photos are 96 px: no shrinking
    keys = [(i, 1000 + i) for i in range(len(paths))]
    cpu_views, _ = collate_crops([cpu[k] for k in keys])
    (images, params), _ = collate_crops([dev[k] for k in keys])
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 96, 96) and params.shape == (6, 5, NPARAM)
    dev_views = GPUMultiCrop(IMAGENET_MEAN, IMAGENET_STD)(images, params)
    assert [v.shape for v in dev_views] == [v.shape for v in cpu_views]
    for a, b in zip(dev_views, cpu_views):
        # PIL antialiases when it shrinks, grid_sample does not: close on average, not pixel-exact
        assert (a - b).abs().mean() < 0.12, (a - b).abs().mean()
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.97


def test_device_path_draws_the_same_random_choices_as_the_pil_path():
    aug = MultiCropAugmentation(32, 16, 4)
    params = aug.sample_params(random.Random(7), 80, 60)
    rows = params_to_tensor(params)
    assert rows.shape == (6, NPARAM)
    for p, row in zip(params, rows):
        assert tuple(row[:4].long().tolist()) == p.box and int(row[4]) == p.size
        assert bool(row[5]) == p.flip and bool(row[15]) == p.grayscale and bool(row[17]) == p.solarize
        assert row[16].item() == pytest.approx(p.blur_radius or 0.0)


def test_training_with_the_device_path_on_cpu(photo_dir, tmp_path):  # noqa: F811
    cfg = PretrainConfig(data_dir=str(photo_dir), out=str(tmp_path / "run"), **TINY, batch_size=8, epochs=2,
                         repeat=2, gpu_augment="on", source_size=64)
    result = train(cfg)
    records = [json.loads(line) for line in result.log.read_text().splitlines()]
    assert result.steps == 2 * (24 * 2 // 8) and all(np.isfinite(r["loss"]) for r in records)
    assert result.export.exists()


def test_collate_pads_sources_to_the_batch_and_workers_give_the_same_batches(photo_dir):  # noqa: F811
    from torch.utils.data import DataLoader

    from pretrain.data import StepBatchSampler

    aug = MultiCropAugmentation(32, 16, 2)
    ds = ImageFolderDataset(find_images(photo_dir)[:8], aug, source_size=64)
    wide, tall = torch.full((3, 20, 64), 7, dtype=torch.uint8), torch.full((3, 64, 30), 9, dtype=torch.uint8)
    params = torch.zeros(4, NPARAM)
    (images, stacked), failed = collate_crops([((wide, params), 0), ((tall, params + 1), 1)])
    assert images.shape == (2, 3, 64, 64) and stacked.shape == (2, 4, NPARAM) and failed == 1
    assert (images[0, :, :20] == 7).all() and (images[0, :, 20:] == 0).all()
    assert (images[1, :, :, :30] == 9).all() and (images[1, :, :, 30:] == 0).all()
    batches = []
    for workers in (0, 1):  # a worker builds the batch in shared memory
        sampler = StepBatchSampler(len(ds), 4, seed=1)
        batches.append(list(DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate_crops)))
    for (one, _), (other, _) in zip(*batches):
        assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1])
    assert batches[1][0][0][0].is_shared()


def test_resident_sources_train_exactly_as_streamed_sources(photo_dir, tmp_path):  # noqa: F811
    """Sources decoded once and kept on the device give the very same crops, so the same run."""
    losses = {}
    for resident_mb in (0, 64):
        cfg = PretrainConfig(data_dir=str(photo_dir), out=str(tmp_path / f"run{resident_mb}"), **TINY, batch_size=8,
                             epochs=1, repeat=2, gpu_augment="on", source_size=64, resident_mb=resident_mb)
        result = train(cfg)
        losses[resident_mb] = [json.loads(line)["loss"] for line in result.log.read_text().splitlines()]
    assert len(losses[0]) == 6 and losses[0] == losses[64]


def test_resident_sources_leave_out_undecodable_files(photo_dir, tmp_path):  # noqa: F811
    from pretrain.data import ResidentSources

    folder = tmp_path / "imgs"
    folder.mkdir()
    jpegs = [p for p in find_images(photo_dir) if p.suffix == ".jpg"][:3]
    for path in jpegs:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(jpegs[0].read_bytes()[:400])  # a valid header, then nothing
    ds = ImageFolderDataset(find_images(folder), MultiCropAugmentation(32, 16, 2), source_size=64)
    resident = ResidentSources(ds, torch.device("cpu"))
    assert resident.failed == [folder / "broken.jpg"] and len(resident) == 3
    kept = [p for p in ds.paths if p.name != "broken.jpg"]
    for i, path in enumerate(kept):
        expected = torch.from_numpy(np.array(ds.cached_load(ds.paths.index(path)))).permute(2, 0, 1)
        h, w = resident.sizes[i].tolist()
        assert torch.equal(resident.gather(torch.tensor([i]))[0, :, :h, :w], expected)
        (index, params), failed = resident[(i + len(resident), 5)]  # the second pass (--repeat)
        assert index == i and failed == 0 and torch.equal(params, ds[(ds.paths.index(path), 5)][0][1])
