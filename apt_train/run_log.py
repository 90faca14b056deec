"""What rank 0 of a training run shows and records: the progress bar (or, off a terminal, a log line
every few steps), its log lines (logger ``apt_train``), and metrics.jsonl (with TensorBoard beside it
when asked).

Every process holds one; on the other ranks it shows and writes nothing, so the trainer calls it
without asking which rank it is.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional


from .metrics import MetricsWriter
from .curves import TensorBoardLogger, Tee, write_curves

log = logging.getLogger("apt_train")

__all__ = ["RunLog", "RunTotals", "every", "skip_line"]


def every(step: int, interval: int) -> bool:
    """True at every ``interval``-th step (never for ``interval`` 0)."""
    return bool(interval) and step % interval == 0


def skip_line(merged: dict) -> str:
    """``skipped bad samples: train 1 (checksum_mismatch: 1)``, or ``none``, from counts per split."""
    if not any(merged.values()):
        return "skipped bad samples: none"
    return "skipped bad samples: " + "; ".join(
        f"{split} {sum(c.values())} ({', '.join(f'{r}: {n}' for r, n in c.items())})"
        for split, c in merged.items() if c)


@dataclass
class RunTotals:
    """What the run has done since step 0: checkpoints carry it, so a resumed run's epoch records and
    final summary count the whole run as the uninterrupted run does (``since_resume``: a checkpoint
    from before this record existed, so the counts start at the resumed step and say so)."""

    images: int = 0
    tokens: int = 0
    seconds: float = 0.0       # in steps (not evaluation or saving)
    steps: int = 0
    fill_sum: float = 0.0
    epoch_steps: int = 0       # the current epoch's
    epoch_images: int = 0
    epoch_fill_sum: float = 0.0
    since_resume: Optional[int] = None

    def add(self, images: int, tokens: int, seconds: float, fill: float) -> None:
        self.images, self.tokens, self.seconds = self.images + images, self.tokens + tokens, self.seconds + seconds
        self.steps, self.fill_sum = self.steps + 1, self.fill_sum + fill
        self.epoch_steps, self.epoch_images = self.epoch_steps + 1, self.epoch_images + images
        self.epoch_fill_sum += fill

    def end_epoch(self) -> tuple[int, int, float]:
        """(steps, images, mean fill) of the epoch that ended; the next one starts from zero."""
        out = (self.epoch_steps, self.epoch_images, self.epoch_fill_sum / max(self.epoch_steps, 1))
        self.epoch_steps, self.epoch_images, self.epoch_fill_sum = 0, 0, 0.0
        return out

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def resumed(cls, state: Optional[dict], step: int) -> "RunTotals":
        """The totals a checkpoint stored (None: an older checkpoint, counted since ``step``)."""
        return cls(**state) if state else cls(since_resume=step)

    def summary(self, global_step: int, max_tokens: int, total_seconds: float) -> str:
        """The run's last line but one: steps, images, tokens, speed and fill."""
        n, t, s = self.images, self.tokens, max(self.seconds, 1e-9)
        since = "" if self.since_resume is None else f"; counts since the resume at step {self.since_resume}"
        return (f"done: {global_step} steps ({n} images, {t} patch tokens{since}) in {self.seconds:.1f} s of steps: "
                f"{n / s:.1f} images/s, {t / s:.0f} tokens/s, {t / max(n, 1):.1f} tokens/image, mean fill "
                f"{self.fill_sum / max(self.steps, 1):.1%} of {max_tokens} tokens; total {total_seconds:.1f} s")


def epoch_line(epoch: int, steps: int, images: int, fill: float, source_images: int, carried: Optional[int]) -> str:
    """``epoch 0: 8 steps, 245 images (0.61 passes over the 400 training images), mean fill 99.7%``."""
    passes = f"{images / max(source_images, 1):.2g}"
    return (f"epoch {epoch}: {steps} step{'' if steps == 1 else 's'}, {images} images ({passes} "
            f"pass{'' if passes == '1' else 'es'} over the {source_images} training images), mean fill {fill:.1%}"
            + (f"; {carried} sample visits read ahead (rank 0) carry over into the next epoch" if carried else ""))


