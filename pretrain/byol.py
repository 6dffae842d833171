"""BYOL's pieces (Grill et al. 2020, "Bootstrap your own latent"): the projector and predictor MLPs, the
online/target head, the symmetrised regression loss, the collapse signature and the two augmentation
pipelines. The loop, the EMA target (``update_teacher``), the momentum schedule 0.996 → 1 (cosine, the
one DINO took from BYOL), checkpoints and exports are those of :mod:`pretrain.train`.

Shapes: B images per process, V = 2 views per image, D backbone width, P = ``out_dim`` of the projector.
Outputs are crop-major like :class:`~pretrain.heads.MultiCropWrapper`'s: (V * B, P), view 0's images first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import MultiCropAugmentation


class BYOLMLP(nn.Module):
    """Linear(in, hidden) → BatchNorm → ReLU → Linear(hidden, out): BYOL's projector and predictor
    (Grill et al. 2020, Sec. 3.3: hidden 4096, output 256).

    The first linear layer has no bias: the batch norm that follows subtracts it anyway.
    x: (N, in_dim) → (N, out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                                    nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BYOLOutput(NamedTuple):
    """What the online network gives per view: its projection z (what the target sees of itself) and its
    prediction q = predictor(z) (what the loss compares with the target's projection). A named tuple, so
    DistributedDataParallel finds the tensors in it."""

    projection: torch.Tensor  # (V * B, P)
    prediction: torch.Tensor  # (V * B, P)


class BYOLHead(nn.Module):
    """Projector, and on the online side the predictor, over the backbone's CLS output.

    The target's head is the same module without predictor; the parameters of both list the projector's
    first, so :func:`pretrain.train.update_teacher` pairs backbone and projector parameters and leaves
    the predictor (the online network's last parameters) to the optimiser alone.

    Online (``predictor=True``): x (N, D) → :class:`BYOLOutput`; target: x (N, D) → z (N, P).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, predictor: bool = True):
        super().__init__()
        self.projector = BYOLMLP(in_dim, hidden_dim, out_dim)
        self.predictor = BYOLMLP(out_dim, hidden_dim, out_dim) if predictor else None

    def forward(self, x: torch.Tensor) -> BYOLOutput | torch.Tensor:
        z = self.projector(x)
        if self.predictor is None:
            return z
        return BYOLOutput(z, self.predictor(z))


@dataclass
class BYOLTerms:
    """The loss of one step and the collapse signature (the counterpart of DINO's LossTerms)."""

    loss: torch.Tensor  # scalar, differentiable: mean over both views of 2 - 2 cos(q, sg(z'))
    output_std: torch.Tensor  # scalar: see :func:`normalised_std`

    @property
    def diagnostics(self) -> dict[str, torch.Tensor]:
        """The detached scalars the log records beside the loss."""
        return {"output_std": self.output_std}


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grill et al. 2020, Eq. 2: ||q̄ - z̄'||² = 2 - 2 cos(q, z') for unit vectors, one value per row.

    prediction, target: (N, P) → (N,). The target carries no gradient (stop-gradient).
    """
    return 2.0 - 2.0 * F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1)


@torch.no_grad()
def normalised_std(z: torch.Tensor) -> torch.Tensor:
    """The collapse signature of Chen & He 2021 (SimSiam, Sec. 4.1): the standard deviation over the batch of
    each dimension of z/||z||, averaged over dimensions and multiplied by √P.

    About 1 when the outputs spread like random directions, 0 when every image gets the same output (the
    collapse the predictor and the EMA target are there to prevent). z: (N, P) → scalar.
    """
    unit = F.normalize(z.float(), dim=-1)
    return unit.std(dim=0).mean() * math.sqrt(z.shape[-1])


class BYOLLoss(nn.Module):
    """BYOL's symmetrised loss (Grill et al. 2020, Eq. 2 and the sum L + L̃ below it, averaged here).

    The online prediction of view 1 regresses the target projection of view 2 and vice versa; both terms
    are averaged over the images. ``forward`` has the call shape of :class:`~pretrain.loss.DINOLoss` (the
    third argument, DINO's teacher temperature, means nothing here) so the loop calls either alike.
    The loss has no state; it is a module so that a checkpoint's ``loss`` entry exists for both methods.
    """

    def forward(self, online: BYOLOutput, target_z: torch.Tensor, teacher_temp: float | None = None) -> BYOLTerms:
        """online: the online head's output for both views; target_z: (2 * B, P) target projections."""
        q1, q2 = online.prediction.chunk(2)
        t1, t2 = target_z.chunk(2)
        loss = 0.5 * (regression_loss(q1, t2).mean() + regression_loss(q2, t1).mean())
        return BYOLTerms(loss, normalised_std(online.projection))


# Below this normalised std (see normalised_std) the online outputs have collapsed: at 0.05 the outputs of
# the images of a batch lie within a few degrees of one another. Healthy runs stay near 0.3-1.
COLLAPSE_STD = 0.05


def byol_augmentation(global_size: int = 224, scale: tuple[float, float] = (0.08, 1.0)) -> MultiCropAugmentation:
    """BYOL's two asymmetric view pipelines (Grill et al. 2020, Appendix B, Table 6) as two global views.

    Both: random resized crop of area ``scale`` (0.08-1), horizontal flip p 0.5, colour jitter brightness
    0.4, contrast 0.4, saturation 0.2, hue 0.1 with p 0.8, grayscale p 0.2. Gaussian blur (sigma 0.1-2.0):
    p 1.0 on view 1, 0.1 on view 2; solarisation: p 0 on view 1, 0.2 on view 2. These are the
    augmentations DINO adopted for its two global views, so the multi-crop machinery (CPU and device
    paths) makes them with no local crops.
    """
    return MultiCropAugmentation(global_size=global_size, local_crops=0, global_scale=scale,
                                 jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2,
                                 blur_p=(1.0, 0.1, 0.0), blur_radius=(0.1, 2.0), solarize_p=0.2)
