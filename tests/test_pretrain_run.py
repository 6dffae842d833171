"""End-to-end DINO runs on CPU with a tiny ViT: outputs, export loading, learning, exact resume after
SIGKILL, torchrun/gloo equivalence, and one-line errors for bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pretrain import PretrainConfig, train
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.train import build_model
from vitdense.cli import main
from vitdense.errors import CheckpointError, DataError

REPO = Path(__file__).resolve().parents[1]
# A ViT-Tiny with 8-px patches on 32-px global / 16-px local crops and a small head: ~0.1 s per step.
TINY = dict(arch="vit_tiny_patch16_224", patch_size=8, global_size=32, local_size=16, local_crops=2, out_dim=64,
            hidden_dim=64, bottleneck_dim=32, workers=0)
TINY_ARGS = ["--arch", "vit_tiny_patch16_224", "--patch-size", "8", "--global-size", "32", "--local-size", "16",
             "--local-crops", "2", "--out-dim", "64", "--hidden-dim", "64", "--bottleneck-dim", "32"]


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory, photos) -> Path:
    """24 JPEG/PNG crops (96 px) of the scikit-image photos."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    names = sorted(photos)
    for i in range(24):
        img = photos[names[i % len(names)]]
        top, left = rng.integers(0, img.shape[0] - 200), rng.integers(0, img.shape[1] - 200)
        crop = Image.fromarray(img[top:top + 200, left:left + 200]).resize((96, 96))
        sub = folder / ("a" if i % 2 else "b")  # a nested tree, as users have
        sub.mkdir(exist_ok=True)
        crop.save(sub / f"img{i}.{'png' if i % 3 == 0 else 'jpg'}")
    return folder


@pytest.fixture(scope="session")
def labelled_dir(tmp_path_factory, photos) -> Path:
    """Two classes of 4 crops for the k-NN evaluation: class "a" holds 3 crops of the cat and 1 of the coffee
    cup, class "b" the other way round: a leave-one-out vote that is neither always right nor always wrong."""
    folder = tmp_path_factory.mktemp("labelled")
    for cls, odd in (("a", 3), ("b", 0)):
        (folder / cls).mkdir()
        for i in range(4):
            name = ("chelsea" if i != odd else "coffee") if cls == "a" else ("coffee" if i != odd else "chelsea")
            img = photos[name][i * 20:i * 20 + 250, i * 30:i * 30 + 250]
            Image.fromarray(img).resize((64, 64)).save(folder / cls / f"{i}.png")
    return folder


def _teacher_backbone(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}


