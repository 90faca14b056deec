"""The flags of training and evaluation, and the flags-to-config step of the commands.

`apt_train.commands.train` (``apt-train``, ``tools/train.py``) runs `run`; ``apt-eval`` and
``apt-sweep`` use `add_eval_args` and `eval_setup`. Bad settings raise `SetupError` (or the library's
ValueError naming its ``setting``); `apt_train.commands.common.run_command` prints them as one
``<command>: error: ...`` line. The library below never sees argparse.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from signal import Signals
from typing import TYPE_CHECKING, Optional, Sequence

from apt_data import APTConfig

from .config import SetupError, TrainConfig, check_device, loader_config
from .data import AUTO, open_data
from .dist import DistInfo, cleanup, init_distributed
from .flags import add_loader_args
from .interrupt import TrainingInterrupted
from .recipes import RECIPES
from .tasks import backbone_of
from .trainer import Trainer, TrainResult

if TYPE_CHECKING:
    from apt_data.loader import Source
    from apt_model import APTViT

log = logging.getLogger("apt_train")

Argv = Optional[Sequence[str]]


def build_parser(default_data: Optional[str] = None, default_val_data: Optional[str] = None,
                 prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The flags of ``apt-train``; ``default_data`` / ``default_val_data``: the command's datasets."""
    ap = argparse.ArgumentParser(
        prog=prog, description="Fine-tune a timm ViT as an Adaptive Patch Transformer on token-budget batches. "
                                     "Recipe flags left unset take the recipe's value (README.md, 'Training and evaluation').")
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name (default: %(default)s)")
    g.add_argument("--pretrained", action="store_true",
                   help="start from timm's pretrained weights for --model (timm downloads them; default: random init)")
    g.add_argument("--initial-checkpoint", "--checkpoint", dest="checkpoint", default=None,
                   help="local timm or APT weights to start from (never downloaded); with --num-classes N, a head "
                        "of another size is dropped and re-initialised")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classes of the head (default: the checkpoint's head, else max label of --data + 1)")
    g.add_argument("--data", default=default_data, help="train shards / index / image folder"
                   + (" (default: %(default)s)" if default_data else " (required)"))
    g.add_argument("--val-data", default=default_val_data or AUTO,
                   help="validation source (default: --data's own val split: DIR:val for shards, a val.parquet "
                        "beside train.parquet, a folder val beside an image folder .../train; else none)")
    g.add_argument("--no-eval", action="store_true", help="skip validation")
    add_task_args(g)
    g.add_argument("--data-cache", default=None, metavar="DIR",
                   help="data at URLs (https://, s3://, gs://): keep the byte ranges read in this local folder, so "
                        "later epochs read them from disk (shared by workers and local ranks)")
    g.add_argument("--data-cache-size", default="10GB", metavar="SIZE",
                   help="bound of --data-cache, least recently used evicted first (default: %(default)s)")
    g.add_argument("--crop-pct", type=float, default=1.0, help="eval centre-crop fraction (default 1: shards are pre-cropped)")
    g.add_argument("--attn-backend", default="auto")
    add_loader_args(ap, max_tokens=4096)
    _model_defaults(ap)
    r = ap.add_argument_group("recipe (flags left unset take the recipe's value)")
    r.add_argument("--recipe", choices=sorted(RECIPES), default="sample",
                   help="short: the paper's 1-epoch fine-tune; full: MAE fine-tune; sample: full, 8 epochs (the demo)")
    r.add_argument("--epochs", type=int, default=None)
    r.add_argument("--steps", type=int, default=None, help="stop after this many optimiser steps (the schedule spans them)")
    r.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --blr)")
    r.add_argument("--blr", type=float, default=None, help="base lr per 256 images: lr = blr * images_per_step / 256")
    r.add_argument("--min-lr", type=float, default=None)
    r.add_argument("--warmup-epochs", type=float, default=None)
    r.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-epochs")
    r.add_argument("--weight-decay", type=float, default=None)
    r.add_argument("--layer-decay", type=float, default=None)
    r.add_argument("--smoothing", "--label-smoothing", dest="label_smoothing", type=float, default=None,
                   help="label smoothing")
    r.add_argument("--drop-path", type=float, default=None)
    r.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (default: no clipping)")
    r.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="RandomResizedCrop + flip (+ --aa, --reprob) before patchify")
    r.add_argument("--aa", dest="auto_augment", default=None, help="timm RandAugment string, or 'none'")
    r.add_argument("--reprob", dest="re_prob", type=float, default=None, help="random erasing probability")
    r.add_argument("--mixup", type=float, default=None, help="Mixup alpha, 0: off (per image, before patchify)")
    r.add_argument("--cutmix", type=float, default=None, help="CutMix alpha, 0: off (per image, before patchify)")
    r.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="CutMix box side ratios drawn uniformly from [MIN, MAX] instead of from --cutmix")
    r.add_argument("--mixup-prob", type=float, default=1.0, help="probability that an image is mixed (default: %(default)s)")
    r.add_argument("--mixup-switch-prob", type=float, default=0.5,
                   help="probability of CutMix instead of Mixup when both are on (default: %(default)s)")
    r.add_argument("--train-new-only", action="store_true", help="freeze the ViT, train only APT's new parameters")
    o = ap.add_argument_group("run")
    o.add_argument("--seed", type=int, default=0, help="model init, data order, augmentation (default: 0)")
    o.add_argument("--output", default="out/train", help="metrics.jsonl, curves.png and checkpoints go here (default: %(default)s)")
    o.add_argument("--resume", default=None, help="a checkpoint file, or a folder (its newest checkpoint)")
    o.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps and at the end (default: %(default)s; 0: only at the end)")
    o.add_argument("--keep-checkpoints", type=int, default=2, help="newest step checkpoints kept (default: %(default)s; 0: all)")
    o.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at each epoch end)")
    o.add_argument("--overfit-batches", type=int, default=0,
                   help="train on the first N batches of epoch 0 over and over, for --steps steps (debugging: "
                        "the loss must fall)")
    o.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    o.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA only)")
    o.add_argument("--compile", action="store_true",
                   help="torch.compile each block's norms and MLP (one compile with --static-shapes)")
    o.add_argument("--grad-checkpointing", action="store_true")
    o.add_argument("--strict", action="store_true", help="stop at a bad sample instead of skipping it")
    o.add_argument("--max-skip-fraction", type=float, default=0.01,
                   help="stop when more bad samples than this share of an epoch (and more than 10) were "
                        "skipped (default: %(default)s)")
    o.add_argument("--log-interval", "--log-every", dest="log_every", type=int, default=10,
                   help="print a line every N steps when the progress bar is off (default: %(default)s)")
    o.add_argument("--log-tensorboard", action="store_true",
                   help="also log to OUTPUT/tensorboard (needs the tensorboard package)")
    o.add_argument("-c", "--config", default=None, metavar="YAML",
                   help="flag values from a YAML file (keys: flag names, e.g. lr: 0.001); flags given beat it")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--dist-timeout", type=float, default=1800.0, help="seconds before a stuck collective fails (default: %(default)s)")
    return ap


