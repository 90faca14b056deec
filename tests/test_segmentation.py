"""Segmentation model side: the linear and conv heads, the loss's ignore index, confusion-matrix metrics against a direct
NumPy computation, the paired bootstrap, the dense baselines (random drop filled from the nearest kept token,
the lower-resolution grid) and the overlay picture, on real photos with synthetic masks (colour ranges)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import IMAGE_PATHS, load_resized

from apt_data import APTConfig, pack_images, patchify
from apt_model import from_timm
from apt_model.heads import ConvSegHead, LinearSegHead, SegmentationModel, create_seg_head, freeze_norm_stats
from apt_train.dense_vis import CAMVID_PALETTE, colourise, save_dense_panels
from apt_train.evaluation import random_base_layout
from apt_train.segmentation import (SegMetrics, SegmentationTask, confusion_matrix, covered_cells,
                                    evaluate_segmentation, fill_from_nearest, lowres_grid, paired_bootstrap)

K, IGNORE = 4, 255


def colour_mask(img: np.ndarray) -> np.ndarray:
    """A synthetic label map from colour ranges of a photo: the dominant channel (0-2), 3 for dark pixels."""
    m = img.argmax(-1).astype(np.uint8)
    m[img.max(-1) < 60] = 3
    return m


def tiny_apt(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=0)
    return from_timm(vit).eval()


def numpy_miou(pred: np.ndarray, gt: np.ndarray, k: int, ignore: int) -> tuple[list, float, float]:
    """Per-class IoU by explicit loops over classes (the definition), mIoU and pixel accuracy."""
    keep = gt != ignore
    ious = []
    for c in range(k):
        inter = np.sum((pred == c) & (gt == c) & keep)
        union = np.sum(((pred == c) | (gt == c)) & keep)
        ious.append(inter / union if union else np.nan)
    return ious, float(np.nanmean(ious)), float(np.sum((pred == gt) & keep) / keep.sum())


def test_miou_equals_numpy_on_a_hand_made_case():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, IGNORE, IGNORE], [2, 2, 2, IGNORE]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 2], [2, 0, 3, 3], [2, 2, 2, 0]])
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), K, IGNORE)
    assert int(cm.sum()) == 13 and cm[0, 0] == 3 and cm[0, 1] == 1 and cm[1, 2] == 1 and cm[2, 0] == 1
    m = SegMetrics.from_confusion(cm)
    ious, miou, acc = numpy_miou(pred, gt, K, IGNORE)
    # class 3 is predicted only where the ground truth is ignored: absent, NaN, out of the mean
    assert np.isnan(m.iou[3]) and np.isnan(ious[3])
    np.testing.assert_allclose(m.iou[:3], ious[:3])
    assert m.miou == pytest.approx(miou) and m.pixel_accuracy == pytest.approx(acc)
    # by hand (labelled pixels only): class 0: TP 3, 4 in gt, 4 predicted; class 1: 3, 4, 4; class 2: 4, 5, 5
    assert m.miou == pytest.approx((3 / 5 + 3 / 5 + 4 / 6) / 3) and m.pixel_accuracy == pytest.approx(10 / 13)


def test_task_accumulates_per_image_and_matches_numpy_on_photos():
    imgs = [load_resized(p, (56, 84)) for p in IMAGE_PATHS[:3]]
    gts = [colour_mask(im) for im in imgs]
    preds = [colour_mask(np.roll(im, 3, axis=1)) for im in imgs]  # shifted: some errors
    gts[0][:5] = IGNORE
    task = SegmentationTask(num_classes=K, ignore_index=IGNORE)
    logits = [torch.nn.functional.one_hot(torch.from_numpy(p).long(), K).permute(2, 0, 1).float() for p in preds]
    task.update(logits, [torch.from_numpy(g) for g in gts])
    assert task.per_image().shape == (3, K, K)
    _, miou, acc = numpy_miou(np.concatenate(preds), np.concatenate(gts), K, IGNORE)
    assert task.compute().miou == pytest.approx(miou) and task.compute().pixel_accuracy == pytest.approx(acc)
    assert 0 < miou < 1
    state = task.state_dict()
    assert SegmentationTask.from_state_dict(state).state_dict() == state
    with pytest.raises(ValueError, match="not 'segmentation'"):
        SegmentationTask.from_state_dict({"task": "classification"})


def test_loss_ignores_the_ignore_index():
    torch.manual_seed(0)
    mask = torch.from_numpy(colour_mask(load_resized(IMAGE_PATHS[1], (28, 42)))).long()
    mask[:10] = IGNORE
    logits = torch.randn(1, K, 28, 42)
    task = SegmentationTask(num_classes=K, ignore_index=IGNORE)
    loss = task.loss(logits, mask[None])
    keep = mask != IGNORE
    direct = torch.nn.functional.cross_entropy(logits[0].permute(1, 2, 0)[keep], mask[keep])
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
    changed = logits.clone()
    changed[..., :10, :] = torch.randn(1, K, 10, 42) * 10  # only ignored pixels change
    assert task.loss(changed, mask[None]).item() == pytest.approx(loss.item(), rel=1e-6)
    # the list form (mixed sizes) is the same pixel mean
    assert task.loss([logits[0]], [mask]).item() == pytest.approx(loss.item(), rel=1e-6)


def test_head_on_an_apt_layout_gives_mask_sized_logits_and_trains_the_detail_path():
    img = load_resized(IMAGE_PATHS[2], (224, 336))
    cfg = APTConfig(patch_size=16, num_scales=3, thresholds=(5.5, 4.0))
    lay = patchify(img, cfg)
    assert len(lay) < lay.uniform_tokens  # large patches in play
    apt = tiny_apt()
    model = SegmentationModel(apt, LinearSegHead(apt.num_features, K)).train()
    batch = pack_images([img, img[:, ::-1].copy()], cfg, num_prefix_tokens=apt.num_prefix_tokens)
    mask = torch.from_numpy(np.stack([colour_mask(img), colour_mask(img[:, ::-1])])).long()
    logits = model(batch, [(300, 450)] * 2)  # the mask's size, not the image's
    assert logits.shape == (2, K, 300, 450)
    small = model(batch)
    assert small.shape == (2, K, 224, 336)
    loss = SegmentationTask(K, IGNORE).loss(small, mask)
    loss.backward()
    assert apt.patch_embed.zero_linear[0].weight.grad.abs().sum() > 0  # large tokens get per-pixel gradient
    assert model.head.classifier.weight.grad.abs().sum() > 0


def test_evaluate_segmentation_matches_direct_predictions():
    imgs = [load_resized(p, (112, 160)) for p in IMAGE_PATHS[3:6]]
    masks = [colour_mask(np.asarray(Image.fromarray(im).resize((120, 90), Image.NEAREST))) for im in imgs]
    apt = tiny_apt(1)
    model = SegmentationModel(apt, LinearSegHead(apt.num_features, K)).eval()
    cfg = APTConfig(patch_size=16, num_scales=3, thresholds=(5.5, 4.0))
    batches = [(pack_images(imgs[:2], cfg, num_prefix_tokens=1), [torch.from_numpy(m) for m in masks[:2]]),
               (pack_images(imgs[2:], cfg, num_prefix_tokens=1), [torch.from_numpy(masks[2])])]
    task = SegmentationTask(K, IGNORE)
    res = evaluate_segmentation(model, batches, task, torch.device("cpu"), caption=None)
    assert res.images == 3 and res.per_image.shape == (3, K, K) and res.images_per_s > 0
    with torch.no_grad():
        preds = [model(pack_images([im], cfg, num_prefix_tokens=1), [m.shape])[0].argmax(0).numpy()
                 for im, m in zip(imgs, masks)]
    _, miou, acc = numpy_miou(np.concatenate([p.ravel() for p in preds]), np.concatenate([m.ravel() for m in masks]),
                              K, IGNORE)
    assert res.metrics.miou == pytest.approx(miou) and res.metrics.pixel_accuracy == pytest.approx(acc)


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, size=(20, K, K))
    d, s = paired_bootstrap(a, a, reps=50)
    assert d == 0 and s == 0
    b = a.copy()
    b[:, np.arange(K), np.arange(K)] += 30  # b better on every image
    d, s = paired_bootstrap(b, a, reps=200)
    assert d == pytest.approx(SegMetrics.from_confusion(b.sum(0)).miou - SegMetrics.from_confusion(a.sum(0)).miou)
    assert d > 0 and 0 < s < d


def test_random_drop_fill_is_the_nearest_kept_token():
    img = load_resized(IMAGE_PATHS[4], (112, 160))
    cfg = APTConfig(patch_size=16, num_scales=3, thresholds=(5.5, 4.0))
    lay = random_base_layout(img.shape[:2], cfg, 20, np.random.default_rng(0))
    batch = pack_images([img], cfg, num_prefix_tokens=1, layouts=[lay])
    cov = covered_cells(batch)[0]
    kept = np.zeros((7, 10), bool)
    kept[lay.y // 16, lay.x // 16] = True
    assert np.array_equal(cov.numpy(), kept)
    fmap = torch.randn(5, 7, 10)
    filled = fill_from_nearest(fmap, cov).numpy()
    ky, kx = np.nonzero(kept)
    for y in range(7):  # reference: brute force over every cell
        for x in range(10):
            d = (ky - y) ** 2 + (kx - x) ** 2
            j = np.argmin(d)
            assert np.allclose(filled[:, y, x], fmap[:, ky[j], kx[j]].numpy()) or d[j] == np.sort(d)[1]
    assert np.array_equal(filled[:, kept], fmap.numpy()[:, kept])  # kept cells unchanged
    # an APT layout covers every cell: nothing to fill
    full = covered_cells(pack_images([img], cfg, num_prefix_tokens=1))[0]
    assert bool(full.all())


def test_lowres_grid_matches_the_token_count():
    # the lower-resolution sizes at 448x336 (24 x 32 cells) for APT's counts
    assert lowres_grid(0.72 * 768, (24, 32)) == (20, 27)        # 378x280
    assert lowres_grid(0.64 * 768, (24, 32)) == (19, 26)        # 364x266
    assert lowres_grid(0.56 * 768, (24, 32)) == (18, 24)        # 336x252
    assert lowres_grid(0.44 * 768, (24, 32)) == (16, 21)        # 294x224
    for t in (100, 333, 500, 700):
        r, c = lowres_grid(t, (24, 32))
        assert abs(r * c - t) / t < 0.1 and abs(c / r - 32 / 24) < 0.1
    assert lowres_grid(10_000, (24, 32)) == (24, 32)


def test_overlay_picture(tmp_path):
    img = load_resized(IMAGE_PATHS[5], (112, 160))
    gt = colour_mask(img)
    gt[:8] = 11
    rgb = colourise(gt, CAMVID_PALETTE, ignore_index=11)
    assert (rgb[:8] == 0).all() and np.array_equal(rgb[20, 20], CAMVID_PALETTE[gt[20, 20]])
    lay = patchify(img, APTConfig(patch_size=16, num_scales=3, thresholds=(5.5, 4.0)))
    out = tmp_path / "o.png"
    save_dense_panels(out, [dict(image=img, layout=lay, pred=colour_mask(img[::-1]), gt=gt, label="a")])
    pic = np.asarray(Image.open(out))
    assert pic.shape[1] > 4 * 100 and not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------------- the light decoder head
def test_conv_head_gives_mask_sized_logits_and_trains_every_stage():
    img = load_resized(IMAGE_PATHS[2], (224, 336))
    cfg = APTConfig(patch_size=16, num_scales=3, thresholds=(5.5, 4.0))
    apt = tiny_apt()
    head = create_seg_head("conv", apt.num_features, K, dim=32)
    assert isinstance(head, ConvSegHead) and head.num_classes == K
    model = SegmentationModel(apt, head).train()
    batch = pack_images([img, img[:, ::-1].copy()], cfg, num_prefix_tokens=apt.num_prefix_tokens)
    assert model(batch, [(300, 450)] * 2).shape == (2, K, 300, 450)
    small = model(batch)
    assert small.shape == (2, K, 224, 336)
    mask = torch.from_numpy(np.stack([colour_mask(img), colour_mask(img[:, ::-1])])).long()
    SegmentationTask(K, IGNORE).loss(small, mask).backward()
    assert apt.patch_embed.zero_linear[0].weight.grad.abs().sum() > 0
    for name, p in model.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="segmentation head 'upernet'"):
        create_seg_head("upernet", 8, K)


def test_conv_head_full_grid_built_two_ways_gives_the_same_logits():
    """APT's dense map of a full-grid batch and timm's own patch grid (reshaped by hand) give the same logits,
    batched and image by image (eval mode: BatchNorm's running statistics, set away from their defaults)."""
    import timm

    from conftest import timm_input

    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=0).eval()
    head = ConvSegHead(vit.num_features, K, dim=16).eval()
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    imgs = [load_resized(p, 224) for p in IMAGE_PATHS[7:9]]
    with torch.no_grad():
        tok = vit.forward_features(timm_input(imgs, vit))[:, vit.num_prefix_tokens:]
        ref = head(tok.transpose(1, 2).reshape(2, -1, 14, 14), (200, 250))
        model = SegmentationModel(from_timm(vit).eval(), head)
        full = APTConfig(patch_size=16, num_scales=3, thresholds=(float("-inf"), float("-inf")))
        batched = model(pack_images(imgs, full, num_prefix_tokens=1), [(200, 250)] * 2)
        single = [model(pack_images([im], full, num_prefix_tokens=1), [(200, 250)])[0] for im in imgs]
    assert ref.abs().max() > 1e-3  # not a trivial zero map
    assert torch.allclose(batched, ref, atol=1e-4), (batched - ref).abs().max()
    assert torch.allclose(torch.stack(single), ref, atol=1e-4)


