"""ComfyUI Personalize: subject-driven personalisation of diffusion models as graph nodes.

ComfyUI imports this file from ``custom_nodes/``. It only collects the node classes; no model work
or downloads happen at import time.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"  # node help pages (web/docs/<NodeId>.md), served at /extensions/<folder>/

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
