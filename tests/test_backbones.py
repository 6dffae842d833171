"""Every weights format loads and gives the same descriptors; mismatched or corrupt files fail clearly."""
from __future__ import annotations

import argparse

import pytest
import torch

from conftest import tiny_vit
from vitdense import ViTExtractor, backbone_meta, create_vit, load_backbone, save_backbone
from vitdense.backbones import infer_arch, read_weights
from vitdense.errors import CheckpointError

# head dim 64 as in every DINO model: the number of heads is not stored in a state dict, it is inferred
TINY = dict(embed_dim=128, depth=4, num_heads=2, img_size=64, patch_size=8)


@pytest.fixture(scope="module")
def vit():
    return tiny_vit(dim=128, heads=2)


@pytest.fixture(scope="module")
def reference(vit):
    """Key descriptors (layer 2, stride 4) and saliency of the in-memory model on a fixed input."""
    ext = ViTExtractor("custom", stride=4, model=vit, device="cpu")
    batch = torch.randn(1, 3, 56, 72, generator=torch.Generator().manual_seed(0))
    feats = ext.extract(batch, 2, "key", saliency=True)
    return batch, feats.descriptors[2], feats.saliency


def assert_same(ext: ViTExtractor, reference) -> None:
    batch, desc, sal = reference
    feats = ext.extract(batch, 2, "key", saliency=True)
    torch.testing.assert_close(feats.descriptors[2], desc)
    torch.testing.assert_close(feats.saliency, sal)


def official_backbone_file(vit, path):
    """The layout of dino_deitsmall8_pretrain.pth: a bare state dict of the backbone."""
    torch.save({k: v.clone() for k, v in vit.state_dict().items()}, path)


def official_full_checkpoint(vit, path):
    """The layout of main_dino.py's checkpoint.pth: student (DDP) and teacher with heads, args, optimiser."""
    backbone = vit.state_dict()
    head = {"head.mlp.0.weight": torch.randn(32, 128), "head.last_layer.weight_g": torch.ones(64, 1),
            "head.last_layer.weight_v": torch.randn(64, 16)}
    student = {f"module.backbone.{k}": v + 1.0 for k, v in backbone.items()}  # must NOT be picked
    student.update({f"module.{k}": v for k, v in head.items()})
    teacher = {f"backbone.{k}": v.clone() for k, v in backbone.items()}
    teacher.update(head)
    torch.save({"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 100, "args": argparse.Namespace(arch="vit_small", patch_size=8),
                "dino_loss": {"center": torch.zeros(1, 64)}}, path)


def test_official_backbone_only_file_infers_architecture(vit, reference, tmp_path):
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    official_backbone_file(vit, path)
    arch, kwargs = infer_arch(read_weights(path)[0])
    assert {k: kwargs[k] for k in TINY} == TINY
    assert_same(ViTExtractor(None, stride=4, weights=path, device="cpu"), reference)


def test_official_full_checkpoint_uses_teacher_and_drops_head(vit, reference, tmp_path):
    path = tmp_path / "checkpoint.pth"
    official_full_checkpoint(vit, path)
    state, _ = read_weights(path)
    assert not any(k.startswith(("head", "module", "backbone")) for k in state)
    assert_same(ViTExtractor(None, stride=4, weights=path, device="cpu"), reference)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_our_export_loads_without_naming_the_architecture(vit, reference, tmp_path, suffix):
    path = tmp_path / f"teacher{suffix}"
    save_backbone(vit, path, backbone_meta("vit_small_patch8_224", TINY, saliency_heads=(1,)))
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"
    ext = ViTExtractor(None, stride=4, weights=path, device="cpu")
    assert ext.saliency_heads == (1,)
    ext.saliency_heads = (0, 1)
    assert_same(ext, reference)


