"""Fuzzing the decoder: mutated real JPEG/PNG/BMP/TIFF/GIF files give a decoded image or a
ValueError naming the file, never anything else; a skip-mode loader over a folder of them never
stops and yields every good sample once."""
import inspect
import io
import random
import struct
import warnings
import zlib
from collections import Counter

import pytest
from PIL import Image

from apt_data import APTConfig
from apt_data.image import decode_image
from apt_data.loader import APTLoader
from conftest import IMAGE_PATHS

SIZES = (0, 1, 7, 255, 30000, 65535, 2**31 - 1, 2**32 - 1)


def _seed_files() -> list[tuple[str, bytes]]:
    """Small real photos (64x48) in every format and a few modes, and one full-size real JPEG."""
    out = [("JPEG", IMAGE_PATHS[0].read_bytes())]
    for k, p in enumerate(IMAGE_PATHS[:4]):
        with Image.open(p) as im:
            small = im.convert("RGB").resize((64, 48), Image.BICUBIC)
        exif = Image.Exif()
        exif[0x0112] = 6
        variants = [(small, "JPEG", {}), (small, "JPEG", {"exif": exif.tobytes(), "progressive": k % 2 == 0}),
                    (small, "PNG", {}), (small.convert("P"), "PNG", {}), (small.convert("L"), "PNG", {}),
                    (small.convert("RGBA"), "PNG", {}), (small, "BMP", {}), (small.convert("P"), "BMP", {}),
                    (small, "TIFF", {}), (small.convert("L"), "TIFF", {}), (small, "GIF", {}),
                    (small.convert("1"), "PNG", {})]
        for img, fmt, kw in variants:
            buf = io.BytesIO()
            img.save(buf, fmt, **kw)
            out.append((fmt, buf.getvalue()))
    return out


