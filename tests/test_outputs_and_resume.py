"""Issue 28: output locations checked first, interrupted runs that keep what was done, one naming rule,
folder commands that skip unreadable files, stale files of a previous run, library errors in Python terms."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli, save_tiny_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", depth=12)


@pytest.fixture
def images(tmp_path, photos):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        Image.fromarray(photos[name]).resize((64, 48)).save(folder / f"{name}.jpg")
    return folder


FAST = ["--device", "cpu", "--load-size", "32"]


def interrupt_on_call(monkeypatch, owner, name, n):
    """Patch ``owner.name`` so that its ``n``-th call raises KeyboardInterrupt (a Ctrl-C half-way)."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)
    return calls


# ------------------------------------------------------------------------------------------- item 1

def test_out_under_a_file_fails_before_any_work(weights, images, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    # the weights file does not exist: the output location is checked first, before the backbone is built
    for args in (["extract", images, "--out", blocker / "x.npz"], ["pca", images, "--out", blocker / "o"],
                 ["cosegment", images, "--out", blocker / "o"], ["index", images, "--out", blocker / "o"]):
        result = run_cli(*args, "--weights", tmp_path / "missing.pth")
        assert_user_error(result, f"{blocker / args[-1].name}: cannot be written, {blocker} is a file")
    assert_user_error(run_cli("pca", images, "--out", blocker, "--weights", tmp_path / "missing.pth"),
                      f"{blocker}: exists and is not a folder")
    assert_user_error(run_cli("extract", images, "--out", images, "--weights", tmp_path / "missing.pth"),
                      f"{images}: is a folder")


def test_read_only_folder_is_refused_before_any_work(weights, images, tmp_path, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")  # root (as in many containers) writes anyway: use the access check itself
            probe.unlink()
            real_access = os.access
            monkeypatch.setattr("vitdense.io.os.access", lambda p, mode: False if str(p) == str(locked)
                                else real_access(p, mode))
        except PermissionError:
            pass
        for command in ("extract", "cosegment"):
            target = locked / ("x.npz" if command == "extract" else "out")
            assert_user_error(run_cli(command, images, "--out", target, "--weights", tmp_path / "missing.pth"),
                              f"{target}: cannot be written, no write permission in {locked}")
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------------------------- item 4

def test_extract_interrupted_keeps_finished_images_and_rerun_completes(weights, images, tmp_path, monkeypatch):
    from vitdense.extractor import ViTExtractor

    out = tmp_path / "f.npz"
    args = ["extract", images, "--weights", weights, *FAST, "--out", out]
    interrupt_on_call(monkeypatch, ViTExtractor, "extract", 3)
    result = run_cli(*args)
    assert result.exit_code == 130 and "kept 2 finished image(s)" in result.output, result.output
    assert not out.exists() and len(list((tmp_path / "f.npz.parts").glob("*.npz"))) == 2
    monkeypatch.undo()
    calls = interrupt_on_call(monkeypatch, ViTExtractor, "extract", 0)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "skipped 2 finished image(s)" in result.output and calls["n"] == 2  # only the other two ran
    assert not (tmp_path / "f.npz.parts").exists()
    fresh = tmp_path / "fresh.npz"
    assert run_cli("extract", images, "--weights", weights, *FAST, "--out", fresh).exit_code == 0
    a, b = np.load(out), np.load(fresh)
    for i in range(4):
        np.testing.assert_array_equal(a[f"desc_{i}"], b[f"desc_{i}"])
    # other options: the kept images are not reused
    run_cli(*args[:-2], "--out", tmp_path / "g.npz")
    interrupt_on_call(monkeypatch, ViTExtractor, "extract", 2)
    run_cli(*args[:-2], "--out", tmp_path / "h.npz")
    monkeypatch.undo()
    result = run_cli(*args[:-2], "--layer", 5, "--out", tmp_path / "h.npz")
    assert result.exit_code == 0 and "other settings (settings)" in result.output, result.output


def test_cosegment_interrupted_keeps_descriptors_and_rerun_skips_them(weights, images, tmp_path, monkeypatch):
    from vitdense.extractor import ViTExtractor

    out = tmp_path / "co"
    args = ["cosegment", images, "--out", out, "--weights", weights, *FAST, "--batch-size", 1,
            "--saliency-res", "full", "--niter", 10, "--nredo", 1, "--refine", "none"]
    interrupt_on_call(monkeypatch, ViTExtractor, "extract", 3)
    result = run_cli(*args)
    assert result.exit_code == 130 and "kept 2 finished image(s)' descriptors" in result.output, result.output
    assert len(list((out / ".resume").glob("*.npz"))) == 2 and not (out / "summary.json").exists()
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    assert run_cli(*args[:2], "--out", fresh, *args[4:]).exit_code == 0
    calls = interrupt_on_call(monkeypatch, ViTExtractor, "extract", 0)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "skipped 2 finished image(s)" in result.output and calls["n"] == 2
    assert not (out / ".resume").exists()
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        a = np.asarray(Image.open(out / f"{name}_mask.png"))
        np.testing.assert_array_equal(a, np.asarray(Image.open(fresh / f"{name}_mask.png")))


def test_index_interrupted_commits_embedded_images(weights, images, tmp_path, monkeypatch):
    import vitdense.retrieval as retrieval

    out = tmp_path / "idx"
    args = ["index", images, "--out", out, "--weights", weights, "--device", "cpu", "--load-size", 32,
            "--batch-size", 1, "--workers", 0]
    interrupt_on_call(monkeypatch, retrieval, "global_descriptors", 3)
    result = run_cli(*args)
    assert result.exit_code == 130 and "kept 2 newly embedded image(s)" in result.output, result.output
    assert len(json.loads((out / "index.json").read_text())["entries"]) == 2
    monkeypatch.undo()
    result = run_cli(*args)
    assert result.exit_code == 0 and "embedded 2 " in result.output and "reused 2" in result.output, result.output


def test_pretrain_interrupt_saves_the_current_step_and_resume_finishes(tmp_path, photos, monkeypatch):
    import os
    import signal

    import torch

    import importlib

    train_module = importlib.import_module("pretrain.train")  # the package exports a function of that name
    from pretrain.checkpoint import load_checkpoint

    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        Image.fromarray(photos[sorted(photos)[i % 4]][i * 5:i * 5 + 200, :200]).resize((48, 48)).save(data / f"{i}.png")
    tiny = ["--arch", "vit_tiny_patch16_224", "--patch-size", "8", "--global-size", "32", "--local-size", "16",
            "--local-crops", "1", "--out-dim", "32", "--hidden-dim", "32", "--bottleneck-dim", "16",
            "--batch-size", "6", "--epochs", "3", "--workers", "0", "--device", "cpu"]
    original = train_module.update_teacher
    calls = {"n": 0}

    def ctrl_c_at_step_3(*args, **kwargs):
        original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: handled by the loop's StopRequest

    monkeypatch.setattr(train_module, "update_teacher", ctrl_c_at_step_3)
    run = tmp_path / "run"
    result = run_cli("pretrain", data, "--out", run, *tiny)
    assert result.exit_code == 130 and "saved the checkpoint of step 4" in result.output, result.output
    assert load_checkpoint(run / "checkpoint.pth")["step"] == 4  # the step reached, not the last multiple
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    monkeypatch.undo()
    result = run_cli("pretrain", "--resume", run)
    assert result.exit_code == 0 and "trained 2 steps (steps 4 to 6, resumed)" in result.output, result.output
    full = tmp_path / "full"
    assert run_cli("pretrain", data, "--out", full, *tiny).exit_code == 0
    a, b = load_checkpoint(full / "checkpoint.pth"), load_checkpoint(run / "checkpoint.pth")
    assert a["step"] == b["step"] == 6
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key


def test_second_interrupt_exits_at_once(monkeypatch):
    import os
    import signal

    from pretrain.train import StopRequest

    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    stop = StopRequest()
    try:
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        assert stop.requested and not exits
        handler(signal.SIGINT, None)
        assert exits == [130]
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------------------------------- items 5, 7, 10

def test_pca_and_attention_name_same_stem_inputs_apart(weights, images, tmp_path, photos):
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(photos["coffee"]).resize((64, 48)).save(other / "chelsea.png")
    result = run_cli("pca", images / "chelsea.jpg", other / "chelsea.png", "--weights", weights, *FAST,
                     "--out", tmp_path / "pca")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "pca").glob("*.png")) == ["chelsea_0_pca.png", "chelsea_1_pca.png"]
    result = run_cli("attention", images / "chelsea.jpg", other / "chelsea.png", "--weights", weights, *FAST,
                     "--out", tmp_path / "att")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "att" / "chelsea_0" / "mean.png").is_file()
    assert (tmp_path / "att" / "chelsea_1" / "mean.png").is_file()


