"""ComfyUI Personalize: subject-driven personalisation of diffusion models as graph nodes.

ComfyUI imports this file from ``custom_nodes/`` and calls :func:`comfy_entrypoint` (the V3 node API,
``comfy_api.v0_0_2``). Importing it does nothing else: the node modules, ``comfy_api`` and the model folders are
only touched when ComfyUI asks for the extension; no model work or downloads happen at load time.

There is deliberately no ``NODE_CLASS_MAPPINGS`` here: ComfyUI's loader prefers it over ``comfy_entrypoint``, and
the nodes' display names come from their schemas.
"""

WEB_DIRECTORY = "./web"  # node help pages (web/docs/<NodeId>.md), served at /extensions/<folder>/docs/


async def comfy_entrypoint():
    from comfy_api.v0_0_2 import ComfyExtension

    from . import nodes

    nodes.register_folders()

    class PersonalizeExtension(ComfyExtension):
        async def get_node_list(self):
            return list(nodes.NODES)

    return PersonalizeExtension()
