"""The train stage: cached tensors -> folds -> fold models -> out-of-fold predictions, metrics, plots, MLflow runs.

In: the preprocessed samples and the config. Out on disk (the run folder): ``folds.csv`` (patient-grouped,
stratified folds, audited for leakage), ``folds/fold_k/`` (checkpoints, resumable), ``oof_predictions.csv`` (each
sample scored by the one fold model that never saw its patient: "out of fold"), ``cv_summary.json`` (pooled
metrics with patient-bootstrap CIs), ``plots/``, ``model/`` (the fold ensemble); one MLflow parent run with a
nested run per fold. ``pretrain`` trains an initialisation on synthetic phantoms the same way.
"""
