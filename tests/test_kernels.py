"""Shared primitives against closed forms and straightforward implementations."""
import pytest
import torch
import torch.nn.functional as F

from helpers import pack_module


@pytest.fixture(scope="module")
def K(host):
    return pack_module(host, "kernels")


def test_lowrank_bypass_equals_merged_weight(K):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    w = torch.randn(12, 16, generator=g)
    down, up = torch.randn(3, 16, generator=g), torch.randn(12, 3, generator=g)
    merged = F.linear(x, K.lowrank_merge(w, down, up, 0.5))
    bypass = F.linear(x, w) + K.lowrank_forward(x, down, up, 0.5)
    torch.testing.assert_close(bypass, merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.lowrank_delta_weight(down, up, 0.5), 0.5 * up @ down)


def test_lowrank_conv_delta_matches_dense(K):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 9, 9, generator=g)
    w = torch.randn(5, 6, 3, 3, generator=g)
    down, up = torch.randn(2, 6, 3, 3, generator=g), torch.randn(5, 2, 1, 1, generator=g)
    merged = F.conv2d(x, w + K.lowrank_delta_weight(down, up, 0.25), padding=1)
    # the bypass written out: ``down`` with the base kernel geometry, then ``up`` as a 1x1 conv
    bypass = F.conv2d(x, w, padding=1) + 0.25 * F.conv2d(F.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(bypass, merged, rtol=1e-4, atol=1e-4)


def test_masked_mse_closed_form_and_zero_grad_outside(K):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 3:7] = 1.0
    loss = K.masked_mse(pred, target, mask)
    inside = (pred - target)[mask.expand_as(pred).bool()]
    torch.testing.assert_close(loss, inside.pow(2).mean())
    loss.backward()
    outside = ~mask.expand_as(pred).bool()
    assert pred.grad[outside].abs().max() == 0
    assert pred.grad[~outside].abs().min() > 0
    torch.testing.assert_close(K.masked_mse(pred, target, None), (pred - target).pow(2).mean())


def test_masked_mse_sample_weight_scales_each_sample_without_renormalising(K):
    """Per-sample weights multiply each sample's masked terms; the denominator stays the mask's element count
    (written out sample by sample)."""
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    mask = torch.rand(3, 1, 6, 6, generator=g) + 0.5
    w = torch.tensor([0.25, 1.0, 3.0])
    expected = sum(float(w[i] * (mask[i] * (pred[i] - target[i]).pow(2)).sum()) for i in range(3))
    expected /= float(mask.expand(3, 4, 6, 6).sum())
    assert abs(float(K.masked_mse(pred, target, mask, w)) - expected) < 1e-5 * abs(expected)
    plain = sum(float(w[i] * (pred[i] - target[i]).pow(2).mean()) for i in range(3)) / 3
    assert abs(float(K.masked_mse(pred, target, None, w)) - plain) < 1e-5 * plain
    torch.testing.assert_close(K.masked_mse(pred, target, mask, torch.ones(3)), K.masked_mse(pred, target, mask))


def test_resize_mask_area_keeps_coverage(K):
    m = torch.zeros(1, 16, 16)
    m[:, :8, :] = 1
    small = K.resize_mask_to(m, (4, 4))
    assert small.shape == (1, 1, 4, 4)
    torch.testing.assert_close(small.mean(), m.mean())
    m2 = torch.zeros(1, 16, 16)
    m2[:, :6, :] = 1  # row 1 of the 4x4 grid half covered
    assert float(K.resize_mask_to(m2, (4, 4))[0, 0, 1, 0]) == pytest.approx(0.5)


def test_attention_matches_naive_and_returns_maps(K):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 6, 16, generator=g) for _ in range(3))
    k, v = k[:, :5], v[:, :5]
    out, probs = K.attention_reference(q, k, v, heads=4, return_probs=True)
    # naive per-head loop
    ref = torch.empty_like(q)
    for h in range(4):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, -1)
        ref[..., sl] = w @ v[..., sl]
        torch.testing.assert_close(probs[:, h], w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.attention(q, k, v, 4), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 6))
    # injecting the stored map reproduces the output
    torch.testing.assert_close(K.attention_reference(q * 3, k, v, 4, probs_override=probs), out, rtol=1e-5, atol=1e-5)


def test_conditioning_rows_replace_the_tail_and_train_only_the_rows(host):
    textual = pack_module(host, "core.textual")
    g = torch.Generator().manual_seed(4)
    null = torch.randn(1, 77, 8, generator=g)
    cond = torch.randn(2, 77, 8, generator=g, requires_grad=True)
    rows = textual.ConditioningRows(null[0, -5:])
    out = rows.apply(cond)
    torch.testing.assert_close(out[:, :72], cond[:, :72])
    torch.testing.assert_close(out[:, 72:], null[:, 72:].expand(2, -1, -1))
    assert float(rows.regularisation()) == 0.0
    (out[:, 72:] * torch.randn(2, 5, 8, generator=g)).sum().backward()
    assert rows.rows.grad.abs().sum() > 0 and cond.grad.abs().sum() == 0
    with torch.no_grad():
        rows.rows.add_(1.0)
    assert float(rows.regularisation()) == pytest.approx(1.0)


def test_masked_attention_matches_naive_causal(K):
    """The causal mask CLIP passes (additive -inf above the diagonal) gives the naive masked softmax."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 7, 8, generator=g) for _ in range(3))
    mask = torch.full((7, 7), float("-inf")).triu_(1)
    ref = torch.empty_like(q)
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0 + mask, -1)
        ref[..., sl] = w @ v[..., sl]
    torch.testing.assert_close(K.attention(q, k, v, 2, mask=mask), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.attention_reference(q, k, v, 2, mask=mask), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.attention(q, k, v, 2, mask=mask == 0), ref, rtol=1e-5, atol=1e-5)


def test_uninference_repairs_weights_moved_to_another_device(host):
    """A loader builds weights under inference mode; the host later moves the module to the GPU outside it
    (``Module.to`` assigns ``param.data``), leaving Parameters that say ``is_inference() == False`` but have no
    version counter, so autograd fails. ``_apply(clone)`` is exactly that move without a GPU. ``uninference``
    must repair both kinds, and the repaired module must give the gradients of an ordinary copy."""
    core_host = pack_module(host, "core.host")
    with torch.inference_mode():
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        net.register_buffer("scale", torch.full((4,), 2.0))
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    fresh.load_state_dict({k: v.clone() for k, v in net.state_dict().items() if k != "scale"})
    net._apply(lambda t: t.clone())  # what a move to another device does to each parameter
    assert not net[0].weight.is_inference()
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="version counter"):
        net(x).sum().backward()
    # the 4 parameters; the move replaced the buffer by a new (ordinary) tensor
    assert core_host.uninference(net) == 4
    x.grad = None
    (net(x) * net.scale).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (fresh(x_ref) * 2.0).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert core_host.uninference(net) == 0
