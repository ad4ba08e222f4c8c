"""The benchmark's rows, one file per method (miniworld/registry.py): each module registers its rows with
``@registry.register`` and turns a held-out subject's references into what to generate with, through the pack's
nodes (``bench.call``) exactly as a user's workflow would. Modules here import no host code at import time."""
