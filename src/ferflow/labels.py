"""The ABAW label space: 8 expression classes in a fixed order, valence and arousal in [-1, 1].

The order is the ABAW/Aff-Wild2 one and never comes from folder names.
"""

EXPRESSIONS: tuple[str, ...] = (
    "Neutral",
    "Anger",
    "Disgust",
    "Fear",
    "Happiness",
    "Sadness",
    "Surprise",
    "Other",
)
NUM_EXPRESSIONS = len(EXPRESSIONS)

EXPR_UNANNOTATED = -1  # Aff-Wild2 EXPR files: frame not annotated
VA_INVALID_BELOW = -1.0  # Aff-Wild2 VA files: -5 marks an invalid frame; anything < -1 is invalid

EXPR_HEADER = ",".join(EXPRESSIONS)
VA_HEADER = "valence,arousal"


def expression_index(name: str) -> int:
    """Index of an ABAW class given by name (case-insensitive); ValueError names the valid ones."""
    for i, cls in enumerate(EXPRESSIONS):
        if cls.lower() == str(name).lower():
            return i
    raise ValueError(f"unknown expression class {name!r}; valid classes: {', '.join(EXPRESSIONS)}")
