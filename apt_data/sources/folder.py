"""`FolderSource`: the images of an ImageNet-layout folder (one sub-folder per class) as encoded bytes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..listing import list_image_folder
from .base import Source

__all__ = ["FolderSource"]


class FolderSource(Source):
    """An ImageNet-layout folder: one sub-folder per class, classes sorted -> labels 0..C-1."""

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = Path(root)
        items = list_image_folder(self.root)
        self.paths = [p for p, _, _ in items]
        self.classes = sorted({c for _, _, c in items})
        self.keys = [f"{p.parent.name}/{p.name}" for p in self.paths]
        self.labels = np.asarray([label for _, label, _ in items], np.int64)

    def read(self, i: int) -> bytes:
        return self.paths[i].read_bytes()

    def image_size(self, i: int) -> Optional[tuple[int, int]]:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                return im.size
        except Exception:
            return None