def add_task_args(g) -> None:
    """``--task`` and the segmentation data flags (``apt-train`` and ``apt-eval``)."""
    g.add_argument("--task", choices=["classification", "segmentation"], default="classification",
                   help="segmentation: --data DIR in ADE20K's layout (images/<split> + annotations/<split>), or "
                        "an image folder with --masks DIR; needs --num-classes (docs/dense.md)")
    g.add_argument("--masks", default=None, metavar="DIR", help="segmentation: the masks of --data's images (by stem)")
    g.add_argument("--reduce-zero-label", action="store_true",
                   help="segmentation: mask id 0 is ignored, 1..K become 0..K-1 (ADE20K)")
    g.add_argument("--void", type=int, nargs="+", default=None, metavar="ID",
                   help="segmentation: mask ids that are ignored, like 255 (CamVid: 11)")
    g.add_argument("--head", choices=["linear", "conv"], default=None,
                   help="segmentation: the head on the dense features, linear (BatchNorm + 1x1 conv) or conv (a "
                        "light decoder: two 3x3 convs); default: the checkpoint's, else linear")


def _model_defaults(ap: argparse.ArgumentParser) -> None:
    """``--patch-size`` / ``--image-size`` default to the model's; ``--img-size``: timm's name."""
    ap.set_defaults(patch_size=None)
    for action in ap._actions:
        if action.dest == "patch_size":
            action.help = "base patch size in pixels (default: the model's)"
        if action.dest == "image_size" and "--img-size" not in action.option_strings:
            action.option_strings.insert(0, "--img-size")
            ap._option_string_actions["--img-size"] = action


