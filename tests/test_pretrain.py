"""pretrain/ building blocks against independent computations: loss and centre, schedules, multi-crop,
head, k-NN, batch order, configuration and command-line derivation."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import PretrainConfig, build_argparser, config_from_args
from pretrain.data import MultiCropAugmentation, StepBatchSampler, sample_box
from pretrain.heads import DINOHead, MultiCropWrapper
from pretrain.knn import knn_accuracy, knn_scores
from pretrain.loss import DINOLoss
from pretrain.schedules import Schedules, cosine_schedule
from vitdense.errors import ConfigError


# ---------------------------------------------------------------------------------------------- loss

def _reference_loss(student: np.ndarray, teacher: np.ndarray, center: np.ndarray, ncrops: int, tau_s: float,
                    tau_t: float) -> tuple[float, float]:
    """DINO loss and mean teacher entropy with explicit loops over views, images and prototypes."""
    batch = teacher.shape[0] // 2

    def softmax(v: np.ndarray) -> np.ndarray:
        e = np.exp(v - v.max())
        return e / e.sum()

    total, terms, entropies = 0.0, 0, []
    for i in range(2):
        for j in range(ncrops):
            if i == j:
                continue
            pair = 0.0
            for b in range(batch):
                p_t = softmax((teacher[i * batch + b] - center) / tau_t)
                p_s = softmax(student[j * batch + b] / tau_s)
                pair += -sum(p_t[k] * math.log(p_s[k]) for k in range(len(p_t)))
            total += pair / batch
            terms += 1
    for row in teacher:
        p_t = softmax((row - center) / tau_t)
        entropies.append(-sum(p * math.log(p) for p in p_t))
    return total / terms, float(np.mean(entropies))


def test_loss_equals_independent_computation():
    gen = torch.Generator().manual_seed(0)
    ncrops, batch, k = 4, 3, 7
    student = torch.randn(ncrops * batch, k, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2 * batch, k, generator=gen, dtype=torch.float64)
    loss_fn = DINOLoss(k, ncrops, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, k, generator=gen))
    center_before = loss_fn.center.clone().double().numpy()[0]
    terms = loss_fn(student, teacher, teacher_temp=0.05)
    want_loss, want_entropy = _reference_loss(student.numpy(), teacher.numpy(), center_before, ncrops, 0.1, 0.05)
    assert terms.loss.item() == pytest.approx(want_loss, rel=1e-5)
    assert terms.teacher_entropy.item() == pytest.approx(want_entropy, rel=1e-5)
    assert terms.kl.item() == pytest.approx(want_loss - want_entropy, rel=1e-4, abs=1e-5)
    # Centre: EMA with momentum 0.9 of the teacher's batch mean (Eq. 4).
    want_center = 0.9 * center_before + 0.1 * teacher.numpy().mean(axis=0)
    np.testing.assert_allclose(loss_fn.center.numpy()[0], want_center, rtol=1e-6)


def test_loss_gradient_reaches_student_only_and_center_can_stay():
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    loss_fn = DINOLoss(5, 3)
    loss_fn(student, teacher, 0.04, update_center=False).loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert torch.equal(loss_fn.center, torch.zeros(1, 5))


# ---------------------------------------------------------------------------------------------- schedules

def test_schedules_match_closed_forms():
    cfg = PretrainConfig(batch_size=64, epochs=10, lr=0.0005, min_lr=1e-6, warmup_epochs=2,
                         weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996,
                         warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4)
    sched = Schedules.from_config(cfg, steps_per_epoch=10)  # 100 steps, lr warm-up 20, temperature 40
    base = 0.0005 * 64 / 256
    assert sched.total_steps == 100 and sched.base_lr == pytest.approx(1.25e-4)
    assert sched.at(0).lr == 0.0
    assert sched.at(10).lr == pytest.approx(base / 2)  # half-way through the linear warm-up
    assert sched.at(20).lr == pytest.approx(base)  # cosine starts at the peak
    assert sched.at(60).lr == pytest.approx(1e-6 + (base - 1e-6) / 2)  # half of the cosine part
    assert sched.at(100).lr == pytest.approx(1e-6)
    assert sched.at(0).weight_decay == pytest.approx(0.04)
    assert sched.at(50).weight_decay == pytest.approx(0.22)  # (0.04 + 0.4) / 2
    assert sched.at(25).weight_decay == pytest.approx(0.4 - 0.18 * (1 + math.cos(math.pi / 4)))
    assert sched.at(0).momentum == pytest.approx(0.996)
    assert sched.at(50).momentum == pytest.approx(0.998)
    assert sched.at(100).momentum == pytest.approx(1.0)
    assert sched.at(0).teacher_temp == pytest.approx(0.04)
    assert sched.at(10).teacher_temp == pytest.approx(0.0475)
    assert sched.at(40).teacher_temp == pytest.approx(0.07)
    assert sched.at(99).teacher_temp == pytest.approx(0.07)


def test_short_runs_warm_up_over_the_whole_run():
    sched = Schedules.from_config(PretrainConfig(epochs=1, batch_size=256), steps_per_epoch=4)  # 10 warm-up epochs
    assert sched.lr_warmup_steps == 4 and sched.temp_warmup_steps == 4
    assert [sched.at(s).lr for s in range(4)] == pytest.approx([0.0, 0.000125, 0.00025, 0.000375])
    assert cosine_schedule(3, 3, 1.0, 0.0, warmup_steps=3) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- multi-crop

def _photo(photos, size=(180, 240)) -> Image.Image:
    return Image.fromarray(photos["chelsea"]).resize(size[::-1])


def test_multicrop_shapes_and_determinism(photos):
    aug = MultiCropAugmentation(global_size=48, local_size=24, local_crops=5)
    image = _photo(photos)
    views = aug(image, random.Random(3))
    assert aug.ncrops == 7 and len(views) == 7
    assert [tuple(v.shape) for v in views] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 5
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    again = aug(image, random.Random(3))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    other = aug(image, random.Random(4))
    assert not torch.equal(views[0], other[0])


def test_multicrop_parameter_statistics():
    aug = MultiCropAugmentation(global_size=32, local_size=16, local_crops=2)
    rng = random.Random(0)
    height, width = 300, 400
    params = [aug.sample_params(rng, height, width) for _ in range(3000)]
    g1, g2, loc = [p[0] for p in params], [p[1] for p in params], [v for p in params for v in p[2:]]

    def rate(views, pred) -> float:
        return sum(map(pred, views)) / len(views)

    def area(p) -> float:
        return p.box[2] * p.box[3] / (height * width)

    # Crop areas within the scale ranges (rounding to whole pixels and the aspect-ratio factor aside).
    assert all(0.39 <= area(p) <= 1.0 for p in g1 + g2)
    assert all(0.048 <= area(p) <= 0.41 for p in loc)
    assert all(p.box[0] >= 0 and p.box[1] >= 0 and p.box[0] + p.box[2] <= height and p.box[1] + p.box[3] <= width
               for p in g1 + loc)
    assert {p.size for p in g1 + g2} == {32} and {p.size for p in loc} == {16}
    # Probabilities of DINO's augmentations (3000 draws: +-0.03 is over 3 standard deviations).
    assert rate(g1, lambda p: p.blur_radius is not None) == 1.0
    assert rate(g2, lambda p: p.blur_radius is not None) == pytest.approx(0.1, abs=0.03)
    assert rate(loc, lambda p: p.blur_radius is not None) == pytest.approx(0.5, abs=0.03)
    assert rate(g2, lambda p: p.solarize) == pytest.approx(0.2, abs=0.03)
    assert rate(g1 + loc, lambda p: p.solarize) == 0.0
    assert rate(loc, lambda p: p.flip) == pytest.approx(0.5, abs=0.03)
    assert rate(loc, lambda p: p.jitter is not None) == pytest.approx(0.8, abs=0.03)
    assert rate(loc, lambda p: p.grayscale) == pytest.approx(0.2, abs=0.03)
    radii = [p.blur_radius for p in g1]
    assert 0.1 <= min(radii) and max(radii) <= 2.0
    jit = np.array([p.jitter for p in loc if p.jitter is not None])
    assert jit[:, 0].min() >= 0.6 and jit[:, 0].max() <= 1.4 and jit[:, 2].min() >= 0.8 and jit[:, 2].max() <= 1.2
    assert np.abs(jit[:, 3]).max() <= 0.1


def test_multicrop_apply_equals_plain_crop_resize_flip(photos):
    from pretrain.data import CropParams

    aug = MultiCropAugmentation(global_size=32, local_size=16, local_crops=0)
    image = _photo(photos)
    params = CropParams(box=(20, 30, 100, 120), size=32, flip=True, jitter=None, jitter_order=(0, 1, 2, 3),
                        grayscale=False, blur_radius=None, solarize=False)
    got = aug.apply(image, params)
    crop = image.crop((30, 20, 150, 120)).resize((32, 32), Image.BICUBIC)
    want = np.asarray(crop, dtype=np.float32)[:, ::-1] / 255.0
    want = (want - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), want, atol=1e-5)
    # Solarisation inverts pixels >= 128; grayscale makes the three channels equal before normalising.
    solar = aug.apply(image, CropParams((20, 30, 100, 120), 32, False, None, (0, 1, 2, 3), True, None, True))
    raw = solar * aug.std + aug.mean
    assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[1], raw[2], atol=1e-6)
    gray = np.asarray(crop.convert("L"), dtype=np.float32)
    np.testing.assert_allclose(raw[0].numpy() * 255, np.where(gray >= 128, 255 - gray, gray), atol=1e-3)


def test_sample_box_falls_back_to_centre_crop():
    # An extremely wide image: no box with aspect ratio in [3/4, 4/3] has 90% of its area.
    top, left, h, w = sample_box(random.Random(0), 10, 1000, scale=(0.9, 1.0))
    assert (h, w) == (10, 13) and top == 0 and left == (1000 - 13) // 2


# ---------------------------------------------------------------------------------------------- head

def test_dino_head_shapes_and_frozen_norm():
    head = DINOHead(16, out_dim=40, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(5, 16)
    assert head(x).shape == (5, 40)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones(40, 1))
    # Weight normalisation with g = 1: every prototype (row of the effective weight) has unit norm, so the
    # logits are cosine similarities of the L2-normalised bottleneck with the prototypes.
    weight = head.last_layer.weight
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(40))
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), z @ weight.T)
    assert head(x).abs().max() <= 1.0 + 1e-5
    assert DINOHead(16, 40, 32, 8, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_wrapper_groups_by_size():
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    wrapper = MultiCropWrapper(Recorder(), torch.nn.Identity())
    crops = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    out = wrapper(crops)
    assert calls == [(4, 3, 8, 8), (4, 3, 4, 4)]
    torch.testing.assert_close(out, torch.cat([c.mean(dim=(2, 3)) for c in crops]))


# ---------------------------------------------------------------------------------------------- k-NN

def test_knn_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(30, 6, generator=gen), torch.randn(9, 6, generator=gen)
    labels = torch.randint(0, 4, (30,), generator=gen)
    k, temp = 5, 0.07
    got = knn_scores(bank, labels, queries, 4, k=k, temperature=temp, chunk=4)
    for q in range(9):
        sims = [float(queries[q] @ bank[i] / (queries[q].norm() * bank[i].norm())) for i in range(30)]
        best = sorted(range(30), key=lambda i: -sims[i])[:k]
        want = [0.0] * 4
        for i in best:
            want[int(labels[i])] += math.exp(sims[i] / temp)
        np.testing.assert_allclose(got[q].numpy(), want, rtol=1e-4)


def test_knn_accuracy_and_leave_one_out():
    # Two well separated clusters: every query is classified correctly, also leave-one-out.
    gen = torch.Generator().manual_seed(2)
    centres = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    labels = torch.arange(20) % 2
    feats = centres[labels] + 0.3 * torch.randn(20, 3, generator=gen)
    assert knn_accuracy(feats, labels, feats, labels, 2, k=3, exclude_self=True)["top1"] == 100.0
    # Leave-one-out really excludes the query: a lone sample of class 2 cannot be found any more.
    labels3 = labels.clone()
    labels3[0] = 2
    self_in = knn_accuracy(feats, labels3, feats[:1], labels3[:1], 3, k=1)
    self_out = knn_accuracy(feats, labels3, feats[:1], labels3[:1], 3, k=1, exclude_self=True)
    assert self_in["top1"] == 100.0 and self_out["top1"] == 0.0


def test_knn_top5_only_with_more_than_five_classes(tmp_path):
    """Top-5 is the label among the 5 best votes, computed here by sorting each query's votes; with 5
    classes or fewer it is 100 % by construction and left out, by the monitor as by retrieval-eval knn."""
    import contextlib

    from pretrain.train import run_knn
    from vitdense import create_vit
    from vitdense.retrieval_eval import knn_accuracy as knn_accuracy_tuple

    gen = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(40, 6, generator=gen), torch.randn(25, 6, generator=gen)
    for classes in (7, 6, 5, 2):
        bank_y, query_y = torch.arange(40) % classes, torch.arange(25) % classes
        got = knn_accuracy(bank, bank_y, queries, query_y, classes, k=5)
        votes = knn_scores(bank, bank_y, queries, classes, k=5).tolist()
        top1 = 100 * np.mean([max(range(classes), key=lambda c: v[c]) == y for v, y in zip(votes, query_y.tolist())])
        assert got["top1"] == pytest.approx(top1)
        if classes > 5:
            best5 = [sorted(range(classes), key=lambda c: -v[c])[:5] for v in votes]
            top5 = 100 * np.mean([y in b for b, y in zip(best5, query_y.tolist())])
            assert 0 < top5 < 100 and got["top5"] == pytest.approx(top5)
        else:
            assert "top5" not in got
        assert (knn_accuracy_tuple(bank, bank_y, queries, query_y, k=5, num_classes=classes)[1] is None) == \
            (classes <= 5)

    # the monitor itself: 6 classes of 2 images each, leave-one-out
    rng = np.random.default_rng(0)
    for c in range(6):
        (tmp_path / f"class{c}").mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"class{c}" / f"{i}.png")
    cfg = PretrainConfig(knn_data=str(tmp_path), global_size=32, knn_k=3)
    backbone = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8)
    result = run_knn(cfg, backbone, torch.device("cpu"), contextlib.nullcontext)
    assert set(result) == {"top1", "top5"}


# ---------------------------------------------------------------------------------------------- batch order

def test_batches_split_across_processes_and_resume():
    one = StepBatchSampler(23, global_batch=4, seed=5)
    two = [StepBatchSampler(23, global_batch=4, rank=r, world_size=2, seed=5) for r in range(2)]
    for epoch in range(2):
        one.set_epoch(epoch)
        for s in two:
            s.set_epoch(epoch)
        single = list(one)
        split = list(zip(*[list(s) for s in two]))
        assert len(single) == 5 and len(split) == 5  # 23 // 4 steps, the rest dropped
        for batch, (a, b) in zip(single, split):
            assert sorted(batch) == sorted(a + b)  # same images and the same augmentation seeds
        keys = [i for batch in single for i, _ in batch]
        assert len(set(keys)) == 20
    one.set_epoch(1, start_step=3)
    resumed = list(one)
    one.set_epoch(1)
    assert resumed == list(one)[3:] and len(one) == 5


# ---------------------------------------------------------------------------------------------- config

def test_config_arch_resolution_and_validation():
    assert PretrainConfig(arch="vit_small").timm_arch() == ("vit_small_patch16_224",
                                                            {"img_size": 224, "patch_size": 16})
    assert PretrainConfig(arch="vit_small", patch_size=8, global_size=128).timm_arch() == (
        "vit_small_patch8_224", {"img_size": 128, "patch_size": 8})
    assert PretrainConfig(arch="vit_base_patch8_224", img_size=256).timm_arch()[1] == {"img_size": 256,
                                                                                      "patch_size": 8}
    with pytest.raises(ConfigError, match="--global-size 100"):
        PretrainConfig(global_size=100).validate()
    with pytest.raises(ConfigError, match="--arch resnet50"):
        PretrainConfig(arch="resnet50").validate()


def test_command_lines_are_derived_from_the_dataclass():
    import click

    from vitdense.cli import main

    args = build_argparser().parse_args(["imgs", "--arch", "vit_tiny", "--global-size", "128", "--local-crops", "6",
                                         "--global-scale", "0.3", "1", "--no-norm-last-layer", "--precision", "bf16"])
    cfg = config_from_args(args)
    assert (cfg.data_dir, cfg.arch, cfg.global_size, cfg.local_crops) == (os.path.abspath("imgs"), "vit_tiny", 128, 6)
    assert cfg.global_scale == (0.3, 1.0) and cfg.norm_last_layer is False and cfg.precision == "bf16"
    assert cfg.lr == 0.0005 and cfg.out_dim == 65536 and cfg.teacher_temp == 0.07  # DINO defaults
    command = main.commands["pretrain"]
    names = {p.name for p in command.params}
    import dataclasses

    assert names == {f.name for f in dataclasses.fields(PretrainConfig)}
    ctx = click.Context(command)
    parsed = command.make_context("pretrain", ["imgs", "--local-size", "64", "--compile"], parent=ctx)
    assert config_from_args(parsed.params).local_size == 64 and parsed.params["compile"] is True
