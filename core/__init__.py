"""Shared mechanisms used by every method: host compatibility, graph patches, tuning, deltas, artefacts."""
