"""DINO's multi-crop views computed on the accelerator, for when the CPU cannot keep up.

On a GPU a ViT-S/16 trains on thousands of images per second while PIL makes a few dozen sets of ten
views per second and core. Here the data-loader workers only decode each image, shrink it to at most
``source_size`` pixels on its longer side and draw the random choices (the very same
:class:`~pretrain.data.CropParams` the CPU path draws, from the same per-image seed); the crops and
photometric operations then run batched on the device:

* crop + resize + flip: one ``grid_sample`` (bicubic) per view, the sampling grid built from the boxes;
* colour jitter in each image's own random order, grayscale, Gaussian blur (per-image sigma, a separable
  convolution with one kernel per image), solarisation, normalisation: element-wise, ``torch.where``-masked.

Shapes: ``images`` (B, 3, P, P) uint8, zero-padded; ``params`` (B, V, NPARAM) float, one row per view
(layout :data:`PARAM_FIELDS`); output: V tensors (B, 3, S_v, S_v), S_v the view's side.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .data import CropParams

# Column layout of one view's parameter row.
PARAM_FIELDS = ("top", "left", "height", "width", "size", "flip", "jitter", "brightness", "contrast",
                "saturation", "hue", "order0", "order1", "order2", "order3", "grayscale", "blur_sigma", "solarize")
NPARAM = len(PARAM_FIELDS)
_COL = {name: i for i, name in enumerate(PARAM_FIELDS)}

# Luma weights of torchvision's rgb_to_grayscale (ITU-R 601, as PIL's convert("L") up to rounding).
_LUMA = (0.2989, 0.587, 0.114)


def params_to_tensor(params: Sequence[CropParams]) -> torch.Tensor:
    """(V, NPARAM) rows of one image's views."""
    rows = []
    for p in params:
        jitter = p.jitter or (1.0, 1.0, 1.0, 0.0)
        rows.append([*p.box, p.size, float(p.flip), float(p.jitter is not None), *jitter, *p.jitter_order,
                     float(p.grayscale), p.blur_radius or 0.0, float(p.solarize)])
    return torch.tensor(rows, dtype=torch.float32)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) → (B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma (as torchvision/PIL ImageEnhance.Contrast)."""
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(factor)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image."""
    f = _per_image(factor)
    return (f * x + (1 - f) * _gray(x)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]) through HSV, as torchvision's adjust_hue."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    # HSV → RGB: the closed form f(n) = v - v·s·max(0, min(k, 4 - k, 1)), k = (n + 6h) mod 6.
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h * 6.0) % 6.0
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur image b with a Gaussian of std ``sigma[b]`` pixels, kernel radius ``radius`` (≥ 3 sigma).

    Separable, reflect padding, one kernel per image (a grouped convolution).
    """
    B, C, H, W = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B·C, K)
    pad = min(radius, H - 1, W - 1)
    if pad < radius:  # tiny images: reflect padding cannot exceed the side
        kernel = kernel[:, radius - pad:radius + pad + 1]
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), kernel[:, None, :, None], groups=B * C)
    return y.view(B, C, H, W)


def crop_resize(images: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic random-resized crop (+ horizontal flip) of every image (uint8, or float in 0..255) →
    (B, 3, size, size) in [0, 1].

    Pixel centres of the output are mapped into the box (top, left, height, width), in pixels of the
    padded source; the bicubic overshoot is clamped.
    """
    B, _, P_h, P_w = images.shape
    top, left, h, w = (params[:, _COL[k]] for k in ("top", "left", "height", "width"))
    flip = params[:, _COL["flip"]] > 0.5
    t = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size  # (S,)
    tx = torch.where(flip[:, None], 1.0 - t[None], t[None])  # (B, S)
    xs = left[:, None] + tx * w[:, None]  # source x of each output column, in pixels
    ys = top[:, None] + t[None] * h[:, None]
    gx = (2.0 * xs / P_w - 1.0)[:, None, :].expand(B, size, size)
    gy = (2.0 * ys / P_h - 1.0)[:, :, None].expand(B, size, size)
    grid = torch.stack([gx, gy], dim=-1)
    out = F.grid_sample(images.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.div_(255.0).clamp_(0, 1)


# The four colour-jitter operations by their parameter column, in torchvision's order (index = order value).
_JITTER = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
           "hue": adjust_hue}


class GPUMultiCrop:
    """Apply the views described by ``params`` to a batch of uint8 source images on their device.

    ``__call__(images, params)`` → list of V normalised float tensors (B, 3, S_v, S_v).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def view(self, images: torch.Tensor, p_cpu: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """One view of every image: rows (B, NPARAM), all of one output size, ``p_cpu`` on the CPU and ``p``
        the same on the device.

        Each operation runs only on the images that draw it: in jitter slot j, the images whose j-th jitter
        operation is k go through operation k together (4 groups per slot, so every image is jittered 4
        times, not 16), and grayscale, blur and solarisation only touch their own images. The groups are
        worked out on the host from the CPU copy and reach the device as one index tensor per view, so the
        host never waits for the device.
        """
        x = crop_resize(images, p, int(p_cpu[0, _COL["size"]]))
        jitter_on = p_cpu[:, _COL["jitter"]] > 0.5
        groups: list[tuple[str, torch.Tensor]] = []  # (operation, image indices), in application order
        for slot in range(4):
            order = p_cpu[:, _COL[f"order{slot}"]].long()
            for k, name in enumerate(_JITTER):
                groups.append((name, torch.nonzero(jitter_on & (order == k)).flatten()))
        groups.append(("grayscale", torch.nonzero(p_cpu[:, _COL["grayscale"]] > 0.5).flatten()))
        sigma = p_cpu[:, _COL["blur_sigma"]]
        groups.append(("blur", torch.nonzero(sigma > 0).flatten()))
        groups.append(("solarize", torch.nonzero(p_cpu[:, _COL["solarize"]] > 0.5).flatten()))
        groups = [(name, idx) for name, idx in groups if len(idx)]
        if not groups:
            return (x - self.mean) / self.std
        flat = torch.cat([idx for _, idx in groups])
        if x.is_cuda:
            flat = flat.pin_memory()
        flat = flat.to(x.device, non_blocking=True)
        offset = 0
        for name, idx_cpu in groups:
            idx = flat[offset:offset + len(idx_cpu)]
            offset += len(idx_cpu)
            sub, rows = x.index_select(0, idx), p.index_select(0, idx)
            if name in _JITTER:
                sub = _JITTER[name](sub, rows[:, _COL[name]])
            elif name == "grayscale":
                sub = _gray(sub).expand_as(sub)
            elif name == "blur":
                radius = max(1, math.ceil(3.0 * float(sigma[idx_cpu].max())))
                sub = gaussian_blur(sub, rows[:, _COL["blur_sigma"]], radius)
            else:  # PIL's solarize(threshold=128) inverts every byte >= 128
                sub = torch.where(sub >= 128 / 255, 1.0 - sub, sub)
            x = x.index_copy(0, idx, sub)
        return (x - self.mean) / self.std

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> list[torch.Tensor]:
        """``images`` (B, 3, P, P) uint8 on the device, ``params`` (B, V, NPARAM) on the CPU (pinned memory
        makes the one copy to the device asynchronous)."""
        p = params.to(images.device, non_blocking=True)
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        source = images.float()  # once for all views (grid_sample reads floats)
        return [self.view(source, params[:, v], p[:, v]) for v in range(params.shape[1])]
