"""Object patches on a ModelPatcher: how the pack changes a model's graph without mutating it.

Everything here goes through ``ModelPatcher.add_object_patch`` on a *clone*, so the patch exists only while
that clone is loaded and is removed by ComfyUI's own unpatching (identical in the 2024 and current hosts).

* :func:`override_forward` replaces one submodule's ``forward`` with a function of ``(base_forward, *args)``.
  LoRA bypass deltas and placeholder-token embeddings are both built on it.
* :func:`add_out_of_place_patches` makes host blocks that use in-place residual adds (``x += n``) safe for
  autograd (2024 ``BasicTransformerBlock._forward``; ``CLIPLayer.forward`` in both hosts).
* :func:`add_gradient_checkpointing` wraps the UNet's top-level blocks in ``torch.utils.checkpoint``.
"""
from __future__ import annotations

import ast
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


def make_unet_differentiable(patcher) -> int:
    return add_out_of_place_patches(patcher, "diffusion_model", ("BasicTransformerBlock",), ("_forward", "forward"))


def make_text_encoder_differentiable(clip_patcher) -> int:
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