def test_conv_head_corrects_a_large_token_at_its_block_edges():
    """A large token repeated over its block: the linear head gives the block one logit vector, the conv head
    changes it near the block's edges (its neighbours' features) and keeps the block's inside constant."""
    torch.manual_seed(0)
    fmap = torch.randn(1, 8, 12, 12)
    fmap[:, :, 4:8, 4:8] = torch.randn(1, 8, 1, 1)  # one 4x4-cell token
    lin, conv = LinearSegHead(8, K).eval(), ConvSegHead(8, K, dim=16).eval()
    with torch.no_grad():
        for p in lin.classifier.parameters():
            p.normal_()
        for p in conv.classifier.parameters():
            p.normal_()
        a, b = lin(fmap)[0, :, 4:8, 4:8], conv(fmap)[0, :, 4:8, 4:8]
    assert torch.allclose(a, a[:, :1, :1].expand_as(a))           # constant over the block
    assert (b[:, 0, 0] - b[:, 1, 1]).abs().max() > 1e-3          # a corner differs from the inside
    # two 3x3 convs reach 2 cells: the inside of a block 2 cells from every edge would be constant; at 4x4
    # no cell is, so check the receptive field on a 6x6 block instead
    big = torch.randn(1, 8, 14, 14)
    big[:, :, 4:10, 4:10] = torch.randn(1, 8, 1, 1)
    with torch.no_grad():
        inner = conv(big)[0, :, 6:8, 6:8]
    assert torch.allclose(inner, inner[:, :1, :1].expand_as(inner), atol=1e-5)


