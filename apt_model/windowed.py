"""`APTWindowedViT`: APT for windowed ViTs, timm's ``VisionTransformerSAM`` (the SAM image encoder:
ViTDet-style window attention with a few global blocks, decomposed relative positions, a conv neck).

The packed sequence is the batch's (images one after another, tokens of every scale). Global blocks
attend within images, windowed blocks within (image, window) segments; both segmentations are
planned on the host from the batch's CPU coordinates (`apt_model.window_plan`) and run through the
packed-segment machinery of `apt_model.attention` (`apt_model.sam_block`), with SAM's relative
positions extended to tokens of several sizes (`apt_model.rel_pos`). Absolute positions as `APTViT`
(`gather_pos_embed`: scale s reads the table resampled to the scale-s grid). With
``attn_backend="auto"`` windows take ``padded`` on every device (a few bucketed calls instead of one
per window, far less sensitive to a busy CPU) and images what "auto" resolves to (``segments`` on the
CPU). See docs/model.md for the semantics in full.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import PackedContext, resolve_backend
from .backbone import APTBackbone
from .dense import to_dense
from .embed import check_batch, scatter_embeddings
from .packed import PackedBatchLike, compute_dtype
from .pos_embed import gather_pos_embed
from .sam_block import sam_block
from .window_plan import WindowedViTPlan, plan_segments


def check_sam_supported(model: nn.Module) -> None:
    """``TypeError`` unless ``model`` is a timm ``VisionTransformerSAM`` that `APTWindowedViT` supports."""
    from timm.models.vision_transformer_sam import Attention, Block, VisionTransformerSAM

    if not isinstance(model, VisionTransformerSAM):
        raise TypeError(f"expected a timm VisionTransformerSAM, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(f"block {i} is {type(blk).__name__}; APT supports timm SAM's Block/Attention")
        if blk.attn.rope is not None:
            raise TypeError("SAM/ViTDet models with rotary embeddings (use_rope=True) are not supported by APT yet")
    pp = getattr(model, "patch_drop", None)
    if pp is not None and not isinstance(pp, nn.Identity):
        raise TypeError("patch dropout is not supported by APT models")
    pe = model.patch_embed
    if getattr(pe, "flatten", False) or tuple(pe.patch_size) != (pe.patch_size[0],) * 2:
        raise TypeError("APT needs a square NHWC patch embedding")


class APTWindowedViT(APTBackbone):
    """A timm ``VisionTransformerSAM`` (windowed + global blocks, conv neck) running packed APT batches.

    Args as `APTViT`. The timm modules (patch projection, ``pos_embed``, blocks with their
    relative-position tables, ``neck``, ``head``) are shared, not copied; the parameter names are
    timm's plus ``patch_embed.down.*`` / ``patch_embed.zero_linear.*``.

    ``forward_features(batch) -> (tokens [L, D], cu_seqlens)``: the packed output of the last block
    (SAM has no final norm: the neck normalises) and the image segment bounds global attention used.
    ``forward_dense(batch) -> [B, C, H/p, W/p]``: what timm's ``forward_features`` returns (the neck on
    the dense map `to_dense` rebuilds; a list for images of different sizes). ``forward(batch)``: the
    head on that map. Batches must be packed with ``num_prefix_tokens=0`` and windows of
    ``model.window_size`` cells (`apt_data.windows.pack_windowed`).
    """

    def __init__(self, vit: nn.Module, num_scales: int = 3, attn_backend: str = "auto",
                 mean: Optional[tuple] = None, std: Optional[tuple] = None):
        check_sam_supported(vit)
        super().__init__(vit, num_scales, attn_backend, mean, std,
                         adopt=("pos_embed", "pos_drop", "norm_pre", "blocks", "neck", "head"))
        # pos_embed: [1, gh, gw, D] or None
        self.embed_dim = int(vit.embed_dim)
        self.num_features = int(vit.num_features)
        self.num_prefix_tokens = 0

    @property
    def window_sizes(self) -> tuple[int, ...]:
        """The window size (base cells) of every block; 0 = global attention."""
        return tuple(int(blk.window_size) for blk in self.blocks)

    @property
    def window_size(self) -> int:
        """The window size of the windowed blocks (the ``window`` to pack batches with); 0 if none."""
        sizes = sorted({w for w in self.window_sizes if w > 0})
        if len(sizes) > 1:
            raise ValueError(f"blocks use several window sizes {sizes}")
        return sizes[0] if sizes else 0

    # ------------------------------------------------------------------ planning
    def plan(self, batch: PackedBatchLike) -> WindowedViTPlan:
        """Host-side segmentations of ``batch`` for every block type (call it before ``batch.to(device)``
        to keep a CUDA forward free of host-device syncs; `forward` builds it otherwise)."""
        if batch.num_prefix_tokens != 0:
            raise ValueError(f"SAM models have no class token: pack with num_prefix_tokens=0, got "
                             f"{batch.num_prefix_tokens}")
        return plan_segments(batch, self.window_sizes)

    # ------------------------------------------------------------------ embedding
    def embed(self, batch: PackedBatchLike) -> torch.Tensor:
        """Packed input sequence ``[L, D]``: patch embeddings + absolute positions, zero padding rows."""
        check_batch(batch, self.patch_size, self.num_scales)
        pos = [None] * batch.num_scales
        if self.pos_embed is not None:
            patch_pos = self.pos_embed[0].reshape(-1, self.pos_embed.shape[-1])
            pos = gather_pos_embed(patch_pos, self.grid_size, batch.coords, batch.image_sizes, self.patch_size)
        x = scatter_embeddings(self.patch_embed, batch, pos, self.resize_only)
        return self.norm_pre(self.pos_drop(x))

    # ------------------------------------------------------------------ forward
    def _features(self, batch: PackedBatchLike,
                  plan: Optional[WindowedViTPlan] = None) -> tuple[torch.Tensor, PackedContext]:
        """Packed tokens ``[L, D]`` after the last block, and the context of the global (per-image) segments."""
        plan = plan or self.plan(batch)
        if plan.seq_len != batch.seq_len:
            raise ValueError("the plan was made for another batch")
        x = self.embed(batch)
        backend = resolve_backend(self.attn_backend, x.device, compute_dtype(x.device, x.dtype))  # as APTViT.context
        img = plan.segments[0]
        # windows: many short segments, so "auto" takes the bucketed padded path (a few batched calls)
        # on every device; images: the backend "auto" resolves to (one call per image on the CPU)
        wback = "padded" if self.attn_backend == "auto" else backend
        ctxs = {w: seg.context(x.device, wback if w else backend) for w, seg in plan.segments.items()}
        for blk in self.blocks:
            w = int(blk.window_size)
            if w not in plan.segments:
                raise ValueError(f"the plan has no {w}-cell windows (made for another model?)")
            args = (blk, x, plan.segments[w], ctxs[w], img)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(sam_block, *args, use_reentrant=False)
            else:
                x = sam_block(*args)
        return x, ctxs[0]

    def forward_features(self, batch: PackedBatchLike,
                         plan: Optional[WindowedViTPlan] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed tokens ``[L, D]`` after the last block, and the image segment bounds global attention
        used: int32 ``cu_seqlens`` ``[B+1]`` on the tokens' device (``[B+2]`` with padding, its segment last)."""
        x, ctx = self._features(batch, plan)
        return x, ctx.cu_seqlens

    def forward_dense(self, batch: PackedBatchLike,
                      plan: Optional[WindowedViTPlan] = None) -> Union[torch.Tensor, list[torch.Tensor]]:
        """The dense feature map timm's ``forward_features`` returns: ``neck(to_dense(tokens))``,
        ``[B, C, H/p, W/p]`` (a list of ``[C, H_b/p, W_b/p]`` for images of different sizes)."""
        x, _ = self._features(batch, plan)
        dense = to_dense(x, batch)
        if isinstance(dense, list):
            return [self.neck(m[None])[0] for m in dense]
        return self.neck(dense)

    def forward_head(self, dense: Union[torch.Tensor, list[torch.Tensor]], pre_logits: bool = False) -> torch.Tensor:
        """timm's head (pooling over the dense map) -> ``[B, num_classes]``."""
        if isinstance(dense, list):
            return torch.cat([self.head(m[None], pre_logits=pre_logits) for m in dense])
        return self.head(dense, pre_logits=pre_logits)

    def forward(self, batch: PackedBatchLike, plan: Optional[WindowedViTPlan] = None) -> torch.Tensor:
        """timm's head on `forward_dense`: ``[B, num_classes]``."""
        return self.forward_head(self.forward_dense(batch, plan))

    # ------------------------------------------------------------------ helpers
    def no_weight_decay(self) -> set:
        """Parameters timm's optimizer factory keeps out of weight decay."""
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style parameter groups (layer decay): stem, then one group per block."""
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^neck", (99999,))])


__all__ = ["APTWindowedViT", "WindowedViTPlan", "check_sam_supported"]
