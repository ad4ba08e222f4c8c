"""Object patches on a ModelPatcher: how the pack changes a model's graph without mutating it.

Everything here goes through ``ModelPatcher.add_object_patch`` on a *clone*, so the patch exists only while
that clone is loaded and is removed by ComfyUI's own unpatching.

* :func:`override_forward` replaces one submodule's ``forward`` with a function of ``(base_forward, *args)``.
  LoRA bypass deltas and placeholder-token embeddings are both built on it.
* :func:`make_text_encoder_differentiable` makes the text encoder's ``CLIPLayer.forward``, whose residual adds are
  in place (``x += self.self_attn(self.layer_norm1(x), ...)``), safe for autograd. The UNet needs nothing: in
  every supported host ``BasicTransformerBlock`` adds out of place (tests/test_kernels.py checks both).
* :func:`add_gradient_checkpointing` wraps the UNet's top-level blocks in ``torch.utils.checkpoint``
  (:func:`checkpointed_blocks`: the same for a network the pack owns, e.g. PromptNet).
* :func:`use_fused_attention` / :func:`use_fused_text_attention` route the UNet's / text encoder's attention through
  PyTorch's fused SDPA on CPU, where both hosts otherwise use attention implementations that keep the N x N
  probabilities (and head-split copies of q, k, v) for backward.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import logging
import textwrap
import types

import torch
import torch.utils.checkpoint

log = logging.getLogger("comfyui_personalize")


def _get(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def override_forward(patcher, module_path: str, fn) -> None:
    """Patch ``<module_path>.forward`` so that calling the module runs ``fn(base_forward, *args, **kwargs)``.

    ``module_path`` is relative to ``patcher.model`` (e.g. ``"diffusion_model.input_blocks.1.1..."`` for a
    MODEL, ``"clip_l.transformer.text_model..."`` for ``clip.patcher``). ``base_forward`` is the class's
    forward bound to the module, so stacked patches of other packs are not recursed into.
    """
    module = _get(patcher.model, module_path)
    base = types.MethodType(type(module).forward, module)

    def forward(*args, **kwargs):
        return fn(base, *args, **kwargs)

    patcher.add_object_patch(f"{module_path}.forward", forward)


# ---------------------------------------------------------------------------------------------------------
# In-place residual adds -> out-of-place (autograd needs the pre-add value when a norm saved it).
#
# Why a rewrite of the host's source and not another mechanism: in ``CLIPLayer.forward`` (comfy/clip_model.py, the
# same in v0.3.64 and v0.3.75) ``x += self.self_attn(self.layer_norm1(x), ...)`` overwrites the tensor LayerNorm
# saved for its backward, so training a token embedding (Textual Inversion) or LoRA on the text encoder fails
# with "one of the variables needed for gradient computation has been modified by an inplace operation". Cloning
# the input does not help (the clone is what the norm saves and what ``+=`` overwrites), and writing our own copy of
# the layer would fork the host's code. The rewrite keeps the host's code and changes only ``x += y`` into
# ``x = x + y``; it runs once per host function (cached), applies as an object patch on a private clone, and falls
# back to the host's own method when the source cannot be read. tests/test_kernels.py checks on every supported
# host that backward through the unpatched layer fails and through the patched one matches finite differences.

class _AugAssignToAssign(ast.NodeTransformer):
    def __init__(self):
        self.changed = 0

    def visit_AugAssign(self, node):  # x += y  ->  x = x + y   (plain names only)
        if isinstance(node.target, ast.Name):
            self.changed += 1
            load = ast.Name(id=node.target.id, ctx=ast.Load())
            new = ast.Assign(targets=[node.target], value=ast.BinOp(left=load, op=node.op, right=node.value))
            return ast.copy_location(new, node)
        return node


@functools.lru_cache(maxsize=None)
def out_of_place_version(func):
    """Return a copy of ``func`` with every ``name op= value`` rewritten as ``name = name op value``,
    or ``None`` if it has none. The copy shares the original's globals and defaults."""
    try:
        src = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None
    tree = ast.parse(src)
    fdef = tree.body[0]
    fdef.decorator_list = []
    tr = _AugAssignToAssign()
    tr.visit(fdef)
    if not tr.changed:
        return None
    ast.fix_missing_locations(tree)
    code = compile(tree, filename=f"<out-of-place {func.__qualname__}>", mode="exec")
    namespace: dict = {}
    exec(code, func.__globals__, namespace)  # noqa: S102 - host source, transformed above
    new = namespace[fdef.name]
    new.__defaults__ = func.__defaults__
    new.__kwdefaults__ = func.__kwdefaults__
    return new


