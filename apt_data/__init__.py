"""apt_data: the CPU half of Adaptive Patch Transformers.

Decode, score every patch at several scales (Numba), choose patch sizes with a quadtree, and
(later stages) extract token pixels and pack images into token-budget batches.
"""
from .batch import PackedBatch
from .binpack import pack_greedy
from .config import SCORER_NAMES, APTConfig
from .image import check_image, decode_image, load_image, to_rgb_uint8
from .layout import PatchLayout, layout_from_scores, patchify
from .listing import list_image_folder
from .scoring import score_maps
from .shards import SampleRecord, ShardDataError, ShardStats, iter_shards, read_index, read_sample
from .transforms import ImageTransform, transform_from_data_config

__all__ = [
    "APTConfig", "PatchLayout", "PackedBatch", "SCORER_NAMES", "ImageTransform",
    "check_image", "decode_image", "load_image", "patchify", "layout_from_scores", "score_maps", "to_rgb_uint8",
    "pack_greedy", "transform_from_data_config",
    "read_index", "read_sample", "iter_shards", "list_image_folder", "SampleRecord", "ShardStats", "ShardDataError",
    "APTLoader", "pack_images", "warmup",
]


def __getattr__(name):
    # the loader and packing pull in torch.utils.data; import them on first use
    if name == "APTLoader":
        from .loader import APTLoader
        return APTLoader
    if name == "pack_images":
        from .packing import pack_images
        return pack_images
    raise AttributeError(f"module 'apt_data' has no attribute {name!r}")


def warmup() -> None:
    """Run every kernel once on a tiny image so their compiled code is loaded.

    Call it in the parent process before DataLoader workers fork: the workers then inherit the
    compiled code instead of each loading or compiling it. Covers every registered scorer.
    """
    import numpy as np

    img = np.zeros((64, 64, 3), np.uint8)
    img[::2] = 200
    from .packing import extract_tokens
    from .scoring import scorer_names

    # decode_image returns read-only arrays (views of Pillow's buffer), which Numba compiles separately
    readonly = img.copy()
    readonly.flags.writeable = False
    for im in (img, readonly):
        lay = patchify(im, APTConfig(thresholds=(-np.inf, -np.inf)))
        outs = tuple(np.empty((len(lay) if s == 0 else 0, 3, 16 << s, 16 << s), np.uint8) for s in range(3))
        extract_tokens(im, lay.y, lay.x, lay.scale, 16, outs, np.zeros(3, np.int64))
        for scorer in scorer_names():  # every registered scorer, built-in or not
            cfg = APTConfig(patch_size=16, num_scales=3, thresholds=(1.0, 1.0), scorer=scorer)
            patchify(im, cfg).scale_grid()
            score_maps(im, 16, 3, scorer)
    for scorer in scorer_names():
        score_maps(img[:, :, 0], 16, 3, scorer)
