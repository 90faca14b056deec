"""With no large patches, APT = the timm model (logits and dense features), on real photos."""
import numpy as np
import pytest
import timm
import torch

from apt_data import APTConfig, pack_images
from apt_model import from_timm, to_dense
from conftest import IMAGE_PATHS, load_resized, timm_input

NO_REDUCTION = APTConfig(thresholds=(-np.inf, -np.inf))


GRID = [(f"vit_{w}_patch16_224", size, patch) for w in ("tiny", "small", "base") for size in (224, 384) for patch in (16, 14)]


@pytest.mark.parametrize("name, size, kw", [
    # tiny/small/base x 224/384 x patch 16/14 (patch 14 at 224 and 392, multiples of 14 and of 56)
    *[(name, size if patch == 16 else {224: 224, 384: 392}[size],
       {"img_size": size if patch == 16 else {224: 224, 384: 392}[size], "patch_size": patch})
      for name, size, patch in GRID],
    ("vit_small_patch14_dinov2", 224, {"img_size": 224}),       # layer scale
    ("vit_base_patch14_reg4_dinov2", 224, {"img_size": 224}),   # 4 register tokens
    ("deit_tiny_patch16_224", 224, {}),
    ("vit_small_patch16_224", 224, {"global_pool": "avg", "class_token": False, "fc_norm": True}),
    ("vit_tiny_patch16_224", 288, {"dynamic_img_size": True}),  # pos embed resampled to another size
    ("vit_tiny_patch16_224", (224, 320), {"dynamic_img_size": True}),  # non-square
    ("vit_tiny_patch16_224", 224, {"global_pool": "max"}),
    ("vit_tiny_patch16_224", 224, {"global_pool": "avgmax", "reg_tokens": 2}),
    ("vit_tiny_patch16_224", 224, {"global_pool": "avg", "no_embed_class": True}),
])
def test_no_reduction_equals_timm(name, size, kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    apt = from_timm(model).eval()
    p = apt.patch_size
    images = [load_resized(path, size) for path in IMAGE_PATHS[:2]]
    assert apt.patch_size == kw.get("patch_size", apt.patch_size)
    cfg = APTConfig(patch_size=p, thresholds=(-np.inf, -np.inf))
    batch = pack_images(images, cfg, num_prefix_tokens=apt.num_prefix_tokens)
    with torch.no_grad():
        want = model(timm_input(images, model))
        for backend in ("segments", "padded"):
            apt.attn_backend = backend
            got = apt(batch)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-4, (name, backend)


def test_dense_features_equal_timm_patch_grid():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    apt = from_timm(model).eval()
    images = [load_resized(p, 224) for p in IMAGE_PATHS[3:6]]
    batch = pack_images(images, NO_REDUCTION)
    with torch.no_grad():
        feats, cu = apt.forward_features(batch)
        dense = to_dense(feats, batch)
        want = model.forward_features(timm_input(images, model))[:, 1:].reshape(3, 14, 14, -1).permute(0, 3, 1, 2)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *np.cumsum(batch.seqlens).tolist()]  # images' bounds
    assert dense.shape == (3, 192, 14, 14)
    assert (dense - want).abs().max().item() <= 1e-4


def test_to_dense_repeats_large_tokens_over_their_cells():
    images = [load_resized(IMAGE_PATHS[8], (224, 288)), load_resized(IMAGE_PATHS[9], 160)]
    batch = pack_images(images, APTConfig(thresholds=(7.5, 7.0)))
    assert all(t.shape[0] > 0 for t in batch.pixels)
    tokens = torch.randn(batch.seq_len, 8)
    maps = to_dense(tokens, batch)
    assert isinstance(maps, list) and maps[0].shape == (8, 14, 18) and maps[1].shape == (8, 10, 10)
    for s in range(3):
        f = 1 << s
        for (b, y, x), pos in zip(batch.coords[s].tolist(), batch.seq_index[s].tolist()):
            block = maps[b][:, y:y + f, x:x + f]
            assert torch.equal(block, tokens[pos][:, None, None].expand_as(block))


def test_from_timm_name_with_local_checkpoint(tmp_path):
    torch.manual_seed(3)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    ckpt = tmp_path / "tiny.pth"
    torch.save({"state_dict": src.state_dict()}, ckpt)  # timm's training scripts wrap it like this
    apt = from_timm("vit_tiny_patch16_224", checkpoint_path=str(ckpt), num_classes=10).eval()
    images = [load_resized(p, 224) for p in IMAGE_PATHS[:2]]
    with torch.no_grad():
        got = apt(pack_images(images, NO_REDUCTION))
        want = src(timm_input(images, src))
    assert (got - want).abs().max().item() <= 1e-4
    # an APT checkpoint (trained detail path) loads back exactly
    with torch.no_grad():
        for lin in apt.patch_embed.zero_linear:
            lin.weight.normal_(0, 0.02)
    torch.save(apt.state_dict(), tmp_path / "apt.pth")
    back = from_timm("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "apt.pth"), num_classes=10).eval()
    batch = pack_images(images, APTConfig(thresholds=(7.0, 6.0)))
    with torch.no_grad():
        assert torch.equal(back(batch), apt(batch))
    with pytest.raises(RuntimeError, match="does not fit the model"):
        from_timm("vit_small_patch16_224", checkpoint_path=str(ckpt), num_classes=10)


def test_no_pooling_gives_per_token_logits_like_timm():
    """global_pool='': timm applies the head to every token ([B, N, C]); APT to every packed token ([L, C])."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="", num_classes=7).eval()
    apt = from_timm(model).eval()
    images = [load_resized(p, 224) for p in IMAGE_PATHS[6:8]]
    batch = pack_images(images, NO_REDUCTION, num_padding=3)
    with torch.no_grad():
        got = apt(batch)
        want = model(timm_input(images, model))
    assert got.shape == (2 * 197 + 3, 7) and want.shape == (2, 197, 7)
    assert (got[:-3].view(2, 197, 7) - want).abs().max().item() <= 1e-4


def test_forward_dense_is_to_dense_of_forward_features():
    torch.manual_seed(0)
    apt = from_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False)).eval()
    images = [load_resized(p, 224) for p in IMAGE_PATHS[12:14]]
    batch = pack_images(images, APTConfig(thresholds=(7.5, 7.0)))
    assert all(t.shape[0] for t in batch.pixels)
    with torch.no_grad():
        dense = apt.forward_dense(batch)
        want = to_dense(apt.forward_features(batch)[0], batch)
    assert dense.shape == (2, 192, 14, 14) and torch.equal(dense, want)
