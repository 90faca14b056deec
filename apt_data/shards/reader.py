"""The one validating shard reader: a sequential stream of a whole shard, or one sample by its index spans.

Both parse tar headers with one small ustar reader (which notices truncation, unlike `tarfile`)
and check samples with `record_from_members`. Random access reads a sample with one positional
read and checks its headers in place, parsing the span as a tar stream only when they differ.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional, Sequence, Union

from .errors import ShardStats, report_bad
from .format import (BLOCK, CHECKSUM, EXTRA_MEMBERS, MEMBERS, SampleRecord, member_checksum, member_column,
                     record_from_members, split_key)
from .urls import expand_urls, open_url

PathLike = Union[str, os.PathLike]
Spans = Mapping[str, tuple[int, int]]  # member extension -> (data offset, size) in its shard

__all__ = ["iter_shard", "iter_shards", "read_record", "read_sample",
           "row_checksums", "row_spans"]


class TarTruncated(Exception):
    pass


class TarCorrupt(Exception):
    pass


def _read_exact(f: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def scan_tar(f: BinaryIO, start: int = 0, until_eof_ok: bool = False) -> Iterator[tuple[str, int, bytes]]:
    """Yield ``(name, data_offset, data)`` for each regular file of a tar stream, in order.

    `TarTruncated` when the stream ends early (fine at a header boundary with ``until_eof_ok``),
    `TarCorrupt` on a bad header checksum; PAX paths and GNU long names are honoured.
    """
    pos = start
    long_name: Optional[str] = None
    while True:
        header = _read_exact(f, BLOCK)
        if len(header) == 0 and until_eof_ok:
            return
        if len(header) < BLOCK:
            raise TarTruncated(None)
        if header == b"\0" * BLOCK:
            return  # end-of-archive marker
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise TarCorrupt(f"bad tar header at byte {pos}: {e}") from None
        name = long_name or info.name
        long_name = None
        pos += BLOCK
        padded = -(-info.size // BLOCK) * BLOCK
        data = _read_exact(f, padded)
        if len(data) < info.size:
            raise TarTruncated(name)
        data = data[:info.size]
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            for m in re.finditer(rb"(\d+) ([^=]+)=", data):
                if m.group(2) == b"path":
                    value = data[m.end():m.start() + int(m.group(1)) - 1]
                    long_name = value.decode("utf-8", "surrogateescape")
        elif info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
            yield name, pos, data
        pos += padded


def scan_samples(f: BinaryIO) -> Iterator[tuple[str, dict[str, tuple[int, bytes]]]]:
    """Yield ``(key, {extension: (data offset, data)})`` for each sample of a tar stream (`scan_tar`).

    A damaged tar raises its error (`TarTruncated`, `TarCorrupt`, `OSError`) with ``.key``, the sample it
    hit; a sample complete before a cut in the next one's first member is yielded first.
    """
    key: Optional[str] = None
    members: dict[str, tuple[int, bytes]] = {}
    try:
        for name, off, data in scan_tar(f):
            k, ext = split_key(name)
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[ext] = (off, data)
    except (TarTruncated, TarCorrupt, OSError) as e:
        e.key = split_key(e.args[0])[0] if isinstance(e, TarTruncated) and e.args[0] else key
        if key is not None and e.key != key:
            yield key, members
        raise
    if key is not None:
        yield key, members


# ------------------------------------------------------------------------------ sequential
def iter_shard(path: PathLike, *, strict: bool = False, stats: Optional[ShardStats] = None,
               validate: bool = False) -> Iterator[SampleRecord]:
    """Stream the samples of one shard in order, without an index: bad samples and a damaged tar are
    logged, counted and skipped, or with ``strict`` raise `ShardDataError` naming shard and key."""
    shard = os.fspath(path)
    try:
        f = open_url(path)
    except OSError as e:
        report_bad(shard, None, "unreadable_shard", str(e), strict, stats)
        return
    with f:
        try:
            for key, members in scan_samples(f):
                rec = record_from_members(shard, key, {ext: data for ext, (_, data) in members.items()},
                                          strict=strict, stats=stats, validate=validate)
                if rec is not None:
                    yield rec
        except TarTruncated as e:
            report_bad(shard, e.key, "truncated_tar",
                       "shard ends inside this sample" if e.args[0] else "shard ends after a member of this "
                       "sample without an end-of-archive marker; the sample may be incomplete", strict, stats)
        except TarCorrupt as e:
            report_bad(shard, e.key, "corrupt_tar", f"{e}; the rest of the shard is skipped", strict, stats)
        except OSError as e:
            report_bad(shard, getattr(e, "key", None), "unreadable_shard", str(e), strict, stats)


def iter_shards(urls: Union[PathLike, Sequence[PathLike]], *, strict: bool = False,
                stats: Optional[ShardStats] = None, validate: bool = False) -> Iterator[SampleRecord]:
    """`iter_shard` over a list of shards or a brace pattern; a bad shard does not stop the rest."""
    for url in expand_urls(urls):
        yield from iter_shard(url, strict=strict, stats=stats, validate=validate)


# ------------------------------------------------------------------------------ random access
def _header_matches(span: bytes, at: int, name: bytes, size: int) -> bool:
    """Is the ustar header at ``span[at:]`` the one of a regular file ``name`` of ``size`` bytes?"""
    h = span[at:at + BLOCK]
    try:
        return (len(h) == BLOCK and h[:100].rstrip(b"\0") == name and h[156:157] in (b"0", b"\0")
                and (h[257:262] != b"ustar" or h[345] == 0)  # no ustar name prefix
                and int(h[124:136].rstrip(b" \0") or b"0", 8) == size)
    except ValueError:
        return False


def _members_at(span: bytes, start: int, key: str, spans: Spans) -> dict[str, bytes]:
    """The members of ``key`` at the index's offsets in ``span``, else `TarCorrupt` / `TarTruncated`."""
    members = {}
    for ext, (off, size) in spans.items():
        if not _header_matches(span, off - BLOCK - start, f"{key}.{ext}".encode(), size):
            break
        members[ext] = span[off - start:off - start + size]
    else:
        return members
    members = {}  # not a plain ustar header: parse the span as a tar stream
    for name, off, data in scan_tar(io.BytesIO(span), start, until_eof_ok=True):
        k, ext = split_key(name)
        if k != key or spans.get(ext, (None,))[0] != off:
            raise TarCorrupt(f"found {name!r} at byte {off}")
        members[ext] = data
    if set(members) != set(spans):
        raise TarCorrupt(f"members {sorted(members)} != index {sorted(spans)}")
    return members


