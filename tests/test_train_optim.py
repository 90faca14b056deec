"""Layer decay reaches the optimiser, the schedule moves every step, the loss scaling gives the
global-mean gradient, --train-new-only trains only APT's parameters (real batches of the sample shards)."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from apt_data import APTConfig  # noqa: E402
from apt_data.loader import APTLoader  # noqa: E402
from apt_model import from_timm  # noqa: E402
from apt_train.loss import scaled_cross_entropy  # noqa: E402
from apt_train.optim import WarmupCosine, layer_id  # noqa: E402
from apt_train.cli import make_trainer  # noqa: E402

BASE = ["--data", str(ROOT / "shards"), "--max-tokens", "1024", "--no-eval", "--workers", "0", "--quiet",
        "--recipe", "short"]


def group_of(opt, name):
    return next(g for g in opt.param_groups if name in g["param_names"])


def test_layer_decay_reaches_the_param_groups_and_follows_the_schedule(tmp_path):
    tr = make_trainer(BASE + ["--layer-decay", "0.8", "--lr", "1e-3", "--warmup-steps", "2", "--steps", "6",
                              "--output", str(tmp_path)])
    depth = len(tr.model.blocks)
    batch, _ = next(iter(tr.loader))
    seen = []
    for step in range(4):
        loss, lr_used, *_ = tr.train_step(batch)
        opt, lr_next = tr.optimizer, tr.scheduler.lr
        assert lr_used == pytest.approx(tr.scheduler.lr_at(step))
        first, last = group_of(opt, "blocks.0.attn.qkv.weight"), group_of(opt, f"blocks.{depth - 1}.attn.qkv.weight")
        # block i is layer i+1: lr(block 0) / lr(last block) = decay ** (depth - 1)
        assert first["lr"] / last["lr"] == pytest.approx(0.8 ** (depth - 1))
        assert group_of(opt, "head.weight")["lr"] == pytest.approx(lr_next)
        assert group_of(opt, "pos_embed")["lr"] == pytest.approx(lr_next * 0.8 ** (depth + 1))
        assert group_of(opt, "patch_embed.zero_linear.0.weight")["lr"] == pytest.approx(lr_next * 0.8 ** (depth + 1))
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(lr_next * g["lr_scale"]) and g["lr_scale"] == pytest.approx(
                0.8 ** (depth + 1 - g["layer_id"]))
        seen.append(last["lr"])
    # warmup 2 steps then cosine over 6: the lr changes at every step (the reference code's stays flat)
    assert seen == pytest.approx([0.8 * tr.scheduler.lr_at(k + 1) for k in range(4)])
    assert seen[0] == pytest.approx(1e-3 * 0.8) and seen[1] > seen[2] > seen[3] > 0
    # no weight decay on biases, norms, positions and the class token; decay on the weights
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.weight"):
        assert group_of(tr.optimizer, name)["weight_decay"] == 0.0, name
    for name in ("blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"):
        assert group_of(tr.optimizer, name)["weight_decay"] == 0.05, name


def test_layer_ids():
    assert [layer_id(n, 12) for n in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.down.0.weight",
                                       "blocks.0.mlp.fc1.weight", "blocks.11.norm2.bias", "norm.weight", "head.bias",
                                       "fc_norm.weight")] == [0, 0, 0, 0, 1, 12, 13, 13, 13]


def test_warmup_cosine_per_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr_scale": 0.5}], lr=0.0)
    s = WarmupCosine(opt, lr=1.0, total_steps=10, warmup_steps=4, min_lr=0.1)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        s.step()
    assert lrs[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])  # linear warmup, times lr_scale 0.5
    assert lrs[4] == pytest.approx(0.5)  # the peak
    assert lrs[7] == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lrs[10] == pytest.approx(0.05) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    state = s.state_dict()
    opt2 = torch.optim.AdamW([{"params": [p], "lr_scale": 0.5}], lr=0.0)
    s2 = WarmupCosine(opt2, lr=1.0, total_steps=10, warmup_steps=4, min_lr=0.1)
    s2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ddp_loss_scaling_gives_the_global_mean_gradient(smoothing):
    """Two simulated ranks with different numbers of real images: scaling each rank's mean loss by
    B_r * W / N, then averaging the gradients as DDP does, equals the gradient of the mean over all
    images. Plain per-rank means (what DDP gives unscaled) do not."""
    torch.manual_seed(0)
    model = from_timm("vit_tiny_patch16_224", num_classes=10).train()  # no drop path: deterministic
    with torch.no_grad():  # a trained-like start: the detail path and head are not zero
        for prm in model.patch_embed.zero_linear.parameters():
            prm.normal_(0, 0.02)
    batches = []
    for max_tokens, rank in ((1024, 0), (2560, 1)):
        loader = APTLoader(ROOT / "shards", APTConfig(), max_tokens=max_tokens, num_workers=0, seed=rank,
                           pin_memory=False, num_prefix_tokens=1)
        batches.append(next(iter(loader))[0])
    n = [b.num_images for b in batches]
    assert n[0] != n[1]
    N = torch.tensor(float(sum(n)))

    ref = copy.deepcopy(model)
    total = sum(F.cross_entropy(ref(b), b.labels, label_smoothing=smoothing, reduction="none").sum() for b in batches)
    (total / sum(n)).backward()
    want = _grads(ref)

    ddp_avg, naive = {}, {}
    for b in batches:
        for scaled, acc in ((True, ddp_avg), (False, naive)):
            model.zero_grad(set_to_none=True)
            loss = scaled_cross_entropy(model(b), b.labels, label_smoothing=smoothing,
                                        global_images=N if scaled else None, world_size=2)
            loss.backward()
            for k, g in _grads(model).items():
                acc[k] = acc.get(k, 0) + g / 2  # DDP averages over the 2 ranks
    scale = max(g.abs().max().item() for g in want.values())
    err = max((ddp_avg[k] - want[k]).abs().max().item() for k in want) / scale
    err_naive = max((naive[k] - want[k]).abs().max().item() for k in want) / scale
    print(f"relative error: scaled {err:.2e}, naive {err_naive:.2e}")
    assert err < 1e-4, err
    assert err_naive > 100 * err and err_naive > 1e-3, (err_naive, err)


def test_train_new_only_changes_only_apt_parameters(tmp_path):
    tr = make_trainer(BASE + ["--train-new-only", "--lr", "1e-3", "--steps", "2", "--output", str(tmp_path)])
    new = {n for n, _ in tr.model.named_parameters() if n.startswith(("patch_embed.down.", "patch_embed.zero_linear."))}
    assert {n for n, p in tr.model.named_parameters() if p.requires_grad} == new
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    it = iter(tr.loader)
    for _ in range(2):
        tr.train_step(next(it)[0])
    after = tr.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= new, changed - new
    assert "patch_embed.zero_linear.0.weight" in changed
