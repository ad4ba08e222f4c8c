"""Scaled dot-product attention with an optional per-token attention-map output.

``attention_reference`` is the straightforward implementation (softmax(QKᵀ/√d)V) used as the oracle in
tests and whenever the caller needs the probabilities (prompt-to-prompt style map capture/injection).
``attention`` dispatches to PyTorch's fused SDPA when no map is requested.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(1, 2)


def _broadcast_mask(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """An additive (float) or keep (bool) mask ``[M]``-broadcastable as ComfyUI passes it - ``[N, M]``,
    ``[B, N, M]`` or ``[B, 1|H, N, M]`` - as ``[B|1, 1|H, N, M]`` for scores of shape ``[B, H, N, M]``."""
    if mask is None:
        return None
    bs = 1 if mask.dim() == 2 else mask.shape[0]
    return mask.reshape(bs, -1, mask.shape[-2], mask.shape[-1])


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        return_probs: bool = False, probs_override: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None):
    """``q [B, N, H*d]``, ``k/v [B, M, H*d]`` -> ``out [B, N, H*d]`` (and ``probs [B, H, N, M]``).

    ``probs_override`` replaces the computed softmax (same shape), which is how stored cross-attention maps are
    injected. ``mask``: added to the scores (float) or keeping only True positions (bool), shapes as ComfyUI
    passes them (``[N, M]``, ``[B, N, M]``, ``[B, 1|H, N, M]``).
    """
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    scale = 1.0 / math.sqrt(qh.shape[-1])
    scores = (qh.float() @ kh.float().transpose(-1, -2)) * scale
    m = _broadcast_mask(mask, q.shape[0])
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    probs = torch.softmax(scores, dim=-1)
    if probs_override is not None:
        probs = probs_override.to(probs.dtype)
    out = (probs @ vh.float()).to(q.dtype)
    out = out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
    return (out, probs) if return_probs else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, return_probs: bool = False,
              mask: torch.Tensor | None = None):
    """Fast path: fused SDPA unless the probabilities are requested. ``mask`` as in :func:`attention_reference`."""
    if return_probs:
        return attention_reference(q, k, v, heads, return_probs=True, mask=mask)
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    m = _broadcast_mask(mask, q.shape[0])
    if m is not None and m.dtype != torch.bool:
        m = m.to(q.dtype)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=m)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
