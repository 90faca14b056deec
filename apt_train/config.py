"""`TrainConfig`: every setting of a training run as one frozen value in four sections (model, data,
optimisation, run), filled from its recipe and validated once, in its constructor.

Built at the command-line edge (`apt_train.cli`, from the flat flag names with `TrainConfig.from_flat`)
or directly in Python; the trainer takes it as given. Hyper-parameters left at ``None`` take the
recipe's value (`apt_train.recipes`). Bad settings raise `SetupError`, a ``ValueError`` whose message
names the setting by its flag (``--max-tokens``), so the CLI can print it as is.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields, replace
from types import SimpleNamespace
from typing import Any, Optional, Sequence

from apt_data import APTConfig
from apt_data.config import TokenBudget
from apt_data.mixing import MixConfig

from .flags import flag_message
from .recipes import RECIPES, apply_recipe

DEFAULT_WORKERS = min(8, os.cpu_count() or 1)  # as apt_data.add_loader_args
_PATHS = ("checkpoint", "data", "val_data", "data_cache", "output", "resume", "masks")
_TUPLES = ("thresholds", "cutmix_minmax")


class SetupError(ValueError):
    """A bad setting or input found while setting up: the tools print it and exit with status 2."""


def _flat(name: str) -> Any:
    """Field metadata: the flat name (argparse dest, checkpoint key) of a section field named otherwise."""
    return {"flat": name}


@dataclass(frozen=True)
class ModelSettings:
    """The network: which timm ViT, its starting weights, head and how it runs."""

    name: str = field(default="vit_tiny_patch16_224", metadata=_flat("model"))
    pretrained: bool = False                # timm's pretrained weights for `name` (timm downloads them)
    checkpoint: Optional[str] = None        # --initial-checkpoint: local timm / APT / trainer weights to start from
    num_classes: Optional[int] = None       # None: the checkpoint's head, else max label of the data + 1
    image_size: Optional[int] = None        # None: the model's
    drop_path: Optional[float] = None
    attn_backend: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    task: str = "classification"            # or "segmentation" (`apt_train.tasks`)
    head: Optional[str] = None              # segmentation: linear or conv (None: the checkpoint's, else linear)


@dataclass(frozen=True)
class DataSettings:
    """What the loaders read and how they batch and augment it."""

    train: Optional[str] = field(default=None, metadata=_flat("data"))     # anything APTLoader reads (required)
    val: Optional[str] = field(default=None, metadata=_flat("val_data"))   # None: no evaluation; "auto": the split beside
    cache: Optional[str] = field(default=None, metadata=_flat("data_cache"))  # URL data: keep read ranges here
    cache_size: str = field(default="10GB", metadata=_flat("data_cache_size"))
    crop_pct: float = 1.0                   # eval centre-crop fraction
    max_tokens: int = 4096
    max_images: Optional[int] = None
    patch_size: Optional[int] = None        # None: the model's
    num_scales: int = 3
    thresholds: Optional[tuple[float, ...]] = None  # None: the scorer's defaults
    scorer: str = "entropy"
    static_shapes: bool = False
    workers: int = DEFAULT_WORKERS
    augment: Optional[bool] = None
    auto_augment: Optional[str] = None      # timm RandAugment string; "none": off
    re_prob: Optional[float] = None
    mixup: Optional[float] = None           # Mixup alpha (0: off), timm's --mixup
    cutmix: Optional[float] = None          # CutMix alpha (0: off), timm's --cutmix
    cutmix_minmax: Optional[tuple[float, ...]] = None  # CutMix box side ratios (min, max) instead of alpha
    mixup_prob: float = 1.0                 # probability that a sample is mixed
    mixup_switch_prob: float = 0.5          # probability of CutMix instead of Mixup when both are on
    strict: bool = False
    max_skip_fraction: float = 0.01         # more bad samples in an epoch stop the run
    masks: Optional[str] = None             # segmentation: the mask folder of --data's images (else ADE20K's layout)
    reduce_zero_label: bool = False         # segmentation: mask id 0 ignored, 1..K -> 0..K-1 (ADE20K)
    void: Optional[tuple[int, ...]] = None  # segmentation: mask ids ignored (CamVid's 11)

    def remote_options(self) -> dict:
        """Options of URL data sources (`apt_data.sources.open_remote`): the local cache, if any."""
        return {} if self.cache is None else {"cache_dir": self.cache, "cache_size": self.cache_size}


@dataclass(frozen=True)
class OptimSettings:
    """The optimisation: recipe, length, learning-rate schedule and regularisation."""

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
    clip_grad: Optional[float] = None       # max gradient norm (None: no clipping)
    train_new_only: bool = False


@dataclass(frozen=True)
class RunSettings:
    """Where the run writes, when it saves, evaluates and logs, and on what device."""

    seed: int = 0
    output: str = "out/train"
    resume: Optional[str] = None            # a checkpoint file, or a folder (its newest checkpoint)
    save_every: int = 500                   # 0: only at the end
    keep_checkpoints: int = 2               # 0: all
    eval_every: int = 0                     # 0: at each epoch end
    overfit_batches: int = 0
    device: str = "auto"
    amp: Optional[bool] = None              # None: on CUDA only
    log_every: int = 10
    log_tensorboard: bool = False           # also log to OUTPUT/tensorboard (needs the tensorboard package)
    quiet: bool = False
    dist_timeout: float = 1800.0


_SECTIONS = {"model": ModelSettings, "data": DataSettings, "optim": OptimSettings, "run": RunSettings}


def _flat_names(section: type) -> dict[str, str]:
    """``{flat name: field name}`` of a section."""
    return {f.metadata.get("flat", f.name): f.name for f in fields(section)}


FLAT_NAMES: dict[str, tuple[str, str]] = {flat: (sec, name) for sec, cls in _SECTIONS.items()
                                          for flat, name in _flat_names(cls).items()}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run, in sections. Flat name ``x_y`` (`from_flat`, `to_dict`, the
    checkpoint's ``"config"``) is the flag ``--x-y`` of ``tools/train.py`` (but ``auto_augment``: ``--aa``,
    ``re_prob``: ``--reprob``, ``checkpoint``: ``--initial-checkpoint``; ``--no-eval`` sets ``val_data=None``).

    The constructor fills the hyper-parameters left at None from ``optim.recipe`` and validates every
    setting that needs no file, model or data (`SetupError`); ``batching`` is the `APTConfig` it built
    (patch size: ``data.patch_size``, else 16). Path-like values are stored as strings and
    ``thresholds`` as a tuple, so the config is hashable.
    """

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)
    batching: APTConfig = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        values = _normalised(self.to_dict())
        try:
            values = apply_recipe(values)
        except ValueError as e:
            raise SetupError(str(e)) from None
        for sec, cls in _SECTIONS.items():
            object.__setattr__(self, sec, cls(**{name: values[flat] for flat, name in _flat_names(cls).items()}))
        object.__setattr__(self, "batching", _validate(self))

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "TrainConfig":
        """The config of flat setting names (argparse dests of ``tools/train.py``; ``no_eval=True``
        sets ``val_data=None``); an unknown name is a `SetupError`."""
        values = dict(values)
        if values.pop("no_eval", False):
            values["val_data"] = None
        unknown = sorted(set(values) - set(FLAT_NAMES))
        if unknown:
            raise SetupError(f"unknown training settings: {', '.join(unknown)}")
        parts: dict[str, dict] = {sec: {} for sec in _SECTIONS}
        for flat, value in values.items():
            sec, name = FLAT_NAMES[flat]
            parts[sec][name] = value
        return cls(**{sec: _SECTIONS[sec](**kw) for sec, kw in parts.items()})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The config `to_dict` gave (checkpoints' ``"config"``); names this version does not know are ignored."""
        return cls.from_flat({k: v for k, v in values.items() if k in FLAT_NAMES})

    def to_dict(self) -> dict[str, Any]:
        """Flat plain values (tuples as lists): JSON-able and ``torch.load(weights_only=True)``-loadable."""
        out = {}
        for sec, cls in _SECTIONS.items():
            part = getattr(self, sec)
            for flat, name in _flat_names(cls).items():
                v = getattr(part, name)
                out[flat] = list(v) if isinstance(v, tuple) else v
        return out

    def __getattr__(self, name: str) -> Any:
        """A flat name other than a section's reads through to its section (``config.max_tokens`` is
        ``config.data.max_tokens``), for code that speaks in flags; ``model`` and ``data`` are sections."""
        where = FLAT_NAMES.get(name)
        if where is None or name.startswith("_"):
            raise AttributeError(f"TrainConfig has no setting {name!r}")
        return getattr(object.__getattribute__(self, where[0]), where[1])

    def flags(self) -> SimpleNamespace:
        """Every setting by its flat (flag) name, for messages."""
        return SimpleNamespace(**self.to_dict())

    def warnings(self) -> list[str]:
        """Settings that run but are probably not what was meant, one line each."""
        out = []
        if self.optim.recipe == "short" and self.model.checkpoint is None:
            out.append("recipe short fine-tunes a trained model for one epoch at lr 1e-6; without --checkpoint the "
                       "model starts from random weights")
        if self.model.compile and not self.data.static_shapes:
            out.append("--compile without --static-shapes: compiled for dynamic sequence lengths after the first change")
        return out

    def with_val_data(self, val: Optional[str]) -> "TrainConfig":
        """This config with ``data.val`` resolved (``"auto"`` to a path or None); nothing to validate again."""
        new = copy.copy(self)
        object.__setattr__(new, "data", replace(self.data, val=val))
        return new

    def batching_for(self, patch_size: int) -> APTConfig:
        """``batching`` at the model's ``patch_size`` (the same object when it is already that size)."""
        b = self.batching
        return b if b.patch_size == patch_size else replace(b, patch_size=patch_size)


def _normalised(values: dict[str, Any]) -> dict[str, Any]:
    """Paths as strings, thresholds and CutMix bounds as float tuples."""
    for name in _PATHS:
        if values[name] is not None and not isinstance(values[name], str):
            values[name] = os.fspath(values[name])
    if values.get("void") is not None:
        values["void"] = tuple(int(v) for v in values["void"])
    for name in _TUPLES:
        if values[name] is not None:
            try:
                values[name] = tuple(float(t) for t in values[name])
            except (TypeError, ValueError):
                raise SetupError(f"--{name.replace('_', '-')}: expected numbers, got {values[name]!r}") from None
    return values


def loader_config(*, patch_size: int, num_scales: int = 3, thresholds: Optional[Sequence[float]] = None,
                  scorer: str = "entropy", max_tokens: int = 4096, max_images: Optional[int] = None) -> APTConfig:
    """`APTConfig` for these batching settings (``thresholds=None``: the scorer's defaults) after checking
    the budget; a bad value or combination raises `SetupError` naming the flag."""
    try:
        TokenBudget(max_tokens=max_tokens, max_images=max_images)  # the budget's own checks
        return APTConfig(patch_size=patch_size, num_scales=num_scales, scorer=scorer,
                         thresholds=None if thresholds is None else tuple(thresholds))
    except ValueError as e:
        raise SetupError(flag_message(e)) from None


def _validate(config: TrainConfig) -> APTConfig:
    """Check the settings that need no file, model or data; returns the run's `APTConfig`."""
    d, o, r = config.data, config.optim, config.run
    if not d.train:
        raise SetupError("no training data: set --data (TrainConfig.data.train)")
    if config.model.task not in ("classification", "segmentation"):
        raise SetupError(f"--task {config.model.task!r}: not one of classification, segmentation")
    if config.model.head not in (None, "linear", "conv"):
        raise SetupError(f"--head {config.model.head!r}: not one of linear, conv")
    for name, v in (("epochs", o.epochs), ("steps", o.steps)):
        if v is not None and v <= 0:
            raise SetupError(f"--{name} must be positive, got {v}")
    for name, v in (("warmup_steps", o.warmup_steps), ("overfit_batches", r.overfit_batches),
                    ("save_every", r.save_every), ("eval_every", r.eval_every), ("log_every", r.log_every),
                    ("workers", d.workers)):
        if v is not None and v < 0:
            raise SetupError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    batching = loader_config(patch_size=d.patch_size or 16, num_scales=d.num_scales, thresholds=d.thresholds,
                             scorer=d.scorer, max_tokens=d.max_tokens, max_images=d.max_images)
    mix_config(config, 2)  # the mixing settings alone (the class count is known only with the model)
    if d.cache is not None:
        from apt_data.sources.cache import parse_size

        try:
            parse_size(d.cache_size)
        except ValueError as e:
            raise SetupError(f"--data-cache-size: {e}") from None
    check_device(r.device)
    return batching


def mix_config(config: TrainConfig, num_classes: int) -> Optional[MixConfig]:
    """The loader's `MixConfig` of these settings (None: no mixing); a bad value raises `SetupError`."""
    d = config.data
    if not (d.mixup or d.cutmix or d.cutmix_minmax):
        return None
    try:
        return MixConfig(mixup_alpha=d.mixup or 0.0, cutmix_alpha=d.cutmix or 0.0, cutmix_minmax=d.cutmix_minmax,
                         prob=d.mixup_prob, switch_prob=d.mixup_switch_prob,
                         label_smoothing=config.optim.label_smoothing or 0.0, num_classes=num_classes)
    except ValueError as e:
        raise SetupError(f"--mixup/--cutmix settings: {e}") from None


def check_device(device: str) -> None:
    """``--device cuda`` on a machine without CUDA is a `SetupError` (one line, not a CUDA traceback)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SetupError("--device cuda but CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu or --device auto")


__all__ = ["DataSettings", "FLAT_NAMES", "ModelSettings", "OptimSettings", "RECIPES", "RunSettings", "SetupError",
           "TrainConfig", "check_device", "loader_config", "mix_config"]
