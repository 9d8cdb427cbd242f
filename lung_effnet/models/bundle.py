"""Export a trained fold ensemble as a MONAI bundle, and the pieces the bundle's config runs.

``export_bundle(model, out)`` writes::

    configs/metadata.json    versions, input / output format, intended use, training data (no patient data)
    configs/inference.json   MONAI bundle config: ``network_def`` (the ensemble), preprocessing, ``run``
    configs/logging.conf     what MONAI's workflow reads for its log format
    models/model.pt          state dict of the whole ensemble (keys ``members.<k>.*``: fold k)
    models/model.ts          the ensemble as TorchScript, when it scripts (or traces) to the same outputs
    docs/README.md           what it is, how to run it, what it writes, its limits
    LICENSE                  the project's license (Apache-2.0)

``python -m monai.bundle run --config_file configs/inference.json --bundle_root . --dataset_dir DIR``
(monai, torch, fire and this package importable; fire is what ``python -m monai.bundle`` parses its
arguments with) scores every 2D image (PNG/JPG...) and DICOM slice under DIR and writes
``<output_dir>/predictions.csv`` (``path,p_benign,p_malignant,p_normal,predicted``; path relative to DIR)
and ``<output_dir>/errors.csv`` (``path,stage,reason``: files that could not be read); ``output_dir``
defaults to ``<bundle_root>/eval``. The probabilities are those of ``load_model(model).predict_proba``
on the same files: same preprocessing (``predictor.preprocess_input``), same network, same weights.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.config import get_config_values
from monai.data import save_net_with_metadata
from monai.networks.nets.efficientnet import EfficientNet
from monai.transforms import MapTransform
from torch import nn

from lung_effnet.classes import CLASSES
from lung_effnet.config import Config, from_dict
from lung_effnet.errors import InputError, LungEffNetError, MissingInputError
from lung_effnet.io.images2d import is_image_2d
from lung_effnet.io.ledger import write_csv
from lung_effnet.models.predictor import FoldEnsemble, build_member, load_model, model_folder, preprocess_input
from lung_effnet.version import __version__

log = logging.getLogger(__name__)

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
"""The metadata schema MONAI's ``verify_metadata`` downloads (the one the MONAI model zoo uses)."""
PREDICTION_COLUMNS = ("path", *(f"p_{c}" for c in CLASSES), "predicted")
ERROR_COLUMNS = ("path", "stage", "reason")
LICENSE_FILE = Path(__file__).with_name("LICENSE-Apache-2.0.txt")
INTENDED_USE = ("Research use only. Not a medical device: not for diagnosis, screening, triage or any other "
                "clinical decision, and not validated on patient data from any hospital.")


