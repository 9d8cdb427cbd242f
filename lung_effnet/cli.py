"""The ``lung-effnet`` command: one sub-command per pipeline stage.

Exit codes: 0 the run completed (files that failed are counted and listed in ``errors.csv``);
2 a usage, input or config error (one line on stderr naming the path or key); 3 the input held
files but none could be used; 1 anything else (a service that failed: one line; a bug: a traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from lung_effnet.config import TrackingConfig
from lung_effnet.errors import LungEffNetError, NoUsableInputError, UsageError
from lung_effnet.tracking import configure_http, disable_telemetry
from lung_effnet.version import __version__

log = logging.getLogger("lung_effnet")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return common


def _add_synth(sub) -> None:
    p = sub.add_parser(
        "synth", parents=[_common()], help="write a synthetic chest-CT phantom dataset (DICOM, NIfTI or IQ-OTH/NCCD-style JPG)",
        description="Write synthetic chest CT phantoms with benign, malignant or no nodules, lesion masks and "
                    "labels. Deterministic by --seed. The class shows only in lesion morphology.")
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument("--format", choices=["dicom", "nifti", "jpg"], default="dicom", help="file format (default: dicom)")
    p.add_argument("--patients", type=int, default=12, help="number of patients (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels, square (default: 128)")
    p.add_argument("--slices", type=int, default=24, help="slices per patient volume (default: 24)")
    p.add_argument("--compression", choices=["none", "jpeg2000", "jpegls", "rle"], default="none",
                   help="DICOM transfer syntax, lossless (default: none = explicit VR little endian)")
    p.add_argument("--storage", choices=["signed", "unsigned"], default="signed",
                   help="DICOM pixel storage: signed int16, or unsigned uint16 with intercept -1024 (default: signed)")
    p.add_argument("--extras", action="store_true", help="DICOM: add localizers and SR documents, as real archives have")


def _add_ingest(sub) -> None:
    p = sub.add_parser(
        "ingest", parents=[_common()], help="index a CT source: manifest, series, file ledger and errors",
        description="Read a source (a folder per class, a manifest CSV, or a tree of DICOM/NIfTI studies) and "
                    "write manifest.csv (when labels are known), series.csv, files.csv (one row per input file), "
                    "errors.csv and ingest.json to --out. Without labels it is an inventory of what can be used.")
    p.add_argument("source", type=Path, help="folder or manifest CSV")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--labels", type=Path, help="labels CSV for a DICOM/NIfTI tree: label + series_uid, path, study_id or patient_id")
    p.add_argument("--nifti", action="store_true", help="also write each series as nifti/<series>.nii.gz")
    _add_pseudonymize_uids(p)


def _add_pseudonymize_uids(p) -> None:
    p.add_argument("--pseudonymize-uids", type=Path, metavar="KEYFILE",
                   help="replace every Study / Series Instance UID in the outputs by a keyed pseudonym (2.25.<HMAC-SHA256 of the UID>, stable for one key) for outputs that leave the hospital; KEYFILE holds the secret key (at least 16 characters), which is never written; paths are not renamed")


def _add_overrides_and_tracking(p) -> None:
    """``--set KEY=VALUE`` (repeatable) and ``--tracking-uri``: shared by the stages that train."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", parents=[_common()], help="patient-grouped cross-validation, tracked in MLflow",
        description="Train one EfficientNet per fold under patient-grouped, stratified k-fold CV on SOURCE "
                    "(anything ingest accepts) and write cv_summary.json, oof_predictions.csv, folds.csv, plots/ "
                    "and model/ (the fold ensemble that score loads) to --out. Every run is an MLflow parent run "
                    "with one nested run per fold.")
    p.add_argument("--config", default="default", help="YAML config file, or a name in configs/: default, paper_b1, demo_cpu")
    p.add_argument("--data", type=Path, required=True, help="folder or manifest CSV (as for ingest)")
    p.add_argument("--labels", type=Path, help="labels CSV for a DICOM/NIfTI tree")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _add_overrides_and_tracking(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same result as uninterrupted)")
    jobs = p.add_argument_group(
        "one fold at a time, or the folds as cluster jobs",
        "A run's folds can train as separate jobs on one --out (a shared file system on a cluster): the first "
        "job prepares the data, folds.csv and the MLflow parent run, the others wait for it and reuse them; "
        "--merge then assembles the run, equal to a single-process run of the same config and seed.")
    jobs.add_argument("--fold", type=int, metavar="K", help="train only fold K (0-based) of --out's run")
    jobs.add_argument("--merge", action="store_true",
                      help="assemble a run whose folds were trained by --fold jobs (refused, naming them, when folds "
                           "are missing or were trained with another config or data)")
    jobs.add_argument("--executor", choices=["local", "slurm"],
                      help="submit one job per fold and a merge job through submitit: 'slurm' prints the job ids and "
                           "returns (the merge waits for the folds with afterok); 'local' runs them as processes here "
                           "and waits. Job logs: OUT/jobs/")
    _add_job_resources(jobs, "fold")


