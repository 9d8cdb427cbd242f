"""lung-effnet: CT lung-cancer classification (benign / malignant / normal) on MONAI EfficientNet.

The package is organised by stage (see README.md): ``lung_effnet.data`` reads CT (DICOM, NIfTI,
2D slices), builds manifests and makes synthetic phantoms; later stages train, score and explain.
"""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")
"""The three classes, in the order of every probability column and model output."""


def load_model(path_or_uri, device: str = "cpu"):
    """Load a trained fold ensemble as a ``Predictor`` from a ``train`` model folder (or its output
    folder) or an MLflow model URI (``models:/name@alias``, ``runs:/<id>/model``).

    The predictor has ``.model`` (an ``nn.Module``), ``.preprocess(paths or arrays)`` giving the
    ``(B, C, H, W)`` tensor the model sees, and ``.predict_proba(...)`` giving ``(B, 3)``.
    """
    from .predictor import load_model as _load

    return _load(path_or_uri, device)