def test_freeze_norm_stats_keeps_running_statistics():
    head = ConvSegHead(8, K, dim=16).train()
    freeze_norm_stats(head)
    before = [m.running_mean.clone() for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    head(torch.randn(2, 8, 6, 6) * 3 + 1).sum().backward()
    after = [m.running_mean for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(before) == 3 and all(torch.equal(x, y) for x, y in zip(before, after))
    assert head.proj[1].weight.grad.abs().sum() > 0  # affine still trains
    head.train()
    head(torch.randn(2, 8, 6, 6) * 3 + 1)
    assert not torch.equal(head.proj[1].running_mean, before[0])


def test_lowres_short_side_is_the_closest_count():
    from apt_data.transforms import segmentation_transform
    from apt_train.segmentation import lowres_short_side

    sizes = [(336, 448), (448, 336), (336, 512)]  # (H, W) as evaluated at a short side of 336

    def total(side):
        tf = segmentation_transform(side, augment=False, multiple=16, keep_mask_size=True)
        return sum((h // 16) * (w // 16) for h, w in (tf.output_size(w0, h0) for h0, w0 in sizes))

    full = total(336)
    assert full == 21 * 28 * 2 + 21 * 32  # at its own short side every image keeps its grid
    for frac in (0.9, 0.72, 0.56, 0.3):
        side = lowres_short_side(sizes, 336, 16, frac * full)
        best = min(abs(total(s) - frac * full) for s in range(16, 337, 16))  # brute force over every side
        assert abs(total(side) - frac * full) == best and side < 336 and side % 16 == 0
    assert lowres_short_side(sizes, 336, 16, 10 * full) == 336