def parse_args(ap: argparse.ArgumentParser, argv: Argv = None) -> argparse.Namespace:
    """``ap.parse_args`` after ``-c/--config YAML`` (timm's train.py style: its keys, flag names with
    ``-`` or ``_``, become defaults, so flags on the command line beat it). A bad file exits 2."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        import yaml

        try:
            with open(known.config) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            ap.error(f"--config {known.config}: {e}")
        if not isinstance(values, dict):
            ap.error(f"--config {known.config}: expected a mapping of flag names to values")
        dests = {a.dest: a for a in ap._actions}
        for opt, a in ap._option_string_actions.items():
            dests.setdefault(opt.lstrip("-").replace("-", "_"), a)
        defaults = {}
        for key, value in values.items():
            action = dests.get(str(key).replace("-", "_"))
            if action is None or action.dest in ("help", "config"):
                ap.error(f"--config {known.config}: unknown flag {key!r}")
            defaults[action.dest] = value
        ap.set_defaults(**defaults)
    return ap.parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of parsed train flags (filled from its recipe and validated; ``--no-eval``: no val data)."""
    return TrainConfig.from_flat({k: v for k, v in vars(args).items() if k != "config"})


def make_trainer(argv: Argv = None, *, default_data: Optional[str] = None,
                 default_val_data: Optional[str] = None, prog: Optional[str] = None) -> Trainer:
    """Parse ``argv``, join the process group under torchrun and build the `Trainer`. Wrong flags exit
    with argparse's usage (SystemExit 2); a bad setting raises `SetupError`, after leaving the process group."""
    ap = build_parser(default_data, default_val_data, prog)
    args = parse_args(ap, argv)
    if args.task == "classification":
        args.data = split_folder(args.data, "train")
    if args.val_data not in (None, AUTO) and args.task == "classification":
        args.val_data = split_folder(args.val_data, "val", "--val-data")
    config = train_config(args)  # filled from its recipe and validated, before joining the process group
    info = init_distributed(config.device, config.dist_timeout)
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        trainer = Trainer(config, info)
    except BaseException:
        cleanup(info)
        raise
    if info.is_main:
        note_image_size(config.image_size, backbone_of(trainer.model))
    return trainer


SPLIT_NAMES = ("train", "val", "validation", "test")


def split_folder(data: Optional[str], split: str, flag: str = "--data") -> Optional[str]:
    """``data``, or its ``split`` sub-folder where ``data`` is a local folder of splits (``train/``,
    ``val/``, ``test/`` holding class folders) rather than of classes: logged, so that a parent folder
    never trains a "train vs val" classifier. A folder of splits without ``split`` raises `SetupError`
    naming the folder to pass."""
    if not data or "://" in data or not os.path.isdir(data):
        return data
    folders = {e.name: e.path for e in os.scandir(data) if e.is_dir()}
    splits = sorted(n for n in folders if n in SPLIT_NAMES)
    if not any(any(e.is_dir() for e in os.scandir(folders[n])) for n in splits):
        return data  # no split-named folder holds folders: they are classes (or there are none)
    if split in folders and len(folders) == len(splits):
        log.warning("%s %s holds the splits %s, not classes: %s uses %s", flag, data, ", ".join(splits), flag,
                    folders[split])
        return folders[split]
    want = split if split in folders else splits[0]
    raise SetupError(f"{flag} {data}: its folders {', '.join(sorted(folders))} look like splits (a class folder per "
                     f"split), not classes; pass {flag} {os.path.join(data, want)}")


def note_image_size(requested: Optional[int], model: APTViT) -> None:
    """Log, once, an image size the model rounded down to a multiple of its patch size."""
    from .build import model_image_size

    if requested is not None and model_image_size(model) != requested:
        log.warning("--img-size %d is not a multiple of the patch size %d: the model runs at %d px", requested,
                    int(model.patch_size), model_image_size(model))


def run(argv: Argv = None, **defaults: Optional[str]) -> TrainResult:
    """`make_trainer` then `Trainer.fit`; leaves the process group when done."""
    trainer = make_trainer(argv, **defaults)
    try:
        return trainer.fit()
    finally:
        cleanup(trainer.info)


