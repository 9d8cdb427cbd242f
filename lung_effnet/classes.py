"""The label contract: the three classes, in the order of every probability column and model output."""

CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")
"""Index 0, 1, 2 of every ``(N, 3)`` probability array, ``p_<class>`` column and model logit."""
