"""`from_timm`: an `APTViT` from a timm Vision Transformer, with its weights (an `APTWindowedViT`
from a timm ``VisionTransformerSAM``: SAM / ViTDet-style windowed ViTs).

APTViT keeps timm's parameter names (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.*``, ``norm``, ``head`` ...) and adds only ``patch_embed.down.*`` and
``patch_embed.zero_linear.*``, so a timm checkpoint loads into it as is (the new parameters keep
their average / zero initialisation) and an APT checkpoint loads back exactly.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch.nn as nn

from .vit import APTViT
from .windowed import APTWindowedViT


def _check_supported(model: nn.Module) -> None:
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"from_timm supports timm VisionTransformer models (ViT, DeiT, CLIP/DINOv2-style ViTs), "
                        f"got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
            raise TypeError(f"block {i} is {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}; "
                            "APT supports timm's Block/Attention (fused qkv) layout")
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError("attention-pool heads ('map') are not supported on packed sequences yet")
    pp = getattr(model, "patch_drop", None)
    if pp is not None and not isinstance(pp, nn.Identity) and getattr(pp, "prob", 0.0) > 0:
        raise TypeError("patch dropout is not supported by APT models")


def _is_sam(model: nn.Module) -> bool:
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    return isinstance(model, VisionTransformerSAM)


def load_apt_checkpoint(apt: Union[APTViT, APTWindowedViT], checkpoint_path: str,
                        state: Optional[dict] = None) -> None:
    """Load a timm or an APT checkpoint into ``apt`` (timm's file handling: ``state_dict`` / ``model``
    / EMA wrappers, ``module.`` prefixes, safetensors). Only APT's new parameters may be missing.
    ``state``: the file's state dict when the caller has already read it (the path then only names it)."""
    if state is None:
        from timm.models import load_state_dict

        state = load_state_dict(checkpoint_path)
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


def from_timm(model_or_name: Union[str, nn.Module], num_scales: int = 3, checkpoint_path: Optional[str] = None,
              attn_backend: str = "auto", **timm_kwargs) -> Union[APTViT, APTWindowedViT]:
    """Wrap a timm ViT as an APT model sharing its modules (and weights).

    ``model_or_name``: a timm ``VisionTransformer`` instance, used with whatever weights it has; or a
    model name, created with ``pretrained=False`` and ``**timm_kwargs`` (e.g. ``img_size``,
    ``num_classes``, ``drop_path_rate``), then loaded from the local ``checkpoint_path`` (a timm or
    an APT checkpoint) if given. Nothing is ever downloaded.

    A timm ``VisionTransformerSAM`` (``samvit_*``: the SAM image encoder, ViTDet-style windowed and
    global blocks, relative positions, conv neck) gives an `APTWindowedViT` (`apt_model.windowed`).
    """
    import timm

    if isinstance(model_or_name, str):
        if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"checkpoint {checkpoint_path} does not exist")
        timm_kwargs.pop("pretrained", None)
        model = timm.create_model(model_or_name, pretrained=False, **timm_kwargs)
    else:
        if checkpoint_path is not None or timm_kwargs:
            raise ValueError("checkpoint_path and timm keyword arguments are for model names; "
                             "configure and load your instance yourself")
        model = model_or_name
    if _is_sam(model):
        apt = APTWindowedViT(model, num_scales=num_scales, attn_backend=attn_backend)
    else:
        _check_supported(model)
        apt = APTViT(model, num_scales=num_scales, attn_backend=attn_backend)
    ref = next(model.parameters(), None)
    if ref is not None:  # the new parts (detail path, buffers) join the wrapped model's device and dtype
        apt.to(device=ref.device, dtype=ref.dtype)
    if checkpoint_path is not None:
        load_apt_checkpoint(apt, checkpoint_path)
    return apt
