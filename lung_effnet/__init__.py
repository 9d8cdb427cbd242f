"""lung-effnet: CT lung-cancer classification (benign / malignant / normal) on MONAI EfficientNet.

The package follows the data, one subpackage per stage:

    source --ingest--> manifest.csv --preprocess--> cache --training--> folds, fold models,
    out-of-fold predictions --models--> model/ --scoring--> predictions.csv --explain--> report.html

``io`` (reading and writing CT) sits below every stage, ``synthetic`` makes the phantom archives the
demo and the tests use, ``config``, ``tracking`` (MLflow) and ``errors`` are shared. The names in
``__all__`` are the public API; they are imported on first use, so ``import lung_effnet`` stays cheap
(decode workers import one module, not torch and MONAI).
"""

from importlib import import_module

from lung_effnet.classes import CLASSES
from lung_effnet.errors import ConfigError, InputError, LungEffNetError, ServiceError
from lung_effnet.version import __version__

_HOME = {
    "load_config": "lung_effnet.config",
    "Config": "lung_effnet.config",
    "ingest": "lung_effnet.ingest.sources",
    "run_cv": "lung_effnet.training.cv",
    "load_model": "lung_effnet.models.predictor",
    "Predictor": "lung_effnet.models.predictor",
    "export_bundle": "lung_effnet.models.bundle",
    "score_archive": "lung_effnet.scoring.runner",
    "load_run": "lung_effnet.explain.trained_run",
    "build_oof_report": "lung_effnet.explain.oof_report",
    "grad_cam": "lung_effnet.explain.gradcam",
    "Case": "lung_effnet.explain.html",
    "write_case_report": "lung_effnet.explain.html",
    "write_synthetic_dataset": "lung_effnet.synthetic.dataset",
    "run_demo": "lung_effnet.demo",
}

__all__ = ["CLASSES", "__version__", "LungEffNetError", "InputError", "ConfigError", "ServiceError", *_HOME]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
