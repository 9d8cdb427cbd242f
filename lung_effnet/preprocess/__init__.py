"""Preprocessing: manifest rows -> the ``(N, C, H, W)`` float tensors the model sees, cached once.

In: ``manifest.csv`` and the ``data`` section of the config (HU window, crop to lungs/body, input size,
2.5D context). Out on disk: a cache of preprocessed tensors keyed by the data and the settings
(``cache.load_or_preprocess``; ``$LUNG_EFFNET_CACHE_DIR``), so a second run decodes nothing. The same MONAI
chain (``transforms``) serves training, ``load_model(...).preprocess`` and scoring; ``volume`` is its batched
twin for whole series, tested bit-identical.
"""