def test_fp16_safetensors_export_is_close(vit, reference, tmp_path):
    path = tmp_path / "teacher_fp16.safetensors"
    save_backbone(vit, path, backbone_meta("vit_small_patch8_224", TINY), dtype=torch.float16)
    _, desc, _ = reference
    ext = ViTExtractor(None, stride=4, weights=path, device="cpu")
    out = ext.extract(reference[0], 2, "key").descriptors[2]
    assert torch.nn.functional.cosine_similarity(out, desc, dim=-1).min() > 0.999


def test_named_model_with_matching_file(tmp_path):
    """A user-named architecture with a file: dino_vits16 + a ViT-S/16 state dict."""
    torch.manual_seed(0)
    model = create_vit("vit_small_patch16_224")
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(model.state_dict(), path)
    ext = ViTExtractor("dino_vits16", stride=8, weights=path, device="cpu")
    assert (ext.p, ext.num_heads, ext.depth) == (16, 6, 12)
    torch.testing.assert_close(ext.model.blocks[5].attn.qkv.weight, model.blocks[5].attn.qkv.weight)


def test_dinov2_with_registers_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_vit("vit_small_patch14_reg4_dinov2", img_size=56, depth=2)
    path = tmp_path / "dinov2_small_reg.pth"
    torch.save(model.state_dict(), path)
    ext = ViTExtractor(None, stride=7, weights=path, device="cpu")
    assert ext.num_prefix == 5 and ext.p == 14
    batch = torch.randn(1, 3, 56, 70)
    feats = ext.extract(batch, -1, "token", saliency=True)
    assert feats.num_patches == (7, 9) and feats.descriptors[-1].shape == (1, 63, 384)
    # at the native stride and size, tokens equal timm's own forward
    ext14 = ViTExtractor(None, stride=14, weights=path, device="cpu")
    batch = torch.randn(1, 3, 56, 56)
    tokens = ext14.extract(batch, -1, "token", include_cls=True).descriptors[-1]
    with torch.no_grad():
        expected = model.forward_features(batch)
        normed = model.norm(tokens.clone())
    expected = torch.cat([expected[:, :1], expected[:, 5:]], dim=1)
    torch.testing.assert_close(normed, expected, rtol=1e-4, atol=1e-4)


