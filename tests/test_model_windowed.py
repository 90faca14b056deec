"""APT on windowed ViTs (timm's SAM image encoder): window-compatible layouts, parity with timm with
no reduction (ViT-B at 1024 and small configs at sizes that are not window multiples), the
documented mixed-scale semantics against a float64 reference, backends, gradients, errors."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from apt_data import APTConfig, pack_images, patchify
from apt_data.windows import count_straddling, pack_windowed, patchify_windowed, split_for_windows
from apt_model import APTWindowedViT, dense_features, from_timm, to_dense
from apt_model.window_plan import plan_windows
from conftest import IMAGE_PATHS, load_resized, timm_input

NO_REDUCTION = APTConfig(thresholds=(-np.inf, -np.inf))
REDUCED = APTConfig(thresholds=(5.5, 4.0))


def randomize_positions(model, std=0.5):
    """timm initialises rel-pos tables and pos_embed to zeros: give them values so they are tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.normal_(0, std)
    return model


def small_sam(img_size=448, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(embed_dim=96, depth=4, num_heads=3, global_attn_indexes=(1, 3), img_size=img_size, neck_chans=32)
    args.update(kw)
    return randomize_positions(timm.create_model("samvit_base_patch16", pretrained=False, **args)).eval()


# --------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("window", [14, 7, 10])
def test_window_layouts_fit_windows_and_tile_the_image(window):
    img = load_resized(IMAGE_PATHS[2], (1024, 768))
    plain = patchify(img, REDUCED)
    assert count_straddling(plain, window) > 0  # the plain quadtree does cross 14-cell borders here
    for lay in (patchify_windowed(img, REDUCED, window), split_for_windows(plain, window)):
        assert count_straddling(lay, window) == 0
        grid = lay.scale_grid()
        assert (grid >= 0).all()                                            # every cell covered ...
        assert int((lay.sizes.astype(np.int64) ** 2).sum()) == 1024 * 768  # ... exactly once
        order = np.lexsort((lay.x, lay.y, -lay.scale.astype(np.int64)))
        assert np.array_equal(order, np.arange(len(lay)))                   # PatchLayout order kept
        assert len(plain) <= len(lay) < plain.uniform_tokens
    # split only touches the straddling tokens
    sp = split_for_windows(plain, window)
    f = 1 << plain.scale.astype(np.int64)
    ok = ~(((plain.y // 16) % window + f > window) | ((plain.x // 16) % window + f > window))
    kept = set(zip(plain.y[ok].tolist(), plain.x[ok].tolist(), plain.scale[ok].tolist()))
    assert kept <= set(zip(sp.y.tolist(), sp.x.tolist(), sp.scale.tolist()))


def test_window_multiple_of_largest_patch_changes_nothing():
    img = load_resized(IMAGE_PATHS[2], 1024)
    plain = patchify(img, REDUCED)
    for lay in (patchify_windowed(img, REDUCED, 16), split_for_windows(plain, 16), patchify_windowed(img, REDUCED, 0)):
        assert np.array_equal(lay.y, plain.y) and np.array_equal(lay.scale, plain.scale)


def test_windowed_layouts_reduce_tokens_on_real_images_at_1024():
    counts = [len(patchify_windowed(load_resized(p, 1024), REDUCED, 14)) for p in IMAGE_PATHS[:8]]
    assert np.mean(counts) < 0.85 * 4096, counts


# ---------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("size", [448, (384, 512), 480, (224, 320)])
def test_no_reduction_equals_timm_small(size):
    """Grids 28 (window multiple), 24x32, 30 and 14x20 (padded to window multiples as timm, pad cells
    as keys); other sizes than the model's resample pos_embed and the global rel-pos tables."""
    model = small_sam()
    apt = from_timm(model).eval()
    assert isinstance(apt, APTWindowedViT) and apt.window_size == 14
    images = [load_resized(p, size) for p in IMAGE_PATHS[:2]]
    batch = pack_windowed(images, NO_REDUCTION, window=apt.window_size)
    with torch.no_grad():
        want = model.forward_features(timm_input(images, model))
        for backend in ("segments", "padded"):
            apt.attn_backend = backend
            got = apt.forward_dense(batch)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-4, backend
        assert torch.equal(dense_features(apt, batch), got)


def test_without_relative_positions_uses_varlen_attention():
    """use_rel_pos=False: windowed and global segments go through apt_model's varlen_attention."""
    model = small_sam(use_rel_pos=False)
    apt = from_timm(model).eval()
    images = [load_resized(p, s) for p, s in zip(IMAGE_PATHS[:2], ((384, 512), (384, 512)))]
    with torch.no_grad():
        want = model.forward_features(timm_input(images, model))
        full = pack_windowed(images, NO_REDUCTION, window=14, num_padding=2)
        reduced = pack_windowed(images, REDUCED, window=14, num_padding=2)
        outs = []
        for backend in ("segments", "padded", "dense"):
            apt.attn_backend = backend
            assert (apt.forward_dense(full) - want).abs().max().item() <= 1e-4, backend
            outs.append(apt.forward_dense(reduced))
    assert all((o - outs[0]).abs().max().item() <= 1e-5 for o in outs[1:])


def test_no_reduction_equals_timm_samvit_224_head():
    """samvit_base_patch16_224 layout (no abs pos, LayerNorm2d neck, classifier head), reduced depth."""
    torch.manual_seed(1)
    model = randomize_positions(timm.create_model("samvit_base_patch16_224", pretrained=False, depth=3,
                                                  global_attn_indexes=(1,), num_classes=10)).eval()
    apt = from_timm(model).eval()
    images = [load_resized(p, 224) for p in IMAGE_PATHS[4:7]]
    with torch.no_grad():
        got = apt(pack_windowed(images, NO_REDUCTION, window=14))
        want = model(timm_input(images, model))
    assert got.shape == (3, 10)
    assert (got - want).abs().max().item() <= 1e-4


def test_no_reduction_equals_timm_samvit_base_1024():
    """The real thing: SAM ViT-B/16 encoder (12 blocks, 14-cell windows padded 64 -> 70, global blocks
    2/5/8/11, rel pos, neck), random weights, a real photo at 1024 px."""
    torch.manual_seed(0)
    model = randomize_positions(timm.create_model("samvit_base_patch16", pretrained=False)).eval()
    apt = from_timm(model).eval()
    images = [load_resized(IMAGE_PATHS[0], 1024)]
    batch = pack_windowed(images, NO_REDUCTION, window=14)
    with torch.no_grad():
        want = model.forward_features(timm_input(images, model))
        got = apt.forward_dense(batch)
    assert got.shape == want.shape == (1, 256, 64, 64)
    err = (got - want).abs().max().item()
    assert err <= 1e-4, err


# ------------------------------------------------------------ mixed scales: float64 reference


def _timm_table(rel_pos, size):
    """The [2*size-1, d] table timm's get_rel_pos indexes (resized by timm's own code)."""
    from timm.models.vision_transformer_sam import get_rel_pos

    R = get_rel_pos(size, size, rel_pos)  # R[q, k] = table[q - k + size - 1]
    return torch.cat([R[0].flip(0)[:-1], R[:, 0]])


def _ref_attention(attn, X, cy, cx, grid):
    """One segment: SAM attention with the documented mixed-scale rel-pos (centres, linear
    interpolation at fractional offsets), written out pair by pair in float64."""
    n = X.shape[0]
    H, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(X).view(n, 3, H, d).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    for c, param, size in ((cy, attn.rel_pos_h, grid[0]), (cx, attn.rel_pos_w, grid[1])):
        table = _timm_table(param, size)
        c = torch.tensor(c, dtype=torch.float64)
        t = c[:, None] - c[None, :] + size - 1
        lo = t.floor().long()
        fr = (t - lo)[..., None]
        rel = table[lo] * (1 - fr) + table[(lo + 1).clamp(max=2 * size - 2)] * fr   # [n, n, d]
        logits = logits + torch.einsum("hid,ijd->hij", q, rel)
    o = logits.softmax(-1) @ v
    return attn.proj(o.transpose(0, 1).reshape(n, H * d))


def reference_forward(apt64, batch):
    x = apt64.embed(batch)
    p = batch.patch_size
    toks = [(r, b, y, xx, 1 << s) for s in range(batch.num_scales)
            for (b, y, xx), r in zip(batch.coords[s].tolist(), batch.seq_index[s].tolist())]
    for blk in apt64.blocks:
        xn = blk.norm1(x)
        out = torch.zeros_like(x)
        ws = blk.window_size
        for b, (Hp, Wp) in enumerate(batch.image_sizes):
            h, w = Hp // p, Wp // p
            mine = [t for t in toks if t[1] == b]
            if ws == 0:
                groups = [(mine, [], 0, 0, (h, w))]
            else:
                groups = []
                for wy in range(math.ceil(h / ws)):
                    for wx in range(math.ceil(w / ws)):
                        members = [t for t in mine if t[2] // ws == wy and t[3] // ws == wx]
                        pads = [(a, c) for a in range(wy * ws, wy * ws + ws) for c in range(wx * ws, wx * ws + ws)
                                if a >= h or c >= w]
                        groups.append((members, pads, wy * ws, wx * ws, (ws, ws)))
            for members, pads, oy, ox, grid in groups:
                rows = [t[0] for t in members]
                X = torch.cat([xn[rows], xn.new_zeros(len(pads), xn.shape[1])])
                cy = [t[2] - oy + (t[4] - 1) / 2 for t in members] + [a - oy for a, _ in pads]
                cx = [t[3] - ox + (t[4] - 1) / 2 for t in members] + [c - ox for _, c in pads]
                out[rows] = _ref_attention(blk.attn, X, cy, cx, grid)[: len(rows)]
        x = x + blk.ls1(out)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return x


@pytest.mark.parametrize("sizes, num_padding", [((448, 448), 0), (((384, 512), 480), 3)])
def test_mixed_scales_match_float64_reference(sizes, num_padding):
    model = small_sam()
    apt = from_timm(model).eval()
    apt64 = from_timm(copy.deepcopy(model).double()).eval()
    images = [load_resized(p, s) for p, s in zip(IMAGE_PATHS[2:4], sizes)]
    batch = pack_windowed(images, REDUCED, window=14, num_padding=num_padding)
    assert all(t.shape[0] > 0 for t in batch.pixels)  # all three scales present
    n = sum(batch.seqlens)
    with torch.no_grad():
        want = reference_forward(apt64, batch)[:n]
        for backend in ("segments", "padded"):
            apt.attn_backend = backend
            got, cu = apt.forward_features(batch)
            assert got.shape == (batch.seq_len, 96)
            assert cu.tolist() == [0, *np.cumsum(batch.seqlens + (num_padding,) * bool(num_padding)).tolist()]
            err = (got[:n].double() - want).abs().max().item()
            assert err <= 1e-4, (backend, err)


def test_packed_batch_equals_each_image_alone():
    model = small_sam()
    apt = from_timm(model).eval()
    images = [load_resized(p, s) for p, s in zip(IMAGE_PATHS[5:8], (448, (384, 512), 448))]
    batch = pack_windowed(images, REDUCED, window=14, num_padding=5)
    with torch.no_grad():
        maps = apt.forward_dense(batch)
        assert isinstance(maps, list) and [tuple(m.shape) for m in maps] == [(32, 28, 28), (32, 24, 32), (32, 28, 28)]
        for img, m in zip(images, maps):
            alone = apt.forward_dense(pack_windowed([img], REDUCED, window=14))
            assert (alone[0] - m).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------ errors and plans


def test_tokens_crossing_a_window_border_are_an_error():
    model = small_sam()
    apt = from_timm(model).eval()
    img = load_resized(IMAGE_PATHS[2], (1024, 768))
    plain = pack_images([img], REDUCED, num_prefix_tokens=0)  # the plain quadtree: crosses 14-cell borders
    with pytest.raises(ValueError, match="cross a border of the 14x14-cell attention windows.*pack_windowed"):
        apt.forward_dense(plain)
    with pytest.raises(ValueError, match="num_prefix_tokens=0"):
        apt(pack_windowed([img], REDUCED, window=14, num_prefix_tokens=1))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        pack_windowed([load_resized(IMAGE_PATHS[2], (1000, 768))], REDUCED, window=14)


def test_window_plan_segments():
    """Window segments: image-major, window raster; each holds its tokens plus the pad cells of the
    padded grid (timm pads 24x32 cells to 28x42); every packed row appears exactly once."""
    images = [load_resized(IMAGE_PATHS[9], (384, 512))]
    batch = pack_windowed(images, REDUCED, window=14, num_padding=2)
    seg = plan_windows(batch, 14)
    L = batch.seq_len
    assert seg.num_real == 2 * 3 and len(seg.seqlens) == 7 and seg.seqlens[-1] == 2
    real = seg.gather[seg.gather < L]
    assert np.array_equal(np.sort(real), np.arange(L))
    assert int((seg.gather == L).sum()) == 28 * 42 - 24 * 32
    assert np.array_equal(seg.gather[seg.slots], np.arange(L))
    cells = np.zeros(6, np.int64)  # base cells covered per window, pads included: ws*ws each
    starts = np.cumsum((0,) + seg.seqlens)
    f = np.ones(L + 1, np.int64)
    for s in range(batch.num_scales):
        f[batch.seq_index[s].numpy()] = 1 << s
    f[L] = 1
    for wi in range(6):
        cells[wi] = (f[seg.gather[starts[wi]:starts[wi + 1]]] ** 2).sum()
    assert (cells == 14 * 14).all()


def test_no_host_sync_with_a_plan_on_meta():
    """Given a plan made on the host, the forward + backward never reads a device tensor back."""
    model = small_sam(img_size=224)
    apt = from_timm(model).train()
    images = [load_resized(p, 224) for p in IMAGE_PATHS[:2]]
    batch = pack_windowed(images, REDUCED, window=14, num_padding=2)
    plan = apt.plan(batch)
    apt = apt.to("meta")
    out = apt.forward_dense(batch.to("meta"), plan)
    out.float().mean().backward()
    assert out.device.type == "meta"


def test_rope_models_are_rejected():
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    m = VisionTransformerSAM(img_size=224, embed_dim=64, depth=2, num_heads=2, use_rope=True, use_rel_pos=False,
                             window_size=7, global_attn_indexes=(1,), neck_chans=16)
    with pytest.raises(TypeError, match="rotary"):
        from_timm(m)


def test_from_timm_name_with_local_checkpoint(tmp_path):
    src = small_sam(img_size=224, seed=3)
    ckpt = tmp_path / "sam.pth"
    torch.save({"state_dict": src.state_dict()}, ckpt)
    kw = dict(embed_dim=96, depth=4, num_heads=3, global_attn_indexes=(1, 3), img_size=224, neck_chans=32)
    apt = from_timm("samvit_base_patch16", checkpoint_path=str(ckpt), **kw).eval()
    images = [load_resized(IMAGE_PATHS[1], 224)]
    with torch.no_grad():
        got = apt.forward_dense(pack_windowed(images, NO_REDUCTION, window=14))
        want = src.forward_features(timm_input(images, src))
    assert (got - want).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------- training


def test_gradients_flow_through_repeated_tokens():
    """A per-pixel head on the dense map: each large token's gradient is the sum over the cells it
    was repeated to, and reaches the detail path of every scale; a few steps lower the loss."""
    model = small_sam(img_size=224)
    apt = from_timm(model).train()
    images = [load_resized(IMAGE_PATHS[i], 224) for i in (8, 17)]
    batch = pack_windowed(images, APTConfig(thresholds=(7.5, 7.0)), window=14)
    assert all(t.shape[0] > 0 for t in batch.pixels)
    # to_dense's backward: a token's gradient = the sum of its cells' gradients
    tok = torch.randn(batch.seq_len, 4, requires_grad=True)
    g = torch.randn(2, 4, 14, 14)
    (to_dense(tok, batch) * g).sum().backward()
    for s in range(3):
        f = 1 << s
        for (b, y, x), r in list(zip(batch.coords[s].tolist(), batch.seq_index[s].tolist()))[:5]:
            assert torch.allclose(tok.grad[r], g[b, :, y:y + f, x:x + f].sum((1, 2)), atol=1e-5)
    # through the whole model, with a per-pixel head on the neck's output
    head = torch.nn.Conv2d(32, 1, 1)
    x = torch.from_numpy(np.stack(images)).float().mean(-1)[:, None] / 255
    target = (F.avg_pool2d((x[..., 1:, :] - x[..., :-1, :]).abs()[..., :, :-1]
                           + (x[..., :, 1:] - x[..., :, :-1]).abs()[..., :-1, :], 16, ceil_mode=True) > 0.05).float()
    params = list(apt.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(4):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(apt.forward_dense(batch)), target)
        loss.backward()
        if step == 0:
            for lin in apt.patch_embed.zero_linear:
                assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
            assert apt.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_gradient_checkpointing_and_drop_path():
    model = small_sam(img_size=224, drop_path_rate=0.0)
    apt = from_timm(model).train()
    images = [load_resized(p, 224) for p in IMAGE_PATHS[12:14]]
    batch = pack_windowed(images, REDUCED, window=14)
    out = apt.forward_dense(batch)
    out.square().mean().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in apt.parameters()]
    assert sum(g is not None for g in grads) > 40
    apt.zero_grad()
    apt.set_grad_checkpointing(True)
    out2 = apt.forward_dense(batch)
    out2.square().mean().backward()
    assert torch.allclose(out, out2)
    for a, p in zip(grads, apt.parameters()):
        assert (a is None and p.grad is None) or torch.allclose(a, p.grad, atol=1e-6)
    # drop path (per window in windowed blocks, per image otherwise) changes the output in train mode only
    model = small_sam(img_size=224, drop_path_rate=0.5)
    apt = from_timm(model)
    with torch.no_grad():
        apt.train()
        torch.manual_seed(0)
        a = apt.forward_dense(batch)
        torch.manual_seed(1)
        b = apt.forward_dense(batch)
        apt.eval()
        c = apt.forward_dense(batch)
        d = apt.forward_dense(batch)
    assert not torch.allclose(a, b) and torch.equal(c, d)


def test_bf16_autocast_close_to_fp32():
    apt = from_timm(small_sam(img_size=224)).eval()
    batch = pack_windowed([load_resized(p, 224) for p in IMAGE_PATHS[:2]], REDUCED, window=14, num_padding=3)
    with torch.no_grad():
        ref = apt.forward_dense(batch)
        for backend in ("segments", "padded"):
            apt.attn_backend = backend
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = apt.forward_dense(batch)
            assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max().item() < 0.25


# ---------------------------------------------------------------------------------- tools


def _run(*args, timeout=300):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_bench_sam_prints_tokens_speed_and_parity():
    out = _run("benchmarks/bench_sam.py", "--source", "tests/data/images", "--images", "2", "--size", "448", "--depth", "3")
    rows = [l for l in out.splitlines() if l.startswith("| `tests/data/images` |")]
    assert len(rows) == 1, out
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert len(cells) == 13 and cells[3] == "784" and cells[6] == "0"  # 28 cells: two whole windows, no pads
    assert 0 < float(cells[2].split()[0]) < 784
    assert all(float(cells[i].rstrip("x")) > 0 for i in (7, 8, 9, 10))
    assert float(cells[11]) <= 1e-4  # no reduction == timm, in the same run
    out = _run("benchmarks/bench_sam.py", "--source", "tests/data/images", "--images", "3", "--tokens-only", "--size", "1024")
    row = [l for l in out.splitlines() if l.startswith("| `tests/data/images` |")][0]
    assert 0 < float(row.split("|")[3]) < 4096


def test_dense_example_trains_on_the_sample_shards():
    out = _run("examples/dense_example.py", "--steps", "8", "--batch", "4", "--image-size", "448", "--embed-dim", "64",
               "--depth", "3", "--heads", "2")
    last = out.strip().splitlines()[-1]
    assert last.startswith("val loss after 8 steps")
    after, before = float(last.split()[5]), float(last.split()[7].rstrip(");"))
    assert after < before, last
    steps = [l.split() for l in out.splitlines() if l[:4].strip().isdigit()]
    assert len(steps) == 8
    for s in steps:  # gradients reach the detail path of every large-patch scale present in the batch
        n32, n64 = (int(v) for v in s[4].split("/")[1:])
        assert (float(s[-4]) > 0) == (n32 > 0) and (float(s[-2]) > 0) == (n64 > 0), s
    assert any(int(s[4].split("/")[2]) > 0 for s in steps)