# ------------------------------------------------------------------------------ member checksums
def row_checksums(row: Mapping[str, Any]) -> dict[str, int]:
    """The member checksums of an index row (none for an index of an older build)."""
    crc = {m: row.get(f"{member_column(m)}_{CHECKSUM}") for m in MEMBERS + EXTRA_MEMBERS}
    return image_ext_spans({m: int(v) for m, v in crc.items() if v is not None}, row.get("image_ext"))


def read_record(fetch: Callable[[int, int], bytes], shard: str, key: str, spans: Spans, *,
                strict: bool = False, stats: Optional[ShardStats] = None, validate: bool = False,
                expect_label: Optional[int] = None, parse_meta: bool = True,
                need_label: bool = True, checksums: Optional[Mapping[str, int]] = None) -> Optional[SampleRecord]:
    """Read and check the members ``spans`` of sample ``key`` with one ``fetch(offset, n)`` of ``shard``.

    A rewritten shard is ``index_mismatch``, a member failing its CRC32C (``checksums``) is
    ``checksum_mismatch``; a bad sample is None unless ``strict``. See `record_from_members`.
    """
    if not spans:
        return report_bad(shard, key, "index_mismatch", "row has no member offsets", strict, stats)
    start = min(o for o, _ in spans.values()) - BLOCK
    end = max(o + s for o, s in spans.values())
    length = -(-(end - start) // BLOCK) * BLOCK
    try:
        span = fetch(start, length)
    except OSError as e:
        return report_bad(shard, key, "unreadable_shard", str(e), strict, stats)
    if len(span) < end - start:
        return report_bad(shard, key, "truncated_tar", f"shard has {start + len(span)} bytes, sample ends at {end}",
                          strict, stats)
    span += b"\0" * (length - len(span))  # pad a last member cut exactly at its data end
    try:
        members = _members_at(span, start, key, spans)
    except (TarCorrupt, TarTruncated) as e:
        return report_bad(shard, key, "index_mismatch", f"the shard does not match the index: {e}", strict, stats)
    for ext, want in (checksums or {}).items():
        got = member_checksum(members[ext]) if ext in members and want >= 0 else want
        if got != want:
            return report_bad(shard, key, "checksum_mismatch", f"checksum mismatch in the .{ext} member: the index "
                              f"has {CHECKSUM} {want:08x}, read {got:08x}", strict, stats)
    return record_from_members(shard, key, members, strict=strict, stats=stats, validate=validate,
                               expect_label=expect_label, parse_meta=parse_meta, need_label=need_label)


def row_spans(row: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """The member spans of an index row (members with offset ``-1`` are absent; the image under its
    ``image_ext`` when an index of shards indexed in place names one)."""
    cols = {m: member_column(m) for m in MEMBERS + EXTRA_MEMBERS}
    spans = {m: (int(row[f"{c}_offset"]), int(row[f"{c}_size"])) for m, c in cols.items()
             if f"{c}_offset" in row and int(row[f"{c}_offset"]) >= 0}
    return image_ext_spans(spans, row.get("image_ext"))


def image_ext_spans(spans: dict, ext: Optional[str]) -> dict:
    """``spans`` with the ``jpg`` entry renamed to the image member's real extension ``ext``."""
    if ext and ext != "jpg" and "jpg" in spans:
        spans = {(ext if m == "jpg" else m): v for m, v in spans.items()}
    return spans


def read_sample(row: Mapping[str, Any], root: Optional[PathLike] = None, *, strict: bool = False,
                stats: Optional[ShardStats] = None, validate: bool = False) -> Optional[SampleRecord]:
    """Read one sample with a single positional read from an index row (`read_record` of the row); a bad
    sample is None when ``strict=False`` (logged and counted in ``stats``)."""
    shard = Path(os.fspath(row["shard"]))
    if root is not None and not shard.is_absolute():
        shard = Path(root) / shard

    def fetch(offset: int, n: int) -> bytes:
        with open(shard, "rb") as f:
            f.seek(offset)
            return _read_exact(f, n)

    spans = row_spans(row)
    # shards indexed in place (an ``image_ext`` column) may take labels from a JSON field: no .cls
    need_label = "cls" in spans or "image_ext" not in row or "label" not in row
    return read_record(fetch, str(shard), str(row["key"]), spans, strict=strict, stats=stats,
                       validate=validate, expect_label=int(row["label"]) if "label" in row else None,
                       checksums=row_checksums(row), need_label=need_label)
