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


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        return_probs: bool = False, probs_override: torch.Tensor | None = None):
    """``q [B, N, H*d]``, ``k/v [B, M, H*d]`` -> ``out [B, N, H*d]`` (and ``probs [B, H, N, M]``).

    ``probs_override`` replaces the computed softmax (same shape), which is how stored cross-attention maps are
    injected.
    """
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    scale = 1.0 / math.sqrt(qh.shape[-1])
    probs = torch.softmax((qh.float() @ kh.float().transpose(-1, -2)) * scale, dim=-1)
    if probs_override is not None:
        probs = probs_override.to(probs.dtype)
    out = (probs @ vh.float()).to(q.dtype)
    out = out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
    return (out, probs) if return_probs else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, return_probs: bool = False):
    """Fast path: fused SDPA unless the probabilities are requested."""
    if return_probs:
        return attention_reference(q, k, v, heads, return_probs=True)
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
