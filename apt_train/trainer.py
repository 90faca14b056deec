"""The APT trainer behind ``tools/train.py``: fine-tune a timm ViT as an APT model on token-budget batches.

One process or ``torchrun`` (DDP: gloo on the CPU, nccl on CUDA). Every step: a packed batch from
`APTLoader` (variable number of images), cross-entropy mean over the images of the GLOBAL step
(`apt_train.loss`), AdamW with layer-wise lr decay and a per-step warmup + cosine schedule
(`apt_train.optim`), optional clipping, bf16 autocast on CUDA. Metrics go to ``OUTPUT/metrics.jsonl``
(one object per step, plus evaluation records), checkpoints to ``OUTPUT/checkpoint-<step>.pt``
(atomic), and ``--resume`` continues at the same epoch and step with the same lr and random stream,
so the resumed steps reproduce the uninterrupted run's losses.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from apt_data import ImageTransform, add_loader_args
from apt_data.loader import APTLoader, open_source

from .build import (SetupError, build_model, check_config_args, config_for_model, infer_num_classes,
                    model_image_size)
from .checkpoint import (MetricsWriter, checkpoint_path, list_checkpoints, load_checkpoint, plain, prune_checkpoints,
                         resolve_checkpoint, rng_state, save_checkpoint, set_rng_state)
from .dist import DistInfo, all_gather_objects, all_reduce_sum, barrier, cleanup, init_distributed
from .evaluation import EvalResult, eval_loader, evaluate
from .loss import scaled_cross_entropy
from .optim import WarmupCosine, param_groups
from .recipes import RECIPES, apply_recipe

log = logging.getLogger("apt_train")
ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="train.py", description="Fine-tune a timm ViT as an Adaptive Patch Transformer on token-budget batches. "
                                     "Recipe flags left unset take the recipe's value (README.md, 'Training and evaluation').")
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name, created with pretrained=False (default: %(default)s)")
    g.add_argument("--checkpoint", default=None, help="local timm or APT weights to start from (never downloaded)")
    g.add_argument("--num-classes", type=int, default=None, help="default: max label of --data + 1")
    g.add_argument("--data", default=str(ROOT / "shards"), help="train shards / index / image folder (default: the sample shards/)")
    g.add_argument("--val-data", default=str(ROOT / "shards") + ":val", help="validation source (default: shards/ split val)")
    g.add_argument("--no-eval", action="store_true", help="skip validation")
    g.add_argument("--crop-pct", type=float, default=1.0, help="eval centre-crop fraction (default 1: shards are pre-cropped)")
    g.add_argument("--attn-backend", default="auto")
    add_loader_args(ap, max_tokens=4096)
    ap.set_defaults(patch_size=None)  # the model's
    r = ap.add_argument_group("recipe (flags left unset take the recipe's value)")
    r.add_argument("--recipe", choices=sorted(RECIPES), default="sample",
                   help="short: the paper's 1-epoch fine-tune; full: MAE fine-tune; sample: full, 5 epochs (the demo)")
    r.add_argument("--epochs", type=int, default=None)
    r.add_argument("--steps", type=int, default=None, help="stop after this many optimiser steps (the schedule spans them)")
    r.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --blr)")
    r.add_argument("--blr", type=float, default=None, help="base lr per 256 images: lr = blr * images_per_step / 256")
    r.add_argument("--min-lr", type=float, default=None)
    r.add_argument("--warmup-epochs", type=float, default=None)
    r.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-epochs")
    r.add_argument("--weight-decay", type=float, default=None)
    r.add_argument("--layer-decay", type=float, default=None)
    r.add_argument("--label-smoothing", type=float, default=None)
    r.add_argument("--drop-path", type=float, default=None)
    r.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (default: no clipping)")
    r.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="RandomResizedCrop + flip (+ --aa, --reprob) before patchify")
    r.add_argument("--aa", dest="auto_augment", default=None, help="timm RandAugment string, or 'none'")
    r.add_argument("--reprob", dest="re_prob", type=float, default=None, help="random erasing probability")
    r.add_argument("--train-new-only", action="store_true", help="freeze the ViT, train only APT's new parameters")
    o = ap.add_argument_group("run")
    o.add_argument("--seed", type=int, default=0, help="model init, data order, augmentation (default: 0)")
    o.add_argument("--output", default="out/train", help="metrics.jsonl and checkpoints go here (default: %(default)s)")
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
    o.add_argument("--log-every", type=int, default=10, help="print a line every N steps when the progress bar is off (default: %(default)s)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--dist-timeout", type=float, default=1800.0, help="seconds before a stuck collective fails (default: %(default)s)")
    return ap


@dataclass
class TrainResult:
    model: torch.nn.Module
    global_step: int
    epoch: int
    metrics_path: Path
    checkpoint: Optional[Path]
    final_eval: Optional[EvalResult]
    seconds: float
    skipped: dict = field(default_factory=dict)


def _check_args(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    for name in ("epochs", "steps", "warmup_steps", "overfit_batches", "save_every", "eval_every", "log_every"):
        v = getattr(args, name)
        if v is not None and v < 0 or (name in ("epochs", "steps") and v is not None and v == 0):
            ap.error(f"--{name.replace('_', '-')} must be {'positive' if name in ('epochs', 'steps') else '>= 0'}, got {v}")
    if args.resume is not None:
        try:
            resolve_checkpoint(args.resume)
        except FileNotFoundError as e:
            ap.error(str(e))
    if args.recipe == "short" and args.checkpoint is None:
        log.warning("recipe short fine-tunes a trained model for one epoch at lr 1e-6; without --checkpoint the "
                    "model starts from random weights")
    if args.auto_augment in ("none", ""):
        args.auto_augment = None
    if args.compile and not args.static_shapes:
        log.warning("--compile without --static-shapes: compiled for dynamic sequence lengths after the first change")


def _train_transform(args, cfg, image_size: int, model) -> ImageTransform:
    if not args.augment:
        return ImageTransform(size=image_size, multiple=cfg.patch_size)
    fill = tuple(int(round(float(v))) for v in model.patch_embed.pixel_mean.flatten())  # mean colour: 0 after norm
    return ImageTransform(size=image_size, multiple=cfg.patch_size, augment=True, auto_augment=args.auto_augment,
                          re_prob=args.re_prob, fill=fill)


def make_trainer(argv=None) -> "Trainer":
    """Parse ``argv``, join the process group under torchrun and build the `Trainer` (model, loaders,
    optimiser, schedule, resumed state). Bad flags exit with status 2 and a message (SystemExit)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    apply_recipe(args)
    _check_args(args, ap)
    check_config_args(args, ap)
    info = init_distributed(args.device, args.dist_timeout)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return Trainer(args, ap, info)
    except SetupError as e:
        cleanup(info)
        ap.error(str(e))
    except BaseException:
        cleanup(info)
        raise


