"""APT patch embedding, positional embeddings and attention backends against independent references."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from apt_data import APTConfig
from apt_data.assemble import pack_images
from apt_model import PackedContext, from_timm, resolve_backend, varlen_attention
from apt_model.pos_embed import gather_pos_embed
from conftest import IMAGE_PATHS, load_resized

CFG = APTConfig(thresholds=(7.0, 6.0))  # high thresholds: plenty of 32 and 64 px tokens


@pytest.fixture(scope="module")
def images():
    sizes = [224, (160, 288), (224, 128)]
    return [load_resized(IMAGE_PATHS[i], s) for i, s in zip((21, 23, 16), sizes)]


def normalised(pixels_u8, model):
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    return (pixels_u8.float() / 255 - mean) / std


def test_patch_embed_is_area_resize_plus_detail_path(images):
    """Each scale against a plain conv reference: E(avg_pool(P)) + ZeroLinear(Down^s(E(P)))."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    apt = from_timm(vit)
    pe = apt.patch_embed
    with torch.no_grad():  # make every new parameter non-trivial, so the whole formula is checked
        for m in (*pe.down, *pe.zero_linear):
            m.weight.normal_(0, 0.05)
            m.bias.normal_(0, 0.05)
    batch = pack_images(images, CFG)
    assert all(t.shape[0] > 0 for t in batch.pixels), [t.shape for t in batch.pixels]
    with torch.no_grad():
        for s, pix in enumerate(batch.pixels):
            x = normalised(pix, vit)
            g = 1 << s
            want = vit.patch_embed.proj(F.avg_pool2d(x, g) if s else x).flatten(1)
            if s:
                r = vit.patch_embed.proj(x)  # [T, D, g, g]: the sub-patch embeddings
                for level in range(s):
                    r = F.conv2d(r, pe.down[level].weight, pe.down[level].bias, stride=2)
                want = want + F.linear(r.flatten(1), pe.zero_linear[s - 1].weight, pe.zero_linear[s - 1].bias)
                resize = vit.patch_embed.proj(F.avg_pool2d(x, g)).flatten(1)
                torch.testing.assert_close(pe(pix, s, resize_only=True), resize, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(pe(pix, s), want, atol=1e-4, rtol=1e-4)


def test_new_parameters_start_as_average_and_zero():
    apt = from_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    pe = apt.patch_embed
    r = torch.randn(5, pe.embed_dim, 4, 4)
    for conv in pe.down:  # the 2x2 stride-2 conv is exactly a 2x2 average pool at init
        torch.testing.assert_close(conv(r), F.avg_pool2d(r, 2))
    for lin in pe.zero_linear:
        assert not lin.weight.any() and not lin.bias.any()
    assert len(pe.down) == len(pe.zero_linear) == 2 and len(apt.apt_parameters()) == 8


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_pos_embed_is_timm_resample_per_scale(images, no_embed_class):
    """Scale s reads the pretrained grid resampled (timm's resample_abs_pos_embed) to the scale-s grid."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, no_embed_class=no_embed_class)
    apt = from_timm(vit)
    batch = pack_images(images, CFG)
    npt = 0 if no_embed_class else vit.num_prefix_tokens
    patch_pos = vit.pos_embed[0, npt:]
    with torch.no_grad():
        got = gather_pos_embed(patch_pos, apt.grid_size, batch.coords, batch.image_sizes, 16)
        for s in range(3):
            for b, (H, W) in enumerate(batch.image_sizes):
                gs = (math.ceil(H / 16 / 2**s), math.ceil(W / 16 / 2**s))
                table = resample_abs_pos_embed(vit.pos_embed, gs, old_size=(14, 14), num_prefix_tokens=npt)
                table = table[0, npt:].reshape(gs[0], gs[1], -1)
                mine = batch.coords[s][:, 0] == b
                ys, xs = (batch.coords[s][mine, 1] >> s).long(), (batch.coords[s][mine, 2] >> s).long()
                torch.testing.assert_close(got[s][mine], table[ys, xs], atol=1e-6, rtol=1e-6)


def packed_qkv(seqlens, H=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(seqlens), 3, H, d, generator=g)


def reference_attention(qkv, seqlens):
    """Each segment alone, plain softmax attention in float64."""
    outs, start = [], 0
    for n in seqlens:
        q, k, v = qkv[start:start + n].double().permute(1, 2, 0, 3)  # [H, n, d]
        a = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        outs.append((a @ v).transpose(0, 1))
        start += n
    return torch.cat(outs).float()


@pytest.mark.parametrize("backend", ["segments", "padded", "dense"])
@pytest.mark.parametrize("seqlens, padding", [((197, 64, 130, 5), 0), ((50, 50, 50), 0), ((50, 17, 50), 11)])
def test_varlen_attention_backends_forward_and_backward(backend, seqlens, padding):
    batch = type("B", (), {"seqlens": seqlens, "num_padding": padding})()
    ctx = PackedContext.from_batch(batch, torch.device("cpu"), backend)
    lens = seqlens + ((padding,) if padding else ())
    qkv = packed_qkv(lens).requires_grad_()
    ref_in = qkv.detach().clone().requires_grad_()
    out = varlen_attention(qkv, ctx)
    want = reference_attention(ref_in, lens)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(qkv.grad, ref_in.grad, atol=1e-5, rtol=1e-4)


def test_flash_backend_calls_the_varlen_kernel_with_the_packed_layout(monkeypatch):
    """flash-attn is not installed here: check our call against its documented contract
    (qkv [total, 3, H, d], int32 cu_seqlens incl. the padding segment, max_seqlen int) with a stand-in."""
    import apt_model.attention as A

    calls = []

    def fake_flash(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append((tuple(qkv.shape), cu_seqlens.dtype, cu_seqlens.tolist(), max_seqlen, softmax_scale))
        lens = torch.diff(cu_seqlens).tolist()
        return reference_attention(qkv.float(), lens).to(qkv.dtype)

    monkeypatch.setattr(A, "flash_attn_varlen", lambda: fake_flash)
    batch = type("B", (), {"seqlens": (40, 7, 33), "num_padding": 5})()
    ctx = PackedContext.from_batch(batch, torch.device("cpu"), "dense")
    ctx.backend = "flash"  # resolve_backend only hands out flash on CUDA
    qkv = packed_qkv((40, 7, 33, 5)).bfloat16()
    out = varlen_attention(qkv, ctx, scale=0.25)
    assert calls == [((85, 3, 3, 16), torch.int32, [0, 40, 47, 80, 85], 40, 0.25)]
    assert out.shape == (85, 3, 16) and out.dtype == torch.bfloat16
    # fp32 input falls back to the padded backend (flash kernels are fp16/bf16 only)
    varlen_attention(qkv.float(), ctx)
    assert len(calls) == 1


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == "segments"
    assert resolve_backend("padded", cpu, torch.float32) == "padded"
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        resolve_backend("xformers", cpu, torch.float32)
    with pytest.raises(RuntimeError, match="flash"):
        resolve_backend("flash", cpu, torch.bfloat16)
    if torch.cuda.is_available():
        assert resolve_backend("auto", torch.device("cuda"), torch.float32) == "padded"


def test_forward_and_backward_need_no_tensor_values(images):
    """No host-device sync: the whole train step runs on the meta device, where tensors have shapes
    but no values, so any read-back (.item(), bool(), nonzero, repeat_interleave without a known
    output size, ...) would fail."""
    meta = torch.device("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):  # the detector works
        torch.repeat_interleave(torch.arange(2, device=meta), torch.ones(2, dtype=torch.long, device=meta))
    with pytest.raises(RuntimeError):
        torch.zeros(1, device=meta).item()
    apt = from_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False, drop_path_rate=0.1, num_classes=5))
    apt = apt.to(meta).train()
    batch = pack_images(images, CFG, labels=[0, 1, 2], num_padding=9).to(meta)
    for pool in ("token", "avg", "avgmax"):
        apt.global_pool = pool
        for backend in ("segments", "padded", "dense"):
            apt.attn_backend = backend
            logits = apt(batch)
            F.cross_entropy(logits, batch.labels).backward()
            assert logits.shape == (3, 5) and logits.device == meta
    tokens, cu = apt.forward_features(batch)  # the segment bounds are built from host ints too
    assert cu.shape == (3 + 2,) and cu.dtype == torch.int32 and cu.device == meta


def test_from_timm_follows_the_models_device_and_dtype():
    """A model moved before conversion (``from_timm(model.cuda())``) gets its new APT parts there too."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).to(torch.float64).to("meta")
    apt = from_timm(model)
    tensors = list(apt.parameters()) + list(apt.buffers())
    assert {t.device.type for t in tensors} == {"meta"}
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float64}