class RunLog:
    """Rank 0's progress bar and metrics records of one `Trainer.fit`."""

    def __init__(self, is_main: bool, quiet: bool = False, log_every: int = 10):
        self.is_main, self.quiet, self.log_every = is_main, quiet, log_every
        self.bar = None
        self.writer: Optional[MetricsWriter] = None

    def open(self, out: Path, total_steps: int, step: int, resume: bool, tensorboard: bool) -> None:
        """Start the bar at ``step`` of ``total_steps`` and (rank 0) the metrics writer; a resumed run
        drops the records past ``step``."""
        from tqdm import tqdm

        self.total_steps = total_steps
        if self.is_main:
            self.writer = MetricsWriter(out / "metrics.jsonl", resume_step=step if resume else None)
            tb = TensorBoardLogger.create(out) if tensorboard else None
            if tb is not None:
                self.writer = Tee(self.writer, tb)
        self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
                        disable=self.quiet or not self.is_main or not sys.stderr.isatty())

    def info(self, msg: str) -> None:
        """Rank 0: one line of the run's log (the commands' handler keeps a progress bar below it)."""
        if self.is_main:
            log.info(msg)

    def eval_result(self, res, step: int, epoch: int, out: Path) -> None:
        """Rank 0: an evaluation's metrics record (and curves.png beside metrics.jsonl) and its line."""
        if not self.is_main:
            return
        if self.record({"split": "val", "step": step, "epoch": epoch, "top1": res.top1, "top5": res.top5,
                        "loss": res.loss, "images": res.images, "tokens_per_image": res.tokens_per_image,
                        "token_fraction": res.token_fraction, "images_per_s": res.images_per_s,
                        "gflops_per_image": res.gflops_per_image}):
            try:
                write_curves(out / "metrics.jsonl")
            except Exception as e:  # a plot is never worth the run
                log.warning("curves.png not written: %s: %s", type(e).__name__, e)
        self.info(f"eval step {step} epoch {epoch}: top-1 {res.top1:.2%} top-5 {res.top5:.2%} loss {res.loss:.4f} "
                   f"on {res.images} images, {res.tokens_per_image:.1f} tokens/image ({res.token_fraction:.1%} of "
                   f"uniform), {res.images_per_s:.1f} images/s")

    def epoch_end(self, totals: RunTotals, epoch: int, step: int, source_images: int, carried: Optional[int]) -> None:
        """Close the epoch in ``totals`` (every rank); rank 0 writes its record and prints its line."""
        steps, images, fill = totals.end_epoch()
        if not self.is_main or not steps:
            return
        rec = {"split": "epoch", "step": step, "epoch": epoch, "fill": fill, "steps": steps, "images": images,
               "passes": images / max(source_images, 1)}
        if carried is not None:
            rec["carried_over"] = int(carried)
        self.record(rec)
        self.info(epoch_line(epoch, steps, images, fill, source_images, carried))

    def record(self, rec: dict) -> bool:
        """Write ``rec`` to the metrics (rank 0, inside `fit`); True when written."""
        if self.writer is None:
            return False
        self.writer.write(rec)
        return True

    def step(self, rec: dict) -> None:
        """Every step: the metrics record and the bar; without the bar, a log line every
        ``log_every`` steps (and at the first and last)."""
        if not self.is_main:
            return
        self.record(rec)
        bar = self.bar
        bar.update(1)
        # loss and lr first: a narrow terminal cuts the line's end
        bar.set_postfix_str(f"loss {rec['loss']:.4f} lr {rec['lr']:.3g} fill {rec['fill']:.1%} "
                            f"{rec['images_per_s']:.1f} img/s {rec['tokens_per_s']:.0f} tok/s "
                            f"{rec['tokens_per_image']:.1f} tok/img")
        step = rec["step"]
        if bar.disable and not self.quiet and (every(step, max(self.log_every, 1)) or step in (1, self.total_steps)):
            log.info(f"step {step}/{self.total_steps} epoch {rec['epoch']} loss {rec['loss']:.4f} lr {rec['lr']:.3g} "
                  f"{rec['images_per_s']:.1f} img/s {rec['tokens_per_s']:.0f} tok/s "
                  f"{rec['tokens_per_image']:.1f} tok/img fill {rec['fill']:.1%}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
