"""HiFi Tuner personalised subject replacement (Wang et al. 2023, arXiv 2312.00079, §3.4, Algorithm 3), after
prompt-to-prompt (Hertz et al. 2022) and null-text inversion (Mokady et al. 2023).

1. ``x^r_0`` = VAE(photo); ``c_r`` = its caption; ``c_g`` = ``c_r`` with the source word replaced by the target
   (class) word ``w_g``, and the subject rows ``c_s^t`` in its padding tail (Eq. 7).
2. DDIM inversion of ``x^r_0`` with ``c_r`` (Eq. 3), then null-text optimisation (Eq. 4): per-step ``ϕ*_t`` and the
   states ``x^r_t`` that CFG with ``ϕ*_t`` visits (methods/inversion.py).
3. Generation from ``x^r*_T`` with ``[c_g, c_s^t]`` and ``ϕ*_t``: in the conditional branch the cross-attention
   probabilities of every token of ``c_g`` are the source's (computed at ``x^r_t`` with ``c_r``), except the
   tokens of ``w_g`` and the subject rows, which keep their fresh probabilities. Token positions are aligned
   around the swapped word (:func:`token_alignment`). As in prompt-to-prompt's attention edits, the mixed rows are
   not renormalised, and the injection runs for the first ``cross_replace`` fraction of the steps.

The source branch is recomputed in lock-step with the target (one batched conditional call of [source; target] per
step, prompt-to-prompt's scheme) instead of storing every map: the stored maps of a 512x512 SD1.5 generation are
~1.7 GB in fp16 per 50 steps; the batched call costs one extra conditional evaluation per injected step.

"Keeping the background": after every step the target is blended with the source state outside the subject mask
``M`` (latent resolution): ``x_t ← x^r_t + M·(x_t − x^r_t)`` (prompt-to-prompt's local blend, with the user's mask
instead of one derived from attention maps).
"""
from __future__ import annotations

import logging
import re
import time

import torch

from ..core import host
from ..core.host import PersonalizeError
from ..core.sampling import InterruptibleProgress, ModelPrediction, check_sigmas, ddim_step, sigma_list
from ..kernels.attention import attention, attention_reference

log = logging.getLogger("comfyui_personalize")

NODE = "HiFi Subject Replace"
SUPPORTED = ("sd1", "sd2")  # one text encoder: SDXL's two-encoder pooled conditioning has no definition here


# ---------------------------------------------------------------------------------------------------------
# Prompt editing and token alignment.

def replace_word(caption: str, source: str, target: str) -> str:
    """``caption`` with the first whole-word occurrence of ``source`` replaced by ``target`` (case-insensitive)."""
    pattern = re.compile(rf"\b{re.escape(source.strip())}\b", re.IGNORECASE)
    if not source.strip() or not pattern.search(caption):
        raise PersonalizeError(f"{NODE}: the source word '{source}' does not occur in the caption '{caption}'. "
                               "Name the word of the caption that denotes the subject to replace (e.g. 'cat').")
    return pattern.sub(target.strip(), caption, count=1)


def token_ids(clip, text: str) -> list[int]:
    """Token ids of the first 77-token chunk of the model's (single) text encoder."""
    tokens = clip.tokenize(text)
    key = next(iter(tokens))
    if len(tokens[key]) > 1:
        raise PersonalizeError(f"{NODE}: the caption is longer than 77 tokens; shorten it.")
    return [int(t) if isinstance(t, int) else -1 for t, _w in tokens[key][0]]


