"""Planning a shard build: which images (and masks) go in, in which order, under which keys."""
from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Union

from ..listing import list_image_folder, read_file_list
from ..masks import pair_masks

PathLike = Union[str, os.PathLike]

__all__ = ["digest", "load_class_table", "make_key", "plan_mask_samples", "plan_samples"]


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def make_key(name: str) -> str:
    """A webdataset key from a source's relative path: no extension, no dots, '/' -> '_'."""
    stem = name.rsplit(".", 1)[0] if "." in Path(name).name else name
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", stem.replace("/", "_")).lstrip("_-") or "x"
    return key if len(key) <= 80 else key[:63] + "_" + digest(name)[:16]


def load_class_table(path: Optional[PathLike]) -> dict[str, tuple[int, str]]:
    """``wnid -> (ImageNet-1k index, name)`` from a TSV with columns index, wnid, name (header ok)."""
    if not path:
        return {}
    table = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].strip().isdigit():
            table[parts[1].strip()] = (int(parts[0]), parts[2].strip())
    return table


def plan_samples(src: Path, *, limit_per_class: Optional[int], skip_per_class: int, seed: int,
                 shuffle: bool, left_out: Optional[Counter] = None
                 ) -> tuple[list[tuple[Path, str, str, int, str]], dict[int, str]]:
    """``([(path, source name, key, label, class)], label -> class)``: per class, files ranked by
    sha256(seed, name) give ``[skip : skip + limit]`` (disjoint splits by skip, stable under added files)."""
    src = Path(src)
    entries, base = (list_image_folder(src, left_out), src) if src.is_dir() else (read_file_list(src), src.parent)
    classes: dict[int, str] = {}
    by_label: dict[int, list] = {}
    for path, label, cls in entries:
        name = Path(os.path.relpath(path, base)).as_posix()
        classes.setdefault(label, cls)
        by_label.setdefault(label, []).append((path, name, label, cls))
    picked = []
    for label in sorted(by_label):
        items = sorted(by_label[label], key=lambda t: digest(str(seed), t[1]))
        stop = None if limit_per_class is None else skip_per_class + limit_per_class
        picked.extend(items[skip_per_class:stop])
    return _keyed(sorted(picked, key=lambda t: (t[2], t[1])), seed, shuffle), classes


def plan_mask_samples(images: Path, masks: Path, *, limit: Optional[int], skip: int, seed: int,
                      shuffle: bool) -> tuple[list[tuple], dict[int, str]]:
    """`plan_samples` for a segmentation set: every image under ``images`` with its mask under
    ``masks`` (`apt_data.masks.pair_masks`), label 0; ``[(path, name, key, 0, "image", mask path)]``."""
    picked = [(p, Path(os.path.relpath(p, images)).as_posix(), 0, "image", m) for p, m in pair_masks(images, masks)]
    picked = sorted(picked, key=lambda t: digest(str(seed), t[1]))[skip:None if limit is None else skip + limit]
    return _keyed(sorted(picked, key=lambda t: t[1]), seed, shuffle), {0: "image"}


def _keyed(picked: list[tuple], seed: int, shuffle: bool) -> list[tuple]:
    """``(path, name, *rest)`` as ``(path, name, unique key, *rest)`` in this order, or with ``shuffle`` in
    a seeded hash order (so every shard mixes classes)."""
    seen: Counter = Counter()
    samples = []
    for path, name, *rest in picked:
        key = make_key(name)
        seen[key] += 1
        samples.append((path, name, key if seen[key] == 1 else f"{key}-{seen[key] - 1}", *rest))
    if shuffle:
        samples.sort(key=lambda t: digest(str(seed), "order", t[2]))
    return samples
