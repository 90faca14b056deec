"""Mixup / CutMix for packed batches (`apt_data.mixing`): per sample, before patchify, seeded, with
timm's soft targets; on the real images of the sample shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apt_data import APTConfig, ImageTransform, patchify
from apt_data.loader import APTLoader
from apt_data.mixing import MixConfig, MixDraw, apply_mix, cutmix_box, draw_mix, soft_targets
from conftest import IMAGE_PATHS, load_resized

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ROOT / "shards"
AUG = ImageTransform(size=224, augment=True)


def mixed_loader(num_workers: int, mix: MixConfig, seed: int = 3, steps: int = 2) -> APTLoader:
    return APTLoader(SHARDS, APTConfig(), max_tokens=4096, num_workers=num_workers, transform=AUG, mix=mix,
                     seed=seed, steps_per_epoch=steps)


def per_image(batch) -> dict:
    """Each image's (mix label, lam, token count, per-scale pixel sums) by key: what its tokens hold."""
    sums = np.zeros((batch.num_images, batch.num_scales), np.int64)
    for s in range(batch.num_scales):
        img = batch.coords[s][:, 0].long()
        px = batch.pixels[s].reshape(len(img), -1).long().sum(1)
        sums[:, s] = torch.zeros(batch.num_images, dtype=torch.long).index_add_(0, img, px).numpy()
    return {k: (int(batch.mix_labels[b]), round(float(batch.mix_lam[b]), 6), batch.seqlens[b], tuple(sums[b]))
            for b, k in enumerate(batch.keys)}


def test_mixup_and_cutmix_pixels_on_real_photos():
    a, b = load_resized(IMAGE_PATHS[0], (96, 128)), load_resized(IMAGE_PATHS[1], (96, 128))
    out, lam = apply_mix(a, b, MixDraw(partner=1, cutmix=False, lam=0.3))
    assert lam == 0.3
    want = np.clip(np.round(0.3 * a.astype(np.float64) + 0.7 * b.astype(np.float64)), 0, 255)
    assert np.abs(out.astype(np.int64) - want).max() <= 1  # float32 blend, rounded
    draw = MixDraw(partner=1, cutmix=True, lam=0.64, centre=(0.9, 0.1))  # a box clipped at two edges
    y0, y1, x0, x1 = cutmix_box(96, 128, draw)
    assert (y0, x0) != (0, 0) or (y1, x1) != (96, 128)
    out, lam = apply_mix(a, b, draw)
    inside = np.zeros((96, 128), bool)
    inside[y0:y1, x0:x1] = True
    assert (out[inside] == b[inside]).all() and (out[~inside] == a[~inside]).all()
    assert lam == pytest.approx(1 - inside.mean()) and lam > 0.64  # corrected: the clipped box is smaller
    # a partner of another size is resized to the image
    out, _ = apply_mix(a, load_resized(IMAGE_PATHS[2], 64), MixDraw(partner=2, cutmix=False, lam=0.5))
    assert out.shape == a.shape


def test_draws_are_seeded_per_sample_and_follow_the_settings():
    mix = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.5)
    draws = [draw_mix(mix, 0, 0, i, 400) for i in range(400)]
    assert draws == [draw_mix(mix, 0, 0, i, 400) for i in range(400)]  # same seed, same draws
    assert draws != [draw_mix(mix, 1, 0, i, 400) for i in range(400)]  # another seed (or epoch): others
    assert draws != [draw_mix(mix, 0, 1, i, 400) for i in range(400)]
    mixed = [d for d in draws if d is not None]
    assert 0.6 < len(mixed) / 400 < 0.8 and all(d.partner != i for i, d in enumerate(draws) if d is not None)
    assert 0.4 < np.mean([d.cutmix for d in mixed]) < 0.6 and all(0 <= d.lam <= 1 for d in mixed)
    assert all(not d.cutmix for d in map(lambda i: draw_mix(MixConfig(cutmix_alpha=0), 0, 0, i, 9), range(9)))
    assert all(d.cutmix for d in map(lambda i: draw_mix(MixConfig(mixup_alpha=0), 0, 0, i, 9), range(9)))
    assert draw_mix(MixConfig(prob=0.0), 0, 0, 0, 9) is None
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        MixConfig(mixup_alpha=-1)


