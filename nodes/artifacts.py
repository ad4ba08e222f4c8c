"""Loader nodes generated from an artefact kind (core/artifacts.ArtifactKind): one definition of how a pack file is
listed, validated, change-detected and loaded, for every kind (HiFi subjects today; PromptNet, hypernetworks and
encoders as their methods land)."""
from __future__ import annotations

from typing import Callable

from comfy_api.v0_0_2 import io

from ..core.artifacts import ArtifactKind
from . import sockets as S


def loader_node(kind: ArtifactKind, *, node_id: str, display_name: str, category: str, description: str,
                output, load: Callable, input_name: str, override_name: str | None = None,
                search_aliases: list[str] | None = None, class_name: str | None = None) -> type:
    """A V3 node class ``<input_name>`` (list of the kind's folder) → ``output``.

    ``load(name)`` turns a file name into the output object (and refuses a wrong file; the kind's ``load`` does).
    ``override_name`` adds an optional STRING input that, when connected, replaces the list (a file written earlier
    in the same run, e.g. by a training node's file-name output). The list check is the schema's
    ``validate_inputs`` (names that leave the folder are refused; existence is checked when the node runs, so a
    file written earlier in the same run validates); ``fingerprint_inputs`` changes when the file changes."""
    folder_hint = "/".join(("models",) + kind.subdir) if kind.subdir else kind.folder

    def define_schema(cls):
        inputs = [io.Combo.Input(input_name, options=kind.filenames(), tooltip=f"A file in {folder_hint}.")]
        if override_name:
            inputs.append(io.String.Input(
                override_name, optional=True, force_input=True,
                tooltip=f"Overrides the list with a file name from another node, e.g. {kind.made_by}'s file name "
                        f"output (train, save and reload in one run)."))
        return S.schema(node_id=node_id, display_name=display_name, category=category, description=description,
                        search_aliases=search_aliases, inputs=inputs, outputs=[output])

    def chosen(values: dict) -> str:
        return (values.get(override_name) if override_name else None) or values[input_name]

    def validate_inputs(cls, **values):
        return kind.check_name(values[input_name])

    def fingerprint_inputs(cls, **values):
        return kind.fingerprint(chosen(values))

    def execute(cls, **values) -> io.NodeOutput:
        return io.NodeOutput(load(chosen(values)))

    return type(class_name or node_id, (io.ComfyNode,), {
        "__doc__": f"{display_name}: loads a {kind.title} file ({kind.kind}) from {folder_hint}.",
        "__module__": __name__,
        "define_schema": classmethod(define_schema),
        "validate_inputs": classmethod(validate_inputs),
        "fingerprint_inputs": classmethod(fingerprint_inputs),
        "execute": classmethod(execute),
    })
