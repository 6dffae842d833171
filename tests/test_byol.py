"""BYOL (pretrain/byol.py and `pretrain --method byol`): heads, loss, target update and momentum schedule
against formulas written out here and against lightly's implementation (when installed); the augmentation
table; the collapse signature; option errors; a short run's export, log and resume."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from pretrain import PretrainConfig, train
from pretrain.byol import (COLLAPSE_STD, BYOLHead, BYOLLoss, BYOLMLP, BYOLOutput, byol_augmentation,
                           normalised_std, regression_loss)
from pretrain.checkpoint import load_checkpoint
from pretrain.config import build_argparser, config_from_args, explicit_options
from pretrain.monitor import collapse_warning
from pretrain.schedules import Schedules, cosine_schedule
from pretrain.train import build_model, update_teacher

from test_pretrain_run import photo_dir  # noqa: F401  (the session fixture of 24 photo crops)

REPO = Path(__file__).resolve().parents[1]
# A tiny ViT (8-px patches on 32-px views) with a small projector: ~0.1 s per step
TINY_BYOL = dict(method="byol", arch="vit_tiny_patch16_224", patch_size=8, global_size=32, projector_hidden_dim=64,
                 projector_dim=32, local_crops=0, global_scale=(0.08, 1.0), workers=0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp_by_hand(mlp: BYOLMLP, x: torch.Tensor) -> torch.Tensor:
    """Linear (no bias) → batch norm with the batch's biased variance → ReLU → linear, in training mode."""
    lin1, bn, _, lin2 = mlp.layers
    h = x @ lin1.weight.T
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    return torch.clamp(h, min=0) @ lin2.weight.T + lin2.bias


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values in every parameter (the batch norm's scale and shift included)."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ------------------------------------------------------------------ formulas written out here

def test_heads_match_the_paper_mlp_computed_by_hand():
    head = BYOLHead(12, hidden_dim=20, out_dim=6)
    _randomise(head, 1)
    x = torch.randn(10, 12, generator=_gen(2))
    out = head(x)
    assert isinstance(out, BYOLOutput) and out.projection.shape == out.prediction.shape == (10, 6)
    z = _mlp_by_hand(head.projector, x)
    torch.testing.assert_close(out.projection, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.prediction, _mlp_by_hand(head.predictor, z), atol=1e-5, rtol=1e-5)
    target = BYOLHead(12, hidden_dim=20, out_dim=6, predictor=False)
    target.load_state_dict(head.state_dict(), strict=False)
    torch.testing.assert_close(target(x), z, atol=1e-5, rtol=1e-5)
    # the paper's sizes by default: 4096 hidden, 256 out
    assert BYOLHead(8).projector.layers[0].out_features == 4096
    assert BYOLHead(8).predictor.layers[3].out_features == 256


def test_loss_is_the_symmetrised_squared_distance_of_unit_vectors_with_stop_gradient():
    g = _gen(3)
    q = torch.randn(8, 5, generator=g, requires_grad=True)  # online predictions of view 1 then view 2
    z_online = torch.randn(8, 5, generator=g)
    target = torch.randn(8, 5, generator=g, requires_grad=True)  # target projections of view 1 then view 2
    terms = BYOLLoss()(BYOLOutput(z_online, q), target)
    unit = lambda v: v / v.norm(dim=1, keepdim=True)  # noqa: E731
    qn, tn = unit(q.detach()), unit(target.detach())
    # q of view 1 (rows 0-3) against the target of view 2 (rows 4-7) and the other way round (Eq. 2 + its mirror)
    want = 0.5 * (((qn[:4] - tn[4:]) ** 2).sum(1).mean() + ((qn[4:] - tn[:4]) ** 2).sum(1).mean())
    assert terms.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert regression_loss(q[:1], q[:1]).item() == pytest.approx(0.0, abs=1e-6)
    assert regression_loss(q[:1], -q[:1]).item() == pytest.approx(4.0, abs=1e-5)
    terms.loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert target.grad is None  # sg(z'): the target gets no gradient


def test_target_update_and_momentum_schedule_follow_the_paper():
    cfg = PretrainConfig.for_method("byol", data_dir="x", **{k: v for k, v in TINY_BYOL.items() if k != "method"})
    torch.manual_seed(0)
    online, target = build_model(cfg, student=True), build_model(cfg, student=False)
    _randomise(target, 5)
    before_t = {k: v.clone() for k, v in target.state_dict().items()}
    online_params = dict(online.named_parameters())
    update_teacher(online, target, 0.9)
    for name, p in target.named_parameters():
        torch.testing.assert_close(p, 0.9 * before_t[name] + 0.1 * online_params[name])
    assert not any("predictor" in name for name in dict(target.named_parameters()))
    # tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (Grill et al. 2020, Sec. 3.2), tau_base 0.996
    sched = Schedules.from_config(cfg, steps_per_epoch=10)
    K = sched.total_steps
    for k in (0, 1, K // 3, K - 1, K):
        want = 1 - (1 - 0.996) * (math.cos(math.pi * k / K) + 1) / 2
        assert sched.at(k).momentum == pytest.approx(want, abs=1e-12)


def test_normalised_std_is_one_for_random_directions_and_zero_when_collapsed():
    z = torch.randn(4096, 64, generator=_gen(0))
    assert normalised_std(z).item() == pytest.approx(1.0, abs=0.02)
    same = torch.randn(1, 64, generator=_gen(1)).expand(32, 64)
    assert normalised_std(same).item() == pytest.approx(0.0, abs=1e-6)
    near = same + 1e-3 * torch.randn(32, 64, generator=_gen(2))
    assert normalised_std(near).item() < COLLAPSE_STD
    assert collapse_warning({"output_std": normalised_std(near).item()}).startswith("collapse")
    assert collapse_warning({"output_std": 0.7}) is None and collapse_warning({"teacher_entropy": 1.0}) is None


def test_augmentation_is_the_papers_asymmetric_pair():
    aug = byol_augmentation(64)
    assert aug.ncrops == 2 and aug.local_crops == 0 and aug.global_scale == (0.08, 1.0)
    assert (aug.jitter, aug.jitter_p, aug.grayscale_p, aug.blur_radius) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2,
                                                                              (0.1, 2.0))
    rng = random.Random(0)
    views = [aug.sample_params(rng, 300, 300) for _ in range(2000)]
    blur = [sum(v[i].blur_radius is not None for v in views) / len(views) for i in range(2)]
    solar = [sum(v[i].solarize for v in views) / len(views) for i in range(2)]
    assert blur[0] == 1.0 and abs(blur[1] - 0.1) < 0.025  # Table 6: blur 1.0 / 0.1
    assert solar[0] == 0.0 and abs(solar[1] - 0.2) < 0.03  # solarisation 0 / 0.2
    areas = [v[0].box[2] * v[0].box[3] / (300 * 300) for v in views]
    assert min(areas) < 0.15 and max(areas) > 0.9  # crops of 8-100 % of the image


# ------------------------------------------------------------------ against lightly (an independent implementation)

def test_parity_with_lightly():
    pytest.importorskip("lightly")
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule as lightly_cosine

    ours = BYOLHead(12, hidden_dim=20, out_dim=6)
    _randomise(ours, 7)
    proj, pred = BYOLProjectionHead(12, 20, 6), BYOLPredictionHead(6, 20, 6)
    # the same layers in the same order (Linear without bias, BatchNorm1d, ReLU, Linear): copy by position
    proj.layers.load_state_dict(ours.projector.layers.state_dict())
    pred.layers.load_state_dict(ours.predictor.layers.state_dict())
    x = torch.randn(16, 12, generator=_gen(8))
    out = ours(x)
    z_ref = proj(x)
    torch.testing.assert_close(out.projection, z_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.prediction, pred(z_ref), atol=1e-6, rtol=1e-6)

    # loss: lightly's BYOL recipe averages -cos over both directions; ours is 2 - 2 cos of the same pairs
    target = torch.randn(16, 6, generator=_gen(9))
    q1, q2 = out.prediction.chunk(2)
    t1, t2 = target.chunk(2)
    criterion = NegativeCosineSimilarity()
    lightly_loss = 0.5 * (criterion(q1, t2) + criterion(q2, t1))
    torch.testing.assert_close(BYOLLoss()(out, target).loss, 2 + 2 * lightly_loss, atol=1e-6, rtol=1e-6)

    # momentum update: ours (paired by name, online has the predictor) = lightly's on backbone + projector
    cfg = PretrainConfig.for_method("byol", data_dir="x", **{k: v for k, v in TINY_BYOL.items() if k != "method"})
    torch.manual_seed(0)
    online, target_net = build_model(cfg, student=True), build_model(cfg, student=False)
    _randomise(target_net, 10)
    reference = build_model(cfg, student=False)
    reference.load_state_dict(target_net.state_dict())
    update_teacher(online, target_net, 0.99)
    update_momentum(online.backbone, reference.backbone, 0.99)
    update_momentum(online.head.projector, reference.head.projector, 0.99)
    for (name, a), b in zip(target_net.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name

    # schedule: lightly's cosine reaches the end value at max_steps - 1, ours at the step after the last
    # update (total_steps); the curves are the same with max_steps = total_steps + 1
    total = 123
    for step in range(total + 1):
        assert cosine_schedule(step, total, 0.996, 1.0) == pytest.approx(
            lightly_cosine(step, total + 1, 0.996, 1.0), abs=1e-12)


# ------------------------------------------------------------------ options

def _parse(argv: list[str]) -> PretrainConfig:
    return config_from_args(build_argparser().parse_args(argv), explicit_options(argv))


def test_method_options_and_one_line_errors(tmp_path, capsys):
    cfg = _parse(["imgs", "--method", "byol"])
    assert (cfg.method, cfg.local_crops, cfg.global_scale) == ("byol", 0, (0.08, 1.0))  # BYOL's own defaults
    assert _parse(["imgs", "--method", "byol", "--global-scale", "0.3", "1"]).global_scale == (0.3, 1.0)
    assert _parse(["imgs", "--method", "byol", "--local-crops", "0"]).local_crops == 0
    assert _parse(["imgs"]).global_scale == (0.4, 1.0) and _parse(["imgs"]).local_crops == 8
    done = subprocess.run([sys.executable, "-m", "pretrain", str(tmp_path), "--method", "byol", "--teacher-temp",
                           "0.04", "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("pretrain: error: --teacher-temp means nothing for --method byol"), lines
    from pretrain.__main__ import main as module_main

    for argv, option in ((["--out-dim", "64"], "--out-dim"), (["--local-crops", "4"], "--local-crops"),
                         (["--hidden-dim", "64", "--student-temp", "0.2"], "--hidden-dim, --student-temp")):
        assert module_main([str(tmp_path), "--method", "byol", *argv, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{option} mean" in err[0] and "--method byol" in err[0], err
    from vitdense.cli import main

    result = CliRunner().invoke(main, ["pretrain", str(tmp_path), "--projector-dim", "64", "--out",
                                       str(tmp_path / "run")])
    assert result.exit_code == 2 and "--projector-dim means nothing for --method dino" in result.output
    assert not (tmp_path / "run").exists()
    with pytest.raises(Exception, match="--local-crops means nothing"):
        PretrainConfig(method="byol", data_dir="x").validate()  # the Python API: for_method gives BYOL's defaults
    PretrainConfig.for_method("byol", data_dir="x").validate()


# ------------------------------------------------------------------ a short run

@pytest.mark.slow
def test_short_run_exports_logs_the_collapse_signature_and_resumes_exactly(photo_dir, tmp_path, caplog,  # noqa: F811
                                                                          monkeypatch):
    from vitdense import ViTExtractor, read_weights

    settings = dict(TINY_BYOL, data_dir=str(photo_dir), batch_size=8, epochs=2, lr=0.001, warmup_epochs=0.5)
    full = train(PretrainConfig(**settings, out=str(tmp_path / "full")))
    assert full.steps == 6 and math.isfinite(full.last_loss)
    records = [json.loads(x) for x in full.log.read_text().splitlines()]
    stds = [r["output_std"] for r in records]
    assert len(stds) == 6 and "teacher_temp" not in records[0] and "teacher_entropy" not in records[0]
    assert min(stds) > 0.2, stds  # well above collapse over the run
    assert not any("collapse" in m for m in caplog.messages)

    # The export is a teacher backbone like DINO's, naming its method; the extractor loads it
    state, meta = read_weights(full.export)
    assert meta["method"] == "byol" and meta["chain"][-1]["method"] == "byol" and meta["name"].startswith("byol_")
    ckpt = load_checkpoint(full.checkpoint)
    assert all(torch.equal(state[k], ckpt["teacher"]["backbone." + k]) for k in state)
    assert any(k.startswith("head.predictor.") for k in ckpt["student"])
    assert not any(k.startswith("head.predictor.") for k in ckpt["teacher"])
    ext = ViTExtractor(model_type=None, weights=full.export, stride=8, device="cpu")
    assert ext.extract(torch.randn(1, 3, 32, 32), [-1], "key").descriptors[-1].shape[-1] == 192

    # Stopped at step 3 and resumed: the same weights, batch-norm statistics and log as the uninterrupted run
    part = tmp_path / "part"
    train(PretrainConfig(**settings, out=str(part), max_steps=3))
    # (with a threshold no run stays above, the resumed steps show how a collapse reaches the log)
    monkeypatch.setattr("pretrain.byol.COLLAPSE_STD", 10.0)
    caplog.clear()
    resumed = train(config_from_args({"resume": str(part), "max_steps": 0}, {"max_steps"}))
    warnings = [m for m in caplog.messages if "collapse" in m]
    assert len(warnings) == 3 and warnings[0].startswith("step 4: collapse"), caplog.messages
    assert resumed.steps == 6
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert [r["loss"] for r in records] == [json.loads(x)["loss"] for x in resumed.log.read_text().splitlines()]
    with pytest.raises(Exception, match="--teacher-temp means nothing for --method byol"):
        config_from_args({"resume": str(part), "teacher_temp": 0.04}, {"teacher_temp"})