def add_out_of_place_patches(patcher, root_path: str, class_names: tuple, methods: tuple) -> int:
    """Object-patch the first of ``methods`` that the class defines, on every submodule under ``root_path``
    whose class is in ``class_names``, with its out-of-place version (only where the host's source has
    in-place adds). Returns the count."""
    root = _get(patcher.model, root_path) if root_path else patcher.model
    count = 0
    for name, mod in root.named_modules():
        if type(mod).__name__ not in class_names:
            continue
        method = next((m for m in methods if m in vars(type(mod))), None)
        fn = out_of_place_version(getattr(type(mod), method)) if method else None
        if fn is None:
            continue
        path = ".".join(p for p in (root_path, name, method) if p)
        patcher.add_object_patch(path, types.MethodType(fn, mod))
        count += 1
    return count


def make_module_differentiable(module: torch.nn.Module, class_names: tuple = ("CLIPLayer",)) -> int:
    """The same rewrite set directly on a module the caller owns (a network it trains, not a host model shared
    through a patcher): every submodule of ``class_names`` gets its out-of-place ``forward``. Returns the count."""
    count = 0
    for mod in module.modules():
        if type(mod).__name__ in class_names and "forward" in vars(type(mod)):
            fn = out_of_place_version(type(mod).forward)
            if fn is not None:
                mod.forward = types.MethodType(fn, mod)
                count += 1
    return count


def make_text_encoder_differentiable(clip_patcher) -> int:
    """Out-of-place ``CLIPLayer.forward`` on every layer of a CLIP patcher (a clone). Returns the count."""
    return add_out_of_place_patches(clip_patcher, "", ("CLIPLayer",), ("forward",))


# ---------------------------------------------------------------------------------------------------------
# Gradient checkpointing of the UNet's blocks.

def _checkpointed(base):
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return base(*args, **kwargs)
        # Attention blocks mutate transformer_options (block ids, transformer_index). The recomputation in
        # backward must see the values of the first call, and the caller must see the mutations: run on copies.
        pos = {i: dict(a) for i, a in enumerate(args) if isinstance(a, dict)}
        kw = {k: dict(v) for k, v in kwargs.items() if isinstance(v, dict)}
        final: dict = {}

        def run(*a):
            a = list(a)
            for i, d in pos.items():
                a[i] = dict(d)
            k2 = {**kwargs, **{k: dict(d) for k, d in kw.items()}}
            out = base(*a, **k2)
            final.update({("a", i): a[i] for i in pos})
            final.update({("k", k): k2[k] for k in kw})
            return out

        out = torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
        for i in pos:
            args[i].update(final[("a", i)])
        for k in kw:
            kwargs[k].update(final[("k", k)])
        return out
    return forward


_CHECKPOINT_CLASSES = ("ResBlock", "SpatialTransformer")


def add_gradient_checkpointing(patcher) -> int:
    """Recompute every UNet ResBlock and SpatialTransformer in backward instead of storing activations.

    ComfyUI's UNet iterates over each block's layers itself (``forward_timestep_embed``), so the layers,
    not the sequential containers, are wrapped.
    """
    count = 0
    for name, mod in patcher.model.diffusion_model.named_modules():
        if type(mod).__name__ in _CHECKPOINT_CLASSES:
            base = types.MethodType(type(mod).forward, mod)
            patcher.add_object_patch(f"diffusion_model.{name}.forward", _checkpointed(base))
            count += 1
    return count


@contextlib.contextmanager
def checkpointed_blocks(module: torch.nn.Module, enabled: bool = True):
    """Gradient checkpointing of every ResBlock and SpatialTransformer of a module the caller owns and trains (not
    a host model shared through a patcher: PromptNet's encoder half) while the context is open; the instance
    ``forward`` overrides are removed on exit, so the module leaves as it came. Yields the count."""
    patched = []
    if enabled:
        for mod in module.modules():
            if type(mod).__name__ in _CHECKPOINT_CLASSES and "forward" not in vars(mod):
                mod.forward = _checkpointed(types.MethodType(type(mod).forward, mod))
                patched.append(mod)
    try:
        yield len(patched)
    finally:
        for mod in patched:
            vars(mod).pop("forward", None)


# ---------------------------------------------------------------------------------------------------------
# Fused attention for training on CPU.

def _fused_attention_patch(q, k, v, extra_options):
    """``attn1``/``attn2`` replace patch: softmax(q kᵀ/√d) v with ``F.scaled_dot_product_attention``.

    Only float32 CPU tensors take the fused path; anything else goes to the host's own attention, so the patch
    never changes what a non-CPU or reduced-precision run computes.
    """
    from ..kernels.attention import attention
    heads = extra_options["n_heads"]
    if q.device.type == "cpu" and q.dtype == torch.float32:
        return attention(q, k, v, heads)
    import comfy.ldm.modules.attention as host_attention
    return host_attention.optimized_attention(q, k, v, heads)


def transformer_blocks(unet) -> list[tuple[str, int]]:
    """The ``(block, number)`` keys - as attention replace patches are keyed - of the UNet blocks that hold a
    ``SpatialTransformer`` (SpatialVideoTransformer, whose temporal blocks differ, is deliberately not matched)."""
    groups = [("input", i, b) for i, b in enumerate(getattr(unet, "input_blocks", []))]
    if getattr(unet, "middle_block", None) is not None:
        groups.append(("middle", 0, unet.middle_block))
    groups += [("output", i, b) for i, b in enumerate(getattr(unet, "output_blocks", []))]
    return [(name, number) for name, number, block in groups
            if any(type(m).__name__ == "SpatialTransformer" for m in block.modules())]


