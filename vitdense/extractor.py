"""ViTExtractor: dense descriptors and saliency from a vision transformer.

Notation used in shapes throughout vitdense:
    B  images in a batch            H, W  image height/width in pixels (after resizing)
    h, w  token grid (``num_patches``)   T = h * w  patch tokens (prefix tokens excluded)
    D  descriptor channels          p  patch size, s  stride

The public methods keep the names and semantics of ShirAmir/dino-vit-features' extractor, so code written
for it runs unchanged: ``preprocess``, ``extract_descriptors`` (B×1×T×D), ``extract_saliency_maps`` (B×T),
``num_patches``, ``load_size``. What is added:

* any timm ViT and weights from files (see :mod:`vitdense.backbones`);
* several layers in one forward pass, and descriptors + saliency from one pass (:meth:`ViTExtractor.extract`);
* the forward stops at the deepest block it needs (key of layer 9 never runs blocks 9–11);
* attention through PyTorch SDPA; saliency from the CLS row of the attention only (B×heads×T, never T×T);
* vectorised log-binning (no Python loop over tokens).

Channel layout (identical to dino-vit-features, so descriptors are interchangeable): for the key/query/value
facets channel ``c = i * heads + j`` holds component ``i`` of head ``j`` (head-dim major, heads interleaved);
the token facet keeps timm's channel order. Log-binned descriptors stack 17 bins of that layout,
``channel = bin * D + c``: bins 0–8 are the single tokens of the 3×3 neighbourhood in row-major order
(offsets −1, 0, +1 in y, then x), bins 9–16 the eight 3×3-average-pooled cells at offsets ±3 around the
token, row-major, centre skipped. Cells that fall outside the grid take the nearest cell inside it.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .backbones import AUTO, AUTO_PREFERRED, MODELS, Backbone, IMAGENET_MEAN, IMAGENET_STD, load_backbone
from .errors import ConfigError, ImageError, WeakWeightsWarning
from .io import array_to_pil, load_image, to_rgb

FACETS = ("key", "query", "value", "token")
MAX_UPSCALE = 4.0  # resizing an image up by more than this invents its details: warn (once per image)
LOG = logging.getLogger("vitdense")
ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError.argument("device", device, "not a device name (use cpu, cuda, cuda:1 or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError.argument("device", device, "CUDA is not available on this machine (use cpu)")
    return dev


def resize_size(size: tuple[int, int], load_size: int | Sequence[int] | None) -> tuple[int, int]:
    """(height, width) after resizing a (height, width) image to ``load_size``.

    An int sets the shorter side (aspect ratio kept, the longer side truncated as torchvision's Resize
    does); a pair (height, width) is taken as is; None keeps the size.
    """
    hgt, wid = size
    if load_size is None:
        return hgt, wid
    if isinstance(load_size, int):
        if hgt <= wid:
            return load_size, int(load_size * wid / hgt)
        return int(load_size * hgt / wid), load_size
    return int(load_size[0]), int(load_size[1])


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a square (1, N, D) patch position embedding to a (h, w) grid → (1, h*w, D).

    Follows the official DINO code (and dino-vit-features): scale factors (h + 0.1)/√N, (w + 0.1)/√N with
    ``recompute_scale_factor=False``, so resampled embeddings match theirs. At the native grid the input is
    returned unchanged.
    """
    n, dim = pos.shape[1], pos.shape[2]
    side = int(math.sqrt(n))
    if grid == (side, side):
        return pos
    # +0.1 avoids floor() rounding the output size down (facebookresearch/dino issue 8).
    out = F.interpolate(
        pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
        scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side),
        mode="bicubic", align_corners=False, recompute_scale_factor=False)
    assert out.shape[-2:] == grid, (out.shape, grid)
    return out.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)


