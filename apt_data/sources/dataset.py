"""`DatasetSource`: any map-style dataset of ``(image, label)`` (or ``(image, mask)``) items as a loader source.

A torchvision ``ImageFolder`` or a Hugging Face split (dict items), as timm's NaFlex loader wraps
any dataset; images as PIL, bytes or uint8 arrays, with no tensor transform (the loader transforms).
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import numpy as np

from ..masks import MaskLabels, decode_mask
from .base import ImageData, Source, header_size

log = logging.getLogger("apt_data.sources")

IMAGE_KEYS = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_KEYS = ("label", "labels", "cls", "target", "targets")
MASK_KEYS = ("annotation", "mask", "segmentation", "seg", "semantic_segmentation", "label")

__all__ = ["DatasetSource", "is_map_dataset"]


def is_map_dataset(obj: Any) -> bool:
    """Does ``obj`` look like a map-style dataset (``len`` and integer indexing), not a path or a string?"""
    return (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")
            and not isinstance(obj, (str, bytes, bytearray, os.PathLike, Mapping)))


class DatasetSource(Source):
    """A map-style dataset whose item ``i`` is ``(image, label)`` or a dict with an image and a label.

    ``labels``: default the dataset's ``targets`` or label column, else read from every item;
    ``keys``: default the file paths of ``samples``, else indices; ``image_key`` / ``label_key`` /
    ``mask_key``: dict fields (default: the first of `IMAGE_KEYS` / `LABEL_KEYS` / `MASK_KEYS`).
    ``masks=True``: items carry a mask instead of a label (ids mapped by ``mask_labels``).
    """

    def __init__(self, dataset: Any, *, labels: Optional[Sequence[int]] = None, keys: Optional[Sequence[str]] = None,
                 image_key: Optional[str] = None, label_key: Optional[str] = None, masks: bool = False,
                 mask_key: Optional[str] = None, mask_labels: Optional[MaskLabels] = None):
        self.dataset = dataset
        self.image_key, self.label_key = image_key, label_key
        self.has_masks, self.mask_key, self.mask_labels = bool(masks), mask_key, mask_labels or MaskLabels()
        n = len(dataset)
        if self.has_masks and labels is None:
            labels = np.zeros(n, np.int64)
        self.labels = np.asarray(labels if labels is not None else self._all_labels(n), np.int64).reshape(-1)
        self.keys = [str(k) for k in keys] if keys is not None else self._default_keys(n)
        if len(self.labels) != n or len(self.keys) != n:
            raise ValueError(f"dataset of {n} items, but {len(self.labels)} labels and {len(self.keys)} keys")

    def _all_labels(self, n: int) -> Sequence[int]:
        targets = getattr(self.dataset, "targets", None)
        if targets is not None and len(targets) == n:
            return np.asarray(targets)
        columns = getattr(self.dataset, "column_names", None)
        if isinstance(columns, (list, tuple)):
            key = self.label_key or next((k for k in LABEL_KEYS if k in columns), None)
            if key is not None:
                return np.asarray(self.dataset[key])
        log.info("reading the labels of %d items one by one (pass labels= to avoid loading every image)", n)
        return [self._split(self.dataset[i], i)[1] for i in range(n)]

    def _default_keys(self, n: int) -> list[str]:
        samples = getattr(self.dataset, "samples", None)  # (torchvision's ImageFolder: (path, label) pairs)
        first = samples[0] if isinstance(samples, list) and len(samples) == n > 0 else None
        if isinstance(first, tuple) and first and isinstance(first[0], (str, os.PathLike)):
            root = getattr(self.dataset, "root", None)
            return [os.path.relpath(s[0], root) if root else os.fspath(s[0]) for s in samples]
        return [str(i) for i in range(n)]

    def _split(self, item: Any, i: int) -> tuple[Any, Any]:
        """``(image, label)`` of one item; ``(image, mask)`` in a segmentation dataset."""
        masks = self.has_masks
        what, key, keys = ("mask", self.mask_key, MASK_KEYS) if masks else ("label", self.label_key, LABEL_KEYS)
        if isinstance(item, Mapping):
            ik = self.image_key or next((k for k in IMAGE_KEYS if k in item), None)
            sk = key or next((k for k in keys if k in item), None)
            if ik is None or sk is None:
                raise TypeError(f"dataset item {i} has fields {sorted(item)}; name them with image_key= and {what}_key=")
            image, second = item[ik], item[sk]
        elif isinstance(item, (tuple, list)) and len(item) >= 2:
            image, second = item[0], item[1]
        else:
            raise TypeError(f"dataset item {i} is a {type(item).__name__}, not an (image, {what}) pair or a dict")
        return image, (second if masks else int(second))

    def read(self, i: int) -> ImageData:
        """The image of item ``i`` as the dataset gives it (PIL image, bytes or uint8 array)."""
        return _as_image(self._split(self.dataset[i], i)[0], i, "image")

    def read_with_mask(self, i: int) -> tuple[ImageData, Optional[np.ndarray]]:
        """``(image, decoded mask)`` of item ``i`` from one read of the item."""
        if not self.has_masks:
            return self.read(i), None
        image, mask = self._split(self.dataset[i], i)
        name = f"dataset item {self.keys[i] if hasattr(self, 'keys') else i} (mask)"
        return _as_image(image, i, "image"), decode_mask(_as_image(mask, i, "mask"), name, self.mask_labels)

    def image_size(self, i: int) -> Optional[tuple[int, int]]:
        """(width, height) of item ``i`` (loads it)."""
        image = self.read(i)
        if isinstance(image, np.ndarray):
            return int(image.shape[1]), int(image.shape[0])
        return header_size(io.BytesIO(image)) if isinstance(image, bytes) else image.size


def _as_image(image: Any, i: int, what: str) -> Any:
    """An item's image (or mask) as PIL image, bytes or array; a clear error for anything else."""
    if isinstance(image, Mapping) and "bytes" in image:  # a Hugging Face Image feature with decode=False
        image = image["bytes"]
    if isinstance(image, (bytearray, memoryview)):
        image = bytes(image)
    if not isinstance(image, (bytes, np.ndarray)) and not hasattr(image, "getbands"):
        raise TypeError(f"dataset item {i}: {what} is a {type(image).__name__}; the loader takes PIL images, "
                        "encoded bytes or uint8 arrays (give the dataset no tensor transform)")
    return image
