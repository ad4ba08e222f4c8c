"""Re-export for nodes/training.py, which imports ``decode_previews`` from here until it imports it from
``core.tuning`` (the subject photos moved to ``methods.subject_photos``). Remove once no node imports it."""
from ..core.tuning import decode_previews  # noqa: F401
from .subject_photos import SubjectPhotos, encode_subject  # noqa: F401
