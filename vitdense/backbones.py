"""Backbone names → a timm VisionTransformer with weights.

Weights come from one of four places:

(a) a timm pretrained tag (``dino_vits8`` → ``vit_small_patch8_224.dino``), fetched from the model hub;
(b) a local official DINO checkpoint: the backbone-only ``dino_deitsmall8_pretrain.pth`` or the full
    training checkpoint with ``teacher``/``student`` entries (``module.``/``backbone.`` prefixes are
    stripped and DINO-head weights dropped);
(c) a backbone exported by our own ``pretrain/`` (a ``.pth`` or ``.safetensors`` file that records its
    architecture, so ``ViTExtractor(weights=path)`` needs nothing else);
(d) the backbone bundled with the package (``vitdense/weights/``), when present.

The default name ``auto`` (:func:`resolve_auto`) takes the official DINO ViT-S/8 when its weights are in the
local model cache or the hub answers within :data:`PROBE_TIMEOUT_S` (they are then downloaded once and
cached, as timm does), and the bundled backbone otherwise. The hub is never waited on longer than that:
a cached file is loaded without any network access, and a download is only tried after a quick probe.

Every file is read with ``torch.load(..., weights_only=True)`` or safetensors: a checkpoint never runs code.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: `vitdense models` and `--help` start without it
    import torch
    from torch import nn

LOG = logging.getLogger("vitdense")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Marker key of the files our pretrain/ exports (and of the bundled weights' metadata).
FORMAT_KEY = "vitdense_backbone"
WEIGHTS_DIR = Path(__file__).parent / "weights"

AUTO = "auto"  # the default model name: see resolve_auto
AUTO_PREFERRED = "dino_vits8"  # what "auto" takes when it can: the official DINO ViT-S/8 (Amir et al.'s default)
# Longest wait for the hub before "auto" falls back to the bundled backbone, or a hub name fails: one HEAD
# request, no retries (huggingface_hub's own download retries took 45-50 s offline).
PROBE_TIMEOUT_S = 1.5


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named backbone and where its weights come from."""

    name: str
    arch: str  # timm architecture name, e.g. "vit_small_patch8_224"
    timm_tag: str | None = None  # timm pretrained tag fetched from the hub, e.g. "vit_small_patch8_224.dino"
    official_file: str | None = None  # the file name facebookresearch/dino publishes for it
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # CLS-attention heads averaged into saliency; None = all heads. (0, 2, 4, 5) for DINO ViT-S/8 as in
    # Amir et al. 2021, whose authors picked the heads that attend to the foreground.
    saliency_heads: tuple[int, ...] | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra timm constructor arguments
    bundled_file: str | None = None  # file name under vitdense/weights/

    @property
    def source(self) -> str:
        if self.bundled_file:
            return f"bundled: vitdense/weights/{self.bundled_file}"
        parts = []
        if self.timm_tag:
            parts.append(f"hub: timm '{self.timm_tag}'")
        if self.official_file:
            parts.append(f"or --weights {self.official_file}")
        return " ".join(parts) if parts else "no published weights: give them with --weights FILE"


