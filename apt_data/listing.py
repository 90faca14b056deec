"""Image listings of an ImageNet-layout folder or a text/TSV list, shared by `FolderSource` and
`build_shards` so a folder gets the same labels either way."""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

log = logging.getLogger("apt_data.listing")

#: Image files listed by `list_image_folder` (torchvision's ImageFolder extensions).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

__all__ = ["IMAGE_EXTENSIONS", "describe_left_out", "list_image_folder", "read_file_list"]


def describe_left_out(left_out: Counter) -> str:
    """``3 non-image files left out (.gif 2, .txt 1)``: files of a folder with no image extension, by
    extension (``(none)`` for a name without one), most frequent first."""
    n = sum(left_out.values())
    by_ext = ", ".join(f"{ext or '(none)'} {c}" for ext, c in sorted(left_out.items(), key=lambda t: (-t[1], t[0])))
    return f"{n} non-image file{'s' if n != 1 else ''} left out ({by_ext})"


def list_image_folder(root: PathLike, left_out: Optional[Counter] = None) -> list[tuple[Path, int, str]]:
    """``(path, label, class_name)`` for every image of an ImageNet-layout folder.

    Classes sorted by name are labels 0..C-1 (torchvision's order); images found recursively by
    extension, sorted; hidden entries ignored. Other files are counted by extension into ``left_out``,
    else reported in one warning.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ImageNet layout root/<class>/<image>)")
    out, dropped = [], Counter()
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(f for f in filenames if not f.startswith(".")):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    out.append((Path(dirpath) / fn, label, cls))
                else:
                    dropped[os.path.splitext(fn)[1].lower()] += 1
    out.sort(key=lambda t: (t[1], str(t[0])))
    if left_out is not None:
        left_out.update(dropped)
    elif dropped:
        log.warning("%s: %s: only %s are listed", root, describe_left_out(dropped), " ".join(IMAGE_EXTENSIONS))
    if not out:
        raise ValueError(f"{root}: no images with extensions {IMAGE_EXTENSIONS}")
    return out


def read_file_list(path: PathLike) -> list[tuple[Path, int, str]]:
    """``(path, label, class_name)`` from ``path<TAB>label[<TAB>class_name]`` lines (paths relative to the
    list; blank lines and ``#`` comments skipped)."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        try:
            label = int(parts[1])
            if label < 0:
                raise ValueError
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{n}: expected 'path<TAB>label[<TAB>class]', got {line!r}") from None
        p = Path(parts[0])
        out.append((p if p.is_absolute() else path.parent / p, label, parts[2] if len(parts) > 2 else str(label)))
    if not out:
        raise ValueError(f"{path}: empty file list")
    return out