def _add_job_resources(group, job: str) -> None:
    """``--slurm-partition``, ``--gpus-per-<job>``, ``--timeout-min``: what each cluster job gets."""
    group.add_argument("--slurm-partition", help="SLURM partition of the jobs (default: the cluster's)")
    group.add_argument(f"--gpus-per-{job}", type=int, default=0, choices=(0, 1),
                       help=f"GPUs per {job} job: 0 or 1, as a job is one process (several GPUs for one fold: run "
                            f"train --fold K under torchrun, README 'A fold on several GPUs') (default: 0)")
    group.add_argument("--timeout-min", type=int, default=240, help="time limit of each job in minutes (default: 240)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", parents=[_common()], help="the main job on embedded defaults: synthetic DICOM archive -> train",
                       description="Write a synthetic DICOM archive (with localizers and SRs, as real archives have) "
                                   "and train on it under 5-fold patient-grouped CV with configs/demo_cpu.yaml, "
                                   "tracked in MLflow. Needs no data and no network; about 3 minutes on 2 CPU cores (162 s measured, benchmarks/RESULTS.md).")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    p.add_argument("--patients", type=int, default=60, help="synthetic patients (default: 60)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain", parents=[_common()], help="train an initialisation on synthetic phantoms, for train to start from",
        description="Write --patients synthetic chest-CT phantoms (512 px, lesion masks), preprocess them as the "
                    "config says, train a lesion finder from their masks (OUT/lesion_finder.pt; unless "
                    "model.lesion_finder is null), then one model from scratch on all of them, reading the "
                    "finder's map, and save OUT/weights.pt and OUT/pretrain.json, tracked in MLflow (experiment "
                    "<tracking.experiment>-pretrain). Point model.lesion_finder at OUT/lesion_finder.pt and "
                    "model.pretrained_weights at OUT/weights.pt to start train from them. The package ships the "
                    "result of 'lung-effnet pretrain --config demo_cpu --set model.pretrained_weights=null --set train.lr=0.001 "
                    "--set train.epochs=12' as builtin:phantom-finder-96px-2.5d and builtin:phantom-b0-96px-2.5d-finder "
                    "(benchmarks/RESULTS.md). About 13 minutes on 2 CPU cores.")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; a second run resumes it)")
    p.add_argument("--config", default="demo_cpu", help="YAML config or a name in configs/ (default: demo_cpu): "
                                                        "its data settings must be those train will use")
    p.add_argument("--patients", type=int, default=480, help="synthetic patients (default: 480)")
    p.add_argument("--seed", type=int, default=1000, help="phantom seed (default: 1000; the demo uses 0)")
    p.add_argument("--finder-steps", type=int, default=3000,
                   help="training batches of the lesion finder (default: 3000, about 3 minutes on 2 CPU cores); "
                        "with --set model.lesion_finder=null no finder is trained")
    _add_overrides_and_tracking(p)


