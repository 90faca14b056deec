"""Image folders as sources: `FolderSource` (ImageNet layout, one sub-folder per class) and
`MaskFolderSource` (images paired with segmentation masks by file stem, e.g. ADE20K's layout)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..listing import list_image_folder
from ..masks import MaskLabels, decode_mask, find_mask_layout, pair_masks
from .base import Source, header_size

__all__ = ["FolderSource", "MaskFolderSource", "open_mask_folder"]


class _ImageFiles(Source):
    """Samples that are image files (``paths``): read as bytes, sized from their headers."""

    paths: list[Path]

    def read(self, i: int) -> bytes:
        return self.paths[i].read_bytes()

    def image_size(self, i: int) -> Optional[tuple[int, int]]:
        return header_size(self.paths[i])


class FolderSource(_ImageFiles):
    """An ImageNet-layout folder: one sub-folder per class, classes sorted -> labels 0..C-1."""

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = Path(root)
        items = list_image_folder(self.root)
        self.paths = [p for p, _, _ in items]
        self.classes = sorted({c for _, _, c in items})
        self.keys = [f"{p.parent.name}/{p.name}" for p in self.paths]
        self.labels = np.asarray([label for _, label, _ in items], np.int64)


class MaskFolderSource(_ImageFiles):
    """Images under ``images`` with the mask of the same relative path and stem under ``masks``
    (`pair_masks`; `from_layout`: ADE20K's ``root/images|annotations/<split>``).

    ``mask_labels``: stored ids -> trained ids (`MaskLabels`). ``labels`` are all 0. A missing mask is
    an error naming the image; a mask of the wrong size is a skipped sample.
    """

    def __init__(self, images: Union[str, os.PathLike], masks: Union[str, os.PathLike], *,
                 mask_labels: Optional[MaskLabels] = None):
        self.root, self.mask_root = Path(images), Path(masks)
        pairs = pair_masks(self.root, self.mask_root)
        self.paths = [p for p, _ in pairs]
        self.mask_paths = [m for _, m in pairs]
        self.mask_labels = mask_labels or MaskLabels()
        self.keys = [p.relative_to(self.root).as_posix() for p in self.paths]
        self.labels = np.zeros(len(self.paths), np.int64)

    @classmethod
    def from_layout(cls, root: Union[str, os.PathLike], split: str = "train", **kw) -> "MaskFolderSource":
        """The ``split`` of a folder in ADE20K's layout (``images/<split>``, ``annotations/<split>``)."""
        found = find_mask_layout(root, split)
        if found is None:
            raise ValueError(f"{root}: no images/{split} and annotations/{split} folders (ADE20K's layout)")
        return cls(*found, **kw)

    has_masks = True

    def read_mask(self, i: int) -> np.ndarray:
        """The mask of sample ``i``, decoded, its ids mapped by ``mask_labels``."""
        return decode_mask(self.mask_paths[i].read_bytes(), str(self.mask_paths[i]), self.mask_labels)

    def read_with_mask(self, i: int) -> tuple[bytes, np.ndarray]:
        return self.read(i), self.read_mask(i)


def open_mask_folder(data: Union[str, os.PathLike], masks: Optional[Union[str, os.PathLike]] = None,
                     split: str = "train", mask_labels: Optional[MaskLabels] = None) -> MaskFolderSource:
    """What ``--data DIR [--masks DIR]`` names: ``data`` (images) paired with ``masks``, or, without
    ``masks``, the ``split`` of ``data`` in ADE20K's layout (``images/<split>`` + ``annotations/<split>``)."""
    if masks is not None:
        return MaskFolderSource(data, masks, mask_labels=mask_labels)
    return MaskFolderSource.from_layout(data, split, mask_labels=mask_labels)
