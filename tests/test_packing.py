"""pack_images: token pixels, coordinates, sequence positions and errors, on real photos."""
import numpy as np
import pytest
import torch

from apt_data import APTConfig, patchify
from apt_data.assemble import extract_tokens_reference, pack_images
from conftest import IMAGE_PATHS, load_resized


@pytest.fixture(scope="module")
def photos():
    sizes = [(224, 224), (256, 192), (160, 320), (384, 384), (96, 112)]
    return [load_resized(p, s) for p, s in zip(IMAGE_PATHS[::5], sizes)]


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_pack_matches_reference_extraction(photos, prefix):
    cfg = APTConfig()
    labels = [3, 1, 4, 1, 5]
    batch = pack_images(photos, cfg, labels=labels, num_prefix_tokens=prefix)
    layouts = [patchify(im, cfg) for im in photos]
    assert batch.num_images == 5 and batch.labels.tolist() == labels
    assert batch.image_sizes == tuple(im.shape[:2] for im in photos)
    assert batch.seqlens == tuple(len(l) + prefix for l in layouts)
    assert not hasattr(batch, "cu_seqlens")  # segments are the host ints seqlens + num_padding, nothing else
    assert batch.max_seqlen == max(batch.seqlens) and batch.seq_len == sum(batch.seqlens)
    for s in range(3):
        assert batch.pixels[s].dtype == torch.uint8 and batch.pixels[s].shape[1:] == (3, 16 << s, 16 << s)
        for b, (im, lay) in enumerate(zip(photos, layouts)):
            mine = (batch.coords[s][:, 0] == b).numpy()
            np.testing.assert_array_equal(batch.pixels[s].numpy()[mine], extract_tokens_reference(im, lay, s))
            sel = lay.scale == s
            np.testing.assert_array_equal(batch.coords[s].numpy()[mine][:, 1], lay.y[sel] // 16)
            np.testing.assert_array_equal(batch.coords[s].numpy()[mine][:, 2], lay.x[sel] // 16)
    # every non-prefix position of every segment is used by exactly one token
    pos = torch.cat(batch.seq_index).sort().values.numpy()
    starts = np.cumsum((0,) + batch.seqlens)[:-1]
    want = np.concatenate([np.arange(c + prefix, c + n) for c, n in zip(starts, batch.seqlens)])
    np.testing.assert_array_equal(pos, want)
    # tokens are laid out coarsest scale first inside each segment
    for b in range(5):
        firsts = [batch.seq_index[s][batch.coords[s][:, 0] == b] for s in (2, 1, 0)]
        firsts = [f for f in firsts if len(f)]
        assert all(a.max() < c.min() for a, c in zip(firsts, firsts[1:]))


def test_pixels_reassemble_the_image(photos):
    """Every pixel of every image is in exactly one token: pasting tokens back rebuilds it."""
    batch = pack_images(photos, APTConfig(thresholds=(6.0, 5.0)))
    for b, im in enumerate(photos):
        canvas = np.zeros_like(im)
        hits = np.zeros(im.shape[:2], int)
        for s in range(3):
            size = 16 << s
            for tok, (bi, y, x) in zip(batch.pixels[s].numpy(), batch.coords[s].numpy()):
                if bi == b:
                    canvas[y * 16:y * 16 + size, x * 16:x * 16 + size] = tok.transpose(1, 2, 0)
                    hits[y * 16:y * 16 + size, x * 16:x * 16 + size] += 1
        assert (hits == 1).all()
        np.testing.assert_array_equal(canvas, im)


def test_gray_images_padding_and_given_layouts(photos):
    gray = np.ascontiguousarray(photos[0][:, :, 1])
    batch = pack_images([gray], num_padding=7)
    gray1 = pack_images([gray[:, :, None]])  # HxWx1 is gray too
    rgb = pack_images([np.repeat(gray[:, :, None], 3, 2)])
    for s in range(3):
        assert torch.equal(batch.pixels[s], rgb.pixels[s]) and torch.equal(gray1.pixels[s], rgb.pixels[s])
    assert batch.num_padding == 7 and batch.seq_len == batch.num_real_tokens + 7
    cfg = APTConfig(thresholds=(float("inf"), float("inf")))
    lay = [patchify(im, cfg) for im in photos[:2]]
    packed = pack_images(photos[:2], cfg, layouts=lay)
    assert packed.seqlens == tuple(len(l) + 1 for l in lay)


def test_bad_inputs_name_the_image(photos):
    with pytest.raises(ValueError, match="image 1: expected dtype uint8"):
        pack_images([photos[0], photos[1].astype(np.float32)])
    with pytest.raises(ValueError, match=r"image 0: expected shape HxWx3.*RGBA"):
        pack_images([np.zeros((32, 32, 4), np.uint8)])
    with pytest.raises(ValueError, match=r"image 2: expected a numpy array, got list"):
        pack_images([photos[0], photos[1], [[0]]])
    with pytest.raises(ValueError, match="image 0: .*multiples of patch_size"):
        pack_images([np.zeros((40, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="image 0: empty image"):
        pack_images([np.zeros((0, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="image 1: layout is for"):
        pack_images(photos[:2], layouts=[patchify(photos[0], APTConfig())] * 2)
    with pytest.raises(ValueError, match="labels"):
        pack_images(photos[:2], labels=[1])
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        pack_images(photos[:1], num_prefix_tokens=-1)


def test_layouts_that_do_not_fit_are_rejected_not_read_out_of_bounds(photos):
    """The Numba kernel does not bounds-check memory, so it checks every token itself."""
    from dataclasses import replace

    lay = patchify(photos[1], APTConfig())
    H, W = photos[1].shape[:2]
    big = int(np.argmax(lay.scale))
    bad_y = lay.y.copy()
    bad_y[big] = H - 16  # a large token hanging off the bottom edge
    off_grid = lay.x.copy()
    off_grid[0] += 3
    bad_scale = lay.scale.copy()
    bad_scale[-1] = 3
    for bad, what in ((replace(lay, y=bad_y), f"token {big} "), (replace(lay, x=off_grid), "token 0 "),
                      (replace(lay, scale=bad_scale), f"token {len(lay) - 1} ")):
        with pytest.raises(ValueError, match=f"image 1: layout {what}.*does not fit the {H}x{W} image"):
            pack_images(photos[:2], layouts=[patchify(photos[0], APTConfig()), bad])


def test_to_and_pin_keep_metadata(photos):
    batch = pack_images(photos[:2], labels=[0, 1])
    moved = batch.to("cpu", non_blocking=True)
    assert moved.seqlens == batch.seqlens and torch.equal(moved.pixels[0], batch.pixels[0])


def test_one_buffer_per_batch_and_specs_travel(photos):
    """All tensors of a batch are aligned views of one buffer; a pickled `BatchSpec` plus the buffer's
    bytes rebuild the same batch (what a loader worker sends)."""
    import pickle

    from apt_data.assemble import fill_batch, prepare_batch

    batch = pack_images(photos, labels=[3, 1, 4, 1, 5], num_padding=3)
    tensors = [*batch.pixels, *batch.coords, *batch.seq_index, batch.labels]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert all(t.data_ptr() % 64 == 0 and t.is_contiguous() for t in tensors)
    spec, images, layouts, labels = prepare_batch(photos, APTConfig(), [3, 1, 4, 1, 5], 1, None, 3, keys=list("abcde"))
    buf = np.full(spec.nbytes + 64, 255, np.uint8)[64:]  # dirty, offset memory: every byte must be written
    fill_batch(spec, images, layouts, labels, buf)
    again = pickle.loads(pickle.dumps(spec)).to_batch(torch.from_numpy(buf))
    assert again.keys == tuple("abcde") and again.seqlens == batch.seqlens and again.num_padding == 3
    for a, b in zip(tensors, [*again.pixels, *again.coords, *again.seq_index, again.labels]):
        assert a.dtype == b.dtype and torch.equal(a, b)
