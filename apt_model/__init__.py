"""apt_model: the PyTorch half of Adaptive Patch Transformers.

`from_timm` turns a timm ViT into an `APTViT` that eats packed batches (see apt_data.batch):
multi-scale tokens of many images in one sequence, block-diagonal attention, per-image outputs.
This package never imports apt_data; it reads the batch's documented fields (duck typing).
"""
from .attention import BACKENDS, PackedContext, flash_attn_varlen, resolve_backend, varlen_attention
from .convert import from_timm
from .dense import dense_features, to_dense
from .patch_embed import APTPatchEmbed
from .vit import APTViT
from .windowed import APTWindowedViT

__all__ = ["APTViT", "APTPatchEmbed", "from_timm", "to_dense", "varlen_attention", "PackedContext", "BACKENDS",
           "resolve_backend", "flash_attn_varlen", "APTWindowedViT", "dense_features"]
