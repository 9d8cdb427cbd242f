"""Explanations: Grad-CAM maps, their sanity checks, and the HTML saliency reports.

In: a trained run (its folder or MLflow run id: fold ensemble, out-of-fold predictions, manifest) or a
predictor and images. Out on disk: ``report.html`` (self-contained: images, maps, lesion outlines where
masks are known) and ``checks.json`` (model-randomization test; pointing game and energy-in-lesion against
masks, each beside its chance level).
"""
