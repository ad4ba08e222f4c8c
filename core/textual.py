"""Trainable placeholder tokens (Textual Inversion, Gal et al. 2022, Eq. 2: ``v* = argmin E‖ε − ε_θ(z_t, t, c_θ(y))‖²``).

A placeholder word (one ordinary vocabulary token such as ``sks``) gets its own input-embedding vector in
every text encoder of the model (CLIP-L for SD1, CLIP-H for SD2, CLIP-L and CLIP-G for SDXL). The vector
replaces the token's row by patching the token-embedding layer's forward on a CLIP *clone*
(``torch.where(ids == placeholder, v, E[ids])``), which is differentiable.
The same vectors saved as an embedding file load with the stock ``embedding:name`` syntax.
"""
from __future__ import annotations

import re

import torch

from .graph_patches import override_forward
from .host import PersonalizeError

EMBEDDING_PATH = "transformer.text_model.embeddings.token_embedding"


def encoder_keys(clip) -> list[str]:
    """Tokenizer keys of a CLIP object ('l', 'g', 'h'), each matching the text encoder ``clip_<key>``."""
    tokens = clip.tokenize("a")
    return [k for k in tokens if hasattr(clip.cond_stage_model, f"clip_{k}")]


def special_tokens(clip) -> dict[str, tuple[int, int, int | None]]:
    """``(start, end, padding)`` token ids of each encoder, read from the tokenizer's own encoding of the empty
    prompt (``[start, end, padding, ...]``; padding is None for a tokenizer that does not pad), so no tokenizer
    attribute is read."""
    empty = clip.tokenize("")
    out = {}
    for key in encoder_keys(clip):
        seq = [int(item[0]) for item in empty[key][0]]
        out[key] = (seq[0], seq[1], seq[2] if len(seq) > 2 else None)
    return out


def word_token_ids(clip, word: str) -> dict[str, list[int]]:
    """Token ids of ``word`` in each encoder's tokenizer (start/end/padding removed)."""
    out = {}
    tokens = clip.tokenize(word)
    specials = special_tokens(clip)
    for key in encoder_keys(clip):
        start, end, pad = specials[key]
        special = {start, end, pad}
        ids = []
        for item in tokens[key][0]:
            tok = item[0]
            if not isinstance(tok, int):
                raise PersonalizeError(f"'{word}' contains an embedding reference; use a plain word.")
            if tok == end:
                break
            if tok not in special:
                ids.append(int(tok))
        out[key] = ids
    return out


# What ComfyUI's ``embedding:<name>`` syntax (comfy/sd1_clip.py, SDTokenizer.tokenize_with_weights) can load: the
# name ends at the first space; '(' ')' ':' '\\' are the prompt-weight syntax; ',' is stripped from its end; '.'
# and path separators make names ('.', '..', 'a/b') that do not name a file in models/embeddings.
EMBEDDING_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
EMBEDDING_NAME_CHARS = "letters A-Z a-z, digits 0-9, '_' and '-'"
SAFE_PLACEHOLDERS = ("sks", "ohwx")  # single tokens in the rare tail of the CLIP vocabulary
# CLIP's byte-level BPE numbers its tokens in merge order, i.e. by frequency in the tokenizer's training text:
# a word among the first 80% (ids < ~39500 of 49408, e.g. 'dog' 1929, 'object' 14115) is a word prompts use.
COMMON_TOKEN_FRACTION = 0.8


def check_embedding_name(node: str, name: str) -> str:
    """The embedding file name, stripped; refused unless ``embedding:<name>`` in a stock CLIPTextEncode loads it."""
    stripped = name.strip()
    if not EMBEDDING_NAME_RE.fullmatch(stripped):
        raise PersonalizeError(
            f"{node}: the embedding_name '{name}' cannot be loaded with 'embedding:{stripped}' in a prompt. Use only "
            f"{EMBEDDING_NAME_CHARS} (no spaces, dots or slashes), e.g. 'my_subject'.")
    return stripped


def _vocab_size(clip, key: str) -> int | None:
    tok = getattr(getattr(clip.tokenizer, f"clip_{key}", None), "tokenizer", None)
    try:
        return len(tok.get_vocab())
    except Exception:  # a tokenizer without a vocabulary table: no frequency check
        return None


