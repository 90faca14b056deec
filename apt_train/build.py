"""Building a run's model (and its transform) from explicit settings, with errors a user can act on (`SetupError`)."""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from apt_data import APTConfig, ImageTransform
from apt_model import APTViT, from_timm
from apt_model.convert import load_apt_checkpoint

from .config import SetupError

log = logging.getLogger("apt_train")

__all__ = ["SetupError", "build_model", "build_run_model", "checkpoint_num_classes", "compile_blocks", "infer_num_classes",
           "model_image_size", "model_patch_size", "train_transform"]


def checkpoint_num_classes(state: dict) -> Optional[int]:
    """Classes of the head in a timm or APT state dict (None when it has no head)."""
    w = state.get("head.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def _read_weights(checkpoint: str) -> dict:
    """The state dict of a local weights file, picked as timm's ``load_state_dict`` picks it; a trainer
    checkpoint's tensor checksums are verified. Any failure is one line (`SetupError`)."""
    from timm.models import load_state_dict
    from timm.models._helpers import clean_state_dict

    from .checkpoint import read_checkpoint_file, verify_checkpoint

    if checkpoint.endswith(".safetensors"):
        try:
            return load_state_dict(checkpoint)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            raise SetupError(f"checkpoint {checkpoint} cannot be read: {type(e).__name__}: {msg}") from None
    raw = read_checkpoint_file(checkpoint)  # CheckpointError (a SetupError): one line, naming the file
    verify_checkpoint(checkpoint, raw)
    if not isinstance(raw, dict):
        raise SetupError(f"checkpoint {checkpoint} holds a {type(raw).__name__}, not a state dict")
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm's order (use_ema=True)
        if raw.get(key) is not None:
            raw = raw[key]
            break
    return clean_state_dict(raw)


def _checkpoint_state(checkpoint: str, num_classes: Optional[int], reset_head: bool,
                      explicit_classes: bool) -> tuple[dict, Optional[int]]:
    """(the weights of ``checkpoint`` to load, the head's class count): see `build_model`."""
    state = _read_weights(checkpoint)  # read once: the head size here, the weights in build_model
    ckpt_classes = checkpoint_num_classes(state)
    if num_classes is None:
        num_classes = ckpt_classes
    elif ckpt_classes is not None and ckpt_classes != num_classes:
        if not reset_head and explicit_classes:
            raise SetupError(f"checkpoint {checkpoint} has a {ckpt_classes}-class head but --num-classes is "
                             f"{num_classes}; leave --num-classes out to use the checkpoint's head")
        if not reset_head:
            raise SetupError(f"checkpoint {checkpoint} has a {ckpt_classes}-class head but the data has "
                             f"{num_classes} classes; pass --num-classes {num_classes} to drop the checkpoint's "
                             f"head and train a new one, or --num-classes {ckpt_classes} if the labels are the "
                             f"checkpoint's classes")
        log.info("checkpoint %s: its %d-class head is dropped, a new %d-class head is trained", checkpoint,
                 ckpt_classes, num_classes)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return state, num_classes


def build_model(name: str, *, checkpoint: Optional[str] = None, num_classes: Optional[int] = None,
                image_size: Optional[int] = None, num_scales: int = 3, drop_path: float = 0.0,
                attn_backend: str = "auto", pretrained: bool = False, reset_head: bool = False,
                explicit_classes: bool = False) -> APTViT:
    """`from_timm` with checks turned into `SetupError` messages.

    ``num_classes=None``: the checkpoint's head size, else the timm default. ``image_size=None``: the
    model's own. ``pretrained``: timm's pretrained weights for ``name`` (downloaded by timm; a head of
    another size is re-initialised by timm), then ``checkpoint`` (a local file, never downloaded) on top,
    as timm's ``--pretrained`` / ``--initial-checkpoint``. ``reset_head``: a checkpoint whose head has
    another size than ``num_classes`` loads without its head (a new one is trained, as timm's train.py
    does); otherwise that is a `SetupError` (``explicit_classes``: its message names ``--num-classes``
    rather than the data as where ``num_classes`` came from). A checkpoint with no head at all loads into a new head.
    """
    import timm

    if not timm.is_model(name):
        raise SetupError(f"unknown timm model {name!r} (list them with timm.list_models('vit_*'))")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise SetupError(f"checkpoint {checkpoint} does not exist")
    state = None
    if checkpoint is not None:
        state, num_classes = _checkpoint_state(checkpoint, num_classes, reset_head, explicit_classes)
    kw = {"drop_path_rate": drop_path}
    if num_classes is not None:
        kw["num_classes"] = int(num_classes)
    if image_size is not None:
        kw["img_size"] = int(image_size)
    if pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kw)
        except Exception as e:  # no network, no weights for this name, ...: timm's error in one line
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            raise SetupError(f"--pretrained {name}: timm could not load its pretrained weights "
                             f"({type(e).__name__}: {msg}); pass --initial-checkpoint FILE for local weights") from None
    try:
        apt = from_timm(model if pretrained else name, num_scales=num_scales, attn_backend=attn_backend,
                        **({} if pretrained else kw))
        if checkpoint is not None:
            own = apt.state_dict()
            state = dict(state)
            for key in ("head.weight", "head.bias"):  # no head in the file (or dropped): the new head's init
                if key not in state and key in own:
                    state[key] = own[key]
            load_apt_checkpoint(apt, checkpoint, state=state)
        return apt
    except (TypeError, ValueError, RuntimeError, FileNotFoundError) as e:
        raise SetupError(f"model {name!r}: {e}") from None