def test_extract_folder_skips_unreadable_files_unless_strict(weights, images, tmp_path):
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "f.npz"
    result = run_cli("extract", images, "--weights", weights, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable file(s): " in result.output and "broken.jpg" in result.output
    data = np.load(out)
    assert len(data["paths"]) == 4 and "broken.jpg" in str(data["skipped"][0])
    assert_user_error(run_cli("extract", images, "--weights", weights, *FAST, "--strict", "--out",
                              tmp_path / "s.npz"), "broken.jpg")
    assert not (tmp_path / "s.npz").exists()


def test_rerun_into_the_same_folder_removes_the_previous_runs_files(weights, images, tmp_path):
    out = tmp_path / "pca"
    assert run_cli("pca", images, "--weights", weights, *FAST, "--out", out).exit_code == 0
    (out / "mine.txt").write_text("a file of the user's")
    assert run_cli("pca", images / "coffee.jpg", "--weights", weights, *FAST, "--out", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["coffee_pca.png", "mine.txt"]


def test_library_errors_name_python_arguments_and_the_cli_its_flags(make_extractor):
    import torch

    from vitdense import ConfigError, ViTExtractor
    from vitdense.cli import cli_message

    extractor = make_extractor()
    with pytest.raises(ConfigError) as err:
        extractor.extract(torch.zeros(1, 3, 32, 32), [1], facet="nose")
    assert str(err.value).startswith("facet='nose': choose one of") and "--" not in str(err.value)
    assert cli_message(err.value).startswith("--facet nose: choose one of")
    from vitdense.video import PropagationConfig

    with pytest.raises(ConfigError) as err:
        PropagationConfig(radius=3, topk=0)
    assert str(err.value).startswith("topk=0") and cli_message(err.value).startswith("--topk 0")
    assert ViTExtractor  # the public class raises them the same way


def test_describe_skipped_names_every_file_up_to_a_cap():
    from vitdense.io import describe_skipped

    assert describe_skipped([("a.jpg", "corrupt"), ("b.png", "not an image file")]) == \
        "a.jpg (corrupt), b.png (not an image file)"
    assert describe_skipped([f"{i}.jpg" for i in range(7)], cap=5).endswith("4.jpg and 2 more")


def test_backbone_hints_name_python_arguments_and_the_cli_its_flags(tmp_path, monkeypatch):
    import torch

    from vitdense import CheckpointError, ViTExtractor, create_vit
    from vitdense.backbones import load_backbone
    from vitdense.cli import cli_message

    path = tmp_path / "vits16.pth"
    torch.save(create_vit("vit_small_patch16_224", depth=2).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        ViTExtractor("dino_vits8", weights=path, device="cpu")
    message = str(err.value)
    assert "does not match model='dino_vits8'" in message and "leave out model='dino_vits8'" in message
    assert " --" not in message
    cli = cli_message(err.value)
    assert "does not match --model dino_vits8:" in cli and "leave out --model dino_vits8 to use" in cli
    assert "model=" not in cli
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        load_backbone("dino_vits16")
    assert str(err.value).endswith("pass it with weights=PATH") and "--weights" not in str(err.value)
    assert cli_message(err.value).endswith("pass it with --weights PATH")
    # the command line says the same with its flags
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    result = run_cli("pca", tmp_path / "x.png", "--model", "dino_vits8", "--weights", path, "--out", tmp_path / "o")
    assert_user_error(result, "does not match --model dino_vits8", "leave out --model dino_vits8")


def test_cli_terms_rewrites_only_whole_argument_mentions():
    from vitdense.cli import CLI_FLAGS
    from vitdense.errors import cli_terms

    text = "pass weights='a b.pth', radius=3; my_weights=x stays; weights=PATH."
    assert cli_terms(text, CLI_FLAGS, ("weights", "radius")) == \
        "pass --weights a b.pth, --neighborhood 3; my_weights=x stays; --weights PATH."
