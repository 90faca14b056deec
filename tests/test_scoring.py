"""Numba scorers against their plain NumPy references and against the paper's definition."""
import numpy as np
import pytest
import torch

from apt_data import score_maps
from apt_data.scoring import REFERENCE_SCORERS
from apt_data.scoring._gray import gray_plane_reference
from apt_data.scoring.entropy import gray_bins_reference
from conftest import IMAGE_PATHS, load_resized

SCORERS = ["entropy", "laplacian", "upsample"]


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("size, patch", [((224, 224), 16), ((384, 256), 16), ((224, 168), 14), ((200, 136), 8)])
def test_numba_matches_numpy_reference_on_real_images(scorer, size, patch):
    tol = {"entropy": 1e-4, "laplacian": 1e-3, "upsample": 1e-2}[scorer]  # upsample is an MSE in gray^2 units
    for path in IMAGE_PATHS[::3]:
        img = load_resized(path, size)
        fast = score_maps(img, patch, 3, scorer)
        ref = REFERENCE_SCORERS[scorer](img, patch, 3)
        for s, (a, b) in enumerate(zip(fast, ref)):
            assert a.shape == b.shape == (size[0] // (patch << s), size[1] // (patch << s))
            assert a.dtype == np.float32
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=tol, err_msg=f"{path.name} {scorer} scale {s}")


@pytest.mark.parametrize("scorer", SCORERS)
def test_grayscale_input_scores_like_its_values(scorer):
    img = load_resized(IMAGE_PATHS[4], 128, mode="L")
    assert img.ndim == 2
    fast = score_maps(img, 16, 3, scorer)
    ref = REFERENCE_SCORERS[scorer](img, 16, 3)
    for a, b in zip(fast, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_entropy_bins_match_torch_histc_for_every_rgb_colour():
    """The paper computes torch.histc(gray, 512, 0, 255) on float32 gray: our bins are identical."""
    v = np.arange(256, dtype=np.uint8)
    r, g, b = np.meshgrid(v, v, v, indexing="ij")
    rgb = np.stack([r.ravel(), g.ravel(), b.ravel()], -1).reshape(4096, 4096, 3)
    t = torch.from_numpy(rgb).float()
    torch_gray = (0.2989 * t[..., 0] + 0.5870 * t[..., 1] + 0.1140 * t[..., 2]).numpy()
    gray = gray_plane_reference(rgb)
    np.testing.assert_array_equal(gray, torch_gray)
    # bins are monotone in gray: equal counts over the sorted distinct values means equal bins
    values = np.unique(gray)
    ours = np.bincount(gray_bins_reference(values.reshape(1, -1)).ravel(), minlength=512)
    theirs = torch.histc(torch.from_numpy(values), bins=512, min=0, max=255).long().numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_entropy_matches_torch_definition_on_real_patches():
    img = load_resized(IMAGE_PATHS[7], 256)
    maps = score_maps(img, 16, 3)
    t = torch.from_numpy(img).float()
    gray = 0.2989 * t[..., 0] + 0.5870 * t[..., 1] + 0.1140 * t[..., 2]
    for s, size in enumerate((16, 32, 64)):
        for i, j in [(0, 0), (1, 2), (3, 3)]:
            patch = gray[i * size:(i + 1) * size, j * size:(j + 1) * size]
            hist = torch.histc(patch, bins=512, min=0, max=255)
            p = hist[hist > 0] / hist.sum()
            want = float(-(p * torch.log2(p)).sum())
            assert abs(maps[s][i, j] - want) < 1e-4


def test_known_values():
    flat = np.full((64, 64, 3), 93, np.uint8)
    for scorer in SCORERS:
        for m in score_maps(flat, 16, 3, scorer):
            assert np.all(m == 0), scorer
    # two gray levels in equal halves of every patch: exactly 1 bit
    halves = np.zeros((64, 64), np.uint8)
    halves[:, 1::2] = 200
    for m in score_maps(halves, 16, 3):
        np.testing.assert_allclose(m, 1.0, atol=1e-6)
    # 256 distinct levels, each once per 16x16 patch: 8 bits
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_allclose(score_maps(ramp, 16, 1)[0], 8.0, atol=1e-6)
    # upsample: scale 0 is lossless by definition
    img = load_resized(IMAGE_PATHS[2], 64)
    assert np.all(score_maps(img, 16, 3, "upsample")[0] == 0)
    assert score_maps(img, 16, 3, "upsample")[2].min() > 0


def test_sizes_that_are_not_multiples_ignore_the_remainder():
    img = load_resized(IMAGE_PATHS[3], (100, 150))
    maps = score_maps(img, 16, 3)
    assert [m.shape for m in maps] == [(6, 9), (3, 4), (1, 2)]
    crop = np.ascontiguousarray(img[:96, :144])
    for a, b in zip(maps, score_maps(crop, 16, 3)):
        np.testing.assert_array_equal(a, b)
    tiny = img[:10, :10]
    assert [m.shape for m in score_maps(tiny, 16, 2)] == [(0, 0), (0, 0)]


def test_bad_arguments():
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="scorer"):
        score_maps(img, 16, 2, "sobel")
    with pytest.raises(ValueError, match="patch_size"):
        score_maps(img, 0, 2)
    with pytest.raises(ValueError, match="num_scales"):
        score_maps(img, 16, 0)