def check_placeholder(node: str, clip, placeholder: str, init_word: str | None = None) -> dict[str, int]:
    """Token id of ``placeholder`` per text encoder; refused (before any work) unless it is one plain word that
    every tokenizer keeps as a single token, is not the init word, and is not a common word: its row replaces the
    token everywhere, so a placeholder such as 'dog' would change every prompt that says 'dog'."""
    placeholder = placeholder.strip()
    alternatives = " or ".join(f"'{w}'" for w in SAFE_PLACEHOLDERS)
    if not placeholder or any(c.isspace() for c in placeholder):
        raise PersonalizeError(f"{node}: the placeholder must be one word without spaces (got '{placeholder}'). "
                               f"Use a rare word such as {alternatives}.")
    ids = word_token_ids(clip, placeholder)
    for key, toks in ids.items():
        if len(toks) != 1:
            raise PersonalizeError(
                f"{node}: the placeholder '{placeholder}' is {len(toks)} tokens for the text encoder clip_{key}; "
                f"it must be exactly one. Choose a short rare word such as {alternatives}.")
    if init_word is not None and placeholder.lower() == init_word.strip().lower():
        raise PersonalizeError(
            f"{node}: the placeholder '{placeholder}' is the init word itself; every prompt with "
            f"'{placeholder}' would show your subject. Use a rare word such as {alternatives} as the placeholder "
            f"and keep '{init_word.strip()}' as init_word.")
    for key, toks in ids.items():
        size = _vocab_size(clip, key)
        if size and toks[0] < COMMON_TOKEN_FRACTION * size:
            raise PersonalizeError(
                f"{node}: the placeholder '{placeholder}' is a common word for the text encoder clip_{key} (token "
                f"{toks[0]} of {size}; the tokenizer numbers words by frequency): training it would change every "
                f"prompt that says '{placeholder}'. Use a rare single-token word such as {alternatives}.")
    return {k: v[0] for k, v in ids.items()}


def token_embedding(clip, key: str) -> torch.nn.Module:
    module = getattr(clip.cond_stage_model, f"clip_{key}")
    for part in EMBEDDING_PATH.split("."):
        module = getattr(module, part)
    return module


class PlaceholderEmbeddings(torch.nn.Module):
    """One trainable vector per text encoder for a single-token placeholder word."""

    def __init__(self, clip, placeholder: str, init_word: str, node: str = "Train Subject Embedding"):
        super().__init__()
        placeholder = placeholder.strip()
        token_ids = check_placeholder(node, clip, placeholder, init_word)
        init_ids = word_token_ids(clip, init_word)
        if not all(init_ids.values()):
            raise PersonalizeError(f"The init word '{init_word}' is empty; use the subject's class, e.g. 'dog'.")
        self.word = placeholder
        self.token_ids = token_ids
        self.vectors = torch.nn.ParameterDict()
        for key, toks in init_ids.items():
            weight = token_embedding(clip, key).weight
            # mean over the init word's tokens; detach first: a table the executor moved to the GPU is an
            # inference tensor, which autograd may not record
            init = weight.detach()[toks].float().mean(0).clone()
            self.vectors[key] = torch.nn.Parameter(init)

    def attach(self, clip) -> None:
        """Make ``clip`` (a clone) map the placeholder token to the vectors, through its patcher."""
        for key, tid in self.token_ids.items():
            vec = self.vectors[key]

            def fn(base, ids, *args, _tid=tid, _vec=vec, **kwargs):
                out = base(ids, *args, **kwargs)
                hit = (ids == _tid).unsqueeze(-1)
                return torch.where(hit, _vec.to(device=out.device, dtype=out.dtype), out)

            override_forward(clip.patcher, f"clip_{key}.{EMBEDDING_PATH}", fn)

    def frozen_copy(self) -> "PlaceholderEmbeddings":
        """A detached copy for the output CLIP (no autograd state, safe to cache in the graph)."""
        new = PlaceholderEmbeddings.__new__(PlaceholderEmbeddings)
        torch.nn.Module.__init__(new)
        new.word, new.token_ids = self.word, dict(self.token_ids)
        new.vectors = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(v.detach().clone(), requires_grad=False) for k, v in self.vectors.items()})
        return new

    def embedding_file_tensors(self, family: str) -> dict:
        """Tensors in the layout ComfyUI's ``embedding:`` loader (and A1111) reads."""
        if family == "sdxl":
            return {f"clip_{k}": v.detach().float().cpu().reshape(1, -1).contiguous() for k, v in self.vectors.items()}
        (vec,) = self.vectors.values()
        return {"emb_params": vec.detach().float().cpu().reshape(1, -1).contiguous()}


class ConditioningRows(torch.nn.Module):
    """Trainable rows in the *encoded* prompt (CONDITIONING) space: ``[c, c_s]`` replaces the last ``n`` rows of
    an encoded prompt ``c [B, T, d]`` by ``c_s [n, d]`` (HiFi Tuner §3.2, Eq. 6: ``c_s`` is initialised from, and
    regularised toward, the tail of the encoded null prompt ``ϕ``). Differentiable in ``c_s`` only."""

    def __init__(self, init_rows: torch.Tensor):
        super().__init__()
        if init_rows.dim() != 2:
            raise PersonalizeError("ConditioningRows expects [n, d] initial rows.")
        self.anchor = init_rows.detach().float().clone()
        self.rows = torch.nn.Parameter(init_rows.detach().float().clone())

    def apply(self, cond: torch.Tensor) -> torch.Tensor:
        n = self.rows.shape[0]
        rows = self.rows.to(device=cond.device, dtype=cond.dtype).unsqueeze(0).expand(cond.shape[0], -1, -1)
        return torch.cat([cond[:, :-n], rows], dim=1)

    def regularisation(self) -> torch.Tensor:
        """Mean squared distance to the initial rows (the null-text tail ``ϕ_s``)."""
        return (self.rows - self.anchor.to(self.rows.device)).pow(2).mean()
