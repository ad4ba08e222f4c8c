"""ComfyUI Personalize: subject-driven personalisation of diffusion models as graph nodes.

ComfyUI imports this file from ``custom_nodes/``. It only collects the node classes; no model work
or downloads happen at import time.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
