"""The training loop: fine-tune a timm ViT as an APT model on token-budget batches, from a `TrainConfig`.

One process or ``torchrun`` (DDP: gloo on the CPU, nccl on CUDA). Every step: a packed batch from
`APTLoader` (variable number of images), cross-entropy mean over the images of the GLOBAL step
(`apt_train.loss`), AdamW with layer-wise lr decay and a per-step warmup + cosine schedule
(`apt_train.optim`), optional clipping, bf16 autocast on CUDA. Metrics go to ``OUTPUT/metrics.jsonl``
(one object per step, plus evaluation records), checkpoints to ``OUTPUT/checkpoint-<step>.pt``
(atomic), and ``resume`` continues at the same epoch and step with the same lr and random stream,
so the resumed steps reproduce the uninterrupted run's losses. Bad settings raise `SetupError`;
the command line (`apt_train.cli`) turns them into exit status 2.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from apt_data import PackedBatch
from apt_data.loader import APTLoader

from .build import (build_model, compile_blocks, infer_num_classes, model_image_size, model_patch_size,
                    train_transform)
from .checkpoint import (checkpoint_path, list_checkpoints, load_checkpoint, prune_checkpoints,
                         resolve_checkpoint, rng_state, save_checkpoint, set_rng_state)
from .config import SetupError, TrainConfig, mix_config, validate
from .curves import write_curves
from .data import AUTO, check_classes, class_count, default_val_data, open_data
from .dist import DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed, sum_counts
from .evaluation import EvalResult, eval_loader, evaluate
from .loss import scaled_cross_entropy
from .optim import WarmupCosine, param_groups
from .recipes import apply_recipe
from .run_log import RunLog, every, skip_line

log = logging.getLogger("apt_train")


@dataclass
class TrainResult:
    """What `Trainer.fit` returns."""

    model: torch.nn.Module
    global_step: int
    epoch: int
    metrics_path: Path
    checkpoint: Optional[Path]
    final_eval: Optional[EvalResult]
    seconds: float
    skipped: dict = field(default_factory=dict)


class Trainer:
    """Holds the run's state (model, loaders, optimiser, schedule, position); `fit` trains.

    ``config`` takes its recipe's values for unset hyper-parameters (`apply_recipe`); ``info``: the
    process group (None: join it here when started by torchrun, see `init_distributed`). Bad settings
    raise `SetupError` before any step.
    """

    def __init__(self, config: TrainConfig, info: Optional[DistInfo] = None):
        self.config = c = validate(apply_recipe(config))
        if c.resume is not None:
            try:
                resolve_checkpoint(c.resume)
            except FileNotFoundError as e:
                raise SetupError(str(e)) from None
        self.info = info if info is not None else init_distributed(c.device, c.dist_timeout)
        self.device = self.info.device
        self.amp = (self.device.type == "cuda") if c.amp is None else bool(c.amp)
        self.out = Path(c.output)
        if self.info.is_main:
            if c.recipe == "short" and c.checkpoint is None:
                log.warning("recipe short fine-tunes a trained model for one epoch at lr 1e-6; without --checkpoint "
                            "the model starts from random weights")
            if c.compile and not c.static_shapes:
                log.warning("--compile without --static-shapes: compiled for dynamic sequence lengths after the "
                            "first change")
        torch.manual_seed(c.seed)
        np.random.seed(c.seed)
        train_source = open_data(c.data, "--data", c.remote_options())
        self._val_note = None
        if c.val_data == AUTO:  # the training source's own val split, else none (said in the header)
            val_data, self._val_note = default_val_data(c.data)
            self.config = c = replace(c, val_data=val_data)
        num_classes = c.num_classes or infer_num_classes(train_source.labels)
        self.model = build_model(c.model, checkpoint=c.checkpoint, num_classes=num_classes, image_size=c.image_size,
                                 num_scales=c.num_scales, drop_path=c.drop_path, attn_backend=c.attn_backend,
                                 pretrained=c.pretrained, reset_head=c.num_classes is not None).to(self.device)
        if self.model.num_classes != num_classes:
            raise SetupError(f"the model has {self.model.num_classes} classes, the data {num_classes}")
        self.cfg = c.apt_config(model_patch_size(self.model, c.patch_size, c.num_scales))
        self.image_size = model_image_size(self.model)
        if c.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self._build_loaders(train_source)
        check_classes(num_classes, train_source, self.val_loader.source if self.val_loader is not None else None,
                      train_name=c.data, val_name=c.val_data or "")
        # steps and lr: fixed for the run by the loader's epoch length and mean images per batch
        self.steps_per_epoch = c.overfit_batches or self.loader.steps_per_epoch()
        self.images_per_step = self.loader.mean_images_per_batch() * self.info.world_size
        if self.steps_per_epoch == 0:
            raise SetupError("the training data gives no batch")
        self.total_steps = c.epochs * self.steps_per_epoch
        if c.steps is not None:  # a cap; with overfit_batches (an "epoch" is N batches) the length
            self.total_steps = c.steps if c.overfit_batches else min(self.total_steps, c.steps)
        self.lr = c.lr if c.lr is not None else c.blr * self.images_per_step / 256
        warmup = c.warmup_steps if c.warmup_steps is not None else int(round(c.warmup_epochs * self.steps_per_epoch))
        if warmup >= self.total_steps > 0 and self.info.is_main:
            log.warning("warmup of %d steps >= the run's %d steps: the lr never reaches its peak %.3g (set "
                        "--warmup-steps or --warmup-epochs lower, or train longer)", warmup, self.total_steps, self.lr)
        if c.train_new_only:
            new = {id(p) for p in self.model.apt_parameters()}
            if not new:
                raise SetupError("--train-new-only: the model has no APT parameters (num_scales 1)")
            for p in self.model.parameters():
                p.requires_grad_(id(p) in new)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = param_groups(self.model, c.weight_decay, c.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay)
        self.scheduler = WarmupCosine(self.optimizer, self.lr, self.total_steps, warmup, c.min_lr)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.resume_state = None
        if c.resume:
            self._load(c.resume)
        self.ddp = self.model
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # batches differ in which scales they hold: APT parameters of an absent scale get no gradient
            self.ddp = DDP(self.model, device_ids=None, find_unused_parameters=True)
        if c.compile:
            compile_blocks(self.model, c.static_shapes)
        self.forward = self.ddp
        torch.manual_seed(c.seed + self.info.rank)  # drop path differs per rank
        self._cached_batches = None
        self._log = RunLog(self.info.is_main, c.quiet, c.log_every)

    def _build_loaders(self, train_source) -> None:
        """The train loader (and the validation loader unless ``val_data`` is None)."""
        c = self.config
        prefix = self.model.num_prefix_tokens
        transform = train_transform(self.model, self.image_size, augment=c.augment, auto_augment=c.auto_augment,
                                    re_prob=c.re_prob)
        try:
            self.loader = APTLoader(train_source, self.cfg, max_tokens=c.max_tokens, max_images=c.max_images,
                                    num_workers=c.workers, shuffle=True, seed=c.seed, train=True, transform=transform,
                                    num_prefix_tokens=prefix, static_shapes=c.static_shapes, strict=c.strict,
                                    max_skip_fraction=c.max_skip_fraction, mix=mix_config(c, self.model.num_classes))
            self.loader.set_epoch(0)
            self.loader.steps_per_epoch()  # budget errors surface here, before the first step
            self.val_loader = None
            if c.val_data:
                self.val_loader = eval_loader(open_data(c.val_data, "--val-data", c.remote_options()), self.cfg, max_tokens=c.max_tokens,
                                              max_images=c.max_images,
                                              image_size=self.image_size, num_prefix_tokens=prefix,
                                              num_workers=c.workers, crop_pct=c.crop_pct, strict=c.strict)
                self.val_loader.steps_per_epoch()
        except (ValueError, OSError) as e:
            raise SetupError(str(e)) from None

    # ------------------------------------------------------------------ checkpoints
    def _load(self, path: str) -> None:
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
        loaders = state.get("loader") or []
        if not self.config.overfit_batches:
            saved = loaders[self.info.rank] if len(loaders) == self.info.world_size else None
            try:
                self.loader.resume_from(self.epoch, self.step_in_epoch, saved)
            except ValueError as e:
                raise SetupError(f"{path}: {e}" + ("" if saved else f" (the checkpoint holds no loader state for "
                                                                   f"{self.info.world_size} rank(s))")) from None
        if len(rngs) == self.info.world_size:
            self.resume_state = rngs[self.info.rank]
        else:
            log.warning("checkpoint from %d ranks, running %d: the random stream is not resumed exactly",
                        len(rngs), self.info.world_size)
        if self.info.is_main:
            log.info("resumed %s: epoch %d, step %d in epoch, global step %d, lr %.3g", path, self.epoch,
                     self.step_in_epoch, self.global_step, self.scheduler.lr)

    def save(self) -> Optional[Path]:
        """Checkpoint the run (rank 0 writes, every rank's RNG state included); returns the path on rank 0."""
        rngs = all_gather_objects(rng_state(), self.info)  # every rank's stream (drop path differs per rank)
        loaders = all_gather_objects(self.loader.state_dict(), self.info)  # where every rank's data stands
        path = None
        if self.info.is_main:
            state = {"format": "apt_train/2", "model": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                     "images_per_step": self.images_per_step, "world_size": self.info.world_size,
                     "rng": rngs, "loader": loaders, "config": self.config.to_dict()}
            path = checkpoint_path(self.out, self.global_step)
            save_checkpoint(path, state)
            prune_checkpoints(self.out, self.config.keep_checkpoints)
        barrier(self.info)
        return path

    # ------------------------------------------------------------------ data
    def _epoch_batches(self) -> tuple[Iterator, int]:
        """(iterator over this epoch's remaining batches, batches in the whole epoch)."""
        if self.config.overfit_batches:
            if self._cached_batches is None:
                self.loader.set_epoch(0)
                with torch.random.fork_rng(devices=[]):
                    self._cached_batches = list(itertools.islice(iter(self.loader), self.config.overfit_batches))
            return iter(self._cached_batches[self.step_in_epoch:]), len(self._cached_batches)
        self.loader.set_epoch(self.epoch)
        return iter(self.loader), self.step_in_epoch + len(self.loader)

    @staticmethod
    def _next(it: Iterator):
        # the DataLoader draws its worker base seed from the global RNG: keep it out of the model's stream
        with torch.random.fork_rng(devices=[]):
            return next(it, None)

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: PackedBatch) -> tuple[float, float, int, int, Optional[float]]:
        """One optimiser step; returns (global mean loss, lr used, global images, global tokens, grad norm)."""
        info, c = self.info, self.config
        b = batch.to(self.device, non_blocking=True)
        local_tokens = b.num_real_tokens - b.num_images * b.num_prefix_tokens
        counts = all_reduce_sum(torch.tensor([float(b.num_images), float(local_tokens), float(b.num_real_tokens)],
                                             device=self.device), info)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.forward(b)
        if b.mixed:  # soft targets, smoothed as timm's Mixup smooths them
            target, smoothing = b.soft_targets(self.model.num_classes, c.label_smoothing), 0.0
        else:
            target, smoothing = b.labels, c.label_smoothing
        loss = scaled_cross_entropy(logits, target, label_smoothing=smoothing, global_images=counts[0],
                                    world_size=info.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if c.clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.clip_grad)
        lr = self.scheduler.lr
        self.optimizer.step()
        self.scheduler.step()
        # the rank losses are scaled so that their sum over ranks is W x the global mean
        report = all_reduce_sum(loss.detach().float().reshape(1) / info.world_size, info)
        vals = torch.cat([report, counts.float()] + ([grad_norm.float().reshape(1)] if grad_norm is not None else []))
        vals = vals.tolist()  # the step's one host sync
        self._fill = vals[3] / (c.max_tokens * info.world_size)  # real tokens, prefix included, / budget
        return vals[0], lr, int(vals[1]), int(vals[2]), (vals[4] if grad_norm is not None else None)

    def run_eval(self) -> Optional[EvalResult]:
        """Evaluate on ``val_data`` (all ranks); rank 0 prints it and, inside `fit`, writes its metrics record."""
        if self.val_loader is None:
            return None
        res = evaluate(self.model, self.val_loader, self.device, amp=self.amp, info=self.info,
                       progress=None if self.config.quiet else f"eval (step {self.global_step})")
        if self.info.is_main:
            if self._log.record({
                    "split": "val", "step": self.global_step, "epoch": self.epoch, "top1": res.top1, "top5": res.top5,
                    "loss": res.loss, "images": res.images, "tokens_per_image": res.tokens_per_image,
                    "token_fraction": res.token_fraction, "images_per_s": res.images_per_s,
                    "gflops_per_image": res.gflops_per_image}):
                try:
                    write_curves(self.out / "metrics.jsonl")
                except Exception as e:  # a plot is never worth the run
                    log.warning("curves.png not written: %s: %s", type(e).__name__, e)
            self._log.print(f"eval step {self.global_step} epoch {self.epoch}: top-1 {res.top1:.2%} top-5 {res.top5:.2%} "
                        f"loss {res.loss:.4f} on {res.images} images, {res.tokens_per_image:.1f} tokens/image "
                        f"({res.token_fraction:.1%} of uniform), {res.images_per_s:.1f} images/s")
        return res

    def _eval_saved(self, saved: Optional[Path]) -> Optional[EvalResult]:
        """`run_eval`; if it fails, the step is checkpointed first (one process: DDP ranks may be stuck)."""
        try:
            return self.run_eval()
        except Exception:
            if saved is None and not self.info.enabled:
                saved = self.save()
            log.error("evaluation failed at step %d; the run's checkpoint: %s", self.global_step, saved)
            raise

    def _eval_due(self, epoch_end: bool) -> bool:
        """Evaluate every ``eval_every`` steps, or at each epoch end when it is 0."""
        return every(self.global_step, self.config.eval_every) if self.config.eval_every else epoch_end

    def _save_due(self) -> bool:
        """Checkpoint every ``save_every`` steps (0: only at the end)."""
        return every(self.global_step, self.config.save_every)

    def _epoch_summary(self, fills: list) -> None:
        """Rank 0 writes and prints the epoch's mean fill and the samples carried over to the next epoch."""
        if not self.info.is_main or not fills:
            return
        carried = self.loader.stats.carried_over.get(self.epoch)
        rec = {"split": "epoch", "step": self.global_step, "epoch": self.epoch, "fill": float(np.mean(fills)),
               "steps": len(fills)}
        if carried is not None:
            rec["carried_over"] = int(carried)
        self._log.record(rec)
        self._log.print(f"epoch {self.epoch}: mean fill {rec['fill']:.1%} over {len(fills)} steps"
                    + (f", {carried} sample visits (rank 0) carry over into the next epoch" if carried is not None
                       else ""))

    def _next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def _print_header(self) -> None:
        c, info = self.config, self.info
        self._log.print(
            f"APT train: {c.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M params, "
            f"{len(self.params)} trainable tensors{', APT parameters only' if c.train_new_only else ''}) "
            f"at {self.image_size} px, {self.cfg}; recipe {c.recipe}; {info.world_size} process(es) on "
            f"{self.device}{', bf16 autocast' if self.amp else ''}")
        val = self.val_loader
        self._log.print(f"train data {c.data}: {len(self.loader.source)} images, {class_count(self.loader.source)} classes; "
                    + (f"val data {c.val_data}: {len(val.source)} images, {class_count(val.source)} classes; "
                       if val is not None else "val data: none; ")
                    + f"head: {self.model.num_classes} classes")
        if self._val_note:
            self._log.print(self._val_note)
        self._log.print(
            f"data {c.data}: {len(self.loader.source)} images, {self.steps_per_epoch} steps/epoch of <= "
            f"{c.max_tokens} tokens per rank ({self.loader.describe()}), {self.images_per_step:.2f} images "
            f"per global step; {self.total_steps} steps; peak lr {self.lr:.3g}"
            f"{'' if c.lr is not None else f' = {c.blr:g} x {self.images_per_step:.2f} / 256'}, "
            f"warmup {self.scheduler.warmup_steps} steps, layer decay {c.layer_decay}")
        mix = self.loader.mix
        self._log.print("augmentation: " + (f"RandomResizedCrop + flip, RandAugment {c.auto_augment or 'off'}, random "
                                            f"erasing {c.re_prob}" if c.augment else "none")
                        + (f"; Mixup {mix.mixup_alpha} / CutMix {mix.cutmix_alpha}"
                           f"{f' (box sides {mix.cutmix_minmax})' if mix.cutmix_minmax else ''}, prob {mix.prob}, "
                           f"switch {mix.switch_prob}, soft targets" if mix is not None else "; no Mixup / CutMix")
                        + f"; label smoothing {c.label_smoothing}")

    def fit(self) -> TrainResult:
        """Train to ``total_steps``: evaluate at each epoch end (or every ``eval_every`` steps) and at the
        end, checkpoint every ``save_every`` steps and at the end, log every step."""
        c, info = self.config, self.info
        if info.is_main and not c.resume and list_checkpoints(self.out):
            log.warning("%s already holds checkpoints %s: a later --resume of this folder takes the newest step",
                        self.out, [p.name for p in list_checkpoints(self.out)])
        self._log.open(self.out, self.total_steps, self.global_step, bool(c.resume), c.log_tensorboard)
        if info.is_main:
            self._print_header()
        if self.resume_state is not None:
            set_rng_state(self.resume_state)
        self.ddp.train()
        t_start = time.perf_counter()
        totals = np.zeros(3)  # images, tokens, seconds
        final_eval, last_saved, evaluated = None, None, False
        batches, epoch_len, t_prev, fills, run_fills = None, 0, t_start, [], []
        try:
            while self.global_step < self.total_steps:
                if batches is None:  # an epoch starts (or resumes)
                    batches, epoch_len = self._epoch_batches()
                    t_prev = time.perf_counter()
                item = self._next(batches)
                if item is None:  # not expected: every rank's loader yields the planned batches
                    log.warning("epoch %d ended after %d of %d batches", self.epoch, self.step_in_epoch, epoch_len)
                    self._next_epoch()
                    batches = None
                    continue
                loss, lr, images, tokens, gnorm = self.train_step(item[0])
                now = time.perf_counter()
                dt, t_prev = now - t_prev, now
                totals += (images, tokens, dt)
                self.global_step += 1
                self.step_in_epoch += 1
                rec = {"split": "train", "step": self.global_step, "epoch": self.epoch, "loss": loss, "lr": lr,
                       "images": images, "tokens": tokens, "tokens_per_image": tokens / max(images, 1),
                       "images_per_s": images / dt, "tokens_per_s": tokens / dt, "fill": self._fill}
                fills.append(self._fill)
                run_fills.append(self._fill)
                if gnorm is not None:
                    rec["grad_norm"] = gnorm
                self._log.step(rec)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {self.global_step}")
                epoch_end = self.step_in_epoch >= epoch_len
                if epoch_end:  # checkpoints taken from here on resume at the next epoch's start
                    self._epoch_summary(fills)
                    fills = []
                    self._next_epoch()
                    batches = None
                saving = self._save_due()  # saved before evaluating: a failing evaluation never loses it
                if saving:
                    last_saved = self.save()
                evaluated = self._eval_due(epoch_end)
                if evaluated:
                    final_eval = self._eval_saved(last_saved if saving else None)
                if evaluated or saving:  # the next step's speed excludes evaluation and saving
                    t_prev = time.perf_counter()
            if not self._save_due() or last_saved is None:
                last_saved = self.save()
            if not evaluated:
                final_eval = self._eval_saved(last_saved)
        finally:
            self._log.close()
        seconds = time.perf_counter() - t_start
        skipped = self._report_skips()
        if info.is_main:
            n, t, s = totals
            self._log.print(f"done: {self.global_step} steps ({int(n)} images, {int(t)} patch tokens) in {s:.1f} s of "
                        f"steps: {n / max(s, 1e-9):.1f} images/s, {t / max(s, 1e-9):.0f} tokens/s, "
                        f"{t / max(n, 1):.1f} tokens/image, mean fill {np.mean(run_fills or [0]):.1%} of "
                        f"{self.config.max_tokens} tokens; total {seconds:.1f} s")
            if final_eval is not None:
                self._log.print(f"final val: top-1 {final_eval.top1:.2%}, top-5 {final_eval.top5:.2%} on "
                            f"{final_eval.images} images")
            self._log.print(f"checkpoint: {last_saved}; metrics: {self.out / 'metrics.jsonl'}")
        return TrainResult(model=self.model, global_step=self.global_step, epoch=self.epoch,
                           metrics_path=self.out / "metrics.jsonl", checkpoint=last_saved, final_eval=final_eval,
                           seconds=seconds, skipped=skipped)

    def _report_skips(self) -> dict:
        """The bad samples the loaders skipped, summed over ranks; rank 0 prints them."""
        loaders = {"train": self.loader, "val": self.val_loader}
        merged = sum_counts({k: dict(l.stats.skipped) for k, l in loaders.items() if l is not None}, self.info)
        self._log.print(skip_line(merged))
        return merged
