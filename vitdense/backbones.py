"""Backbone names → a timm VisionTransformer with weights.

Weights come from one of four places:

(a) a timm pretrained tag (``dino_vits8`` → ``vit_small_patch8_224.dino``), fetched from the model hub;
(b) a local official DINO checkpoint: the backbone-only ``dino_deitsmall8_pretrain.pth`` or the full
    training checkpoint with ``teacher``/``student`` entries (``module.``/``backbone.`` prefixes are
    stripped and DINO-head weights dropped);
(c) a backbone exported by our own ``pretrain/`` (a ``.pth`` or ``.safetensors`` file that records its
    architecture, so ``ViTExtractor(weights=path)`` needs nothing else);
(d) the backbone bundled with the package (``vitdense/weights/``), when present.

Every file is read with ``torch.load(..., weights_only=True)`` or safetensors: a checkpoint never runs code.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Marker key of the files our pretrain/ exports (and of the bundled weights' metadata).
FORMAT_KEY = "vitdense_backbone"
WEIGHTS_DIR = Path(__file__).parent / "weights"


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
        return " ".join(parts) if parts else "random init unless --weights is given"


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
    """The bundled backbone when one ships with the package, else DINO ViT-S/8 (needs the hub or --weights)."""
    bundled = [s.name for s in MODELS.values() if s.bundled_file]
    return bundled[0] if bundled else "dino_vits8"


def get_spec(name: str) -> ModelSpec:
    """Spec for a known name, or for any timm ViT architecture name (``vit_*``)."""
    if name in MODELS:
        return MODELS[name]
    base = name.split(".")[0]
    if base.startswith(("vit_", "deit")):
        return ModelSpec(name, base, name if "." in name else None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    known = ", ".join(sorted(MODELS))
    raise ConfigError(f"unknown model '{name}': use one of {known}, or a timm ViT name such as vit_small_patch16_224")


def create_vit(arch: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm VisionTransformer without classifier head."""
    import timm

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
    """The vitdense metadata of a safetensors file (None if it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return json.loads(meta[FORMAT_KEY]) if FORMAT_KEY in meta else None


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Backbone state dict and vitdense metadata (arch, kwargs, mean, std) of a weights file.

    Accepts the official DINO files (backbone-only or full checkpoint), DINOv2 files, checkpoints and
    exports of our ``pretrain/``, and safetensors. Prefixes ``module.``/``backbone.`` are removed and the
    DINO head (``head.*``) is dropped.
    """
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
        return _clean_state_dict(state), meta
    try:
        # The official DINO training checkpoints store their argparse Namespace under "args": allow
        # that one plain container class, nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, unsafe globals: all mean "not a weights file"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({first})") from None
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
    return _clean_state_dict(tensors), meta


def _clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("head.") or key.startswith("head_") or key in ("head.weight", "head.bias"):
            continue  # DINO head or classifier: not part of the backbone
        out[key] = value
    return out


_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}


def infer_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    """Guess a timm architecture and constructor kwargs from a backbone state dict's shapes."""
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise CheckpointError("cannot infer the architecture: no patch_embed.proj.weight/pos_embed")
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
        raise CheckpointError(f"cannot infer the architecture: pos_embed of {n_pos} tokens is not a square grid")
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


def _hub_error(spec: ModelSpec, err: Exception) -> CheckpointError:
    hint = f"download {spec.official_file} from the DINO release and" if spec.official_file else ""
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return CheckpointError(
        f"model '{spec.name}': could not fetch timm weights '{spec.timm_tag}' from the hub ({first}); "
        f"offline, {hint} pass it with --weights PATH (weights=PATH in Python)".replace("  ", " "))


@dataclass
class Backbone:
    """A ready backbone: the timm module plus what preprocessing and saliency need to know about it."""

    model: nn.Module
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    saliency_heads: tuple[int, ...] | None


def load_backbone(name: str | None = None, weights: str | os.PathLike | None = None,
                  pretrained: bool = True) -> Backbone:
    """Build a backbone by name and/or from a weights file.

    - ``load_backbone("dino_vits8")``: timm hub weights (fails offline with a hint to use ``weights=``).
    - ``load_backbone("dino_vits8", weights="dino_deitsmall8_pretrain.pth")``: that architecture, the file's
      weights.
    - ``load_backbone(weights="run/teacher_backbone.pth")``: architecture read from the file (our exports)
      or inferred from its shapes (official files).
    - ``load_backbone()``: the bundled default.
    ``pretrained=False`` gives random weights (tests, random-init baselines).
    """
    if weights is None and name is None:
        name = default_model_name()
    if weights is None:
        spec = get_spec(name)
        if spec.bundled_file:
            return load_backbone(name, WEIGHTS_DIR / spec.bundled_file)
        model = create_vit(spec.arch, **spec.kwargs)
        if pretrained:
            if not spec.timm_tag:
                raise CheckpointError(f"model '{spec.name}' has no published weights: pass --weights PATH")
            import timm

            try:
                model = timm.create_model(spec.timm_tag, pretrained=True, num_classes=0, **spec.kwargs)
            except Exception as err:  # hub errors are many types (OSError, HF errors, URLError)
                raise _hub_error(spec, err) from None
        return Backbone(model.eval(), spec.name, spec.mean, spec.std, spec.saliency_heads)

    state, meta = read_weights(weights)
    if meta is not None:
        arch, kwargs = meta["arch"], dict(meta.get("kwargs", {}))
        mean, std = tuple(meta.get("mean", IMAGENET_MEAN)), tuple(meta.get("std", IMAGENET_STD))
        heads = tuple(meta["saliency_heads"]) if meta.get("saliency_heads") else None
        label = name or meta.get("name") or Path(weights).stem
    elif name is not None:
        spec = get_spec(name)
        arch, kwargs, mean, std, heads, label = spec.arch, dict(spec.kwargs), spec.mean, spec.std, \
            spec.saliency_heads, spec.name
        if "reg_tokens" not in kwargs and "reg_token" in state:
            raise CheckpointError(f"{weights}: has register tokens but model '{name}' has none")
    else:
        arch, kwargs = infer_arch(state)
        mean, std, heads, label = IMAGENET_MEAN, IMAGENET_STD, None, Path(weights).stem
        if kwargs.get("embed_dim") == 384 and kwargs.get("patch_size") == 8 and kwargs.get("depth") == 12:
            heads = MODELS["dino_vits8"].saliency_heads  # an official DINO ViT-S/8 file
    model = create_vit(arch, **kwargs)
    load_state(model, state, weights)
    return Backbone(model.eval(), label, mean, std, heads)


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
