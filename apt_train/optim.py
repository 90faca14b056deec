"""Optimiser parameter groups with layer-wise lr decay, and a per-step warmup + cosine schedule.

Layer ids (``L`` = number of blocks): the embedding stage (patch embedding, APT's new parameters,
positions, class/register tokens, ``norm_pre``) is layer 0, block ``i`` is layer ``i + 1``, the
final norm and head are layer ``L + 1``. A group's lr is ``lr * decay ** (L + 1 - layer_id)``: the
head trains at the full lr, the embedding at ``decay ** (L + 1)`` of it. The scale is stored in each
param group as ``lr_scale`` and the scheduler writes ``group["lr"] = lr * group["lr_scale"]`` at
every step (the paper's reference code builds such groups but never applies the scale).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn as nn

_EMBED = ("patch_embed.", "cls_token", "reg_token", "pos_embed", "norm_pre.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def layer_id(name: str, num_layers: int) -> int:
    """Layer id of parameter ``name`` of an `APTViT` (or a timm ViT) with ``num_layers`` blocks."""
    if name.startswith(_EMBED):
        return 0
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 1.0,
                 no_weight_decay: Optional[Iterable[str]] = None) -> list[dict]:
    """AdamW parameter groups: one per (layer id, decay / no decay), each with its ``lr_scale``.

    No weight decay on 1-D parameters (biases, norm weights) and on ``model.no_weight_decay()``
    (positions, class/register tokens). Frozen parameters (``requires_grad=False``) are left out.
    """
    skip = set(no_weight_decay if no_weight_decay is not None else
               (model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()))
    num_layers = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, num_layers)
        decay = not (p.ndim <= 1 or name in skip or name.split(".")[0] in skip)
        g = groups.setdefault((lid, decay), {
            "params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers + 1 - lid), "layer_id": lid})
        g["params"].append(p)
        g["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


class WarmupCosine:
    """Per-step schedule: linear warmup to ``lr`` over ``warmup_steps``, then cosine to ``min_lr`` at
    ``total_steps`` (flat at ``min_lr`` after it). Sets every group's ``lr = lr(step) * lr_scale``.

    ``step_count`` is the number of optimiser steps taken; the groups always hold the lr of the
    next step (so call `step` after ``optimizer.step()``, as with torch's schedulers).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0, step_count: int = 0):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.optimizer, self.base_lr, self.min_lr = optimizer, float(lr), float(min_lr)
        self.total_steps, self.warmup_steps = int(total_steps), max(0, int(warmup_steps))
        self.step_count = int(step_count)
        self.apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    @property
    def lr(self) -> float:
        """Unscaled lr of the next step."""
        return self.lr_at(self.step_count)

    def apply(self) -> None:
        """Write the next step's lr into every param group (after changing the schedule by hand)."""
        lr = self.lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "base_lr": self.base_lr, "min_lr": self.min_lr,
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        for k in ("step_count", "base_lr", "min_lr", "total_steps", "warmup_steps"):
            setattr(self, k, type(getattr(self, k))(state[k]))
        self.apply()


@dataclass(frozen=True)
class SchedulePlan:
    """A run's length and peak lr, fixed at its start (`plan_schedule`)."""

    steps_per_epoch: int
    total_steps: int
    images_per_step: float       # what the lr rule scales by
    lr: float
    warmup: int                  # steps
    eval_epochs: int = 1         # evaluate at every eval_epochs-th epoch end (eval_every 0)
    notes: tuple[str, ...] = ()  # one line for each setting changed to fit the data


MIN_EVAL_STEPS = 5  # epoch-end evaluations at least this many steps apart (a tiny data set's epoch is 1 step)


def plan_schedule(config, loader, world_size: int) -> SchedulePlan:
    """Steps, images per global step, peak lr, warm-up and evaluation cadence of ``config`` (a
    `TrainConfig`) on ``loader``. The epoch length is the loader's; the images per step its mean images
    per batch times ``world_size``, capped at the training images over an epoch's steps (a step never
    holds more: a small set's epoch is a whole pass spread over its steps); the lr
    ``blr * images_per_step / 256`` unless given. On a data set of a few steps per epoch, a warm-up
    given in epochs is capped at half the run and epoch-end evaluations are
    ``MIN_EVAL_STEPS`` apart, each change said in ``notes``. `SetupError` when the data gives no batch."""
    from .config import SetupError

    o, r = config.optim, config.run
    spe = r.overfit_batches or loader.steps_per_epoch()
    if spe == 0:
        raise SetupError("the training data gives no batch")
    notes = []
    budget_images, n = loader.mean_images_per_batch() * world_size, len(loader.source)
    images_per_step = min(budget_images, n / spe)  # an epoch of whole passes spreads them over its steps
    if budget_images > n:
        notes.append(f"lr rule: the token budget fits {budget_images:.2f} images per global step but the training "
                     f"data has {n}: the lr is scaled for {images_per_step:g} images per step")
    elif budget_images > images_per_step:
        notes.append(f"lr rule: the token budget fits {budget_images:.2f} images per global step, but an epoch "
                     f"spreads the {n} training images over {spe} steps: the lr is scaled for "
                     f"{images_per_step:.2f} images per step")
    total = o.epochs * spe
    if o.steps is not None:  # a cap; with overfit_batches (an "epoch" is N batches) the length
        total = o.steps if r.overfit_batches else min(total, o.steps)
    lr = o.lr if o.lr is not None else o.blr * images_per_step / 256
    warmup = o.warmup_steps
    if warmup is None:
        warmup = int(round(o.warmup_epochs * spe))
        if warmup > total // 2 and total > 1:
            notes.append(f"warm-up: {o.warmup_epochs:g} epochs are {warmup} steps of the run's {total}: capped at "
                         f"{total // 2} steps (half the run); --warmup-steps to choose")
            warmup = total // 2
    eval_epochs = 1 if r.eval_every or spe >= MIN_EVAL_STEPS else -(-MIN_EVAL_STEPS // spe)
    if eval_epochs > 1 and total > spe:
        notes.append(f"evaluation: an epoch is {spe} step{'s' if spe > 1 else ''} of at most {budget_images:.0f} "
                     f"images on these {n}, so the run evaluates every {eval_epochs} epochs ({eval_epochs * spe} "
                     "steps) and at the end; --eval-every N to choose")
    return SchedulePlan(spe, total, images_per_step, lr, warmup, eval_epochs, tuple(notes))


def trainable_parameters(model: nn.Module, new_only: bool = False) -> list[nn.Parameter]:
    """The parameters to train: all, or (``new_only``) APT's new ones, the rest frozen."""
    if new_only:
        from .config import SetupError

        new = {id(p) for p in model.apt_parameters()}
        if not new:
            raise SetupError("--train-new-only: the model has no APT parameters (num_scales 1)")
        for p in model.parameters():
            p.requires_grad_(id(p) in new)
    return [p for p in model.parameters() if p.requires_grad]