def official_dinov2_file(model, path, registers: bool) -> None:
    """The layout of facebookresearch/dinov2's dinov2_vits14[_reg4]_pretrain.pth, built independently from a
    timm model: a mask_token (1, D), a pos_embed over CLS + patches, and with registers register_tokens
    (1, R, D) that take no position embedding. timm's register models add no position embedding to the
    CLS token either, so the official file's CLS token is timm's minus its (here random) CLS position."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dim = state["cls_token"].shape[-1]
    out = {"mask_token": torch.randn(1, dim)}
    if registers:
        cls_pos = torch.randn(1, 1, dim)
        out["register_tokens"] = state.pop("reg_token")
        out["cls_token"] = state.pop("cls_token") - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, state.pop("pos_embed")], dim=1)
    out.update(state)
    torch.save(out, path)


@pytest.mark.parametrize("arch,name,registers", [("vit_small_patch14_dinov2", "dinov2_vits14", False),
                                                  ("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg", True)])
def test_official_dinov2_files_load_and_compute_as_the_model(tmp_path, arch, name, registers):
    torch.manual_seed(0)
    model = create_vit(arch).eval()  # the official files' shapes: 12 blocks, 518-px position grid
    path = tmp_path / f"{name}_pretrain.pth"
    official_dinov2_file(model, path, registers)
    state, _ = read_weights(path)
    assert "mask_token" not in state and "register_tokens" not in state
    batch = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.forward_features(batch)
    for ext in (ViTExtractor(None, stride=14, weights=path, device="cpu"),  # architecture from the file
                ViTExtractor(name, stride=14, weights=path, device="cpu")):  # and with the model named
        assert ext.num_prefix == (5 if registers else 1) and ext.p == 14
        with torch.no_grad():
            got = ext.model.forward_features(batch)
        # folding the CLS position into the CLS token (cls - r + r) rounds in float32: ~1e-4 after 12 blocks
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=5e-4)


def test_dinov2_giant_swiglu_file_is_refused_with_the_file_name(tmp_path):
    path = tmp_path / "dinov2_vitg14_pretrain.pth"
    torch.save({"mask_token": torch.zeros(1, 8), "cls_token": torch.zeros(1, 1, 8),
                "blocks.0.mlp.w12.weight": torch.zeros(16, 8)}, path)
    with pytest.raises(CheckpointError, match="dinov2_vitg14_pretrain.pth: .*ViT-g"):
        read_weights(path)


def test_file_for_another_architecture_names_the_keys(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vits16.pth"
    torch.save(create_vit("vit_small_patch16_224").state_dict(), path)
    with pytest.raises(CheckpointError, match="vits16.pth: does not match model='dino_vits8': .*16-px patches"):
        ViTExtractor("dino_vits8", weights=path, device="cpu")
    deeper = tmp_path / "deeper.pth"
    state = create_vit("vit_small_patch16_224", depth=13).state_dict()
    torch.save(state, deeper)
    with pytest.raises(CheckpointError, match=r"deeper.pth: does not match model='dino_vits16': .*13 blocks"):
        ViTExtractor("dino_vits16", weights=deeper, device="cpu")
    # same shapes, another key layout: the strict load names the keys
    odd = tmp_path / "odd.pth"
    state = create_vit("vit_small_patch16_224").state_dict()
    state["blocks.0.extra"] = torch.zeros(1)
    torch.save(state, odd)
    with pytest.raises(CheckpointError, match=r"odd.pth: .*unexpected keys blocks\.0\.extra"):
        ViTExtractor("dino_vits16", weights=odd, device="cpu")


@pytest.mark.parametrize("content,message", [
    (b"not a checkpoint at all", "not a readable PyTorch weights file"),
    (b"", "not a readable PyTorch weights file"),
])
def test_corrupt_file_one_line_error(tmp_path, content, message):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        ViTExtractor(None, weights=path, device="cpu")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_corrupt_safetensors_and_missing_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ViTExtractor(None, weights=path, device="cpu")
    with pytest.raises(CheckpointError, match="not found"):
        ViTExtractor(None, weights=tmp_path / "nope.pth", device="cpu")


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a file that would run code on load is rejected, not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a pickled module object, not tensors
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file"):
        read_weights(path)


def test_hub_offline_fails_with_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"pass it with weights=PATH$") as info:
        load_backbone("dino_vits16")
    assert "dino_deitsmall16_pretrain.pth" in str(info.value)
    assert "\n" not in str(info.value)


def test_random_init_needs_no_file():
    backbone = load_backbone("dino_vits16", pretrained=False)
    assert backbone.model.patch_embed.proj.weight.shape == (384, 3, 16, 16)


def test_exported_files_get_normal_permissions(vit, tmp_path):
    import os

    path = tmp_path / "teacher.safetensors"
    save_backbone(vit, path, backbone_meta("vit_small_patch8_224", TINY))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------------------
# The default `auto` and hub names, with the hub mocked: vitdense.backbones._head is the only network call
# (one HEAD request), timm's hf_hub_download the only download.
# ---------------------------------------------------------------------------------------------------------

import threading
import time
import urllib.error

from vitdense import backbones
from vitdense.backbones import WEIGHTS_DIR

needs_bundled = pytest.mark.skipif(not (WEIGHTS_DIR / "vitdense_vits8.safetensors").exists(),
                                   reason="bundled weights not in this checkout")
DINO_REPO, DINO_FILE = "timm/vit_small_patch8_224.dino", "model.safetensors"


@pytest.fixture
def online(monkeypatch, tmp_path):
    """No offline switch, an empty Hugging Face cache, and a network that must not be used unless mocked."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("VITDENSE_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))

    def no_network(url, timeout):
        raise AssertionError(f"network used: {url}")

    monkeypatch.setattr(backbones, "_head", no_network)
    return tmp_path / "hf_cache"


