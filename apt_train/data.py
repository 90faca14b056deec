"""A run's data sources: opening them with errors a user can act on, the default validation split,
and the class-count checks between train data, val data and the model's head (`SetupError`)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .config import SetupError

AUTO = "auto"  # --val-data's default: the training source's own val split, if it has one

__all__ = ["AUTO", "build_loaders", "check_classes", "class_count", "default_val_data", "open_data"]


def _path_part(source: str) -> str:
    """The file-system path of a source string (``shards:val`` -> ``shards``)."""
    if ":" in source and not os.path.exists(source) and "://" not in source:
        head = source.rsplit(":", 1)[0]
        if head:
            return head
    return source


def open_data(source: str, flag: str = "--data", remote: Optional[dict] = None):
    """`apt_data.loader.open_source` for ``flag``'s value (``remote``: options of URL sources, e.g. the
    local cache); a missing path or an unreadable source is a `SetupError` naming the flag and the path."""
    from apt_data.loader import open_source

    path = _path_part(source)
    if not any(m in source for m in ("://", "{", "::")) and not os.path.exists(path):
        raise SetupError(f"{flag} {source}: {path} does not exist")
    try:
        return open_source(source, remote)
    except (ValueError, OSError) as e:
        msg = str(e)
        raise SetupError(msg if msg.startswith(f"{flag} ") else f"{flag} {source}: {msg}") from None


def _url_val(data: str, remote: Optional[dict]) -> Optional[str]:
    """The val split beside a training source at a URL: ``URL:val`` for a folder URL (or ``URL:train``),
    ``.../val.parquet`` for ``.../train.parquet``, when the server has that index (one existence check)."""
    m = re.match(r"^(.*://.*?)(?::([A-Za-z_][A-Za-z0-9_-]*))?$", data)
    base, split = m.group(1), m.group(2)
    if base.endswith(".parquet"):
        if base.rsplit("/", 1)[-1] == "val.parquet":
            return None
        folder = base.rsplit("/", 1)[0]
        candidate = folder + "/val.parquet"
    elif base.endswith(".tar") or "{" in base or "::" in base or (split or "train") == "val":
        return None
    else:
        folder, candidate = base, base.rstrip("/") + ":val"
    from apt_data.sources import has_split

    try:  # one existence check (a 1-byte read), not the whole index read twice
        found = has_split(folder, "val", (remote or {}).get("storage_options"))
    except (OSError, ValueError):
        return None
    return candidate if found else None


def default_val_data(data: str, remote: Optional[dict] = None) -> tuple[Optional[str], str]:
    """The validation source beside the training source ``data`` and a line saying what was chosen:
    ``X:val`` for a shard folder ``X`` (or ``X:train``) with a ``val.parquet``; ``X/val.parquet`` for
    ``X/train.parquet``; a folder ``.../val`` beside an image folder ``.../train``. None when there is
    none (the run then does not evaluate). The same beside a URL (``remote``: its options), when the
    server has it."""
    from apt_data.sources import has_split

    s = str(data)
    split = None
    base = s
    if ":" in s and not os.path.exists(s) and "://" not in s:
        base, split = s.rsplit(":", 1)
    p = Path(base)
    found = None
    if "://" in s:  # a URL: what the server has beside it
        found = _url_val(s, remote)
    elif p.is_dir() and list(p.glob("*.parquet")):  # a shard folder
        if (split or "train") != "val" and has_split(p, "val"):
            found = f"{base}:val"
    elif base.endswith(".parquet") and p.name != "val.parquet" and has_split(p.parent, "val"):
        found = str(p.parent / "val.parquet")
    elif p.is_dir() and p.name == "train" and (p.parent / "val").is_dir():
        found = str(p.parent / "val")
    if found is not None:
        return found, f"validation data: {found} (the val split beside --data; --val-data to change, --no-eval to skip)"
    return None, (f"validation data: none (--data {s} has no val split beside it: no `val.parquet` or `val` "
                  f"folder); pass --val-data to evaluate")


def class_count(source) -> int:
    """Classes of a source: its class list when it has one, else max label + 1 (0 when empty)."""
    classes = getattr(source, "classes", None)
    labels = source.labels
    n = int(max(labels)) + 1 if len(labels) else 0
    if classes:
        n = max(n, len(classes))
    return n


def check_classes(num_classes: int, train, val=None, *, train_name: str = "", val_name: str = "") -> None:
    """Every label of ``train`` and ``val`` must fit the model's ``num_classes``-class head, and two
    image folders must name the same classes; a `SetupError` says what to pass."""
    import numpy as np

    for flag, src, name in (("--data", train, train_name), ("--val-data", val, val_name)):
        if src is None or len(src.labels) == 0:
            continue
        labels = np.asarray(src.labels)
        top = int(labels.max())
        if top >= num_classes or int(labels.min()) < 0:
            bad = top if top >= num_classes else int(labels.min())
            raise SetupError(
                f"{flag} {name}: label {bad} does not fit the model's {num_classes}-class head ({flag} has "
                f"{class_count(src)} classes); pass --num-classes {class_count(src)}"
                + (", or a --val-data with the training classes (--no-eval to skip evaluation)" if flag == "--val-data"
                   else ""))
    tc, vc = getattr(train, "classes", None), getattr(val, "classes", None) if val is not None else None
    if tc and vc and list(tc) != list(vc):
        extra = sorted(set(vc) - set(tc))
        missing = sorted(set(tc) - set(vc))
        raise SetupError(f"--val-data {val_name}: its classes are not --data's (labels would not match): "
                         f"{'not in --data: ' + str(extra[:5]) + '; ' if extra else ''}"
                         f"{'missing: ' + str(missing[:5]) if missing else 'another order'}; "
                         f"give val a sub-folder (with images) per training class, or --no-eval")


def build_loaders(config, model, cfg, image_size: int, train_source):
    """(train loader, validation loader or None) of a `TrainConfig` for ``model`` at ``image_size`` with
    the batching `APTConfig` ``cfg``; a budget or source that does not fit is a `SetupError`."""
    from apt_data.loader import APTLoader

    from .build import train_transform
    from .config import mix_config
    from .evaluation import eval_loader

    d = config.data
    prefix = model.num_prefix_tokens
    transform = train_transform(model, image_size, augment=d.augment, auto_augment=d.auto_augment, re_prob=d.re_prob)
    try:
        loader = APTLoader(train_source, cfg, max_tokens=d.max_tokens, max_images=d.max_images, num_workers=d.workers,
                           shuffle=True, seed=config.run.seed, train=True, transform=transform,
                           num_prefix_tokens=prefix, static_shapes=d.static_shapes, strict=d.strict,
                           max_skip_fraction=d.max_skip_fraction, mix=mix_config(config, model.num_classes))
        loader.set_epoch(0)
        loader.steps_per_epoch()  # budget errors surface here, before the first step
        val_loader = None
        if d.val:
            val_loader = eval_loader(open_data(d.val, "--val-data", d.remote_options()), cfg, max_tokens=d.max_tokens,
                                     max_images=d.max_images, image_size=image_size, num_prefix_tokens=prefix,
                                     num_workers=d.workers, crop_pct=d.crop_pct, strict=d.strict)
            val_loader.steps_per_epoch()
    except (ValueError, OSError) as e:
        raise SetupError(str(e)) from None
    return loader, val_loader