def log_bin(x: torch.Tensor, grid: tuple[int, int], hierarchy: int = 2) -> torch.Tensor:
    """Log-binned descriptors of Amir et al. 2021.

    x: (B, T, D) descriptors on a (h, w) grid → (B, T, (1 + 8 * hierarchy) * D). Level k averages 3^k × 3^k
    cells (borders averaged over the cells inside the grid) and samples the 3 × 3 cells at offsets
    −3^k, 0, 3^k; level 0 keeps the centre, later levels skip it. Out-of-grid cells are clamped to the
    nearest cell inside (replicate padding). Vectorised: one padded copy per level, then slices.
    """
    bsz, tokens, dim = x.shape
    hgt, wid = grid
    assert tokens == hgt * wid, (tokens, grid)
    # Work channels-last (B, h, w, D), the layout of x itself, and write each bin straight into its slot
    # of the (B, h, w, bins, D) result: no transposing copy of the (bins × larger) output.
    maps = x.contiguous().reshape(bsz, hgt, wid, dim)
    out = x.new_empty(bsz, hgt, wid, 1 + 8 * hierarchy, dim)
    slot = 0
    for k in range(hierarchy):
        step = 3 ** k
        pooled = maps
        if k > 0:  # avg_pool2d keeps the channels-last memory layout of its input
            pooled = F.avg_pool2d(maps.permute(0, 3, 1, 2), step, stride=1, padding=step // 2,
                                  count_include_pad=False).permute(0, 2, 3, 1)
        padded = _clamp_pad(pooled, step)  # == replicate padding: out-of-grid cells take the nearest
        for dy in (-step, 0, step):
            for dx in (-step, 0, step):
                if k > 0 and dy == 0 and dx == 0:
                    continue
                out[:, :, :, slot] = padded[:, step + dy: step + dy + hgt, step + dx: step + dx + wid]
                slot += 1
    return out.reshape(bsz, tokens, -1)


