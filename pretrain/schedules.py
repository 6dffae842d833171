"""Learning rate, weight decay, teacher momentum and teacher temperature as functions of the global step.

A global step is one optimiser update over the global batch (all processes together), so a run on one
CPU and a run on eight GPUs with the same global batch follow the same curves. Closed forms, with
``s`` the step, ``S`` the total number of steps and ``W`` the warm-up steps:

    warm-up   (s < W):  v(s) = v_start + (v_base - v_start) * s / W
    cosine    (s >= W): v(s) = v_final + (v_base - v_final) * (1 + cos(pi * (s - W) / (S - W))) / 2
    teacher temperature: t(s) = t_start + (t_end - t_start) * min(1, s / W_t)

as in facebookresearch/dino (``utils.cosine_scheduler``, per-epoch teacher-temperature warm-up there,
per-step here).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import PretrainConfig


def cosine_schedule(step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0,
                    start_warmup: float = 0.0) -> float:
    """Linear warm-up from ``start_warmup`` to ``base`` over ``warmup_steps``, then cosine to ``final``."""
    if step < warmup_steps:
        return start_warmup + (base - start_warmup) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then constant ``end``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@dataclass(frozen=True)
class StepValues:
    """The scheduled values of one global step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


@dataclass(frozen=True)
class Schedules:
    """All DINO schedules of a run; ``at(step)`` gives the values of one global step."""

    total_steps: int
    base_lr: float  # already scaled by the global batch: lr * batch / 256
    min_lr: float
    lr_warmup_steps: int
    wd_start: float
    wd_end: float
    momentum_start: float
    momentum_end: float
    temp_start: float
    temp_end: float
    temp_warmup_steps: int

    @classmethod
    def from_config(cls, cfg: PretrainConfig, steps_per_epoch: int) -> "Schedules":
        total = cfg.epochs * steps_per_epoch
        # A run shorter than its warm-ups warms up over the whole run instead of never leaving the warm-up.
        return cls(
            total_steps=total,
            base_lr=cfg.lr * cfg.batch_size / 256.0,  # linear scaling rule (Goyal et al. 2017), as in DINO
            min_lr=cfg.min_lr,
            lr_warmup_steps=min(total, round(cfg.warmup_epochs * steps_per_epoch)),
            wd_start=cfg.weight_decay, wd_end=cfg.weight_decay_end,
            momentum_start=cfg.momentum_teacher, momentum_end=cfg.momentum_teacher_end,
            temp_start=cfg.warmup_teacher_temp, temp_end=cfg.teacher_temp,
            temp_warmup_steps=min(total, round(cfg.warmup_teacher_temp_epochs * steps_per_epoch)))

    def fitted(self, total_steps: int) -> "Schedules":
        """The same schedules over ``total_steps`` instead: the warm-ups keep their fraction of the run (a run
        stopped on the clock fits its curves to the steps that fit, see ``--time-limit``)."""
        total_steps = max(1, int(total_steps))
        scale = total_steps / max(1, self.total_steps)
        return dataclasses.replace(
            self, total_steps=total_steps,
            lr_warmup_steps=min(total_steps, round(self.lr_warmup_steps * scale)),
            temp_warmup_steps=min(total_steps, round(self.temp_warmup_steps * scale)))

    def at(self, step: int) -> StepValues:
        return StepValues(
            lr=cosine_schedule(step, self.total_steps, self.base_lr, self.min_lr, self.lr_warmup_steps),
            weight_decay=cosine_schedule(step, self.total_steps, self.wd_start, self.wd_end),
            momentum=cosine_schedule(step, self.total_steps, self.momentum_start, self.momentum_end),
            teacher_temp=linear_warmup(step, self.temp_warmup_steps, self.temp_start, self.temp_end))
