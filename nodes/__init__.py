"""Node classes. They only translate sockets; the maths lives in ``methods/`` and ``core/``.

Node ids (the keys below) and input names are a public API: add and deprecate, never rename.
"""
from . import hifi, images, inversion, mini, training, utility

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (hifi, images, inversion, mini, training, utility):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