def _add_score(sub) -> None:
    p = sub.add_parser(
        "score", parents=[_common()], help="score an archive of CT studies with a trained model: one row per series",
        description="Score every DICOM series (grouped by SeriesInstanceUID), NIfTI volume and 2D image under "
                    "--input with a trained fold ensemble, preprocessed as in training. Writes predictions.csv "
                    "(one row per series), slice_scores.csv, files.csv (one row per input file), errors.csv and "
                    "summary.json to --out. A run stopped at any point continues where it stopped when started "
                    "again with the same command.")
    p.add_argument("--model", required=True, help="model folder written by train (or its output folder), or an "
                                                  "MLflow model URI: models:/name@alias, runs:/<id>/model")
    p.add_argument("--input", type=Path, required=True, help="folder of DICOM / NIfTI / image files (any layout)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; reused to resume)")
    p.add_argument("--saliency", action="store_true", help="also write reports/<series>.html: Grad-CAM on the key slices")
    p.add_argument("--dicom-out", type=Path, metavar="DIR",
                   help="also write each scored DICOM series' result as DICOM for a PACS: DIR/<series>/SR.dcm, a "
                        "TID 1500 structured report in the source study (class, probabilities, model, key slice), and "
                        "with --saliency SC.dcm, the key slice's Grad-CAM overlay. These files carry the study's "
                        "patient tags (a PACS needs them): DIR must lie outside --input and --out. NIfTI and 2D "
                        "inputs get none (summary.json says so)")
    _add_pseudonymize_uids(p)
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass (default: 32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: auto (CUDA when available)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode processes; 0 decodes in the main process (default: with CUDA, one per CPU "
                        "core but one, at most 8; on CPU, where the model is the slow part, 1 per 8 cores, "
                        "at least 1)")
    shards = p.add_argument_group(
        "sharded scoring", "Split the archive into N disjoint shards (by a stable hash of each Series Instance UID, "
                           "or of the relative path of a volume, image or other file), score each as its own job, "
                           "and join them with merge-scores: the result equals one unsharded run.")
    shards.add_argument("--shard", metavar="I/N", help="score only shard I of N (0 <= I < N) into --out; "
                                                       "then: lung-effnet merge-scores SHARD_DIRS... --out DIR")
    shards.add_argument("--executor", choices=["local", "slurm"],
                        help="run --shards shard jobs and a merge job through submitit: 'slurm' submits a job array and "
                             "a merge job (afterok) and prints their ids; 'local' runs them as processes here, waits "
                             "and merges. Shards go to OUT/shards/shard_<i>_of_<N>/, job logs to OUT/shards/jobs/, "
                             "the merged outputs to --out")
    shards.add_argument("--shards", type=int, metavar="N", help="number of shard jobs for --executor")
    _add_job_resources(shards, "shard")


def _add_merge_scores(sub) -> None:
    p = sub.add_parser(
        "merge-scores", parents=[_common()], help="join the shard folders of score --shard into one run's outputs",
        description="Join the folders of 'score --shard I/N' (all N of one split) into --out: predictions.csv, "
                    "slice_scores.csv, files.csv, errors.csv, summary.json and reports/, equal to the outputs of one "
                    "unsharded run. Refused, naming the folders, when a shard is missing or given twice, when shards "
                    "used different models or settings or saw different inputs, or when a series is in two shards.")
    p.add_argument("shard_dirs", nargs="+", type=Path, metavar="SHARD_DIR", help="the --out folders of the shards")
    p.add_argument("--out", type=Path, required=True, help="output folder of the merged run (created)")


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", parents=[_common()], help="rebuild the Grad-CAM saliency report of a finished train run",
        description="Explain the most confident right and wrong out-of-fold cases per class of a train run, each "
                    "with its own fold's model, and write one self-contained HTML file (report.html) and the "
                    "faithfulness checks (checks.json: randomization test, pointing game, energy in lesion) to --out.")
    p.add_argument("--run", required=True, help="the train output folder, or the MLflow parent run id")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--method", choices=["gradcam", "gradcampp"], default="gradcam", help="saliency method (default: gradcam)")
    p.add_argument("--top", type=int, default=2, help="cases per class and outcome (right / wrong) (default: 2)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for a run id (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")


