"""The `Source` protocol: random-access samples the loader plans over and reads, one image at a time."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from ..config import APTConfig
from ..transforms import ImageTransform

if TYPE_CHECKING:
    from PIL.Image import Image

#: What `Source.read` returns and `ImageTransform` accepts.
ImageData = Union[bytes, "Image", np.ndarray]

__all__ = ["ImageData", "Source", "header_size"]


def header_size(file: Any) -> Optional[tuple[int, int]]:
    """(width, height) from an image's header (a path or a binary file object); None when unreadable."""
    from PIL import Image

    try:
        with Image.open(file) as im:
            return im.size
    except Exception:
        return None


class Source:
    """Random-access samples: ``keys``, int64 ``labels``, ``read(i) -> ImageData`` (bytes, PIL or array);
    subclasses implement `read`, the other methods default to knowing nothing more."""

    keys: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> ImageData:
        """The image of sample ``i`` as the transform accepts it (bytes, PIL image or uint8 array)."""
        raise NotImplementedError

    #: True when every sample has a segmentation mask (`read_mask`)
    has_masks: bool = False
    #: the image size the samples were stored at, when the source knows one (shards do)
    image_size_setting: Optional[int] = None

    def read_mask(self, i: int) -> Optional[Any]:
        """The segmentation mask of sample ``i`` as `apt_data.masks.decode_mask` takes it (None: no masks)."""
        return self.read_with_mask(i)[1]

    def read_with_mask(self, i: int) -> tuple[ImageData, Optional[Any]]:
        """``(image, mask or None)`` of sample ``i`` (a shard source reads both in one read)."""
        return self.read(i), None

    def read_record(self, i: int) -> tuple[ImageData, Optional[Any]]:
        """``(image, record or None)``; a record (`apt_data.shards.SampleRecord`) may carry score maps."""
        return self.read(i), None

    def read_order(self, ids: Sequence[int]) -> None:
        """A hint: the samples this process will read next, in order (a remote source reads ahead
        along it). Local sources ignore it."""

    def read_scores(self, i: int) -> tuple[ImageData, Optional[np.ndarray]]:
        """``(image, stored flat score maps or None)``: what the loader needs of a sample."""
        data, record = self.read_record(i)
        return data, (record.scores if record is not None else None)

    def image_size(self, i: int) -> Optional[tuple[int, int]]:
        """(width, height) of the stored image when known without decoding, else None."""
        return None

    def stored_scores_usable(self, cfg: APTConfig, transform: ImageTransform) -> bool:
        """True when `read_scores` returns score maps from which ``cfg``'s layouts of ``transform``'s
        output can be made (any thresholds)."""
        return False

    def exact_token_counts(self, cfg: APTConfig, transform: ImageTransform) -> Optional[np.ndarray]:
        """Patch tokens per sample (prefix tokens excluded) if known exactly for this setup."""
        return None