def run(argv=None) -> TrainResult:
    """`make_trainer` then `Trainer.fit`; leaves the process group when done."""
    trainer = make_trainer(argv)
    try:
        return trainer.fit()
    finally:
        cleanup(trainer.info)


def main(argv=None) -> int:
    run(argv)
    return 0


class Trainer:
    """Holds the run's state; `fit` trains. Built from parsed flags (see `build_parser`)."""

    def __init__(self, args: argparse.Namespace, parser: argparse.ArgumentParser, info: DistInfo):
        self.args, self.parser, self.info = args, parser, info
        self.device = info.device
        self.amp = (self.device.type == "cuda") if args.amp is None else bool(args.amp)
        self.out = Path(args.output)
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        try:
            train_source = open_source(args.data)
        except (ValueError, OSError) as e:
            raise SetupError(f"--data {args.data}: {e}") from None
        num_classes = args.num_classes or infer_num_classes(train_source.labels)
        self.model = build_model(args.model, checkpoint=args.checkpoint, num_classes=num_classes,
                                 image_size=args.image_size, num_scales=args.num_scales, drop_path=args.drop_path,
                                 attn_backend=args.attn_backend).to(self.device)
        if self.model.num_classes != num_classes:
            raise SetupError(f"the model has {self.model.num_classes} classes, the data {num_classes}")
        self.cfg = config_for_model(args, parser, self.model)
        self.image_size = model_image_size(self.model)
        if args.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        prefix = self.model.num_prefix_tokens
        try:
            self.loader = APTLoader(train_source, self.cfg, max_tokens=args.max_tokens, max_images=args.max_images,
                                    num_workers=args.workers, shuffle=True, seed=args.seed, train=True,
                                    transform=_train_transform(args, self.cfg, self.image_size, self.model),
                                    num_prefix_tokens=prefix, static_shapes=args.static_shapes, strict=args.strict)
            self.loader.set_epoch(0)
            plan0 = self.loader.plan(0)
            self.val_loader = None
            if not args.no_eval and args.val_data:
                self.val_loader = eval_loader(args.val_data, self.cfg, max_tokens=args.max_tokens,
                                              max_images=args.max_images, image_size=self.image_size,
                                              num_prefix_tokens=prefix, num_workers=args.workers,
                                              crop_pct=args.crop_pct, strict=args.strict)
                self.val_loader.plan(0)
        except (ValueError, OSError) as e:
            raise SetupError(str(e)) from None
        # steps and lr: the plan of epoch 0 fixes both for the run
        self.steps_per_epoch = args.overfit_batches or len(plan0) // info.world_size
        self.images_per_step = sum(len(b) for b in plan0) / (len(plan0) / info.world_size)
        if self.steps_per_epoch == 0:
            raise SetupError("the training data gives no batch")
        self.total_steps = args.epochs * self.steps_per_epoch
        if args.steps is not None:  # a cap; with --overfit-batches (an "epoch" is N batches) the length
            self.total_steps = args.steps if args.overfit_batches else min(self.total_steps, args.steps)
        self.lr = args.lr if args.lr is not None else args.blr * self.images_per_step / 256
        warmup = (args.warmup_steps if args.warmup_steps is not None
                  else int(round(args.warmup_epochs * self.steps_per_epoch)))
        if args.train_new_only:
            new = {id(p) for p in self.model.apt_parameters()}
            if not new:
                raise SetupError("--train-new-only: the model has no APT parameters (num_scales 1)")
            for p in self.model.parameters():
                p.requires_grad_(id(p) in new)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = param_groups(self.model, args.weight_decay, args.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
        self.scheduler = WarmupCosine(self.optimizer, self.lr, self.total_steps, warmup, args.min_lr)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.resume_state = None
        if args.resume:
            self._load(args.resume)
        self.ddp = self.model
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # batches differ in which scales they hold: APT parameters of an absent scale get no gradient
            self.ddp = DDP(self.model, device_ids=None, find_unused_parameters=True)
        if args.compile:
            # regional: each block's norms and MLP see a dense [L, D] tensor (L fixed with --static-shapes);
            # compiling the whole model recompiles for every batch layout (its image count and lengths)
            for blk in self.model.blocks:
                for name in ("norm1", "norm2", "mlp"):
                    getattr(blk, name).compile(dynamic=False if args.static_shapes else None)
        self.forward = self.ddp
        torch.manual_seed(args.seed + info.rank)  # drop path differs per rank
        self._cached_batches = None
        self._bar = None

    # ------------------------------------------------------------------ checkpoints
    def _load(self, path) -> None:
        path = resolve_checkpoint(path)
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.images_per_step, self.lr = float(state["images_per_step"]), float(state["scheduler"]["base_lr"])
        if self.scheduler.total_steps != self.total_steps:  # the flags now ask for a longer or shorter run
            log.warning("the checkpoint's schedule has %d steps, this run %d: the lr follows the new length",
                        self.scheduler.total_steps, self.total_steps)
            self.scheduler.total_steps = self.total_steps
            self.scheduler.apply()
        rngs = state.get("rng") or []
        if len(rngs) == self.info.world_size:
            self.resume_state = rngs[self.info.rank]
        else:
            log.warning("checkpoint from %d ranks, running %d: the random stream is not resumed exactly",
                        len(rngs), self.info.world_size)
        if self.info.is_main:
            log.info("resumed %s: epoch %d, step %d in epoch, global step %d, lr %.3g", path, self.epoch,
                     self.step_in_epoch, self.global_step, self.scheduler.lr)

    def save(self) -> Optional[Path]:
        rngs = all_gather_objects(rng_state(), self.info)  # every rank's stream (drop path differs per rank)
        path = None
        if self.info.is_main:
            state = {"format": "apt_train/1", "model": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                     "images_per_step": self.images_per_step, "world_size": self.info.world_size,
                     "rng": rngs, "args": plain(vars(self.args))}
            path = checkpoint_path(self.out, self.global_step)
            save_checkpoint(path, state)
            prune_checkpoints(self.out, self.args.keep_checkpoints)
        barrier(self.info)
        return path

    # ------------------------------------------------------------------ data
    def _epoch_batches(self):
        """(iterator over this epoch's remaining batches, batches in the whole epoch)."""
        if self.args.overfit_batches:
            if self._cached_batches is None:
                self.loader.set_epoch(0)
                with torch.random.fork_rng(devices=[]):
                    self._cached_batches = list(itertools.islice(iter(self.loader), self.args.overfit_batches))
            return iter(self._cached_batches[self.step_in_epoch:]), len(self._cached_batches)
        self.loader.resume(self.epoch, self.step_in_epoch)
        return iter(self.loader), self.step_in_epoch + len(self.loader)

    @staticmethod
    def _next(it):
        # the DataLoader draws its worker base seed from the global RNG: keep it out of the model's stream
        with torch.random.fork_rng(devices=[]):
            return next(it, None)

    # ------------------------------------------------------------------ steps
    def train_step(self, batch) -> tuple[float, float, int, int, Optional[float]]:
        """One optimiser step; returns (global mean loss, lr used, global images, global tokens, grad norm)."""
        info = self.info
        b = batch.to(self.device, non_blocking=True)
        local_tokens = b.num_real_tokens - b.num_images * b.num_prefix_tokens
        counts = all_reduce_sum(torch.tensor([float(b.num_images), float(local_tokens)], device=self.device), info)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.forward(b)
        loss = scaled_cross_entropy(logits, b.labels, label_smoothing=self.args.label_smoothing,
                                    global_images=counts[0], world_size=info.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if self.args.clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.clip_grad)
        lr = self.scheduler.lr
        self.optimizer.step()
        self.scheduler.step()
        # the rank losses are scaled so that their sum over ranks is W x the global mean
        report = all_reduce_sum(loss.detach().float().reshape(1) / info.world_size, info)
        vals = torch.cat([report, counts.float()] + ([grad_norm.float().reshape(1)] if grad_norm is not None else []))
        vals = vals.tolist()  # the step's one host sync
        return vals[0], lr, int(vals[1]), int(vals[2]), (vals[3] if grad_norm is not None else None)

    def run_eval(self, writer: Optional[MetricsWriter]) -> Optional[EvalResult]:
        if self.val_loader is None:
            return None
        res = evaluate(self.model, self.val_loader, self.device, amp=self.amp, info=self.info)
        if self.info.is_main:
            rec = {"split": "val", "step": self.global_step, "epoch": self.epoch, "top1": res.top1, "top5": res.top5,
                   "loss": res.loss, "images": res.images, "tokens_per_image": res.tokens_per_image,
                   "token_fraction": res.token_fraction, "images_per_s": res.images_per_s,
                   "gflops_per_image": res.gflops_per_image}
            writer.write(rec)
            self._print(f"eval step {self.global_step} epoch {self.epoch}: top-1 {res.top1:.2%} top-5 {res.top5:.2%} "
                        f"loss {res.loss:.4f} on {res.images} images, {res.tokens_per_image:.1f} tokens/image "
                        f"({res.token_fraction:.1%} of uniform), {res.images_per_s:.1f} images/s")
        return res

    def _log_step(self, rec: dict) -> None:
        bar, args = self._bar, self.args
        bar.update(1)
        bar.set_postfix_str(f"{rec['images_per_s']:.1f} img/s {rec['tokens_per_s']:.0f} tok/s "
                            f"{rec['tokens_per_image']:.1f} tok/img loss {rec['loss']:.4f} lr {rec['lr']:.3g}")
        step = rec["step"]
        if bar.disable and not args.quiet and (step % max(args.log_every, 1) == 0 or step in (1, self.total_steps)):
            print(f"step {step}/{self.total_steps} epoch {rec['epoch']} loss {rec['loss']:.4f} lr {rec['lr']:.3g} "
                  f"{rec['images_per_s']:.1f} img/s {rec['tokens_per_s']:.0f} tok/s "
                  f"{rec['tokens_per_image']:.1f} tok/img", flush=True)

    def _print(self, msg: str) -> None:
        if self.info.is_main:
            if self._bar is not None and not self._bar.disable:
                self._bar.write(msg)
            else:
                print(msg, flush=True)

    def fit(self) -> TrainResult:
        from tqdm import tqdm

        args, info = self.args, self.info
        self._bar = None
        if info.is_main and not args.resume and list_checkpoints(self.out):
            log.warning("%s already holds checkpoints %s: a later --resume of this folder takes the newest step",
                        self.out, [p.name for p in list_checkpoints(self.out)])
        writer = MetricsWriter(self.out / "metrics.jsonl", resume_step=self.global_step if args.resume else None) \
            if info.is_main else None
        if info.is_main:
            self._print(
                f"APT train: {args.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M params, "
                f"{len(self.params)} trainable tensors{', APT parameters only' if args.train_new_only else ''}) "
                f"at {self.image_size} px, {self.cfg}; recipe {args.recipe}; {info.world_size} process(es) on "
                f"{self.device}{', bf16 autocast' if self.amp else ''}")
            self._print(
                f"data {args.data}: {len(self.loader.source)} images, {self.steps_per_epoch} steps/epoch of <= "
                f"{args.max_tokens} tokens per rank, {self.images_per_step:.2f} images per global step (mean of the "
                f"plan); {self.total_steps} steps; peak lr {self.lr:.3g}"
                f"{'' if args.lr is not None else f' = {args.blr:g} x {self.images_per_step:.2f} / 256'}, "
                f"warmup {self.scheduler.warmup_steps} steps, layer decay {args.layer_decay}")
        self._bar = tqdm(total=self.total_steps, initial=self.global_step, unit="step", dynamic_ncols=True,
                         disable=args.quiet or not info.is_main or not sys.stderr.isatty())
        if self.resume_state is not None:
            set_rng_state(self.resume_state)
        self.ddp.train()
        t_start = time.perf_counter()
        totals = np.zeros(3)  # images, tokens, seconds
        final_eval, last_saved, evaluated = None, None, False
        try:
            while self.global_step < self.total_steps:
                it, epoch_len = self._epoch_batches()
                t_prev = time.perf_counter()
                while self.global_step < self.total_steps:
                    item = self._next(it)
                    if item is None:  # not expected: every rank's loader yields the planned batches
                        log.warning("epoch %d ended after %d of %d batches", self.epoch, self.step_in_epoch, epoch_len)
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                        break
                    loss, lr, images, tokens, gnorm = self.train_step(item[0])
                    now = time.perf_counter()
                    dt, t_prev = now - t_prev, now
                    totals += (images, tokens, dt)
                    self.global_step += 1
                    self.step_in_epoch += 1
                    rec = {"split": "train", "step": self.global_step, "epoch": self.epoch, "loss": loss, "lr": lr,
                           "images": images, "tokens": tokens, "tokens_per_image": tokens / max(images, 1),
                           "images_per_s": images / dt, "tokens_per_s": tokens / dt}
                    if gnorm is not None:
                        rec["grad_norm"] = gnorm
                    if info.is_main:
                        writer.write(rec)
                        self._log_step(rec)
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss} at step {self.global_step}")
                    epoch_end = self.step_in_epoch >= epoch_len
                    if epoch_end:  # checkpoints taken from here on resume at the next epoch's start
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    evaluated = bool(args.eval_every and self.global_step % args.eval_every == 0) or (
                        epoch_end and not args.eval_every)
                    if evaluated:
                        final_eval = self.run_eval(writer)
                    saving = bool(args.save_every and self.global_step % args.save_every == 0)
                    if saving:
                        last_saved = self.save()
                    if evaluated or saving:  # the next step's speed excludes evaluation and saving
                        t_prev = time.perf_counter()
                    if epoch_end:
                        break
            if not evaluated:
                final_eval = self.run_eval(writer)
            if not (args.save_every and self.global_step % args.save_every == 0) or last_saved is None:
                last_saved = self.save()
        finally:
            self._bar.close()
            if writer is not None:
                writer.close()
        seconds = time.perf_counter() - t_start
        skipped = self._report_skips()
        if info.is_main:
            n, t, s = totals
            self._print(f"done: {self.global_step} steps ({int(n)} images, {int(t)} patch tokens) in {s:.1f} s of "
                        f"steps: {n / max(s, 1e-9):.1f} images/s, {t / max(s, 1e-9):.0f} tokens/s, "
                        f"{t / max(n, 1):.1f} tokens/image; total {seconds:.1f} s")
            if final_eval is not None:
                self._print(f"final val: top-1 {final_eval.top1:.2%}, top-5 {final_eval.top5:.2%} on "
                            f"{final_eval.images} images")
            self._print(f"checkpoint: {last_saved}; metrics: {self.out / 'metrics.jsonl'}")
        return TrainResult(model=self.model, global_step=self.global_step, epoch=self.epoch,
                           metrics_path=self.out / "metrics.jsonl", checkpoint=last_saved, final_eval=final_eval,
                           seconds=seconds, skipped=skipped)

    def _report_skips(self) -> dict:
        loaders = {"train": self.loader, "val": self.val_loader}
        local = {k: dict(l.stats.skipped) for k, l in loaders.items() if l is not None}
        merged: dict = {}
        for d in all_gather_objects(local, self.info):
            for split, counts in d.items():
                for reason, n in counts.items():
                    merged.setdefault(split, {}).setdefault(reason, 0)
                    merged[split][reason] += n
        if self.info.is_main:
            if any(merged.values()):
                self._print("skipped bad samples: " + "; ".join(
                    f"{split} {sum(c.values())} ({', '.join(f'{r}: {n}' for r, n in c.items())})"
                    for split, c in merged.items() if c))
            else:
                self._print("skipped bad samples: none")
        return merged