def token_alignment(source_ids: list[int], target_ids: list[int]) -> torch.Tensor:
    """For each target position ``j`` the source position whose map it takes, or −1 (fresh attention).

    Positions before the first difference map to themselves; the differing span of the target (the new word)
    is fresh; positions after it map to the source shifted by the length difference of the two words.
    """
    n = len(target_ids)
    end = source_ids[-1]  # the padding token (the end token in SD's tokenizers)

    def content(ids):  # up to and including the first end token; the padding after it is shifted along
        return ids[:ids.index(end, 1) + 1] if end in ids[1:] else ids
    cs, ct = content(source_ids), content(target_ids)
    p = 0
    while p < min(len(cs), len(ct)) and cs[p] == ct[p]:
        p += 1
    s = 0  # common suffix of the contents
    while s < min(len(cs), len(ct)) - p and cs[-1 - s] == ct[-1 - s]:
        s += 1
    ls, lt = len(cs) - p - s, len(ct) - p - s
    out = []
    for j in range(n):
        if j < p:
            out.append(j)
        elif j < p + lt:
            out.append(-1)
        else:
            k = j - lt + ls
            out.append(k if 0 <= k < len(source_ids) else -1)
    return torch.tensor(out, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------
# Cross-attention injection (attn2 replace patch on a private clone).

class CrossAttentionInjection:
    """Shared state of the ``attn2`` replace patches. While ``active``, a call with a batch ``[source; target]``
    (equal halves) computes the source half normally and gives the target half the source's probabilities in
    every column whose ``alignment`` is ≥ 0 (gathered from that source column), keeping its own probabilities in
    the fresh columns (−1). Otherwise it is plain attention (fused SDPA)."""

    def __init__(self, alignment: torch.Tensor):
        self.alignment = alignment
        self.active = False
        self.calls = 0

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if not self.active:
            return attention(q, k, v, heads)
        self.calls += 1
        b = q.shape[0] // 2
        out_s, p_s = attention_reference(q[:b], k[:b], v[:b], heads, return_probs=True)
        _, p_t = attention_reference(q[b:], k[b:], v[b:], heads, return_probs=True)
        align = self.alignment.to(p_t.device)
        reps = p_t.shape[-1] // align.shape[0]  # contexts repeated to a common length keep the token pattern
        align = torch.cat([torch.where(align >= 0, align + r * align.shape[0], align) for r in range(reps)])
        keep = (align >= 0).view(1, 1, 1, -1)
        mixed = torch.where(keep, p_s.index_select(-1, align.clamp_min(0)), p_t)
        out_t = attention_reference(q[b:], k[b:], v[b:], heads, probs_override=mixed)
        return torch.cat([out_s, out_t])


def add_injection(patcher, injection: CrossAttentionInjection) -> int:
    """Install ``injection`` as the ``attn2`` replace patch of every transformer block of ``patcher`` (a clone)."""
    from ..core.graph_patches import transformer_blocks
    keys = transformer_blocks(patcher.model.diffusion_model)
    for name, number in keys:
        patcher.set_model_attn2_replace(injection, name, number)
    return len(keys)


# ---------------------------------------------------------------------------------------------------------
# The node's work.

def check_inputs(model, clip, image, mask, caption, source_word, target_word, subject, sigmas, cfg,
                 null_text_steps, cross_replace) -> torch.Tensor:
    from ..core.inputs import prepare_masks
    from .hifi_tuner import wrong_family_message
    family = host.require_family(NODE, model, clip, supported=SUPPORTED)
    if subject is not None and subject.family != family:
        raise PersonalizeError(wrong_family_message(f"{NODE}: the subject", subject.family, family))
    if image.shape[0] != 1:
        raise PersonalizeError(f"{NODE}: one photo at a time (got a batch of {image.shape[0]}).")
    if image.shape[1] % 8 or image.shape[2] % 8:
        raise PersonalizeError(f"{NODE}: the photo is {image.shape[2]}x{image.shape[1]}; crop or resize it to a "
                               "multiple of 8 on each side (e.g. with ImageScale).")
    if mask is None:
        raise PersonalizeError(f"{NODE}: connect the MASK of the subject to replace.")
    masks = prepare_masks(NODE, image, mask)
    replace_word(caption, source_word, target_word or source_word)
    if not target_word.strip():
        raise PersonalizeError(f"{NODE}: the target word is empty; give the subject's class word (e.g. 'dog').")
    check_sigmas(NODE, sigmas, "The ddim_uniform scheduler matches the subject's step-wise rows.")
    if cfg == 1.0 or null_text_steps < 1:
        raise PersonalizeError(f"{NODE}: the background is rebuilt by null-text inversion, which needs cfg ≠ 1 and "
                               "null_text_steps ≥ 1.")
    if not 0.0 <= cross_replace <= 1.0:
        raise PersonalizeError(f"{NODE}: cross_replace is a fraction of the steps, 0..1.")
    return masks


def _rows_for_sigma(subject, model, sigma: float, use_stepwise: bool) -> torch.Tensor:
    """The subject rows for a sampler sigma: the step-wise rows of the nearest training timestep, or the global."""
    if not use_stepwise or not subject.has_stepwise:
        return subject.global_rows
    t = float(host.model_sampling(model).timestep(torch.tensor([sigma])).item())
    k = min(range(len(subject.timesteps)), key=lambda j: abs(subject.timesteps[j] - t))
    return subject.rows[1 + k]


def replace_subject(model, clip, vae, image: torch.Tensor, mask: torch.Tensor, caption: str, source_word: str,
                    target_word: str, subject, sigmas: torch.Tensor, *, cfg: float = 7.5, null_text_steps: int = 10,
                    learning_rate: float = 1e-2, cross_replace: float = 0.8, use_stepwise: bool = True,
                    node_id=None) -> tuple[torch.Tensor, dict]:
    """Algorithm 3. Returns ``(IMAGE [1, H, W, 3], LATENT)``."""
    from ..kernels.losses import resize_mask_to
    from . import inversion
    from .hifi_tuner import with_tail
    masks = check_inputs(model, clip, image, mask, caption, source_word, target_word, subject, sigmas, cfg,
                         null_text_steps, cross_replace)
    t0 = time.perf_counter()
    target_caption = replace_word(caption, source_word, target_word)
    c_r, _ = host.encode_text(clip, caption)
    c_g, _ = host.encode_text(clip, target_caption)
    phi, _ = host.encode_text(clip, "")
    alignment = token_alignment(token_ids(clip, caption), token_ids(clip, target_caption))
    if subject is not None:
        alignment[-subject.n_tokens:] = -1  # the subject rows attend freshly
    latent = {"samples": vae.encode(image[:, :, :, :3])}
    pos, neg = host.make_conditioning(c_r, None), host.make_conditioning(phi, None)
    inv = inversion.invert_image(model, pos, neg, latent, sigmas, cfg=cfg, null_text_steps=null_text_steps,
                                 learning_rate=learning_rate, node_id=node_id)

    injection = CrossAttentionInjection(alignment)
    patched = model.clone()
    add_injection(patched, injection)
    n = sigmas.shape[0] - 1
    inject_steps = round(cross_replace * n)
    sig = sigma_list(sigmas)
    progress = InterruptibleProgress(n, node_id)
    try:
        host.load_for_compute(patched)
        device = patched.load_device
        states = inv.states.to(device)
        x = states[0].clone()
        m = resize_mask_to(masks, tuple(x.shape[-2:])).to(device=device, dtype=x.dtype)
        cr, cg = c_r.to(device).float(), c_g.to(device).float()
        denoiser = ModelPrediction.for_conditioning(patched, pos, neg, torch.cat([x, x]), NODE)
        with torch.no_grad():
            for i in range(n):
                progress.check()
                target_ctx = with_tail(cg, _rows_for_sigma(subject, model, sig[i], use_stepwise)) \
                    if subject is not None else cg
                s2 = torch.full((2 * x.shape[0],), sig[i], device=device)
                injection.active = i < inject_steps
                if injection.active:
                    d_c = denoiser(torch.cat([states[i], x]), s2, torch.cat([cr, target_ctx]))[x.shape[0]:]
                else:
                    d_c = denoiser(x, s2[:x.shape[0]], target_ctx)
                injection.active = False
                d_u = denoiser(x, s2[:x.shape[0]], inv.null_embeddings[i].to(device), uncond=True)
                x = ddim_step(x, d_u + cfg * (d_c - d_u), sig[i], sig[i + 1])
                x = states[i + 1] + m * (x - states[i + 1])
                progress.advance()
        out_latent = patched.model.process_latent_out(x.float()).to(host.intermediate_device())
    finally:
        host.release(patched)
    decoded = vae.decode(out_latent)
    log.info("%s: '%s' -> '%s', %d steps (%d with injected maps), %.1f s", NODE, caption, target_caption, n,
             inject_steps, time.perf_counter() - t0)
    return decoded[..., :3], {"samples": out_latent}
