"""Checkpoints (atomic, loadable with ``weights_only=True``) and RNG state capture.

A checkpoint is a dict: ``model`` (the `APTViT` state dict, so `apt_model.from_timm(name,
checkpoint_path=...)` and timm's ``load_state_dict`` read it), ``optimizer``, ``scheduler``,
``epoch``, ``step_in_epoch`` (batches of that epoch already done), ``global_step``, ``rng`` (one
entry per rank: torch CPU/CUDA, numpy and Python states) and ``config`` (the run's `TrainConfig` as
a plain dict). Everything is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``.

`save_checkpoint` adds ``integrity``: the CRC32C of every tensor's bytes, by its path in the state
(``model/blocks.0.attn.qkv.weight``, ``optimizer/state/3/exp_avg``, ...); `load_checkpoint` verifies
them and raises `CheckpointError` (a `SetupError`, so a ValueError) naming the file and the first
bad tensor, or, for a file that cannot be read at all, what is wrong with it.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from apt_data.io import atomic_write  # the project's one atomic writer

from .config import SetupError

PathLike = Union[str, os.PathLike]
_CKPT = re.compile(r"^checkpoint-(\d+)\.pt$")


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


INTEGRITY_KEY = "integrity"


class CheckpointError(SetupError):
    """A checkpoint that cannot be read, or whose tensors do not match their checksums (names the file)."""


def _tensors(obj, prefix: str = ""):
    """``(path, tensor)`` of every tensor in nested dicts / lists / tuples, in a stable order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if not (prefix == "" and k == INTEGRITY_KEY):
                yield from _tensors(obj[k], f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}" if prefix else str(i))


def tensor_checksum(t: torch.Tensor) -> int:
    """CRC32C of a tensor's bytes (any dtype or device; row-major)."""
    from crc32c import crc32c

    t = t.detach().cpu().contiguous().reshape(-1)
    return crc32c(t.view(torch.uint8).numpy() if t.numel() else b"")


def tensor_checksums(state: dict) -> dict[str, int]:
    """``{path: CRC32C}`` of every tensor of ``state`` (what `save_checkpoint` stores)."""
    return {p: tensor_checksum(t) for p, t in _tensors(state)}


def save_checkpoint(path: PathLike, state: dict) -> None:
    """``torch.save`` ``state`` to ``path`` atomically, with the checksum of every tensor. A file that
    cannot be written (a full disk, no permission) is a `CheckpointError` naming it and the reason;
    ``path`` and every other file stay as they were."""
    state = {**state, INTEGRITY_KEY: {"algorithm": "crc32c", "tensors": tensor_checksums(state)}}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # through Python's file object, so a failed write is an OSError with errno
            torch.save(state, f)

    try:
        atomic_write(path, write)
    except OSError as e:
        free = _free_bytes(Path(path).parent)
        raise CheckpointError(f"checkpoint {path} not written: {e.strerror or e}"
                              + (f" ({free / 2 ** 20:.0f} MiB free there)" if free is not None else "")
                              + "; the earlier checkpoints are kept") from None


def _free_bytes(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _unreadable(path: Path, e: BaseException) -> str:
    """One line: what is wrong with a checkpoint file ``torch.load`` failed on."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as oe:
        return f"checkpoint {path} cannot be read: {oe.strerror or oe}"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    unsafe = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
    if unsafe:  # a pickle that names a callable: what a malicious "checkpoint" does
        return (f"checkpoint {path} is not a plain weights file: it names Python code that loading would run "
                f"({unsafe.group(1)}); refused, nothing was run (only tensors and plain values are read)")
    if size == 0:
        what = "empty file (0 bytes)"
    elif head.startswith(b"PK\x03\x04"):
        what = f"truncated or corrupt PyTorch archive of {size} bytes ({type(e).__name__}: {first})"
    elif head[:1] == b"\x80":
        what = f"truncated or corrupt pickle of {size} bytes ({type(e).__name__}: {first})"
    else:
        what = f"not a PyTorch checkpoint ({size} bytes starting {head!r})"
    return f"checkpoint {path} cannot be read: {what}"


def read_checkpoint_file(path: PathLike) -> object:
    """``torch.load(weights_only=True)`` of one file on the CPU, any failure as one-line `CheckpointError`."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # EOFError, RuntimeError (zip), UnpicklingError, ... : say which file and what
        raise CheckpointError(_unreadable(path, e)) from None


def verify_checkpoint(path: PathLike, state: object) -> None:
    """Check the tensors of a loaded checkpoint against its stored checksums (none stored: nothing to check)."""
    stored = state.get(INTEGRITY_KEY) if isinstance(state, dict) else None
    if not isinstance(stored, dict):
        return
    want = stored.get("tensors") or {}
    have = dict(_tensors(state))
    for name, crc in want.items():
        t = have.get(name)
        if t is None:
            raise CheckpointError(f"checkpoint {path} is corrupt: tensor {name!r} is missing")
        got = tensor_checksum(t)
        if got != int(crc):
            raise CheckpointError(f"checkpoint {path} is corrupt: checksum mismatch in tensor {name!r} "
                                  f"(stored crc32c {int(crc):08x}, read {got:08x})")
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"checkpoint {path} is corrupt: tensor {extra[0]!r} has no checksum")


def load_checkpoint(path: PathLike) -> dict:
    """A trainer checkpoint (a file, or the newest ``checkpoint-*.pt`` of a folder), on the CPU,
    its tensors verified (`CheckpointError`: unreadable, corrupt, or not a checkpoint dict)."""
    path = resolve_checkpoint(path)
    state = read_checkpoint_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a checkpoint: it holds a {type(state).__name__}")
    verify_checkpoint(path, state)
    if "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint (no 'model' entry)")
    return state


def restore_weights(path: PathLike, state: dict, model, optimizer, scheduler, model_name: str = "") -> None:
    """Load a training checkpoint's model, optimiser and schedule; one saved from another model (or
    another head, scale count, ...) is a `CheckpointError` naming the file and the first mismatch."""
    saved = (state.get("config") or {}).get("model")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines()] or [""]
        detail = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                      lines[0])[:300]
        other = f" ({saved}; this run: {model_name})" if saved and model_name and saved != model_name else ""
        raise CheckpointError(f"--resume {path}: a checkpoint of another model{other}: {detail}; resume with that "
                              "run's flags, or start from its weights with --initial-checkpoint") from None


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
