"""The ``python_function`` face of a fold ensemble logged to MLflow (``tracking.log_model_dir``), for
MLflow's own tools: ``mlflow.pyfunc.load_model(uri)`` and ``mlflow models serve`` import this module from
the installed package and call ``_load_pyfunc`` with the logged model folder (``fold_<k>.pt``,
``config.yaml``, ``model.json``). The network is rebuilt from code and the state dicts are read with
``weights_only=True``: nothing logged is unpickled. lung-effnet itself loads a logged model with
``load_model(uri)``, which does not go through MLflow's loader.
"""

from __future__ import annotations

import numpy as np
import torch

from lung_effnet.models.predictor import Predictor, load_model_dir


class EnsemblePyfunc:
    """``predict``: ``(B, C, S, S)`` float32 in [0, 1] (preprocessed, as ``Predictor.preprocess`` makes
    them) -> ``(B, 3)`` float32 class probabilities (benign, malignant, normal)."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def predict(self, model_input, params: dict | None = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        return self.predictor.predict_proba(x).astype(np.float32)


def _load_pyfunc(data_path: str) -> EnsemblePyfunc:  # the name MLflow's pyfunc loader calls
    return EnsemblePyfunc(load_model_dir(data_path))
