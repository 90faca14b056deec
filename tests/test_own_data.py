"""docs/own-data.md runs start to finish on a 120-photo copy: every bash command of it, in a temporary
folder holding a 3-class ``photos/{train,val}`` (40 + 10 real photos a class, from the sample shards),
with a few settings swapped for quicker ones (each swap must apply, so the page and this test cannot
drift apart) and no network (the checkpoint is random weights saved the way the page saves the
downloaded ones). The training log the page quotes is this run's: the test compares it line by line,
the numbers that depend on the weights or the clock aside."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "own-data.md"
sys.path.insert(0, str(ROOT / "tests"))
from conftest import log_messages  # noqa: E402

QUICK = {  # what the page says -> what the test runs
    "pretrained=True": "pretrained=False",  # no network in tests: random weights, saved the same way
    # 224 -> 112 px (a quarter of the tokens), 5 epochs, and 2 workers on any machine (the default is
    # one per core, up to 8; the epoch's batches depend on it)
    "--epochs 30 --warmup-epochs 3": "--epochs 5 --warmup-epochs 1 --img-size 112 --workers 2",
    "--baseline none resize random --uniform": "--baseline none resize random --uniform --workers 0",
    "python tools/": f"{sys.executable} {ROOT}/tools/",
    "python -c": f"{sys.executable} -c",
}
CLASSES = {0: "fish", 6: "truck", 1: "dog"}  # the sample shards' labels: tench, garbage truck, springer
# what depends on the weights (random here, and summed in threads) or on the clock
VOLATILE = re.compile(r"(?<=top-1 )\S+|(?<=top-5 )\S+|(?<=loss )\S+|[\d.]+(?= images/s| s of steps| tokens/s)"
                      r"|(?<=total )[\d.]+(?= s)")


def photos(root: Path) -> None:
    """``photos/{train,val}/{dog,fish,truck}``: the sample shards' 40 training and 10 val photos of 3
    classes, as .jpg (the JPEG bytes as the shards hold them)."""
    for tar in sorted((ROOT / "shards").glob("*.tar")):
        split = "val" if tar.name.startswith("val") else "train"
        with tarfile.open(tar) as t:
            members = {m.name: m for m in t.getmembers()}
            for name, m in members.items():
                label = int(t.extractfile(m).read()) if name.endswith(".cls") else None
                if label in CLASSES:
                    key = name[:-len(".cls")]
                    d = root / "photos" / split / CLASSES[label]
                    d.mkdir(parents=True, exist_ok=True)
                    (d / f"{key}.jpg").write_bytes(t.extractfile(members[key + ".jpg"]).read())


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def stable(lines: list[str]) -> list[str]:
    """The log's lines, the progress lines left out and the weight- or clock-dependent numbers masked."""
    return [VOLATILE.sub("#", line) for line in lines if line and not line.startswith("step ")]


def test_own_data_page_runs_start_to_finish(tmp_path):
    photos(tmp_path)
    assert [len(list((tmp_path / "photos" / s).rglob("*.jpg"))) for s in ("train", "val")] == [120, 30]
    text = PAGE.read_text()
    script = [b.replace("\\\n", " ") for b in blocks(text, "bash")]
    for long, quick in QUICK.items():
        assert any(long in b for b in script), f"docs/own-data.md no longer says {long!r}: update QUICK"
        script = [b.replace(long, quick) for b in script]
    procs = []
    for block in script:  # one at a time: each command's log on its own
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, block + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
        procs.append(proc)
    assert "photos/val:\ndog\nfish\ntruck" in procs[0].stdout  # the ls of step 1
    train = next(p for b, p in zip(script, procs) if "tools/train.py" in b)
    logged = log_messages(train.stderr).splitlines()
    (quoted,) = blocks(text, "text")  # the page's copy of this run's log
    assert stable(logged) == stable(quoted.splitlines()), "\n".join(logged)

    run = tmp_path / "out" / "photos"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # issue 25: every photo in every epoch, evaluations a few steps apart, a warm-up shorter than the run
    epochs = [r for r in recs if r["split"] == "epoch"]
    assert [(r["images"], r["passes"]) for r in epochs] == [(120, 1.0)] * 5 and [r["steps"] for r in epochs] == [2] * 5
    evals = [r["step"] for r in recs if r["split"] == "val"]
    assert evals == [6, 10] and all(b - a >= 4 for a, b in zip(evals, evals[1:]))  # not at every epoch's end
    warmup, total = map(int, re.search(r"; (\d+) steps; .* warmup (\d+) steps", "\n".join(logged)).group(2, 1))
    assert 0 < warmup <= total // 2 and total == 10
    assert list(run.glob("checkpoint-*.pt")) and (run / "curves.png").is_file()
    results = json.loads((run / "eval.json").read_text())["results"]
    assert set(results) == {"none", "resize", "random", "uniform"} and results["none"]["images"] == 30
    assert len(list((run / "layouts").glob("*.layout.png"))) == 10


def test_a_photo_decoded_at_its_own_size_is_cut_to_the_patch_grid():
    """`decode_image(path, multiple=16)` without a size: the centre, cut down to multiples of 16."""
    import numpy as np

    from apt_data import APTConfig
    from apt_data.image import decode_image

    path = sorted((ROOT / "tests/data/images").glob("*.JPEG"))[0]
    full = decode_image(path)
    cut = decode_image(path, multiple=16)
    h, w = full.shape[:2]
    assert cut.shape == (h - h % 16, w - w % 16, 3) and (h % 16 or w % 16)
    top, left = (h % 16) // 2, (w % 16) // 2
    assert np.array_equal(cut, full[top:top + cut.shape[0], left:left + cut.shape[1]])
    from apt_data import patchify

    patchify(cut, APTConfig())  # takes it (the uncut image it rejects)
