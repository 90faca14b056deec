"""``apt-calibrate`` reaches a target token fraction (checked by patchifying the decoded images);
``apt-sweep`` writes its CSV and plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apt_data import APTConfig, ImageTransform, patchify
from apt_data.loader import open_source
from test_evaluate import load_tool

ROOT = Path(__file__).resolve().parents[1]


def patchify_fraction(source: str, thresholds, size: int = 224) -> float:
    """Kept / uniform tokens over every image of ``source``, decoding and scoring each image anew."""
    src = open_source(source)
    tf = ImageTransform(size=size)
    cfg = APTConfig(thresholds=tuple(thresholds))
    kept = sum(len(patchify(tf(src.read(i)), cfg)) for i in range(len(src)))
    return kept / (len(src) * (size // 16) ** 2)


@pytest.mark.parametrize("target", [0.7, 0.5])
def test_calibrate_reaches_the_target_fraction(target, tmp_path, capsys):
    out = tmp_path / "cal.json"
    assert load_tool("calibrate").main(["--target-fraction", str(target), "--samples", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["from_index"] and res["images"] == 400  # the stored score maps, no decoding
    assert abs(res["fraction"] - target) <= 0.005
    # the same thresholds on freshly decoded and scored images keep the same fraction
    assert patchify_fraction(str(ROOT / "shards"), res["thresholds"]) == pytest.approx(res["fraction"], abs=1e-9)
    assert res["thresholds"][0] / 5.5 == pytest.approx(res["thresholds"][1] / 4.0)
    printed, logged = capsys.readouterr()  # the thresholds on stdout, the log on stderr
    assert "use: --thresholds" in printed and "read from the shard index" in logged


def test_calibrate_scores_images_when_the_index_does_not_fit(tmp_path):
    out = tmp_path / "cal.json"
    assert load_tool("calibrate").main(["--target-fraction", "0.75", "--data", str(ROOT / "shards") + ":val",
                                        "--image-size", "192", "--samples", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert not res["from_index"] and abs(res["fraction"] - 0.75) <= 0.01
    assert patchify_fraction(str(ROOT / "shards") + ":val", res["thresholds"], 192) == pytest.approx(res["fraction"])


def test_calibrate_rejects_an_unreachable_target_and_bad_base_thresholds(capsys):
    assert load_tool("calibrate").main(["--target-fraction", "0.01", "--samples", "50"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("apt-calibrate: error: target fraction 0.01 is out of reach") and len(err.splitlines()) == 1
    assert load_tool("calibrate").main(["--target-fraction", "0.5", "--base-thresholds", "5.5"]) == 2
    assert "one value per scale" in capsys.readouterr().err


def test_sweep_writes_csv_and_plot(tmp_path):
    assert load_tool("sweep").main(["--scales", "0.8", "1.3", "--baselines", "random", "--max-batches", "2",
                                    "--workers", "0", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [r["method"] for r in rows] == ["uniform", "APT", "random", "APT", "random"]
    assert rows[0]["token_fraction"] == "1.0"
    frac = [float(r["token_fraction"]) for r in rows]
    assert 1.0 > frac[1] > frac[3] and frac[1] == frac[2] and frac[3] == frac[4]  # higher thresholds: fewer tokens
    assert rows[1]["thresholds"] == "4.4 3.2"
    im = np.asarray(Image.open(tmp_path / "sweep.png"))
    assert im.ndim == 3 and im.shape[0] > 200 and im.shape[1] > 400
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
