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
