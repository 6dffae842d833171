"""The DINO projection head and the wrapper that runs a backbone + head over multi-crop batches.

Shapes: B images per crop, V crops per image, D backbone width, K = ``out_dim`` prototypes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP projection head of DINO (Caron et al. 2021, Sec. 3.1 and Appendix).

    ``nlayers`` linear layers with GELU (hidden width ``hidden_dim``) map the backbone output to a
    ``bottleneck_dim`` vector that is L2-normalised, then a weight-normalised linear layer without bias
    maps it to ``out_dim`` logits. With ``norm_last_layer`` the weight norm g is fixed to 1 (not trained),
    which the paper found to stabilise training of small models.

    x: (N, in_dim) → (N, out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # the norm g, shape (out_dim, 1)
        g.data.fill_(1.0)
        g.requires_grad = not norm_last_layer

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of possibly different sizes.

    Consecutive crops of the same size are concatenated into one backbone call (two calls for the usual
    2 global + N local crops); the head runs once over all CLS outputs.

    crops: V tensors (B, 3, H_v, W_v) → (V * B, K), crop-major (all images of crop 0 first).
    State-dict keys are ``backbone.*`` and ``head.*``, which :func:`vitdense.backbones.read_weights`
    understands (it keeps ``backbone.``, drops ``head.``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        outputs, start = [], 0
        for end in ends:
            outputs.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(outputs))
