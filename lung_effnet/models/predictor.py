"""The trained fold ensemble as one object that scoring, reports and notebooks load.

A model directory (written by ``train`` to ``<out>/model``) holds:

- ``fold_<k>.pt``: each fold model's state dict;
- ``config.yaml``: the resolved training config (model and preprocessing settings);
- ``model.json``: classes, input shape, fold count, the package version that wrote it.

``load_model`` reads such a directory, or an MLflow model URI (``models:/name@alias``,
``runs:/<id>/model``, ``models:/<model_id>``) of the ensemble logged by ``train``: the same directory,
logged as it is (``tracking.log_model_dir``). Nothing is unpickled: the network is built from code and
the fold files are read as state dicts (``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np
import torch
import yaml
from torch import nn

from lung_effnet.classes import CLASSES
from lung_effnet.config import Config, DataConfig, from_dict
from lung_effnet.errors import InputError, LungEffNetError, MissingInputError
from lung_effnet.models.factory import create_model
from lung_effnet.models.lesion_finder import attach_finder
from lung_effnet.models.training_data import TrainingOverlap
from lung_effnet.models.weight_files import load_failure
from lung_effnet.version import __version__


class FoldEnsemble(nn.Module):
    """Mean of the fold models' class probabilities.

    Input ``(B, C, S, S)`` float in [0, 1]; output ``(B, 3)`` probabilities (not logits), in the
    order of ``CLASSES``.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)


def build_member(cfg: Config) -> nn.Module:
    """A fold model as configured (random weights; pretrained ones only at training start).

    BatchNorm momentum: MONAI builds EfficientNet with TensorFlow's 0.99 decay (momentum 0.01),
    made for ImageNet's hundreds of thousands of steps; a fold of a few hundred steps then
    evaluates with running statistics still near their initial values. ``model.bn_momentum``
    (default 0.1, PyTorch's) lets them follow the data. A zero-initialised head starts every
    class at probability 1/3, which keeps the first steps of a from-scratch run stable.
    ``model.pooling: max`` replaces the global average pool by a global max pool: a slice is
    "lesion" if any place in it looks like one, where averaging dilutes a 3-pixel nodule into
    the whole slice (multiple-instance view; on small from-scratch data it is what learns).
    ``model.lesion_finder`` set: the member reads the frozen finder's lesion map as one more channel
    (``models.lesion_finder``); its weights come from that file at training start (``load_finder``),
    and from the fold's own state dict afterwards.
    """
    channels = 2 * cfg.data.context_slices + 1
    finder = cfg.model.lesion_finder is not None
    model = create_model(cfg.model.name, in_channels=channels + finder, num_classes=len(CLASSES),
                         dropout=cfg.model.dropout, drop_connect=cfg.model.drop_connect)
    if finder:
        attach_finder(model, channels)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = cfg.model.bn_momentum
    if cfg.model.pooling == "max":
        model._avg_pooling = nn.AdaptiveMaxPool2d(1)  # MONAI's attribute name; the module is a max pool
    if cfg.model.zero_init_head:
        head = cast(nn.Linear, model._fc)  # nn.Module.__getattr__ is typed Tensor | Module
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return model