def interrupted_line(e: TrainingInterrupted, argv: Sequence[str]) -> str:
    """``interrupted at step N; resume with: <the command> --resume DIR`` (or what was lost, when a
    second signal aborted the run)."""
    if e.checkpoint is None:
        return f"aborted at step {e.step} by a second {Signals(e.signum).name}: no checkpoint written for it"
    args, skip = [], False
    for a in argv:  # the command as given, less any earlier --resume
        if skip or a == "--resume" or a.startswith("--resume="):
            skip = a == "--resume"
            continue
        args.append(a)
    command = shlex.join([sys.executable, sys.argv[0], *args, "--resume", str(e.checkpoint.parent)])
    return f"interrupted at step {e.step}; resume with: {command}"


# ------------------------------------------------------------------------------------ evaluation
def add_eval_args(ap: argparse.ArgumentParser, default_data: Optional[str] = None) -> None:
    """Flags shared by ``apt-eval`` and ``apt-sweep``; ``default_data``: the command's dataset."""
    ap.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name (pretrained=False)")
    ap.add_argument("--checkpoint", "--initial-checkpoint", dest="checkpoint", default=None,
                    help="local timm or APT weights: a file, or a training output folder (its newest checkpoint)")
    ap.add_argument("--num-classes", type=int, default=None,
                    help="default: the checkpoint's head, else max label of --data + 1")
    ap.add_argument("--data", default=default_data, required=default_data is None,
                    help="shards[:split], index or image folder")
    ap.add_argument("--crop-pct", type=float, default=1.0, help="eval centre-crop fraction (shards are pre-cropped)")
    ap.add_argument("--attn-backend", default="auto")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: CUDA)")
    ap.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    ap.add_argument("--seed", type=int, default=0, help="model init (no checkpoint) and the random baseline")
    add_loader_args(ap, max_tokens=4096)
    _model_defaults(ap)


@dataclass
class EvalSetup:
    """What `eval_setup` built: the model (eval mode, on the device), its batching config, the data."""

    model: APTViT
    cfg: APTConfig
    source: Source
    info: DistInfo
    checkpoint: Optional[str]   # the weights file read (a folder's newest checkpoint), or None
    loader_kw: dict             # eval_loader / evaluate_mode keyword arguments
    amp: bool


def eval_setup(args: argparse.Namespace) -> EvalSetup:
    """Model, config and data for the flags of `add_eval_args`; a bad setting raises `SetupError` (a
    missing file: the OSError)."""
    import torch

    from .build import build_model, infer_num_classes, model_image_size, model_patch_size
    from .checkpoint import resolve_checkpoint

    batching = dict(num_scales=args.num_scales, thresholds=args.thresholds, scorer=args.scorer,
                    max_tokens=args.max_tokens, max_images=args.max_images)
    checkpoint = args.checkpoint
    args.data = split_folder(args.data, "val")
    loader_config(patch_size=args.patch_size or 16, **batching)  # before any model is built
    if checkpoint and os.path.isdir(checkpoint):  # a training output folder: its newest checkpoint
        checkpoint = str(resolve_checkpoint(checkpoint))
    check_device(args.device)
    info = init_distributed(args.device)
    torch.manual_seed(args.seed)
    try:
        source = open_data(args.data)
        num_classes = args.num_classes or (None if checkpoint else infer_num_classes(source.labels))
        model = build_model(args.model, checkpoint=checkpoint, num_classes=num_classes, image_size=args.image_size,
                            num_scales=args.num_scales, attn_backend=args.attn_backend,
                            explicit_classes=args.num_classes is not None).to(info.device).eval()
        cfg = loader_config(patch_size=model_patch_size(model, args.patch_size, args.num_scales), **batching)
    except BaseException:
        cleanup(info)
        raise
    if info.is_main:
        note_image_size(args.image_size, model)
    kw = dict(max_tokens=args.max_tokens, max_images=args.max_images, image_size=model_image_size(model),
              num_prefix_tokens=model.num_prefix_tokens, num_workers=args.workers, crop_pct=args.crop_pct)
    amp = info.device.type == "cuda" if args.amp is None else bool(args.amp)
    return EvalSetup(model=model, cfg=cfg, source=source, info=info, checkpoint=checkpoint, loader_kw=kw, amp=amp)
