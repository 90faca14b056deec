"""Shared fixtures: the real photographs shipped in tests/data/images (see ATTRIBUTION.md); reading a
command's log."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).parent / "data"
IMAGE_DIR = DATA / "images"
IMAGE_PATHS = sorted(IMAGE_DIR.glob("*.JPEG"))
assert len(IMAGE_PATHS) >= 20, f"test images missing from {IMAGE_DIR}"


def load_resized(path: Path, size: int | tuple[int, int], mode: str = "RGB") -> np.ndarray:
    """Decode a real photo and resize it to ``size`` (int: square; (H, W) otherwise)."""
    h, w = (size, size) if isinstance(size, int) else size
    with Image.open(path) as im:
        return np.array(im.convert(mode).resize((w, h), Image.BICUBIC))


@pytest.fixture(scope="session")
def image_paths() -> list[Path]:
    return IMAGE_PATHS


@pytest.fixture(scope="session")
def real_images_224() -> list[np.ndarray]:
    return [load_resized(p, 224) for p in IMAGE_PATHS]


def timm_input(images: list[np.ndarray], model, device: str = "cpu"):
    """What a timm model is fed for ``images`` (uint8 HxWx3): floats normalised with its mean/std."""
    import torch

    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg.get("mean", (0.5,) * 3), device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.5,) * 3), device=device).view(1, 3, 1, 1)
    x = torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i in images]).to(device).float() / 255
    return (x - mean) / std


#: what the commands' log handler puts before a message off a terminal (apt_train.commands.common.setup_logging)
LOG_PREFIX = r"(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [A-Z]+ [\w.]+: )?"


def log_messages(text: str) -> str:
    """A command's stderr with each log line's timestamp, level and logger taken off: the messages."""
    return re.sub(rf"^{LOG_PREFIX}", "", text, flags=re.M)
