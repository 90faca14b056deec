"""Packing invariance, zero-init exactness, gradients and per-image drop path, on real photos."""
import numpy as np
import pytest
import timm
import torch

from apt_data import APTConfig, pack_images
from apt_model import from_timm
from conftest import IMAGE_PATHS, load_resized

CFG = APTConfig(thresholds=(7.0, 6.0))  # high thresholds: plenty of 32 and 64 px tokens


@pytest.fixture(scope="module")
def images():
    sizes = [224, (160, 224), 192, (224, 128)]
    return [load_resized(p, s) for p, s in zip(IMAGE_PATHS[10:14], sizes)]


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kw)


def test_zero_linear_path_reaches_every_scale(images):
    batch = pack_images(images, CFG)
    assert all(t.shape[0] > 0 for t in batch.pixels), [t.shape for t in batch.pixels]


@pytest.mark.parametrize("backend", ["segments", "padded", "dense"])
def test_packed_batch_equals_images_alone_forward_and_grad(images, backend):
    apt = from_timm(tiny(), attn_backend=backend).eval()
    with torch.no_grad():  # make the detail path non-trivial so its gradients are compared too
        for lin in apt.patch_embed.zero_linear:
            lin.weight.normal_(0, 0.02)
    batch = pack_images(images, CFG, labels=[0, 1, 2, 3])
    out = apt(batch)
    out.square().sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in apt.named_parameters() if p.grad is not None}
    apt.zero_grad()
    alone = []
    for k, img in enumerate(images):
        o = apt(pack_images([img], CFG))
        o.square().sum().backward()
        alone.append(o.detach())
    alone = torch.cat(alone)
    assert (out.detach() - alone).abs().max().item() <= 1e-5
    for n, p in apt.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_backends_agree_with_padding_tokens(images):
    apt = from_timm(tiny()).eval()
    plain = pack_images(images, CFG)
    padded = pack_images(images, CFG, num_padding=37)
    with torch.no_grad():
        ref = apt(plain)
        for backend in ("segments", "padded", "dense"):
            apt.attn_backend = backend
            assert (apt(padded) - ref).abs().max().item() <= 1e-5, backend
    for pool in ("avg", "max", "avgmax", "token"):
        apt.global_pool = pool
        with torch.no_grad():
            a = apt.forward_head(apt.forward_features(padded)[0], padded, pre_logits=True)
            b = torch.cat([apt.forward_head(apt.forward_features(pack_images([im], CFG))[0],
                                            pack_images([im], CFG), pre_logits=True) for im in images])
        assert (a - b).abs().max().item() <= 1e-5, pool


