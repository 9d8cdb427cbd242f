"""lung-effnet: CT lung-cancer classification (benign / malignant / normal) on MONAI EfficientNet.

The package is organised by stage (see README.md): ``lung_effnet.data`` reads CT (DICOM, NIfTI,
2D slices), builds manifests and makes synthetic phantoms; later stages train, score and explain.
"""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")
"""The three classes, in the order of every probability column and model output."""
