"""The fused GPU paths of the shared primitives against their torch references, at SD shapes and half precision.

On a CUDA machine ``kernels.attention`` dispatches to PyTorch's fused SDPA (flash / memory-efficient kernels for
fp16 and bf16) and the low-rank bypass runs in the base weights' half dtype; the references compute in float32.
Skipped where no GPU exists (CI); run on a GPU machine with ``python -m pytest tests/test_kernels_gpu.py``.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import pack_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HALF = (torch.float16, torch.bfloat16)
# bf16 keeps 8 mantissa bits, fp16 11: the fused kernels accumulate in fp32 and round once at the end
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def K(host):
    return pack_module(host, "kernels")


def _qkv(b, n, m, heads, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, n, heads * d, generator=g, device="cuda").to(dtype)
    k = torch.randn(b, m, heads * d, generator=g, device="cuda").to(dtype)
    v = torch.randn(b, m, heads * d, generator=g, device="cuda").to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n,m", [(4096, 4096), (4096, 77), (1024, 77)])  # SD1.5 64x64 self / cross attention
def test_fused_attention_matches_reference(K, dtype, n, m):
    q, k, v = _qkv(2, n, m, 8, 40, dtype, seed=n + m)
    fused = K.attention(q, k, v, 8)
    ref = K.attention_reference(q.float(), k.float(), v.float(), 8)
    assert fused.dtype == dtype and fused.device.type == "cuda"
    torch.testing.assert_close(fused.float(), ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", HALF)
def test_fused_attention_with_masks_matches_reference(K, dtype):
    """Additive float and keep (bool) masks, as ComfyUI passes them, through the fused kernel."""
    q, k, v = _qkv(2, 1024, 77, 8, 40, dtype, seed=7)
    keep = torch.ones(2, 1024, 77, dtype=torch.bool, device="cuda")
    keep[:, :, 40:] = False
    keep[1, :512, 5:] = False
    additive = torch.zeros(2, 1024, 77, device="cuda").masked_fill(~keep, float("-inf"))
    ref = K.attention_reference(q.float(), k.float(), v.float(), 8, mask=keep)
    for mask in (keep, additive):
        out = K.attention(q, k, v, 8, mask=mask)
        torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", HALF)
def test_lowrank_bypass_in_half_matches_fp32_merge(K, dtype):
    """A float32 LoRA trained against half base weights: bypass in ``dtype`` vs the float32 merged layer."""
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(2, 4096, 320, generator=g, device="cuda")
    w = torch.randn(320, 320, generator=g, device="cuda") / 320 ** 0.5
    down = torch.randn(4, 320, generator=g, device="cuda") / 320 ** 0.5
    up = torch.randn(320, 4, generator=g, device="cuda") / 2
    merged = F.linear(x, K.lowrank_merge(w, down, up, 0.5))
    xh = x.to(dtype)
    bypass = F.linear(xh, w.to(dtype)) + K.lowrank_forward(xh, down, up, 0.5)
    assert bypass.dtype == dtype
    torch.testing.assert_close(bypass.float(), merged, rtol=4 * TOL[dtype], atol=4 * TOL[dtype])
    # merging into half weights (what ComfyUI's LoraLoader does on a fp16 model) rounds once
    merged_half = K.lowrank_merge(w.to(dtype), down, up, 0.5)
    torch.testing.assert_close(merged_half.float(), w + K.lowrank_delta_weight(down, up, 0.5),
                               rtol=TOL[dtype], atol=TOL[dtype])