def build_run_model(config, labels: Sequence[int], device) -> tuple[APTViT, APTConfig, int]:
    """(model on ``device``, its batching `APTConfig`, its image size) for a `TrainConfig` whose
    training data has ``labels``: the head has ``model.num_classes`` classes, else the checkpoint's,
    else max label + 1."""
    m, d = config.model, config.data
    num_classes = m.num_classes or infer_num_classes(labels)
    model = build_model(m.name, checkpoint=m.checkpoint, num_classes=num_classes, image_size=m.image_size,
                        num_scales=d.num_scales, drop_path=m.drop_path, attn_backend=m.attn_backend,
                        pretrained=m.pretrained, reset_head=m.num_classes is not None).to(device)
    if model.num_classes != num_classes:
        raise SetupError(f"the model has {model.num_classes} classes, the data {num_classes}")
    cfg = config.batching_for(model_patch_size(model, d.patch_size, d.num_scales))
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, cfg, model_image_size(model)


def model_image_size(model: APTViT) -> int:
    """The square training resolution the model was built for."""
    return int(model.grid_size[0]) * int(model.patch_size)


def model_patch_size(model: APTViT, patch_size: Optional[int] = None, num_scales: int = 1) -> int:
    """The base patch size to batch for ``model``: ``patch_size``, or the model's when None. A patch
    size that is not the model's, or more scales than the model has, raises `SetupError`."""
    if patch_size is None:
        patch_size = int(model.patch_size)
    elif patch_size != model.patch_size:
        raise SetupError(f"--patch-size {patch_size} but the model's patch size is {model.patch_size}")
    if num_scales > model.num_scales:
        raise SetupError(f"--num-scales {num_scales} > the model's {model.num_scales}")
    return patch_size


def train_transform(model: APTViT, image_size: int, *, augment: bool = False, auto_augment: Optional[str] = None,
                    re_prob: float = 0.0) -> ImageTransform:
    """The training transform for ``model``: resize only, or (``augment``) RandomResizedCrop + flip +
    RandAugment ``auto_augment`` (None or "none": off) + random erasing filled with the mean colour
    (0 after the model's normalisation)."""
    patch_size = int(model.patch_size)
    if not augment:
        return ImageTransform(size=image_size, multiple=patch_size)
    fill = tuple(int(round(float(v))) for v in model.patch_embed.pixel_mean.flatten())
    aa = None if auto_augment in (None, "", "none") else auto_augment
    return ImageTransform(size=image_size, multiple=patch_size, augment=True, auto_augment=aa, re_prob=re_prob,
                          fill=fill)


def compile_blocks(model: APTViT, static_shapes: bool = False) -> None:
    """``torch.compile`` each block's norms and MLP in place (parameter names unchanged).

    Regional: they see a dense [L, D] tensor (L fixed with ``static_shapes``); compiling the whole
    model recompiles for every batch layout (its image count and lengths are Python ints).
    """
    for blk in model.blocks:
        for name in ("norm1", "norm2", "mlp"):
            getattr(blk, name).compile(dynamic=False if static_shapes else None)


def infer_num_classes(labels: Sequence[int]) -> int:
    """Classes of a dataset whose labels are 0..C-1."""
    import numpy as np

    labels = np.asarray(labels)
    if labels.size == 0:
        raise SetupError("the dataset has no samples")
    if labels.min() < 0:
        raise SetupError(f"negative label {labels.min()} in the dataset")
    return int(labels.max()) + 1
