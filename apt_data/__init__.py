"""apt_data: the CPU half of Adaptive Patch Transformers.

Decode, score every patch at several scales (Numba), choose patch sizes with a quadtree, extract
token pixels and pack images into token-budget batches.
"""
import importlib

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

#: the loader and batch assembly pull in torch: imported on first use
_LAZY = {"APTLoader": ".loader", "pack_images": ".assemble", "warmup": ".scoring.warmup"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'apt_data' has no attribute {name!r}")
