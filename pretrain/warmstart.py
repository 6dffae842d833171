"""``--init``: start the student and teacher backbones from weights vitdense can load, with a fresh DINO head.

Anything ``vitdense`` loads works: a model name (the bundled ``vitdense_vits8``, a DINO hub name, a timm
name), an official DINO or DINOv2 file, or a ``pretrain`` export. The architecture is the weights' own
(read from the state dict's shapes, heads from the module), so ``--arch``/``--patch-size`` need not be
given; when given they must agree. Exports of a warm-started run record the chain of runs they came from
(``meta["chain"]``: one entry per run, oldest first).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from vitdense.errors import ConfigError

from .config import PretrainConfig

# Embedding width of each short architecture name (the --arch values without a timm name).
_SHORT_DIMS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768, "vit_large": 1024}


@dataclass
class WarmStart:
    """The weights to start from: timm architecture + constructor kwargs, the backbone's state dict, what
    was loaded (for the record), its preprocessing, and the chain of earlier runs (from its metadata)."""

    source: str
    arch: str
    kwargs: dict[str, Any]
    state: dict[str, torch.Tensor]
    weights: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    chain: list[dict[str, Any]] = field(default_factory=list)

    @property
    def patch_size(self) -> int:
        return int(self.kwargs["patch_size"])

    @property
    def embed_dim(self) -> int:
        return int(self.kwargs["embed_dim"])


def load_warm_start(source: str) -> WarmStart:
    """Load ``source`` (an existing file → weights, otherwise a model name) as :class:`WarmStart`.

    Errors are one line naming the source: unreadable files and unknown names come from
    :func:`vitdense.load_backbone`; a backbone without a CLS token or position embedding cannot be a DINO
    student.
    """
    from vitdense.backbones import MODELS, WEIGHTS_DIR, infer_arch, load_backbone, name_or_file, read_weights

    name, weights = name_or_file(source)
    backbone = load_backbone(name, weights)
    model = backbone.model
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if getattr(model, "cls_token", None) is None or "pos_embed" not in state:
        raise ConfigError(f"--init {source}: the backbone has no CLS token or position embedding; DINO's "
                          f"head reads the CLS token")
    arch, kwargs = infer_arch(state, source)
    kwargs["num_heads"] = int(model.blocks[0].attn.num_heads)  # not visible in the weights' shapes
    chain: list[dict[str, Any]] = []
    if weights is None and name in MODELS and MODELS[name].bundled_file:  # a shipped backbone: its own file
        weights = str(WEIGHTS_DIR / MODELS[name].bundled_file)
    if weights is not None:
        _, meta = read_weights(weights)
        chain = list((meta or {}).get("chain", []))
        if not chain and meta and meta.get("trained_steps"):  # trained before exports recorded their chain
            chain = [{"name": meta.get("name"), "steps": meta["trained_steps"], "minutes": meta.get("train_minutes"),
                      "data_dir": meta.get("data_dir"), "recipe": meta.get("recipe")}]
    return WarmStart(source, arch, kwargs, state, backbone.weights or source, tuple(backbone.mean),
                     tuple(backbone.std), chain)


def check_architecture(cfg: PretrainConfig, init: WarmStart) -> None:
    """ConfigError when a given --arch (even the default's name) or --patch-size contradicts the weights:
    the weights decide the architecture, so an option asking for another one would be silently ignored."""
    if not cfg.arch and not cfg.patch_size:  # neither given: the weights' own
        return
    arch, kwargs = cfg.timm_arch()
    asked, problems = [], []
    if cfg.arch:
        dim = _SHORT_DIMS.get(cfg.arch) or _named_dim(arch)
        # widths outside the named sizes (custom models) are checked by loading the weights
        standard = init.embed_dim in _SHORT_DIMS.values()
        named_patch = re.search(r"_patch(\d+)", cfg.arch)
        asked.append(f"--arch {cfg.arch}")
        if dim is not None and standard and dim != init.embed_dim:
            problems.append(f"{dim} channels")
        if named_patch and int(named_patch.group(1)) != init.patch_size and not cfg.patch_size:
            problems.append(f"{named_patch.group(1)}-px patches")
    if cfg.patch_size:
        asked.append(f"--patch-size {cfg.patch_size}")
        if cfg.patch_size != init.patch_size:
            problems.append(f"{cfg.patch_size}-px patches")
    if problems:
        raise ConfigError(f"--init {init.source}: a ViT with {init.embed_dim} channels and {init.patch_size}-px "
                          f"patches, but {' '.join(asked)} asks for {' and '.join(problems)}; leave "
                          f"{' and '.join(a.split()[0] for a in asked)} out to use the weights' own")


def _named_dim(arch: str) -> int | None:
    for short, dim in _SHORT_DIMS.items():
        if arch.startswith(short + "_"):
            return dim
    return None


def apply_to_config(cfg: PretrainConfig, init: WarmStart) -> None:
    """Make the config describe the weights' architecture: short name where there is one, patch size, and
    the position-embedding grid (the weights'; crops of any size interpolate it)."""
    check_architecture(cfg, init)
    grid = int(init.kwargs.get("img_size", cfg.global_size))
    if cfg.img_size and cfg.img_size != grid:
        raise ConfigError(f"--init {init.source}: its position embedding covers {grid} px, not --img-size "
                          f"{cfg.img_size}; leave --img-size out")
    short = {dim: name for name, dim in _SHORT_DIMS.items()}.get(init.embed_dim)
    if short is not None:
        cfg.arch = short
    elif not cfg.arch:
        cfg.arch = init.arch
    cfg.patch_size = init.patch_size
    cfg.img_size = grid