def test_soft_targets_sum_to_one_and_match_timm():
    from timm.data.mixup import mixup_target

    labels = torch.tensor([3, 0, 7, 7, 1])
    flip = labels.flip(0)
    for smoothing in (0.0, 0.1):
        ours = soft_targets(labels, 10, smoothing, flip, torch.full((5,), 0.3))
        theirs = mixup_target(labels, 10, lam=0.3, smoothing=smoothing)  # timm pairs image i with B-1-i
        assert torch.allclose(ours, theirs, atol=1e-6)
        assert torch.allclose(ours.sum(1), torch.ones(5), atol=1e-6)
    plain = soft_targets(labels, 10, 0.1)
    assert torch.allclose(plain.sum(1), torch.ones(5)) and (plain.argmax(1) == labels).all()


def test_mixed_batches_token_counts_and_targets():
    mix = MixConfig(num_classes=10, label_smoothing=0.1, prob=0.8)
    loader = mixed_loader(0, mix, steps=2)
    pipeline = loader.pipeline
    plain = APTLoader(SHARDS, APTConfig(), max_tokens=4096, num_workers=0, transform=AUG, seed=3).pipeline
    changed = checked = 0
    for batch, targets in loader:
        assert batch.mixed and targets.shape == (batch.num_images, 10)
        assert torch.allclose(targets.sum(1), torch.ones(batch.num_images), atol=1e-5)
        assert torch.equal(targets, batch.soft_targets(10, 0.1))
        unmixed = batch.mix_lam == 1
        assert (batch.mix_labels[unmixed] == batch.labels[unmixed]).all() and not unmixed.all()
        for b, key in enumerate(batch.keys[:6]):  # the tokens are those of the mixed image
            i = loader.source.keys.index(key)
            img, layout, target = pipeline.load(i, 0)
            assert len(layout) == len(patchify(img, loader.cfg)) == batch.seqlens[b] - 1
            if target is None:
                assert float(batch.mix_lam[b]) == 1.0
                continue
            assert (target[0], pytest.approx(target[1])) == (int(batch.mix_labels[b]), float(batch.mix_lam[b]))
            checked += 1
            changed += len(plain.load(i, 0)[1]) != len(layout)
    assert checked >= 4 and changed >= 2  # mixing changes how many tokens an image gets
    assert loader.exact_counts is False


def test_mixing_is_the_same_for_any_number_of_workers():
    mix = MixConfig(num_classes=10)
    seen = []
    for workers in (0, 2):
        images = {}
        for batch, _ in mixed_loader(workers, mix, steps=3):
            images.update(per_image(batch))
        seen.append(images)
    common = set(seen[0]) & set(seen[1])
    assert len(common) >= 8  # the workers' partitions differ; the samples both loaded must agree exactly
    assert all(seen[0][k] == seen[1][k] for k in common)
    assert any(v[1] < 1 for v in seen[0].values())


def test_mixing_is_for_training_and_the_full_recipe_turns_it_on(tmp_path, capsys):
    with pytest.raises(ValueError, match="training augmentation"):
        APTLoader(SHARDS, APTConfig(), max_tokens=4096, num_workers=0, train=False, mix=MixConfig())
    from apt_train.config import TrainConfig

    full = TrainConfig.from_flat(dict(data="shards", recipe="full"))  # the recipe fills unset settings
    assert (full.data.mixup, full.data.cutmix) == (0.8, 1.0)
    assert (TrainConfig.from_flat(dict(data="shards", recipe="short")).data.mixup, TrainConfig.from_flat(dict(
        data="shards")).data.cutmix) == (0.0, 0.0)
    from test_train_cli import FAST, train_main

    rc = train_main(["--mixup", "0.8", "--cutmix", "1.0", "--augment", "--max-tokens", "2048", "--output",
                     str(tmp_path), *FAST])
    out = capsys.readouterr().err
    assert rc == 0 and "Mixup 0.8 / CutMix 1.0, prob 1.0, switch 0.5, soft targets" in out
    with pytest.raises(SystemExit) as e:
        train_main(["--mixup", "-1", "--output", str(tmp_path), *FAST])
    assert e.value.code == 2 and "--mixup/--cutmix settings: mixup/cutmix alpha must be >= 0" in capsys.readouterr().err


def test_a_mixed_stream_resumes_mid_epoch_exactly():
    mix = MixConfig(num_classes=10)
    run = mixed_loader(0, mix, steps=4)
    want = [per_image(b) for b, _ in mixed_loader(0, mix, steps=4)]
    it = iter(run)
    assert per_image(next(it)[0]) == want[0]  # stopped after one batch
    state = run.state_dict()
    resumed = mixed_loader(0, mix, steps=4)
    resumed.load_state_dict(state)
    assert [per_image(b) for b, _ in resumed] == want[1:]
