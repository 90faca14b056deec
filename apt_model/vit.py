"""`APTViT`: a timm Vision Transformer that runs packed, variable-length, multi-scale token sequences.

It reuses the timm model's own modules (blocks, norms, head, class/register tokens, positional
embedding, patch projection) and adds only the APT embedding parameters, so a timm checkpoint loads
as is and, with no large patches, the outputs equal the timm model's.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import PackedContext, packed_block
from .backbone import APTBackbone
from .dense import to_dense
from .embed import check_batch, scatter_embeddings
from .packed import PackedBatchLike, compute_dtype, device_index, segment_ids, segment_starts
from .pos_embed import gather_pos_embed


def check_vit_supported(model: nn.Module) -> None:
    """``TypeError`` unless ``model`` is a timm ``VisionTransformer`` that `APTViT` supports (timm's
    ``Block``/``Attention`` layout, no attention-pool head, no patch dropout)."""
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
            raise TypeError(f"block {i} is {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}; "
                            "APT supports timm's Block/Attention (fused qkv) layout")
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError("attention-pool heads ('map') are not supported on packed sequences yet")
    pp = getattr(model, "patch_drop", None)
    if pp is not None and not isinstance(pp, nn.Identity) and getattr(pp, "prob", 0.0) > 0:
        raise TypeError("patch dropout is not supported by APT models")


class APTViT(APTBackbone):
    """A timm ``VisionTransformer`` running packed batches (`PackedBatch`-like objects, duck-typed).

    Args:
        vit: the timm model; its modules (and so its weights) are shared, not copied.
        num_scales: token sizes ``p * 2**s``, ``s < num_scales``.
        attn_backend: one of `apt_model.BACKENDS` (see `apt_model.attention`);
            an attribute, so it can be changed on a built model.
        mean, std: pixel normalisation; default: the timm model's ``pretrained_cfg``.

    ``resize_only = True`` turns the detail path off (the resize-only baseline).
    """

    def __init__(self, vit: nn.Module, num_scales: int = 3, attn_backend: str = "auto",
                 mean: Optional[tuple] = None, std: Optional[tuple] = None):
        super().__init__(vit, num_scales, attn_backend, mean, std,
                         adopt=("cls_token", "reg_token", "pos_embed", "pos_drop", "norm_pre", "blocks", "norm",
                                "fc_norm", "head_drop", "head"))
        self.embed_dim = self.num_features = int(vit.embed_dim)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.no_embed_class = bool(getattr(vit, "no_embed_class", False))
        self.pool_include_prefix = bool(getattr(vit, "pool_include_prefix", False))

    # ------------------------------------------------------------------ embedding
    def _prefix(self) -> Optional[torch.Tensor]:
        parts = [t[0] for t in (self.cls_token, self.reg_token) if t is not None]
        if not parts:
            return None
        prefix = torch.cat(parts)  # [P, D]
        if self.pos_embed is not None and not self.no_embed_class:
            prefix = prefix + self.pos_embed[0, : self.num_prefix_tokens]
        return prefix

    def embed(self, batch: PackedBatchLike) -> torch.Tensor:
        """Packed input sequence ``[L, D]``: prefix tokens, patch embeddings + positions, zero padding."""
        check_batch(batch, self.patch_size, self.num_scales)
        if batch.num_prefix_tokens != self.num_prefix_tokens:
            raise ValueError(f"batch reserves {batch.num_prefix_tokens} prefix tokens per image, the model has "
                             f"{self.num_prefix_tokens} (pack with num_prefix_tokens=model.num_prefix_tokens)")
        patch_pos = None
        if self.pos_embed is not None:
            patch_pos = self.pos_embed[0] if self.no_embed_class else self.pos_embed[0, self.num_prefix_tokens:]
        pos = (gather_pos_embed(patch_pos, self.grid_size, batch.coords, batch.image_sizes, self.patch_size)
               if patch_pos is not None else [None] * batch.num_scales)
        values, index = [], []
        prefix = self._prefix()
        if prefix is not None:
            starts = device_index(segment_starts(batch.seqlens), prefix.device)
            ar = torch.arange(self.num_prefix_tokens, device=starts.device)
            index.append((starts[:, None] + ar).reshape(-1))
            values.append(prefix.repeat(batch.num_images, 1))
        x = scatter_embeddings(self.patch_embed, batch, pos, self.resize_only, values, index)
        return self.norm_pre(self.pos_drop(x))

    # ------------------------------------------------------------------ forward
    def context(self, batch: PackedBatchLike, x: torch.Tensor) -> PackedContext:
        """The attention context; its backend is chosen for the dtype attention will see (under
        autocast the qkv projection's, e.g. bf16, so the flash kernels are picked, not x's fp32)."""
        return PackedContext.from_batch(batch, x.device, self.attn_backend, compute_dtype(x.device, x.dtype))

    def _features(self, batch: PackedBatchLike) -> tuple[torch.Tensor, PackedContext]:
        """Packed output tokens ``[L, D]`` (after the final norm) and the attention context they were
        computed with (its segments: the batch's images, then its padding)."""
        x = self.embed(batch)
        ctx = self.context(batch, x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(packed_block, blk, x, ctx, use_reentrant=False)  # RNG state kept: same drops
            else:
                x = packed_block(blk, x, ctx)
        return self.norm(x), ctx

    def forward_features(self, batch: PackedBatchLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed output tokens ``[L, D]`` (after the final norm) and the segment bounds attention used:
        int32 ``cu_seqlens`` on the tokens' device, ``[B+1]``, or ``[B+2]`` when the batch has padding
        (its segment last); image ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b+1]``."""
        x, ctx = self._features(batch)
        return x, ctx.cu_seqlens

    def pool(self, x: torch.Tensor, batch: PackedBatchLike, pool_type: Optional[str] = None) -> torch.Tensor:
        """Per-image pooling of packed tokens ``[L, D]`` -> ``[B, D]``, as timm's ``global_pool``:
        'token' (the first prefix token), 'avg' / 'max' / 'avgmax' over the image's patch tokens (each
        token counts once, whatever its size; prefix tokens included with ``pool_include_prefix``),
        '' (none: the packed tokens unchanged, padding included)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        B = batch.num_images
        if pool_type == "token":
            return x.index_select(0, device_index(segment_starts(batch.seqlens), x.device))
        if pool_type not in ("avg", "max", "avgmax"):
            raise ValueError(f"global_pool {pool_type!r} is not supported on packed sequences")
        skip = 0 if self.pool_include_prefix else self.num_prefix_tokens
        if any(n <= skip for n in batch.seqlens):
            raise ValueError(f"an image has no patch tokens to pool (seqlens {batch.seqlens})")
        # the rows of every image without its prefix tokens, built from Python ints (no device sync)
        counts = [n - skip for n in batch.seqlens]
        owner = segment_ids(counts, x.device)                                  # [N] image of each pooled row
        shift = [st + skip - c0 for st, c0 in zip(segment_starts(batch.seqlens), segment_starts(counts))]
        rows = torch.arange(sum(counts), device=x.device) + device_index(shift, x.device)[owner]
        tok = x.index_select(0, rows)
        out = []
        if pool_type in ("avg", "avgmax"):
            cnt = device_index(counts, x.device).to(x.dtype)
            out.append(x.new_zeros(B, x.shape[1]).index_add(0, owner, tok) / cnt[:, None])
        if pool_type in ("max", "avgmax"):
            out.append(x.new_full((B, x.shape[1]), float("-inf")).scatter_reduce(
                0, owner[:, None].expand_as(tok), tok, reduce="amax", include_self=True))
        return out[0] if len(out) == 1 else 0.5 * (out[0] + out[1])

    def forward_dense(self, batch: PackedBatchLike) -> Union[torch.Tensor, list[torch.Tensor]]:
        """Dense patch features ``[B, D, H/p, W/p]`` (a list for mixed image sizes): the final-norm
        tokens of `forward_features` with every large token repeated over the cells it covers, which
        equals timm's ``forward_features`` patch grid with no reduction. For dense heads."""
        tokens, _ = self._features(batch)
        return to_dense(tokens, batch)

    def forward_head(self, x: torch.Tensor, batch: PackedBatchLike, pre_logits: bool = False) -> torch.Tensor:
        """Logits ``[B, num_classes]`` (or pooled features with ``pre_logits``)."""
        x = self.pool(x, batch)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, batch: PackedBatchLike) -> torch.Tensor:
        """Logits ``[B, num_classes]`` (``[L, num_classes]`` with ``global_pool=''``)."""
        x, _ = self._features(batch)
        return self.forward_head(x, batch)

    # ------------------------------------------------------------------ helpers
    def no_weight_decay(self) -> set:
        """Parameters timm's optimizer factory keeps out of weight decay (as timm's ViT)."""
        return {"pos_embed", "cls_token", "reg_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style parameter groups (layer decay): stem, then one group per block."""
        return dict(stem=r"^cls_token|^reg_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

