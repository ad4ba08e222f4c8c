"""Mini world: seeded procedural 64×64 images of simple subjects in textured scenes, with captions and
base / held-out subject splits for training and personalising a tiny text-to-image model."""
from .world import (
    COLOUR_RGB,
    COLOURS,
    IMAGE_SIZE,
    PATTERNS,
    SCALE_RANGE,
    SCENE_PHRASES,
    SCENES,
    SHAPES,
    HeldoutSubject,
    Pose,
    Sample,
    SampleBatch,
    Subject,
    all_subjects,
    base_subjects,
    caption,
    class_prompt,
    heldout_set,
    heldout_subjects,
    pattern_colours,
    render,
    render_batch,
    sample,
    training_batch,
)

__all__ = [
    "COLOUR_RGB", "COLOURS", "IMAGE_SIZE", "PATTERNS", "SCALE_RANGE", "SCENE_PHRASES", "SCENES", "SHAPES",
    "HeldoutSubject", "Pose", "Sample", "SampleBatch", "Subject",
    "all_subjects", "base_subjects", "caption", "class_prompt", "heldout_set", "heldout_subjects",
    "pattern_colours", "render", "render_batch", "sample", "training_batch",
]
