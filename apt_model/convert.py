"""`from_timm`: an APT model from a timm model, with its weights, chosen from a table of model families.

Each `ModelFamily` says which timm models it takes (``matches``), which variants it cannot run
(``check``, raising ``TypeError``) and the APT class that wraps them. `FAMILIES` holds, in order:

- ``vit_sam``: timm ``VisionTransformerSAM`` (SAM / ViTDet-style windowed ViTs) -> `APTWindowedViT`;
- ``vit``: timm ``VisionTransformer`` (ViT, DeiT, CLIP/DINOv2-style ViTs) -> `APTViT`.

The first family whose ``matches`` is true wins. A new family (an EVA-style ViT, say) is one
`register_family` call; it is tried before the built-in ones, so it may also claim a subclass of
a model they match::

    from apt_model.convert import ModelFamily, register_family

    def is_eva(model):
        from timm.models.eva import Eva
        return isinstance(model, Eva)

    register_family(ModelFamily("eva", "timm Eva (EVA, EVA-02)", is_eva, check_eva_supported, APTEva))

where ``APTEva(model, num_scales=..., attn_backend=...)`` is an `APTBackbone` subclass and
``check_eva_supported(model)`` raises ``TypeError`` for what it cannot run.

The APT models keep timm's parameter names (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.*``, ``norm``, ``head`` ...) and add only ``patch_embed.down.*`` and
``patch_embed.zero_linear.*``, so a timm checkpoint loads into them as is (the new parameters keep
their average / zero initialisation) and an APT checkpoint loads back exactly.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch.nn as nn

from .backbone import APTBackbone
from .vit import APTViT, check_vit_supported
from .windowed import APTWindowedViT, check_sam_supported

log = logging.getLogger("apt_model")


@dataclass(frozen=True)
class ModelFamily:
    """One kind of timm model `from_timm` converts.

    ``name``: a short id; ``description``: what error messages list as supported; ``matches(model)``:
    whether the model belongs to the family (cheap, e.g. an ``isinstance``; import timm inside it);
    ``check(model)``: raises ``TypeError`` for a variant the APT class cannot run; ``apt_class``:
    called as ``apt_class(model, num_scales=..., attn_backend=...)``, sharing the model's modules.
    """

    name: str
    description: str
    matches: Callable[[nn.Module], bool]
    check: Callable[[nn.Module], None]
    apt_class: Callable[..., APTBackbone]


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _is_sam(model: nn.Module) -> bool:
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    return isinstance(model, VisionTransformerSAM)


FAMILIES: list[ModelFamily] = [
    ModelFamily("vit_sam", "timm VisionTransformerSAM (SAM / ViTDet-style windowed ViTs)", _is_sam,
                check_sam_supported, APTWindowedViT),
    ModelFamily("vit", "timm VisionTransformer models (ViT, DeiT, CLIP/DINOv2-style ViTs)", _is_vit,
                check_vit_supported, APTViT),
]


def register_family(family: ModelFamily, index: int = 0) -> None:
    """Add ``family`` to `FAMILIES` at ``index`` (default: first, before the built-in families), replacing
    any family of the same name."""
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name]
    FAMILIES.insert(index, family)


def family_of(model: nn.Module) -> ModelFamily:
    """The first family of `FAMILIES` that matches ``model``; ``TypeError`` if none does."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise TypeError(f"from_timm supports {'; '.join(f.description for f in FAMILIES)}; got {type(model).__name__}")


