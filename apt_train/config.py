"""`TrainConfig`: every setting of a training run as one frozen, typed value, and its validation.

Built at the command-line edge (`apt_train.cli`) or directly in Python; the trainer reads nothing
else. Hyper-parameters left at ``None`` take the recipe's value (`apt_train.recipes.apply_recipe`).
Bad settings raise `SetupError`, a ``ValueError`` whose message names the setting by its flag
(``--max-tokens``), so the CLI can print it as is.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace
from typing import Any, Optional, Sequence

from apt_data import APTConfig
from apt_data.mixing import MixConfig

from .flags import config_from_args, flag_message

DEFAULT_WORKERS = min(8, os.cpu_count() or 1)  # as apt_data.add_loader_args
_PATHS = ("checkpoint", "data", "val_data", "data_cache", "output", "resume")


class SetupError(ValueError):
    """A bad setting or input found while setting up: the tools print it and exit with status 2."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; field ``x_y`` is the flag ``--x-y`` of ``tools/train.py`` (but
    ``auto_augment``: ``--aa``, ``re_prob``: ``--reprob``, ``checkpoint``: ``--initial-checkpoint``, and
    ``--no-eval`` sets ``val_data=None``).

    ``data`` is required (no default dataset); ``val_data=None`` skips evaluation. Path-like values
    are stored as strings and ``thresholds`` as a tuple, so the config is hashable and `to_dict`
    gives plain values (what checkpoints store under ``"config"``).
    """

    # model and data
    model: str = "vit_tiny_patch16_224"
    pretrained: bool = False                # timm's pretrained weights for `model` (timm downloads them)
    checkpoint: Optional[str] = None        # --initial-checkpoint: local timm / APT / trainer weights to start from
    num_classes: Optional[int] = None       # None: the checkpoint's head, else max label of `data` + 1
    data: Optional[str] = None              # anything APTLoader reads
    val_data: Optional[str] = None          # None: no evaluation; "auto": the val split beside `data`, if any
    data_cache: Optional[str] = None        # URL data: keep read byte ranges in this local folder (RangeCache)
    data_cache_size: str = "10GB"           # its bound
    crop_pct: float = 1.0                   # eval centre-crop fraction
    attn_backend: str = "auto"
    # batching (the flags of apt_data.add_loader_args)
    max_tokens: int = 4096
    max_images: Optional[int] = None
    patch_size: Optional[int] = None        # None: the model's
    num_scales: int = 3
    thresholds: Optional[tuple[float, ...]] = None  # None: the scorer's defaults
    scorer: str = "entropy"
    static_shapes: bool = False
    workers: int = DEFAULT_WORKERS
    image_size: Optional[int] = None        # None: the model's
    # recipe: None takes the recipe's value
    recipe: str = "sample"
    epochs: Optional[int] = None
    steps: Optional[int] = None             # a cap on optimiser steps (the schedule spans them)
    lr: Optional[float] = None              # absolute peak lr (beats blr)
    blr: Optional[float] = None             # lr = blr * images_per_step / 256
    min_lr: Optional[float] = None
    warmup_epochs: Optional[float] = None
    warmup_steps: Optional[int] = None      # beats warmup_epochs
    weight_decay: Optional[float] = None
    layer_decay: Optional[float] = None
    label_smoothing: Optional[float] = None
    drop_path: Optional[float] = None
    clip_grad: Optional[float] = None       # max gradient norm (None: no clipping)
    augment: Optional[bool] = None
    auto_augment: Optional[str] = None      # timm RandAugment string; "none": off
    re_prob: Optional[float] = None
    mixup: Optional[float] = None           # Mixup alpha (0: off), timm's --mixup
    cutmix: Optional[float] = None          # CutMix alpha (0: off), timm's --cutmix
    cutmix_minmax: Optional[tuple[float, ...]] = None  # CutMix box side ratios (min, max) instead of alpha
    mixup_prob: float = 1.0                 # probability that a sample is mixed
    mixup_switch_prob: float = 0.5          # probability of CutMix instead of Mixup when both are on
    train_new_only: bool = False
    # run
    seed: int = 0
    output: str = "out/train"
    resume: Optional[str] = None            # a checkpoint file, or a folder (its newest checkpoint)
    save_every: int = 500                   # 0: only at the end
    keep_checkpoints: int = 2               # 0: all
    eval_every: int = 0                     # 0: at each epoch end
    overfit_batches: int = 0
    device: str = "auto"
    amp: Optional[bool] = None              # None: on CUDA only
    compile: bool = False
    grad_checkpointing: bool = False
    strict: bool = False
    max_skip_fraction: float = 0.01      # more bad samples in an epoch stop the run
    log_every: int = 10
    log_tensorboard: bool = False           # also log to OUTPUT/tensorboard (needs the tensorboard package)
    quiet: bool = False
    dist_timeout: float = 1800.0

    def __post_init__(self) -> None:
        for name in _PATHS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, os.fspath(value))
        for name in ("thresholds", "cutmix_minmax"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(t) for t in getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists): JSON-able and ``torch.load(weights_only=True)``-loadable."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The config `to_dict` gave (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def remote_options(self) -> dict:
        """Options of URL data sources (`apt_data.sources.open_remote`): the local cache, if any."""
        return {} if self.data_cache is None else {"cache_dir": self.data_cache, "cache_size": self.data_cache_size}

    def apt_config(self, patch_size: Optional[int] = None) -> APTConfig:
        """The batching `APTConfig` (``patch_size`` defaults to this config's, else 16); raises `SetupError`."""
        return loader_config(patch_size=patch_size or self.patch_size or 16, num_scales=self.num_scales,
                             thresholds=self.thresholds, scorer=self.scorer, max_tokens=self.max_tokens,
                             max_images=self.max_images)


def loader_config(*, patch_size: int, num_scales: int = 3, thresholds: Optional[Sequence[float]] = None,
                  scorer: str = "entropy", max_tokens: int = 4096, max_images: Optional[int] = None) -> APTConfig:
    """`APTConfig` for these batching settings (``thresholds=None``: the scorer's defaults, as
    `apt_data.config_from_args`); a bad value or combination raises `SetupError` naming the flag."""
    settings = SimpleNamespace(patch_size=patch_size, num_scales=num_scales, scorer=scorer, max_tokens=max_tokens,
                               max_images=max_images, thresholds=None if thresholds is None else list(thresholds))
    try:
        return config_from_args(settings)
    except ValueError as e:
        raise SetupError(flag_message(e)) from None


def validate(config: TrainConfig) -> TrainConfig:
    """Check the settings that need no file, model or data (counts, batching); returns ``config``.

    Call it on a config the recipe was applied to (`apply_recipe`): unset hyper-parameters are skipped.
    """
    if not config.data:
        raise SetupError("no training data: set --data (TrainConfig.data)")
    for name in ("epochs", "steps"):
        v = getattr(config, name)
        if v is not None and v <= 0:
            raise SetupError(f"--{name} must be positive, got {v}")
    for name in ("warmup_steps", "overfit_batches", "save_every", "eval_every", "log_every"):
        v = getattr(config, name)
        if v is not None and v < 0:
            raise SetupError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    config.apt_config()
    mix_config(config, 2)  # the mixing settings alone (the class count is known only with the model)
    if config.data_cache is not None:
        from apt_data.sources.cache import parse_size

        try:
            parse_size(config.data_cache_size)
        except ValueError as e:
            raise SetupError(f"--data-cache-size: {e}") from None
    check_device(config.device)
    return config


def mix_config(config: TrainConfig, num_classes: int) -> Optional[MixConfig]:
    """The loader's `MixConfig` of these settings (None: no mixing); a bad value raises `SetupError`."""
    if not (config.mixup or config.cutmix or config.cutmix_minmax):
        return None
    try:
        return MixConfig(mixup_alpha=config.mixup or 0.0, cutmix_alpha=config.cutmix or 0.0,
                         cutmix_minmax=config.cutmix_minmax, prob=config.mixup_prob,
                         switch_prob=config.mixup_switch_prob, label_smoothing=config.label_smoothing or 0.0,
                         num_classes=num_classes)
    except ValueError as e:
        raise SetupError(f"--mixup/--cutmix settings: {e}") from None


def check_device(device: str) -> None:
    """``--device cuda`` on a machine without CUDA is a `SetupError` (one line, not a CUDA traceback)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SetupError("--device cuda but CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu or --device auto")