_DINO = [
    ModelSpec("dino_vits8", "vit_small_patch8_224", "vit_small_patch8_224.dino", "dino_deitsmall8_pretrain.pth",
              saliency_heads=(0, 2, 4, 5)),
    ModelSpec("dino_vits16", "vit_small_patch16_224", "vit_small_patch16_224.dino", "dino_deitsmall16_pretrain.pth"),
    ModelSpec("dino_vitb8", "vit_base_patch8_224", "vit_base_patch8_224.dino", "dino_vitbase8_pretrain.pth"),
    ModelSpec("dino_vitb16", "vit_base_patch16_224", "vit_base_patch16_224.dino", "dino_vitbase16_pretrain.pth"),
    ModelSpec("dinov2_vits14", "vit_small_patch14_dinov2", "vit_small_patch14_dinov2.lvd142m",
              "dinov2_vits14_pretrain.pth"),
    ModelSpec("dinov2_vitb14", "vit_base_patch14_dinov2", "vit_base_patch14_dinov2.lvd142m",
              "dinov2_vitb14_pretrain.pth"),
    ModelSpec("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", "vit_small_patch14_reg4_dinov2.lvd142m",
              "dinov2_vits14_reg4_pretrain.pth"),
    ModelSpec("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2.lvd142m",
              "dinov2_vitb14_reg4_pretrain.pth"),
]
# Plain timm ViTs: supervised ImageNet weights, (0.5, 0.5, 0.5) normalisation like their pretrained cfgs.
_TIMM = [
    ModelSpec(arch, arch, tag, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for arch, tag in [
        ("vit_tiny_patch16_224", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
        ("vit_small_patch16_224", "vit_small_patch16_224.augreg_in21k_ft_in1k"),
        ("vit_small_patch8_224", None),
        ("vit_base_patch16_224", "vit_base_patch16_224.augreg2_in21k_ft_in1k"),
        ("vit_base_patch8_224", "vit_base_patch8_224.augreg2_in21k_ft_in1k"),
    ]
]
MODELS: dict[str, ModelSpec] = {s.name: s for s in _DINO + _TIMM}


def _register_bundled() -> None:
    """Add the backbones shipped in vitdense/weights/ (each ``NAME.safetensors``) to MODELS."""
    if not WEIGHTS_DIR.is_dir():
        return
    for path in sorted(WEIGHTS_DIR.glob("*.safetensors")):
        meta = read_safetensors_meta(path)
        if meta is None:
            continue
        MODELS[path.stem] = ModelSpec(
            path.stem, meta["arch"], mean=tuple(meta["mean"]), std=tuple(meta["std"]),
            saliency_heads=tuple(meta["saliency_heads"]) if meta.get("saliency_heads") else None,
            kwargs=meta.get("kwargs", {}), bundled_file=path.name)


def default_model_name() -> str:
    """The default ``--model``: ``auto`` (the official DINO ViT-S/8 when its weights are cached or can be
    fetched, else the bundled backbone; see :func:`resolve_auto`)."""
    return AUTO


def name_or_file(value: str) -> tuple[str | None, str | None]:
    """``(model name, None)`` or ``(None, weights file)`` for an option that takes either (``--compare``,
    ``--init``): an existing file, or anything named like a weights file, is a file."""
    if Path(value).is_file() or value.endswith((".pth", ".pt", ".safetensors")):
        return None, value
    return value, None


def bundled_model_name() -> str | None:
    """The backbone shipped with the package (the offline fallback of ``auto``), or None when absent."""
    bundled = [s.name for s in MODELS.values() if s.bundled_file]
    return bundled[0] if bundled else None


def get_spec(name: str) -> ModelSpec:
    """Spec for a known name, or for any timm ViT architecture name (``vit_*``)."""
    if name == AUTO:
        raise ConfigError("model 'auto' is a choice made when loading (see resolve_auto), not an architecture")
    if name in MODELS:
        return MODELS[name]
    base = name.split(".")[0]
    if base.startswith(("vit_", "deit")):
        return ModelSpec(name, base, name if "." in name else None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    known = ", ".join(sorted(MODELS))
    raise ConfigError(f"unknown model '{name}': use one of {known}, or a timm ViT name such as vit_small_patch16_224")


def create_vit(arch: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm VisionTransformer without classifier head."""
    import timm  # noqa: F401  (imports torch)

    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except (RuntimeError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot build timm architecture '{arch}' with {kwargs}: {err}") from None
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ConfigError(f"'{arch}' is not a vision transformer (no patch_embed/blocks)")
    return model


# --------------------------------------------------------------------------------------------------
# Reading weight files
# --------------------------------------------------------------------------------------------------

def read_safetensors_meta(path: Path) -> dict | None:
    """The vitdense metadata of a safetensors file (None if it has none).

    Reads the JSON header directly (8-byte little-endian length, then JSON): no torch import, so listing
    the bundled backbones at start-up costs nothing.
    """
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if not 2 <= size <= 100 * 2**20:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
        meta = header.get("__metadata__") or {}
        return json.loads(meta[FORMAT_KEY]) if FORMAT_KEY in meta else None
    except (OSError, struct.error, ValueError, AttributeError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (bad header: {_brief(err)})") from None


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Backbone state dict and vitdense metadata (arch, kwargs, mean, std) of a weights file.

    Accepts the official DINO files (backbone-only or full checkpoint), DINOv2 files, checkpoints and
    exports of our ``pretrain/``, and safetensors. Prefixes ``module.``/``backbone.`` are removed and the
    DINO head (``head.*``) is dropped.
    """
    import argparse

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta = read_safetensors_meta(path)
        try:
            state = load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        return _clean_state_dict(state, path), meta
    _sniff_torch_file(path)
    try:
        # The official DINO training checkpoints store their argparse Namespace under "args": allow
        # that one plain container class, nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, unsafe globals: all mean "not a weights file"
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({_brief(err)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(ckpt).__name__}")
    meta = ckpt.get(FORMAT_KEY)
    state: Any = ckpt
    # Full training checkpoints: ours and the official DINO one keep the teacher under "teacher".
    for key in ("teacher", "state_dict", "model", "student"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (keys: {', '.join(list(ckpt)[:8])})")
    return _clean_state_dict(tensors, path), meta


def _sniff_torch_file(path: Path) -> None:
    """CheckpointError naming the file when its first bytes are not those of a torch.save file (a zip
    archive, or a pickle for the legacy format): text files and other formats get a plain reason."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return
    expected = "expected a .pth/.pt file written by torch.save, or a .safetensors file"
    if not head:
        raise CheckpointError(f"{path}: not a readable PyTorch weights file (the file is empty); {expected}")
    text = head.decode("utf-8", errors="replace")
    if text.count("\ufffd") <= 1 and all(c.isprintable() or c in "\r\n\t\ufffd" for c in text):
        raise CheckpointError(f"{path}: not a readable PyTorch weights file (it is a text file); {expected}")
    raise CheckpointError(f"{path}: not a readable PyTorch weights file (unknown format); {expected}")


def _brief(err: BaseException | str, limit: int = 120) -> str:
    """The first line of an error, cut at a word boundary (never mid-word) when longer than ``limit``."""
    text = str(err).strip().splitlines()[0].strip() if str(err).strip() else ""
    if isinstance(err, BaseException) and (not text or isinstance(err, KeyError) or len(text) < 8):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(") + " ..."
    return text


def _clean_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike | None = None
                      ) -> dict[str, torch.Tensor]:
    """Backbone weights in timm's layout: training-wrapper prefixes and heads dropped, and the official
    DINOv2 layout converted (see :func:`_from_dinov2_layout`)."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("head.") or key.startswith("head_") or key in ("head.weight", "head.bias"):
            continue  # DINO head or classifier: not part of the backbone
        out[key] = value
    if "mask_token" in out or "register_tokens" in out:
        out = _from_dinov2_layout(out, path)
    return out


def _from_dinov2_layout(state: dict[str, torch.Tensor], path: str | os.PathLike | None = None
                        ) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2's backbone keys → timm's.

    The official files hold ``mask_token`` (used only by iBOT's masked-image loss: dropped) and, with
    registers, ``register_tokens`` (1, R, D) and a ``pos_embed`` over CLS + patches. timm's register
    models add no position embedding to the prefix tokens (``no_embed_class``), so the CLS token's
    position embedding is folded into the CLS token, which gives the same first-layer input.
    """
    state = dict(state)
    state.pop("mask_token", None)
    if any(".mlp.w12." in k for k in state):
        raise CheckpointError(f"{path or 'weights'}: a DINOv2 ViT-g file (SwiGLU MLP): this architecture is "
                              f"not supported; use ViT-S/B/L")
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
        pos = state["pos_embed"]
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
    return state


_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}


def infer_arch(state: Mapping[str, torch.Tensor], path: str | os.PathLike | None = None) -> tuple[str, dict]:
    """Guess a timm architecture and constructor kwargs from a backbone state dict's shapes.

    ``path`` (the file the state came from) starts every error message.
    """
    where = f"{path}: " if path is not None else ""
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        keys = ", ".join(list(state)[:4]) + (", ..." if len(state) > 4 else "")
        raise CheckpointError(f"{where}not a ViT backbone: cannot infer the architecture without the keys "
                              f"patch_embed.proj.weight and pos_embed (found: {keys})")
    dim, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    n_pos = state["pos_embed"].shape[1]
    n_reg = state["reg_token"].shape[1] if "reg_token" in state else 0
    has_cls = "cls_token" in state
    kwargs: dict[str, Any] = dict(embed_dim=dim, depth=depth, num_heads=_HEADS_BY_DIM.get(dim, max(1, dim // 64)),
                                  patch_size=patch)
    # Either the pos_embed covers the class token (DINO, timm) or not (DINOv2 with registers).
    for no_embed_class in (False, True):
        grid = n_pos - (0 if no_embed_class else int(has_cls))
        side = int(round(grid ** 0.5))
        if side * side == grid:
            kwargs["img_size"] = side * patch
            if no_embed_class:
                kwargs["no_embed_class"] = True
            break
    else:
        raise CheckpointError(f"{where}cannot infer the architecture: pos_embed of {n_pos} tokens is not a "
                              f"square grid")
    if n_reg:
        kwargs["reg_tokens"] = n_reg
    if any(k.endswith("ls1.gamma") for k in state):
        kwargs["init_values"] = 1e-5  # layer scale present (DINOv2)
    if not any(k.endswith("attn.qkv.bias") for k in state):
        kwargs["qkv_bias"] = False
    if any(".mlp.fc1." in k for k in state):
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        kwargs["mlp_ratio"] = hidden / dim
    return "vit_base_patch16_224", kwargs


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load a backbone state dict strictly; on mismatch name the missing/unexpected keys and shapes."""
    own = model.state_dict()
    state = dict(state)
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        raise CheckpointError(
            f"{path}: position embedding has shape {tuple(state['pos_embed'].shape)}, the model expects "
            f"{tuple(own['pos_embed'].shape)}: the file was trained for another patch size or image size")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def brief(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        problems = []
        if missing:
            problems.append(f"missing keys {brief(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {brief(unexpected)}")
        if wrong:
            k = wrong[0]
            problems.append(f"shape mismatch {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                            + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""))
        raise CheckpointError(f"{path}: does not match the architecture: " + "; ".join(problems))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


# --------------------------------------------------------------------------------------------------
# The model hub: cache look-up without network, a probe with a hard time limit, the "auto" choice
# --------------------------------------------------------------------------------------------------

_TRUE = ("1", "true", "yes", "on")


def offline_reason() -> str | None:
    """``"VITDENSE_OFFLINE=1"`` / ``"HF_HUB_OFFLINE=1"`` when the user switched the hub off, else None."""
    for var in ("VITDENSE_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    return None


def _hub_files(spec: ModelSpec) -> tuple[str | None, list[str], str | None]:
    """(Hugging Face repo id, file names timm may fetch from it, plain URL) of a spec's timm weights."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.timm_tag) if spec.timm_tag else None
    if cfg is None:
        return None, [], None
    if cfg.hf_hub_filename:
        files = [cfg.hf_hub_filename]
    else:  # timm tries the safetensors file first, then the PyTorch one
        files = ["model.safetensors", "pytorch_model.bin"]
    return cfg.hf_hub_id, files, cfg.url


def hub_cached_file(spec: ModelSpec) -> str | None:
    """The local Hugging Face cache file holding a spec's timm weights, or None. Never uses the network."""
    repo, files, _ = _hub_files(spec)
    if repo is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in files:
        found = try_to_load_from_cache(repo.split("@")[0], filename)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _hub_url(spec: ModelSpec) -> str | None:
    repo, files, url = _hub_files(spec)
    if repo is not None:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{repo.split('@')[0]}/resolve/main/{files[0]}"
    return url


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is an answer: the hub is there


def _head(url: str, timeout: float) -> int:
    """HTTP status of one HEAD request (no redirects followed, no retries)."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def probe_hub(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``url`` answers one HEAD request within ``timeout`` seconds, else why not (a phrase).

    The request runs in a daemon thread that is abandoned at the deadline, so name resolution or a server
    that accepts the connection and never answers cannot hold us longer than ``timeout``.
    """
    host = urllib.request.urlparse(url).netloc or url
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["status"] = _head(url, timeout)
        except BaseException as err:  # noqa: BLE001  (reported, not raised: this is a probe)
            answer["error"] = err

    thread = threading.Thread(target=ask, name="vitdense-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or not answer:
        return f"the model hub ({host}) did not answer within {timeout:g} s"
    if "error" in answer:
        err = answer["error"]
        reason = getattr(err, "reason", err)
        return f"the model hub ({host}) cannot be reached ({_brief(reason, 80)})"
    if answer["status"] >= 400 and answer["status"] not in (401, 403):
        return f"the model hub ({host}) answered HTTP {answer['status']}"
    return None


def _official_hint(spec: ModelSpec) -> str:
    if spec.official_file:
        repo = "dinov2" if spec.name.startswith("dinov2") else "dino"
        return (f"download {spec.official_file} (github.com/facebookresearch/{repo}) and pass it with "
                f"weights=PATH")
    return "pass a local weights file with weights=PATH"


def _hub_error(spec: ModelSpec, problem: str) -> CheckpointError:
    """One complete line: what could not be loaded, why, and how to pass a local file instead."""
    return CheckpointError(f"model '{spec.name}': its weights (timm '{spec.timm_tag}') are not in the local "
                           f"model cache and {problem}; {_official_hint(spec)}").naming("weights")


@dataclass(frozen=True)
class AutoChoice:
    """What ``--model auto`` resolved to: the model to load, from where, and why (one line for the user)."""

    name: str
    source: str  # "hub cache", "hub download" or "bundled"
    reason: str
    cached_file: str | None = None

    @property
    def record(self) -> str:
        """The weights actually used, as outputs record them: e.g. ``dino_vits8 (hub cache)``."""
        return f"{self.name} ({self.source})"


def resolve_auto(timeout: float = PROBE_TIMEOUT_S) -> AutoChoice:
    """Decide what ``--model auto`` (the default, also of ``ViTExtractor()``) loads, quickly.

    1. the official DINO ViT-S/8 when its timm weights are in the local Hugging Face cache (no network);
    2. else the bundled backbone when the hub is switched off (``HF_HUB_OFFLINE=1``/``VITDENSE_OFFLINE=1``)
       or does not answer one HEAD request within ``timeout`` seconds;
    3. else the official weights, downloaded once (timm caches them; :func:`load_backbone` falls back to the
       bundled backbone when the download itself fails).
    Without a bundled backbone in the package, the official one is always the choice.
    """
    spec = MODELS[AUTO_PREFERRED]
    bundled = bundled_model_name()
    if hub_cached_file(spec) is not None:
        return AutoChoice(spec.name, "hub cache", "the official DINO ViT-S/8 weights are in the local model "
                                                  "cache", hub_cached_file(spec))
    if bundled is None:
        return AutoChoice(spec.name, "hub download", "no backbone is bundled with this installation")
    offline = offline_reason()
    problem = f"the hub is switched off ({offline})" if offline else probe_hub(_hub_url(spec) or "", timeout)
    if problem:
        return AutoChoice(bundled, "bundled", f"the official DINO ViT-S/8 is not in the local model cache and "
                                              f"{problem}; its features are far stronger: run once online, or "
                                              f"pass weights={spec.official_file!r}")
    return AutoChoice(spec.name, "hub download", "the official DINO ViT-S/8 weights are downloaded once and "
                                                 "cached for later runs")


@dataclass
class Backbone:
    """A ready backbone: the timm module plus what preprocessing and saliency need to know about it.

    weights: the weights actually used, as outputs record them (``dino_vits8 (hub cache)``,
    ``vitdense_vits8 (bundled)``, a file path, ``random init``); note: why ``auto`` chose them, or "".
    """

    model: nn.Module
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    saliency_heads: tuple[int, ...] | None
    weights: str = ""
    note: str = ""


def _load_hub(spec: ModelSpec, cached_file: str | None = None) -> tuple[nn.Module, str]:
    """A spec's timm pretrained weights → (model, record): from the local cache without network, else
    downloaded after a probe of at most PROBE_TIMEOUT_S seconds. CheckpointError (one line) otherwise."""
    import timm

    if not spec.timm_tag:
        raise CheckpointError(f"model '{spec.name}' has no published weights: pass weights=PATH").naming("weights")
    cached_file = cached_file or hub_cached_file(spec)
    if cached_file is not None:
        try:
            model = timm.create_model(spec.timm_tag, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay=dict(file=cached_file), **spec.kwargs)
        except Exception as err:  # a truncated or corrupt cache entry
            raise CheckpointError(f"{cached_file}: cached weights of model '{spec.name}' cannot be read "
                                  f"({_brief(err)}); delete the file to download it again") from None
        return model, f"{spec.name} (hub cache)"
    offline = offline_reason()
    problem = f"the hub is switched off ({offline})" if offline else probe_hub(_hub_url(spec) or "")
    if problem:
        raise _hub_error(spec, problem)
    try:
        model = timm.create_model(spec.timm_tag, pretrained=True, num_classes=0, **spec.kwargs)
    except Exception as err:  # hub errors are many types (OSError, HF errors, URLError)
        raise _hub_error(spec, f"the download failed ({_brief(err)})") from None
    return model, f"{spec.name} (hub download)"


def _arch_summary(dim: int, depth: int, patch: int, registers: int) -> str:
    return f"{patch}-px patches, width {dim}, {depth} blocks" + (f", {registers} registers" if registers else "")


def check_named_weights(name: str, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                        arch: str | None = None, kwargs: Mapping[str, Any] | None = None) -> None:
    """CheckpointError (one line naming the file and the mismatch) when the weights in ``state`` are not
    shaped like the named model: patch size, width, depth and register tokens are compared.

    ``arch``/``kwargs`` (the file's own architecture, when it records one) are used to describe the file.
    """
    import torch

    spec = get_spec(name)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        named = create_vit(spec.arch, **spec.kwargs)
    ps = named.patch_embed.patch_size
    want = (named.embed_dim, len(named.blocks), int(ps[0] if isinstance(ps, (tuple, list)) else ps),
            int(getattr(named, "num_reg_tokens", 0) or 0))
    if "patch_embed.proj.weight" not in state or not any(k.startswith("blocks.") for k in state):
        infer_arch(state, path)  # raises the "not a ViT backbone" error naming the file
    dim, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    registers = state["reg_token"].shape[1] if "reg_token" in state else 0
    have = (int(dim), depth, int(patch), int(registers))
    if have != want:
        what = f" ({arch})" if arch else ""
        raise CheckpointError(f"{path}: does not match model={name!r}: the file holds a ViT{what} with "
                              f"{_arch_summary(*have)}, {name} has {_arch_summary(*want)} ({spec.arch}); leave "
                              f"out model={name!r} to use the file's own architecture").naming("model")


def load_backbone(name: str | None = None, weights: str | os.PathLike | None = None,
                  pretrained: bool = True) -> Backbone:
    """Build a backbone by name and/or from a weights file.

    - ``load_backbone()`` / ``load_backbone("auto")``: the default, see :func:`resolve_auto` (the official
      DINO ViT-S/8 when cached or downloadable, else the bundled backbone); ``Backbone.note`` says why.
    - ``load_backbone("dino_vits8")``: timm hub weights, from the local cache or downloaded; fails within
      PROBE_TIMEOUT_S seconds offline, with a hint to use ``weights=``.
    - ``load_backbone("dino_vits8", weights="dino_deitsmall8_pretrain.pth")``: that architecture, the file's
      weights; a file of another shape is an error naming the file and the mismatch.
    - ``load_backbone(weights="run/teacher_backbone.pth")``: architecture read from the file (our exports)
      or inferred from its shapes (official files).
    ``pretrained=False`` gives random weights (tests, random-init baselines; ``auto`` is then DINO ViT-S/8's
    architecture and nothing is looked up).
    """
    if name == AUTO:
        name = None
    if weights is None:
        if name is None and not pretrained:
            name = AUTO_PREFERRED
        if name is None:
            return _load_auto()
        spec = get_spec(name)
        if spec.bundled_file:
            backbone = load_backbone(name, WEIGHTS_DIR / spec.bundled_file)
            backbone.weights = f"{spec.name} (bundled)"
            return backbone
        if pretrained:
            model, record = _load_hub(spec)
        else:
            model, record = create_vit(spec.arch, **spec.kwargs), "random init"
        return Backbone(model.eval(), spec.name, spec.mean, spec.std, spec.saliency_heads, record)

    state, meta = read_weights(weights)
    if name is not None:
        check_named_weights(name, state, weights, meta["arch"] if meta else None)
    if meta is not None:
        arch, kwargs = meta["arch"], dict(meta.get("kwargs", {}))
        mean, std = tuple(meta.get("mean", IMAGENET_MEAN)), tuple(meta.get("std", IMAGENET_STD))
        heads = tuple(meta["saliency_heads"]) if meta.get("saliency_heads") else None
        label = name or meta.get("name") or Path(weights).stem
    elif name is not None:
        spec = get_spec(name)
        arch, kwargs, mean, std, heads, label = spec.arch, dict(spec.kwargs), spec.mean, spec.std, \
            spec.saliency_heads, spec.name
    else:
        arch, kwargs = infer_arch(state, weights)
        mean, std, heads, label = IMAGENET_MEAN, IMAGENET_STD, None, Path(weights).stem
        if kwargs.get("embed_dim") == 384 and kwargs.get("patch_size") == 8 and kwargs.get("depth") == 12:
            heads = MODELS["dino_vits8"].saliency_heads  # an official DINO ViT-S/8 file
    model = create_vit(arch, **kwargs)
    load_state(model, state, weights)
    return Backbone(model.eval(), label, mean, std, heads, os.path.abspath(weights))  # recorded in outputs


def _load_auto() -> Backbone:
    """The ``auto`` choice loaded; a failed download falls back to the bundled backbone, saying why."""
    choice = resolve_auto()
    if choice.source != "bundled":
        try:
            model, record = _load_hub(MODELS[choice.name], choice.cached_file)
        except CheckpointError as err:
            bundled = bundled_model_name()
            if bundled is None:
                raise
            choice = AutoChoice(bundled, "bundled", f"the official DINO ViT-S/8 could not be loaded: {err}")
        else:
            spec = MODELS[choice.name]
            LOG.info("weights: %s: %s", record, choice.reason)
            return Backbone(model.eval(), spec.name, spec.mean, spec.std, spec.saliency_heads, record,
                            choice.reason)
    backbone = load_backbone(choice.name)
    backbone.note = choice.reason
    LOG.info("weights: %s: %s", backbone.weights, choice.reason)
    return backbone


# --------------------------------------------------------------------------------------------------
# Writing weight files
# --------------------------------------------------------------------------------------------------

def backbone_meta(arch: str, kwargs: Mapping[str, Any] | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  saliency_heads: tuple[int, ...] | None = None, **extra: Any) -> dict:
    """The metadata stored with an exported backbone so it can be rebuilt from the file alone."""
    return dict(arch=arch, kwargs=dict(kwargs or {}), mean=list(mean), std=list(std),
                saliency_heads=list(saliency_heads) if saliency_heads else None, **extra)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; give it the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_backbone(state: Mapping[str, torch.Tensor] | nn.Module, path: str | os.PathLike, meta: dict,
                  dtype: torch.dtype | None = None) -> None:
    """Write a backbone ``ViTExtractor(weights=path)`` loads on its own, atomically.

    ``.safetensors`` stores ``meta`` as JSON in the header; any other suffix writes a ``torch.save`` dict
    ``{"vitdense_backbone": meta, "state_dict": ...}`` readable with ``weights_only=True``.
    """
    import torch
    from torch import nn

    if isinstance(state, nn.Module):
        state = state.state_dict()
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in _clean_state_dict(state).items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={FORMAT_KEY: json.dumps(meta)}))
    else:
        atomic_write(path, lambda tmp: torch.save({FORMAT_KEY: meta, "state_dict": state}, tmp))


_register_bundled()
