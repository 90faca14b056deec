"""`APTViT`: a timm Vision Transformer that runs packed, variable-length, multi-scale token sequences.

It reuses the timm model's own modules (blocks, norms, head, class/register tokens, positional
embedding, patch projection) and adds only the APT embedding parameters, so a timm checkpoint loads
as is and, with no large patches, the outputs equal the timm model's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import PackedContext, packed_block
from .backbone import APTBackbone
from .dense import to_dense
from .packed import compute_dtype, device_index, segment_ids, segment_starts
from .pos_embed import gather_pos_embed


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

    def embed(self, batch) -> torch.Tensor:
        """Packed input sequence ``[L, D]``: prefix tokens, patch embeddings + positions, zero padding."""
        if batch.patch_size != self.patch_size:
            raise ValueError(f"batch has patch_size {batch.patch_size}, the model {self.patch_size}")
        if batch.num_scales > self.num_scales:
            raise ValueError(f"batch has {batch.num_scales} scales, the model was built for {self.num_scales}")
        if batch.num_prefix_tokens != self.num_prefix_tokens:
            raise ValueError(f"batch reserves {batch.num_prefix_tokens} prefix tokens per image, the model has "
                             f"{self.num_prefix_tokens} (pack with num_prefix_tokens=model.num_prefix_tokens)")
        patch_pos = None
        if self.pos_embed is not None:
            patch_pos = self.pos_embed[0] if self.no_embed_class else self.pos_embed[0, self.num_prefix_tokens:]
        pos = (gather_pos_embed(patch_pos, self.grid_size, batch.coords, batch.image_sizes, self.patch_size)
               if patch_pos is not None else [None] * batch.num_scales)
        if batch.num_images == 0:
            raise ValueError("empty batch: no images")
        values, index = [], []
        prefix = self._prefix()
        if prefix is not None and batch.num_images:
            starts = device_index(segment_starts(batch.seqlens), prefix.device)
            ar = torch.arange(self.num_prefix_tokens, device=starts.device)
            index.append((starts[:, None] + ar).reshape(-1))
            values.append(prefix.repeat(batch.num_images, 1))
        x = scatter_embeddings(self.patch_embed, batch, pos, self.resize_only, values, index)
        return self.norm_pre(self.pos_drop(x))

    # ------------------------------------------------------------------ forward
    def context(self, batch, x: torch.Tensor) -> PackedContext:
        """The attention context; its backend is chosen for the dtype attention will see (under
        autocast the qkv projection's, e.g. bf16, so the flash kernels are picked, not x's fp32)."""
        return PackedContext.from_batch(batch, x.device, self.attn_backend, compute_dtype(x.device, x.dtype))

    def forward_features(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed output tokens ``[L, D]`` (after the final norm) and the batch's ``cu_seqlens``."""
        x = self.embed(batch)
        ctx = self.context(batch, x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(packed_block, blk, x, ctx, use_reentrant=False)  # RNG state kept: same drops
            else:
                x = packed_block(blk, x, ctx)
        return self.norm(x), batch.cu_seqlens

    def pool(self, x: torch.Tensor, batch, pool_type: Optional[str] = None) -> torch.Tensor:
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

    def forward_dense(self, batch):
        """Dense patch features ``[B, D, H/p, W/p]`` (a list for mixed image sizes): the final-norm
        tokens of `forward_features` with every large token repeated over the cells it covers, which
        equals timm's ``forward_features`` patch grid with no reduction. For dense heads."""
        tokens, _ = self.forward_features(batch)
        return to_dense(tokens, batch)

    def forward_head(self, x: torch.Tensor, batch, pre_logits: bool = False) -> torch.Tensor:
        """Logits ``[B, num_classes]`` (or pooled features with ``pre_logits``)."""
        x = self.pool(x, batch)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, batch) -> torch.Tensor:
        x, _ = self.forward_features(batch)
        return self.forward_head(x, batch)

    # ------------------------------------------------------------------ helpers
    def no_weight_decay(self) -> set:
        """Parameters timm's optimizer factory keeps out of weight decay (as timm's ViT)."""
        return {"pos_embed", "cls_token", "reg_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style parameter groups (layer decay): stem, then one group per block."""
        return dict(stem=r"^cls_token|^reg_token|^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


def scatter_embeddings(patch_embed, batch, pos: list, resize_only: bool = False,
                       values: Optional[list] = None, index: Optional[list] = None) -> torch.Tensor:
    """The packed input sequence ``[L, D]``: every scale's patch embeddings (+ ``pos[s]`` where not
    None) and any extra rows (``values`` at ``index``, e.g. prefix tokens) scattered into their
    positions with one ``index_copy``; padding rows stay zero. Shared by the APT models."""
    values, index = list(values or []), list(index or [])
    for s in range(batch.num_scales):
        if batch.pixels[s].shape[0] == 0:
            continue
        e = patch_embed(batch.pixels[s], s, resize_only=resize_only)
        if pos[s] is not None:
            e = e + pos[s].to(e.dtype)
        values.append(e)
        index.append(batch.seq_index[s])
    vals = torch.cat(values) if len(values) > 1 else values[0]
    idx = torch.cat(index) if len(index) > 1 else index[0]
    return vals.new_zeros(batch.seq_len, vals.shape[1]).index_copy(0, idx, vals)
