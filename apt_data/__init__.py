"""apt_data: the CPU half of Adaptive Patch Transformers.

Decode, score every patch at several scales (Numba), choose patch sizes with a quadtree, and
(later stages) extract token pixels and pack images into token-budget batches.
"""
from .config import SCORER_NAMES, APTConfig
from .image import check_image, decode_image, load_image, to_rgb_uint8
from .layout import PatchLayout, patchify
from .scoring import score_maps

__all__ = [
    "APTConfig", "PatchLayout", "SCORER_NAMES",
    "check_image", "decode_image", "load_image", "patchify", "score_maps", "to_rgb_uint8",
    "warmup",
]


def warmup() -> None:
    """Run every kernel once on a tiny image so their compiled code is loaded.

    Call it in the parent process before DataLoader workers fork: the workers then inherit the
    compiled code instead of each loading or compiling it (~0.7 s each without the disk cache).
    """
    import numpy as np

    img = np.zeros((64, 64, 3), np.uint8)
    img[::2] = 200
    for scorer in SCORER_NAMES:
        patchify(img, APTConfig(patch_size=16, num_scales=3, scorer=scorer)).scale_grid()
        score_maps(img, 16, 3, scorer)
        score_maps(img[:, :, 0], 16, 3, scorer)
