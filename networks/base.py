"""The base of every pack network: its constructor arguments are its file's widths, its weights the file's tensors.

A subclass sets ``kind`` (an :class:`~comfyui_personalize.core.artifacts.ArtifactKind`) and takes its sizes as
keyword arguments; :meth:`Network.save` writes them as the file's ``widths`` with the base-model family, and
:meth:`Network.load` rebuilds the network from them, so a file always carries what is needed to build its network
and a file of another kind, family or shape is refused before any weight is used.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from ..core.artifacts import ArtifactKind
from ..core.host import PersonalizeError


class Network(torch.nn.Module):
    """A pack network: ``family`` (the base-model family it belongs to, or None when it is family-free) and the
    keyword arguments it was built with (``config``: ints, floats, strings, lists: JSON-able)."""
    kind: ClassVar[ArtifactKind]

    def __init__(self, *, family: str | None = None, **config):
        super().__init__()
        self.family = family
        self.config = dict(config)

    def save(self, path, *, overwrite: bool = False, dtype: torch.dtype | None = torch.float16,
             metadata: dict | None = None) -> Path:
        """Write the weights (floating tensors cast to ``dtype``: fp16 ships small; None keeps them) and the
        config as the file's widths."""
        tensors = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).cpu()
                   for k, v in self.state_dict().items()}
        meta = {"network": type(self).__name__, **(metadata or {})}
        return self.kind.save(tensors, path, family=self.family, widths=self.config, metadata=meta,
                              overwrite=overwrite)

    @classmethod
    def load(cls, name_or_path, family: str | None = None, dtype: torch.dtype = torch.float32) -> "Network":
        """Rebuild the network a file describes and load its weights (as ``dtype``); refuses a file of another
        kind or family (``kind.load``) and one whose tensors do not fit the network its widths build."""
        art = cls.kind.load(name_or_path, family)
        try:
            net = cls(family=art.family, **art.widths)
        except TypeError as e:
            raise PersonalizeError(f"{art.path.name}: its widths {art.widths} do not build a {cls.__name__} "
                                   f"({e}). It was written by another version of the pack; re-download it or "
                                   f"write it again with {cls.kind.made_by}.") from e
        expected = net.state_dict()
        missing = sorted(set(expected) - set(art.tensors))
        extra = sorted(set(art.tensors) - set(expected))
        wrong = sorted(k for k in set(expected) & set(art.tensors) if expected[k].shape != art.tensors[k].shape)
        if missing or extra or wrong:
            detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                               for what, keys in (("missing", missing), ("unexpected", extra), ("shape", wrong))
                               if keys)
            raise PersonalizeError(f"{art.path.name} does not fit the {cls.__name__} its widths describe ({detail}). "
                                   f"Re-download it, or write it again with {cls.kind.made_by}.")
        net.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in art.tensors.items()})
        net.path = art.path
        return net
