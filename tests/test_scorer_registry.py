"""The scorer registry: adding a scorer is one `register_scorer` call, and every entry point accepts it."""
import argparse

import numpy as np
import pytest

import apt_data
import apt_data.config
from apt_data import APTConfig, decode_image, patchify, score_maps
from apt_train.flags import add_loader_args, config_from_args
from apt_data.layout import layout_from_flat_scores, layout_from_scores, select_patches_reference
from apt_data.scoring import (REFERENCE_SCORERS, SCORER_NAMES, get_scorer, register_scorer, scorer_names,
                              unregister_scorer)
from apt_data.scoring._gray import gray_plane_reference
from conftest import IMAGE_PATHS

BUILTINS = ("entropy", "laplacian", "upsample")
TOY_DEFAULTS = (8.0, 6.0)


# ------------------------------------------------------------------ a toy scorer in plain NumPy
def toy_pyramid(image, p, num_scales, first, flat, offsets):
    """Mean absolute deviation of the gray values of each patch, vectorised (the registry's kernel contract)."""
    g = gray_plane_reference(image).astype(np.float64)
    for s in range(first, num_scales):
        size = p << s
        h, w = g.shape[0] // size, g.shape[1] // size
        cells = g[:h * size, :w * size].reshape(h, size, w, size)
        mad = np.abs(cells - cells.mean(axis=(1, 3), keepdims=True)).mean(axis=(1, 3))
        flat[offsets[s]:offsets[s + 1]] = mad.astype(np.float32).ravel()