def save_model_dir(model_dir: Path, cfg: Config, fold_states: list[dict]) -> Path:
    """Write the model directory (see module docstring)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for k, state in enumerate(fold_states):
        torch.save(state, model_dir / f"fold_{k}.pt")
    (model_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    channels = 2 * cfg.data.context_slices + 1
    (model_dir / "model.json").write_text(json.dumps({
        "classes": list(CLASSES), "n_folds": len(fold_states), "model": cfg.model.name,
        "input_shape": [channels, cfg.data.image_size, cfg.data.image_size], "input_range": [0.0, 1.0],
        "lesion_finder": cfg.model.lesion_finder,
        "output": "probabilities (mean of fold softmaxes)", "lung_effnet_version": __version__,
    }, indent=2))
    return model_dir


def preprocess_input(item, data: DataConfig) -> torch.Tensor:
    """One input as the model sees it: ``(C, S, S)`` float32 in [0, 1] (C = ``2 * data.context_slices + 1``,
    S = ``data.image_size``), by the training preprocessing (``preprocess.transforms.preprocess_sample``).

    ``item``: a file path (a 2D image or a DICOM slice; with 2.5D models the plane is repeated as its own
    neighbours), or an array: ``(H, W)`` / ``(C, H, W)`` in HU, or uint8 grey levels (already windowed).
    ``Predictor.preprocess`` and the MONAI bundle's transform (``models.bundle``) both go through here.
    """
    from lung_effnet.io.planes import GRAY, HU, read_sample_plane
    from lung_effnet.preprocess.transforms import preprocess_sample

    if isinstance(item, (str, Path)):
        plane, intensity = read_sample_plane(item)
    else:
        plane = np.asarray(item)
        intensity = GRAY if plane.dtype == np.uint8 else HU
    plane = plane.astype(np.float32)
    channels = 2 * data.context_slices + 1
    planes = plane if plane.ndim == 3 else np.repeat(plane[None], channels, axis=0)
    image, _ = preprocess_sample(planes, intensity, data)
    return image


class Predictor:
    """A fold ensemble with the preprocessing it was trained with.

    Attributes:
        model: the ``FoldEnsemble`` (``nn.Module``), in eval mode.
        config: the training ``Config`` (``config.data`` is the preprocessing).
        training_overlap: what the model was trained on (``models.training_data``), when its folder says.
    """

    def __init__(self, model: nn.Module, config: Config, training_overlap: TrainingOverlap | None = None):
        self.model = model.eval()
        self.config = config
        self.training_overlap = training_overlap

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, inputs) -> torch.Tensor:
        """Inputs as the model sees them: ``(B, C, S, S)`` float32 in [0, 1].

        Each input is a file path (a 2D image or a DICOM slice; with 2.5D models the plane is
        repeated as its own neighbours), or an array: ``(H, W)`` / ``(C, H, W)`` in HU, or uint8
        grey levels (already windowed images).
        """
        return torch.stack([preprocess_input(item, self.config.data) for item in inputs])

    @torch.no_grad()
    def predict_proba(self, inputs, batch_size: int = 64) -> np.ndarray:
        """``(B, 3)`` probabilities for paths / arrays, or for an already preprocessed tensor."""
        x = inputs if isinstance(inputs, torch.Tensor) else self.preprocess(inputs)
        probs = []
        for start in range(0, len(x), batch_size):
            probs.append(self.model(x[start:start + batch_size].to(self.device).float()).cpu())
        return torch.cat(probs).double().numpy() if probs else np.zeros((0, len(CLASSES)))


def load_model_dir(model_dir: str | Path, device: str = "cpu") -> Predictor:
    """The ensemble of a model directory (see module docstring): every fold ``model.json`` declares
    (``fold_0.pt`` .. ``fold_<n-1>.pt``), each rebuilt from ``config.yaml`` and loaded as a state dict
    (``weights_only=True``: a file that holds anything else is refused, never unpickled).

    Raises:
        MissingInputError: ``config.yaml``, ``model.json`` or a fold file is missing.
        InputError: a damaged ``config.yaml`` or ``model.json``; a fold file that is not a state dict of
            this model or holds NaN / infinite weights; other fold files than declared.
    """
    model_dir = Path(model_dir)
    for name in ("config.yaml", "model.json"):
        if not (model_dir / name).is_file():
            raise MissingInputError(f"{model_dir}: no {name} (not a model folder written by lung-effnet train)")
    cfg = _read_config(model_dir / "config.yaml")
    try:
        n_folds = json.loads((model_dir / "model.json").read_text(encoding="utf-8")).get("n_folds")
    except (ValueError, AttributeError):  # not JSON (UnicodeDecodeError is a ValueError), or not an object
        n_folds = None
    except OSError as exc:
        raise InputError(f"{model_dir / 'model.json'}: not readable ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(n_folds, int) or isinstance(n_folds, bool) or n_folds < 1:
        raise InputError(f"{model_dir / 'model.json'}: no fold count (n_folds) in it")
    expected = [model_dir / f"fold_{k}.pt" for k in range(n_folds)]
    missing = [p.name for p in expected if not p.is_file()]
    if missing:
        raise MissingInputError(f"{model_dir}: {', '.join(missing)} missing (model.json declares {n_folds} folds)")
    extra = sorted(p.name for p in model_dir.glob("fold_*.pt") if p not in expected)
    if extra:
        raise InputError(f"{model_dir}: {', '.join(extra)} beyond the {n_folds} folds model.json declares")
    members = []
    for path in expected:
        member = build_member(cfg)
        try:
            member.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # not a state dict (refused unread), a damaged file, another architecture
            raise InputError(f"{path}: not a fold state dict of this model ({load_failure(exc)})") from None
        if not all(torch.isfinite(t).all() for t in member.state_dict().values() if t.is_floating_point()):
            raise InputError(f"{path}: {path.name} holds NaN or infinite weights (a diverged or damaged fold): "
                             "retrain it or use another model")
        members.append(member)
    return Predictor(FoldEnsemble(members).to(device), cfg, TrainingOverlap.of_model_dir(model_dir))


def _read_config(path: Path) -> Config:
    """The training config of a model folder; a damaged file is one ``InputError`` naming it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a readable YAML config ({reason})") from None
    except OSError as exc:
        raise InputError(f"{path}: not readable ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a config written by lung-effnet train (a mapping of settings expected, "
                         f"found {type(data).__name__})")
    try:
        return from_dict(data)
    except LungEffNetError as exc:  # an unknown key or a value out of range: say which file holds it
        raise InputError(f"{path}: {exc}") from None
    except Exception as exc:  # a mapping of the wrong shape (a section that is a list...)
        raise InputError(f"{path}: not a config written by lung-effnet train ({type(exc).__name__}: {exc})"[:300]) from None


def is_model_uri(text: str) -> bool:
    """Whether ``text`` names an MLflow model (``models:/...``, ``runs:/...``, a store URL), not a folder."""
    return "://" in text or text.startswith(("models:", "runs:"))


def model_folder(path: str | Path) -> Path:
    """The model folder that ``path`` names: ``path`` itself, or ``path/model`` when ``path`` is a
    ``train`` output folder. Its parent is then the train run's folder (``cv_summary.json``,
    ``saliency/``), when the model has not been moved away from it."""
    path = Path(path)
    return path / "model" if not (path / "config.yaml").exists() and (path / "model" / "config.yaml").exists() else path


def load_model(path_or_uri: str | Path, device: str = "cpu") -> Predictor:
    """Load a trained fold ensemble as a ``Predictor`` from a ``train`` model folder (or its output
    folder) or an MLflow model URI (``models:/name@alias``, ``runs:/<id>/model``).

    The predictor has ``.model`` (an ``nn.Module``), ``.preprocess(paths or arrays)`` giving the
    ``(B, C, H, W)`` tensor the model sees, and ``.predict_proba(...)`` giving ``(B, 3)``.
    """
    text = str(path_or_uri)
    if (folder := model_folder(text)).is_dir() and (folder / "config.yaml").exists():
        return load_model_dir(folder, device)
    if not is_model_uri(text):
        raise MissingInputError(f"not a model directory or an MLflow model URI: {text}")
    from lung_effnet.tracking import load_logged_model

    return load_logged_model(text, lambda folder: load_model_dir(folder, device))

