"""Trainable networks the pack pre-trains on many subjects and ships (PromptNet, hypernetworks, image encoders,
adapters): plain ``torch.nn.Module`` subclasses of :class:`networks.base.Network`, saved and loaded as artefact files
(core/artifacts.py). Each method's network lives in a module of its own here; its maths stays in ``methods/``."""