def _clamp_pad(maps: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad (B, h, w, C) by ``pad`` cells on each side, each new cell copying the nearest cell of the grid."""
    hgt, wid = maps.shape[1:3]
    iy = torch.arange(-pad, hgt + pad, device=maps.device).clamp(0, hgt - 1)
    ix = torch.arange(-pad, wid + pad, device=maps.device).clamp(0, wid - 1)
    return maps[:, iy][:, :, ix]


@dataclass
class Features:
    """Result of :meth:`ViTExtractor.extract`.

    descriptors: layer → (B, T, D) (or (B, 1 + T, D) with ``include_cls``); saliency: (B, T) in [0, 1] or
    None; num_patches: the token grid (h, w); load_size: the input's (H, W) in pixels.
    """

    descriptors: dict[int, torch.Tensor]
    saliency: torch.Tensor | None
    num_patches: tuple[int, int]
    load_size: tuple[int, int]


_warned_fallback: list[str] = []  # once per process: a notebook re-running a cell is told once


def _warn_bundled_fallback(backbone: Backbone) -> None:
    """The Python counterpart of the CLI's stderr line when ``auto`` fell back to the bundled backbone."""
    if _warned_fallback:
        return
    _warned_fallback.append(backbone.weights)
    official = MODELS[AUTO_PREFERRED].official_file
    reason = backbone.note.split(";")[0]
    warnings.warn(f"ViTExtractor(): using the weights {backbone.weights}, not the official DINO ViT-S/8: {reason}. "
                  f"The bundled backbone grades no better than a random ViT (README, report card). For the "
                  f"official weights run once online (they are then cached), or download {official} "
                  f"(github.com/facebookresearch/dino) and pass ViTExtractor(weights=\"{official}\").",
                  WeakWeightsWarning, stacklevel=3)


class ViTExtractor:
    """Dense descriptors and saliency maps from a ViT (drop-in for dino-vit-features' extractor).

    Args:
        model_type: a name from ``vitdense models`` or a timm ViT name. ``"auto"`` (default; None is the
            same): the official DINO ViT-S/8 when its weights are cached or can be downloaded, else the
            bundled backbone (see :func:`vitdense.backbones.resolve_auto`); with ``weights``, the
            architecture is read from the file.
        stride: stride of the patch embedding (must divide the patch size); smaller → denser grid.
        model: an already built timm VisionTransformer to use instead of ``model_type``.
        device: "cpu", "cuda", or None/"auto" for cuda when available.
        weights: a local weights file (official DINO, our pretrain/ export, safetensors).
        dtype: torch.float32 (default), torch.bfloat16 or torch.float16 autocast for the forward pass.
        saliency_heads: CLS-attention heads averaged into saliency (default: the model's, else all).
        pretrained: with ``weights`` None, fetch hub weights (False: random init, for tests/baselines).

    Attributes besides dino-vit-features': ``weights_used``, the weights actually loaded as outputs record
    them (``"dino_vits8 (hub cache)"``, ``"vitdense_vits8 (bundled)"``, a file path, ...), and
    ``weights_note``, why ``auto`` chose them ("" otherwise).
    """

    def __init__(self, model_type: str | None = AUTO, stride: int = 4, model: nn.Module | None = None,
                 device: str | torch.device | None = None, weights: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32, saliency_heads: Sequence[int] | None = None,
                 pretrained: bool = True):
        self.device = resolve_device(device)
        if model is not None:
            name = model_type if model_type not in (None, AUTO) else "custom"
            backbone = Backbone(model, name, *_norm_for(name), None, weights=f"{name} (module passed in)")
            if name == "dino_vits8":
                backbone.saliency_heads = (0, 2, 4, 5)
        else:
            backbone = load_backbone(model_type, weights, pretrained=pretrained)
        self.model_type = backbone.name
        self.weights_used, self.weights_note = backbone.weights, backbone.note
        if backbone.note and backbone.weights.endswith("(bundled)"):
            _warn_bundled_fallback(backbone)
        self.model = backbone.model.eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.mean, self.std = tuple(backbone.mean), tuple(backbone.std)
        ps = self.model.patch_embed.patch_size
        self.p = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        if not isinstance(stride, int) or stride <= 0 or self.p % stride != 0:
            raise ConfigError.argument("stride", stride, f"must be a positive divisor of the patch size {self.p}")
        self.stride = (stride, stride)
        self.num_heads = self.model.blocks[0].attn.num_heads
        self.depth = len(self.model.blocks)
        self.embed_dim = self.model.embed_dim
        self.num_prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        self.has_cls = getattr(self.model, "cls_token", None) is not None
        heads = saliency_heads if saliency_heads is not None else backbone.saliency_heads
        if heads is not None and any(not 0 <= h < self.num_heads for h in heads):
            raise ConfigError(f"saliency heads {list(heads)}: the model has {self.num_heads} heads")
        self.saliency_heads = tuple(heads) if heads is not None else tuple(range(self.num_heads))
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype {dtype}: use float32, bfloat16 or float16")
        self.dtype = dtype
        self.load_size: tuple[int, int] | None = None
        self.num_patches: tuple[int, int] | None = None
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._warned_upscale: set[str] = set()

    # ------------------------------------------------------------------ preprocessing
    def at_stride(self, stride: int | None) -> "ViTExtractor":
        """A view of this extractor (the same model, nothing copied) at another patch-embedding stride
        (None: the patch size); itself when the stride is already that."""
        stride = self.p if stride is None else stride
        if not isinstance(stride, int) or stride <= 0 or self.p % stride != 0:
            raise ConfigError.argument("stride", stride, f"must be a positive divisor of the patch size {self.p}")
        if self.stride == (stride, stride):
            return self
        view = copy.copy(self)
        view.stride = (stride, stride)
        view._pos_cache = {}
        return view

    def preprocess(self, image_path: ImageLike, load_size: int | Sequence[int] | None = None,
                   name: str | None = None) -> tuple[torch.Tensor, Image.Image]:
        """Load, resize (LANCZOS) and normalise one image → ((1, 3, H, W) tensor, resized PIL image).

        ``load_size``: int = shorter side, (height, width) = exact size, None = unchanged. Raises
        :class:`ImageError` naming the file when it cannot be read or is smaller than one patch, as it is or
        after resizing (a 4x4 image is an error whatever the load size); logs a
        warning (once per file) when the image is enlarged more than MAX_UPSCALE times. ``name``: how
        messages call an image passed as an array or PIL image (default: its path, or "image").
        """
        if isinstance(image_path, Image.Image):
            pil = to_rgb(image_path)
        elif isinstance(image_path, np.ndarray):
            pil = array_to_pil(image_path)
        else:
            pil = load_image(image_path)
        label = name or (str(image_path) if isinstance(image_path, (str, os.PathLike)) else "image")
        if min(pil.height, pil.width) < self.p:  # fewer pixels than one token: resizing would invent them all
            raise ImageError(f"{label}: image of {pil.width}x{pil.height} px is smaller than one {self.p}x{self.p} "
                             f"patch; no load size makes it usable")
        hgt, wid = resize_size((pil.height, pil.width), load_size)
        if min(hgt, wid) < self.p:
            raise ImageError(f"{label}: image of {wid}x{hgt} px (after resizing) is smaller than one "
                             f"{self.p}x{self.p} patch; use a larger image or --load-size")
        scale = hgt / pil.height
        if scale > MAX_UPSCALE and label not in self._warned_upscale:
            if label != "image":  # unnamed arrays may differ from call to call: warn every time
                self._warned_upscale.add(label)
            LOG.warning("%s: image of %dx%d px upscaled %.0fx to %dx%d px; its descriptors (and anything found "
                        "in it) carry little information: use a larger image or a smaller --load-size",
                        label, pil.width, pil.height, scale, wid, hgt)
        if (hgt, wid) != (pil.height, pil.width):
            pil = pil.resize((wid, hgt), Image.LANCZOS)
        return self.to_tensor(pil), pil

    def to_tensor(self, pil: Image.Image) -> torch.Tensor:
        """Normalised (1, 3, H, W) float tensor of an RGB PIL image."""
        arr = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((arr - mean) / std)[None]

    def grid_size(self, load_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) of an (H, W) input at this extractor's stride."""
        return (1 + (load_size[0] - self.p) // self.stride[0], 1 + (load_size[1] - self.p) // self.stride[1])

    # ------------------------------------------------------------------ forward
    def _pos_embed(self, grid: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(prefix position embedding or None, patch position embedding (1, h*w, D)) for a grid, cached."""
        model = self.model
        if model.pos_embed is None:
            return None, None
        n_prefix_pos = 0 if getattr(model, "no_embed_class", False) else self.num_prefix
        if grid not in self._pos_cache:
            pos = model.pos_embed[:, n_prefix_pos:]
            self._pos_cache[grid] = interpolate_pos_embed(pos, grid)
        prefix = model.pos_embed[:, :n_prefix_pos] if n_prefix_pos else None
        return prefix, self._pos_cache[grid]

    def _tokens(self, batch: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embedding at the chosen stride + prefix tokens + position embedding → (B, P + T, D)."""
        model = self.model
        proj = model.patch_embed.proj
        x = F.conv2d(batch, proj.weight, proj.bias, stride=self.stride)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = model.patch_embed.norm(x)
        prefix_pos, patch_pos = self._pos_embed(grid)
        to_cat = []
        if getattr(model, "cls_token", None) is not None:
            to_cat.append(model.cls_token.expand(x.shape[0], -1, -1))
        if getattr(model, "reg_token", None) is not None:
            to_cat.append(model.reg_token.expand(x.shape[0], -1, -1))
        if patch_pos is not None:
            x = x + patch_pos
        if to_cat:
            prefix = torch.cat(to_cat, dim=1)
            if prefix_pos is not None:
                prefix = prefix + prefix_pos
            x = torch.cat([prefix, x], dim=1)
        x = model.norm_pre(x)
        return x, grid

    def layer_index(self, layer: int) -> int:
        """0-based index of ``layer`` (negative counts from the end); ConfigError when out of range."""
        if not -self.depth <= layer < self.depth:
            raise ConfigError.argument("layer", layer, f"the model has {self.depth} layers (use 0..{self.depth - 1} "
                              f"or negative indices)")
        return layer % self.depth

    @torch.inference_mode()
    def extract(self, batch: torch.Tensor, layers: int | Iterable[int] = 11, facet: str = "key",
                bin: bool = False, include_cls: bool = False, saliency: bool = False) -> Features:
        """Descriptors of one facet at several layers, and optionally saliency, in one forward pass.

        batch: (B, 3, H, W) normalised images. Returns :class:`Features` with descriptors (B, T, D) per layer
        (float32, on the extractor's device).
        """
        if facet not in FACETS:
            raise ConfigError.argument("facet", facet, f"choose one of {', '.join(FACETS)}")
        if bin and include_cls:
            raise ConfigError("bin=True and include_cls=True cannot be combined")
        if include_cls and not self.has_cls:
            raise ConfigError(f"model {self.model_type} has no CLS token")
        if saliency and not self.has_cls:
            raise ConfigError(f"model {self.model_type} has no CLS token: saliency needs CLS attention")
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        wanted = {self.layer_index(l) for l in layer_list}
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ConfigError(f"expected a (B, 3, H, W) batch, got {tuple(batch.shape)}")
        hgt, wid = batch.shape[-2:]
        if min(hgt, wid) < self.p:
            raise ImageError(f"image of {wid}x{hgt} px is smaller than one {self.p}x{self.p} patch")
        batch = batch.to(self.device, torch.float32)
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        out: dict[int, torch.Tensor] = {}
        sal = None
        last = max(wanted) if wanted else -1
        if saliency:
            last = self.depth - 1
        with autocast:
            x, grid = self._tokens(batch)
            for idx, block in enumerate(self.model.blocks):
                if idx > last:
                    break
                if (idx in wanted and facet != "token") or (saliency and idx == self.depth - 1):
                    q, k, v = self._qkv(block, x)
                    if idx in wanted and facet != "token":
                        out[idx] = {"query": q, "key": k, "value": v}[facet]
                    if saliency and idx == self.depth - 1:
                        sal = self._cls_attention(block, q, k)
                if idx == last and not (idx in wanted and facet == "token"):
                    break  # q/k/v of a layer need only that block's input
                x = block(x)
                if idx in wanted and facet == "token":
                    out[idx] = x[:, None]  # (B, 1, P + T, D): the token facet as a single "head"
        self.load_size = (int(hgt), int(wid))
        self.num_patches = grid
        descriptors = {}
        for layer in layer_list:
            feats = out[self.layer_index(layer)].float()  # (B, heads, P + T, d)
            if include_cls:
                feats = torch.cat([feats[:, :, :1], feats[:, :, self.num_prefix:]], dim=2)
            else:
                feats = feats[:, :, self.num_prefix:]
            # (B, heads, T, d) → (B, T, d * heads) with channel = i * heads + j (dino-vit-features order)
            desc = feats.permute(0, 2, 3, 1).flatten(2)
            if bin:
                desc = log_bin(desc, grid)
            descriptors[layer] = desc
        if sal is not None:
            sal = sal.float()
            lo, hi = sal.min(dim=1, keepdim=True).values, sal.max(dim=1, keepdim=True).values
            sal = (sal - lo) / (hi - lo).clamp_min(1e-12)
        return Features(descriptors, sal, grid, self.load_size)

    @staticmethod
    def _qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key, value (B, heads, N, d) of a timm block's attention for block input x (B, N, D)."""
        attn = block.attn
        bsz, n, _ = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(bsz, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def _cls_attention(self, block: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Mean over the saliency heads of the CLS token's attention to the patch tokens → (B, T).

        Only the CLS row of the attention is computed: (B, heads, 1, N) instead of (B, heads, N, N).
        """
        heads = list(self.saliency_heads)
        scale = block.attn.scale if hasattr(block.attn, "scale") else q.shape[-1] ** -0.5
        logits = (q[:, heads, :1] * scale) @ k[:, heads].transpose(-2, -1)  # (B, h', 1, N)
        attn = logits.float().softmax(dim=-1)[:, :, 0, self.num_prefix:]
        return attn.mean(dim=1)

    # ------------------------------------------------------------------ dino-vit-features API
    def extract_descriptors(self, batch: torch.Tensor, layer: int | Sequence[int] = 11, facet: str = "key",
                            bin: bool = False, include_cls: bool = False) -> torch.Tensor:
        """Descriptors (B, 1, T, D). A list of layers is computed in one pass and concatenated along D."""
        feats = self.extract(batch, layer, facet, bin=bin, include_cls=include_cls)
        layers = [layer] if isinstance(layer, int) else list(layer)
        if len(layers) == 1:  # no concatenation: a copy of a (T × 17·D) log-binned result is not free
            return feats.descriptors[layers[0]][:, None]
        return torch.cat([feats.descriptors[l] for l in layers], dim=-1)[:, None]

    def extract_saliency_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """Saliency (B, T): mean CLS attention of the last layer over the saliency heads, min-max per image."""
        return self.extract(batch, [], saliency=True).saliency

    # ------------------------------------------------------------------ convenience
    def load_batch(self, images: Sequence[ImageLike], load_size: int | Sequence[int] | None = None
                   ) -> tuple[torch.Tensor, list[Image.Image]]:
        """Preprocess several images of one size into a (B, 3, H, W) batch (sizes must agree)."""
        tensors, pils = zip(*(self.preprocess(im, load_size) for im in images))
        shapes = {t.shape for t in tensors}
        if len(shapes) > 1:
            raise ImageError(f"images have different sizes after resizing ({sorted(s[-2:] for s in shapes)}); "
                             "pass --load-size HEIGHT WIDTH or extract them one by one")
        return torch.cat(tensors), list(pils)


def _norm_for(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation of a user-supplied model, by name: DINO models use ImageNet statistics."""
    from .backbones import MODELS

    if name in MODELS:
        return MODELS[name].mean, MODELS[name].std
    if "dino" in name or name in ("custom",):
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
