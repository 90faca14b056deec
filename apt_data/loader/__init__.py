"""`APTLoader` (`apt_data.loader.driver`) and its two packing strategies: planned
(`apt_data.loader.planned`) and streamed (`apt_data.loader.streamed`, over `apt_data.loader.stream`)."""
from ..pipeline import LayoutFn, LoaderStats, TooManySkipped, sample_seed
from ..sources import Source, open_source
from .driver import PACKINGS, APTLoader

__all__ = ["APTLoader", "LayoutFn", "LoaderStats", "PACKINGS", "Source", "TooManySkipped", "open_source", "sample_seed"]