@pytest.fixture(scope="module")
def dino_vits8_file(tmp_path_factory):
    """A ViT-S/8 in timm's layout (random, seed 0, fp16) as the hub's model.safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = {k: v.half().contiguous() for k, v in create_vit("vit_small_patch8_224").state_dict().items()}
    path = tmp_path_factory.mktemp("hub") / DINO_FILE
    save_file(state, str(path))
    return path, state


def put_in_hf_cache(cache, source):
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/SHA/FILE}."""
    repo = cache / f"models--{DINO_REPO.replace('/', '--')}"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / DINO_FILE).write_bytes(source.read_bytes())


def test_auto_takes_dino_vits8_from_the_hub_cache_without_network(online, dino_vits8_file):
    path, state = dino_vits8_file
    put_in_hf_cache(online, path)
    ext = ViTExtractor(device="cpu")  # no arguments: the same choice as the CLI's default --model auto
    assert ext.model_type == "dino_vits8" and ext.weights_used == "dino_vits8 (hub cache)"
    assert "local model cache" in ext.weights_note and ext.saliency_heads == (0, 2, 4, 5)
    torch.testing.assert_close(ext.model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"].float())


def test_auto_downloads_once_when_the_hub_answers(online, dino_vits8_file, monkeypatch):
    import timm.models._hub

    path, state = dino_vits8_file
    heads, downloads = [], []
    monkeypatch.setattr(backbones, "_head", lambda url, timeout: heads.append((url, timeout)) or 302)

    def fake_download(repo_id, filename, **kwargs):  # what huggingface_hub does: fetch into the cache
        downloads.append((repo_id, filename))
        put_in_hf_cache(online, path)
        return str(path)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", fake_download)
    ext = ViTExtractor(device="cpu")
    assert ext.weights_used == "dino_vits8 (hub download)" and downloads == [(DINO_REPO, DINO_FILE)]
    assert heads[0][0].endswith(f"/{DINO_REPO}/resolve/main/{DINO_FILE}") and heads[0][1] <= 2
    torch.testing.assert_close(ext.model.pos_embed, state["pos_embed"].float())
    # once downloaded, later runs read the cache and touch no network
    monkeypatch.setattr(backbones, "_head", lambda url, timeout: pytest.fail("network used"))
    assert backbones.resolve_auto().record == "dino_vits8 (hub cache)"


@needs_bundled
@pytest.mark.filterwarnings("ignore::vitdense.errors.WeakWeightsWarning")  # tested on its own below
@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "VITDENSE_OFFLINE"])
def test_auto_offline_switch_takes_the_bundled_backbone_without_trying(online, monkeypatch, switch):
    monkeypatch.setenv(switch, "1")
    ext = ViTExtractor(device="cpu")  # the `online` fixture fails the test on any network use
    assert ext.model_type == "vitdense_vits8" and ext.weights_used == "vitdense_vits8 (bundled)"
    assert f"{switch}=1" in ext.weights_note and "\n" not in ext.weights_note