def test_two_step_run_writes_everything_and_export_loads(photo_dir, labelled_dir, tmp_path, caplog):
    import logging

    from vitdense import ViTExtractor, create_vit

    caplog.set_level(logging.INFO, logger="pretrain")

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["pretrain", str(photo_dir), "--out", str(out), *TINY_ARGS, "--batch-size", "12",
                                       "--epochs", "1", "--workers", "0", "--knn-data", str(labelled_dir),
                                       "--precision", "bf16"])  # bf16 autocast on CPU too
    assert result.exit_code == 0, result.output
    for name in ("checkpoint.pth", "teacher_backbone.pth", "log.jsonl", "curves.png", "config.json", "knn.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # The schedules of a 2-step run (both shorter than their warm-ups, which then span the run), by hand: lr
    # warms up from 0 to 0.0005 * 12 / 256, the teacher temperature from 0.04 to 0.07; weight decay (0.04 →
    # 0.4) and teacher momentum (0.996 → 1) follow a cosine, halfway at the second of the two steps.
    expected = {"lr": [0.0, 0.0005 * 12 / 256 / 2], "weight_decay": [0.04, 0.22], "momentum": [0.996, 0.998],
                "teacher_temp": [0.04, 0.055]}
    for key, values in expected.items():
        assert [r[key] for r in steps] == pytest.approx(values, rel=1e-6), key
    for r in steps:  # KL(P_t || P_s) = H(P_t, P_s) - H(P_t)
        assert np.isfinite(r["loss"]) and r["kl"] == pytest.approx(r["loss"] - r["teacher_entropy"], abs=1e-5)
    knn = json.loads((out / "knn.json").read_text())
    assert knn["k"] == 20 and knn["step"] == 2
    assert [r["knn_top1"] for r in records if "knn_top1" in r] == [knn["top1"]]
    # two classes: the label is always among the 5 best, so top-5 (100 % by construction) is left out
    assert "top5" not in knn and not any("knn_top5" in r for r in records)
    shown = [m for m in caplog.messages if m.startswith("k-NN at step 2")]
    assert shown == [f"k-NN at step 2: top-1 {knn['top1']:.2f}%"]
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.width > 200

    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 2 and ckpt["config"]["global_size"] == 32
    # The last layer is frozen during the first epoch: the student's equals its initialisation.
    cfg = PretrainConfig(data_dir=str(photo_dir), **TINY)
    torch.manual_seed(cfg.seed)
    init = build_model(cfg, student=True).state_dict()
    last = [k for k in init if "last_layer" in k]
    assert last and all(torch.equal(ckpt["student"][k], init[k]) for k in last)
    assert not torch.equal(ckpt["student"]["backbone.blocks.0.attn.qkv.weight"],
                           init["backbone.blocks.0.attn.qkv.weight"])

    # The export and the full checkpoint load without naming the architecture; descriptors equal the
    # teacher backbone's computed with plain timm calls.
    teacher = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8).eval()
    teacher.load_state_dict(_teacher_backbone(ckpt))
    batch = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(batch)))
        want_tokens = teacher.blocks(x)[:, 1:]
        want_cls = teacher(batch)
    for weights in (out / "teacher_backbone.pth", out / "checkpoint.pth"):
        extractor = ViTExtractor(model_type=None, weights=weights, stride=8, device="cpu")
        got = extractor.extract(batch, [-1], "token").descriptors[-1]
        torch.testing.assert_close(got, want_tokens, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(extractor.model(batch), want_cls, atol=1e-5, rtol=1e-5)

    # The reported k-NN top-1 equals a leave-one-out weighted vote computed here on the teacher's CLS output
    # of the 8 labelled images, resized to 36 px (32 · 256/224) and centre-cropped to 32 as DINO's eval_knn.
    assert knn["top1"] == pytest.approx(_knn_top1_by_hand(teacher, labelled_dir))
    assert 0 < knn["top1"] < 100  # a vote that can go either way: a score that tells rules apart


def _knn_top1_by_hand(backbone, folder: Path) -> float:
    files = sorted(folder.glob("*/*.png"))
    labels = np.array([f.parent.name == "b" for f in files], int)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    crops = [(np.asarray(Image.open(f).convert("RGB").resize((36, 36), Image.BILINEAR).crop((2, 2, 34, 34)))
              / 255 - mean) / std for f in files]
    batch = torch.tensor(np.stack(crops), dtype=torch.float32).permute(0, 3, 1, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the run's --precision bf16
        feats = backbone(batch).float().numpy().astype(np.float64)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    correct = []
    for i in range(len(files)):
        votes = np.zeros(2)
        for j in range(len(files)):  # k = 20 > the 7 others: every other image votes, weight exp(cos / 0.07)
            if j != i:
                votes[labels[j]] += np.exp(feats[i] @ feats[j] / 0.07)
        correct.append(votes.argmax() == labels[i])
    return 100 * np.mean(correct)


def test_loss_goes_down_in_a_few_dozen_steps(photo_dir, tmp_path):
    cfg = PretrainConfig(data_dir=str(photo_dir), out=str(tmp_path / "run"), **TINY, batch_size=8, epochs=10,
                         lr=0.005, warmup_epochs=0, warmup_teacher_temp_epochs=0, teacher_temp=0.04,
                         momentum_teacher=0.99, freeze_last_layer=0, drop_path=0.0)
    result = train(cfg)
    losses = [json.loads(line)["loss"] for line in result.log.read_text().splitlines()]
    assert result.steps == 30 and len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
    ckpt = load_checkpoint(result.checkpoint)
    diff = [(ckpt["student"][k] - ckpt["teacher"][k]).abs().max().item() for k in ckpt["student"]]
    assert max(diff) > 1e-4  # the teacher is an average of past students, not a copy
    assert ckpt["loss"]["center"].abs().sum() > 0


def test_diverged_loss_stops_before_any_checkpoint_holds_it(photo_dir, tmp_path, monkeypatch):
    """The loss is read back one step late (the device keeps working); a NaN must still stop the run with a
    one-line error and never reach a checkpoint."""
    from pretrain.loss import DINOLoss
    from vitdense.errors import ConfigError

    calls = {"n": 0}
    forward = DINOLoss.forward

    def nan_from_third_step(self, *args, **kwargs):
        terms = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(DINOLoss, "forward", nan_from_third_step)
    cfg = PretrainConfig(data_dir=str(photo_dir), out=str(tmp_path / "run"), **TINY, batch_size=8, epochs=3,
                         save_every=1)
    with pytest.raises(ConfigError, match="at step 3: training diverged"):
        train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())


def _run_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pretrain", str(data), "--out", str(out), *TINY_ARGS, "--batch-size", "4",
            "--epochs", "2", "--seed", "3", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def test_resume_after_sigkill_equals_uninterrupted_run(photo_dir, tmp_path):
    # 2 epochs x 6 steps, checkpoint every 2 steps; drop-path on (its masks come from the saved RNG state).
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_run_cmd(photo_dir, full, "--workers", "0"), env=_env(), check=True, capture_output=True)
    proc = subprocess.Popen(_run_cmd(photo_dir, killed, "--workers", "2", "--save-every", "2"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step_at_kill = load_checkpoint(killed / "checkpoint.pth")["step"]
    assert 0 < step_at_kill < 12, "the run finished before it could be killed"
    subprocess.run(_run_cmd(photo_dir, killed, "--workers", "2", "--save-every", "2", "--resume", str(killed)),
                   env=_env(), check=True, capture_output=True)

    a, b = load_checkpoint(full / "checkpoint.pth"), load_checkpoint(killed / "checkpoint.pth")
    assert a["step"] == b["step"] == 12
    for part in ("student", "teacher"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert torch.equal(a["loss"]["center"], b["loss"]["center"])
    log_a = [json.loads(x) for x in (full / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, 13))  # steps after the checkpoint were re-logged once
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def test_torchrun_two_processes_equal_one(photo_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--drop-path", "0", "--epochs", "1"]  # drop-path masks are drawn per process: off for equality
    subprocess.run(_run_cmd(photo_dir, one, "--workers", "0", *args), env=_env(), check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = _run_cmd(photo_dir, two, "--workers", "0", *args)
    done = subprocess.run(torchrun + cmd[1:], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_checkpoint(one / "checkpoint.pth"), load_checkpoint(two / "checkpoint.pth")
    assert a["step"] == b["step"] == 6 and len(b["rng"]) == 2
    for key in a["teacher"]:
        torch.testing.assert_close(a["teacher"][key], b["teacher"][key], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a["loss"]["center"], b["loss"]["center"], atol=1e-6, rtol=1e-4)
    loss_a = [json.loads(x)["loss"] for x in (one / "log.jsonl").read_text().splitlines()]
    loss_b = [json.loads(x)["loss"] for x in (two / "log.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- bad input

def _cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, ["pretrain", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vitdense: error: "), result.output
    return lines[0]


def test_bad_data_folders_give_one_line_errors(tmp_path, photo_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no image files" in _cli_error([str(empty), "--out", str(tmp_path / "o1")])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"bad{i}.jpg").write_bytes(b"not an image at all")
    assert "none of the 3 image files can be read" in _cli_error([str(corrupt), "--out", str(tmp_path / "o2")])
    line = _cli_error([str(photo_dir), "--out", str(tmp_path / "o3"), "--batch-size", "64"])
    assert "24 readable images, fewer than --batch-size 64" in line
    assert "--global-size 30" in _cli_error([str(photo_dir), "--global-size", "30"])
    assert "two class subfolders" in _cli_error([str(photo_dir), "--out", str(tmp_path / "o4"), "--batch-size", "8",
                                                  "--knn-data", str(empty)])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    assert not (tmp_path / "o4").exists()


def test_bad_checkpoints_for_resume_give_one_line_errors(tmp_path, photo_dir):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage" * 100)
    common = [str(photo_dir), "--out", str(tmp_path / "o"), *TINY_ARGS, "--batch-size", "12", "--epochs", "1"]
    assert "not a readable training checkpoint" in _cli_error([*common, "--resume", str(corrupt)])
    assert "not found" in _cli_error([*common, "--resume", str(tmp_path / "missing.pth")])
    export = tmp_path / "export.pth"
    from vitdense import backbone_meta, create_vit, save_backbone

    save_backbone(create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8), export,
                  backbone_meta("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}))
    assert "backbone export, not a training checkpoint" in _cli_error([*common, "--resume", str(export)])
    # A real checkpoint of another architecture: the differing options are named.
    fake = {"student": {}, "teacher": {}, "optimizer": {}, "loss": {}, "step": 1,
            "config": {**PretrainConfig(**TINY).to_dict(), "patch_size": 16}}
    torch.save(fake, tmp_path / "other.pth")
    line = _cli_error([*common, "--resume", str(tmp_path / "other.pth")])
    assert "--patch-size 8 (the run has 16)" in line


def test_resume_takes_the_runs_saved_settings(tmp_path, photo_dir):
    """`pretrain --resume RUN` alone continues with the run's settings (data folder and --out included);
    explicit options override them, a different model option is a one-line error."""
    out = tmp_path / "run"
    first = CliRunner().invoke(main, ["pretrain", str(photo_dir), "--out", str(out), *TINY_ARGS, "--batch-size",
                                      "12", "--epochs", "1", "--workers", "0", "--lr", "0.001"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["pretrain", "--resume", str(out), "--epochs", "2"])
    assert again.exit_code == 0, again.output
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "vit_tiny_patch16_224" and config["patch_size"] == 8 and config["lr"] == 0.001
    assert config["epochs"] == 2 and config["data_dir"] == str(photo_dir) and config["workers"] == 0
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 4  # 24 images / 12 per step, 2 epochs
    line = _cli_error(["--resume", str(out), "--patch-size", "16", "--epochs", "3"])
    assert "--patch-size 16 (the run has 8)" in line and "checkpoint.pth" in line
    assert "DATA_DIR" in _cli_error(["--out", str(tmp_path / "new")])


def test_python_module_resume_counts_only_typed_options():
    from pretrain.config import explicit_options

    assert explicit_options(["data", "--epochs", "3", "--no-compile"]) == {"data_dir", "epochs", "compile"}
    assert explicit_options(["--resume", "run"]) == {"resume"}


def test_unreadable_files_are_skipped_and_counted(tmp_path, photo_dir):
    data = tmp_path / "mixed"
    data.mkdir()
    for i, path in enumerate(sorted(photo_dir.rglob("*.jpg"))[:8]):
        (data / f"{i}.jpg").write_bytes(path.read_bytes())
    (data / "garbage.png").write_bytes(b"\x89PNG but not really")
    # A JPEG whose header is fine and whose data is cut off: it fails only when decoded, inside the loop.
    (data / "truncated.jpg").write_bytes(sorted(photo_dir.rglob("*.jpg"))[0].read_bytes()[:1500])
    result = train(PretrainConfig(data_dir=str(data), out=str(tmp_path / "run"), **TINY, batch_size=9, epochs=1))
    record = json.loads(result.log.read_text().splitlines()[-1])
    assert result.steps == 1 and np.isfinite(result.last_loss) and result.last_loss == record["loss"]
    assert result.skipped_files == 2 and record["skipped_files"] == 2


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"student": {}, "teacher": {}, "optimizer": {}, "loss": {}, "step": 5, "config": {}})

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 6})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temp file left behind
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "nothing.pth")


def test_python_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "pretrain", "--help"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0 and "--local-crops" in done.stdout and "--teacher-temp" in done.stdout
    with pytest.raises(DataError):
        train(PretrainConfig(data_dir="/nonexistent/folder"))


# ---------------------------------------------------------------------------------------------- --init (warm starts)

def test_init_starts_both_backbones_from_the_weights_and_records_the_chain(tmp_path, photo_dir):
    """A warm-started run begins at the given weights (the learning rate is 0 at step 0, so after one step
    the teacher is still exactly the init), gets a new head, and its export lists both runs."""
    from vitdense import ViTExtractor, read_weights

    first = tmp_path / "first"
    done = CliRunner().invoke(main, ["pretrain", str(photo_dir), "--out", str(first), *TINY_ARGS, "--batch-size",
                                     "12", "--epochs", "1", "--workers", "0"])
    assert done.exit_code == 0, done.output
    init_state, _ = read_weights(first / "teacher_backbone.pth")
    second = tmp_path / "second"
    # no --arch: the architecture is the weights' (a ViT-T with 8-px patches), crops of another size
    done = CliRunner().invoke(main, ["pretrain", str(photo_dir), "--out", str(second), "--init",
                                     str(first / "teacher_backbone.pth"), "--global-size", "48", "--local-size",
                                     "24", "--local-crops", "2", "--out-dim", "32", "--hidden-dim", "32",
                                     "--bottleneck-dim", "16", "--batch-size", "12", "--epochs", "5",
                                     "--max-steps", "1", "--workers", "0"])
    assert done.exit_code == 0, done.output
    state, meta = read_weights(second / "teacher_backbone.pth")
    assert set(state) == set(init_state)
    for key, value in init_state.items():
        torch.testing.assert_close(state[key].float(), value.float(), msg=key)
    ckpt = load_checkpoint(second / "checkpoint.pth")
    assert ckpt["config"]["out_dim"] == 32 and ckpt["config"]["init"] == str(first / "teacher_backbone.pth")
    assert [run["out"] for run in meta["chain"]] == [str(first), str(second)]
    assert meta["init"] == str(first / "teacher_backbone.pth") and meta["chain"][1]["steps"] == 1
    assert json.loads((second / "config.json").read_text())["patch_size"] == 8
    ext = ViTExtractor(weights=second / "teacher_backbone.pth", stride=8, device="cpu")
    assert ext.p == 8 and ext.embed_dim == 192


def test_init_from_a_model_name_and_from_an_official_dino_file(tmp_path):
    from pretrain.warmstart import apply_to_config, load_warm_start
    from vitdense import read_weights
    from vitdense.backbones import WEIGHTS_DIR

    bundled = WEIGHTS_DIR / "vitdense_vits8.safetensors"
    if bundled.exists():
        init = load_warm_start("vitdense_vits8")
        cfg = PretrainConfig(data_dir="x", global_size=32, local_size=16, out_dim=16, hidden_dim=16,
                             bottleneck_dim=8)
        apply_to_config(cfg, init)
        assert (cfg.arch, cfg.patch_size, cfg.img_size) == ("vit_small", 8, 224)
        student = build_model(cfg, student=True, init=init)
        expected, _ = read_weights(bundled)
        got = student.backbone.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value.float(), msg=key)
    # an official DINO backbone-only file: plain state dict, timm key names
    from vitdense import create_vit

    torch.manual_seed(3)
    vit = create_vit("vit_small_patch16_224", embed_dim=96, depth=2, num_heads=3, img_size=32, patch_size=8)
    torch.save(vit.state_dict(), tmp_path / "dino_official.pth")
    init = load_warm_start(str(tmp_path / "dino_official.pth"))
    assert init.patch_size == 8 and init.embed_dim == 96 and init.kwargs["depth"] == 2
    cfg = PretrainConfig(data_dir="x", global_size=32, local_size=16, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    apply_to_config(cfg, init)
    student = build_model(cfg, student=True, init=init)
    torch.testing.assert_close(student.backbone.state_dict()["blocks.1.mlp.fc2.weight"],
                               vit.state_dict()["blocks.1.mlp.fc2.weight"])


def test_init_errors_are_one_line(tmp_path, photo_dir):
    from vitdense import backbone_meta, create_vit, save_backbone

    save_backbone(create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8), tmp_path / "t8.pth",
                  backbone_meta("vit_tiny_patch16_224", dict(img_size=32, patch_size=8)))
    common = [str(photo_dir), "--out", str(tmp_path / "run"), "--workers", "0", "--epochs", "1"]
    line = _cli_error([*common, "--init", str(tmp_path / "t8.pth"), "--arch", "vit_small", "--patch-size", "16"])
    assert "--init" in line and "t8.pth" in line and "8-px patches" in line
    assert "nope.pth" in _cli_error([*common, "--init", str(tmp_path / "nope.pth")])
    assert "no_such_model" in _cli_error([*common, "--init", "no_such_model"])