SEEDS = _seed_files()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A real 16x16 PNG whose IHDR says ``width x height`` (CRC fixed): 900 Mpixel in 1 kB."""
    buf = io.BytesIO()
    with Image.open(IMAGE_PATHS[1]) as im:
        im.convert("RGB").resize((16, 16)).save(buf, "PNG")
    d = bytearray(buf.getvalue())
    d[16:24] = struct.pack(">II", width, height)
    d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])))
    return bytes(d)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One seeded mutation: bit flips, a truncation, header byte edits, a size field or a spliced run."""
    d = bytearray(data)
    op = rng.randrange(6)
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(d))
            d[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        d = d[:rng.randrange(1, len(d))]
    elif op == 2:  # header bytes, magic included
        for _ in range(rng.randint(1, 3)):
            d[rng.randrange(min(len(d), 64))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif op == 3:  # a 16- or 32-bit size field in the header, either byte order
        i = rng.randrange(min(len(d), 48))
        fmt = rng.choice([">I", "<I", ">H", "<H"])
        v = rng.choice(SIZES) & (0xFFFF if fmt[1] == "H" else 0xFFFFFFFF)
        d[i:i + struct.calcsize(fmt)] = struct.pack(fmt, v)
    elif op == 4:
        i = rng.randrange(len(d))
        d[i:i + rng.randint(1, 32)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 32)))
    else:  # a bit flip plus a truncation
        i = rng.randrange(len(d))
        d[i] ^= 1 << rng.randrange(8)
        d = d[:rng.randrange(max(1, len(d) // 2), len(d) + 1)]
    return bytes(d)


def fuzz_cases(n: int, seed: int) -> list[tuple[str, str, bytes]]:
    rng = random.Random(seed)
    cases = []
    for k in range(n):
        fmt, data = SEEDS[k % len(SEEDS)]
        cases.append((f"case{k}.{fmt.lower()}", fmt, mutate(rng, data)))
    return cases


def test_mutated_files_decode_or_raise_value_error():
    outcomes = Counter()
    for k, (name, fmt, data) in enumerate(fuzz_cases(3000, seed=0)):
        for args, kw in (((64,), {"name": name}), ((), {"exif_transpose": k % 3 == 0})):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DecompressionBombWarning, "Corrupt EXIF data", ...
                try:
                    out = decode_image(data, *args, **kw)
                except ValueError as e:
                    assert (name if kw.get("name") else "bytes>") in str(e)
                    outcomes["ValueError"] += 1
                    continue
                except Exception as e:  # pragma: no cover - the failure this test exists for
                    pytest.fail(f"{name} ({fmt}, seed 0 case {k}): {type(e).__name__}: {e}")
            assert out.dtype.name == "uint8" and out.ndim == 3 and out.shape[2] == 3
            if args:
                assert out.shape == (64, 64, 3)
            outcomes["ok"] += 1
    # both outcomes are exercised
    assert outcomes["ok"] > 500 and outcomes["ValueError"] > 500, outcomes


def test_decompression_bomb_names_the_file(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    assert path.stat().st_size < 10_000
    for src, label in ((path, "bomb.png"), (bomb_png(), "sample-3")):
        with pytest.raises(ValueError, match=f"{label}.*decompression bomb"):
            decode_image(src, 224, name=None if src is path else label)


def _photo_folder(root, n: int):
    for k in range(n):
        d = root / f"class{k % 3}"
        d.mkdir(parents=True, exist_ok=True)
        p = IMAGE_PATHS[k % len(IMAGE_PATHS)]
        with Image.open(p) as im:
            im.convert("RGB").resize((96, 80), Image.BICUBIC).save(d / f"good{k}.jpg", quality=90)


def test_loader_skips_bomb_and_mutated_files(tmp_path, caplog):
    root = tmp_path / "data"
    _photo_folder(root, 12)
    (root / "class1" / "bomb.png").write_bytes(bomb_png())
    loader = APTLoader(root, APTConfig(), max_tokens=1200, num_workers=0, train=False)
    keys = [k for batch, _ in loader for k in batch.keys]
    assert sorted(keys) == sorted(f"class{k % 3}/good{k}.jpg" for k in range(12))
    assert loader.stats.skipped_keys == ["class1/bomb.png"]
    assert "bomb.png" in caplog.text

    # ~50 mutated files among the good ones: every file that decodes is yielded once, the rest skipped
    for k, (name, fmt, data) in enumerate(fuzz_cases(50, seed=1)):
        (root / f"class{k % 3}" / name).write_bytes(data)
    # most of the folder is bad on purpose: allow any share of skips where the loader caps it
    allow = {"max_skip_fraction": 1.0} if "max_skip_fraction" in inspect.signature(APTLoader).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = APTLoader(root, APTConfig(), max_tokens=1200, num_workers=0, train=False, **allow)
        good = set()
        for key in loader.source.keys:  # the files the folder source lists (its image extensions)
            try:
                decode_image(root / key, 224)
                good.add(key)
            except ValueError:
                pass
        keys = [k for batch, _ in loader for k in batch.keys]
    assert len(loader.source.keys) >= 40 and len(good) >= 12 + 5
    assert sorted(keys) == sorted(good)
    assert len(keys) == len(set(keys))
    assert sorted(loader.stats.skipped_keys) == sorted(set(loader.source.keys) - good)


# ----------------------------------------------------------------------------- HTTP answers
FILE = bytes(random.Random(7).randrange(256) for _ in range(6000))  # the "shard" the fuzzed server serves
HTTP_DEADLINE = 1.0


def _chunked(body: bytes, rng: random.Random, broken: bool) -> bytes:
    """``body`` in chunks of random sizes (hex, sometimes with extensions); ``broken``: one bad chunk size."""
    out, i = b"", 0
    while i < len(body):
        n = rng.randint(1, max(1, len(body) - i))
        size = f"{n:x}" + (";x=y" if rng.random() < 0.2 else "")
        if broken and rng.random() < 0.5:
            size = rng.choice(["zz", "-1", f"{n + rng.randint(1, 99):x}", "", "f" * 20])
            broken = False
        out += size.encode() + b"\r\n" + body[i:i + n] + b"\r\n"
        i += n
    return out + (b"0\r\n\r\n" if not broken else b"q\r\n\r\n")


def _right_answer(rng: random.Random, start: int, last: int) -> bytes:
    """A right answer for bytes ``start..last`` of `FILE`, in one of the framings a server may choose."""
    want = FILE[start:last + 1]
    framing = rng.choice(["length", "chunked", "close", "whole file"])
    if framing == "whole file":  # Range ignored: 200 and the whole file
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s<close>" % (len(FILE), FILE)
    head = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\n" % (start, last, len(FILE))
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n%s<close>" % (len(want), want)
    if framing == "chunked":
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(want, rng, False) + b"<close>"
    return head + b"\r\n" + want + b"<close>"


def http_answer(rng: random.Random, start: int, end: int):
    """One seeded answer to ``Range: bytes=start-(end-1)`` of `FILE`: a right one, or one broken in its
    status line, headers, framing (lengths, chunks) or by an early close; some trickle, ignore the
    range (200 and the whole file) or redirect. Returns (raw answer or a function, what a right read
    gives)."""
    from http_server import trickle

    last = min(end, len(FILE)) - 1
    want = FILE[start:last + 1]
    if rng.random() < 0.4:
        return _right_answer(rng, start, last), want
    status = rng.choice([b"HTTP/1.1 206 Partial Content"] * 6 + [
        b"HTTP/1.0 206 Partial Content", b"HTTP/1.1 200 OK", b"HTTP/1.1 503 Slow Down", b"HTTP/1.1 404 Not Found",
        b"HTTP/1.1 302 Found", b"HTTP/1.1 2x6 Partial", b"HTTP/9.9 206 X", b"ICY 200 OK", b"", b"HTTP/1.1 206"])
    body = FILE if status.endswith(b"200 OK") else want
    head = []
    if b"206" in status and rng.random() < 0.9:
        a, b = (start, last) if rng.random() < 0.85 else (start + rng.randint(-3, 3), last + rng.randint(-3, 3))
        head.append(f"Content-Range: bytes {a}-{b}/{rng.choice([len(FILE), '*', len(FILE) + 5])}")
    if b"302" in status and rng.random() < 0.5:
        head.append("Location: /elsewhere.tar")
    framing = rng.choice(["length", "length", "chunked", "close", "wrong length", "negative", "garbage"])
    if framing == "length":
        head.append(f"Content-Length: {len(body)}")
    elif framing == "wrong length":
        head.append(f"Content-Length: {len(body) + rng.choice([-50, -1, 1, 10**9])}")
    elif framing == "negative":
        head.append("Content-Length: -1")
    elif framing == "garbage":
        head.append(rng.choice(["Content-Length: 12abc", "Content-Length: 5, 6", "Content-Length:"]))
    elif framing == "chunked":
        head.append("Transfer-Encoding: chunked")
        body = _chunked(body, rng, broken=rng.random() < 0.3)
    for _ in range(rng.choice([0, 0, 1, 5, 150])):  # extra headers: over 100 is an error
        head.append(f"X-{rng.randrange(10**6)}: " + "v" * rng.choice([1, 100, 5000, 70_000]))
    if rng.random() < 0.05:
        head.append("no colon at all")
    raw = status + b"\r\n" + "".join(h + "\r\n" for h in head).encode("latin-1") + b"\r\n" + body
    if rng.random() < 0.2:  # an early close, anywhere
        raw = raw[:rng.randrange(len(raw) + 1)]
    if rng.random() < 0.04:  # the rest one byte at a time: the deadline ends it
        cut = rng.randrange(len(raw) + 1)
        return trickle(raw[:cut], every=0.3, byte=raw[cut:cut + 1] or b"x"), want
    return raw + b"<close>", want


def test_fuzzed_http_answers_give_the_right_bytes_or_a_counted_error():
    """Seeded answers against the client (through `Retrying`, no retries: every error counted): no read
    outlives the deadline, none buffers more than its range and a constant, and each gives the bytes
    asked (`FILE`'s) or raises an OSError naming the URL, counted as failed."""
    import sys
    import time
    import tracemalloc
    from pathlib import Path

    from apt_data.sources.http import HEADER_BYTES, HTTPReader
    from apt_data.sources.readers import Retrying

    sys.path.insert(0, str(Path(__file__).parent))
    from http_server import RawServer

    rng = random.Random(2024)
    http = HTTPReader(deadline=HTTP_DEADLINE, read_timeout=HTTP_DEADLINE)
    reader = Retrying(http, retries=0)
    outcomes = Counter()
    with RawServer([b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-0/1\r\n\r\nx<close>"]) as srv:
        assert http.read(srv.url(), 0, 1) == b"x"  # urllib3's one-time set-up, before measuring
    http.close()
    tracemalloc.start()
    try:
        for case in range(300):
            start = rng.randrange(len(FILE) - 10)
            end = start + rng.choice([1, 10, 700, 3000, 10_000])
            answer, want = http_answer(rng, start, end)
            with RawServer([answer]) as srv:
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                t0 = time.monotonic()
                try:
                    got = reader.read(srv.url(), start, end)
                    assert got == want, f"case {case}: wrong bytes ({len(got)} of {len(want)})"
                    outcomes["right bytes"] += 1
                except OSError as e:
                    assert srv.url() in str(e), f"case {case}: {e}"
                    outcomes["error"] += 1
                took = time.monotonic() - t0
                peak = tracemalloc.get_traced_memory()[1] - base
            assert took < HTTP_DEADLINE + 3.0, f"case {case}: {took:.1f} s"  # the bound: deadline plus slack
            assert peak < (end - start) + 16 * HEADER_BYTES, f"case {case}: {peak} bytes for {end - start}"
            http.close()  # a fresh pool per server
    finally:
        tracemalloc.stop()
    stats = reader.stats()
    assert stats["requests"] == 300 and stats["failed"] == outcomes["error"] and stats["retries"] == 0
    assert outcomes["right bytes"] > 100 and outcomes["error"] > 100, outcomes
