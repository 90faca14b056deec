"""The training loop: fine-tune a timm ViT as an APT model on token-budget batches, from a `TrainConfig`.

One process or ``torchrun`` (DDP: gloo on the CPU, nccl on CUDA). Every step: a packed batch from
`APTLoader` (variable number of images), cross-entropy mean over the images of the GLOBAL step
(`apt_train.loss`), AdamW with layer-wise lr decay and a per-step warmup + cosine schedule
(`apt_train.optim`), optional clipping, bf16 autocast on CUDA. Metrics go to ``OUTPUT/metrics.jsonl``
(one object per step, plus evaluation and epoch records), checkpoints to ``OUTPUT/checkpoint-<step>.pt``
(atomic), and ``resume`` continues at the same epoch and step with the same lr and random stream,
so the resumed steps reproduce the uninterrupted run's losses. SIGINT / SIGTERM stop after the current
step with a checkpoint (`apt_train.interrupt`). Bad settings and unreadable or unwritable files raise
`SetupError`; the command line (`apt_train.cli`) turns them into exit status 2.
"""
from __future__ import annotations

import itertools
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from apt_data import PackedBatch

from .build import compile_blocks
from .checkpoint import (CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint, prune_checkpoints, resolve_checkpoint,
                         restore_weights, rng_state, save_checkpoint, set_rng_state)
