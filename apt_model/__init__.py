"""apt_model: the PyTorch half of Adaptive Patch Transformers.

`from_timm` turns a timm ViT into an `APTViT` (or a SAM-style windowed ViT into an `APTWindowedViT`)
that eats packed batches (see apt_data.batch): multi-scale tokens of many images in one sequence,
block-diagonal attention, per-image outputs. This package never imports apt_data; it reads the
batch's documented fields (duck typing).

Modules, one idea each: `patch_embed` (one embedding per token, whatever its size), `pos_embed`
(absolute positions per scale), `embed` (the packed input sequence), `packed` (host-built index
tensors), `attention` (block-diagonal attention backends, timm blocks on packed sequences),
`drop_path` (per-segment stochastic depth), `backbone` (what both models adopt from timm), `vit`
(`APTViT`), `window_plan` / `rel_pos` / `sam_block` / `windowed` (`APTWindowedViT`: host-side window
segments, relative positions for tokens of several sizes, SAM blocks, the model), `dense`
(`to_dense`), `heads` (segmentation heads on the dense map), `convert` (`from_timm` and its table of model families).
"""
from .attention import BACKENDS, PackedContext, flash_attn_varlen, resolve_backend, varlen_attention
from .convert import from_timm
from .dense import dense_features, to_dense
from .heads import SEG_HEADS, ConvSegHead, LinearSegHead, SegmentationModel, create_seg_head
from .patch_embed import APTPatchEmbed
from .vit import APTViT
from .windowed import APTWindowedViT

__all__ = ["APTViT", "APTPatchEmbed", "from_timm", "to_dense", "varlen_attention", "PackedContext", "BACKENDS",
           "resolve_backend", "flash_attn_varlen", "APTWindowedViT", "dense_features",
           "LinearSegHead", "ConvSegHead", "SegmentationModel", "SEG_HEADS", "create_seg_head"]
