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
    # the loader and batch assembly pull in torch; import them on first use
    if name == "APTLoader":
        from .loader import APTLoader
        return APTLoader
    if name == "pack_images":
        from .assemble import pack_images
        return pack_images
    if name == "warmup":
        from .scoring.warmup import warmup
        return warmup
    raise AttributeError(f"module 'apt_data' has no attribute {name!r}")