@needs_bundled
def test_python_fallback_to_the_bundled_backbone_warns_once_per_process(online, monkeypatch, capsys):
    """A notebook user gets a warning naming the weights and how to get the official ones (once, however
    often the cell runs); the CLI says it in its own stderr line instead of a Python warning."""
    import warnings

    import vitdense.extractor
    from vitdense.cli import build_extractor
    from vitdense.errors import WeakWeightsWarning

    monkeypatch.setenv("VITDENSE_OFFLINE", "1")
    monkeypatch.setattr(vitdense.extractor, "_warned_fallback", [])
    with pytest.warns(WeakWeightsWarning) as record:
        ViTExtractor(device="cpu")
    assert len(record) == 1
    message = str(record[0].message)
    assert "vitdense_vits8 (bundled)" in message and "VITDENSE_OFFLINE=1" in message
    assert 'weights="dino_deitsmall8_pretrain.pth"' in message and "online" in message
    assert record[0].filename == __file__  # points at the user's line, not inside vitdense
    # The same fallback again, without loading the 43 MB file again: a tiny model with the same record.
    loaded = backbones.Backbone(tiny_vit(depth=1), "vitdense_vits8", backbones.IMAGENET_MEAN, backbones.IMAGENET_STD,
                                None, "vitdense_vits8 (bundled)", backbones.resolve_auto().reason)
    monkeypatch.setattr(vitdense.extractor, "load_backbone", lambda *args, **kwargs: loaded)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        ViTExtractor(device="cpu")
    assert not [w for w in again if issubclass(w.category, WeakWeightsWarning)]

    monkeypatch.setattr(vitdense.extractor, "_warned_fallback", [])
    with warnings.catch_warnings(record=True) as cli:
        warnings.simplefilter("always")
        build_extractor("auto", None, "cpu", "float32", 8)
    assert not [w for w in cli if issubclass(w.category, WeakWeightsWarning)]
    assert "weights: vitdense_vits8 (bundled): " in capsys.readouterr().err


@needs_bundled
def test_auto_does_not_wait_for_a_hub_that_hangs(online, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(backbones, "_head", lambda url, timeout: release.wait(60) and 200)
    try:
        backbones.resolve_auto(timeout=0.1)  # warm the imports (timm, huggingface_hub): only the wait is timed
        start = time.perf_counter()
        choice = backbones.resolve_auto()
        assert time.perf_counter() - start <= 2.0
        assert choice.record == "vitdense_vits8 (bundled)" and "did not answer within 1.5 s" in choice.reason
        start = time.perf_counter()
        with pytest.raises(CheckpointError) as info:  # a hub name fails as fast, with a complete line
            load_backbone("dino_vits16")
        assert time.perf_counter() - start <= 2.0
        assert str(info.value).endswith("pass it with weights=PATH")
    finally:
        release.set()


@needs_bundled
def test_auto_falls_back_when_the_hub_is_unreachable_or_the_download_fails(online, monkeypatch):
    import timm.models._hub

    def refused(url, timeout):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(backbones, "_head", refused)
    choice = backbones.resolve_auto()
    assert choice.source == "bundled" and "cannot be reached" in choice.reason
    monkeypatch.setattr(backbones, "_head", lambda url, timeout: 200)

    def broken(repo_id, filename, **kwargs):
        raise OSError("connection reset by peer")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", broken)
    backbone = load_backbone()
    assert backbone.weights == "vitdense_vits8 (bundled)" and "could not be loaded" in backbone.note


def test_hub_name_offline_fails_at_once_with_a_complete_line(online, monkeypatch):
    import timm.models._hub

    def refused(url, timeout):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(backbones, "_head", refused)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_backbone("dino_vits16")
    assert time.perf_counter() - start < 2.0
    line = str(info.value)
    assert "cannot be reached ([Errno -3] Temporary failure in name resolution)" in line and "\n" not in line
    assert "download dino_deitsmall16_pretrain.pth" in line and line.endswith("pass it with weights=PATH")
    # a long download error is shortened at a word boundary, never mid-word
    words = ["unexpected"] + [f"token{i}" for i in range(60)]
    monkeypatch.setattr(backbones, "_head", lambda url, timeout: 200)

    def failing(repo_id, filename, **kwargs):
        raise OSError(" ".join(words))

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", failing)
    with pytest.raises(CheckpointError) as info:
        load_backbone("dino_vits16")
    quoted = str(info.value).split("the download failed (", 1)[1].split(" ...)", 1)[0]
    assert quoted.split() == words[:len(quoted.split())] and len(quoted.split()) > 5
