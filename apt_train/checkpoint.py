"""Checkpoints (atomic, loadable with ``weights_only=True``), RNG state capture, JSONL metrics.

A checkpoint is a dict: ``model`` (the `APTViT` state dict, so `apt_model.from_timm(name,
checkpoint_path=...)` and timm's ``load_state_dict`` read it), ``optimizer``, ``scheduler``,
``epoch``, ``step_in_epoch`` (batches of that epoch already done), ``global_step``, ``rng`` (one
entry per rank: torch CPU/CUDA, numpy and Python states) and ``config`` (the run's `TrainConfig` as
a plain dict). Everything is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from apt_data.io import atomic_write  # the project's one atomic writer

PathLike = Union[str, os.PathLike]
_CKPT = re.compile(r"^checkpoint-(\d+)\.pt$")


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(path: PathLike, state: dict) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: PathLike) -> dict:
    """A trainer checkpoint (a file, or the newest ``checkpoint-*.pt`` of a folder), on the CPU."""
    path = resolve_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def resolve_checkpoint(path: PathLike) -> Path:
    """``path`` itself, or a folder's newest ``checkpoint-*.pt``; FileNotFoundError when there is none."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"{path}: no checkpoint-*.pt in this folder")
        return found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def list_checkpoints(folder: PathLike) -> list[Path]:
    """``checkpoint-<step>.pt`` files of ``folder``, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint-*.pt") if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_path(folder: PathLike, step: int) -> Path:
    """``folder/checkpoint-<step>.pt`` (7 digits, so names sort by step)."""
    return Path(folder) / f"checkpoint-{step:07d}.pt"


def prune_checkpoints(folder: PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``keep <= 0``: keep all)."""
    if keep > 0:
        for p in list_checkpoints(folder)[:-keep]:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                      has_gauss, gauss],
             "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -------------------------------------------------------------------------------------- metrics
def read_jsonl(path: PathLike) -> list[dict]:
    """Every object of a JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Append-only JSONL, one object per line, flushed per line (a killed run loses at most the line
    being written). On resume, records past the resumed step are dropped first (atomic rewrite), so
    the file reads as one uninterrupted run."""

    def __init__(self, path: PathLike, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by the kill
                        continue
                    if int(rec.get("step", 0)) <= resume_step:
                        keep.append(json.dumps(rec) + "\n")
            atomic_write_text(self.path, "".join(keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
