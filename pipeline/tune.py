"""DVC stage `tune`: an Optuna study over train.lr and train.batch_repeat (objective: validation AP).

    python pipeline/tune.py [key.sub=value ...]                  # make tune; GPUS=N: every trial on N GPUs
    python pipeline/tune.py --worker tune.storage=postgresql://user@host/db   # make tune-worker STORAGE=...
    python pipeline/tune.py --best-overrides                     # "train.lr=... train.batch_repeat=..."

The study (tune.study_name in tune.storage) resumes where it stopped; any number of workers, on any
number of machines sharing the storage (and MLFLOW_TRACKING_URI), finish tune.n_trials trials
together. A worker launched on several GPUs runs each trial as one torchrun job. The best parameters
go to tune.output (reports/best_params.json); `make train-best` trains with them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("MPLBACKEND", "Agg")

from pix2seq.config import load_config  # noqa: E402
from pix2seq.errors import Pix2SeqError, run_entry_point  # noqa: E402


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--worker", action="store_true", help="join the study as an extra worker: do not write tune.output"
    )
    parser.add_argument(
        "--runs-dir", default="runs/tune", help="trial n trains in RUNS_DIR/<study>/trial-<n>"
    )
    parser.add_argument("--max-retry", type=int, default=3, help="retries of a trial whose worker died")
    parser.add_argument(
        "--grace-s",
        type=int,
        default=None,
        help="heartbeat silence that declares a worker dead (default 2 * tune.heartbeat_s)",
    )
    parser.add_argument(
        "--best-overrides",
        action="store_true",
        help="print the overrides in tune.output (for pipeline/train.py) and exit",
    )
    parser.add_argument(
        "--print-storage",
        action="store_true",
        help="print tune.storage (as SQLAlchemy URL with its driver) and exit",
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.params, args.overrides)  # fail on a bad key before starting processes

    from pix2seq import tuning

    if args.print_storage:
        print(tuning.storage_url(cfg.tune.storage))
        return 0

    if args.best_overrides:
        try:
            print(" ".join(tuning.best_overrides(cfg.tune.output)))
        except ValueError as e:  # malformed JSON or a missing key: one line naming the file
            msg = str(e) if str(e).startswith(cfg.tune.output) else f"{cfg.tune.output}: not valid JSON ({e})"
            raise Pix2SeqError(msg) from None
        return 0

    from pix2seq.launch import relaunch_under_torchrun

    relaunch_under_torchrun(__file__, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
    c = summary.counts
    print(
        f"tune: study {summary.study_name}: {c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed "
        f"(this worker ran trials {summary.trials_run_here}); MLflow parent run {summary.parent_run_id}"
    )
    if summary.best is None:
        print(f"tune: error: no trial of study {summary.study_name} completed", file=sys.stderr)
        return 1
    b = summary.best
    print(
        f"tune: best trial {b['trial']}: AP {b['AP']:.2f} with train.lr={b['train.lr']:.3g} "
        f"train.batch_repeat={b['train.batch_repeat']}" + (f" -> {summary.output}" if summary.output else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry_point("tune", lambda: run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