def toy_reference(image, patch_size, num_scales):
    """The same score, one patch at a time."""
    g = gray_plane_reference(image).astype(np.float64)
    maps = []
    for s in range(num_scales):
        size = patch_size * 2**s
        m = np.zeros((g.shape[0] // size, g.shape[1] // size), np.float32)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                patch = g[i * size:(i + 1) * size, j * size:(j + 1) * size]
                m[i, j] = np.abs(patch - patch.mean()).mean()
        maps.append(m)
    return maps


@pytest.fixture
def toy():
    scorer = register_scorer("toy", toy_pyramid, toy_reference, {3: TOY_DEFAULTS}, units="gray levels",
                             description="mean absolute deviation of gray values")
    try:
        yield scorer
    finally:
        unregister_scorer("toy")


@pytest.fixture(scope="module")
def photo():
    return decode_image(IMAGE_PATHS[0], 224)


def assert_same_layout(a, b):
    for attr in ("y", "x", "scale"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))


def test_a_registered_scorer_works_everywhere(toy, photo):
    assert "toy" in SCORER_NAMES and "toy" in apt_data.SCORER_NAMES and scorer_names()[-1] == "toy"
    assert REFERENCE_SCORERS["toy"] is toy_reference and get_scorer("toy") is toy
    cfg = APTConfig(scorer="toy")
    assert cfg.thresholds == TOY_DEFAULTS  # the scorer's defaults, in its own units
    maps = score_maps(photo, 16, 3, "toy")
    for got, want in zip(maps, toy_reference(photo, 16, 3)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    layout = patchify(photo, cfg)
    y, x, s = select_patches_reference(maps, TOY_DEFAULTS, 16)
    np.testing.assert_array_equal(layout.y, y)
    np.testing.assert_array_equal(layout.x, x)
    np.testing.assert_array_equal(layout.scale, s)
    assert len(set(layout.scale.tolist())) >= 2, "defaults should merge some patches of this photo"
    assert_same_layout(layout_from_scores(maps, photo.shape[:2], cfg), layout)
    assert_same_layout(layout_from_flat_scores(np.concatenate([m.ravel() for m in maps]), photo.shape[:2], cfg),
                       layout)
    # explicit thresholds win; scales without defaults need them
    assert len(patchify(photo, APTConfig(scorer="toy", thresholds=(-np.inf, -np.inf)))) == layout.uniform_tokens
    with pytest.raises(ValueError, match="APTConfig.thresholds.*'toy'.*num_scales=4.*pass thresholds"):
        APTConfig(scorer="toy", num_scales=4)
    assert APTConfig(scorer="toy", num_scales=4, thresholds=(9, 8, 7)).thresholds == (9.0, 8.0, 7.0)
    # the CLI flags and warmup() see it too
    ap = add_loader_args(argparse.ArgumentParser())
    assert config_from_args(ap.parse_args(["--scorer", "toy"]), ap) == cfg
    apt_data.warmup()


def test_a_fused_layout_kernel_is_used_by_patchify(toy, photo):
    calls = []

    def fused(image, p, num_scales, thresholds, hs, ws, offsets):
        calls.append(thresholds.tolist())
        flat = np.empty(offsets[-1], np.float32)
        toy_pyramid(image, p, num_scales, 1, flat, offsets)
        return flat

    register_scorer("toy", toy_pyramid, toy_reference, {3: TOY_DEFAULTS}, layout_kernel=fused, replace=True)
    cfg = APTConfig(scorer="toy")
    want = layout_from_scores(score_maps(photo, 16, 3, "toy"), photo.shape[:2], cfg)
    assert_same_layout(patchify(photo, cfg), want)
    assert calls == [list(TOY_DEFAULTS)]
    register_scorer("toy", toy_pyramid, toy_reference, {3: TOY_DEFAULTS},
                    layout_kernel=lambda *a: np.zeros(3, np.float64), replace=True)
    with pytest.raises(ValueError, match="layout kernel must return"):
        patchify(photo, cfg)


def test_unregistering_leaves_no_trace(photo):
    register_scorer("toy", toy_pyramid, toy_reference, {3: TOY_DEFAULTS})
    unregister_scorer("toy")
    assert tuple(SCORER_NAMES) == scorer_names() == BUILTINS
    assert SCORER_NAMES == BUILTINS and apt_data.config.SCORER_NAMES == BUILTINS
    with pytest.raises(ValueError, match="scorer must be one of"):
        APTConfig(scorer="toy")
    with pytest.raises(ValueError, match="unknown scorer 'toy'"):
        score_maps(photo, 16, 3, "toy")


def test_registry_rejects_bad_registrations():
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("entropy", toy_pyramid, toy_reference, {3: (1, 1)}, replace=True)  # built-ins stay
    with pytest.raises(ValueError, match="built in"):
        unregister_scorer("laplacian")
    with pytest.raises(ValueError, match="unknown scorer"):
        unregister_scorer("nope")
    with pytest.raises(ValueError, match="identifier"):
        register_scorer("my scorer", toy_pyramid, toy_reference, {})
    with pytest.raises(ValueError, match="need 2 numbers"):
        register_scorer("toy", toy_pyramid, toy_reference, {3: (1.0,)})
    with pytest.raises(ValueError, match="callable"):
        register_scorer("toy", "not a function", toy_reference, {})
    assert "toy" not in SCORER_NAMES
    register_scorer("toy", toy_pyramid, toy_reference, {})
    try:
        with pytest.raises(ValueError, match="already registered; pass replace=True"):
            register_scorer("toy", toy_pyramid, toy_reference, {})
    finally:
        unregister_scorer("toy")


# ------------------------------------------------------------------ defaults of the built-in scorers
def test_builtin_default_thresholds():
    assert APTConfig().thresholds == APTConfig(scorer="entropy").thresholds == (5.5, 4.0)
    assert APTConfig(scorer="laplacian").thresholds == (4.4, 1.2)
    assert APTConfig(scorer="upsample").thresholds == (6.8, 0.7)
    assert APTConfig(scorer="laplacian") == APTConfig(scorer="laplacian", thresholds=(4.4, 1.2))
    for name in BUILTINS:
        assert APTConfig(num_scales=1, scorer=name).thresholds == ()  # nothing to decide
        with pytest.raises(ValueError, match=f"APTConfig.thresholds: scorer '{name}' has no default thresholds "
                                             "for num_scales=4"):
            APTConfig(num_scales=4, scorer=name)
    assert get_scorer("entropy").units == "bits" and get_scorer("entropy").layout_kernel is not None


def test_builtin_defaults_keep_about_the_token_fraction_of_entropys():
    """Laplacian and upsample defaults were chosen (quantile matching, see their modules) to keep about
    the fraction of tokens entropy's (5.5, 4.0) keeps on these photos."""
    for size in (224, 384):
        imgs = [decode_image(p, size) for p in IMAGE_PATHS]
        frac = {name: sum(len(patchify(im, APTConfig(scorer=name))) for im in imgs) / (len(imgs) * (size // 16) ** 2)
                for name in BUILTINS}
        assert 0.8 < frac["entropy"] < 0.95
        for name in ("laplacian", "upsample"):
            assert abs(frac[name] - frac["entropy"]) < 0.03, (size, frac)


@pytest.mark.parametrize("bad", ["55", b"55", 5.5, ("a", "b"), (5.5, "4"), (5.5, None), [object(), 1.0]])
def test_bad_thresholds_name_the_field(bad):
    with pytest.raises(ValueError, match="APTConfig.thresholds must"):
        APTConfig(thresholds=bad)


def test_cli_flags_take_the_scorers_defaults(capsys):
    ap = add_loader_args(argparse.ArgumentParser())
    assert config_from_args(ap.parse_args([]), ap) == APTConfig()
    assert config_from_args(ap.parse_args(["--scorer", "upsample"]), ap).thresholds == (6.8, 0.7)
    assert config_from_args(ap.parse_args(["--scorer", "laplacian", "--thresholds", "20", "10"]),
                            ap).thresholds == (20.0, 10.0)
    assert config_from_args(ap.parse_args(["--num-scales", "1"]), ap).thresholds == ()
    with pytest.raises(ValueError, match="APTConfig.thresholds: scorer 'entropy' has no default thresholds"):
        config_from_args(ap.parse_args(["--num-scales", "4"]))
    with pytest.raises(SystemExit):
        config_from_args(ap.parse_args(["--num-scales", "4"]), ap)
    assert "scorer 'entropy' has no default thresholds for num_scales=4" in capsys.readouterr().err
    assert "entropy 5.5 4 (bits)" in " ".join(ap.format_help().split())