def test_zero_init_equals_resize_only_then_learns(images):
    apt = from_timm(tiny()).train()
    batch = pack_images(images, CFG, labels=[3, 1, 4, 1])
    with torch.no_grad():
        full = apt.eval()(batch)
        apt.resize_only = True
        resize = apt(batch)
        apt.resize_only = False
    assert torch.equal(full, resize)  # exactly, not approximately
    apt.train()
    opt = torch.optim.SGD(apt.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(apt(batch), batch.labels)
    loss.backward()
    params = dict(apt.patch_embed.named_parameters())
    new = [n for n in params if n.startswith(("down.", "zero_linear."))]
    # at init only the zero linears get a gradient (their input is live, their output weight zero) ...
    for n in new:
        assert (params[n].grad.abs().sum() > 0) == n.startswith("zero_linear."), n
    opt.step()
    assert all(lin.weight.abs().sum() > 0 for lin in apt.patch_embed.zero_linear)
    # ... after one step the zero linears are non-zero and gradients reach every new parameter
    opt.zero_grad()
    torch.nn.functional.cross_entropy(apt(batch), batch.labels).backward()
    for n in new:
        assert params[n].grad.abs().sum() > 0, f"no gradient reaches {n}"
    with torch.no_grad():
        apt.eval()
        after = apt(batch)
        apt.resize_only = True
        assert not torch.equal(after, apt(batch))


def test_drop_path_is_drawn_per_image(images):
    from apt_model.drop_path import block_drop_path, segment_drop_path

    apt = from_timm(tiny(drop_path_rate=0.5)).train()
    batch = pack_images(images * 2, CFG, num_padding=3)
    torch.manual_seed(1)
    x = apt.embed(batch)
    ctx = apt.context(batch, x)
    cu = ctx.cu_seqlens.tolist()
    assert cu == [0, *np.cumsum(batch.seqlens + (3,)).tolist()]  # images, then the padding segment
    branch = torch.ones(batch.seq_len, 4)
    seen = set()
    for _ in range(20):
        out = segment_drop_path(branch, ctx.segment_ids, ctx.num_segments, 0.5, training=True)
        per_image = [out[a:b] for a, b in zip(cu[:-1], cu[1:])]
        kept = tuple(bool(t.abs().sum() > 0) for t in per_image)
        for t in per_image:  # a whole image is kept (scaled 1/keep) or dropped, never part of it
            assert torch.all(t == t[0, 0]) and t[0, 0].item() in (0.0, 2.0)
        seen.add(kept)
    assert len(seen) > 2  # images drop independently, not the whole batch at once
    assert torch.equal(segment_drop_path(branch, ctx.segment_ids, ctx.num_segments, 0.5, training=False), branch)
    # the block helper reads timm's DropPath settings; ids given as a function are built only for a draw
    built = []
    ids = lambda: built.append(1) or ctx.segment_ids  # noqa: E731
    dp = apt.blocks[-1].drop_path1
    assert dp.drop_prob > 0
    torch.manual_seed(2)
    a = block_drop_path(branch, dp, ids, ctx.num_segments, training=True)
    torch.manual_seed(2)
    assert torch.equal(a, segment_drop_path(branch, ctx.segment_ids, ctx.num_segments, dp.drop_prob))
    assert torch.equal(block_drop_path(branch, dp, ids, ctx.num_segments, training=False), branch) and built == [1]
    assert torch.equal(block_drop_path(branch, torch.nn.Identity(), ids, ctx.num_segments, True), branch)


def test_drop_path_in_the_model_drops_images_independently(images):
    """Four copies of one photo in one packed batch: with the whole batch dropped at once (the reference
    code) they would always get identical outputs; drawn per image, they differ in train mode."""
    apt = from_timm(tiny(drop_path_rate=0.5))
    batch = pack_images([images[0]] * 4 + [images[1]], CFG)
    with torch.no_grad():
        apt.eval()
        ev = apt(batch)
        assert (ev[:4] - ev[0]).abs().max().item() <= 1e-5  # same image, same output
        apt.train()
        torch.manual_seed(0)
        outs = [apt(batch) for _ in range(3)]
    for out in outs:
        copies = out[:4]
        assert (copies - copies[0]).abs().amax(dim=1)[1:].min().item() > 1e-3, "copies were dropped together"


@pytest.mark.parametrize("backend", ["segments", "padded"])
def test_bf16_autocast_trains(images, backend):
    apt = from_timm(tiny(), attn_backend=backend)
    batch = pack_images(images, CFG, labels=[0, 1, 2, 3], num_padding=5)
    with torch.no_grad():
        ref = apt(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = apt(batch)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max().item() < 0.05
    torch.nn.functional.cross_entropy(out.float(), batch.labels).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in apt.patch_embed.zero_linear.parameters())


def test_grad_checkpointing_gives_the_same_gradients(images):
    apt = from_timm(tiny(drop_path_rate=0.3)).train()
    batch = pack_images(images, CFG, labels=[0, 1, 2, 3])
    grads = []
    for ckpt in (False, True):
        apt.set_grad_checkpointing(ckpt)
        apt.zero_grad()
        torch.manual_seed(7)  # same drop-path draws in both runs (checkpointing replays them)
        torch.nn.functional.cross_entropy(apt(batch), batch.labels).backward()
        grads.append({n: p.grad.clone() for n, p in apt.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_batch_and_model_must_agree(images):
    apt = from_timm(tiny())
    with pytest.raises(ValueError, match="prefix tokens"):
        apt(pack_images(images[:1], CFG, num_prefix_tokens=0))
    with pytest.raises(ValueError, match="patch_size"):
        apt(pack_images([images[0]], APTConfig(patch_size=8, thresholds=(5.5, 4.0))))
    with pytest.raises(TypeError, match="VisionTransformer"):
        from_timm(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        from_timm("vit_tiny_patch16_224", checkpoint_path="nope.pth")


def test_from_timm_model_families():
    """from_timm picks the APT class from its family table; a registered family is tried first."""
    from apt_model import APTViT
    from apt_model.convert import FAMILIES, ModelFamily, family_of, register_family

    assert [f.name for f in FAMILIES] == ["vit_sam", "vit"]
    vit = tiny()
    assert family_of(vit).name == "vit" and type(from_timm(vit)) is APTViT
    with pytest.raises(TypeError, match="VisionTransformerSAM.*VisionTransformer.*got Linear"):
        family_of(torch.nn.Linear(2, 2))

    class Tagged(APTViT):
        pass

    checked = []
    saved = list(FAMILIES)
    try:
        is_tagged = lambda m: getattr(m, "tag", False)  # noqa: E731
        register_family(ModelFamily("tagged", "tagged ViTs", is_tagged, checked.append, Tagged))
        assert FAMILIES[0].name == "tagged" and len(FAMILIES) == 3
        vit.tag = True
        assert type(from_timm(vit)) is Tagged and checked == [vit]
        register_family(ModelFamily("tagged", "tagged ViTs", lambda m: False, checked.append, Tagged), index=1)
        assert [f.name for f in FAMILIES] == ["vit_sam", "tagged", "vit"]  # same name: replaced
        assert type(from_timm(vit)) is APTViT
    finally:
        FAMILIES[:] = saved
