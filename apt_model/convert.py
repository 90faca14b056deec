"""`from_timm`: an `APTViT` from a timm Vision Transformer, with its weights."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch.nn as nn

from .vit import APTViT


def from_timm(model_or_name: Union[str, nn.Module], num_scales: int = 3, checkpoint_path: Optional[str] = None,
              attn_backend: str = "auto", **timm_kwargs) -> APTViT:
    """Wrap a timm ViT (instance, or a name created with ``pretrained=False`` and loaded from a local
    ``checkpoint_path``; never downloads) as an APT model sharing its modules and weights."""
    import timm
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if isinstance(model_or_name, str):
        if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"checkpoint {checkpoint_path} does not exist")
        model = timm.create_model(model_or_name, pretrained=False, **timm_kwargs)
        if checkpoint_path is not None:
            from timm.models import load_checkpoint
            load_checkpoint(model, checkpoint_path)
    else:
        if checkpoint_path is not None:
            raise ValueError("checkpoint_path is for model names; load weights into your instance yourself")
        model = model_or_name
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
    return APTViT(model, num_scales=num_scales, attn_backend=attn_backend)
