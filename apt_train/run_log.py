"""What rank 0 of a training run shows and records: the progress bar (or printed lines), and
metrics.jsonl (with TensorBoard beside it when asked).

Every process holds one; on the other ranks it shows and writes nothing, so the trainer calls it
without asking which rank it is.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from .checkpoint import MetricsWriter
from .curves import TensorBoardLogger, Tee

__all__ = ["RunLog", "every", "skip_line"]


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

    def print(self, msg: str) -> None:
        if self.is_main:
            if self.bar is not None and not self.bar.disable:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def record(self, rec: dict) -> bool:
        """Write ``rec`` to the metrics (rank 0, inside `fit`); True when written."""
        if self.writer is None:
            return False
        self.writer.write(rec)
        return True

    def step(self, rec: dict) -> None:
        """Every step: the metrics record and the bar; without the bar, a printed line every
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
            print(f"step {step}/{self.total_steps} epoch {rec['epoch']} loss {rec['loss']:.4f} lr {rec['lr']:.3g} "
                  f"{rec['images_per_s']:.1f} img/s {rec['tokens_per_s']:.0f} tok/s "
                  f"{rec['tokens_per_image']:.1f} tok/img fill {rec['fill']:.1%}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
