"""Node classes (ComfyUI's V3 schema, ``comfy_api.v0_0_2``). They only translate sockets; the maths lives in
``methods/`` and ``core/``.

Node ids (``io.Schema.node_id``) and input names are a public API: add and deprecate, never rename
(tests/test_node_api.py holds them to the definitions of the V1 pack, tests/data/node_api_v1.json).
Imported by the pack's ``comfy_entrypoint`` when ComfyUI loads the pack, never at the pack's import.
"""
from . import hifi, images, inversion, mini, profusion, profusion_tune, training, utility

NODES = [*training.NODES, *hifi.NODES, *inversion.NODES, *images.NODES, *utility.NODES, *mini.NODES,
         *profusion.NODES, *profusion_tune.NODES]


def register_folders() -> None:
    """The pack's model folders in ``folder_paths`` (dictionary entries only, no file system work)."""
    from ..core import artifacts
    for kind in artifacts.registered_kinds():  # declared by the method modules the node modules import
        kind.register()
    mini.register_folder()
