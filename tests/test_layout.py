"""Quadtree patch selection: properties on random and real images."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apt_data import APTConfig, PatchLayout, patchify, score_maps
from apt_data.layout import select_patches_reference
from conftest import IMAGE_PATHS, load_resized

INF = float("inf")


def coverage(layout: PatchLayout) -> np.ndarray:
    """How many tokens cover each pixel, computed independently of the library."""
    cov = np.zeros(layout.image_size, np.int32)
    for y, x, size in zip(layout.y, layout.x, layout.sizes):
        cov[y:y + size, x:x + size] += 1
    return cov


def check_layout_invariants(layout: PatchLayout, cfg: APTConfig) -> None:
    assert layout.y.dtype == np.int32 and layout.x.dtype == np.int32 and layout.scale.dtype == np.int8
    assert (coverage(layout) == 1).all(), "layout must tile the image exactly once"
    sizes = layout.sizes
    assert ((layout.y % sizes) == 0).all() and ((layout.x % sizes) == 0).all(), "patches sit on their scale's grid"
    # grouped by scale, coarsest first, raster order inside a group
    assert (np.diff(layout.scale.astype(int)) <= 0).all()
    for s in range(cfg.num_scales):
        sel = layout.scale == s
        key = layout.y[sel].astype(np.int64) * 100000 + layout.x[sel]
        assert (np.diff(key) > 0).all()


def uniform_count(h, w, p):
    return (h // p) * (w // p)


def coarsest_count(h, w, p, num_scales):
    """Tokens when every scale is kept wherever it fits (thresholds +inf)."""
    total = 0
    cells = np.zeros((h // p, w // p), bool)
    for s in range(num_scales - 1, -1, -1):
        f = 2**s
        hs, ws = h // (p * f), w // (p * f)
        for i in range(hs):
            for j in range(ws):
                block = cells[i * f:(i + 1) * f, j * f:(j + 1) * f]
                if not block.any():
                    block[:] = True
                    total += 1
    return total


@st.composite
def images(draw):
    """Random images built from flat blocks, gradients and noise so every scale gets chosen."""
    p = draw(st.sampled_from([8, 16]))
    h = p * draw(st.integers(1, 12))
    w = p * draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["blocks", "noise", "mixed", "gray"]))
    if kind == "noise":
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        cell = int(rng.choice([p, 2 * p, 4 * p]))
        gh, gw = -(-h // cell), -(-w // cell)
        colors = rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8)
        img = np.repeat(np.repeat(colors, cell, 0), cell, 1)[:h, :w].copy()
        if kind == "mixed":
            mask = rng.random((gh, gw)) < 0.5
            mask = np.repeat(np.repeat(mask, cell, 0), cell, 1)[:h, :w]
            img[mask] = rng.integers(0, 256, (int(mask.sum()), 3), dtype=np.uint8)
        if kind == "gray":
            img = img[:, :, 0].copy()
    return img, p


thresholds_st = st.one_of(st.just(-INF), st.just(INF), st.floats(0.0, 9.0))
settings.register_profile("apt", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("apt")


@given(images(), st.integers(1, 4), st.data())
@settings(max_examples=150)
def test_random_images_tile_exactly_once_and_match_reference(img_p, num_scales, data):
    img, p = img_p
    thr = tuple(data.draw(thresholds_st) for _ in range(num_scales - 1))
    scorer = data.draw(st.sampled_from(["entropy", "laplacian", "upsample"]))
    if scorer != "entropy":
        thr = tuple(t * 20 for t in thr)
    cfg = APTConfig(patch_size=p, num_scales=num_scales, thresholds=thr, scorer=scorer)
    layout = patchify(img, cfg)
    check_layout_invariants(layout, cfg)
    y, x, s = select_patches_reference(score_maps(img, p, num_scales, scorer), thr, p)
    np.testing.assert_array_equal(layout.y, y)
    np.testing.assert_array_equal(layout.x, x)
    np.testing.assert_array_equal(layout.scale, s)


@given(images(), st.integers(1, 4))
@settings(max_examples=60)
def test_extreme_thresholds(img_p, num_scales):
    img, p = img_p
    h, w = img.shape[:2]
    fine = patchify(img, APTConfig(patch_size=p, num_scales=num_scales, thresholds=(-INF,) * (num_scales - 1)))
    assert len(fine) == uniform_count(h, w, p) and (fine.scale == 0).all()
    coarse = patchify(img, APTConfig(patch_size=p, num_scales=num_scales, thresholds=(INF,) * (num_scales - 1)))
    assert len(coarse) == coarsest_count(h, w, p, num_scales)
    check_layout_invariants(coarse, APTConfig(patch_size=p, num_scales=num_scales, thresholds=(INF,) * (num_scales - 1)))


@given(images(), st.data())
@settings(max_examples=80)
def test_token_count_is_monotone_in_each_threshold(img_p, data):
    img, p = img_p
    base = [data.draw(st.floats(0.0, 8.0)) for _ in range(2)]
    k = data.draw(st.integers(0, 1))
    lo, hi = sorted([data.draw(st.floats(0.0, 8.0)), data.draw(st.floats(0.0, 8.0))])
    t_lo, t_hi = list(base), list(base)
    t_lo[k], t_hi[k] = lo, hi
    n_lo = len(patchify(img, APTConfig(patch_size=p, thresholds=tuple(t_lo))))
    n_hi = len(patchify(img, APTConfig(patch_size=p, thresholds=tuple(t_hi))))
    assert n_hi <= n_lo


@given(st.integers(1, 8), st.integers(1, 8), st.integers(0, 255), st.sampled_from(["entropy", "laplacian", "upsample"]))
@settings(max_examples=40)
def test_constant_images_collapse_to_the_coarsest_scale(hc, wc, value, scorer):
    h, w = 16 * hc, 16 * wc
    img = np.full((h, w, 3), value, np.uint8)
    layout = patchify(img, APTConfig(scorer=scorer, thresholds=(1e-6, 1e-6)))
    assert len(layout) == coarsest_count(h, w, 16, 3)


@pytest.mark.parametrize("size", [224, 384, (256, 320), (176, 208)])
def test_real_images(size):
    cfg = APTConfig()
    counts = []
    for path in IMAGE_PATHS:
        img = load_resized(path, size)
        layout = patchify(img, cfg)
        check_layout_invariants(layout, cfg)
        y, x, s = select_patches_reference(score_maps(img, 16, 3), cfg.thresholds, 16)
        np.testing.assert_array_equal(layout.scale, s)
        np.testing.assert_array_equal(layout.y, y)
        # monotone in each threshold on real photos too
        for k in range(2):
            looser = list(cfg.thresholds)
            looser[k] += 1.0
            assert len(patchify(img, APTConfig(thresholds=tuple(looser)))) <= len(layout)
        counts.append(len(layout) / layout.uniform_tokens)
    # real photos have flat regions: APT must save tokens on average, never add any
    assert max(counts) <= 1.0 and min(counts) < 0.6 and np.mean(counts) < 0.95


def test_remainder_strip_stays_at_finer_scales():
    """A 208x176 image: 64-px patches fit 3x2 times; the 16/32-px strips stay finer."""
    img = np.full((208, 176, 3), 120, np.uint8)
    layout = patchify(img, APTConfig(thresholds=(INF, INF)))
    grid = layout.scale_grid()
    assert (grid[:12, :8] == 2).all()
    assert (grid[12:, :] < 2).all() and (grid[:, 8:] < 2).all()
    # rows 192..207 (one base row) cannot hold 32-px patches; columns 128..175 hold one column of 32
    assert (grid[12, :] == 0).all()
    assert (grid[:12, 8:10] == 1).all() and (grid[:12, 10] == 0).all()
    assert len(layout) == coarsest_count(208, 176, 16, 3)


def test_sides_must_be_multiples_of_the_patch():
    img = load_resized(IMAGE_PATHS[0], (200, 224))
    with pytest.raises(ValueError, match="200x224.*multiples of patch_size=16"):
        patchify(img, APTConfig())


def test_single_scale_is_the_uniform_grid():
    img = load_resized(IMAGE_PATHS[5], 96)
    layout = patchify(img, APTConfig(num_scales=1, thresholds=()))
    assert len(layout) == 36 and (layout.scale == 0).all()
    assert layout.counts().tolist() == [36]


def test_layout_helpers():
    img = load_resized(IMAGE_PATHS[6], 128)
    layout = patchify(img, APTConfig(thresholds=(INF, -INF)))
    assert layout.counts().tolist() == [0, 16, 0]
    assert layout.grid_size == (8, 8) and layout.uniform_tokens == 64
    assert (layout.sizes == 32).all()
    assert (layout.scale_grid() == 1).all()


def test_layout_from_precomputed_scores_equals_patchify():
    from apt_data.layout import layout_from_scores
    for path in IMAGE_PATHS[:8]:
        img = load_resized(path, (224, 288))
        for cfg in (APTConfig(), APTConfig(thresholds=(6.5, 5.0)), APTConfig(scorer="laplacian", thresholds=(20, 10))):
            want = patchify(img, cfg)
            got = layout_from_scores(score_maps(img, 16, 3, cfg.scorer), img.shape[:2], cfg)
            for a in ("y", "x", "scale"):
                np.testing.assert_array_equal(getattr(got, a), getattr(want, a))
    with pytest.raises(ValueError, match="shape"):
        layout_from_scores(score_maps(img, 16, 3), (224, 224), APTConfig())


def full_scoring_layout(img, cfg):
    """The layout from every score of every scale (`score_flat` + `select_patches`), no shortcuts."""
    from apt_data.layout import layout_from_flat_scores
    from apt_data.scoring import score_flat

    flat, _, _ = score_flat(img, cfg.patch_size, cfg.num_scales, cfg.scorer, need_base=True)
    return layout_from_flat_scores(flat, img.shape[:2], cfg)


LAZY_CONFIGS = [APTConfig(), APTConfig(thresholds=(6.5, 5.0)), APTConfig(thresholds=(4.0, 2.0)),
                APTConfig(thresholds=(7.2, 6.9)), APTConfig(num_scales=4, thresholds=(5.5, 4.5, 3.0)),
                APTConfig(num_scales=4, thresholds=(7.0, 7.5, 8.0)), APTConfig(num_scales=2, thresholds=(5.5,)),
                APTConfig(patch_size=8, thresholds=(4.0, 5.0)), APTConfig(patch_size=14, thresholds=(7.0, 7.5)),
                APTConfig(thresholds=(INF, -INF)), APTConfig(thresholds=(-INF, INF)),
                APTConfig(num_scales=1, thresholds=())]


@pytest.mark.parametrize("size", [224, 384, (208, 176), (224, 288)])
def test_lazy_entropy_selection_equals_full_scoring(size):
    """patchify's kernel (bounds, lazy coarsest-first evaluation, no scale-0 scores) gives exactly the
    layout of the full score pyramid, on real photos, their gray versions and noise."""
    imgs = [load_resized(p, size) for p in IMAGE_PATHS[::2]]
    imgs += [np.ascontiguousarray(im[:, :, 1]) for im in imgs[:4]]
    h, w = (size, size) if isinstance(size, int) else size
    imgs.append(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8))
    for img in imgs:
        for cfg in LAZY_CONFIGS:
            if img.shape[0] % cfg.patch_size or img.shape[1] % cfg.patch_size:
                continue
            got, want = patchify(img, cfg), full_scoring_layout(img, cfg)
            for a in ("y", "x", "scale"):
                np.testing.assert_array_equal(getattr(got, a), getattr(want, a), err_msg=f"{cfg} {a}")


@pytest.mark.parametrize("p", [128, 255])
def test_large_patches_use_wide_counters(p):
    """p >= 128: a sum of squared counts of a scale-1 patch needs 64 bits."""
    img = load_resized(IMAGE_PATHS[9], (4 * p, 6 * p))
    for thr in ((7.0, 6.0), (8.0, 9.0), (3.0, 2.0)):
        cfg = APTConfig(patch_size=p, thresholds=thr)
        got, want = patchify(img, cfg), full_scoring_layout(img, cfg)
        np.testing.assert_array_equal(got.scale, want.scale)
        np.testing.assert_array_equal(got.y, want.y)