class EnsembleNetwork(FoldEnsemble):
    """The fold ensemble as a bundle's ``network_def``: ``n_folds`` EfficientNets built from code
    (random weights; ``load_ensemble_weights`` loads ``models/model.pt``).

    Input ``(B, in_channels, S, S)`` float32 in [0, 1] (S = the preprocessing's ``image_size``);
    output ``(B, 3)`` float32 probabilities (mean of the folds' softmax), in ``CLASSES`` order.
    """

    def __init__(self, model_name: str, in_channels: int, n_folds: int, pooling: str = "avg", lesion_finder: bool = False):
        if in_channels not in (1, 3):
            raise InputError(f"in_channels must be 1 or 3 (context_slices 0 or 1), got {in_channels!r}")
        if not isinstance(n_folds, int) or n_folds < 1:
            raise InputError(f"n_folds must be a positive integer, got {n_folds!r}")
        # lesion_finder: each member holds a finder (models.lesion_finder) whose weights are in models/model.pt;
        # the config value only says that it has one (no file is read)
        cfg = from_dict({"model": {"name": model_name, "pooling": pooling,
                                   "lesion_finder": "models/model.pt" if lesion_finder else None},
                         "data": {"context_slices": (in_channels - 1) // 2}})
        super().__init__([build_member(cfg) for _ in range(n_folds)])


def load_ensemble_weights(network: nn.Module, path: str | Path) -> nn.Module:
    """``network`` with the state dict in ``path`` loaded (``weights_only=True``: nothing is unpickled),
    in eval mode; returned so that a bundle config can chain it."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    return network.eval()


def list_input_files(folder: str | Path) -> list[str]:
    """Every 2D image (by suffix) and DICOM file (``.dcm``, or the ``DICM`` preamble) under ``folder``,
    sorted; hidden files and folders are left out. NIfTI volumes are not slices: ``lung-effnet score``
    reads them.

    Raises:
        MissingInputError: no such folder, or nothing to score in it.
    """
    root = Path(folder)
    if not root.is_dir():
        raise MissingInputError(f"dataset_dir: not a folder: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and (is_image_2d(path) or _is_dicom_file(path)):
                found.append(str(path))
    if not found:
        raise MissingInputError(f"dataset_dir: no 2D images or DICOM files in {root}")
    return found


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


class LoadPreprocessSliced(MapTransform):
    """Read a file path under each key and preprocess it as in training (``predictor.preprocess_input``).

    In: ``{key: path}``. Out: ``{key: (C, S, S) float32 in [0, 1], "error": ""}``; a file that cannot be
    read gives zeros and ``"error"``: the reason (the bundle's ``run`` writes it to ``errors.csv``).

    Args:
        keys: the key(s) holding paths.
        data_config: the ``data`` section of the training config (``config.DataConfig`` fields).
    """

    def __init__(self, keys, data_config: dict[str, Any]):
        super().__init__(keys)
        self.data = from_dict({"data": dict(data_config)}).data

    def __call__(self, data):
        d = dict(data)
        channels, size = 2 * self.data.context_slices + 1, self.data.image_size
        d["error"] = ""
        for key in self.key_iterator(d):
            try:
                d[key] = preprocess_input(str(d[key]), self.data)
            except (LungEffNetError, OSError, ValueError) as exc:  # an unreadable file: one error row, the run goes on
                d[key] = torch.zeros(channels, size, size)
                d["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return d


class FolderPredictor:
    """The bundle's evaluator: runs the network over a data loader and writes the results.

    ``run()`` writes ``output_dir/predictions.csv`` (one row per file: ``path`` relative to
    ``dataset_dir``, ``p_benign,p_malignant,p_normal``, ``predicted``) and ``output_dir/errors.csv``
    (``path,stage,reason``), and returns ``{"scored", "failed", "predictions", "errors"}``.

    Args:
        network: input ``(B, C, S, S)`` float32 in [0, 1], output ``(B, 3)`` probabilities.
        dataloader: batches of ``{"image": (B, C, S, S), "path": [B], "error": [B]}``
            (``LoadPreprocessSliced``).
        output_dir, dataset_dir: where results go; what paths are relative to.
        device: where the network runs.
        inferer: a MONAI inferer (``inferer(inputs, network)``); None calls the network.
    """

    def __init__(self, network: nn.Module, dataloader, output_dir: str | Path, dataset_dir: str | Path,
                 device: str | torch.device = "cpu", inferer=None):
        self.network, self.dataloader, self.inferer = network, dataloader, inferer
        self.output_dir, self.dataset_dir, self.device = Path(output_dir), Path(dataset_dir), torch.device(device)

    @torch.no_grad()
    def run(self) -> dict:
        network = self.network.to(self.device).eval()
        rows, errors = [], []
        for batch in self.dataloader:
            paths, reasons = list(batch["path"]), list(batch["error"])
            errors += [{"path": self._relative(p), "stage": "read", "reason": r} for p, r in zip(paths, reasons) if r]
            keep = [i for i, r in enumerate(reasons) if not r]
            if not keep:
                continue
            x = torch.as_tensor(batch["image"][keep]).to(self.device).float()
            probs = self.inferer(x, network) if self.inferer is not None else network(x)
            for i, p in zip(keep, probs.float().cpu().numpy()):
                rows.append({"path": self._relative(paths[i]), **{f"p_{c}": f"{v:.9g}" for c, v in zip(CLASSES, p)},
                             "predicted": CLASSES[int(np.argmax(p))]})
        predictions = write_csv(self.output_dir / "predictions.csv", PREDICTION_COLUMNS, rows)
        errors_csv = write_csv(self.output_dir / "errors.csv", ERROR_COLUMNS, errors)
        log.info("scored %d file(s), %d failed: %s", len(rows), len(errors), predictions)
        return {"scored": len(rows), "failed": len(errors), "predictions": str(predictions), "errors": str(errors_csv)}

    def _relative(self, path: str) -> str:
        try:
            return Path(path).relative_to(self.dataset_dir).as_posix()
        except ValueError:
            return Path(path).as_posix()


def export_bundle(model: str | Path, out: str | Path, version: str = "0.1.0", authors: str | None = None,
                  data_source: str | None = None) -> dict:
    """Write the MONAI bundle of a trained fold ensemble (see the module docstring).

    Args:
        model: a ``train`` model folder (or its output folder), or an MLflow model URI (``load_model``).
        out: the bundle folder: created; an existing one must be empty or a bundle (its files are replaced).
        version: the bundle's version (``metadata.json``).
        authors: who trained the model; None: a placeholder that says to fill it in.
        data_source: what data the model was trained on, in words (no patient data); None: what the
            model folder records (sample and patient counts, manifest fingerprint).

    Returns:
        ``{"bundle": Path, "torchscript": str}``: the folder and what became of the TorchScript export.

    Raises:
        MissingInputError / InputError: no model there, or a damaged one; ``out`` holds something else.
    """
    predictor = load_model(model)
    cfg, ensemble = predictor.config, cast(FoldEnsemble, predictor.model)
    out = _prepare_out(Path(out))
    channels, size = 2 * cfg.data.context_slices + 1, cfg.data.image_size
    spec: dict[str, Any] = {"model_name": cfg.model.name, "in_channels": channels, "n_folds": len(ensemble.members),
                            "pooling": cfg.model.pooling, "lesion_finder": cfg.model.lesion_finder is not None}
    (out / "models").mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in ensemble.state_dict().items()}, out / "models" / "model.pt")
    network = load_ensemble_weights(EnsembleNetwork(**spec), out / "models" / "model.pt")
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(network(example), ensemble.cpu()(example), atol=1e-6):
            raise RuntimeError("the bundle's network_def does not reproduce the model's outputs")  # a bug, not bad input
    scripted, ts_note = _to_torchscript(network, example)
    provenance = _read_provenance(model)
    meta = bundle_metadata(cfg, spec, version=version, authors=authors, data_source=data_source,
                           provenance=provenance, torchscript=ts_note)
    inference = inference_config(cfg, spec)
    (out / "configs").mkdir(exist_ok=True)
    (out / "docs").mkdir(exist_ok=True)
    _write_json(out / "configs" / "metadata.json", meta)
    _write_json(out / "configs" / "inference.json", inference)
    (out / "configs" / "logging.conf").write_text(LOGGING_CONF)
    (out / "docs" / "README.md").write_text(bundle_readme(meta, spec, cfg))
    (out / "LICENSE").write_text(LICENSE_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    ts_path = out / "models" / "model.ts"
    ts_path.unlink(missing_ok=True)
    if scripted is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 marks torch.jit deprecated
            save_net_with_metadata(scripted, str(out / "models" / "model"), include_config_vals=False, meta_values=meta,
                                   more_extra_files={"inference.json": json.dumps(inference).encode()})
    return {"bundle": out, "torchscript": ts_note}


def _prepare_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not (out / "configs" / "metadata.json").is_file():
        raise InputError(f"--out: {out} is not empty and not a bundle: give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _to_torchscript(network: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule | None, str]:
    """The network as TorchScript, scripted or else traced, if it gives the same ``(B, 3)`` probabilities
    (within 1e-5) on ``example`` ``(B, C, S, S)``; else ``None``. The text says which, for the metadata."""
    candidate = copy.deepcopy(network).eval()
    for member in cast(list[EfficientNet], candidate.members):
        member.set_swish(memory_efficient=False)  # MONAI's memory-efficient swish is a custom autograd op: not scriptable
    with torch.no_grad():
        expected = network(example)
    failures = []
    for how in ("torch.jit.script", "torch.jit.trace"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch >= 2.10 marks torch.jit deprecated
                module = torch.jit.script(candidate) if how == "torch.jit.script" else torch.jit.trace(candidate, example)
                with torch.no_grad():
                    gap = float((module(example) - expected).abs().max())
        except Exception as exc:  # any failure to script or trace: try the next way, then report it
            failures.append(f"{how} failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''})")
            continue
        if gap <= 1e-5:
            return module, (f"models/model.ts: {how} of the ensemble (the plain swish in place of MONAI's memory-efficient "
                            f"one, the same function); max difference to models/model.pt {gap:.1e} on a test batch")
        failures.append(f"{how} differs from the network by {gap:.1e}")
    return None, "no models/model.ts: " + "; ".join(failures) + ". Use models/model.pt with network_def."


def _read_provenance(model: str | Path) -> dict:
    """What the model folder records about training (``model.json``, and ``cv_summary.json`` of the
    train output folder around it): counts, fingerprint, out-of-fold metrics. Nothing per patient."""
    folder = model_folder(str(model))
    model_json, summary = _read_json_object(folder / "model.json"), _read_json_object(folder.parent / "cv_summary.json")
    oof = summary.get("oof")
    oof = oof if isinstance(oof, dict) else {}
    return {
        "trained_with": model_json.get("lung_effnet_version"),
        "n_slices": summary.get("n_slices"), "n_patients": summary.get("n_patients"),
        "patient_ids": summary.get("patient_ids"), "data_fingerprint": summary.get("data_fingerprint"),
        "eval_metrics": {f"oof_{k}": v for k, v in oof.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
    }


def _read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; ``{}`` when there is none (no file, not JSON, not an object)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _package_version(name: str) -> str | None:
    try:
        return package_metadata.version(name)
    except package_metadata.PackageNotFoundError:
        return None


def _training_settings(cfg: Config) -> dict:
    """The config sections a reader of the bundle needs, without local paths (a cache folder, a weights file's folder)."""
    data = {k: v for k, v in cfg.to_dict()["data"].items() if k != "cache_dir"}
    model = dict(cfg.to_dict()["model"])
    if model.get("pretrained_weights") and not str(model["pretrained_weights"]).startswith("builtin:"):
        model["pretrained_weights"] = Path(str(model["pretrained_weights"])).name
    return {"seed": cfg.seed, "data": data, "model": model, "cv": cfg.to_dict()["cv"],
            "train": {k: cfg.to_dict()["train"][k] for k in ("epochs", "batch_size", "optimizer", "lr", "class_balance")}}


def bundle_metadata(cfg: Config, spec: dict, *, version: str, authors: str | None, data_source: str | None,
                    provenance: dict, torchscript: str) -> dict:
    """``configs/metadata.json``: every field MONAI's metadata schema (``SCHEMA_URL``) requires, the
    input ``image`` ``(B, C, S, S)`` float32 in [0, 1] and output ``pred`` ``(B, 3)`` probabilities."""
    versions = get_config_values()
    channels, size, n_folds = spec["in_channels"], cfg.data.image_size, spec["n_folds"]
    window = f"window centre {cfg.data.window_center:g} HU, width {cfg.data.window_width:g} HU"
    channel_def = ({"0": f"CT slice, {window}, mapped to [0, 1]"} if channels == 1 else
                   {"0": "slice k-1 (2.5D context)", "1": "slice k (the slice scored)", "2": "slice k+1 (2.5D context)"})
    required = {"lung-effnet": __version__}
    if _package_version("fire"):
        required["fire"] = str(_package_version("fire"))  # python -m monai.bundle parses its arguments with fire
    recorded = (f"{provenance['n_slices']} slices of {provenance['n_patients']} patients (patient IDs "
                f"{provenance['patient_ids']}), manifest fingerprint {provenance['data_fingerprint']}, "
                f"{cfg.cv.folds}-fold patient-grouped cross-validation" if provenance.get("n_slices") is not None else
                "the model folder records no training-data summary (no cv_summary.json beside it)")
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by lung-effnet {__version__} (export-bundle) from a {n_folds}-fold "
                               f"{spec['model_name']} ensemble trained with lung-effnet {provenance.get('trained_with') or 'unknown'}"},
        "monai_version": str(versions["MONAI"]),
        "pytorch_version": str(versions["Pytorch"]).split("+")[0],
        "numpy_version": str(versions["Numpy"]),
        "required_packages_version": required,
        "name": "lung-effnet CT slice classifier",
        "task": "Classify a 2D chest CT slice as benign, malignant or normal (lung nodules)",
        "description": (f"Mean of the softmax of {n_folds} MONAI EfficientNetBN ({spec['model_name']}, 2D) fold models trained "
                        f"by lung-effnet under patient-grouped cross-validation. Input (B, {channels}, {size}, {size}) float32 "
                        "in [0, 1]: the slice in HU windowed to [0, 1], cropped to the lungs, padded square and resized "
                        "(configs/inference.json runs this preprocessing on DICOM slices and 2D images); output (B, 3) "
                        "probabilities of benign, malignant, normal."
                        + (" Each fold model also reads the map of a frozen lesion finder (a small convolutional network "
                           "inside it, weights in models/model.pt) as one more channel." if spec.get("lesion_finder") else "")),
        "authors": authors or "not recorded: set with lung-effnet export-bundle --authors",
        "copyright": f"Copyright (c) {authors}" if authors else "not recorded: set with lung-effnet export-bundle --authors",
        "intended_use": INTENDED_USE,
        "data_source": data_source or recorded,
        "data_type": "dicom (CT slices in HU) or 2D images (png/jpg, 8-bit lung window)",
        "image_classes": f"{channels} channel(s), {window}, scaled to [0, 1]",
        "pred_classes": "3 probabilities summing to 1: channel 0 benign, 1 malignant, 2 normal",
        "eval_metrics": provenance.get("eval_metrics") or {},
        "references": ["Raza R. et al., Lung-EffNet: Lung cancer classification using EfficientNet from CT-scan images, "
                       "Engineering Applications of Artificial Intelligence, 2023 (the approach; its slice-level split "
                       "is not followed here)"],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "CT", "num_channels": channels,
                "spatial_shape": [size, size], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": channel_def}},
            "outputs": {"pred": {
                "type": "probabilities", "format": "classes", "num_channels": len(CLASSES), "spatial_shape": [],
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {str(i): c for i, c in enumerate(CLASSES)}}},
        },
        "lung_effnet": {"exported_with": __version__, "trained_with": provenance.get("trained_with"),
                        "torchscript": torchscript, "training": _training_settings(cfg),
                        "outputs": "<output_dir>/predictions.csv (path,p_benign,p_malignant,p_normal,predicted) and "
                                   "<output_dir>/errors.csv (path,stage,reason); output_dir defaults to <bundle_root>/eval"},
    }


def inference_config(cfg: Config, spec: dict) -> dict:
    """``configs/inference.json``: every input file under ``dataset_dir`` -> preprocessing -> ``network``
    (``network_def`` with ``models/model.pt``) -> ``output_dir/predictions.csv``. Only ``_target_``
    references to MONAI and to this module: no expression imports anything."""
    data = {k: v for k, v in cfg.to_dict()["data"].items() if k != "cache_dir"}
    return {
        "bundle_root": ".",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": f"{__name__}.EnsembleNetwork", **spec},
        "network": {"_target_": f"{__name__}.load_ensemble_weights", "network": "@network_def", "path": "@ckpt_path"},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": f"{__name__}.LoadPreprocessSliced", "keys": "image", "data_config": data}]},
        "datalist": {"_target_": f"{__name__}.list_input_files", "folder": "@dataset_dir"},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': p, 'path': p} for p in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 16, "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "evaluator": {"_target_": f"{__name__}.FolderPredictor", "network": "@network", "dataloader": "@dataloader",
                      "output_dir": "@output_dir", "dataset_dir": "@dataset_dir", "device": "@device", "inferer": "@inferer"},
        "run": ["$@evaluator.run()"],
    }


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def bundle_readme(meta: dict, spec: dict, cfg: Config) -> str:
    """``docs/README.md``: the model, how to run it, what it writes, and its limits."""
    size, channels = cfg.data.image_size, spec["in_channels"]
    metrics = "".join(f"- {k}: {v:.3f}\n" for k, v in meta["eval_metrics"].items()) or "- none recorded\n"
    return f"""# {meta['name']} (bundle {meta['version']})

{meta['task']}. **{INTENDED_USE}**

{meta['description']}

## Run it

Needs `lung-effnet` {__version__} (which brings MONAI and PyTorch) and `fire` (MONAI's command line parser).

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --dataset_dir /path/to/slices [--output_dir /path/to/results]
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json
```

`dataset_dir` (default `<bundle_root>/input`) is searched recursively for 2D images (PNG/JPG, 8-bit lung window)
and DICOM slice files (`.dcm` or with the DICM preamble); each file is one slice, preprocessed exactly as in
training ({channels} channel(s), {size} x {size} px, values in [0, 1]; with 2.5D models a single slice is its
own neighbour). NIfTI volumes and whole-series results need `lung-effnet score`.

It writes to `output_dir` (default `<bundle_root>/eval`):

- `predictions.csv`: `path` (relative to `dataset_dir`), `p_benign`, `p_malignant`, `p_normal`, `predicted`;
- `errors.csv`: `path`, `stage`, `reason` for every file that could not be read (the run goes on).

## Files

- `models/model.pt`: the state dict of the ensemble (`network_def`, `{__name__}.EnsembleNetwork`); keys
  `members.<k>.*` are fold k's EfficientNet. Load with `torch.load(..., weights_only=True)`.
- TorchScript: {meta['lung_effnet']['torchscript']}
- `configs/metadata.json`: versions, input/output format, training settings (`lung_effnet.training`).

## Training data

{meta['data_source']}

Out-of-fold metrics recorded at training (patient-grouped cross-validation):

{metrics}
## Limits

- {INTENDED_USE}
- Slice-level output: a nodule shows on a few slices of a series; `lung-effnet score` aggregates a series.
- The model knows only what its training data showed; check it on your own data before drawing conclusions.

## License

Apache-2.0 (`LICENSE`), the license of lung-effnet, the code that built and runs this bundle.
"""


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


__all__ = ["EnsembleNetwork", "FolderPredictor", "LoadPreprocessSliced", "export_bundle", "list_input_files",
           "load_ensemble_weights"]
