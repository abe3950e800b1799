"""The pipeline's commands: ``pix2seq download | prepare | train | eval | tune`` (the DVC stages).

Each takes ``[--params FILE] [key.sub=value ...]``, loads and validates the config before any work
starts, and calls the stage's function; train, eval and tune relaunch themselves under torchrun on
every local GPU (``GPUS=N`` to choose; left alone when torchrun started them).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from pix2seq.config import Config, load_config

PREPARE_REPORT = "reports/prepare.json"
TORCHRUN_MODULE = ["-m", "pix2seq.cli"]


def _stage_parser(sub: Any, name: str, func: Any, help: str, description: str | None = None) -> Any:
    """A stage command's parser: ``[--params FILE] [key.sub=value ...]`` running ``func``."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.add_argument("--params", default="params.yaml", help="the parameter file (default params.yaml)")
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.lr=1e-3"
    )
    p.set_defaults(func=func, positional="overrides")
    return p


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.overrides)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _relaunch(args: argparse.Namespace) -> None:
    from pix2seq.launch import relaunch_under_torchrun

    relaunch_under_torchrun([*TORCHRUN_MODULE, args.command, *args.argv])


# ------------------------------------------------------------------------------------ data


def cmd_download(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _logging()
    from pix2seq.data.download import run_download

    summary = run_download(cfg)
    print(f"download: {summary['source']} dataset ready in {summary['root']}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _logging()
    from pix2seq.data.prepare import run_prepare

    report = run_prepare(cfg, PREPARE_REPORT)
    for split, r in report.items():
        if isinstance(r, dict):
            print(
                f"prepare: {split}: {r['images_kept']} images, {r['boxes_kept']} boxes ({r['images_bad']} bad "
                f"images, {r['boxes_dropped']} boxes dropped)"
            )
    print(f"prepare: report in {PREPARE_REPORT}")
    return 0


def register_download(sub: Any) -> None:
    _stage_parser(
        sub, "download", cmd_download, "COCO 2017, the generated dataset, or link your files (data.source)"
    )


def register_prepare(sub: Any) -> None:
    _stage_parser(sub, "prepare", cmd_prepare, "validate the dataset in data.root and write the manifests")


# ----------------------------------------------------------------------------- train, eval


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)  # a bad key fails before any process starts
    _relaunch(args)
    from pix2seq.training import run_training

    result = run_training(cfg)
    if result.run_id:
        print(f"best AP {result.best_ap:.1f}; MLflow run {result.run_id}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _relaunch(args)
    from pix2seq.evaluation.report import describe, run_evaluation

    metrics = run_evaluation(cfg)
    if metrics:
        print(f"validation: {describe(metrics)}  ->  {cfg.eval.output_dir}/metrics.json")
    return 0


def register_train(sub: Any) -> None:
    _stage_parser(
        sub,
        "train",
        cmd_train,
        "train Pix2Seq on the prepared data (resumes from the last checkpoint)",
        "Train on every local GPU (GPUS=N to choose), or on the CPU; multi-node: run under torchrun "
        "(torchrun --nnodes 2 --nproc_per_node 8 ... -m pix2seq.cli train).",
    )


def register_eval(sub: Any) -> None:
    _stage_parser(
        sub, "eval", cmd_eval, "COCO AP of the trained model on the validation split, tables and plots"
    )


# ------------------------------------------------------------------------------------ tune


def cmd_tune(args: argparse.Namespace) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    cfg = _config(args)
    from pix2seq import tuning
    from pix2seq.tuning.report import format_report

    if args.print_storage:
        print(tuning.storage_url(cfg.tune.storage))
        return 0
    if args.best_overrides:
        print(" ".join(tuning.best_overrides(cfg)))
        return 0
    _relaunch(args)
    _logging()
    from pix2seq import distributed as dist

    try:
        summary = tuning.run_study(
            cfg,
            runs_dir=args.runs_dir,
            max_retry=args.max_retry,
            grace_period_s=args.grace_s,
            write_output=not args.worker,
        )
    finally:
        dist.cleanup()
    if summary is None:  # a rank > 0 of a torchrun job
        return 0
    print(format_report(summary.report))
    print(
        f"tune: this worker ran trials {summary.trials_run_here}; MLflow parent run {summary.parent_run_id}"
        + (f"; report in {cfg.tune.report_dir}/" if summary.output else "")
    )
    if summary.best is None:
        raise tuning.StudyError(f"no trial of study {summary.study_name} completed")
    b = summary.best
    if b["recommended"]:
        print(
            f"tune: best trial {b['trial']}: AP {b['AP']:.2f} with train.lr={b['train.lr']:.3g} "
            f"train.batch_repeat={b['train.batch_repeat']}"
            + (f" -> {summary.output} (make train-best trains with them)" if summary.output else "")
        )
    return 0


def register_tune(sub: Any) -> None:
    p = _stage_parser(
        sub,
        "tune",
        cmd_tune,
        "Optuna study over train.lr x train.batch_repeat (objective: validation AP)",
        "The study of this configuration (tune.study_name + a digest of the tuned config, in "
        "tune.storage) resumes where it stopped; any number of workers on any number of machines sharing "
        "the storage (and MLFLOW_TRACKING_URI) finish tune.n_trials trials together.",
    )
    p.add_argument(
        "--worker", action="store_true", help="join the study as an extra worker: do not write tune.output"
    )
    p.add_argument("--runs-dir", default="runs/tune", help="trial n trains in RUNS_DIR/<study>/trial-<n>")
    p.add_argument("--max-retry", type=int, default=3, help="retries of a trial whose worker died")
    p.add_argument(
        "--grace-s",
        type=int,
        default=None,
        help="heartbeat silence that declares a worker dead (default 2 x heartbeat)",
    )
    p.add_argument(
        "--best-overrides",
        action="store_true",
        help="print the best trial's overrides of this configuration's study (make train-best) and exit",
    )
    p.add_argument(
        "--print-storage", action="store_true", help="print tune.storage as a SQLAlchemy URL and exit"
    )
