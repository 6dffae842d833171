"""Where a pretraining run lives and what it records: `--resume RUN` continues in RUN from any folder, the
records hold absolute paths, and options the --init weights contradict are refused before anything is written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pretrain.checkpoint import load_checkpoint, save_checkpoint
from vitdense.cli import main

TINY_ARGS = ["--arch", "vit_tiny_patch16_224", "--patch-size", "8", "--global-size", "32", "--local-size", "16",
             "--local-crops", "2", "--out-dim", "32", "--hidden-dim", "32", "--bottleneck-dim", "16",
             "--workers", "0", "--batch-size", "6"]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(sorted(photos) * 3):
        img = photos[name][i * 10:i * 10 + 160, i * 12:i * 12 + 160]
        Image.fromarray(img).resize((48, 48)).save(folder / f"{name}{i}.png")
    return folder


def invoke(*args) -> object:
    return CliRunner().invoke(main, ["pretrain", *map(str, args)])


@pytest.mark.slow  # two tiny runs: about 10 s
def test_resume_from_another_folder_continues_in_the_run_folder(tmp_path, photo_dir, monkeypatch):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    first = invoke(photo_dir, "--out", "runs/mine", *TINY_ARGS, "--epochs", "1", "--max-steps", "1")  # relative
    assert first.exit_code == 0, first.output
    run = start / "runs" / "mine"
    config = json.loads((run / "config.json").read_text())
    assert config["out"] == str(run) and config["data_dir"] == str(photo_dir)  # absolute records
    assert load_checkpoint(run)["step"] == 1

    # A run of an older version saved "out" relative to where it started: resuming must not follow it.
    ckpt = load_checkpoint(run)
    ckpt["config"]["out"] = "runs/mine"
    save_checkpoint(run / "checkpoint.pth", ckpt)

    monkeypatch.chdir(elsewhere)
    again = invoke("--resume", run, "--max-steps", "2")
    assert again.exit_code == 0, again.output
    assert not (elsewhere / "runs").exists() and sorted(os.listdir(elsewhere)) == []
    assert load_checkpoint(run)["step"] == 2
    config = json.loads((run / "config.json").read_text())
    assert config["out"] == str(run) and config["resume"] == str(run) and config["max_steps"] == 2
    assert len((run / "log.jsonl").read_text().splitlines()) == 2

    # The export records absolute paths too, and so does every command's `weights_used`.
    from vitdense import ViTExtractor, read_weights

    _, meta = read_weights(run / "teacher_backbone.pth")
    assert meta["chain"][-1]["out"] == str(run) and meta["data_dir"] == str(photo_dir)
    monkeypatch.chdir(start)
    ext = ViTExtractor(weights="runs/mine/teacher_backbone.pth", device="cpu")
    assert ext.weights_used == str(run / "teacher_backbone.pth")


def test_python_config_records_absolute_paths(tmp_path, monkeypatch):
    from pretrain.config import PretrainConfig, config_from_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pth").write_bytes(b"")
    cfg = config_from_args({**PretrainConfig().to_dict(), "data_dir": "imgs", "out": "runs/x", "init": "w.pth",
                            "knn_data": "labelled"})
    assert (cfg.data_dir, cfg.out, cfg.init, cfg.knn_data) == tuple(
        str(tmp_path / p) for p in ("imgs", "runs/x", "w.pth", "labelled"))
    named = config_from_args({**PretrainConfig().to_dict(), "data_dir": "imgs", "init": "dino_vits8"})
    assert named.init == "dino_vits8"  # a model name stays a name


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory) -> Path:
    """A ViT-Tiny export (192 channels, 8-px patches, 2 blocks)."""
    from vitdense import backbone_meta, create_vit, save_backbone

    path = tmp_path_factory.mktemp("w") / "tiny8.pth"
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, depth=2)
    save_backbone(create_vit("vit_tiny_patch16_224", **kwargs), path, backbone_meta("vit_tiny_patch16_224", kwargs))
    return path


def test_an_explicit_arch_the_init_contradicts_is_a_one_line_error(tmp_path, photo_dir, tiny8):
    out = tmp_path / "run"
    # --arch vit_small is the default's own name: typed, it is still a choice the weights would silently override
    result = invoke(photo_dir, "--out", out, "--init", tiny8, "--arch", "vit_small", "--epochs", "1", "--batch-size", "6",
                    "--workers", "0")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("vitdense")]
    assert len(lines) == 1 and lines[0].startswith(f"vitdense: error: --init {tiny8}: "), result.output
    assert "--arch vit_small asks for 384 channels" in lines[0] and "Traceback" not in result.output
    assert not out.exists()


def tiny_init() -> "WarmStart":
    from pretrain.warmstart import WarmStart

    return WarmStart("t.pth", "vit_tiny_patch8_224", dict(embed_dim=192, patch_size=8, img_size=32, depth=2),
                     {}, "t.pth", (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("given, named", [
    (dict(arch="vit_small"), "--arch vit_small asks for 384 channels"),
    (dict(arch="vit_base_patch8_224"), "768 channels"),
    (dict(patch_size=16), "--patch-size 16 asks for 16-px patches"),
    (dict(arch="vit_tiny", patch_size=16), "16-px patches"),
    (dict(arch="vit_tiny_patch16_224"), "16-px patches"),
    (dict(img_size=64), "--img-size 64"),
])
def test_every_option_the_init_decides_is_checked(given, named):
    from pretrain.config import PretrainConfig
    from pretrain.warmstart import apply_to_config
    from vitdense.errors import ConfigError

    with pytest.raises(ConfigError, match="^--init t.pth: ") as err:
        apply_to_config(PretrainConfig(data_dir="x", **given), tiny_init())
    assert named in str(err.value)


def test_options_that_agree_with_the_init_are_accepted():
    from pretrain.config import PretrainConfig
    from pretrain.warmstart import apply_to_config

    init = tiny_init()
    for kwargs in ({}, dict(arch="vit_tiny"), dict(patch_size=8), dict(arch="vit_tiny_patch8_224", img_size=32)):
        cfg = PretrainConfig(data_dir="x", **kwargs)
        apply_to_config(cfg, init)
        assert (cfg.arch, cfg.patch_size, cfg.img_size) == ("vit_tiny", 8, 32), kwargs
    assert PretrainConfig().timm_arch()[0] == "vit_small_patch16_224"  # no --arch, no --init: ViT-S/16
