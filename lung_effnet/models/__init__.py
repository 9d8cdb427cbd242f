"""Models: the EfficientNet factory, the fold ensemble and the model folder.

In: a config (``model`` section) and fold state dicts. Out on disk: ``model/`` (``config.yaml``,
``fold_<k>.pt``, ``model.json``), which ``load_model`` opens as a ``Predictor``: ``(B, C, H, W)``
tensors in, ``(B, 3)`` class probabilities out (the mean of the fold models' softmax).
"""
