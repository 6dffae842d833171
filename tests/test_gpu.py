"""The CUDA paths, checked against the CPU: device crops, bf16 autocast training (with the fused optimizer and
resident sources), extraction in float32 and bfloat16, and the report card on the GPU.

Run with ``python -m pytest -m gpu tests/test_gpu.py`` from the repository's root on a machine with a GPU (``python
-m`` puts the checkout on ``sys.path``; benchmarks/device_session.py runs them last); they skip elsewhere (CI has
none).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_vit
from pretrain import PretrainConfig, train
from pretrain.data import ImageFolderDataset, MultiCropAugmentation, collate_crops, find_images
from pretrain.gpu_augment import GPUMultiCrop
from vitdense import ViTExtractor
from vitdense.backbones import IMAGENET_MEAN, IMAGENET_STD

from test_pretrain_run import TINY, photo_dir  # noqa: F401  (fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_device_crops_on_cuda_equal_the_same_crops_on_cpu(photo_dir):  # noqa: F811
    aug = MultiCropAugmentation(48, 24, 4)
    dataset = ImageFolderDataset(find_images(photo_dir)[:8], aug, source_size=96)
    (images, params), _ = collate_crops([dataset[(i, 50 + i)] for i in range(8)])
    crops = GPUMultiCrop(IMAGENET_MEAN, IMAGENET_STD)
    on_cpu = crops(images, params)
    on_gpu = crops(images.cuda(), params)
    assert all(v.is_cuda for v in on_gpu)
    for a, b in zip(on_gpu, on_cpu):
        torch.testing.assert_close(a.cpu(), b, atol=2e-4, rtol=0)


def test_bf16_training_on_cuda_with_resident_sources(photo_dir, tmp_path):  # noqa: F811
    cfg = PretrainConfig(data_dir=str(photo_dir), out=str(tmp_path / "run"), **TINY, batch_size=8, epochs=2,
                         device="cuda", precision="bf16", gpu_augment="on", source_size=64)
    result = train(cfg)
    records = [json.loads(line) for line in result.log.read_text().splitlines() if '"loss"' in line]
    assert result.steps == 2 * (24 // 8) and all(np.isfinite(r["loss"]) for r in records)
    ext = ViTExtractor(weights=result.export, stride=4, device="cuda")
    batch = torch.randn(1, 3, 48, 48)
    assert torch.isfinite(ext.extract(batch, -1, "key").descriptors[-1]).all()


def test_extraction_on_cuda_equals_cpu_and_bf16_is_close():
    batch = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))

    def run(device: str, dtype: torch.dtype = torch.float32, bin: bool = True):
        ext = ViTExtractor("custom", stride=4, model=tiny_vit(depth=4), device=device, dtype=dtype)
        feats = ext.extract(batch, 3, "key", bin=bin, saliency=True)
        return feats.descriptors[3].float().cpu(), feats.saliency.float().cpu()

    cpu_desc, cpu_sal = run("cpu")
    gpu_desc, gpu_sal = run("cuda")
    torch.testing.assert_close(gpu_desc, cpu_desc, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gpu_sal, cpu_sal, atol=1e-3, rtol=1e-3)
    half_desc, _ = run("cuda", torch.bfloat16, bin=False)
    plain_desc, _ = run("cpu", bin=False)
    assert torch.nn.functional.cosine_similarity(half_desc, plain_desc, dim=-1).mean() > 0.99


def test_report_card_runs_on_cuda(tmp_path):
    pytest.importorskip("faiss", reason="the report card's co-segmentation needs faiss (carried to the device "
                                        "in .whl/site-py312.tar.xz, see benchmarks/device_suite.md)")
    from test_evaluate import ColourExtractor, write_tiny_eval_set
    from vitdense.evaluate import Candidate, EvalSettings, evaluate_backbones

    data = write_tiny_eval_set(tmp_path / "eval")
    ext = ColourExtractor("colour", stride=4, model=tiny_vit(depth=12), device="cuda")
    report = evaluate_backbones([Candidate("colour", ext, "test")], data,
                                EvalSettings(load_size=64, knn_load_size=64), progress=False)
    assert report.results["colour"]["coseg"].scores["jaccard"] > 0.8
    assert set(report.results["random init"]) == {"coseg", "saliency", "knn", "correspond", "video"}


def test_training_steps_make_the_host_wait_only_where_intended(photo_dir, tmp_path, monkeypatch):  # noqa: F811
    """PRETRAIN_SYNC_DEBUG=error: any operation in a step that waits for the device (a copy from pageable
    memory, .item(), nonzero on the device...) raises; reading the last step's numbers and saving are allowed."""
    monkeypatch.setenv("PRETRAIN_SYNC_DEBUG", "error")
    cfg = PretrainConfig(data_dir=str(photo_dir), out=str(tmp_path / "run"), **TINY, batch_size=8, epochs=2,
                         device="cuda", precision="bf16", gpu_augment="on", source_size=64, time_limit=600)
    result = train(cfg)
    assert result.steps == 2 * (24 // 8)
    assert torch.cuda.get_sync_debug_mode() == 0  # left as found
