"""CUDA paths: parity with timm, backends agreeing, bf16 training and no host-device sync.

Skipped without a GPU (CI has none); run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
"""
import numpy as np
import pytest
import timm
import torch

from apt_data import APTConfig, pack_images
from apt_model import from_timm, to_dense
from apt_model.attention import flash_attn_varlen
from conftest import IMAGE_PATHS, load_resized, timm_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from apt_model.attention import torch_varlen  # noqa: E402

BACKENDS = (["padded", "segments", "dense"] + (["varlen"] if torch_varlen() is not None else [])
            + (["flash"] if flash_attn_varlen() is not None else []))


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 would make fp32 parity a 1e-3 affair; the checks below are about our indexing, not TF32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _models(name="vit_small_patch16_224", size=224):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=size).cuda().eval()
    return model, from_timm(model).cuda().eval()


def test_no_reduction_equals_timm_on_cuda():
    model, apt = _models()
    images = [load_resized(p, 224) for p in IMAGE_PATHS[:4]]
    batch = pack_images(images, APTConfig(thresholds=(-np.inf, -np.inf))).to("cuda")
    with torch.no_grad():
        want = model(timm_input(images, model, "cuda"))
        for backend in ("padded", "segments", "dense"):
            apt.attn_backend = backend
            assert (apt(batch) - want).abs().max().item() <= 1e-4, backend


def test_backends_agree_on_mixed_scale_batches():
    """Real images at 384 with the paper's thresholds: variable lengths, all three scales present."""
    _, apt = _models("vit_small_patch16_384", 384)
    images = [load_resized(p, 384) for p in IMAGE_PATHS[:6]]
    batch = pack_images(images, APTConfig()).to("cuda")
    assert len(set(batch.seqlens[: len(images)])) > 1 and all(t.shape[0] for t in batch.pixels)
    outs = {}
    with torch.no_grad():
        for backend in ("padded", "segments", "dense"):
            apt.attn_backend = backend
            outs[backend] = apt(batch)
            feats, _ = apt.forward_features(batch)
            assert to_dense(feats, batch).shape == (6, apt.embed_dim, 24, 24)
    for backend in ("segments", "dense"):
        assert (outs[backend] - outs["padded"]).abs().max().item() <= 1e-4, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_train_step_no_host_sync(backend):
    """Forward + backward under bf16 autocast: finite loss and gradients, and no host-device sync
    (``set_sync_debug_mode('error')`` raises on any synchronising call)."""
    _, apt = _models()
    apt.train()
    apt.attn_backend = backend
    images = [load_resized(p, 224) for p in IMAGE_PATHS[:8]]
    batch = pack_images(images, APTConfig(), labels=list(range(8))).pin_memory().to("cuda", non_blocking=True)
    for step in range(2):  # the second step runs with warm caches, as in training
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(apt(batch).float(), batch.labels)
                _, cu = apt.forward_features(batch)  # the model's own segment bounds, no sync either
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss).item() and cu.tolist() == [0, *np.cumsum(batch.seqlens).tolist()]
        grads = [p.grad for p in apt.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all().item() for g in grads)
        apt.zero_grad(set_to_none=True)


def test_auto_picks_a_flash_kernel_for_bf16():
    from apt_model.attention import resolve_backend, torch_varlen
    want = "flash" if flash_attn_varlen() is not None else "varlen" if torch_varlen() is not None else "padded"
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == want
    assert resolve_backend("auto", torch.device("cuda"), torch.float32) == "padded"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("varlen", "flash")])
def test_flash_backends_match_padded_in_bf16(backend):
    """The varlen kernels against the masked SDPA on real mixed-scale batches (bf16 tolerance)."""
    _, apt = _models("vit_small_patch16_384", 384)
    images = [load_resized(p, 384) for p in IMAGE_PATHS[:6]]
    batch = pack_images(images, APTConfig()).to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        apt.attn_backend = "padded"
        want = apt(batch).float()
        apt.attn_backend = backend
        got = apt(batch).float()
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()


def test_autocast_picks_the_bf16_backend():
    """Under bf16 autocast the residual stream is fp32 but attention runs in bf16: the context must
    choose the flash/varlen kernel, not the fp32 fallback."""
    _, apt = _models()
    images = [load_resized(p, 224) for p in IMAGE_PATHS[:2]]
    batch = pack_images(images, APTConfig()).to("cuda")
    x = apt.embed(batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ctx = apt.context(batch, x)
    from apt_model.attention import resolve_backend
    assert ctx.backend == resolve_backend("auto", torch.device("cuda"), torch.bfloat16)
