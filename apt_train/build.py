"""Model and config set-up shared by the tools, with errors a user can act on (no deep tracebacks)."""
from __future__ import annotations

import argparse
import os
from typing import Optional

from pathlib import Path

from apt_data import APTConfig, add_loader_args, config_from_args
from apt_model import APTViT, from_timm
from apt_model.convert import load_apt_checkpoint


ROOT = Path(__file__).resolve().parents[1]


class SetupError(ValueError):
    """A bad flag or input found while setting up: the tools print it and exit with status 2."""


def checkpoint_num_classes(state: dict) -> Optional[int]:
    """Classes of the head in a timm or APT state dict (None when it has no head)."""
    w = state.get("head.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def build_model(name: str, *, checkpoint: Optional[str] = None, num_classes: Optional[int] = None,
                image_size: Optional[int] = None, num_scales: int = 3, drop_path: float = 0.0,
                attn_backend: str = "auto") -> APTViT:
    """`from_timm` (never downloads) with checks turned into `SetupError` messages.

    ``num_classes=None``: the checkpoint's head size, else the timm default. ``image_size=None``: the
    model's own.
    """
    import timm

    if not timm.is_model(name):
        raise SetupError(f"unknown timm model {name!r} (list them with timm.list_models('vit_*'))")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise SetupError(f"checkpoint {checkpoint} does not exist")
    state = None
    if checkpoint is not None:
        from timm.models import load_state_dict

        try:
            state = load_state_dict(checkpoint)  # read once: the head size here, the weights below
        except Exception as e:
            raise SetupError(f"checkpoint {checkpoint} cannot be read: {e}") from None
        ckpt_classes = checkpoint_num_classes(state)
        if num_classes is None:
            num_classes = ckpt_classes
        elif ckpt_classes is not None and ckpt_classes != num_classes:
            raise SetupError(f"checkpoint {checkpoint} has a {ckpt_classes}-class head but the data has "
                             f"{num_classes} classes; pass --num-classes {ckpt_classes} if the labels are the "
                             f"checkpoint's classes")
    kw = {"drop_path_rate": drop_path}
    if num_classes is not None:
        kw["num_classes"] = int(num_classes)
    if image_size is not None:
        kw["img_size"] = int(image_size)
    try:
        apt = from_timm(name, num_scales=num_scales, attn_backend=attn_backend, **kw)
        if checkpoint is not None:
            load_apt_checkpoint(apt, checkpoint, state=state)
        return apt
    except (TypeError, ValueError, RuntimeError, FileNotFoundError) as e:
        raise SetupError(f"model {name!r}: {e}") from None


def model_image_size(model: APTViT) -> int:
    """The square training resolution the model was built for."""
    return int(model.grid_size[0]) * int(model.patch_size)


def check_config_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Validate the loader flags before any model is built (``--patch-size`` unset: checked as 16)."""
    ps = args.patch_size
    if ps is None:
        args.patch_size = 16
    try:
        config_from_args(args, parser)
    finally:
        args.patch_size = ps


def config_for_model(args: argparse.Namespace, parser: argparse.ArgumentParser, model: APTViT) -> APTConfig:
    """`APTConfig` from the flags with ``--patch-size`` defaulting to the model's (a mismatch is an error)."""
    if args.patch_size is None:
        args.patch_size = model.patch_size
    elif args.patch_size != model.patch_size:
        parser.error(f"--patch-size {args.patch_size} but the model's patch size is {model.patch_size}")
    if args.num_scales > model.num_scales:
        parser.error(f"--num-scales {args.num_scales} > the model's {model.num_scales}")
    return config_from_args(args, parser)


def infer_num_classes(labels) -> int:
    """Classes of a dataset whose labels are 0..C-1."""
    import numpy as np

    labels = np.asarray(labels)
    if labels.size == 0:
        raise SetupError("the dataset has no samples")
    if labels.min() < 0:
        raise SetupError(f"negative label {labels.min()} in the dataset")
    return int(labels.max()) + 1


def add_eval_args(ap: argparse.ArgumentParser) -> None:
    """Flags shared by tools/evaluate.py and tools/sweep.py."""
    ap.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name (pretrained=False)")
    ap.add_argument("--checkpoint", default=None,
                    help="local timm or APT weights: a file, or a training output folder (its newest checkpoint)")
    ap.add_argument("--num-classes", type=int, default=None,
                    help="default: the checkpoint's head, else max label of --data + 1")
    ap.add_argument("--data", default=str(ROOT / "shards") + ":val", help="shards[:split], index or image folder")
    ap.add_argument("--crop-pct", type=float, default=1.0, help="eval centre-crop fraction (shards are pre-cropped)")
    ap.add_argument("--attn-backend", default="auto")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: CUDA)")
    ap.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    ap.add_argument("--seed", type=int, default=0, help="model init (no checkpoint) and the random baseline")
    add_loader_args(ap, max_tokens=4096)
    ap.set_defaults(patch_size=None)


def setup_eval(args: argparse.Namespace, ap: argparse.ArgumentParser):
    """(model, cfg, source, info, loader keyword arguments), or exit 2 with a message."""
    import torch

    from apt_data.loader import open_source

    from .dist import init_distributed

    check_config_args(args, ap)
    if args.checkpoint and os.path.isdir(args.checkpoint):  # a training output folder: its newest checkpoint
        from .checkpoint import resolve_checkpoint

        try:
            args.checkpoint = str(resolve_checkpoint(args.checkpoint))
        except FileNotFoundError as e:
            ap.error(str(e))
    info = init_distributed(args.device)
    torch.manual_seed(args.seed)
    try:
        source = open_source(args.data)
        num_classes = args.num_classes or (None if args.checkpoint else infer_num_classes(source.labels))
        model = build_model(args.model, checkpoint=args.checkpoint, num_classes=num_classes,
                            image_size=args.image_size, num_scales=args.num_scales,
                            attn_backend=args.attn_backend).to(info.device).eval()
    except (SetupError, ValueError, OSError) as e:
        ap.error(str(e))
    cfg = config_for_model(args, ap, model)
    kw = dict(max_tokens=args.max_tokens, max_images=args.max_images, image_size=model_image_size(model),
              num_prefix_tokens=model.num_prefix_tokens, num_workers=args.workers, crop_pct=args.crop_pct)
    return model, cfg, source, info, kw