def test_selection_kernel_bins_match_reference_for_every_rgb_colour():
    """`band_bins` (the SIMD gray/bin pass of patchify's kernel) equals the NumPy bins for all 2**24 colours."""
    from apt_data.scoring.entropy import band_bins

    v = np.arange(256, dtype=np.uint8)
    r, g, b = np.meshgrid(v, v, v, indexing="ij")
    rgb = np.stack([r.ravel(), g.ravel(), b.ravel()], -1).reshape(4096, 4096, 3)
    rows = rgb.reshape(4096, 4096 * 3)
    out = np.empty((4096, 4096), np.uint16)
    planes = [np.empty(4096, np.uint8) for _ in range(3)]
    band_bins(rows, 3, 0, 4096, 4096, *planes, out)
    np.testing.assert_array_equal(out, gray_bins_reference(rgb))
    gray = np.ascontiguousarray(rgb[:256, :256, 0])  # every gray level, single channel
    band_bins(gray, 1, 0, 256, 256, *planes, out[:256, :256])
    np.testing.assert_array_equal(out[:256, :256], gray_bins_reference(gray))


def entropy_bits(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_entropy_bounds_used_by_the_selection_kernel_hold():
    """log2(n^2 / sum c^2) <= H <= log2(k), and mean(H_children) <= H_parent <= mean(H_children) + 2,
    on real 32/64-px patches and on random histograms (spikes, uniform, sparse)."""
    hists = []
    for path in IMAGE_PATHS[::4]:
        bins = gray_bins_reference(load_resized(path, 256))
        for i in range(0, 256, 64):
            for j in range(0, 256, 64):
                hists.append([np.bincount(bins[a:a + 32, c:c + 32].ravel(), minlength=512)
                              for a in (i, i + 32) for c in (j, j + 32)])
    rng = np.random.default_rng(0)
    for _ in range(200):
        kind = rng.integers(3)
        kids = []
        for _ in range(4):
            if kind == 0:
                v = rng.integers(0, 512, 1024)
            elif kind == 1:
                v = rng.choice(rng.integers(0, 512, rng.integers(1, 6)), 1024)
            else:
                v = np.minimum(rng.geometric(rng.uniform(0.05, 0.9), 1024) + rng.integers(0, 400), 511)
            kids.append(np.bincount(v, minlength=512))
        hists.append(kids)
    for kids in hists:
        h_kids = []
        for c in kids:
            h = entropy_bits(c)
            n, sq, k = c.sum(), float((c.astype(np.int64) ** 2).sum()), int((c > 0).sum())
            assert 2 * np.log2(n) - np.log2(sq) <= h + 1e-9 and h <= np.log2(k) + 1e-9
            h_kids.append(h)
        parent = entropy_bits(np.sum(kids, 0))
        assert np.mean(h_kids) - 1e-9 <= parent <= np.mean(h_kids) + 2 + 1e-9


def test_entropy_kernels_call_only_kernels_of_their_own_module():
    """Numba's disk cache checks only the timestamp of the file that defines a kernel, and a kernel's
    cached code includes every kernel it calls: so patchify's and score_maps' entropy kernels call
    nothing compiled elsewhere (an edit of entropy.py then never leaves stale code in a cache)."""
    from numba.core.dispatcher import Dispatcher

    from apt_data.scoring import entropy, get_scorer

    assert get_scorer("entropy").layout_kernel is entropy.entropy_layout_scores
    todo, seen = [entropy._entropy_layout_flat, entropy.entropy_pyramid], set()
    while todo:
        kernel = todo.pop()
        if kernel in seen:
            continue
        seen.add(kernel)
        assert kernel.py_func.__module__ == entropy.__name__, kernel
        called = map(kernel.py_func.__globals__.get, kernel.py_func.__code__.co_names)
        todo += [g for g in called if isinstance(g, Dispatcher)]
    assert {k.__name__ for k in seen} >= {"entropy_layout", "band_bins", "_decide", "_histogram_entropy"}
