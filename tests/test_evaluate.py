"""``apt-eval`` (tools/evaluate.py) and its baselines on the sample shards; the random baseline's batches; analytic FLOPs."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apt_data import APTConfig
from apt_model import from_timm
from apt_train.evaluation import RandomBaseLayout, eval_loader, random_token_batches
from apt_train.flops import vit_flops

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """The code of ``tools/<name>.py``: the command module ``apt_train.commands.<name>``."""
    return importlib.import_module(f"apt_train.commands.{name}")


def test_evaluate_json_keeps_numbers_as_numbers_and_old_flag_names(tmp_path):
    out = tmp_path / "r.json"  # --json and --baselines: the old names of --output and --baseline
    assert load_tool("evaluate").main(["--baselines", "none", "--max-batches", "1", "--workers", "0",
                                       "--thresholds", "5.5", "4", "--json", str(out)]) == 0
    args = json.loads(out.read_text())["args"]
    assert args["seed"] == 0 and args["max_tokens"] == 4096 and args["max_batches"] == 1
    assert args["thresholds"] == [5.5, 4.0] and args["uniform"] is False and args["baseline"] == ["none"]
    assert args["checkpoint"] is None and args["output"] == str(out)


def test_evaluate_baselines_report_their_token_counts(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert load_tool("evaluate").main(["--baseline", "none", "resize", "random", "--uniform", "--workers", "1",
                                       "--output", str(out)]) == 0
    printed, logged = capsys.readouterr()  # the table on stdout, the log on stderr
    for name in ("| APT |", "| resize |", "| random |", "| uniform |"):
        assert name in printed
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"none", "resize", "random", "uniform"}
    for r in res.values():
        assert r["images"] == 100 and 0 <= r["top1"] <= r["top5"] <= 1 and r["images_per_s"] > 0
        assert r["uniform_tokens"] == 100 * 196
    apt = res["none"]
    # the index's exact count for APTConfig() at 224 px: 83.5% of the grid on train, this on val
    assert apt["tokens"] < res["uniform"]["tokens"] == 100 * 196
    assert res["random"]["tokens"] == res["resize"]["tokens"] == apt["tokens"]
    assert res["uniform"]["token_fraction"] == 1.0 and 0.6 < apt["token_fraction"] < 0.95
    # FLOPs: the uniform grid costs most; dropping the detail path (resize, random) costs a little less
    assert res["uniform"]["flops"] > apt["flops"] > res["resize"]["flops"] == res["random"]["flops"]
    assert "skipped bad samples: none" in logged


def test_random_baseline_keeps_apt_token_counts_per_image_at_base_scale():
    cfg = APTConfig()
    kw = dict(max_tokens=2048, image_size=224, num_prefix_tokens=1, num_workers=0)
    apt = eval_loader(str(ROOT / "shards") + ":val", cfg, **kw)
    assert apt.exact_counts
    seen = 0
    for (a, _), (r, _), in zip(apt, random_token_batches(apt, seed=1)):
        assert r.keys == a.keys and r.seqlens == a.seqlens  # same images, same token count per image
        assert all(p.shape[0] == 0 for p in r.pixels[1:])  # base-scale tokens only
        assert r.pixels[0].shape[0] == sum(a.seqlens) - a.num_images
        seen += a.num_images
    assert seen == 100
    # the kept tokens are the images' own 16-px cells, at their own coordinates, no cell twice
    batch = next(iter(random_token_batches(apt, seed=1)))[0]
    co = batch.coords[0].numpy()
    assert len(np.unique(co, axis=0)) == len(co)
    for b, key in enumerate(batch.keys):
        img = apt.transform(apt.source.read(apt.source.keys.index(key)))
        cells = img.reshape(14, 16, 14, 16, 3).transpose(0, 2, 4, 1, 3)  # [row, col, C, 16, 16]
        mine = co[:, 0] == b
        assert np.array_equal(batch.pixels[0].numpy()[mine], cells[co[mine, 1], co[mine, 2]])
    # another seed draws other cells, same counts
    other = next(iter(random_token_batches(apt, seed=2)))[0]
    assert other.seqlens == batch.seqlens and not torch.equal(other.coords[0], batch.coords[0])
    # the loader's layout_fn: without the index's counts it counts APT's tokens itself, to the same batch
    again = next(iter(apt.with_layout_fn(RandomBaseLayout(seed=1))))[0]
    assert again.keys == batch.keys and torch.equal(again.coords[0], batch.coords[0])


@pytest.mark.parametrize("thresholds,resize_only", [((5.5, 4.0), False), ((5.5, 4.0), True), ((7.0, 5.5), False),
                                                    ((-np.inf, -np.inf), False)])
def test_analytic_flops_match_an_op_counter(thresholds, resize_only):
    """`vit_flops` without the attention products == torch's FlopCounterMode over the GEMMs and
    convolutions of a real forward (it does not see the fused attention kernels); the head's tiny GEMM
    is the only difference."""
    from torch.utils.flop_counter import FlopCounterMode

    model = from_timm("vit_tiny_patch16_224", num_classes=10).eval()
    model.resize_only = resize_only
    loader = eval_loader(str(ROOT / "shards") + ":val", APTConfig(thresholds=thresholds), max_tokens=1500,
                         image_size=224, num_prefix_tokens=1, num_workers=0)
    batch = next(iter(loader))[0]
    assert thresholds[0] == -np.inf or batch.pixels[1].shape[0] > 0
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    head = 2 * model.embed_dim * model.num_classes * batch.num_images
    assert vit_flops(batch, model, attention=False) + head == pytest.approx(counter.get_total_flops(), rel=1e-9)
    attn = len(model.blocks) * 4 * model.embed_dim * sum(n * n for n in batch.seqlens)
    assert vit_flops(batch, model) == vit_flops(batch, model, attention=False) + attn


def test_evaluation_shows_a_progress_bar_on_a_terminal(monkeypatch):
    import io

    import torch

    from apt_model import from_timm
    from apt_train.evaluation import evaluate

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model = from_timm("vit_tiny_patch16_224", num_classes=10)
    loader = eval_loader(str(ROOT / "shards") + ":val", APTConfig(), max_tokens=2048, image_size=224,
                         num_prefix_tokens=1, num_workers=0)
    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        res = evaluate(model, loader, torch.device("cpu"), max_batches=2, progress="eval (step 7)")
        assert res.images > 0
        text = stream.getvalue()
        assert ("eval (step 7)" in text and f"2/{min(2, len(loader))}" in text) == shown, text
