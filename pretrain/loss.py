"""The DINO self-distillation loss with teacher centring and sharpening.

Shapes: B images per process, V crops per image (2 global first, then local), K prototypes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class LossTerms:
    """The loss of one step and the quantities that show collapse (Caron et al. 2021, Fig. 7)."""

    loss: torch.Tensor  # scalar, differentiable: mean cross-entropy H(P_t, P_s) over view pairs
    teacher_entropy: torch.Tensor  # scalar: mean entropy h(P_t) of the teacher distributions
    kl: torch.Tensor  # scalar: loss - teacher_entropy = mean KL(P_t || P_s) over view pairs

    @property
    def diagnostics(self) -> dict[str, torch.Tensor]:
        """The detached scalars the log records beside the loss (keys of log.jsonl)."""
        return {"teacher_entropy": self.teacher_entropy, "kl": self.kl}


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher and student distributions (Caron et al. 2021, Eq. 1-3).

    P_t = softmax((g_t(x) - c) / tau_t), P_s = softmax(g_s(x') / tau_s); the loss averages
    H(P_t(x_i), P_s(x_j)) = -sum_k P_t log P_s over all pairs of a teacher (global) view i and a different
    student view j. The centre c is an EMA of the teacher's mean output (Eq. 4):
    c <- m c + (1 - m) mean_batch g_t, averaged over all processes.

    Args:
        out_dim: K.
        ncrops: V, views the student sees per image (2 global + local).
        student_temp: tau_s (0.1).
        center_momentum: m (0.9).
    """

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float,
                update_center: bool = True) -> LossTerms:
        """student_out: (V * B, K) crop-major; teacher_out: (2 * B, K) for the two global views."""
        student_out = student_out.float()
        teacher_out = teacher_out.float()
        student_logp = F.log_softmax(student_out / self.student_temp, dim=-1).chunk(self.ncrops)
        teacher_p = F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach()
        teacher_views = teacher_p.chunk(2)
        total, n_terms = student_out.new_zeros(()), 0
        for i, p_t in enumerate(teacher_views):
            for j, logp_s in enumerate(student_logp):
                if j == i:
                    continue  # the same view seen by both networks: no pair
                total = total + torch.sum(-p_t * logp_s, dim=-1).mean()
                n_terms += 1
        loss = total / n_terms
        entropy = -(teacher_p * torch.log(teacher_p.clamp_min(1e-30))).sum(-1).mean()
        if update_center:
            self.update_center(teacher_out)
        return LossTerms(loss, entropy.detach(), loss.detach() - entropy.detach())

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the teacher's batch mean; the mean runs over the global batch (all processes)."""
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)
        count = float(teacher_out.shape[0])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            # the batch sizes summed over processes, without a copy from host memory (which would wait for
            # the device): torch.full launches a fill with the number as its argument
            total = torch.full((1,), count, device=teacher_out.device)
            dist.all_reduce(total)
            batch_center = batch_sum / total
        else:
            batch_center = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