def load_apt_checkpoint(apt: APTBackbone, checkpoint_path: str, state: Optional[dict] = None) -> None:
    """Load a timm or an APT checkpoint into ``apt`` (timm's file handling: ``state_dict`` / ``model``
    / EMA wrappers, ``module.`` prefixes, safetensors). Only APT's new parameters may be missing.
    ``state``: the file's state dict when the caller has already read it (the path then only names it)."""
    if state is None:
        from timm.models import load_state_dict

        state = load_state_dict(checkpoint_path)
    state = _fit_positions(apt, state, checkpoint_path)
    try:
        missing, unexpected = apt.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise RuntimeError(f"checkpoint {checkpoint_path} does not fit the model: {e}") from None
    new = {n for n, _ in apt.patch_embed.named_parameters(prefix="patch_embed")
           if n.startswith(("patch_embed.down.", "patch_embed.zero_linear."))}
    wrong = sorted(set(missing) - new)
    if wrong or unexpected:
        raise RuntimeError(f"checkpoint {checkpoint_path} does not fit the model: missing {wrong[:8]}, "
                           f"unexpected {sorted(unexpected)[:8]}")


def _fit_positions(apt: APTBackbone, state: dict, checkpoint_path: str) -> dict:
    """A checkpoint of another resolution: its absolute position table resampled (bicubic) to the model's
    grid, as timm's ``checkpoint_filter_fn`` does (e.g. a 224-px checkpoint fine-tuned at 384 px)."""
    old, own = state.get("pos_embed"), apt.state_dict().get("pos_embed")
    if old is None or own is None or old.dim() != 3 or old.shape == own.shape or old.shape[-1] != own.shape[-1]:
        return state
    prefix = own.shape[1] - math.prod(apt.grid_size)  # class-token positions held in the table (0 or 1)
    old_grid = math.isqrt(old.shape[1] - prefix)
    if prefix < 0 or old_grid * old_grid != old.shape[1] - prefix:
        return state  # not a square table with the model's prefix: load_state_dict reports the mismatch
    from timm.layers import resample_abs_pos_embed

    log.info("checkpoint %s: position table resampled from a %dx%d to the model's %dx%d grid", checkpoint_path,
             old_grid, old_grid, *apt.grid_size)
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(old, list(apt.grid_size), [old_grid, old_grid],
                                                num_prefix_tokens=prefix)
    return state


def from_timm(model_or_name: Union[str, nn.Module], num_scales: int = 3, checkpoint_path: Optional[str] = None,
              attn_backend: str = "auto", **timm_kwargs) -> APTBackbone:
    """Wrap a timm model as an APT model sharing its modules (and weights).

    ``model_or_name``: a timm model instance, used with whatever weights it has; or a model name,
    created by ``timm.create_model(name, **timm_kwargs)`` (e.g. ``img_size``, ``num_classes``,
    ``drop_path_rate``), then loaded from the local ``checkpoint_path`` (a timm or an APT checkpoint)
    if given. ``pretrained`` defaults to False; ``pretrained=True`` is timm's: it downloads the
    weights (timm's error without a network), or reads a local file given as
    ``pretrained_cfg_overlay=dict(file=PATH)``; a ``num_classes`` other than the weights' gets a new head.

    The APT class comes from the model's family (`FAMILIES`): a ``VisionTransformer`` gives an
    `APTViT`; a ``VisionTransformerSAM`` (``samvit_*``: the SAM image encoder, windowed and global
    blocks, relative positions, conv neck) an `APTWindowedViT`. Other models, and variants a family
    cannot run, raise ``TypeError``.
    """
    import timm

    if isinstance(model_or_name, str):
        if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"checkpoint {checkpoint_path} does not exist")
        model = timm.create_model(model_or_name, **{"pretrained": False, **timm_kwargs})
    else:
        if checkpoint_path is not None or timm_kwargs:
            raise ValueError("checkpoint_path and timm keyword arguments are for model names; "
                             "configure and load your instance yourself")
        model = model_or_name
    family = family_of(model)
    family.check(model)
    apt = family.apt_class(model, num_scales=num_scales, attn_backend=attn_backend)
    ref = next(model.parameters(), None)
    if ref is not None:  # the new parts (detail path, buffers) join the wrapped model's device and dtype
        apt.to(device=ref.device, dtype=ref.dtype)
    if checkpoint_path is not None:
        load_apt_checkpoint(apt, checkpoint_path)
    return apt
