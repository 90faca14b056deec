"""Shard addresses: webdataset brace notation and ``::`` lists expanded, a path or URL opened for reading."""
from __future__ import annotations

import os
import re
from typing import BinaryIO, Sequence, Union

PathLike = Union[str, os.PathLike]

__all__ = ["expand_urls", "open_url"]


def expand_urls(urls: Union[PathLike, Sequence[PathLike]]) -> list[str]:
    """Expand webdataset brace notation (``train-{000000..000003}.tar``) and ``::`` lists."""
    from braceexpand import braceexpand  # a webdataset dependency

    if isinstance(urls, (str, os.PathLike)):
        urls = os.fspath(urls).split("::")
    return [u for spec in urls for u in braceexpand(os.fspath(spec))]


def open_url(url: PathLike) -> BinaryIO:
    """A local file, or any URL webdataset opens (``pipe:``, ``http(s):``, ...), for binary reading."""
    s = os.fspath(url)
    if re.match(r"^[a-z][a-z0-9+.-]*:", s) and not os.path.exists(s):
        from webdataset import gopen

        return gopen(s, "rb")
    return open(s, "rb")
