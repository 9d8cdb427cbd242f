"""Where weights files are: ``builtin:<name>`` (shipped with the package) or a local path, and why a file of
tensors was refused. Shared by the EfficientNet factory (``model.pretrained_weights``) and the lesion finder
(``model.lesion_finder``)."""

from __future__ import annotations

from pathlib import Path

from lung_effnet.errors import ConfigError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "weights"
"""Weights that ship with the package, named ``builtin:<name>`` in a config (``<name>.pt`` here):
made by ``lung-effnet pretrain`` on synthetic phantoms (benchmarks/RESULTS.md), never downloaded."""


def resolve_weights(name_or_path: str | Path, key: str = "model.pretrained_weights") -> Path:
    """The file a ``model.pretrained_weights`` (or ``model.lesion_finder``: ``key``) setting names:
    ``builtin:<name>`` (shipped with the package), or a local path.

    Raises:
        ConfigError: no such built-in name (a local path is returned as it is; callers check it exists).
    """
    text = str(name_or_path)
    if not text.startswith(BUILTIN_PREFIX):
        return Path(text).expanduser()
    path = BUILTIN_DIR / f"{text[len(BUILTIN_PREFIX):]}.pt"
    if not path.is_file():
        known = ", ".join(BUILTIN_PREFIX + p.stem for p in sorted(BUILTIN_DIR.glob("*.pt"))) or "none"
        raise ConfigError(f"{key}: no built-in weights {text!r} (built in: {known})")
    return path


def load_failure(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in a few words (torch's own message is a
    paragraph that suggests ``weights_only=False``, which would run whatever code the file holds)."""
    text = str(exc)
    if "unsupported GLOBAL" in text:
        return "it holds Python objects, not only tensors: refused unread"
    if "Weights only load failed" in text:
        return "not a file of tensors saved by torch.save"
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