def _add_export_bundle(sub) -> None:
    p = sub.add_parser(
        "export-bundle", parents=[_common()], help="write a trained fold ensemble as a MONAI bundle",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write MODEL (the fold ensemble train wrote) as a MONAI bundle in --out:\n"
                    "  configs/metadata.json   versions, input (B, C, H, W) in [0, 1], outputs (benign, malignant,\n"
                    "                          normal probabilities), intended use (research only), training data\n"
                    "  configs/inference.json  network_def (the ensemble), the saved preprocessing, a folder run\n"
                    "  models/model.pt         the ensemble's state dict (model.ts too when it scripts)\n"
                    "  docs/README.md, LICENSE\n"
                    "Run it with MONAI alone (lung-effnet, monai, torch and fire installed):\n"
                    "  python -m monai.bundle run --config_file OUT/configs/inference.json --bundle_root OUT \\\n"
                    "      --dataset_dir SLICES [--output_dir RESULTS]\n"
                    "which scores every 2D image and DICOM slice under SLICES into RESULTS/predictions.csv\n"
                    "(path,p_benign,p_malignant,p_normal,predicted) and RESULTS/errors.csv; RESULTS defaults to OUT/eval.")
    p.add_argument("model", metavar="MODEL", help="model folder written by train (or its output folder), or an MLflow "
                                                  "model URI: models:/name@alias, runs:/<id>/model")
    p.add_argument("--out", type=Path, required=True, help="bundle folder (created; an existing one must be empty or a bundle)")
    p.add_argument("--bundle-version", default="0.1.0", help="the bundle's version in metadata.json (default: 0.1.0)")
    p.add_argument("--authors", help="who trained the model (metadata authors and copyright; default: marked not recorded)")
    p.add_argument("--data-source", help="what data the model was trained on, in words, no patient data (default: the "
                                         "counts and fingerprint the train output folder records)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lung-effnet",
        description="CT lung-cancer classification (benign / malignant / normal) with MONAI EfficientNet: "
                    "ingest CT data, train under patient-grouped CV, make synthetic phantoms. "
                    "Run 'lung-effnet COMMAND --help' for details.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth(sub)
    _add_ingest(sub)
    _add_train(sub)
    _add_pretrain(sub)
    _add_score(sub)
    _add_merge_scores(sub)
    _add_demo(sub)
    _add_report(sub)
    _add_export_bundle(sub)
    return parser


def cmd_synth(args) -> int:
    from lung_effnet.synthetic.dataset import write_synthetic_dataset

    for flag, value, low in (("--patients", args.patients, 1), ("--size", args.size, 32), ("--slices", args.slices, 3)):
        if value < low:
            raise UsageError(f"{flag}: must be >= {low}, got {value}")
    if args.format != "dicom" and (args.compression not in (None, "none") or args.storage != "signed" or args.extras):
        raise UsageError(f"--compression, --storage and --extras apply to --format dicom only, got --format {args.format}")
    out = write_synthetic_dataset(
        args.out, args.format, n_patients=args.patients, seed=args.seed, size_px=args.size,
        n_slices=args.slices, compression=None if args.compression == "none" else args.compression,
        storage=args.storage, extras=args.extras, progress=not args.quiet)
    print(f"wrote {args.patients} synthetic patients ({args.format}) to {out}")
    return 0


def check_out_outside(out: Path, source: Path, flag: str) -> None:
    """Refuse an ``--out`` that is the input folder or holds it: its outputs would mix with the input
    (an ``--out`` inside the input is fine: the walk leaves it out)."""
    if source.is_dir() and source.resolve().is_relative_to(out.resolve()):
        raise UsageError(f"--out: {out} is or holds {flag} {source}: outputs would mix with the input; "
                         f"give a folder outside {flag} (or one inside it)")


def cmd_ingest(args) -> int:
    from lung_effnet.console import print_ingest_summary
    from lung_effnet.ingest.sources import ingest

    if args.labels is not None and not args.labels.is_file():
        raise UsageError(f"--labels: file not found: {args.labels}")
    check_out_outside(args.out, args.source, "SOURCE")
    result = ingest(args.source, args.out, labels_csv=args.labels, write_nifti=args.nifti, progress=not args.quiet,
                    pseudonymize_uids=args.pseudonymize_uids)
    n_files = sum(result.ledger.counts().values())
    if n_files == 0:
        raise UsageError(f"SOURCE: no files found in {args.source}")
    print_ingest_summary(result.summary(), args.out)
    usable = len(result.rows) if result.has_labels else sum(s["status"] in ("ok", "incomplete") for s in result.series)
    if usable == 0:  # the outputs that say why are written
        raise NoUsableInputError(f"none of the {n_files} input file(s) gave a usable "
                                 f"{'labelled sample' if result.has_labels else 'series or image'}: see {args.out / 'errors.csv'}")
    return 0


def cmd_train(args) -> int:
    from lung_effnet.config import load_config
    from lung_effnet.console import print_cv_summary
    from lung_effnet.training.cv import run_cv

    if args.labels is not None and not args.labels.is_file():
        raise UsageError(f"--labels: file not found: {args.labels}")
    if not args.data.exists():
        raise UsageError(f"--data: not found: {args.data}")
    check_out_outside(args.out, args.data, "--data")
    if sum([args.fold is not None, args.merge, args.executor is not None]) > 1:
        raise UsageError("--fold, --merge and --executor: give one of them (--executor runs the folds and the merge)")
    if args.timeout_min < 1:
        raise UsageError(f"--timeout-min must be >= 1, got {args.timeout_min}")
    cfg = load_config(args.config, args.overrides)
    if args.executor is not None:
        from lung_effnet.cluster import ClusterOptions
        from lung_effnet.training.jobs import submit_cv

        result = submit_cv(args.data, args.out, cfg, args.labels, args.tracking_uri, args.resume, args.executor,
                           ClusterOptions(partition=args.slurm_partition, gpus_per_job=args.gpus_per_fold,
                                          timeout_min=args.timeout_min, name=f"lung-effnet-{args.out.name}"))
        jobs = ", ".join(f"fold {k}: {j}" for k, j in result["fold_jobs"].items()) or "none (all folds finished)"
        print(f"MLflow parent run {result['parent_run_id']}; fold jobs: {jobs}; merge job: {result['merge_job']} "
              f"(logs in {args.out / 'jobs'})")
        if "summary" in result:
            print_cv_summary(result["summary"], args.out)
        return 0
    summary = run_cv(args.data, args.out, cfg, labels_csv=args.labels, tracking_uri=args.tracking_uri,
                     resume=args.resume, progress=not args.quiet, fold=args.fold, merge=args.merge)
    if not summary:  # a torchrun rank other than 0 (README, Train): rank 0 reports
        return 0
    if args.fold is not None:
        left = summary["missing_folds"]
        print(f"fold {args.fold}: {summary['n_test']} test slices, AUROC macro {summary['auroc_macro']:.3f}; "
              + (f"folds still to train: {', '.join(map(str, left))}" if left else f"all folds done: merge with "
                 f"lung-effnet train ... --out {args.out} --merge"))
        return 0
    print_cv_summary(summary, args.out)
    return 0


def cmd_pretrain(args) -> int:
    from lung_effnet.config import load_config
    from lung_effnet.training.pretrain import run_pretrain

    if args.patients < 6:
        raise UsageError(f"--patients: must be >= 6, got {args.patients}")
    cfg = load_config(args.config, args.overrides)
    if args.finder_steps < 1:
        raise UsageError(f"--finder-steps: must be >= 1, got {args.finder_steps}")
    summary = run_pretrain(args.out, cfg, n_patients=args.patients, seed=args.seed, tracking_uri=args.tracking_uri,
                           progress=not args.quiet, finder_steps=args.finder_steps)
    print(f"pretrained on {summary['slices']} slices of {summary['patients']} phantom patients in "
          f"{summary['seconds']:.0f} s: {summary['weights']}")
    finder = f" --set model.lesion_finder={summary['lesion_finder']}" if summary.get("lesion_finder") else ""
    print(f"Start train from it with --set model.pretrained_weights={summary['weights']}{finder}")
    return 0


def cmd_score(args) -> int:
    from lung_effnet.models.predictor import is_model_uri
    from lung_effnet.scoring import score_archive

    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise UsageError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    if not args.input.exists():
        raise UsageError(f"--input: not found: {args.input}")
    if not is_model_uri(args.model) and not Path(args.model).exists():
        raise UsageError(f"--model: not found: {args.model}")
    check_out_outside(args.out, args.input, "--input")
    if args.dicom_out is not None:  # before any work, whatever runs the scoring (the executor's shards too)
        from lung_effnet.scoring.dicom_results import check_dicom_out_apart

        check_dicom_out_apart(args.dicom_out, **{"--input": args.input, "--out": args.out})
        _check_out(args.dicom_out, "--dicom-out")
    shard = _shard_arguments(args)
    options = {"batch_size": args.batch_size, "device": args.device, "workers": args.workers, "saliency": args.saliency,
               "pseudonymize_uids": args.pseudonymize_uids, "dicom_out": args.dicom_out}
    if args.executor is not None:
        return _score_with_executor(args, options)
    summary = score_archive(args.model, args.input, args.out, progress=not args.quiet, shard=shard, **options)
    if shard is not None:  # empty or unusable shards are fine: merge-scores judges the whole run
        print_score_summary(summary, args.out, args.saliency, f"Shard {shard}: series, volumes and images")
        print(f"When all {shard.count} shards are done: lung-effnet merge-scores SHARD_DIRS... --out DIR")
        return 0
    if summary["counts"]["files"]["total"] == 0:
        raise UsageError(f"--input: no files found in {args.input}")
    return _check_scored(print_score_summary(summary, args.out, args.saliency), args.out)


def _shard_arguments(args):
    """``--shard`` as a ``Shard`` (or ``None``), after checking the sharding options go together."""
    from lung_effnet.scoring.shards import Shard

    if args.executor is not None and args.shard is not None:
        raise UsageError("--shard and --executor: give one (--executor runs every shard, then the merge)")
    if (args.executor is None) != (args.shards is None):
        raise UsageError("--executor and --shards go together (e.g. --executor slurm --shards 8)")
    if args.shards is not None and args.shards < 1 or args.timeout_min < 1:
        raise UsageError(f"--shards must be >= 1 and --timeout-min >= 1, got {args.shards} and {args.timeout_min}")
    return None if args.shard is None else Shard.parse(args.shard)


def _score_with_executor(args, options: dict) -> int:
    from lung_effnet.cluster import ClusterOptions
    from lung_effnet.scoring.plan import submit_sharded_score

    cluster = ClusterOptions(partition=args.slurm_partition, gpus_per_job=args.gpus_per_shard,
                             timeout_min=args.timeout_min, name=f"lung-effnet-score-{args.out.name}")
    result = submit_sharded_score(args.model, args.input, args.out, args.shards, args.executor, cluster, **options)
    print(f"shard jobs: {', '.join(result['shard_jobs'])}; merge job: {result['merge_job']} "
          f"(shards in {args.out / 'shards'}, logs in {args.out / 'shards' / 'jobs'})")
    if "summary" not in result:
        print(f"The merged outputs will be in {args.out} when job {result['merge_job']} ends")
        return 0
    return _check_scored(print_score_summary(result["summary"], args.out, args.saliency), args.out)


def cmd_merge_scores(args) -> int:
    from lung_effnet.scoring.merge import merge_scores

    summary = merge_scores(args.shard_dirs, args.out)
    return _check_scored(print_score_summary(summary, args.out, (args.out / "reports").is_dir()), args.out)


def _check_scored(summary: dict, out: Path) -> int:
    files = summary["counts"]["files"]
    if files["used"] == 0:  # after the outputs that say why
        raise NoUsableInputError(f"none of the {files['total']} input file(s) could be scored: see {out / 'errors.csv'}")
    return 0


def print_score_summary(summary: dict, out: Path, reports: bool, title: str = "Series, volumes and images") -> dict:
    """The lines ``score`` and ``merge-scores`` print about a finished run; returns ``summary``."""
    from lung_effnet.console import format_table

    counts, run = summary["counts"], summary["run"]
    files = counts["files"]
    print()
    print(format_table(["series", "count"], [["scored", counts["series_scored"]], ["incomplete (scored)", counts["series_incomplete"]],
                                             ["failed", counts["series_failed"]],
                                             ["skipped (not CT)", counts["series_skipped"]]] +
                       [[f"predicted {c}", n] for c, n in counts["predicted"].items()], title))
    print(f"\nFiles: {files['total']} in = {files['used']} used + {files['skipped']} skipped + {files['failed']} failed "
          f"(errors.csv says why)")
    print(f"This run: {run['units_scored']} unit(s) scored, {run['units_resumed']} resumed, {run['slices_scored']} slices "
          f"in {run['wall_s']:.1f} s ({run['slices_per_s']:.1f} slices/s, {run['series_per_min']:.1f} series/min) on {run['device']}")
    print(f"Outputs in {out}: predictions.csv, slice_scores.csv, files.csv, errors.csv, summary.json"
          + (", reports/" if reports else ""))
    if "dicom_out" in summary:
        dicom = summary["dicom_out"]
        print(f"DICOM results in {dicom['dir']} (they carry patient tags): {dicom['files_written']} file(s) for "
              f"{dicom['series_written']} series" + "".join(f"; {n['series']} series without: {n['reason']}"
                                                             for n in dicom["not_written"]))
    if counts.get("series_in_training_data"):
        log.warning("%d of the %d scored series were in the model's training data (their warnings column says "
                    "which): their results look better than the model is and say nothing about new patients; judge "
                    "the model by its out-of-fold figures (cv_summary.json)", counts["series_in_training_data"],
                    counts["series_scored"])
    return summary


def cmd_demo(args) -> int:
    from lung_effnet.demo import run_demo

    if args.patients < 15:
        raise UsageError(f"--patients: must be >= 15 (5 folds need 5 patients of each class), got {args.patients}")
    run_demo(args.out, n_patients=args.patients, seed=args.seed, progress=not args.quiet, tracking_uri=args.tracking_uri)
    return 0


def cmd_report(args) -> int:
    from lung_effnet.explain.oof_report import build_oof_report
    from lung_effnet.explain.trained_run import load_run

    if args.top < 1:
        raise UsageError(f"--top: must be >= 1, got {args.top}")
    result = build_oof_report(load_run(args.run, args.tracking_uri), args.out, method=args.method, top=args.top)
    rand = result["checks"]["randomization"]
    if not args.quiet:
        print(f"randomization test: median rho {rand['median_rho']:.3f} ({'passed' if rand['passed'] else 'FAILED'})")
        for name, v in result["checks"]["localization"].items():
            print(f"{name}: pointing {v['pointing_hit_rate']:.2f} (chance {v['pointing_chance']:.2f}), "
                  f"energy in lesion {v['energy_in_lesion']:.3f} (area {v['lesion_area']:.3f}), n={v['n']}")
    print(f"wrote {result['n_cases']} cases to {result['html']}")
    return 0


def cmd_export_bundle(args) -> int:
    from lung_effnet.models.bundle import export_bundle
    from lung_effnet.models.predictor import is_model_uri

    if not is_model_uri(args.model) and not Path(args.model).exists():
        raise UsageError(f"MODEL: not found: {args.model}")
    result = export_bundle(args.model, args.out, version=args.bundle_version, authors=args.authors,
                           data_source=args.data_source)
    print(f"wrote the MONAI bundle to {result['bundle']} ({result['torchscript'].split(':')[0]})")
    print(f"run it: python -m monai.bundle run --config_file {result['bundle'] / 'configs' / 'inference.json'} "
          f"--bundle_root {result['bundle']} --dataset_dir SLICES")
    return 0


def _check_out(out: Path | str | None, flag: str = "--out") -> None:
    """``--out`` (or ``OUT``) must be a folder or not exist yet, nor lie under a file, and this
    process must be able to create it and write in it: checked before any work, so that a run
    does not read a whole archive to fail at its first write."""
    if out is None or os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone checks and writes
        return
    out = Path(out)
    try:
        for path in (out, *out.parents):
            if path.exists():
                if not path.is_dir():
                    raise UsageError(f"{flag}: not a folder: {path}" + ("" if path == out else f" (in {out})"))
                break
        _try_writing(out)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write to {out}: {exc.strerror or type(exc).__name__}") from None


def _try_writing(out: Path) -> None:
    """Create ``out`` (and missing parents) and a file in it; remove all that this created."""
    created: list[Path] = []
    try:
        for path in (*reversed(out.parents), out):
            if not path.exists():
                path.mkdir()
                created.append(path)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".lung-effnet-write-test-")
        os.close(fd)
        os.unlink(probe)
    finally:
        for path in reversed(created):
            path.rmdir()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # MLflow's INFO lines (store creation, migrations) are noise here; MLflow sets its level when first
    # imported, which happens later, so it is told through its own variable (a user's setting wins).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    disable_telemetry()  # no usage telemetry from MLflow, in this process and those it starts (README, Privacy)
    configure_http(TrackingConfig.timeout_s, TrackingConfig.retries)  # no MLflow call waits minutes (score/report on a URI)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    if getattr(args, "quiet", False):  # -q: no progress bars, MLflow's artifact downloads included
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    handler = {"synth": cmd_synth, "ingest": cmd_ingest, "train": cmd_train, "pretrain": cmd_pretrain, "score": cmd_score,
               "demo": cmd_demo, "merge-scores": cmd_merge_scores,
               "report": cmd_report, "export-bundle": cmd_export_bundle}[args.command]
    try:
        _check_out(getattr(args, "out", None))
        return handler(args)
    except LungEffNetError as exc:  # bad input, bad config, unreachable service: one line; anything else is a bug
        print(f"lung-effnet {args.command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
