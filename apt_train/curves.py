"""A run's curves: ``curves.png`` (train loss, lr and val top-1 against step) from ``metrics.jsonl``,
and optional TensorBoard logging (`TensorBoardLogger`, when the ``tensorboard`` package is installed)."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger("apt_train")

__all__ = ["TensorBoardLogger", "read_metrics", "write_curves"]


def read_metrics(path: Union[str, Path]) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a line cut by a kill is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def write_curves(metrics: Union[str, Path], png: Optional[Union[str, Path]] = None) -> Path:
    """Plot ``metrics`` (a ``metrics.jsonl``) to ``png`` (default: ``curves.png`` beside it), atomically:
    train loss, lr and val top-1 against the optimiser step. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apt_data.io import atomic_write_bytes

    metrics = Path(metrics)
    png = Path(png) if png is not None else metrics.with_name("curves.png")
    recs = read_metrics(metrics)
    train = [r for r in recs if r.get("split") == "train"]
    val = [r for r in recs if r.get("split") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = ((axes[0], train, "loss", "train loss", "C0"), (axes[1], train, "lr", "learning rate", "C1"),
              (axes[2], val, "top1", "val top-1 (%)", "C2"))
    for ax, rows, key, label, color in panels:
        pts = [(r["step"], r[key] * (100 if key == "top1" else 1)) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-" if key == "top1" else "-", color=color, markersize=4)
        else:
            ax.text(0.5, 0.5, "no evaluation yet" if key == "top1" else "no steps yet", ha="center",
                    va="center", transform=ax.transAxes, color="gray")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metrics.parent.name or metrics.parent}: {len(train)} steps, {len(val)} evaluations")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())
    return png


class TensorBoardLogger:
    """Scalars of the metric records to ``OUTPUT/tensorboard`` (``train/loss``, ``val/top1``, ...);
    `create` returns None (with a warning) when ``tensorboard`` is not installed."""

    KEYS = ("loss", "lr", "top1", "top5", "tokens_per_image", "images_per_s", "fill", "grad_norm")

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def create(cls, out: Union[str, Path]) -> Optional["TensorBoardLogger"]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("--log-tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                        "logging to metrics.jsonl and curves.png only")
            return None
        return cls(SummaryWriter(str(Path(out) / "tensorboard")))

    def write(self, rec: dict) -> None:
        split = rec.get("split")
        if split not in ("train", "val"):
            return
        for key in self.KEYS:
            if isinstance(rec.get(key), (int, float)):
                self.writer.add_scalar(f"{split}/{key}", rec[key], rec["step"])

    def close(self) -> None:
        self.writer.close()


class Tee:
    """Writes each record to several writers (``write`` / ``close``): metrics.jsonl and TensorBoard."""

    def __init__(self, *writers):
        self.writers = writers

    def write(self, rec: dict) -> None:
        for w in self.writers:
            w.write(rec)

    def close(self) -> None:
        for w in self.writers:
            w.close()