from .config import SetupError, TrainConfig
from .data import AUTO, check_classes
from .dist import DistInfo, all_gather_objects, all_reduce_sum, init_distributed, sum_counts
from .evaluation import EvalResult
from .interrupt import StopSignals, TrainingInterrupted
from .optim import WarmupCosine, plan_schedule, trainable_parameters
from .run_log import RunLog, RunTotals, every, skip_line
from .tasks import backbone_of, make_task

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

    ``config`` is taken as given (its constructor filled the recipe and validated it); ``info``: the
    process group (None: join it here when started by torchrun, see `init_distributed`). Files, model
    and data that do not fit raise `SetupError` before any step.
    """

    def __init__(self, config: TrainConfig, info: Optional[DistInfo] = None):
        self.config = c = config
        if c.run.resume is not None:
            try:
                resolve_checkpoint(c.run.resume)
            except FileNotFoundError as e:
                raise SetupError(str(e)) from None
        self.info = info if info is not None else init_distributed(c.run.device, c.run.dist_timeout)
        self.device = self.info.device
        self.amp = (self.device.type == "cuda") if c.run.amp is None else bool(c.run.amp)
        self.out = Path(c.run.output)
        for warning in c.warnings() if self.info.is_main else ():
            log.warning("%s", warning)
        torch.manual_seed(c.run.seed)
        np.random.seed(c.run.seed)
        self.task = task = make_task(c)  # classification (default) or segmentation: `apt_train.tasks`
        train_source = task.open_train(c)
        self._val_note = None
        if c.data.val == AUTO:  # the training source's own val split, else none (said in the header)
            val_data, self._val_note = task.default_val(c)
            self.config = c = c.with_val_data(val_data)
        self.model, self.cfg, self.image_size = task.build_model(c, train_source, self.device)
        num_classes = self.model.num_classes
        self.loader, self.val_loader = task.build_loaders(c, self.model, self.cfg, self.image_size, train_source)
        check_classes(num_classes, train_source, self.val_loader.source if self.val_loader is not None else None,
                      train_name=c.data.train, val_name=c.data.val or "")
        self._plan_schedule()
        self.epoch, self.step_in_epoch, self.global_step, self.resume_state, self.totals = 0, 0, 0, None, RunTotals()
        if c.run.resume:
            self._load(c.run.resume)
        self.ddp = self.model
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # batches differ in which scales they hold: APT parameters of an absent scale get no gradient
            self.ddp = DDP(self.model, device_ids=None, find_unused_parameters=True)
        if c.model.compile:
            compile_blocks(backbone_of(self.model), c.data.static_shapes)
        self.forward = self.ddp
        torch.manual_seed(c.run.seed + self.info.rank)  # drop path differs per rank
        self._cached_batches = None
        self._stop = StopSignals()
        self._log = RunLog(self.info.is_main, c.run.quiet, c.run.log_every)

    def _plan_schedule(self) -> None:
        """Steps, images per step, lr, optimiser and schedule (`apt_train.optim.plan_schedule`)."""
        o = self.config.optim
        plan = plan_schedule(self.config, self.loader, self.info.world_size)
        self.steps_per_epoch, self.total_steps, self.lr = plan.steps_per_epoch, plan.total_steps, plan.lr
        self.images_per_step, self.eval_epochs, self._notes = plan.images_per_step, plan.eval_epochs, plan.notes
        if plan.warmup >= self.total_steps > 0 and self.info.is_main:
            log.warning("warmup of %d steps >= the run's %d steps: the lr never reaches its peak %.3g (set "
                        "--warmup-steps or --warmup-epochs lower, or train longer)", plan.warmup, self.total_steps,
                        self.lr)
        self.params = trainable_parameters(self.model, o.train_new_only)
        groups = self.task.param_groups(self.model, o.weight_decay, o.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999), weight_decay=o.weight_decay)
        self.scheduler = WarmupCosine(self.optimizer, self.lr, self.total_steps, plan.warmup, o.min_lr)

    # ------------------------------------------------------------------ checkpoints
    def _load(self, path: str) -> None:
        path = resolve_checkpoint(path)
        state = load_checkpoint(path)
        restore_weights(path, state, self.model, self.optimizer, self.scheduler, self.config.model.name)
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.images_per_step, self.lr = float(state["images_per_step"]), float(state["scheduler"]["base_lr"])
        self.totals = RunTotals.resumed(state.get("totals"), self.global_step)
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
        self._resumed_from = path

    def save(self) -> Optional[Path]:
        """Checkpoint the run (rank 0 writes, every rank's RNG state included); returns the path on rank 0.
        A file that cannot be written (a full disk) is a `CheckpointError` naming it; the previous
        checkpoints stay."""
        rngs = all_gather_objects(rng_state(), self.info)  # every rank's stream (drop path differs per rank)
        loaders = all_gather_objects(self.loader.state_dict(), self.info)  # where every rank's data stands
        path, error = None, None
        if self.info.is_main:
            state = {"format": "apt_train/2", "model": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                     "images_per_step": self.images_per_step, "world_size": self.info.world_size,
                     "rng": rngs, "loader": loaders, "config": self.config.to_dict(),
                     "totals": self.totals.state_dict()}
            if self.task.state_dict() is not None:  # segmentation: its class count and names
                state["task"] = self.task.state_dict()
            path = checkpoint_path(self.out, self.global_step)
            try:
                save_checkpoint(path, state)
                prune_checkpoints(self.out, self.config.run.keep_checkpoints)
            except CheckpointError as e:
                error = str(e)
        for e in all_gather_objects(error, self.info):  # every rank waits for the file and learns of a failure
            if e:
                raise CheckpointError(e)
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
        """One optimiser step; returns (global mean loss, lr used, global images, global tokens, grad norm).
        A stop signal on any rank (`StopSignals`) is summed with the step's counts, so every rank learns
        of it at the same step (``self.stop_requested``)."""
        info, c = self.info, self.config
        b = batch.to(self.device, non_blocking=True)
        local_tokens = b.num_real_tokens - b.num_images * b.num_prefix_tokens
        counts = all_reduce_sum(torch.tensor([float(b.num_images), float(local_tokens), float(b.num_real_tokens),
                                              float(self._stop.signum)], device=self.device), info)
        loss = self.task.loss(self.forward, b, c, counts[0], info.world_size, self.amp, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if c.optim.clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.optim.clip_grad)
        lr = self.scheduler.lr
        self.optimizer.step()
        self.scheduler.step()
        # the rank losses are scaled so that their sum over ranks is W x the global mean
        report = all_reduce_sum(loss.detach().float().reshape(1) / info.world_size, info)
        vals = torch.cat([report, counts.float()] + ([grad_norm.float().reshape(1)] if grad_norm is not None else []))
        vals = vals.tolist()  # the step's one host sync
        self._fill = vals[3] / (c.data.max_tokens * info.world_size)  # real tokens, prefix included, / budget
        self.stop_requested = int(vals[4]) and (self._stop.signum or int(signal.SIGTERM))
        return vals[0], lr, int(vals[1]), int(vals[2]), (vals[5] if grad_norm is not None else None)

    def run_eval(self) -> Optional[EvalResult]:
        """Evaluate on ``data.val`` (all ranks); rank 0 prints it and, inside `fit`, writes its metrics record."""
        if self.val_loader is None:
            return None
        res = self.task.evaluate(self.model, self.val_loader, self.device, self.amp, self.info,
                                 None if self.config.run.quiet else f"eval (step {self.global_step})")
        self.task.log_eval(self._log, res, self.global_step, self.epoch, self.out)
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
        """Evaluate every ``eval_every`` steps, or when it is 0 at each ``eval_epochs``-th epoch end (the
        epoch has just ended: ``self.epoch`` counts it)."""
        if self.config.run.eval_every:
            return every(self.global_step, self.config.run.eval_every)
        return epoch_end and every(self.epoch, self.eval_epochs)

    def _save_due(self) -> bool:
        """Checkpoint every ``save_every`` steps (0: only at the end)."""
        return every(self.global_step, self.config.run.save_every)

    def _epoch_summary(self) -> None:
        """The epoch's steps, images and mean fill (every rank counts them; rank 0 writes and prints them)."""
        self._log.epoch_end(self.totals, self.epoch, self.global_step, len(self.loader.source),
                            self.loader.stats.carried_over.get(self.epoch))

    def _next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def _print_header(self) -> None:
        c, info = self.config.flags(), self.info  # the header speaks in flag names
        self._log.info(
            f"APT train: {c.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M params, "
            f"{len(self.params)} trainable tensors{', APT parameters only' if c.train_new_only else ''}) "
            f"at {self.image_size} px, {self.cfg}; recipe {c.recipe}; {info.world_size} process(es) on "
            f"{self.device}{', bf16 autocast' if self.amp else ''}")
        val = self.val_loader
        count = self.task.class_count
        self._log.info(f"train data {c.data}: {len(self.loader.source)} images, {count(self.loader.source)}; "
                    + (f"val data {c.val_data}: {len(val.source)} images, {count(val.source)}; "
                       if val is not None else "val data: none; ")
                    + f"head: {self.model.num_classes} classes")
        if self._val_note:
            self._log.info(self._val_note)
        self._log.info(
            f"data {c.data}: {len(self.loader.source)} images, {self.steps_per_epoch} steps/epoch of <= "
            f"{c.max_tokens} tokens per rank ({self.loader.describe()}), {self.images_per_step:.2f} images "
            f"per global step; {self.total_steps} steps; peak lr {self.lr:.3g}"
            f"{'' if c.lr is not None else f' = {c.blr:g} x {self.images_per_step:.2f} / 256'}, "
            f"warmup {self.scheduler.warmup_steps} steps, layer decay {c.layer_decay}")
        self._log.info(self.task.augmentation_line(c, self.loader.mix))

    def _print_start(self) -> None:
        """Rank 0: what the header does not say: settings changed to fit the data, where a resume continues."""
        for note in self._notes:
            self._log.info(note)
        if getattr(self, "_resumed_from", None) is not None:
            self._log.info(f"resuming {self._resumed_from}: continuing after step {self.global_step} of "
                           f"{self.total_steps} (epoch {self.epoch}, {self.step_in_epoch} steps into it), "
                           f"lr {self.scheduler.lr:.3g}")

    def fit(self) -> TrainResult:
        """Train to ``total_steps``: evaluate at each epoch end (or every ``eval_every`` steps) and at the
        end, checkpoint every ``save_every`` steps and at the end, log every step. SIGINT / SIGTERM stop
        after the current step with a checkpoint and raise `TrainingInterrupted`."""
        c, info = self.config, self.info
        if info.is_main and not c.run.resume and list_checkpoints(self.out):
            log.warning("%s already holds checkpoints %s: a later --resume of this folder takes the newest step",
                        self.out, [p.name for p in list_checkpoints(self.out)])
        self._log.open(self.out, self.total_steps, self.global_step, bool(c.run.resume), c.run.log_tensorboard)
        if info.is_main:
            self._print_header()
            self._print_start()
        if self.resume_state is not None:
            set_rng_state(self.resume_state)
        self.ddp.train()
        t_start = time.perf_counter()
        self._final_eval, self._last_saved, self._evaluated, self._saved_now = None, None, False, False
        self._batches, self._epoch_len, self.stop_requested = None, 0, 0
        self._stop = StopSignals(lambda: self.global_step)
        try:
            with self._stop:
                while self.global_step < self.total_steps:
                    if self._advance() and self.stop_requested and self.global_step < self.total_steps:
                        path = self._last_saved if self._saved_now else self.save()
                        raise TrainingInterrupted(self.stop_requested, self.global_step, path)
                if not self._save_due() or self._last_saved is None:
                    self._last_saved = self.save()
                if not self._evaluated:
                    self._final_eval = self._eval_saved(self._last_saved)
        finally:
            self._log.close()
        seconds = time.perf_counter() - t_start
        skipped = self._report_skips()
        if info.is_main:
            self._log.info(self.totals.summary(self.global_step, c.data.max_tokens, seconds))
            if self._final_eval is not None:
                self._log.info(self.task.final_line(self._final_eval))
            self._log.info(f"checkpoint: {self._last_saved}; metrics: {self.out / 'metrics.jsonl'}")
        return TrainResult(model=self.model, global_step=self.global_step, epoch=self.epoch,
                           metrics_path=self.out / "metrics.jsonl", checkpoint=self._last_saved,
                           final_eval=self._final_eval, seconds=seconds, skipped=skipped)

    def _advance(self) -> bool:
        """One step of `fit` with its records, epoch end, checkpoint and evaluation; False when the
        epoch's batches ran out early (the next epoch starts)."""
        if self._batches is None:  # an epoch starts (or resumes)
            self._batches, self._epoch_len = self._epoch_batches()
            self._t_prev = time.perf_counter()
        item = self._next(self._batches)
        if item is None:  # not expected: every rank's loader yields the planned batches
            log.warning("epoch %d ended after %d of %d batches", self.epoch, self.step_in_epoch, self._epoch_len)
            self._next_epoch()
            self._batches = None
            return False
        loss, lr, images, tokens, gnorm = self.train_step(item[0])
        now = time.perf_counter()
        dt, self._t_prev = now - self._t_prev, now
        self.totals.add(images, tokens, dt, self._fill)
        self.global_step += 1
        self.step_in_epoch += 1
        rec = {"split": "train", "step": self.global_step, "epoch": self.epoch, "loss": loss, "lr": lr,
               "images": images, "tokens": tokens, "tokens_per_image": tokens / max(images, 1),
               "images_per_s": images / dt, "tokens_per_s": tokens / dt, "fill": self._fill}
        if gnorm is not None:
            rec["grad_norm"] = gnorm
        self._log.step(rec)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.global_step}")
        epoch_end = self.step_in_epoch >= self._epoch_len
        if epoch_end:  # checkpoints taken from here on resume at the next epoch's start
            self._epoch_summary()
            self._next_epoch()
            self._batches = None
        self._saved_now = self._save_due()  # saved before evaluating: a failing evaluation never loses it
        if self._saved_now:
            self._last_saved = self.save()
        self._evaluated = self._eval_due(epoch_end) and not self.stop_requested
        if self._evaluated:
            self._final_eval = self._eval_saved(self._last_saved if self._saved_now else None)
        if self._evaluated or self._saved_now:  # the next step's speed excludes evaluation and saving
            self._t_prev = time.perf_counter()
        return True

    def _report_skips(self) -> dict:
        """The bad samples the loaders skipped, summed over ranks; rank 0 prints them."""
        loaders = {"train": self.loader, "val": self.val_loader}
        merged = sum_counts({k: dict(l.stats.skipped) for k, l in loaders.items() if l is not None}, self.info)
        self._log.info(skip_line(merged))
        return merged