def with_fused_attention(transformer_options: dict, unet, x: torch.Tensor) -> dict:
    """A copy of per-call ``transformer_options`` whose attention uses fused SDPA in every transformer block that
    has no replace patch of its own - :func:`use_fused_attention` for a call the pack makes on a MODEL it does not
    own (e.g. inside a stock sampler). Same CPU/float32 rule; otherwise the options come back unchanged."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or "optimized_attention_override" in transformer_options:
        return transformer_options
    out = dict(transformer_options)
    replace = {k: dict(v) for k, v in out.get("patches_replace", {}).items()}
    for attn in ("attn1", "attn2"):
        existing = replace.setdefault(attn, {})
        for name, number in transformer_blocks(unet):
            if not any(key[:2] == (name, number) for key in existing):
                existing[(name, number)] = _fused_attention_patch
    out["patches_replace"] = replace
    return out


def use_fused_attention(patcher) -> int:
    """Make the UNet's self- and cross-attention use PyTorch's fused SDPA while ``patcher`` trains on the CPU.

    On CPU neither host enables PyTorch attention; it picks sub-quadratic attention, whose backward keeps every
    attention-probability matrix (``heads x N x N`` floats per layer: 32 MiB per self-attention at a 32x32 latent)
    and which runs more, smaller kernels. SDPA's CPU kernel (flash style) keeps only the output and log-sum-exp,
    and computes the same softmax(q kᵀ/√d) v. Applied as ``attn1``/``attn2`` replace patches keyed by
    ``(block, number)`` - the host calls them with the projected q, k, v, so LoRA bypass patches on
    ``to_q``/``to_k``/``to_v``/``to_out`` still apply - and never where the model already has a replace patch of
    its own (another node's) for that block; patches added later by anyone take precedence. Does nothing unless
    the patcher's load device is the CPU and the UNet computes in float32, nor when the model carries a (2025)
    ``optimized_attention_override``.
    Returns the number of patches added.
    """
    if torch.device(patcher.load_device).type != "cpu":
        return 0
    base = patcher.model
    compute_dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    if compute_dtype != torch.float32:
        return 0
    transformer_options = patcher.model_options.get("transformer_options", {})
    if "optimized_attention_override" in transformer_options:
        return 0
    replace = transformer_options.get("patches_replace", {})
    count = 0
    for name, number in transformer_blocks(base.diffusion_model):
        for attn, setter in (("attn1", patcher.set_model_attn1_replace), ("attn2", patcher.set_model_attn2_replace)):
            existing = replace.get(attn, {})
            if any(key[:2] == (name, number) for key in existing):
                continue
            # Keyed by (block, number) without transformer_index: a later, more specific patch of another node
            # (block, number, index) takes precedence in the host's lookup, and a later (block, number) one
            # replaces this one - a patch added after ours always wins.
            setter(_fused_attention_patch, name, number)
            count += 1
    return count


def _fused_text_attention(host_attention):
    """Wrap the attention function a host CLIP encoder passes to its layers: float32 CPU calls without extra
    options go to fused SDPA (same softmax(q kᵀ/√d + mask) v), everything else to the host's function."""
    from ..kernels.attention import attention

    def fn(q, k, v, heads, mask=None, *args, **kwargs):
        if not args and not kwargs and q.device.type == "cpu" and q.dtype == torch.float32:
            return attention(q, k, v, heads, mask=mask)
        return host_attention(q, k, v, heads, mask, *args, **kwargs)
    return fn


def use_fused_text_attention(clip_patcher) -> int:
    """Make every ``CLIPAttention`` of a text encoder being trained on the CPU use fused SDPA.

    Both hosts' CLIP encoders pick ``attention_basic`` on CPU (``optimized_attention_for_device(small_input=True)``),
    which saves head-split copies of q, k, v and the softmax probabilities for backward; SDPA saves neither.
    ``CLIPAttention.forward(x, mask, optimized_attention)`` receives the function from its encoder; the patch
    wraps it (see :func:`_fused_text_attention`). Returns the number of patched modules (0 off the CPU).
    """
    if torch.device(clip_patcher.load_device).type != "cpu":
        return 0
    count = 0
    for name, mod in clip_patcher.model.named_modules():
        if type(mod).__name__ != "CLIPAttention":
            continue
        if "optimized_attention" not in inspect.signature(type(mod).forward).parameters:
            continue

        def fn(base, x, mask=None, optimized_attention=None, *args, **kwargs):
            if optimized_attention is not None:
                optimized_attention = _fused_text_attention(optimized_attention)
            return base(x, mask, optimized_attention, *args, **kwargs)

        override_forward(clip_patcher, name, fn)
        count += 1
    return count
