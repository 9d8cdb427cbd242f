"""Experiment configuration: plain YAML, validated into typed dataclasses.

A config file holds any subset of the sections below; everything else takes the defaults written
here (``configs/default.yaml`` spells them all out). Loading checks every name and type: an
unknown key or a bad value stops with one line naming the key (``ConfigError``). Overrides from
the command line use dotted keys: ``--set train.epochs=3 --set model.name=efficientnet-b1``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lung_effnet.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_PACKAGE = "lung_effnet.configs"
"""The named configs (``default``, ``paper_b1``, ``demo_cpu``): the top-level ``configs/`` folder, installed
with the package under this name (``pyproject.toml``), so a name resolves from a wheel as from a checkout
(and from a source tree that is only on ``PYTHONPATH``, through the folder itself)."""


def named_config(name: str) -> Path:
    """The file of the named config ``name`` (``demo_cpu`` -> ``.../configs/demo_cpu.yaml``); it may not exist."""
    from importlib.resources import files

    try:
        folder = Path(str(files(CONFIG_PACKAGE)))
    except ModuleNotFoundError:  # a source tree on PYTHONPATH, not installed: the folder itself
        folder = Path(__file__).resolve().parents[1] / "configs"
    return folder / f"{name}.yaml"


@dataclass
class DataConfig:
    """Preprocessing: what the model sees. Sizes in pixels, HU for windows, mm for spacing."""

    image_size: int = 96                  # model input is (C, image_size, image_size); 96 measured (benchmarks/RESULTS.md)
    window_center: float = -600.0         # lung window, HU
    window_width: float = 1500.0          # HU
    spacing_mm: float | None = None       # resample volumes in-plane to this pixel size; None keeps it
    slices: str = "lesion"                # volumes: "lesion" (slices with mask > 0; all slices where the mask is empty) or "all"
    context_slices: int = 1               # 0: 1 channel; 1: 3 channels (slices k-1, k, k+1) as 2.5D
    crop: str = "lung"                    # before resizing, crop each slice to the lungs' bounding box ("lung"; the body's where no lungs show), the body's ("body") or not ("none")
    cache_dir: str | None = None          # preprocessed tensors; None: $LUNG_EFFNET_CACHE_DIR, else ~/.cache/lung-effnet/preprocessed


@dataclass
class AugmentConfig:
    """Training-time augmentation (MONAI transforms); probabilities in [0, 1]."""

    flip_prob: float = 0.5                # left-right flip
    rotate_deg: float = 10.0              # uniform in [-rotate_deg, rotate_deg]
    zoom: float = 0.1                     # scale in [1 - zoom, 1 + zoom]
    translate: float = 0.0                # shift by up to this fraction of the side, each axis
    intensity_shift: float = 0.05         # added to [0, 1] intensities
    intensity_scale: float = 0.1          # multiplied by 1 +- this
    noise_std: float = 0.02               # Gaussian noise on [0, 1] intensities
    prob: float = 0.8                     # probability of each spatial / intensity transform
    mixup_alpha: float = 0.0              # mixup (Zhang et al. 2018): blend each batch with a shuffled copy, weight ~ Beta(a, a); 0: off


@dataclass
class ModelConfig:
    name: str = "efficientnet-b0"
    pretrained_weights: str | None = "builtin:phantom-b0-96px-2.5d-finder"  # local state dict (MONAI naming), builtin:<name>, or None (from scratch)
    lesion_finder: str | None = "builtin:phantom-finder-96px-2.5d"  # frozen lesion finder whose map is one more input channel (lung_effnet.models.lesion_finder): builtin:<name>, a file from `pretrain`, or None
    dropout: float | None = None           # before the head; None: the variant's default
    drop_connect: float = 0.2
    pooling: str = "avg"                   # global pooling before the head: "avg" (EfficientNet's) or "max" (lesion anywhere)
    bn_momentum: float = 0.1               # BatchNorm running-stat update; MONAI's 0.01 suits ImageNet-length runs only
    zero_init_head: bool = True            # start the classifier at uniform predictions (stable from-scratch start)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adamw"               # "adam" or "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"              # "cosine" (with warmup), "plateau" or "none"
    warmup_epochs: int = 1
    plateau_factor: float = 0.3
    plateau_patience: int = 5
    early_stopping_patience: int = 10      # epochs without a better validation macro AUROC
    class_balance: str = "sampler"         # "sampler" (balanced batches), "weights" (weighted loss) or "none"
    label_smoothing: float = 0.0
    lesion_loss_weight: float = 1.0        # auxiliary loss on rows with a known lesion mask (lung_effnet.training.lesion_loss); 0: off
    bn_recalibration_images: int = 4096    # before each evaluation, re-estimate BatchNorm statistics on up to this many training images; 0: running averages
    val_fraction: float = 0.1              # of each fold's training patients, for early stopping
    amp: bool = True                       # bf16 autocast on CUDA; CPU always runs fp32
    channels_last: bool = True             # NHWC memory format on CUDA and CPU (CPU math stays fp32)
    device: str = "auto"                   # "auto", "cpu" or "cuda"
    keep_last_checkpoint: bool = False     # keep folds/fold_k/last.pt (optimizer state, ~50 MB a b0 fold) once the run has finished


@dataclass
class CVConfig:
    folds: int = 5
    test_fraction: float = 0.0             # patients held out of CV altogether, for a final test


@dataclass
class TrackingConfig:
    experiment: str = "lung-effnet"
    tracking_uri: str | None = None        # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    register_model: str | None = None      # registry name for the fold ensemble; None: not registered
    alias: str = "candidate"
    timeout_s: int = 20                    # seconds an MLflow HTTP call (and the start-up check) waits for an answer
    retries: int = 2                       # retries of a failed MLflow HTTP call (MLflow's own default is 7)


@dataclass
class ReportConfig:
    """The saliency report written after ``train`` (``lung_effnet.explain.oof_report``)."""

    enabled: bool = True                   # Grad-CAM report over out-of-fold cases, into <out>/saliency and MLflow
    top: int = 2                           # most confident right and wrong cases shown per true class
    method: str = "gradcam"                # "gradcam" or "gradcampp"


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, object]:
        """``{"train.lr": 0.001, ...}``: for MLflow params."""
        out = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out


@dataclass(frozen=True)
class Range:
    """Finite numbers from ``lo`` to ``hi`` (``None``: unbounded); ``open_lo`` / ``open_hi`` exclude the
    ends. NaN and +-inf are never admitted: no setting means anything at them, and an unbounded rule
    (``train.weight_decay``) would otherwise let ``.inf`` through to the optimizer."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False

    def __str__(self) -> str:
        def text(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        lo = "-inf" if self.lo is None else text(self.lo)
        hi = "inf" if self.hi is None else text(self.hi)
        return f"{'(' if self.open_lo or self.lo is None else '['}{lo}, {hi}{')' if self.open_hi or self.hi is None else ']'}"

    def admits(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or not math.isfinite(value):  # the types are checked first
            return False
        above = self.lo is None or (value > self.lo if self.open_lo else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.open_hi else value <= self.hi)
        return above and below


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values."""

    values: tuple

    def __str__(self) -> str:
        return "one of " + ", ".join(map(str, self.values))

    def admits(self, value: object) -> bool:
        return value in self.values


@dataclass(frozen=True)
class Text:
    """Free text (a path, a URI, a name); ``nonempty``: not blank."""

    nonempty: bool = False

    def __str__(self) -> str:
        return "non-empty text" if self.nonempty else "text"

    def admits(self, value: object) -> bool:
        return not self.nonempty or bool(str(value).strip())


ANY_BOOL = OneOf((True, False))
ZERO_TO_ONE = Range(0, 1)                # probabilities and [0, 1] intensities
FRACTION = Range(0, 1, open_hi=True)     # shares of something that must leave a remainder
NON_NEGATIVE = Range(0)
HU = Range(-1100, 4000)                  # the range a CT scanner stores (air -1000 .. dense bone and metal)

RULES: dict[str, Range | OneOf | Text] = {
    "seed": Range(0, 2**32 - 1),  # numpy and scikit-learn seeds
    "data.image_size": Range(32, 2048),  # EfficientNet downsamples 32x: below 32 px its last stage sees a 1 x 1 map
    "data.window_center": HU,
    "data.window_width": Range(1, 5000),
    "data.spacing_mm": Range(0, 20, open_lo=True),
    "data.slices": OneOf(("lesion", "all")),
    "data.context_slices": OneOf((0, 1)),
    "data.crop": OneOf(("lung", "body", "none")),
    "data.cache_dir": Text(nonempty=True),
    "augment.flip_prob": ZERO_TO_ONE,
    "augment.rotate_deg": Range(0, 180),
    "augment.zoom": FRACTION,
    "augment.translate": Range(0, 0.5),
    "augment.intensity_shift": ZERO_TO_ONE,
    "augment.intensity_scale": FRACTION,
    "augment.noise_std": ZERO_TO_ONE,
    "augment.prob": ZERO_TO_ONE,
    "augment.mixup_alpha": NON_NEGATIVE,
    "model.name": OneOf(tuple(f"efficientnet-b{i}" for i in range(8))),
    "model.pretrained_weights": Text(nonempty=True),
    "model.lesion_finder": Text(nonempty=True),
    "model.dropout": FRACTION,
    "model.drop_connect": FRACTION,
    "model.pooling": OneOf(("avg", "max")),
    "model.bn_momentum": Range(0, 1, open_lo=True, open_hi=True),
    "model.zero_init_head": ANY_BOOL,
    "train.epochs": Range(1),
    "train.batch_size": Range(1),
    "train.optimizer": OneOf(("adam", "adamw")),
    "train.lr": Range(0, 1, open_lo=True),
    "train.weight_decay": NON_NEGATIVE,
    "train.scheduler": OneOf(("cosine", "plateau", "none")),
    "train.warmup_epochs": NON_NEGATIVE,
    "train.plateau_factor": Range(0, 1, open_lo=True, open_hi=True),
    "train.plateau_patience": NON_NEGATIVE,
    "train.early_stopping_patience": Range(1),
    "train.class_balance": OneOf(("sampler", "weights", "none")),
    "train.label_smoothing": FRACTION,
    "train.lesion_loss_weight": NON_NEGATIVE,
    "train.bn_recalibration_images": NON_NEGATIVE,
    "train.val_fraction": FRACTION,
    "train.amp": ANY_BOOL,
    "train.channels_last": ANY_BOOL,
    "train.keep_last_checkpoint": ANY_BOOL,
    "train.device": OneOf(("auto", "cpu", "cuda")),
    "cv.folds": Range(2, 100),
    "cv.test_fraction": FRACTION,
    "tracking.experiment": Text(nonempty=True),
    "tracking.tracking_uri": Text(nonempty=True),
    "tracking.register_model": Text(nonempty=True),
    "tracking.alias": Text(nonempty=True),
    "tracking.timeout_s": Range(1, 3600),
    "tracking.retries": Range(0, 10),  # MLflow refuses more than 10 (MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT)
    "report.enabled": ANY_BOOL,
    "report.top": Range(1, 100),
    "report.method": OneOf(("gradcam", "gradcampp")),
}
"""The allowed values of every config key (``None`` is allowed where the type says ``| None``);
``from_dict`` checks each one after the types, and a test checks that every key has a rule."""

REMOVED_KEYS: dict[str, tuple[object, str]] = {
    "train.num_workers": (0, "it was never used: slices are preprocessed once into the cache and training "
                             "reads them from memory, so there is no data loader to give workers to"),
}
"""Keys that existed once, with their old default and why they went. A config (or a model folder's
``config.yaml``) that still has one loads: the key is ignored, silently at its old default (every
saved model folder and copy of ``default.yaml`` holds it), with a warning naming it otherwise.
Refusing such a config would stop runs whose result the key never changed."""


def _coerce(key: str, value, hint):
    """Check ``value`` against a field's type hint; ints are accepted for floats."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: must not be empty (expected {base.__name__})")
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base in (str, bool) and isinstance(value, base):
        return value
    raise ConfigError(f"{key}: expected {base.__name__}{' or null' if optional else ''}, got {value!r}")


def _check_ranges(cfg: Config) -> None:
    for key, value in cfg.flat().items():
        rule = RULES[key]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number{f' in {rule}' if isinstance(rule, Range) else ''}, got {value!r}")
        if value is not None and not rule.admits(value):
            raise ConfigError(f"{key}: must be {rule}, got {value!r}")


def _drop_removed_keys(raw: dict) -> dict:
    """``raw`` without the ``REMOVED_KEYS`` (see there), warning about each one set to another value."""
    raw = dict(raw)
    for key, (old_default, why) in REMOVED_KEYS.items():
        section, name = key.split(".")
        if isinstance(raw.get(section), dict) and name in raw[section]:
            raw[section] = dict(raw[section])
            value = raw[section].pop(name)
            if value != old_default:
                log.warning("%s: removed, ignored (got %r): %s", key, value, why)
    return raw


def from_dict(raw: dict | None) -> Config:
    """Build a validated ``Config`` from nested dicts (missing keys take defaults)."""
    raw = _drop_removed_keys(raw or {})
    if isinstance(raw.get("data"), dict) and "crop_to_body" in raw["data"]:
        # model folders written before data.crop existed: crop_to_body true/false meant body/none
        data = dict(raw["data"])
        legacy = data.pop("crop_to_body")
        data.setdefault("crop", "body" if legacy else "none")
        raw["data"] = data
    cfg = Config()
    hints = typing.get_type_hints(Config)
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(hints)})")
        section_type = hints[key]
        if not dataclasses.is_dataclass(section_type):
            setattr(cfg, key, _coerce(key, value, section_type))
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        section = getattr(cfg, key)
        field_hints = typing.get_type_hints(section_type)
        for name, item in value.items():
            if name not in field_hints:
                raise ConfigError(f"{key}.{name}: unknown key (known: {', '.join(field_hints)})")
            setattr(section, name, _coerce(f"{key}.{name}", item, field_hints[name]))
    _check_ranges(cfg)
    return cfg


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path as given, or a named config in ``configs/`` (``demo_cpu`` -> ``configs/demo_cpu.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent == Path(".") and path.suffix in ("", ".yaml"):  # a bare name: demo_cpu, demo_cpu.yaml
        named = named_config(path.stem)
        if named.is_file():
            return named
    raise ConfigError(f"config file not found: {name_or_path}")


def parse_override(text: str) -> tuple[str, object]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot read value {value!r}: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or only defaults), apply ``key=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            raw = yaml.safe_load(resolved.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{resolved}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{resolved}: expected a mapping at the top level")
    for text in overrides or []:
        key, value = parse_override(text)
        parts = key.split(".")
        if len(parts) == 1:
            raw[key] = value
        elif len(parts) == 2:
            section = raw.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"--set {key}: {parts[0]} is not a section")
            section[parts[1]] = value
        else:
            raise ConfigError(f"--set {key}: keys are section.name")
    return from_dict(raw)
